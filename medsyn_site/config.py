"""Typed configuration: YAML files validated into pydantic models; CLI flags override.

The shipped configs (tiny, lidc, gpu24 and the DeepSpeed JSON under deepspeed/) live inside the
package (medsyn_site/configs/), so a wheel or container install finds them; ``--config NAME`` picks
one by name, ``--config FILE`` reads a file of your own (which may start from a shipped one with
``base: tiny.yaml``).

Every stage reads its own section (``data``, later ``train``, ``sample``, ...). Unknown keys are
errors, so a typo in a config fails before any work starts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from medsyn_site.errors import MedsynError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: ships in the wheel
Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitConfig(Strict):
    """Patient-level split fractions; the remainder after train and val goes to test."""

    train: float = Field(0.6, ge=0, le=1)
    val: float = Field(0.2, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> "SplitConfig":
        if self.train + self.val > 1 + 1e-9:
            raise ValueError(f"split fractions train={self.train} + val={self.val} exceed 1")
        return self


class PhantomConfig(Strict):
    """The built-in procedural chest-CT phantom. shape and spacing are (x, y, z)."""

    cases: int = Field(8, ge=1)
    seed: int = 0
    shape: IntTriple = (96, 96, 64)
    spacing: Triple = (2.0, 2.0, 2.5)
    max_nodules: int = Field(4, ge=0, le=8)
    nodule_shapes: Literal["procedural", "lidc"] = "procedural"
    # procedural nodule diameters: log-normal around the median (spread 0.5 in log), clipped to
    # [min, 30] mm. LIDC-like by default; the utility benchmark and the demo make them larger so that
    # a CPU-sized volume draws them several voxels wide (configs/demo.yaml says why).
    nodule_median_mm: float = Field(7.0, gt=0)
    nodule_min_mm: float = Field(3.5, ge=3.0, le=30.0)
    noise_hu: float = Field(18.0, ge=0)
    # how often a nodule is solid, part-solid, ground-glass: LIDC-IDRI's mix by default; a training
    # cohort may hold more of a rare type (benchmarks/configs/realism_ggo.yaml)
    nodule_type_p: Triple = (0.65, 0.15, 0.20)

    @model_validator(mode="after")
    def _sizes(self) -> "PhantomConfig":
        if min(self.shape) < 16:
            raise ValueError(f"phantom shape {self.shape} is too small (each side >= 16 voxels)")
        if min(self.spacing) <= 0:
            raise ValueError(f"phantom spacing {self.spacing} must be positive")
        if min(self.nodule_type_p) < 0 or abs(sum(self.nodule_type_p) - 1) > 1e-6:
            raise ValueError(f"phantom nodule_type_p {self.nodule_type_p}: three shares (solid, part-solid, "
                             "ground-glass), none negative, that sum to 1")
        return self


class PrepareConfig(Strict):
    """Ingest of a site's real scans: target spacing (x, y, z mm; null keeps the scan's own)."""

    spacing: Triple | None = (1.0, 1.0, 1.5)
    crop_to_lungs: bool = False
    crop_margin_mm: float = Field(10.0, ge=0)
    lidc_min_agreement: float = Field(0.5, gt=0, le=1)
    min_nodule_mm: float = Field(3.0, ge=0)


class DataConfig(Strict):
    hu_range: tuple[int, int] = (-1024, 3071)
    split: SplitConfig = SplitConfig()
    phantom: PhantomConfig = PhantomConfig()
    prepare: PrepareConfig = PrepareConfig()


OLD_TYPE_LEVELS = (1 / 3, 2 / 3, 1.0)  # model.type_levels of weights and run dirs that do not record them


class ModelConfig(Strict):
    """MONAI DiffusionModelUNet (3-D). Input: noisy CT + mask + 3 coordinate channels."""

    in_channels: int = 5
    out_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, False)
    num_res_blocks: int = Field(1, ge=1)
    num_head_channels: int = 32
    norm_num_groups: int = 16
    mid_attention: bool = False  # MONAI always puts self-attention in the middle block; off = Identity
    flash_attention: bool = True
    # hidden width of the coordinate prior head (a per-voxel MLP of position and timestep added to
    # the UNet's output, see diffusion/model.py: CoordPriorHead); 0 = none
    coord_head: int = Field(0, ge=0)
    # the mask channel carries each nodule's type (cohort.json's records) as its level in type_levels,
    # so one model paints each type with its own contrast; off = 0/1 mask
    nodule_types: bool = True
    # the mask channel's value for a ground-glass, a part-solid and a solid nodule (unknown: solid's).
    # The small networks paint a type's density roughly in proportion to its level: trained at 1/3
    # (the default before; weights without recorded levels were trained at it) the phantom model painted
    # ground-glass 1.4x as dense as real, at 0.2 0.9x (benchmarks/RESULTS.md, "Closing the gap, part 11")
    type_levels: tuple[float, float, float] = (0.2, 2 / 3, 1.0)

    @classmethod
    def of_weights(cls, model: dict) -> "ModelConfig":
        """The config a weights file was trained with: files written before nodule types had 0/1 masks,
        files with types that record no levels were trained at the first default, 1/3 for ground-glass."""
        return cls(**({"nodule_types": False, "type_levels": OLD_TYPE_LEVELS} | model))

    def mask_levels(self) -> tuple[float, ...] | None:
        """The mask channel's value of each nodule code (imaging.NODULE_CODES: none, ground-glass,
        part-solid, solid, unknown), or None for a 0/1 mask (``nodule_types`` off)."""
        ggo, part, solid = self.type_levels
        return (0.0, ggo, part, solid, solid) if self.nodule_types else None

    @model_validator(mode="after")
    def _shape(self) -> "ModelConfig":
        if self.in_channels != 5:
            raise ValueError(f"model.in_channels is {self.in_channels}; the network takes 5 channels "
                             "(noisy CT, mask, and x/y/z coordinates)")
        if self.out_channels != 1:
            raise ValueError(f"model.out_channels is {self.out_channels}; the network predicts 1 channel")
        if not all(0 < v <= 1 for v in self.type_levels):
            raise ValueError(f"model.type_levels is {list(self.type_levels)}; each level must be in (0, 1] "
                             "(0 is the mask channel's value outside nodules)")
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(f"model.attention_levels has {len(self.attention_levels)} entries; "
                             f"model.channels has {len(self.channels)} levels")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"model.channels {bad} are not multiples of norm_num_groups={self.norm_num_groups}")
        return self

    @property
    def multiple(self) -> int:
        """Spatial sizes must be divisible by this (2 ** downsamplings)."""
        return 2 ** (len(self.channels) - 1)


class DiffusionConfig(Strict):
    """The noise process (MONAI schedulers) and the loss."""

    num_train_timesteps: int = Field(1000, ge=2)
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = "linear_beta"
    # the cosine schedule's offset s (Nichol & Dhariwal 2021; MONAI's default 0.008). It sets the
    # smallest noise, that of timestep 0: sigma_min ~ (pi / 2) sqrt((1 / T) (1 / T + 2 s)) of the HU
    # window's half-width, 6.6 HU at 0.008 and 2.3 HU at 0.0005 with T = 1000 and a 2048-HU window. The
    # last denoising step removes detail below it (the scanner noise's finest band is ~5-6 HU on the
    # phantom), so CT wants it small (benchmarks/RESULTS.md, "Closing the gap, part 7").
    cosine_s: float = Field(0.008, gt=0, le=0.1)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    loss: Literal["l1", "l2"] = "l2"
    # "min_snr": each sample's loss weighted as Min-SNR-gamma (Hang et al. 2023) does, the x0 error
    # weighted by min(SNR, gamma): less weight on the nearly clean timesteps, whose gradients dominate
    # a v or epsilon loss, and more on the middle ones, where the lung texture is denoised worst
    # (benchmarks/RESULTS.md, "Realism")
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = Field(5.0, gt=0)
    hu_window: tuple[float, float] = (-1024.0, 2048.0)  # mapped linearly to [-1, 1], clipped

    TRAINING_ONLY: ClassVar[set[str]] = {"loss", "loss_weighting", "min_snr_gamma"}  # not the noise process

    def noise_process(self) -> dict:
        """What weights depend on: the schedule, the prediction target, the HU window (not the loss)."""
        return self.model_dump(mode="json", exclude=self.TRAINING_ONLY)


class TrainConfig(Strict):
    """The site trainer. patch_size is (x, y, z) voxels."""

    patch_size: IntTriple = (32, 32, 32)
    batch_size: int = Field(2, ge=1)
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    # after the warm-up: constant, or cosine-annealed from lr to 0 at train.steps (a fine-tune's end)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    ema_decay: float = Field(0.999, ge=0, lt=1)
    pos_fraction: float = Field(0.5, ge=0, le=1)  # share of patches centred on a nodule voxel
    # where those centres fall: "voxel" a nodule voxel uniformly (big, common solid nodules dominate);
    # "type" a nodule type uniformly, a case with it, one of its voxels (rare ground-glass as often as solid)
    pos_sampling: Literal["voxel", "type"] = "voxel"
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # DeepSpeed JSON (a path, or relative to the shipped configs: deepspeed/cpu.json): ZeRO, clipping, and the activation
    # checkpointing knobs (cpu_checkpointing = offload, used on accelerators only).
    deepspeed_config: str = "deepspeed/cpu.json"
    activation_checkpointing: bool = True
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    preview_every: int = Field(100, ge=1)
    threads: int = Field(0, ge=0)  # torch CPU threads (0: torch's default)
    # Host memory for training volumes kept in memory (GiB, per process); the rest are read per
    # patch from memory-mapped uncompressed copies in the run dir's cache/ (page cache, shared).
    cache_gb: float = Field(8.0, ge=0)
    deterministic: bool = False
    # start a new run from these weights (an EMA weights file, a run dir, or builtin:NAME for a
    # checkpoint shipped in medsyn_site/pretrained/); the model config must match
    init_weights: str | None = None

    @model_validator(mode="after")
    def _patch(self) -> "TrainConfig":
        if min(self.patch_size) < 8:
            raise ValueError(f"train.patch_size {self.patch_size} is too small (each side >= 8)")
        return self


class SampleConfig(Strict):
    """Whole-volume sampling as the demo runs it (``medsyn sample`` takes the same as flags)."""

    # DPM-Solver++ (deterministic) with 10 network evaluations on windows: on the phantom the closest to
    # the real scans of the samplers tried (lung HU distance 6.7 HU against SDE-DPM++'s 17.2, the
    # real scans' diversity; benchmarks/RESULTS.md, "Closing the gap, part 6"); 5x faster than DDPM-50
    sampler: Literal["ddpm", "ddim", "dpm++", "sde-dpm++"] = "dpm++"
    steps: int = Field(10, ge=1)
    # "patch": the network is evaluated on windows of the patch it was trained on (MONAI's sliding
    # windows, Gaussian-blended where they overlap), so its GroupNorm statistics cover what they
    # covered in training; "whole": the whole volume in one evaluation (benchmarks/RESULTS.md,
    # "Closing the gap, part 5": on the phantom a CNN told the samples from real 59 % of the time, not 74 %)
    window: Literal["patch", "whole"] = "patch"
    window_overlap: float = Field(0.25, ge=0, lt=1)
    per_mask: int = Field(1, ge=1)
    max_volumes: int = Field(500, ge=1)  # the most volumes a request (central -> site) may ask for; more is refused


SAMPLE = SampleConfig()  # the sampling defaults of the library and the CLI: one place


class AuditConfig(Strict):
    """The memorization audit's settings (medsyn_site.publish.audit; all recorded in the privacy report)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    fine_mm: float = Field(2.5, gt=0)  # feature grid of the fine search (vessels and airways resolved)
    coarse_mm: float = Field(5.0, gt=0)  # feature grid of the retrieval search over all training scans
    candidates: int = Field(3, ge=0)  # training scans per synthetic volume that get the fine search
    retrieval_keep: int = Field(16, ge=1)  # a larger bank is first ranked at 2 x coarse_mm; this many kept
    patch_mm: float = Field(25.0, gt=0)  # side of the local patches
    patch_radius_mm: float = Field(30.0, ge=0)  # a patch is sought this far around where the whole-lung match puts it
    patch_min_lung: float = Field(0.5, gt=0, le=1)  # a patch counts when at least this fraction of it is lung
    rotations_deg: float = Field(6.0, ge=0)  # +- this angle about each axis
    scales: tuple[float, ...] = (0.92, 1.08)
    false_alarm: float = Field(0.01, gt=0, lt=1)  # per real unseen scan
    margin: float = Field(0.05, ge=0)  # added to the fitted quantile
    hu_clip: tuple[float, float] = (-1024.0, 400.0)


