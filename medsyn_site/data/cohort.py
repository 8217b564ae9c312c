"""The cohort contract: ``images/<case>.nii.gz`` (int16 HU), ``masks/<case>.nii.gz`` (uint8 0/1,
same geometry) and ``cohort.json`` (per case: id, patient (hashed), split, source, shape, spacing,
sha256; never a patient name or date). This module is the only one that writes, reads or validates
a cohort, so every stage sees the same thing.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medsyn_site.atomic import (OutputExistsError, atomic_write, atomic_write_text, clean_stale, read_json, sha256_file,
                                 staged_dir)
from medsyn_site.errors import MedsynError

FORMAT = "medsyn-cohort"
VERSION = 1
INDEX = "cohort.json"
SPLITS = ("train", "val", "test")
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
GEOMETRY_TOL = 1e-3  # mm (spacing, origin) and cosine (direction)
MAX_VOXELS = 2 ** 29  # per volume (1 GiB of int16): a 512 x 512 x 2048 CT; a header claiming more is refused unread
DTYPES = {"image": np.dtype("int16"), "mask": np.dtype("uint8")}


class NoduleRecord(BaseModel):
    """A nodule the mask contains (known for phantoms and LIDC-derived masks)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["solid", "part-solid", "ground-glass", "unknown"] = "unknown"
    diameter_mm: float
    center_voxel: tuple[int, int, int]  # x, y, z
    attachment: Literal["isolated", "pleural", "vascular", "unknown"] = "unknown"


class CaseRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=ID_PATTERN)
    patient: str = Field(pattern=ID_PATTERN)
    split: Literal["train", "val", "test"]
    source: Literal["real", "synthetic"]
    shape: tuple[int, int, int]  # x, y, z
    spacing: tuple[float, float, float]  # x, y, z mm
    sha256: dict[Literal["image", "mask"], str]
    nodules: list[NoduleRecord] = []


class CohortIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["medsyn-cohort"] = FORMAT
    version: int = VERSION
    description: str = ""
    shard: tuple[int, int] | None = None  # (i, n): shard i of a sampling run split n ways (`sample --shard`)
    cases: list[CaseRecord]

    def dump(self) -> str:
        """cohort.json's text (``shard`` only where the cohort is one)."""
        return self.model_dump_json(indent=1, exclude=None if self.shard else {"shard"})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cohort, naming the file it is about."""

    path: Path
    message: str
    unsafe: bool = False  # reading the file's voxels could exhaust memory: they are not read

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class CohortError(MedsynError):
    """A cohort cannot be read; the message names the file and the problem."""


def image_path(root: Path, case_id: str) -> Path:
    return Path(root) / "images" / f"{case_id}.nii.gz"


def mask_path(root: Path, case_id: str) -> Path:
    return Path(root) / "masks" / f"{case_id}.nii.gz"


def write_nifti(image: sitk.Image, path: Path) -> Path:
    """Atomically write a NIfTI (qform and sform both set by ITK's writer)."""
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))


