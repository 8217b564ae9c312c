"""``medsyn sample``: whole-volume synthesis. The whole volume is denoised together, from the whole
mask and the whole coordinate grid (padded to the UNet's multiple, cropped back), through MONAI's
schedulers and DiffusionInferer, with EMA weights; each network evaluation runs on windows of the
training patch (``WindowedUNet``) or on the whole volume at once. Resumable, deterministic for a seed."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import DiffusionInferer, sliding_window_inference
from tqdm import tqdm

from medsyn_site import provenance
from medsyn_site.config import SAMPLE, ConfigError, DiffusionConfig, ModelConfig
from medsyn_site.data.cohort import ResumableCohortWriter
from medsyn_site.diffusion.masks import mask_jobs
from medsyn_site.diffusion.model import (build_unet, coordinate_grid, mask_channel, padding, sampling_scheduler,
                                         unit_to_hu)
from medsyn_site.diffusion.rundir import RunDir, load_weights, scale_mismatch
from medsyn_site.diffusion.shards import shard_jobs
from medsyn_site.diffusion.streamed import StreamedUNet
from medsyn_site.imaging import NODULE_CODES
from medsyn_site.sitekey import DEFAULT_SITE_KEY, load_site_key, pseudonym

log = logging.getLogger(__name__)


def resolve_weights(run_or_file: str | Path) -> Path:
    """A run dir (its latest EMA weights) or a weights file."""
    path = Path(run_or_file)
    return RunDir(path).latest_weights() if path.is_dir() else path


class WindowedUNet(torch.nn.Module):
    """``WindowedUNet(net, window)(x, timesteps)``: the network evaluated on windows of ``window``
    voxels (z, y, x) that tile the volume with ``overlap``, blended with Gaussian weights (MONAI's
    sliding_window_inference), instead of on the whole volume at once.

    Why: GroupNorm normalizes each feature map by statistics over what the network is given, a
    training patch in training. Over a whole volume (more air, both lungs) they differ, and so do the
    network's estimates at middle noise, where the layout of lung and vessels is decided: on the
    phantom, evaluating the same weights on patch-sized windows lowered the held-out denoising error
    in the lungs by 10-16 % at t = 250-700 and a CNN's accuracy at telling the samples from real
    scans from 0.74 to 0.59 (benchmarks/RESULTS.md, "Closing the gap, part 5"). Each window carries its part of the whole
    mask and the whole-volume coordinate grid (input channels), so it knows where it sits; the
    denoising itself stays whole-volume (one noise, one chain). Cost: up to (1 / (1 - overlap))^3 the
    voxel evaluations of one whole-volume pass (3x on the phantom, ~2.4x at 512x512x256 with 128^3
    windows), in the memory of ``batch`` windows."""

    def __init__(self, net: torch.nn.Module, window: tuple[int, int, int], overlap: float = SAMPLE.window_overlap,
                 batch: int | None = None):
        super().__init__()
        self.net, self.window, self.overlap = net, tuple(window), overlap
        # windows per network call: up to 128^3 voxels together (18 of the phantom's 32^3; one of 128^3,
        # whose evaluation needs about what a whole 256x256x128 volume needs)
        self.batch = batch or max(1, 2 ** 21 // int(np.prod(window)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None) -> torch.Tensor:
        # a window no larger than the volume (sliding_window_inference would pad it with zeros, which
        # no training patch held); a window as large as the volume is one whole-volume evaluation
        window = tuple(min(w, n) for w, n in zip(self.window, x.shape[2:]))
        return sliding_window_inference(x, window, self.batch,
                                        lambda w: self.net(w, timesteps=timesteps.expand(len(w)) if timesteps.numel() == 1
                                                           else timesteps),
                                        overlap=self.overlap, mode="gaussian")


class Sampler:
    """EMA network + scheduler; ``volumes(masks, seeds)`` generates one CT per mask."""

    def __init__(self, weights: str | Path, sampler: str = SAMPLE.sampler, steps: int = SAMPLE.steps, device: str = "auto",
                 precision: str = "fp32", stream_gb: float | None = None, window: str = SAMPLE.window,
                 overlap: float = SAMPLE.window_overlap):
        blob = load_weights(weights)
        self.sha256, self.model_cfg = blob["sha256"], ModelConfig.of_weights(blob["model"])
        self.diffusion = DiffusionConfig(**blob["diffusion"])
        self.federation = blob.get("federation")  # the federation run and round, for weights trained by `medsyn fl`
        self.weights, self.scale, self.warned = Path(weights), blob.get("scale"), set()  # the training cohort's
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        self.net = build_unet(self.model_cfg)
        self.net.load_state_dict(blob["ema"])
        self.net.to(self.device).eval()
        self.scheduler = sampling_scheduler(self.diffusion, sampler, steps)  # refuses a bad step count
        self.inferer = DiffusionInferer(self.scheduler)
        self.sampler, self.steps, self.precision, self.streamed = sampler, steps, precision, stream_gb is not None
        # Streamed evaluation (same function, z-slabs; feature maps beyond stream_gb go to host memory)
        # for volumes whose whole-volume evaluation does not fit the device.
        self.model = self.net if stream_gb is None else StreamedUNet(self.net, budget_bytes=stream_gb * 2 ** 30)
        # Windows of the training patch (weights record it; x y z) or the whole volume at once.
        if window not in ("patch", "whole"):
            raise ConfigError(f"window {window!r}: use patch or whole")
        self.window = tuple(blob["patch_size"][::-1]) if window == "patch" and blob.get("patch_size") else None
        if window == "patch" and self.window is None:
            log.warning("%s records no training patch (written before medsyn-site recorded it): sampling "
                        "evaluates the whole volume at once", weights)
        if self.window:
            self.model = WindowedUNet(self.model, self.window, overlap)

    def check_scale(self, mask: sitk.Image) -> None:
        """A warning (once per geometry) for masks not at the scale the weights were trained at."""
        geometry = (tuple(np.round(mask.GetSpacing(), 3)), mask.GetSize())
        problem = geometry not in self.warned and scale_mismatch(self.scale, *geometry)
        if problem:
            self.warned.add(geometry)
            log.warning("masks of %s voxels: %s that %s was trained on; the network draws anatomy at the scale "
                        "it learnt, so these samples may lack lungs or organs: resample the masks to the "
                        "training scans' spacing and field of view (`medsyn data prepare`, prepare.spacing)",
                        " x ".join(map(str, mask.GetSize())), problem, self.weights)

    @torch.no_grad()
    def volumes(self, masks: list[sitk.Image], seeds: list[int], codes: list[np.ndarray] | None = None
                ) -> list[sitk.Image]:
        """Synthetic CTs (HU, float) for masks of one shape, denoised together as a batch; each
        keeps its mask's geometry. ``codes``: the nodules' types per voxel (masks.Conditioning; without
        them every nodule is of unknown type). The starting noise is per volume (its seed); the DDPM
        step noise follows the batch's first seed, so a batch is reproducible as a unit."""
        for mask in masks:  # one shape, but each its own voxel size
            self.check_scale(mask)
        arrays = codes or [np.where(sitk.GetArrayFromImage(m) > 0, NODULE_CODES["unknown"], 0) for m in masks]
        shape = arrays[0].shape
        if any(a.shape != shape for a in arrays) or any(a.shape != m.GetSize()[::-1] for a, m in zip(arrays, masks)):
            raise ValueError("a sampling batch needs masks (and nodule codes) of one shape")
        padded, pad = padding(shape, self.model_cfg.multiple)
        m = torch.nn.functional.pad(mask_channel(np.stack(arrays), self.model_cfg.mask_levels())[:, None], pad)
        coords = coordinate_grid(padded, (0, 0, 0), shape)[None].expand(len(arrays), -1, -1, -1, -1)
        cond = torch.cat([m, coords], 1).to(self.device)  # whole mask + whole grid, extended into the pad
        noise = torch.cat([torch.randn((1, 1, *padded), generator=torch.Generator().manual_seed(s)) for s in seeds])
        torch.manual_seed(seeds[0])  # the schedulers' per-step noise
        self.scheduler.set_timesteps(self.steps)  # a multistep solver starts each batch without history
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        try:
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                x = self.inferer.sample(input_noise=noise.to(self.device), diffusion_model=self.model,
                                        scheduler=self.scheduler, conditioning=cond, mode="concat",
                                        verbose=self.streamed)  # streamed = large: step progress
        except torch.OutOfMemoryError as e:  # finished cases are kept; a rerun resumes
            e.add_note(f"{len(masks)} whole volume(s) of {padded[::-1]} voxels (x y z) do not fit the "
                       f"{self.device} memory: sample with --stream-gb (e.g. 14 on a 24 GB GPU)"
                       + (" and --batch-size 1" if len(masks) > 1 else "") + "; finished cases are kept")
            raise
        out = []
        for i, mask in enumerate(masks):
            hu = unit_to_hu(x[i, 0, : shape[0], : shape[1], : shape[2]].float().cpu(), self.diffusion.hu_window)
            img = sitk.GetImageFromArray(hu.numpy())
            img.CopyInformation(mask)
            out.append(img)
        return out