class RealismConfig(Strict):
    """The realism section of a release's card (medsyn_site/realism.py): the released volumes against
    the training cohort's train scans, beside its val scans against the same (the real-vs-real baseline)."""

    enabled: bool = True
    cnn_steps: int = Field(600, ge=10)  # the CNN two-sample test's training steps per fold
    max_volumes: int = Field(8, ge=2)  # per set (a random subset of larger ones: memory and time)


class PublishConfig(Strict):
    """What ``medsyn publish`` releases and how it gates (its flags override these)."""

    format: Literal["nifti", "dicom", "both"] = "both"
    licence: str = "CC-BY-4.0"
    min_contrast: float | None = None  # HU: refuse cases whose faintest nodule is fainter
    min_dice: float | None = Field(None, ge=0, le=1)  # refuse below this segmenter Dice (needs a segmenter)
    workers: int | None = Field(None, ge=1)  # audit processes (None: one per core)
    audit: AuditConfig = AuditConfig()
    realism: RealismConfig = RealismConfig()


class EvaluateConfig(Strict):
    """The nnU-Net utility test as the demo runs it (``medsyn evaluate`` takes the same as flags)."""

    seeds: int = Field(5, ge=1)
    configuration: str = "3d_fullres"
    trainer: str = "nnUNetTrainer_medsyn"
    epochs: int = Field(2, ge=1)
    iterations: int = Field(5, ge=1)
    batch_size: int | None = Field(None, ge=1)  # None: the plans' (nnUNetTrainer_medsyn only)
    device: Literal["cpu", "cuda"] = "cpu"
    mirroring: bool = True  # nnU-Net's test-time mirroring when predicting (its default)
    jobs: int = Field(1, ge=1)  # trainings at once (processes; on a CPU they split its cores)


