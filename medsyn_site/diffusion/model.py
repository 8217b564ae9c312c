"""The network (MONAI DiffusionModelUNet), its conditioning input, and the noise schedulers."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, get_timestep_embedding
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from medsyn_site.config import DiffusionConfig, ModelConfig


COORDS = slice(2, 5)  # the coordinate channels of the network input (see network_input)


class CoordPriorHead(nn.Module):
    """A per-voxel MLP of (Fourier features of the voxel's whole-volume coordinates, timestep),
    added to the UNet's output.

    Why: the UNet normalizes every feature map with GroupNorm, whose statistics are taken over the
    *patch* in training; that removes most of the absolute position the coordinate channels carry,
    so the network learns local texture and the mask but hardly the global layout (where body,
    lungs and outside air are). At high noise the best prediction is that layout's mean (for
    v-prediction, minus the prior mean of x0 at each voxel), a function of position only. This head
    has no normalization, so it is the same function on a patch and on the whole volume and learns
    that position -> mean map directly; the UNet models the rest. Per voxel, so evaluated in z-chunks
    when no gradient is needed (memory O(chunk), also at 512x512x256)."""

    def __init__(self, hidden: int, frequencies: int = 4, time_dim: int = 32):
        super().__init__()
        self.frequencies, self.time_dim = frequencies, time_dim
        n_in = 3 + 6 * frequencies
        self.inp = nn.Conv3d(n_in, hidden, 1)
        self.time = nn.Linear(time_dim, hidden)
        self.mid = nn.Conv3d(hidden, hidden, 1)
        self.out = nn.Conv3d(hidden, 1, 1)
        nn.init.zeros_(self.out.weight)  # like MONAI's output conv: a fresh head adds exactly 0
        nn.init.zeros_(self.out.bias)

    def _features(self, coords: torch.Tensor) -> torch.Tensor:
        scaled = [coords * (torch.pi * 2 ** k) for k in range(self.frequencies)]
        return torch.cat([coords, *[torch.sin(s) for s in scaled], *[torch.cos(s) for s in scaled]], 1)

    def _mlp(self, coords: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.inp(self._features(coords)) + temb[:, :, None, None, None]
        return self.out(F.silu(self.mid(F.silu(h))))

    def forward(self, coords: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        temb = self.time(get_timestep_embedding(timesteps, self.time_dim).to(coords.dtype))
        if torch.is_grad_enabled():
            return self._mlp(coords, temb)
        plane = coords.shape[3] * coords.shape[4]
        step = max(1, 2 ** 22 // (plane * self.inp.out_channels))
        return torch.cat([self._mlp(coords[:, :, z: z + step], temb) for z in range(0, coords.shape[2], step)], 2)


class MedsynUNet(DiffusionModelUNet):
    """MONAI's DiffusionModelUNet plus, optionally, the coordinate prior head (``model.coord_head``)."""

    def __init__(self, *args, coord_head: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.coord_head = CoordPriorHead(coord_head) if coord_head else None

    def forward(self, x, timesteps, context=None, class_labels=None, down_block_additional_residuals=None,
                mid_block_additional_residual=None):
        out = super().forward(x, timesteps, context, class_labels, down_block_additional_residuals,
                              mid_block_additional_residual)
        if self.coord_head is not None:
            out = out + self.coord_head(x[:, COORDS], timesteps).to(out.dtype)
        return out


def build_unet(cfg: ModelConfig) -> MedsynUNet:
    """The 3-D UNet; with ``mid_attention`` off, the middle block's self-attention (which MONAI
    always builds, and which is quadratic in the lowest level's voxels) is replaced by Identity."""
    net = MedsynUNet(
        spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        channels=tuple(cfg.channels), attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks, num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups, use_flash_attention=cfg.flash_attention,
        coord_head=cfg.coord_head)
    if not cfg.mid_attention:
        net.middle_block.attention = nn.Identity()
    return net


def scheduler(cfg: DiffusionConfig, sampler: str = "ddpm"):
    """MONAI's DDPM (training, ancestral sampling) or DDIM scheduler for this noise process."""
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[sampler]
    return cls(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
               prediction_type=cfg.prediction_type)


def coordinate_grid(shape_zyx, start_zyx=(0, 0, 0), full_zyx=None) -> torch.Tensor:
    """(3, *shape) coordinates in [-1, 1] of each voxel's position in the whole volume of size
    ``full_zyx``, for the block starting at ``start_zyx`` (a patch, or the whole volume)."""
    full = full_zyx or shape_zyx
    axes = [(torch.arange(n, dtype=torch.float32) + s) / max(f - 1, 1) * 2 - 1
            for n, s, f in zip(shape_zyx, start_zyx, full)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def network_input(noisy: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Concatenate (B,1,...) noisy CT, (B,1,...) mask and (B,3,...) coordinates -> (B,5,...)."""
    return torch.cat([noisy, mask.to(noisy.dtype), coords.to(noisy.dtype)], dim=1)


def _checkpointed_forward(block: nn.Module, forward, checkpoint_fn, x, emb):
    if not (torch.is_grad_enabled() and block.training):
        return forward(x, emb)
    # DeepSpeed frees a checkpointed input in place once it is stashed (offloaded); x and the
    # shared time embedding are still used by skip connections and other blocks, so pass clones.
    return checkpoint_fn(forward, x.clone(), emb.clone())


def enable_activation_checkpointing(net: nn.Module, checkpoint_fn) -> int:
    """Recompute every ResNet block in backward through ``checkpoint_fn`` (e.g.
    deepspeed.checkpointing.checkpoint). Patches the instances' forward, so state_dict keys stay
    the same. Returns the number of blocks wrapped."""
    n = 0
    for module in net.modules():
        if isinstance(module, DiffusionUNetResnetBlock) and "forward" not in module.__dict__:
            module.forward = functools.partial(_checkpointed_forward, module, module.forward, checkpoint_fn)
            n += 1
    return n


def hu_to_unit(hu: torch.Tensor, window) -> torch.Tensor:
    lo, hi = window
    return ((hu.float() - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)


def unit_to_hu(x: torch.Tensor, window) -> torch.Tensor:
    lo, hi = window
    return (x.float().clamp(-1, 1) + 1) / 2 * (hi - lo) + lo


class EMA:
    """Exponential moving average of a model's weights, kept in float32.

    torch's AveragedModel lerps in the model's own dtype; under bf16/fp16 training that loses the
    small updates an EMA exists to accumulate, hence this float32 copy.
    """

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float().to(self.shadow[k].device), 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