def case_seed(seed: int, source_id: str, replicate: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{source_id}|{replicate}".encode()).digest()[:4], "little")


def sample_cohort(run: str | Path, masks: str, out: str | Path, per_mask: int = 1, sampler: str = SAMPLE.sampler,
                  steps: int = SAMPLE.steps, seed: int = 0, device: str = "auto", precision: str = "fp32",
                  force: bool = False, site_key: Path = DEFAULT_SITE_KEY, batch_size: int = 1,
                  stream_gb: float | None = None, shard: tuple[int, int] | None = None,
                  request_cohort: str | Path | None = None, max_volumes: int = SAMPLE.max_volumes,
                  window: str = SAMPLE.window, window_overlap: float = SAMPLE.window_overlap) -> Path:
    """Sample a synthetic cohort (source=synthetic) and its signed provenance.json. ``shard=(i, n)``:
    only every n-th volume from the i-th (a Slurm array task); ``merge_shards`` joins the n parts.
    ``request_cohort``: the cohort holding a request's cases (``masks="request:FILE"``), which may ask
    for at most ``max_volumes``."""
    ResumableCohortWriter.would_replace(Path(out), force)  # before long work
    key = load_site_key(site_key)  # an existing key only: provenance signed with a new key is useless
    weights = resolve_weights(run)
    jobs = shard_jobs(mask_jobs(masks, per_mask, request_cohort, max_volumes), shard)  # fails early: bad mask source
    gen = Sampler(weights, sampler, steps, device, precision, stream_gb, window, window_overlap)
    header = {"checkpoint_sha256": gen.sha256, "sampler": sampler, "steps": steps, "seed": seed,
              "window": list(gen.window[::-1]) if gen.window else "whole", "window_overlap": window_overlap,
              "mask_source": masks.partition(":")[0] if ":" in masks else "cohort",
              "training_cohort": provenance.training_cohort_of(Path(weights)),
              "model": gen.model_cfg.model_dump(mode="json"), "diffusion": gen.diffusion.model_dump(mode="json")}
    if gen.federation:
        header["federation"] = gen.federation
    settings = {k: header[k] for k in ("checkpoint_sha256", "sampler", "steps", "seed", "window")} | {"masks": masks,
                                                                                       "per_mask": per_mask}
    settings["batch_size"] = batch_size
    if shard:
        settings["shard"] = list(shard)
    ids = [f"syn-{hashlib.sha256(f'{gen.sha256}|{j.source_id}|{j.replicate}|{seed}|{masks}'.encode()).hexdigest()[:16]}"
           for j in jobs]
    seeds = [case_seed(seed, j.source_id, j.replicate) for j in jobs]
    with ResumableCohortWriter(out, settings, force=force, description=f"synthetic, {sampler} {steps} steps",
                               shard=shard) as w:
        bar = tqdm(total=len(jobs), desc=f"sample ({sampler} {steps})", unit="volume")
        for start in range(0, len(jobs), batch_size):  # fixed chunks: a resumed run batches alike
            chunk = list(range(start, min(start + batch_size, len(jobs))))
            todo = [i for i in chunk if not w.done(ids[i])]
            if todo:
                cond = {i: jobs[i].conditioning(seed) for i in chunk}
                by_shape: dict[tuple, list[int]] = {}
                for i in chunk:
                    by_shape.setdefault(cond[i].mask.GetSize(), []).append(i)
                for group in by_shape.values():
                    if any(i in todo for i in group):
                        imgs = gen.volumes([cond[i].mask for i in group], [seeds[i] for i in group],
                                           [cond[i].codes for i in group])
                        for i, img in zip(group, imgs):
                            if not w.done(ids[i]):
                                w.add(ids[i], patient=ids[i], split="train", source="synthetic", image=img,
                                      mask=cond[i].mask, nodules=cond[i].nodules)
            bar.update(len(chunk))
        bar.close()
        # provenance.json before cohort.json: a run killed in between is still resumable (it just rewrites both)
        records = {r.id: r for r in w.records}
        entries = [{"case": ids[i], "image_sha256": records[ids[i]].sha256["image"],
                    "mask_sha256": records[ids[i]].sha256["mask"], "seed": seeds[i],
                    "mask_source_id": pseudonym(key, j.source_id, "src"), "mask_mode": j.mode}
                   for i, j in enumerate(jobs)]
        provenance.write(Path(out), header, entries, key)
    return Path(out)