class Config(Strict):
    """The whole resolved configuration of a run; saved beside every stage's outputs."""

    name: str = "default"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    publish: PublishConfig = PublishConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _patch_fits_model(self) -> "Config":
        m = self.model.multiple
        if any(p % m for p in self.train.patch_size):
            raise ValueError(f"train.patch_size {self.train.patch_size} must be divisible by {m} "
                             f"(2 ** (levels - 1) for model.channels {self.model.channels})")
        return self


class ConfigError(MedsynError):
    """A config file or override is invalid; the message names the file and the field."""


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity: a Slurm allocation, taskset), the default
    for ``threads``/``jobs``/``workers`` settings."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[leaf] = value


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def shipped_configs() -> list[str]:
    """Names of the configs that ship inside the package (``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name: str | Path) -> Path:
    """A config file: an existing path, else a shipped config by name (``tiny``, ``tiny.yaml`` or
    ``configs/tiny.yaml``, the repository's old location)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix else f"{path.name}.yaml"
    if path.parent in (Path("."), Path("configs")) and (CONFIG_DIR / stem).is_file():
        return CONFIG_DIR / stem
    raise ConfigError(f"{name}: config file not found (a path, or a shipped config: "
                      f"{', '.join(shipped_configs())})")


def _read_tree(path: Path, seen: tuple = ()) -> dict:
    """A YAML file as a dict; ``base: other.yaml`` (relative to the file, else a shipped config) is
    loaded underneath."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = tree.pop("base", None)
    if not base:
        return tree
    beside = path.parent / base
    return _merge(_read_tree(beside if beside.is_file() else resolve_config(base), seen + (path.resolve(),)), tree)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (a path or a shipped name; default: tiny), apply dotted overrides, validate."""
    path = resolve_config(path or "tiny")
    tree = _read_tree(path)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: {problems}") from e


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what a run saves beside its outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
