"""The network (MONAI DiffusionModelUNet), its conditioning input, and the noise schedulers."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, get_timestep_embedding
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from medsyn_site.config import ConfigError, DiffusionConfig, ModelConfig


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


def scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """MONAI's DDPM scheduler for this noise process (training: add_noise, get_velocity)."""
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                         prediction_type=cfg.prediction_type, **schedule_args(cfg))


def schedule_args(cfg: DiffusionConfig) -> dict:
    """MONAI's extra arguments of the noise schedule (the cosine schedule's offset)."""
    return {"s": cfg.cosine_s} if cfg.schedule == "cosine" else {}


def predicted_x0(model_output: torch.Tensor, sample: torch.Tensor, abar: torch.Tensor, prediction_type: str):
    """The network's estimate of the clean volume at a timestep with cumulative alpha ``abar``."""
    if prediction_type == "epsilon":
        return (sample - (1 - abar).sqrt() * model_output) / abar.sqrt()
    return abar.sqrt() * sample - (1 - abar).sqrt() * model_output  # v-prediction


class _TrailingSteps:
    """Evenly spaced timesteps T-1, T-1-k, ..., k-1 (k = T // steps, steps dividing T): "trailing"
    spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"), so
    the first step sees pure noise as training's last timestep does, and the constant stride k is
    the one the step takes (MONAI 1.6's ``set_timesteps`` spaces by linspace(T-1, 0) while DDIM's
    ``step`` goes back T // steps: the two disagree unless steps - 1 divides T - 1)."""

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T or T % num_inference_steps:
            near = sorted((d for d in range(1, T + 1) if T % d == 0), key=lambda d: abs(d - num_inference_steps))
            raise ConfigError(f"--steps {num_inference_steps}: sampling needs a step count that divides the "
                              f"model's {T} training timesteps (e.g. {', '.join(map(str, sorted(near[:3])))})")
        self.num_inference_steps = num_inference_steps
        self.stride = T // num_inference_steps
        self.timesteps = torch.arange(T - 1, -1, -self.stride, device=device)


class TrailingDDIMScheduler(_TrailingSteps, DDIMScheduler):
    """MONAI's deterministic DDIM step (eta 0) on trailing timesteps; the last step's alpha_prev is 1."""


class StridedDDPMScheduler(_TrailingSteps, DDPMScheduler):
    """Ancestral DDPM sampling on trailing timesteps with stride k = T // steps.

    MONAI's ``DDPMScheduler.step`` always steps from t to t - 1 (``alphas_cumprod[t - 1]``, ``betas[t]``)
    whatever ``set_timesteps`` chose, so with fewer steps than training it samples the wrong
    distribution. This step is the DDPM posterior q(x_{t-k} | x_t, x0) of the respaced chain
    (Nichol & Dhariwal 2021, sec. 4): beta' = 1 - abar_t / abar_{t-k}, "fixed small" variance;
    with all training steps it is MONAI's step.
    """

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = int(timestep)
        prev = t - getattr(self, "stride", 1)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else self.one
        beta = 1 - abar_t / abar_prev
        x0 = predicted_x0(model_output, sample, abar_t, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clamp(*self.clip_sample_values)
        mean = (abar_prev.sqrt() * beta / (1 - abar_t)) * x0 + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)) * sample
        if prev < 0:
            return mean, x0
        noise = torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator).to(model_output.device)
        return mean + (beta * (1 - abar_prev) / (1 - abar_t)).clamp(min=1e-20).sqrt() * noise, x0


