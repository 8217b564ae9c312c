"""`medsyn data prepare` on DICOM series (axial and oblique) written by the test, NIfTI/NRRD,
DICOM SEG and LIDC-IDRI XML masks; geometry, de-identification and bad-input errors."""
from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from conftest import PHI, read_series_datasets, write_ct_series
from medsyn_site.cli import main
from medsyn_site.config import load_config
from medsyn_site.data.cohort import Cohort, image_path, validate_cohort
from medsyn_site.data.prepare import prepare_cohort
from medsyn_site.data.readers import IngestError

SPACING = (0.8, 0.7, 2.0)  # x, y, z mm
SHAPE_ZYX = (20, 40, 48)
MARK = (10, 12, 5)  # x, y, z voxel of the first corner of a 3x3x3 bright marker
TILT = np.deg2rad(25)
ORIENT = {"axial": ((1, 0, 0), (0, 1, 0)),
          "oblique": ((1, 0, 0), (0, np.cos(TILT), np.sin(TILT)))}


def _volume() -> np.ndarray:
    vol = np.full(SHAPE_ZYX, -1000, np.int16)
    vol[:, 8:34, 6:42] = 40
    vol[:, 14:28, 10:22] = -850  # a lung-like region, so crop-to-lungs has something to find
    x, y, z = MARK
    vol[z:z + 3, y:y + 3, x:x + 3] = 1000
    return vol


def _marker_world(row, col, origin) -> np.ndarray:
    """Physical (LPS) centre of the marker, from the geometry the test wrote."""
    row, col = np.asarray(row, float), np.asarray(col, float)
    x, y, z = (m + 1 for m in MARK)
    return np.asarray(origin) + x * SPACING[0] * row + y * SPACING[1] * col + z * SPACING[2] * np.cross(row, col)


def _centroid_world(image: sitk.Image, mask_zyx: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask_zyx).mean(0)[::-1]  # x, y, z continuous index
    return np.array(image.TransformContinuousIndexToPhysicalPoint(tuple(float(i) for i in idx)))


@pytest.fixture
def site(tmp_path):
    """Two DICOM series (axial, oblique) of two patients, and one NIfTI image + NIfTI mask."""
    vol = _volume()
    origin = (-20.0, -15.0, 100.0)
    for name, (row, col) in ORIENT.items():
        write_ct_series(tmp_path / name, vol, SPACING, origin, row, col)
    # patient 2: a second series of the oblique one's patient id would be split-linked; use another id
    for ds_path in (tmp_path / "oblique").glob("*.dcm"):
        import pydicom
        ds = pydicom.dcmread(ds_path)
        ds.PatientID = "MRN-OTHER-1"
        ds.save_as(ds_path)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(SPACING)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(tmp_path / "scan3.nrrd"))
    m = sitk.GetImageFromArray((vol == 1000).astype(np.uint8))
    m.CopyInformation(img)
    sitk.WriteImage(m, str(tmp_path / "scan3_mask.nii.gz"))
    return tmp_path


def _manifest(folder: Path, rows) -> Path:
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "patient"])
        w.writerows(rows)
    return path


def _cfg(spacing=None, crop=False):
    cfg = load_config(overrides={"data.prepare.crop_to_lungs": crop})
    cfg.data.prepare.spacing = spacing
    cfg.data.split.train, cfg.data.split.val = 0.34, 0.33
    return cfg.data


def _seg(folder: Path, out: Path) -> Path:
    """A DICOM SEG (highdicom) of the marker over the series in folder."""
    sources = read_series_datasets(folder)
    sources.sort(key=lambda d: float(np.dot(d.ImagePositionPatient, np.cross(
        np.array(d.ImageOrientationPatient[:3], float), np.array(d.ImageOrientationPatient[3:], float)))))
    pixels = np.stack([d.pixel_array == 2024 for d in sources])  # stored value of 1000 HU
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="0", device_serial_number="1")
    seg.save_as(out)
    return out


def test_dicom_axial_and_oblique_geometry(site, tmp_path):
    man = _manifest(site, [["axial", "", ""], ["oblique", "", ""], ["scan3.nrrd", "scan3_mask.nii.gz", ""]])
    out = tmp_path / "cohort"
    prepare_cohort(man, out, _cfg(spacing=None), site_key=tmp_path / "key")
    assert validate_cohort(out) == []
    cohort = Cohort(out)
    assert len(cohort.cases) == 3 and len({c.patient for c in cohort.cases}) == 3
    origin = (-20.0, -15.0, 100.0)
    for name, (row, col) in ORIENT.items():
        # the k-th output case in manifest order
        rec = cohort.cases[list(ORIENT).index(name)]
        image, _ = cohort.read(rec.id)
        arr = sitk.GetArrayFromImage(image)
        assert image.GetSize() == SHAPE_ZYX[::-1]
        assert np.allclose(image.GetSpacing(), SPACING, atol=1e-4)  # z from positions, not SliceThickness
        direction = np.array(image.GetDirection()).reshape(3, 3)
        assert np.allclose(direction[:, 0], row, atol=1e-5) and np.allclose(direction[:, 1], col, atol=1e-5)
        assert np.allclose(_centroid_world(image, arr == 1000), _marker_world(row, col, origin), atol=1e-3)
        assert np.array_equal(arr, _volume())  # slices in the right order despite shuffled files


