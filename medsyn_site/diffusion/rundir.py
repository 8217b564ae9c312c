"""The run dir contract: resolved config, checkpoints (DeepSpeed engine state + EMA weights + step +
RNG), metrics. A checkpoint is written into a temp folder with a SHA256SUMS of its files, renamed
into place, then ``latest`` is replaced atomically, so a crash mid-write never touches the previous
checkpoint; a checkpoint damaged later (a truncated copy, a bad disk) fails its checksums, and
resuming or sampling falls back to the newest intact one with a warning."""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from medsyn_site.atomic import atomic_write_text, clean_stale, owner_tag, refuse_existing, sha256_file
from medsyn_site.config import OLD_TYPE_LEVELS, Config, dump_config
from medsyn_site.diffusion.engine import on_every_rank, on_rank0, rank_world
from medsyn_site.errors import MedsynError, check_free, write_failure

EMA_FILE = "ema.pt"
SUMS = "SHA256SUMS"
log = logging.getLogger(__name__)


class RunError(MedsynError):
    """A run dir cannot be used as asked (resume without checkpoint, config mismatch, ...)."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _differences(a: dict, b: dict, prefix="") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return out


def write_sums(folder: Path) -> None:
    """SHA256SUMS (``sha256sum -c`` format) of every file under ``folder``."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != SUMS)
    atomic_write_text(folder / SUMS, "".join(f"{sha256_file(f)}  {f.relative_to(folder)}\n" for f in files))


def checkpoint_problem(folder: Path, only: str | None = None) -> str | None:
    """Why a checkpoint folder (or only its file ``only``) cannot be trusted, naming the file; None
    if it can. A checkpoint written before checksums existed (no SHA256SUMS) is trusted as it is."""
    sums = folder / SUMS
    if not folder.is_dir():
        return f"{folder}: missing"
    if not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if only is not None and name != only:
            continue
        f = folder / name
        if not f.is_file():
            return f"{f}: missing from the checkpoint"
        if sha256_file(f) != digest:
            return f"{f}: checksum differs from {SUMS} (truncated or damaged)"
    return None


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu")
    except FileNotFoundError:
        raise RunError(f"{path}: weights file not found") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise RunError(f"{path}: unreadable checkpoint file ({' '.join(str(e).split())[:200]})") from e