class SolverScheduler:
    """DPM-Solver++ (2M, or its SDE form; diffusers' DPMSolverMultistepScheduler) behind MONAI's
    scheduler interface (``timesteps``, ``set_timesteps``, ``step``), so MONAI's DiffusionInferer and
    the streamed network drive it as they drive DDPM.
    - The training noise process exactly: MONAI's betas as ``trained_betas``.
    - Steps uniform in log-SNR (as DPM-Solver's authors space them), from pure noise (the last
      training timestep) down to noise 0. Uniform timesteps leave the low-noise end, where fine
      detail forms, to one or two steps (exact denoiser on N(0.3, 0.2^2), 10 steps: std 0.10 with
      trailing timesteps, 0.20 here). diffusers' own ``use_lu_lambdas`` spans every log-SNR down to
      the cosine schedule's -10 (where the input is noise to 4 decimals) and so spends half the
      steps there; its ``lambda_min_clipped`` does not apply to it. So the timesteps are made here,
      from log-SNR ``LOG_SNR_MIN`` up, and handed to diffusers (``set_timesteps(timesteps=...)``).
    - The x0 prediction clipped to [-1, 1] as MONAI's DDPM clips it. diffusers' ``thresholding``
      would take a torch.quantile of the whole volume, which refuses tensors over 16 M voxels, so
      the model output is rewritten to the clipped x0's equivalent instead (same solver arithmetic).
    UniPC (diffusers) takes no custom timesteps for this noise process, hence not offered."""

    SOLVERS = {"dpm++": "dpmsolver++", "sde-dpm++": "sde-dpmsolver++"}
    LOG_SNR_MIN = -10.0  # abar 4.5e-5: below it the network sees noise only

    def __init__(self, cfg: DiffusionConfig, solver: str):
        from diffusers import DPMSolverMultistepScheduler

        train = scheduler(cfg)
        self.num_train_timesteps, self.prediction_type = cfg.num_train_timesteps, cfg.prediction_type
        self.alphas_cumprod = train.alphas_cumprod
        self.stochastic = solver.startswith("sde")
        self.solver = DPMSolverMultistepScheduler(
            num_train_timesteps=cfg.num_train_timesteps, trained_betas=train.betas.numpy(),
            prediction_type=cfg.prediction_type, algorithm_type=self.SOLVERS[solver], solver_order=2,
            final_sigmas_type="zero")

    def log_snr_timesteps(self, n: int) -> list[int]:
        """``n`` timesteps, the first T - 1, the others uniform in log-SNR up to timestep 0."""
        abar = self.alphas_cumprod.double().numpy()
        log_snr = np.log(abar) - np.log1p(-abar)  # increasing as t decreases
        lo = max(log_snr[-1], self.LOG_SNR_MIN)
        targets = np.linspace(lo, log_snr[0], n)
        t = np.interp(targets, log_snr[::-1], np.arange(len(abar))[::-1]).round().astype(int)
        t[0] = len(abar) - 1
        return sorted(set(t.tolist()), reverse=True)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T // 10:
            raise ConfigError(f"--steps {num_inference_steps}: DPM-Solver++ takes 1 to {T // 10} steps "
                              f"(it is made for few: 5-20)")
        ts = self.log_snr_timesteps(num_inference_steps)
        with warnings.catch_warnings():  # diffusers calls np.array on a torch tensor (numpy 2's copy= notice)
            warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
            self.solver.set_timesteps(timesteps=ts)  # also resets the solver's history: one volume batch
        self.num_inference_steps, self.timesteps = len(ts), self.solver.timesteps.to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, None]:
        a = self.alphas_cumprod[int(timestep)].to(sample.device)
        x0 = predicted_x0(model_output, sample, a, self.prediction_type).clamp(-1, 1)
        if self.prediction_type == "epsilon":  # the output that predicts the clipped x0
            model_output = (sample - a.sqrt() * x0) / (1 - a).sqrt()
        else:
            model_output = (a.sqrt() * sample - x0) / (1 - a).sqrt()
        extra = {"generator": generator} if self.stochastic else {}
        return self.solver.step(model_output, timestep, sample, **extra).prev_sample, None


SAMPLERS = ("ddpm", "ddim", *SolverScheduler.SOLVERS)


def sampling_scheduler(cfg: DiffusionConfig, sampler: str, steps: int):
    """The scheduler ``medsyn sample`` steps through, one network evaluation per step: ancestral DDPM
    or deterministic DDIM on ``steps`` trailing timesteps (``steps`` must divide the training
    timesteps), or diffusers' DPM-Solver++ (dpm++, sde-dpm++) on log-SNR-uniform ones."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if sampler in SolverScheduler.SOLVERS:
        sched = SolverScheduler(cfg, sampler)
    else:
        cls = StridedDDPMScheduler if sampler == "ddpm" else TrailingDDIMScheduler
        sched = cls(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                    prediction_type=cfg.prediction_type, **schedule_args(cfg))
    sched.set_timesteps(steps)
    return sched


def coordinate_grid(shape_zyx, start_zyx=(0, 0, 0), full_zyx=None) -> torch.Tensor:
    """(3, *shape) coordinates in [-1, 1] of each voxel's position in the whole volume of size
    ``full_zyx``, for the block starting at ``start_zyx`` (a patch, or the whole volume)."""
    full = full_zyx or shape_zyx
    axes = [(torch.arange(n, dtype=torch.float32) + s) / max(f - 1, 1) * 2 - 1
            for n, s, f in zip(shape_zyx, start_zyx, full)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def padding(shape_zyx, multiple: int) -> tuple[tuple[int, ...], list[int]]:
    """A whole volume's shape rounded up to the network's ``multiple`` (each level halves it), and
    the torch.nn.functional.pad amounts (x, y, z; at the end of each axis) that reach it."""
    padded = tuple(-(-n // multiple) * multiple for n in shape_zyx)
    return padded, [p for n, q in zip(reversed(shape_zyx), reversed(padded)) for p in (0, q - n)]


def mask_channel(codes, levels: tuple[float, ...] | None) -> torch.Tensor:
    """The network's mask channel (float) of nodule codes (integer array or tensor, 0 = no nodule):
    each code's level (``ModelConfig.mask_levels()``), or 0/1 where ``levels`` is None."""
    # a copy (np.array): the codes may be a read-only memory map, which torch warns about sharing
    codes = codes.long() if isinstance(codes, torch.Tensor) else torch.from_numpy(np.array(codes, dtype=np.int64))
    return torch.tensor(levels, dtype=torch.float32)[codes] if levels is not None else (codes > 0).float()


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
    """Exponential moving average of a model's weights, kept in float32 on the weights' device.

    ``master(param)`` returns the optimizer's float32 master copy of a parameter, or None (DeepSpeed's
    ``safe_get_full_fp32_param`` under bf16/fp16 and ZeRO; a collective call, so every rank updates
    its EMA). Averaging the bf16-cast module weights instead would lose every update smaller than
    bf16's resolution, which is what an EMA with decay 0.999 is made of.
    """

    def __init__(self, net: nn.Module, decay: float, master=None):
        self.decay, self.master = decay, master or (lambda p: None)
        self.shadow = {k: v.detach().float().clone() for k, v in self._weights(net)}

    def _weights(self, net: nn.Module):
        params = dict(net.named_parameters())
        for k, v in net.state_dict().items():
            m = self.master(params[k]) if k in params else None
            yield k, (m if m is not None else v)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        for k, v in self._weights(net):
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