def test_resampled_nifti_agrees_in_simpleitk_and_nibabel(site, tmp_path):
    man = _manifest(site, [["oblique", "", ""], ["axial", "", ""]])
    out = tmp_path / "cohort"
    prepare_cohort(man, out, _cfg(spacing=(1.0, 1.0, 1.5)), site_key=tmp_path / "key")
    cohort = Cohort(out)
    rec = cohort.cases[0]
    image, _ = cohort.read(rec.id)
    assert np.allclose(image.GetSpacing(), (1.0, 1.0, 1.5))
    arr = sitk.GetArrayFromImage(image)
    row, col = ORIENT["oblique"]
    got = _centroid_world(image, arr > 500)
    assert np.linalg.norm(got - _marker_world(row, col, (-20.0, -15.0, 100.0))) < 1.0
    nii = nib.load(image_path(out, rec.id))
    assert int(nii.header["qform_code"]) == 1 and int(nii.header["sform_code"]) == 1
    assert np.allclose(nii.get_qform(), nii.get_sform(), atol=1e-4)
    lps_to_ras = np.diag([-1, -1, 1])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(nii.affine[:3, :3], lps_to_ras @ direction @ np.diag(image.GetSpacing()), atol=1e-4)
    assert np.allclose(nii.affine[:3, 3], lps_to_ras @ np.array(image.GetOrigin()), atol=1e-3)
    # the same voxel lands at the same point in both libraries
    ijk = np.array([7, 9, 4])
    ras = nii.affine @ np.append(ijk, 1)
    assert np.allclose(lps_to_ras @ ras[:3], image.TransformIndexToPhysicalPoint(tuple(int(i) for i in ijk)), atol=1e-3)


def test_no_identifier_reaches_the_output(site, tmp_path):
    man = _manifest(site, [["axial", "", ""], ["oblique", "", ""]])
    out = tmp_path / "cohort"
    prepare_cohort(man, out, _cfg(spacing=None), site_key=tmp_path / "key")
    blobs = [(out / "cohort.json").read_bytes()]
    blobs += [gzip.decompress(p.read_bytes()) for p in out.rglob("*.nii.gz")]
    for value in list(PHI.values()) + ["MRN-OTHER-1", "axial", "oblique"]:
        assert not any(value.encode() in b for b in blobs), value
    # ids are stable for the same site key, and differ under another key
    again = tmp_path / "again"
    prepare_cohort(man, again, _cfg(spacing=None), site_key=tmp_path / "key")
    other = tmp_path / "other"
    prepare_cohort(man, other, _cfg(spacing=None), site_key=tmp_path / "key2")
    ids = lambda d: [c.id for c in Cohort(d).cases]  # noqa: E731
    assert ids(again) == ids(out) and set(ids(other)).isdisjoint(ids(out))


def test_dicom_seg_mask(site, tmp_path):
    seg = _seg(site / "oblique", tmp_path / "seg.dcm")
    man = _manifest(site, [["oblique", str(seg), ""]])
    out = tmp_path / "cohort"
    prepare_cohort(man, out, _cfg(spacing=None), site_key=tmp_path / "key")
    image, mask = Cohort(out).arrays(Cohort(out).cases[0].id)
    assert mask.sum() == 27 and np.array_equal(mask.astype(bool), image == 1000)