# settings added to the config since runs began, with the value an older run dir trained with
ADDED_SETTINGS = {("model", "nodule_types"): False, ("model", "type_levels"): list(OLD_TYPE_LEVELS),
                  ("train", "pos_sampling"): "voxel",
                  ("diffusion", "loss_weighting"): "none", ("diffusion", "min_snr_gamma"): 5.0}


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.ckpt = self.root / "checkpoints"
        self.resume_tag: str | None = None

    # -- setup -------------------------------------------------------------------------------
    def check_new(self, force: bool) -> None:
        """Would ``create`` refuse? (Checked before long work.) A run dir that never wrote a
        checkpoint (a first run that failed) holds nothing to keep and is reused without --force."""
        if not (self.root.is_dir() and (self.root / "config.yaml").is_file() and not self.tags()):
            refuse_existing(self.root, force)

    def create(self, cfg: Config, force: bool) -> None:
        """A new run: refuse an existing run dir unless --force (then old checkpoints go)."""
        self.check_new(force)
        if self.ckpt.exists():
            shutil.rmtree(self.ckpt)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "config.yaml", dump_config(cfg))

    def check_resume(self, cfg: Config) -> None:
        """Resuming needs a run dir (a run stopped before its first checkpoint restarts at step 0)
        and the same config (train.steps may grow)."""
        if not (self.root / "config.yaml").is_file():
            raise RunError(f"{self.ckpt}: no checkpoint to resume from")
        # fails (naming the file) before anything is written
        self.resume_tag = self.intact_tag() if self.tags() else None
        saved = yaml.safe_load((self.root / "config.yaml").read_text())
        now = cfg.model_dump(mode="json")
        saved["train"]["steps"] = now["train"]["steps"]
        for (section, key), value in ADDED_SETTINGS.items():  # a run begun before a setting existed
            saved.setdefault(section, {}).setdefault(key, value)
        diff = _differences(saved, now)
        if diff:
            raise RunError(f"{self.root / 'config.yaml'}: --resume with a different config: " + "; ".join(diff))
        for folder in (self.root, self.ckpt, self.root / "previews"):  # leftovers of a killed run
            clean_stale(folder)
        atomic_write_text(self.root / "config.yaml", dump_config(cfg))

    # -- checkpoints -------------------------------------------------------------------------
    def latest(self) -> str | None:
        f = self.ckpt / "latest"
        return f.read_text().strip() if f.is_file() else None

    def tags(self) -> list[str]:
        """Checkpoint tags, newest first."""
        if not self.ckpt.is_dir():
            return []
        # step_N: `medsyn train`; round_N: a federation's global run dir (never both in one run dir)
        return sorted((p.name for p in self.ckpt.iterdir() if re.fullmatch(r"(step|round)_\d+", p.name) and p.is_dir()),
                      reverse=True)

    def intact_tag(self, only: str | None = None) -> str:
        """The newest checkpoint whose files (or file ``only``) match their checksums; warns about
        newer damaged ones."""
        problems = []
        for tag in self.tags():
            problem = checkpoint_problem(self.ckpt / tag, only)
            if problem is None:
                if problems:
                    log.warning("%s; using the newest intact checkpoint, %s", "; ".join(problems), tag)
                return tag
            problems.append(problem)
        if problems:
            raise RunError("; ".join(problems) + "; no intact checkpoint is left")
        raise RunError(f"{self.ckpt}: no checkpoint")

    def latest_weights(self) -> Path:
        """The EMA weights file of the newest intact checkpoint (what sampling uses)."""
        return self.ckpt / self.intact_tag(only=EMA_FILE) / EMA_FILE

    def _estimate_bytes(self, fallback: int) -> int:
        """A checkpoint's size: the last one's (+10 %), else ``fallback``."""
        for tag in self.tags():
            return int(sum(f.stat().st_size for f in (self.ckpt / tag).rglob("*") if f.is_file()) * 1.1)
        return fallback

    def _begin(self, tag: str, fallback_bytes: int) -> Path:
        """The temp folder of checkpoint ``tag`` (its files go in ``tmp / tag``), after checking the
        free space. Named by its owner: a later run cleans it if this process died."""
        self.ckpt.mkdir(parents=True, exist_ok=True)
        check_free(self.ckpt, self._estimate_bytes(fallback_bytes), f"checkpoint {tag}")
        tmp = self.ckpt / f".tmp-{owner_tag()}-{tag}"
        shutil.rmtree(tmp, ignore_errors=True)
        return tmp

    def _commit(self, tmp: Path, tag: str) -> None:
        """SHA256SUMS of the checkpoint's files, then rename it into place."""
        write_sums(tmp / tag)
        final = self.ckpt / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp / tag, final)

    @staticmethod
    def _write(what: Path, fn, *args) -> None:
        try:
            fn(*args)
        except (OSError, RuntimeError) as e:  # a full disk: name the checkpoint
            err = write_failure(what, e)
            if err is e:
                raise
            raise err from e

    def save(self, engine, ema, step: int, cfg: Config, keep: int, scale: dict | None = None) -> Path:
        """Collective (every rank calls it): rank 0 checks the free space and names one temp folder;
        every rank writes its part through DeepSpeed's save_checkpoint (its own ZeRO shard file);
        rank 0 adds the EMA and SHA256SUMS, renames it into place, moves ``latest``, prunes old ones.
        An error on any rank is raised on every rank. ``scale``: the training cohort's (``training_scale``)."""
        tag = f"step_{step:08d}"
        final = self.ckpt / tag
        n = sum(p.numel() for p in engine.module.parameters())

        def finish() -> None:
            torch.save(ema_blob(ema.state_dict(), step, cfg, scale=scale), tmp / tag / EMA_FILE)
            self._commit(tmp, tag)

        tmp = on_rank0(self._begin, tag, 4 * n * 4 + 2 ** 20)  # fp32 weights + Adam moments + EMA, + margin
        try:
            on_every_rank(self._write, final, engine.save_checkpoint, str(tmp), tag,
                          {"step": step, "rng": rng_state()}, False)
            on_rank0(self._write, final, finish)
        finally:
            if rank_world()[0] == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        on_rank0(self._point_latest, tag, keep)  # every rank returns after the checkpoint is complete
        return final

    def write_checkpoint(self, tag: str, files: dict[str, object], keep: int) -> Path:
        """A checkpoint written by one process (the federation's global run): each object saved with
        torch.save under its file name, then, as ``save``: SHA256SUMS, rename, ``latest``, prune."""
        final = self.ckpt / tag
        fallback = sum(v.numel() * v.element_size() for obj in files.values() if isinstance(obj, dict)
                       for v in obj.values() if torch.is_tensor(v)) * 2 + 2 ** 20
        tmp = self._begin(tag, fallback)
        try:
            (tmp / tag).mkdir(parents=True)

            def write_all() -> None:
                for name, obj in files.items():
                    torch.save(obj, tmp / tag / name)
                self._commit(tmp, tag)

            self._write(final, write_all)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._point_latest(tag, keep)
        return final

    def _point_latest(self, tag: str, keep: int) -> None:
        atomic_write_text(self.ckpt / "latest", tag)
        older = [t for t in self.tags() if t < tag]
        # Newer tags than this one are left from a line of steps that was damaged and resumed before.
        stale = [t for t in self.tags() if t > tag] + older[max(0, keep - 1):]
        for t in stale:
            shutil.rmtree(self.ckpt / t, ignore_errors=True)

    def load(self, engine, ema) -> int:
        """Restore the newest intact checkpoint; returns its step (0: none yet, the run starts over).
        Collective: rank 0 picks the checkpoint (checksums) and points ``latest`` at it; every rank
        loads it through DeepSpeed's load_checkpoint (its own ZeRO shard) and the EMA."""
        def pick() -> str | None:
            tag = self.resume_tag or (self.intact_tag() if self.tags() else None)
            if tag is not None and self.latest() != tag:  # killed before `latest` moved, or the newest is damaged
                atomic_write_text(self.ckpt / "latest", tag)
            return tag

        def restore(tag: str) -> int:
            try:
                path, client = engine.load_checkpoint(str(self.ckpt), tag=tag)
            except Exception as e:  # a damaged checkpoint without checksums (written by an older version)
                raise RunError(f"{self.ckpt / tag}: checkpoint could not be loaded "
                               f"({' '.join(str(e).split())[:200]})") from e
            if path is None:
                raise RunError(f"{self.ckpt / tag}: checkpoint could not be loaded")
            ema.load_state_dict(_torch_load(self.ckpt / tag / EMA_FILE)["ema"])
            set_rng_state(client["rng"])
            return int(client["step"])

        tag = on_rank0(pick)
        return 0 if tag is None else on_every_rank(restore, tag)


