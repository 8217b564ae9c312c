"""Whole-volume evaluation of MONAI's DiffusionModelUNet in z-slabs, for volumes too large for
MONAI's own forward on one GPU (e.g. 512x512x256 in 24 GB).

It computes the same function as ``net(x, timesteps)``: every layer is still applied to the whole
volume, one z-slab of its output at a time. A convolution reads its input slab with the halo its
kernel needs (zeros beyond the volume, as the layer's own padding); a GroupNorm first takes its
statistics over all slabs, then normalizes slab by slab. Feature maps live in a ``Store`` that keeps
them on the GPU up to a byte budget and in (pinned) host memory beyond it. Levels whose feature
maps are small run MONAI's own block forward unchanged.

Why hand-written: MONAI's SlidingWindowInferer tiles the *input* and blends outputs, which changes
the function (GroupNorm statistics, receptive field, seams); the method samples the whole volume at
once. This module only re-orders MONAI's computation and reuses its modules' parameters; the tests
check it against ``net(x, t)``.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import (
    DiffusionUnetDownsample,
    DiffusionUNetResnetBlock,
    DownBlock,
    UpBlock,
    get_timestep_embedding,
)
from torch import nn

from medsyn_site.diffusion.model import COORDS


class Store:
    """Whole-volume feature maps: on ``device`` up to ``budget_bytes``; beyond it the oldest maps
    move to host memory (in a UNet the oldest are the skips, needed last). Counts bytes held on each
    side and bytes moved between them."""

    def __init__(self, device: torch.device, budget_bytes: float):
        self.device, self.budget = torch.device(device), budget_bytes
        self.bytes = {"device": 0, "host": 0}
        self.peak = {"device": 0, "host": 0}
        self.moved = 0
        self._live: dict[int, list] = {}  # allocation order -> [side, bytes, weakref]
        self._next = 0

    def empty(self, shape, dtype) -> torch.Tensor:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        for entry in list(self._live.values()):  # evict the oldest until the new map fits
            if self.bytes["device"] + n <= self.budget:
                break
            if entry[0] == "device" and entry[2]() is not None:
                self._evict(entry)
        if self.bytes["device"] + n <= self.budget:
            side, t = "device", torch.empty(shape, dtype=dtype, device=self.device)
        else:
            side, t = "host", self._host_empty(shape, dtype)
        self._account(side, n)
        self._live[self._next] = [side, n, weakref.ref(t)]
        weakref.finalize(t, self._release, self._next)
        self._next += 1
        return t

    def _host_empty(self, shape, dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        t._medsyn_host = True  # on a CPU-only run both sides are host memory: tell them apart
        return t

    def _evict(self, entry: list) -> None:
        t = entry[2]()
        host = self._host_empty(t.shape, t.dtype)
        host.copy_(t)
        t.set_(host)  # every holder of t now reads host memory
        t._medsyn_host = True
        self.moved += entry[1]
        self._account("device", -entry[1])
        self._account("host", entry[1])
        entry[0] = "host"

    def _account(self, side: str, n: int) -> None:
        self.bytes[side] += n
        self.peak[side] = max(self.peak[side], self.bytes[side])

    def _release(self, key: int) -> None:
        side, n, _ = self._live.pop(key)
        self.bytes[side] -= n

    def read(self, t: torch.Tensor, z0: int, z1: int) -> torch.Tensor:
        s = t[:, :, z0:z1]
        if self._on_device(t):
            return s
        self.moved += s.numel() * s.element_size()
        return s.to(self.device, non_blocking=True, copy=True)

    def write(self, t: torch.Tensor, z0: int, z1: int, value: torch.Tensor) -> None:
        if not self._on_device(t):
            self.moved += value.numel() * value.element_size()
        t[:, :, z0:z1].copy_(value, non_blocking=True)

    def _on_device(self, t: torch.Tensor) -> bool:
        return t.device == self.device and not getattr(t, "_medsyn_host", False)

    def put(self, value: torch.Tensor) -> torch.Tensor:
        t = self.empty(value.shape, value.dtype)
        self.write(t, 0, value.shape[2], value)
        return t


class Feature:
    """A feature map as channel-concatenated stored parts (UNet skips are concatenated lazily)."""

    def __init__(self, store: Store, *parts: torch.Tensor):
        self.store, self.parts = store, parts
        self.shape = (parts[0].shape[0], sum(p.shape[1] for p in parts), *parts[0].shape[2:])

    def read(self, z0: int, z1: int) -> torch.Tensor:
        slabs = [self.store.read(p, z0, z1) for p in self.parts]
        return slabs[0] if len(slabs) == 1 else torch.cat(slabs, 1)

    def whole(self) -> torch.Tensor:
        return self.read(0, self.shape[2])

    @property
    def voxels(self) -> int:
        return self.shape[2] * self.shape[3] * self.shape[4]


def _conv3d(module: nn.Module) -> nn.Conv3d:
    conv = getattr(module, "conv", module)
    if not isinstance(conv, nn.Conv3d) or conv.groups != 1 or conv.dilation != (1, 1, 1) \
            or conv.padding_mode != "zeros":
        raise NotImplementedError(f"streamed evaluation: unsupported convolution {module}")
    return conv


class StreamedUNet(nn.Module):
    """``StreamedUNet(net)(x, timesteps)`` == ``net(x, timesteps)`` for a 3-D DiffusionModelUNet
    without attention at the streamed levels. ``slab_voxels``: output voxels per slab;
    ``whole_voxels``: levels up to this size run MONAI's own block forward (default: 1/8 slab);
    ``budget_bytes``: feature-map bytes kept on the device before spilling to the host (default: all)."""

    def __init__(self, net: nn.Module, slab_voxels: int = 2 ** 20, budget_bytes: float = float("inf"),
                 whole_voxels: int | None = None):
        super().__init__()
        if net.num_class_embeds is not None or getattr(net, "with_conditioning", False):
            raise NotImplementedError("streamed evaluation: class or cross-attention conditioning")
        self.net, self.slab_voxels, self.budget_bytes = net, slab_voxels, budget_bytes
        self.whole_voxels = slab_voxels // 8 if whole_voxels is None else whole_voxels
        self.store: Store | None = None

    # --- slab-wise primitives -------------------------------------------------------------------
    def _depth(self, plane: int) -> int:
        return max(1, self.slab_voxels // plane)

    def _conv(self, read, z_in: int, module: nn.Module, plane: int, add=None) -> torch.Tensor:
        """conv(input) (+ add(o0, o1)) over the whole depth, in slabs of ``plane``-voxel output rows;
        ``read(a, b)`` yields input rows a..b-1."""
        conv = _conv3d(module)
        (k, _, _), (s, _, _), (p, py, px) = conv.kernel_size, conv.stride, conv.padding
        z_out, out, depth = (z_in + 2 * p - k) // s + 1, None, self._depth(plane)
        for o0 in range(0, z_out, depth):
            o1 = min(z_out, o0 + depth)
            a, b = o0 * s - p, (o1 - 1) * s - p + k
            x = read(max(a, 0), min(b, z_in))
            if a < 0 or b > z_in:  # the layer's zero padding, at the volume's ends only
                x = F.pad(x, (0, 0, 0, 0, max(0, -a), max(0, b - z_in)))
            y = F.conv3d(x, conv.weight, conv.bias, stride=conv.stride, padding=(0, py, px))
            if add is not None:
                y = y + add(o0, o1)
            if out is None:
                out = self.store.empty((y.shape[0], y.shape[1], z_out, *y.shape[3:]), y.dtype)
            self.store.write(out, o0, o1, y)
        return out

    def _norm_act(self, f: Feature, gn: nn.GroupNorm):
        """Reader of SiLU(GroupNorm(f)) rows, with statistics from a first pass over all slabs."""
        b, c, g = f.shape[0], f.shape[1], gn.num_groups
        n = torch.zeros(b, g, dtype=torch.float64, device=self.store.device)
        mean, m2, depth = torch.zeros_like(n), torch.zeros_like(n), self._depth(f.shape[3] * f.shape[4])
        for z0 in range(0, f.shape[2], depth):
            x = f.read(z0, min(f.shape[2], z0 + depth)).float().reshape(b, g, -1)
            n_i = x.shape[-1]
            m_i, v_i = x.mean(-1).double(), x.var(-1, unbiased=False).double()
            delta, tot = m_i - mean, n + n_i
            mean, m2, n = mean + delta * n_i / tot, m2 + v_i * n_i + delta ** 2 * n * n_i / tot, tot
        mean, rstd = mean.float(), (m2 / n + gn.eps).rsqrt().float()
        w = gn.weight.float().view(1, c, 1, 1, 1)
        bias = gn.bias.float().view(1, c, 1, 1, 1)

        def read(z0: int, z1: int) -> torch.Tensor:  # one float32 copy, normalized in place
            x = f.read(z0, z1).to(torch.float32, copy=True)
            x.view(b, g, -1).sub_(mean[..., None]).mul_(rstd[..., None])
            return F.silu(x.mul_(w).add_(bias), inplace=True)
        return read

    def _resnet(self, block: nn.Module, f: Feature, emb: torch.Tensor) -> Feature:
        if not isinstance(block, DiffusionUNetResnetBlock) or block.up or block.down:
            raise NotImplementedError(f"streamed evaluation: unsupported block {type(block).__name__}")
        plane = f.shape[3] * f.shape[4]
        temb = block.time_emb_proj(F.silu(emb))[:, :, None, None, None]
        h = Feature(self.store, self._conv(self._norm_act(f, block.norm1), f.shape[2], block.conv1, plane,
                                           add=lambda o0, o1: temb))
        skip = block.skip_connection
        return Feature(self.store, self._conv(self._norm_act(h, block.norm2), h.shape[2], block.conv2, plane,
                                              add=lambda o0, o1: skip(f.read(o0, o1))))

    def _small(self, f: Feature) -> bool:
        return f.voxels <= self.whole_voxels

    def _whole(self, value: torch.Tensor) -> Feature:
        return Feature(self.store, self.store.put(value))

    # --- the network, in MONAI's order (DiffusionModelUNet.forward) -----------------------------
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None) -> torch.Tensor:
        if context is not None:
            raise NotImplementedError("streamed evaluation: cross-attention context")
        net = self.net
        self.store = Store(x.device, self.budget_bytes)
        emb = net.time_embed(get_timestep_embedding(timesteps, net.block_out_channels[0]).to(x.dtype))
        f = Feature(self.store, x)
        h = Feature(self.store, self._conv(f.read, x.shape[2], net.conv_in, x.shape[3] * x.shape[4]))
        skips = [h]
        for block in net.down_blocks:
            if self._small(h):
                h_t, res = block(hidden_states=h.whole(), temb=emb)
                skips += [self._whole(r) for r in res]
                h = skips[-1] if res else self._whole(h_t)
                continue
            if type(block) is not DownBlock:
                raise NotImplementedError(f"streamed evaluation: {type(block).__name__} at a large level")
            for resnet in block.resnets:
                h = self._resnet(resnet, h, emb)
                skips.append(h)
            if block.downsampler is not None:
                if not isinstance(block.downsampler, DiffusionUnetDownsample) or not block.downsampler.use_conv:
                    raise NotImplementedError("streamed evaluation: pooling downsampler")
                plane = (h.shape[3] + 1) // 2 * ((h.shape[4] + 1) // 2)
                h = Feature(self.store, self._conv(h.read, h.shape[2], block.downsampler.op, plane))
                skips.append(h)
        mid = net.middle_block
        if self._small(h):
            h = self._whole(mid(hidden_states=h.whole(), temb=emb))
        elif isinstance(getattr(mid, "attention", None), nn.Identity):
            h = self._resnet(mid.resnet_2, self._resnet(mid.resnet_1, h, emb), emb)
        else:
            raise NotImplementedError("streamed evaluation: middle-block attention at a large level")
        for block in net.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            if self._small(h) and all(self._small(r) for r in res):
                h = self._whole(block(hidden_states=h.whole(), res_hidden_states_list=[r.whole() for r in res],
                                      temb=emb))
                continue
            if type(block) is not UpBlock:
                raise NotImplementedError(f"streamed evaluation: {type(block).__name__} at a large level")
            for resnet in block.resnets:
                h = self._resnet(resnet, Feature(self.store, *h.parts, *res.pop().parts), emb)
            if block.upsampler is not None:
                h = self._upsample(block.upsampler, h)
        gn, _, conv = net.out
        out = self._conv(self._norm_act(h, gn), h.shape[2], conv, h.shape[3] * h.shape[4]).to(x.device)
        if getattr(net, "coord_head", None) is not None:  # per voxel, chunked in z by the head itself
            out += net.coord_head(x[:, COORDS], timesteps).to(out.dtype)
        return out

    def _upsample(self, up: nn.Module, h: Feature) -> Feature:
        """MONAI's non-trainable Upsample: nearest x2, then its post-convolution."""
        if hasattr(up, "preconv") or not hasattr(up, "postconv") or up.upsample_non_trainable.mode != "nearest":
            raise NotImplementedError("streamed evaluation: only nearest x2 upsampling with a post-conv")

        def read(a: int, b: int) -> torch.Tensor:
            x = F.interpolate(h.read(a // 2, (b - 1) // 2 + 1), scale_factor=2, mode="nearest")
            return x[:, :, a - a // 2 * 2: a - a // 2 * 2 + b - a]
        return Feature(self.store, self._conv(read, 2 * h.shape[2], up.postconv, h.shape[3] * h.shape[4] * 4))