def _lidc_xml(path: Path, folder: Path, textures=("", "", "", "")):
    """Four reading sessions: readers 1-2 outline the marker, reader 3 another spot, reader 4 none;
    all four mark a 2x2-pixel speck (< 3 mm) that consensus must drop. ``textures``: each reader's
    texture rating of its nodule (LIDC: 1 ground-glass .. 5 solid; "" none)."""
    ds = sorted(read_series_datasets(folder), key=lambda d: float(d.ImagePositionPatient[2]))
    x, y, z = MARK
    def roi(k, xs, ys):
        edges = "".join(f"<edgeMap><xCoord>{a}</xCoord><yCoord>{b}</yCoord></edgeMap>" for a, b in zip(xs, ys))
        return (f"<roi><imageZposition>{float(ds[k].ImagePositionPatient[2])}</imageZposition>"
                f"<imageSOP_UID>{ds[k].SOPInstanceUID}</imageSOP_UID><inclusion>TRUE</inclusion>{edges}</roi>")
    square = ([x, x + 2, x + 2, x], [y, y, y + 2, y + 2])
    marker = "".join(roi(k, *square) for k in range(z, z + 3))
    speck = roi(15, [30, 31, 31, 30], [30, 30, 31, 31])
    other = roi(10, [20, 24, 24, 20], [20, 20, 24, 24])
    sessions = [marker + speck, marker + speck, other + speck, speck]
    rated = [f"<characteristics><texture>{t}</texture></characteristics>" if t else "" for t in textures]
    body = "".join(f"<readingSession><unblindedReadNodule><noduleID>n</noduleID>{r}{s}</unblindedReadNodule>"
                   f"</readingSession>" for r, s in zip(rated, sessions))
    path.write_text(f'<?xml version="1.0"?><LidcReadMessage xmlns="http://www.nih.gov">{body}</LidcReadMessage>')
    return path


def test_lidc_xml_consensus(site, tmp_path):
    xml = _lidc_xml(tmp_path / "069.xml", site / "axial")
    man = _manifest(site, [["axial", str(xml), ""]])
    out = tmp_path / "cohort"
    prepare_cohort(man, out, _cfg(spacing=None), site_key=tmp_path / "key")
    image, mask = Cohort(out).arrays(Cohort(out).cases[0].id)
    assert np.array_equal(mask.astype(bool), image == 1000)  # only the 2-of-4 marker survives
    assert [n.type for n in Cohort(out).cases[0].nodules] == ["unknown"]  # no texture ratings


@pytest.mark.parametrize("textures, expected", [((1, 2, 5, 5), "ground-glass"), ((3, 3, 1, 1), "part-solid"),
                                                ((5, 4, 1, 1), "solid")])
def test_lidc_xml_nodules_typed_by_their_readers_texture(site, tmp_path, textures, expected):
    """The marker's type is the median texture of the two readers who outlined it (readers 3-4 rate
    nodules elsewhere and must not count)."""
    xml = _lidc_xml(tmp_path / "069.xml", site / "axial", textures)
    out = tmp_path / "cohort"
    prepare_cohort(_manifest(site, [["axial", str(xml), ""]]), out, _cfg(spacing=None), site_key=tmp_path / "key")
    case = Cohort(out).cases[0]
    image, mask = Cohort(out).arrays(case.id)
    (nodule,) = case.nodules
    x, y, z = nodule.center_voxel
    assert nodule.type == expected and image[z, y, x] == 1000 and mask[z, y, x] == 1


def test_crop_to_lungs(site, tmp_path):
    man = _manifest(site, [["axial", "", ""]])
    out = tmp_path / "cohort"
    cfg = _cfg(spacing=None, crop=True)
    cfg.prepare.crop_margin_mm = 2.0
    prepare_cohort(man, out, cfg, site_key=tmp_path / "key")
    image, _ = Cohort(out).read(Cohort(out).cases[0].id)
    size = image.GetSize()
    assert size[0] < SHAPE_ZYX[2] and size[1] < SHAPE_ZYX[1]
    assert (sitk.GetArrayViewFromImage(image) < -700).any()


def _corrupt(site: Path, kind: str) -> tuple[str, str, str]:
    """(image, mask, expected message) for one kind of bad input."""
    if kind == "missing-image":
        return "nope.nii.gz", "", "nope.nii.gz: image not found"
    if kind == "empty-folder":
        (site / "empty").mkdir()
        return "empty", "", "empty: no DICOM files"
    if kind == "two-series":
        shutil.copytree(site / "axial", site / "mixed")
        write_ct_series(site / "mixed" / "b", _volume()[:3], SPACING, (0, 0, 0), (1, 0, 0), (0, 1, 0))
        return "mixed", "", "mixed: holds 2 DICOM series"
    if kind == "missing-slice":
        files = sorted((site / "axial").glob("*.dcm"), key=lambda p: float(
            __import__("pydicom").dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
        files[7].unlink()
        return "axial", "", "axial: slice spacing varies"
    if kind == "mask-geometry":
        m = sitk.ReadImage(str(site / "scan3_mask.nii.gz"))
        m.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(m, str(site / "bad_mask.nii.gz"))
        return "scan3.nrrd", "bad_mask.nii.gz", "bad_mask.nii.gz: mask geometry"
    if kind == "mask-values":
        m = sitk.ReadImage(str(site / "scan3_mask.nii.gz"), sitk.sitkFloat32) * 0.5
        sitk.WriteImage(m, str(site / "frac_mask.nii.gz"))
        return "scan3.nrrd", "frac_mask.nii.gz", "frac_mask.nii.gz: mask has values"
    if kind == "seg-other-series":
        _seg(site / "axial", site / "seg_axial.dcm")
        return "oblique", "seg_axial.dcm", "seg_axial.dcm: the SEG refers to none of the slices"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing-image", "empty-folder", "two-series", "missing-slice",
                                  "mask-geometry", "mask-values", "seg-other-series"])