def ema_blob(ema_state: dict, step: int, cfg: Config, **extra) -> dict:
    """An EMA weights file's content (one format for ``medsyn train`` and ``medsyn fl``): the weights,
    the step, and what sampling needs: the network, the noise process and the training patch (x y z;
    sampling evaluates the network on windows of it, sample.WindowedUNet); ``medsyn train`` adds the
    training cohort's ``scale`` (``training_scale``)."""
    return {"ema": ema_state, "step": step, "model": cfg.model.model_dump(mode="json"),
            "diffusion": cfg.diffusion.model_dump(mode="json"), "patch_size": list(cfg.train.patch_size)} | extra


def load_weights(path: str | Path) -> dict:
    """An EMA weights file with its sha256 (the provenance of everything sampled from it); inside a
    checkpoint its checksums are checked first."""
    path = Path(path)
    if (path.parent / SUMS).is_file():
        problem = checkpoint_problem(path.parent, only=path.name)
        if problem:
            raise RunError(problem)
    blob = _torch_load(path)
    if not isinstance(blob, dict) or "ema" not in blob:
        raise RunError(f"{path}: not an EMA weights file written by `medsyn train`")
    blob["sha256"] = sha256_file(path)
    return blob


SCALE_TOLERANCE = 1.25  # a mask this much finer or coarser than every training scan (or its field larger or smaller)


def training_scale(records) -> dict:
    """The voxel size and field of view (x y z mm, least and most over the cohort records
    ``records``) a model is trained at, recorded in its weights (``scale``)."""
    voxel = np.array([r.spacing for r in records], float)
    field = np.array([np.multiply(r.shape, r.spacing) for r in records], float)
    return {"voxel_mm": {"min": voxel.min(0).round(3).tolist(), "max": voxel.max(0).round(3).tolist()},
            "field_mm": {"min": field.min(0).round(1).tolist(), "max": field.max(0).round(1).tolist()}}


def scale_mismatch(scale: dict | None, spacing, size) -> str | None:
    """Why a mask of ``size`` voxels (x y z) at ``spacing`` mm is not at the ``scale`` a model was
    trained at (None if it is, or if the weights record none). The network draws anatomy at the size
    in voxels it learnt, over coordinates that span the volume: at another voxel size or field of
    view its samples lose their anatomy (on the phantom: bodies without lungs at half the resolution,
    benchmarks/RESULTS.md, "The overfit check")."""
    if not scale:
        return None
    span = lambda lo, hi: " x ".join(f"{a:g}" if a == b else f"{a:g}-{b:g}" for a, b in zip(lo, hi))
    for key, what, have in (("voxel_mm", "voxel size", np.asarray(spacing, float)),
                            ("field_mm", "field of view", np.multiply(size, spacing))):
        lo, hi = np.asarray(scale[key]["min"], float), np.asarray(scale[key]["max"], float)
        if np.any(have < lo / SCALE_TOLERANCE) or np.any(have > hi * SCALE_TOLERANCE):
            return (f"{what} {' x '.join(f'{x:g}' for x in have.round(1))} mm is more than {SCALE_TOLERANCE:g}x "
                    f"off the training scans' {span(scale[key]['min'], scale[key]['max'])} mm")
    return None
