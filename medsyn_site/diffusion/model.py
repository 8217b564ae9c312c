"""The network (MONAI DiffusionModelUNet), its conditioning input, and the noise schedulers."""
from __future__ import annotations

import functools

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from medsyn_site.config import DiffusionConfig, ModelConfig


def build_unet(cfg: ModelConfig) -> DiffusionModelUNet:
    """The 3-D UNet; with ``mid_attention`` off, the middle block's self-attention (which MONAI
    always builds, and which is quadratic in the lowest level's voxels) is replaced by Identity."""
    net = DiffusionModelUNet(
        spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        channels=tuple(cfg.channels), attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks, num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups, use_flash_attention=cfg.flash_attention)
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