def test_bad_input_clear_error_and_existing_output_kept(site, tmp_path, kind):
    out = tmp_path / "cohort"
    prepare_cohort(_manifest(site, [["scan3.nrrd", "scan3_mask.nii.gz", ""]]), out, _cfg(),
                   site_key=tmp_path / "key")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    image, mask, expect = _corrupt(site, kind)
    man = _manifest(site, [["scan3.nrrd", "scan3_mask.nii.gz", ""], [image, mask, ""]])
    with pytest.raises(IngestError, match=expect.replace(".", r"\.").replace("(", r"\(")):
        prepare_cohort(man, out, _cfg(), force=True, site_key=tmp_path / "key")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # and the CLI says the same in one line, exit status 1
    res = CliRunner().invoke(main, ["data", "prepare", "--manifest", str(man), "--out", str(out),
                                    "--force", "--site-key", str(tmp_path / "key")])
    assert res.exit_code == 1 and expect in res.output, res.output


def test_cli_refuses_existing_output_without_force(site, tmp_path):
    out = tmp_path / "cohort"
    man = _manifest(site, [["scan3.nrrd", "scan3_mask.nii.gz", ""]])
    args = ["data", "prepare", "--manifest", str(man), "--out", str(out), "--site-key", str(tmp_path / "k")]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = (out / "cohort.json").read_bytes()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "already exists; pass --force" in res.output
    assert (out / "cohort.json").read_bytes() == before


def test_manifest_split_column_keeps_the_sites_own_split(tmp_path):
    """A `split` column puts each patient where the site says (the seeded split for empty cells);
    a bad value or one patient in two splits is refused with the CSV line named."""
    paths = []
    for i in range(4):
        img = sitk.GetImageFromArray(_volume())
        img.SetSpacing(SPACING)
        sitk.WriteImage(img, str(tmp_path / f"s{i}.nii.gz"))
        paths.append(tmp_path / f"s{i}.nii.gz")

    def manifest(rows):
        with open(tmp_path / "m.csv", "w", newline="") as f:
            csv.writer(f).writerows([["image", "mask", "patient", "split"], *rows])
        return tmp_path / "m.csv"
    key = tmp_path / "site.key"
    m = manifest([[paths[0], "", "p0", "test"], [paths[1], "", "p1", "test"], [paths[2], "", "p2", ""],
                  [paths[3], "", "p3", "val"]])
    prepare_cohort(m, tmp_path / "c", _cfg(), site_key=key)
    from medsyn_site.sitekey import load_site_key, pseudonym

    k = load_site_key(key)
    splits = {r.patient: r.split for r in Cohort(tmp_path / "c").cases}
    assert [splits[pseudonym(k, f"p{i}", "pt")] for i in (0, 1, 3)] == ["test", "test", "val"]
    with pytest.raises(IngestError, match=r"m.csv: line 2: split 'holdout': use train, val, test"):
        prepare_cohort(manifest([[paths[0], "", "p0", "holdout"]]), tmp_path / "d", _cfg(), site_key=key)
    with pytest.raises(IngestError, match=r"lines 2 and 3 put one patient in train and val"):
        prepare_cohort(manifest([[paths[0], "", "p0", "train"], [paths[1], "", "p0", "val"]]), tmp_path / "e",
                       _cfg(), site_key=key)
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_lidc_nodule_type_is_the_readers_median_texture():
    """LIDC's texture ratings (1 ground-glass .. 3 part-solid .. 5 solid), median over a nodule's readers;
    the annotations are looked up here by their rating."""
    import sqlite3

    from medsyn_site.data import lidc

    con = sqlite3.connect(f"file:{lidc.database_path()}?mode=ro", uri=True)
    by = {t: [i for (i,) in con.execute("select id from annotations where texture=? order by id limit 3", (t,))]
          for t in range(1, 6)}
    assert lidc.nodule_type(by[1][:2] + by[2][:1]) == "ground-glass"      # 1, 1, 2
    assert lidc.nodule_type(by[2][:1] + by[3][:1]) == "part-solid"        # 2, 3: median 2.5
    assert lidc.nodule_type(by[3][:2] + by[5][:1]) == "part-solid"        # 3, 3, 5
    assert lidc.nodule_type(by[4][:1] + by[5][:2]) == "solid"             # 4, 5, 5
    assert lidc.nodule_type([]) == "unknown"
