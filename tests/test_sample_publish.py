"""Whole-volume sampling and the publication gate, on a tiny trained run: geometry, samplers,
determinism, resume, provenance, the memorization audit against disguised real scans, DICOM output
validated by dciodvfy and read back by SimpleITK."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medsyn_site import provenance
from medsyn_site.config import RealismConfig
from medsyn_site.data.cohort import Cohort, image_path, mask_path, validate_cohort
from medsyn_site.data.readers import read_dicom_series, read_seg
from medsyn_site.diffusion import sample as sample_mod
from medsyn_site.diffusion.sample import sample_cohort
from medsyn_site.imaging import lung_mask
from medsyn_site.publish.release import ReleaseError, publish
from medsyn_site.sitekey import load_site_key


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sample_geometry_provenance_and_relocation(synth, phantom_cohort, key):
    assert validate_cohort(synth) == []
    cohort, real = Cohort(synth), Cohort(phantom_cohort)
    assert {c.source for c in cohort.cases} == {"synthetic"} and len(cohort.cases) == len(real.split("train"))
    header, entries = provenance.read(synth)
    assert header["sampler"] == "ddim" and header["steps"] == 4
    k = load_site_key(key)
    by_case = {e["case"]: e for e in entries}
    sources = {r.id: real.read(r.id) for r in real.split("train")}
    for rec in cohort.cases:
        e = by_case[rec.id]
        assert provenance.verify(e, header, k) and e["mask_mode"] == "relocated"
        assert e["image_sha256"] == rec.sha256["image"] and e["mask_source_id"].startswith("src-")
        image, mask = cohort.read(rec.id)
        assert image.GetPixelID() == sitk.sitkInt16
        # the mask's geometry is the source scan's; nodules moved but keep their sizes, inside the lungs
        src = next(v for v in sources.values() if v[1].GetSize() == mask.GetSize())
        for a, b in ((image, src[1]), (mask, src[1])):
            assert a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            assert np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection())
    moved = 0
    for rec in real.split("train"):
        hu, m = real.arrays(rec.id)
        e = next(e for e in entries if e["mask_source_id"] == provenance_source(k, rec.id))
        new = Cohort(synth).arrays(e["case"])[1]
        sizes = lambda a: sorted(np.bincount(ndimage.label(a, np.ones((3, 3, 3)))[0].ravel())[1:])  # noqa: E731
        assert set(sizes(new)) <= set(sizes(m))  # same nodule shapes (a nodule without room is dropped)
        assert lung_mask(hu)[new > 0].all()
        moved += int(m.any() and not np.array_equal(new, m))
    assert moved >= 1
    # each relocated nodule keeps its type: cohort.json records it at a voxel of its new place
    from medsyn_site.imaging import label_nodules
    from medsyn_site.realism import record_types

    source_types = {pair for rec in real.split("train") for pair in record_types(rec, real.arrays(rec.id)[1]).items()}
    typed = 0
    for rec in cohort.cases:
        mask = cohort.arrays(rec.id)[1]
        got = record_types(rec, mask)  # voxel count -> type, found at the records' centre voxels
        assert len(rec.nodules) == label_nodules(mask)[1] == len(got), rec
        assert set(got.items()) <= source_types
        typed += len(got)
    assert typed >= 1


def provenance_source(key: bytes, case_id: str) -> str:
    from medsyn_site.sitekey import pseudonym

    return pseudonym(key, case_id, "src")


def test_ddpm_and_ddim_deterministic_and_resumable(run, phantom_cohort, key, tmp_path, monkeypatch):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sample_cohort(run, f"cohort:{phantom_cohort}", a, sampler="ddpm", steps=4, seed=5, site_key=key)
    # resumable: the second run dies after one volume, the third finishes without redoing it
    calls = []
    real_volumes = sample_mod.Sampler.volumes

    def dying(self, masks, seeds, codes=None):
        if len(calls) == 1:
            raise KeyboardInterrupt("killed")
        calls.extend(seeds)
        return real_volumes(self, masks, seeds, codes)
    monkeypatch.setattr(sample_mod.Sampler, "volumes", dying)
    with pytest.raises(KeyboardInterrupt):
        sample_cohort(run, f"cohort:{phantom_cohort}", b, sampler="ddpm", steps=4, seed=5, site_key=key)
    assert len(list((b / "images").glob("*.nii.gz"))) == 1 and not (b / "cohort.json").exists()
    monkeypatch.setattr(sample_mod.Sampler, "volumes",
                        lambda self, m, s, c=None: (calls.extend(s), real_volumes(self, m, s, c))[1])
    sample_cohort(run, f"cohort:{phantom_cohort}", b, sampler="ddpm", steps=4, seed=5, site_key=key)
    n = len(Cohort(a).cases)
    assert len(calls) == n and len(set(calls)) == n  # each volume made once across the two runs
    assert [r.sha256 for r in Cohort(a).cases] == [r.sha256 for r in Cohort(b).cases]  # same seed, same bytes
    sample_cohort(run, f"cohort:{phantom_cohort}", c, sampler="ddpm", steps=4, seed=6, site_key=key)
    assert [r.sha256["image"] for r in Cohort(a).cases] != [r.sha256["image"] for r in Cohort(c).cases]
    # verbatim masks are the source masks; a complete output is not overwritten without --force
    src = Cohort(phantom_cohort)
    for rec in Cohort(a).cases:
        assert any(np.array_equal(Cohort(a).arrays(rec.id)[1], src.arrays(s.id)[1]) for s in src.split("train"))
    from medsyn_site.atomic import OutputExistsError
    with pytest.raises(OutputExistsError):
        sample_cohort(run, f"cohort:{phantom_cohort}", a, sampler="ddpm", steps=4, seed=5, site_key=key)


def test_batched_sampling_matches_one_by_one(run, phantom_cohort, key, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    sample_cohort(run, f"cohort:{phantom_cohort}", one, sampler="ddim", steps=4, seed=3, site_key=key)
    sample_cohort(run, f"cohort:{phantom_cohort}", two, sampler="ddim", steps=4, seed=3, site_key=key, batch_size=2)
    for rec in Cohort(one).cases:  # DDIM (eta 0) has no step noise: batching changes nothing but rounding
        a, b = Cohort(one).arrays(rec.id)[0], Cohort(two).arrays(rec.id)[0]
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def _inject(synth: Path, phantom: Path, name: str, hu: np.ndarray, mask: np.ndarray, ref: sitk.Image,
            key: bytes | None, forge: bool = False) -> str:
    """Put a (disguised) real scan into SYNTH as if it were a sample: files, cohort.json entry and,
    optionally, a provenance line (forged without the key, or signed by an insider with it)."""
    case = f"syn-{name}"
    for arr, path, dtype in ((hu, image_path(synth, case), np.int16), (mask, mask_path(synth, case), np.uint8)):
        im = sitk.GetImageFromArray(arr.astype(dtype))
        im.CopyInformation(ref)
        sitk.WriteImage(im, str(path), useCompression=True)
    from medsyn_site.atomic import sha256_file

    doc = json.loads((synth / "cohort.json").read_text())
    shas = {"image": sha256_file(image_path(synth, case)), "mask": sha256_file(mask_path(synth, case))}
    doc["cases"].append({**doc["cases"][0], "id": case, "patient": case, "sha256": shas, "nodules": []})
    (synth / "cohort.json").write_text(json.dumps(doc))
    if key is not None or forge:
        prov = json.loads((synth / "provenance.json").read_text())
        header = {k: v for k, v in prov.items() if k not in ("format", "version", "files")}
        entry = {**prov["files"][0], "case": case, "image_sha256": shas["image"], "mask_sha256": shas["mask"]}
        entry = provenance.sign(entry, header, key) if key is not None else {**entry, "signature": "0" * 64}
        prov["files"].append(entry)
        (synth / "provenance.json").write_text(json.dumps(prov))
    return case


def _reasons(report, case):
    return next(c["reasons"] for c in report["cases"] if c["case"] == case)


def test_publish_refuses_real_scans_however_disguised(synth, phantom_cohort, key, tmp_path):
    s = _copy(synth, tmp_path / "syn")
    real = Cohort(phantom_cohort)
    rec = real.split("train")[0]
    hu, m = real.arrays(rec.id)
    ref = real.read(rec.id)[0]
    k = load_site_key(key)
    rng = np.random.default_rng(0)
    cases = {
        "plain": _inject(s, phantom_cohort, "plain", hu, m, ref, None),
        "forged": _inject(s, phantom_cohort, "forged", hu, m, ref, None, forge=True),
        "insider": _inject(s, phantom_cohort, "insider", hu, m, ref, k),
        "shifted": _inject(s, phantom_cohort, "shifted", np.roll(hu, (1, 3, -2), (0, 1, 2)),
                           np.roll(m, (1, 3, -2), (0, 1, 2)), ref, k),
        "noised": _inject(s, phantom_cohort, "noised", np.clip(hu + rng.normal(0, 40, hu.shape), -1024, 3071), m, ref, k),
        "rescaled": _inject(s, phantom_cohort, "rescaled", np.clip(hu * 0.9 + 60, -1024, 3071), m, ref, k),
    }
    changed = Cohort(s).cases[0].id
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path(s, changed))))
    arr[0, 0, 0] += 1
    im = sitk.GetImageFromArray(arr)
    im.CopyInformation(sitk.ReadImage(str(image_path(s, changed))))
    sitk.WriteImage(im, str(image_path(s, changed)), useCompression=True)
    (s / "images" / "stray.nii.gz").write_bytes((s / "images" / f"{changed}.nii.gz").read_bytes())

    out = tmp_path / "release"
    report = publish(s, phantom_cohort, out, fmt="nifti", site_key=key)
    assert "no provenance entry signed" in " ".join(_reasons(report, cases["plain"]))
    assert "no provenance entry signed" in " ".join(_reasons(report, cases["forged"]))
    for name in ("insider", "shifted", "noised", "rescaled"):
        assert any("memorization audit" in r for r in _reasons(report, cases[name])), name
    assert any("changed after sampling" in r for r in _reasons(report, changed))
    assert any("not in cohort.json" in r for r in _reasons(report, "stray"))
    released = {p.name.removesuffix(".nii.gz") for p in (out / "nifti" / "images").glob("*")}
    assert released == {r.id for r in Cohort(synth).cases} - {changed}
    assert not released & set(cases.values())
    # an override with a written reason releases a flagged case, and the card records it
    out2 = tmp_path / "release2"
    publish(s, phantom_cohort, out2, fmt="nifti", site_key=key,
            overrides={cases["insider"]: "test: reviewed by the privacy officer"})
    card = json.loads((out2 / "dataset_card.json").read_text())
    assert card["audit"]["overridden"] == [{"case": cases["insider"], "reason": "test: reviewed by the privacy officer"}]


def test_release_contents_dicom_valid_and_readable(synth, phantom_cohort, key, tmp_path, monkeypatch):
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (Debian dicom3tools) is required; scripts/test.sh installs it")
    out = tmp_path / "release"
    reads, read_image = [], sitk.ReadImage
    monkeypatch.setattr(sitk, "ReadImage", lambda path, *a, **k: (reads.append(Path(path)), read_image(path, *a, **k))[1])
    report = publish(synth, phantom_cohort, out, fmt="both", site_key=key, realism=RealismConfig(cnn_steps=20),
                     workers=1)  # in this process, where the reads are counted
    monkeypatch.undo()
    cases = {r.id for r in Cohort(synth).cases}
    # every synthetic volume decoded once: audit, adherence, realism and both formats from one read
    synth_reads = sorted(str(p.relative_to(synth)) for p in reads if p.is_relative_to(synth))
    assert synth_reads == sorted(f"{d}/{c}.nii.gz" for c in cases for d in ("images", "masks")), synth_reads
    assert all(not c["reasons"] for c in report["cases"])
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    expected_top = {"dataset_card.md", "dataset_card.json", "audit/audit.json", "audit/scores.png", "audit/privacy.md",
                    "nifti/cohort.json"}
    assert expected_top <= files
    for f in files - expected_top:  # nothing but synthetic files
        parts = Path(f).parts
        assert parts[0] in ("nifti", "dicom") and parts[1] in {"images", "masks"} | cases, f
    assert validate_cohort(out / "nifti") == []
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["counts"] == {"released": len(cases), "refused": 0} and card["verbatim_real_masks"] is False
    # realism against the 3 training scans (1 val scan: too few for the real-vs-real baseline); the
    # 10-step model's samples are noise, which both classifiers must tell from CT
    realism = card["realism"]
    assert realism["synthetic_volumes"] == len(cases) and realism["real_volumes"] == 3 and realism["real_vs_real"] is None
    assert realism["synthetic"]["feature_c2st"] > 0.8 and realism["synthetic"]["cnn_c2st"] > 0.7, realism["synthetic"]
    assert "the strongest classifier tells synthetic from real" in (out / "dataset_card.md").read_text()
    for case in cases:
        folder = out / "dicom" / case
        for f in [*sorted((folder / "CT").glob("*.dcm"))[:3], folder / "SEG.dcm"]:
            res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
            assert res.returncode == 0 and "Error" not in res.stdout + res.stderr, res.stderr[-1500:]
        scan = read_dicom_series(folder / "CT")
        nifti_img, nifti_mask = Cohort(out / "nifti").read(case)
        assert scan.image.GetSize() == nifti_img.GetSize()
        assert np.allclose(scan.image.GetSpacing(), nifti_img.GetSpacing(), atol=1e-4)
        assert np.allclose(scan.image.GetOrigin(), nifti_img.GetOrigin(), atol=1e-3)
        assert np.array_equal(sitk.GetArrayFromImage(scan.image), sitk.GetArrayFromImage(nifti_img))
        seg = read_seg(folder / "SEG.dcm", scan)
        assert np.array_equal(sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(nifti_mask))
        assert Cohort(out / "nifti").case(case).nodules == Cohort(synth).case(case).nodules  # types published
        import pydicom
        ds = pydicom.dcmread(sorted((folder / "CT").glob("*.dcm"))[0])
        assert ds.PatientIdentityRemoved == "YES" and "SYNTHETIC" in ds.ImageType and ds.StudyDate == ""


def test_verbatim_masks_need_the_flag(run, phantom_cohort, key, tmp_path):
    syn = tmp_path / "verbatim"
    sample_cohort(run, f"cohort:{phantom_cohort}", syn, sampler="ddim", steps=2, seed=2, site_key=key)
    with pytest.raises(ReleaseError, match=r"all \d+ case\(s\) refused.*verbatim real mask"):
        publish(syn, phantom_cohort, tmp_path / "r1", fmt="nifti", site_key=key)  # nothing to release
    assert not (tmp_path / "r1").exists()
    publish(syn, phantom_cohort, tmp_path / "r2", fmt="nifti", site_key=key, allow_verbatim=True)
    card = json.loads((tmp_path / "r2" / "dataset_card.json").read_text())
    assert card["verbatim_real_masks"] is True and "VERBATIM REAL MASKS" in (tmp_path / "r2" / "dataset_card.md").read_text()


def test_sampling_masks_at_another_scale_warns(run, phantom_cohort, key, tmp_path, caplog):
    """`medsyn train` records the training scans' voxel size and field of view in the weights
    (the phantom's, by hand: 2 x 2 x 2.5 mm voxels, 64 x 64 x 40 of them); masks at that scale sample
    without a word, masks at half the resolution (the same field in 4 x 4 x 5 mm voxels, where the
    phantom model drew bodies without lungs) or of half the field warn once a geometry, naming the weights."""
    from medsyn_site.config import PhantomConfig, SplitConfig
    from medsyn_site.data.phantom import write_phantom_cohort
    from medsyn_site.diffusion.rundir import load_weights
    from medsyn_site.diffusion.sample import resolve_weights

    weights = resolve_weights(run)
    assert load_weights(weights)["scale"] == {"voxel_mm": {"min": [2.0, 2.0, 2.5], "max": [2.0, 2.0, 2.5]},
                                              "field_mm": {"min": [128.0, 128.0, 100.0], "max": [128.0, 128.0, 100.0]}}
    coarse, small = tmp_path / "coarse", tmp_path / "small"
    write_phantom_cohort(PhantomConfig(cases=1, seed=3, shape=(32, 32, 20), spacing=(4, 4, 5)), SplitConfig(), coarse)
    write_phantom_cohort(PhantomConfig(cases=1, seed=3, shape=(32, 32, 20)), SplitConfig(), small)
    for masks, said in ((phantom_cohort, None), (coarse, "voxel size 4 x 4 x 5 mm is more than 1.25x off the "
                                                         "training scans' 2 x 2 x 2.5 mm"),
                        (small, "field of view 64 x 64 x 50 mm is more than 1.25x off the training scans' "
                                "128 x 128 x 100 mm")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="medsyn_site.diffusion.sample"):
            sample_cohort(run, f"cohort:{masks}", tmp_path / f"s-{masks.name}", per_mask=2, sampler="ddim",
                          steps=1, site_key=key)  # two volumes of each geometry: one warning
        warned = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
        if said is None:
            assert warned == []
        else:
            assert len(warned) == 1 and said in warned[0] and str(weights) in warned[0], warned
    # one batch, one shape: the second mask's voxels twice the size (the field twice as large) warns too
    right = Cohort(phantom_cohort).read(Cohort(phantom_cohort).cases[0].id)[1]
    wrong = sitk.Image(right)
    wrong.SetSpacing([2 * s for s in right.GetSpacing()])
    caplog.clear()
    with caplog.at_level("WARNING", logger="medsyn_site.diffusion.sample"):
        sample_mod.Sampler(weights, "ddim", 1, device="cpu").volumes([right, wrong], [0, 1])
    warned = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
    assert len(warned) == 1 and "voxel size 4 x 4 x 5 mm" in warned[0], warned


def test_relocated_nodules_keep_their_contact_with_the_pleura():
    """A box of lung (-850 HU) in a box of soft tissue, by hand: the pleural depth is the distance to
    the box's nearest face, and a nodule touching a face lands against a face again, an interior one
    in the interior, at places that change with the seed."""
    from medsyn_site.diffusion.masks import relocate_nodules
    from medsyn_site.imaging import label_nodules, pleural_depth

    hu = np.full((48, 48, 48), -1000.0)
    hu[4:44, 4:44, 4:44] = 40.0
    hu[12:36, 12:36, 12:36] = -850.0
    z, y, x = np.indices(hu.shape)
    lo, hi = 12, 35
    inside = (np.minimum(z, np.minimum(y, x)) >= lo) & (np.maximum(z, np.maximum(y, x)) <= hi)
    expected = np.where(inside, 1 + np.minimum.reduce([z - lo, hi - z, y - lo, hi - y, x - lo, hi - x]), 0)
    depth = pleural_depth(lung_mask(hu))
    assert np.array_equal(depth, expected)
    mask = np.zeros(hu.shape, np.uint8)
    mask[12:15, 20:23, 20:23] = 1  # against the box's z = 12 face
    mask[22:25, 22:25, 22:26] = 2  # in the middle, 10 voxels from every face
    hu[mask > 0] = 40.0
    places = {1: set(), 2: set()}
    for seed in range(12):
        out = relocate_nodules(mask, hu, np.random.default_rng(seed))
        labels, n = label_nodules(out)
        assert n == 2 and lung_mask(hu)[out > 0].all()
        for lab in (1, 2):
            comp = labels == lab
            value = int(out[comp].max())
            assert comp.sum() == (mask == value).sum()
            assert (depth[comp].min() == 1) == (value == 1), (seed, value, depth[comp].min())
            places[value].add(tuple(np.argwhere(comp).mean(0).round(1)))
    assert len(places[1]) >= 8 and len(places[2]) >= 8


def test_relocated_nodules_never_touch_each_other():
    """125 one-voxel nodules, 4 voxels apart in a lung box by hand: relocated, they stay 125 separate
    nodules (placed side by side, two would become one 26-connected nodule of another size)."""
    from medsyn_site.diffusion.masks import relocate_nodules
    from medsyn_site.imaging import label_nodules

    hu = np.full((48, 48, 48), -1000.0)
    hu[4:44, 4:44, 4:44] = 40.0
    hu[12:36, 12:36, 12:36] = -850.0
    dots = np.zeros(hu.shape, np.uint8)
    dots[14:34:4, 14:34:4, 14:34:4] = 1
    hu[dots > 0] = 40.0
    for seed in range(3):
        out = relocate_nodules(dots, hu, np.random.default_rng(seed))
        assert out.sum() == 125 and label_nodules(out)[1] == 125


def _chest(shape, lung_lo, lung_hi) -> np.ndarray:
    """A box of lung (-850 HU) from ``lung_lo`` to ``lung_hi`` (z, y, x; end excluded) in soft tissue."""
    hu = np.full(shape, -1000.0)
    hu[tuple(slice(2, n - 2) for n in shape)] = 40.0
    hu[tuple(slice(a, b) for a, b in zip(lung_lo, lung_hi))] = -850.0
    return hu


def test_lung_prior_is_the_share_of_scans_with_lung_there(tmp_path):
    """Four scans by hand whose lung boxes are shifted along x by 0..3 voxels: the prior at a voxel is
    the share of boxes that hold it (exactly, at the cohort's own shape). A fifth scan at twice the
    resolution, its box at the first one's relative position, counts as that box."""
    from medsyn_site.data.cohort import CohortWriter
    from medsyn_site.diffusion.masks import lung_prior

    with CohortWriter(tmp_path / "c") as w:
        for k in range(4):
            hu = _chest((12, 24, 24), (3, 6, 6 + k), (9, 18, 14 + k))
            w.add(f"s{k}", patient=f"p{k}", split="train", source="real",
                  image=sitk.GetImageFromArray(hu.astype(np.int16)), mask=sitk.GetImageFromArray(np.zeros(hu.shape, np.uint8)))
    prior = lung_prior(str(tmp_path / "c"), (12, 24, 24))
    x = np.arange(24)
    want = sum(((x >= 6 + k) & (x < 14 + k)).astype(float) for k in range(4)) / 4
    expected = np.zeros((12, 24, 24))
    expected[3:9, 6:18, :] = want
    np.testing.assert_allclose(prior, expected, atol=1e-6)

    # the same first box at twice the resolution (23 x 47 x 47: align-corners positions k / (n - 1) match 2k)
    with CohortWriter(tmp_path / "d") as w:
        for k, (shape, lo, hi) in enumerate([((12, 24, 24), (3, 6, 6), (9, 18, 14)), ((23, 47, 47), (6, 12, 12), (17, 35, 27))]):
            hu = _chest(shape, lo, hi)
            w.add(f"s{k}", patient=f"p{k}", split="train", source="real",
                  image=sitk.GetImageFromArray(hu.astype(np.int16)), mask=sitk.GetImageFromArray(np.zeros(hu.shape, np.uint8)))
    box = np.zeros((12, 24, 24))
    box[3:9, 6:18, 6:14] = 1.0
    np.testing.assert_allclose(lung_prior(str(tmp_path / "d"), (12, 24, 24)), box, atol=1e-6)


def test_relocated_nodules_go_where_the_cohorts_lungs_are():
    """A lung box 24 voxels wide by hand, with a prior (the cohort's share of lung) of 1 in its middle
    8 voxels along x, 0.4 in its first 4 and 0.5 elsewhere: an interior nodule lands with every
    voxel around it in the middle, a pleural one against a face where the share is at least a half
    (over 12 seeds, at several places); without the prior both land elsewhere too."""
    from medsyn_site.diffusion.masks import relocate_nodules
    from medsyn_site.imaging import label_nodules, pleural_depth

    hu = _chest((48, 48, 48), (12, 12, 12), (36, 36, 36))
    mask = np.zeros(hu.shape, np.uint8)
    mask[12:15, 20:23, 20:23] = 1  # against the box's z = 12 face
    mask[22:25, 22:25, 22:25] = 2  # in the middle
    hu[mask > 0] = 40.0
    lungs = lung_mask(hu) | (mask > 0)
    prior = np.where(lungs, 0.5, 0.0)
    prior[:, :, 20:28] = np.where(lungs[:, :, 20:28], 1.0, 0.0)
    prior[:, :, 12:16] = np.where(lungs[:, :, 12:16], 0.4, 0.0)
    depth = pleural_depth(lungs)
    places, astray = {1: set(), 2: set()}, {1: 0, 2: 0}
    for seed in range(12):
        for given in (prior, None):
            out = relocate_nodules(mask, hu, np.random.default_rng(seed), prior=given)
            labels, n = label_nodules(out)
            assert n == 2
            inner, wall = labels == labels[out == 2][0], labels == labels[out == 1][0]
            assert depth[wall].min() == 1 and depth[inner].min() > 1
            xs = np.argwhere(ndimage.binary_dilation(inner, np.ones((3, 3, 3))))[:, 2]
            inner_ok, wall_ok = xs.min() >= 20 and xs.max() < 28, np.argwhere(wall)[:, 2].min() >= 16
            if given is not None:
                assert inner_ok and wall_ok, (seed, xs.min(), xs.max(), np.argwhere(wall)[:, 2].min())
                places[2].add(tuple(np.argwhere(inner).mean(0).round(1)))
                places[1].add(tuple(np.argwhere(wall).mean(0).round(1)))
            else:
                astray[2] += not inner_ok
                astray[1] += not wall_ok
    assert len(places[1]) >= 8 and len(places[2]) >= 8
    assert astray[2] >= 6 and astray[1] >= 1, astray


def test_pleural_nodules_go_where_the_typical_lungs_end_too():
    """This scan's lung box (24 voxels a side) is smaller than the cohort's typical lungs past five of
    its six faces (the prior runs on at 0.9 beyond them) and ends with them only at its z = 12 face:
    against those five faces a nodule touches this scan's pleura but would sit inside the generator's
    lungs. A pleural nodule lands against the z = 12 face only (over 12 seeds, at several places), an
    interior one still where the prior is 1 (the middle 16 voxels). Without the rule about the typical
    wall (a prior < 0.5 beside the nodule) the pleural one lands against another face at seed 1."""
    from medsyn_site.diffusion import masks
    from medsyn_site.imaging import label_nodules, pleural_depth

    hu = _chest((48, 48, 48), (12, 12, 12), (36, 36, 36))
    mask = np.zeros(hu.shape, np.uint8)
    mask[12:15, 20:23, 20:23] = 1  # against the z = 12 face
    mask[22:25, 22:25, 22:25] = 2
    hu[mask > 0] = 40.0
    lungs = lung_mask(hu) | (mask > 0)
    prior = np.zeros(hu.shape)
    prior[12:40, 8:40, 8:40] = 0.9  # the typical lungs: past every face but z = 12
    prior[lungs] = 0.5
    prior[16:32, 16:32, 16:32] = 1.0
    depth = pleural_depth(lungs)
    places = set()
    for seed in range(12):
        out = masks.relocate_nodules(mask, hu, np.random.default_rng(seed), prior=prior)
        labels, n = label_nodules(out)
        assert n == 2
        wall = np.argwhere(labels == labels[out == 1][0])
        assert depth[tuple(wall.T)].min() == 1 and wall[:, 0].min() == 12, (seed, wall.min(0), wall.max(0))
        assert (np.argwhere(out == 2) >= 17).all() and (np.argwhere(out == 2) <= 30).all()
        places.add(tuple(wall.mean(0).round(1)))
    assert len(places) >= 8