def to_cohort_images(image: sitk.Image, mask: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """Cast to the contract's pixel types: image int16 HU (rounded, clipped), mask uint8 0/1."""
    arr = np.clip(np.rint(sitk.GetArrayViewFromImage(image)), -32768, 32767).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(image)
    m = (sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8)
    msk = sitk.GetImageFromArray(m)
    msk.CopyInformation(image)
    return img, msk


def write_case_files(root: Path, case_id: str, image: sitk.Image, mask: sitk.Image, *, patient: str, split: str,
                     source: str, nodules: list[dict] | None = None) -> CaseRecord:
    """A case's two files under ``root`` (cast to the contract's types) and its cohort.json record."""
    img, msk = to_cohort_images(image, mask)
    ipath = write_nifti(img, image_path(root, case_id))
    mpath = write_nifti(msk, mask_path(root, case_id))
    return CaseRecord(id=case_id, patient=patient, split=split, source=source, shape=img.GetSize(),
                      spacing=img.GetSpacing(), sha256={"image": sha256_file(ipath), "mask": sha256_file(mpath)},
                      nodules=nodules or [])


class CohortWriter:
    """Writes a cohort into a staging folder and swaps it into place on success.

    >>> with CohortWriter(out, force=False) as w:
    ...     w.add("case0", patient="p0", split="train", source="real", image=img, mask=msk)
    """

    def __init__(self, out: str | Path, force: bool = False, description: str = "",
                 shard: tuple[int, int] | None = None):
        self.out, self.force, self.description, self.shard = Path(out), force, description, shard
        self.records: list[CaseRecord] = []

    def __enter__(self) -> "CohortWriter":
        self._ctx = staged_dir(self.out, self.force)
        self.root = self._ctx.__enter__()
        return self

    def add(self, case_id: str, *, patient: str, split: str, source: str, image: sitk.Image,
            mask: sitk.Image, nodules: list[dict] | None = None) -> CaseRecord:
        if any(r.id == case_id for r in self.records):
            raise CohortError(f"{self.out}: case id {case_id!r} written twice")
        rec = write_case_files(self.root, case_id, image, mask, patient=patient, split=split, source=source,
                               nodules=nodules)
        self.records.append(rec)
        self._added(rec)
        return rec

    def _added(self, rec: CaseRecord) -> None:
        """Hook for writers that record progress case by case."""

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            index = CohortIndex(description=self.description, shard=self.shard, cases=self.records)
            try:
                atomic_write_text(self.root / INDEX, index.dump())
            except BaseException as e:  # e.g. a full disk: the staging folder goes too
                self._ctx.__exit__(type(e), e, e.__traceback__)
                raise
        return self._ctx.__exit__(exc_type, exc, tb)


class ResumableCohortWriter(CohortWriter):
    """Writes a cohort in place, case by case, logging each finished case to ``.partial.jsonl``, so
    a killed job resumes where it stopped (``done(case_id)``). ``settings`` must match to resume.
    A complete cohort at ``out`` is refused unless ``force`` (then it is started afresh)."""

    PARTIAL = ".partial.jsonl"

    def __init__(self, out: str | Path, settings: dict, force: bool = False, description: str = "",
                 shard: tuple[int, int] | None = None):
        super().__init__(out, force, description, shard)
        self.settings = settings

    @classmethod
    def would_replace(cls, out: Path, force: bool) -> bool:
        """True if ``out`` holds a finished or foreign output (refused unless ``force``); checked
        before long work starts."""
        out = Path(out)
        replace = (out / INDEX).exists() or (out.exists() and any(out.iterdir()) and not (out / cls.PARTIAL).exists())
        if replace and not force:
            raise OutputExistsError(f"{out}: output already exists; pass --force to replace it")
        return replace

    def __enter__(self) -> "ResumableCohortWriter":
        import shutil

        self.root = self.out
        log = self.out / self.PARTIAL
        if self.would_replace(self.out, self.force):
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        for folder in (self.out, self.out / "images", self.out / "masks"):  # leftovers of a killed run
            clean_stale(folder)
        if log.exists():
            lines = log.read_text().splitlines()
            saved = json.loads(lines[0]) if lines else {}
            if saved != self.settings:
                raise CohortError(f"{log}: an unfinished run with other settings is here "
                                  f"({saved} vs {self.settings}); pass --force to start afresh")
            for line in lines[1:]:
                rec = CaseRecord.model_validate_json(line)
                paths = (image_path(self.root, rec.id), mask_path(self.root, rec.id))
                if all(p.exists() for p in paths) and [sha256_file(p) for p in paths] == \
                        [rec.sha256["image"], rec.sha256["mask"]]:
                    self.records.append(rec)
        else:
            atomic_write_text(log, json.dumps(self.settings) + "\n")
        return self

    def done(self, case_id: str) -> bool:
        return any(r.id == case_id for r in self.records)

    def _added(self, rec: CaseRecord) -> None:
        with open(self.root / self.PARTIAL, "a") as f:
            f.write(rec.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            index = CohortIndex(description=self.description, shard=self.shard, cases=self.records)
            atomic_write_text(self.root / INDEX, index.dump())
            (self.root / self.PARTIAL).unlink()
        return False


def write_index(root: str | Path, records: list[CaseRecord], description: str = "") -> Path:
    """cohort.json for files already in place (e.g. joined from sampling shards)."""
    return atomic_write_text(Path(root) / INDEX, CohortIndex(description=description, cases=records).dump())


class Cohort:
    """A cohort on disk, read through its cohort.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / INDEX
        if not self.root.is_dir():
            raise CohortError(f"{self.root}: cohort folder not found")
        try:
            self.index = CohortIndex.model_validate(read_json(index, CohortError, "missing (not a cohort folder)"))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise CohortError(f"{index}: {problems}") from e

    @property
    def cases(self) -> list[CaseRecord]:
        return self.index.cases

    def split(self, name: str) -> list[CaseRecord]:
        return [c for c in self.cases if c.split == name]

    def case(self, case_id: str) -> CaseRecord:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise CohortError(f"{self.root / INDEX}: no case {case_id!r}")

    def read(self, case_id: str) -> tuple[sitk.Image, sitk.Image]:
        """The case's image and mask as SimpleITK images."""
        self.case(case_id)
        return (sitk.ReadImage(str(image_path(self.root, case_id))),
                sitk.ReadImage(str(mask_path(self.root, case_id))))

    def arrays(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The case's image (int16 HU) and mask (uint8) as numpy arrays in (z, y, x) order."""
        img, msk = self.read(case_id)
        return sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(msk)


def geometry_differences(a, b) -> list[str]:
    """How b's geometry (shape, spacing, origin, direction) differs from a's; empty if it does not.
    a, b: SimpleITK images or header readers (sitk.ImageFileReader after ReadImageInformation)."""
    out = []
    if a.GetSize() != b.GetSize():
        out.append(f"shape {b.GetSize()} differs from the image's {a.GetSize()}")
    for what, x, y in (("spacing", a.GetSpacing(), b.GetSpacing()),
                       ("origin", a.GetOrigin(), b.GetOrigin()),
                       ("direction", a.GetDirection(), b.GetDirection())):
        if not np.allclose(x, y, atol=GEOMETRY_TOL):
            out.append(f"{what} {tuple(round(v, 4) for v in y)} differs from the image's "
                       f"{tuple(round(v, 4) for v in x)}")
    return out


def _read(path: Path, problems: list[Problem], what: str) -> sitk.ImageFileReader | None:
    """The file's header (geometry, voxel type); voxel values are read once, through nibabel."""
    if not path.is_file():
        problems.append(Problem(path, f"missing {what} file"))
        return None
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return reader
    except RuntimeError as e:
        problems.append(Problem(path, f"unreadable {what}: {str(e).strip().splitlines()[-1]}"))
        return None


def _voxels(path: Path, problems: list[Problem], what: str) -> np.ndarray | None:
    """Voxel values through nibabel (SimpleITK's NIfTI reader silently turns NaN into 0 and fills a
    truncated file with zeros; nibabel checks the decoded byte count)."""
    try:
        return np.asanyarray(nib.load(path).dataobj)
    except Exception as e:  # EOFError, OSError, zlib.error, ImageFileError for a damaged file
        problems.append(Problem(path, f"unreadable {what} voxels: truncated or corrupt "
                                      f"({' '.join(str(e).split())[:200]})"))
        return None


def header_problems(path: Path, what: str, rec: CaseRecord, max_voxels: int = MAX_VOXELS) -> list[Problem]:
    """What is wrong with a NIfTI file, found without reading its voxels: the header's voxel count,
    voxel type and shape against cohort.json, and the gzip stream's decompressed size against what the
    header says (a small file that would expand to gigabytes is refused after reading at most that
    many bytes, never held in memory). Empty: the voxels may be read."""
    import gzip
    import zlib

    if not path.is_file():
        return [Problem(path, f"missing {what} file", unsafe=True)]
    try:
        img = nib.load(path)  # the header only (348 bytes and any extensions); voxels stay on disk
        shape, dtype, offset = tuple(int(n) for n in img.header.get_data_shape()), img.get_data_dtype(), int(img.dataobj.offset)
    except Exception as e:  # noqa: BLE001 (anything unreadable)
        return [Problem(path, f"unreadable {what} header ({' '.join(str(e).split())[:200]})", unsafe=True)]
    n = int(np.prod(shape, dtype=np.float64)) if shape else 0
    if len(shape) != 3 or n > max_voxels:
        return [Problem(path, f"header claims {'x'.join(map(str, shape))} voxels (over the limit of {max_voxels:,} "
                              "per volume, or not 3-D); not read", unsafe=True)]
    out = []
    if dtype.newbyteorder("=") != DTYPES[what]:
        out.append(Problem(path, f"{what} voxels are {dtype}, expected {DTYPES[what]}"))
    if shape != tuple(rec.shape):
        out.append(Problem(path, f"shape {shape} differs from cohort.json's {tuple(rec.shape)}"))
    expected = offset + n * dtype.itemsize
    if path.name.endswith(".gz"):
        size, inflate = 0, zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    size += len(inflate.decompress(chunk, expected + 1 - size))
                    while inflate.unconsumed_tail and size <= expected:
                        size += len(inflate.decompress(inflate.unconsumed_tail, expected + 1 - size))
                    if size > expected:
                        break
        except (zlib.error, gzip.BadGzipFile, OSError) as e:
            out.append(Problem(path, f"corrupt gzip stream ({e})", unsafe=True))
            return out
        if size > expected:
            out.append(Problem(path, f"gzip stream expands beyond the {expected:,} bytes its header implies; not read",
                               unsafe=True))
    return out


def _case_problems(root: Path, rec: CaseRecord, hu_range: tuple[int, int]) -> list[Problem]:
    problems: list[Problem] = []
    ipath, mpath = image_path(root, rec.id), mask_path(root, rec.id)
    unsafe = [p for path, what in ((ipath, "image"), (mpath, "mask")) for p in header_problems(path, what, rec)
              if p.unsafe]
    if unsafe:  # nothing past the headers is read (the other header problems are found again below)
        return unsafe
    img, msk = _read(ipath, problems, "image"), _read(mpath, problems, "mask")
    for path, im, key in ((ipath, img, "image"), (mpath, msk, "mask")):
        if im is None:
            continue
        if sha256_file(path) != rec.sha256.get(key):
            problems.append(Problem(path, f"sha256 does not match cohort.json ({key} changed "
                                          "after it was written)"))
        if im.GetSize() != tuple(rec.shape):
            problems.append(Problem(path, f"shape {im.GetSize()} differs from cohort.json's "
                                          f"{tuple(rec.shape)}"))
        if not np.allclose(im.GetSpacing(), rec.spacing, atol=GEOMETRY_TOL):
            problems.append(Problem(path, f"spacing {im.GetSpacing()} differs from cohort.json's "
                                          f"{tuple(rec.spacing)}"))
    arr = _voxels(ipath, problems, "image") if img is not None else None
    mvox = _voxels(mpath, problems, "mask") if msk is not None else None
    if arr is not None:
        if img.GetPixelID() != sitk.sitkInt16:
            problems.append(Problem(ipath, f"image voxels are {sitk.GetPixelIDValueAsString(img.GetPixelID())}, "
                                           "expected 16-bit signed integer HU"))
        bad = int(np.count_nonzero(~np.isfinite(arr))) if arr.dtype.kind == "f" else 0
        if bad:
            problems.append(Problem(ipath, f"{bad} NaN or infinite voxels"))
        finite = arr[np.isfinite(arr)] if bad else arr
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if lo < hu_range[0] or hi > hu_range[1]:
            problems.append(Problem(ipath, f"intensities {lo:g}..{hi:g} lie outside the plausible "
                                           f"HU range {hu_range[0]}..{hu_range[1]}"))
    if mvox is not None:
        values = np.unique(mvox)
        if not set(values.tolist()) <= {0, 1}:
            shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
            problems.append(Problem(mpath, f"mask values {{{shown}}}; only 0 and 1 are allowed"))
        if msk.GetPixelID() != sitk.sitkUInt8 and set(values.tolist()) <= {0, 1}:
            problems.append(Problem(mpath, f"mask voxels are {sitk.GetPixelIDValueAsString(msk.GetPixelID())}, "
                                           "expected 8-bit unsigned integer"))
        if img is not None:
            problems += [Problem(mpath, m) for m in geometry_differences(img, msk)]
    return problems


def _unlisted(root: Path, cohort: Cohort) -> list[Problem]:
    listed = {rec.id for rec in cohort.cases}
    return [Problem(f, "file is not listed in cohort.json") for sub in ("images", "masks")
            for f in sorted((root / sub).glob("*")) if re.sub(r"\.nii\.gz$", "", f.name) not in listed]


def validate_cohort(root: str | Path, hu_range: tuple[int, int] = (-1024, 3071)) -> list[Problem]:
    """Every problem found in a cohort (empty list: valid). Never raises for bad content."""
    root = Path(root)
    try:
        cohort = Cohort(root)
    except CohortError as e:
        return [Problem(root / INDEX, str(e).split(": ", 1)[-1])]
    problems: list[Problem] = []
    index = root / INDEX
    seen: dict[str, int] = defaultdict(int)
    splits: dict[str, set[str]] = defaultdict(set)
    for rec in cohort.cases:
        seen[rec.id] += 1
        splits[rec.patient].add(rec.split)
    for case_id, n in seen.items():
        if n > 1:
            problems.append(Problem(index, f"duplicate case id {case_id!r} ({n} entries)"))
    for patient, names in splits.items():
        if len(names) > 1:
            problems.append(Problem(index, f"patient {patient!r} appears in several splits: "
                                           f"{', '.join(sorted(names))}"))
    for rec in cohort.cases:
        problems += _case_problems(root, rec, hu_range)
    return problems + _unlisted(root, cohort)


def release_problems(root: str | Path, max_voxels: int = MAX_VOXELS) -> list[Problem]:
    """What the central side checks in another party's cohort (a release) BEFORE reading any voxel:
    the index, files not listed in it, and each file's header (voxel count, voxel type, shape,
    the gzip stream's size; ``header_problems``). Empty: its voxels may be read."""
    root = Path(root)
    try:
        cohort = Cohort(root)
    except CohortError as e:
        return [Problem(root / INDEX, str(e).split(": ", 1)[-1])]
    problems = [p for rec in cohort.cases for path, what in ((image_path(root, rec.id), "image"),
                                                               (mask_path(root, rec.id), "mask"))
                for p in header_problems(path, what, rec, max_voxels)]
    return problems + _unlisted(root, cohort)
