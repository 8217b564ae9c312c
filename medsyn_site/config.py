"""Typed configuration: YAML files under configs/ validated into pydantic models; CLI flags override.

Every stage reads its own section (``data``, later ``train``, ``sample``, ...). Unknown keys are
errors, so a typo in a config fails before any work starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
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
    noise_hu: float = Field(18.0, ge=0)

    @model_validator(mode="after")
    def _sizes(self) -> "PhantomConfig":
        if min(self.shape) < 16:
            raise ValueError(f"phantom shape {self.shape} is too small (each side >= 16 voxels)")
        if min(self.spacing) <= 0:
            raise ValueError(f"phantom spacing {self.spacing} must be positive")
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


class Config(Strict):
    """The whole resolved configuration of a run; saved beside every stage's outputs."""

    name: str = "default"
    data: DataConfig = DataConfig()


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the field."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (default: configs/tiny.yaml), apply dotted overrides, validate."""
    path = Path(path) if path else CONFIG_DIR / "tiny.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
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
