"""Red team for the publication gate: disguised copies of training scans, planted into a synthetic
cohort and signed with the site key exactly as a memorizing model's output would be, must all be
refused; novel phantom scans (never trained on, planted the same way) must pass (<= 5 % refused)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medsyn_site import provenance
from medsyn_site.config import PhantomConfig, SplitConfig
from medsyn_site.data.cohort import Cohort, CohortWriter
from medsyn_site.data.phantom import make_case, write_phantom_cohort
from medsyn_site.diffusion.masks import relocate_nodules
from medsyn_site.publish.release import publish
from medsyn_site.sitekey import load_site_key

SHAPE = (64, 64, 40)


def _fit(a, shape, cval=-1024.0):
    out = np.full(shape, cval, np.float32)
    src = tuple(slice(max(0, (n - s) // 2), max(0, (n - s) // 2) + min(n, s)) for n, s in zip(a.shape, shape))
    dst = tuple(slice(max(0, (s - n) // 2), max(0, (s - n) // 2) + min(n, s)) for n, s in zip(a.shape, shape))
    out[dst] = a[src]
    return out


def _shift(a, d):
    return ndimage.shift(a, d, order=0, cval=-1024)


def _rotate(a, deg, axes=(1, 2)):
    return ndimage.rotate(a, deg, axes=axes, reshape=False, order=1, cval=-1024)


def _zoom(a, f):
    return _fit(ndimage.zoom(a, f, order=1), a.shape)


def disguises(hu: np.ndarray, rng) -> dict[str, np.ndarray]:
    """14 kinds of disguised copies of one scan (z, y, x HU)."""
    hu = hu.astype(np.float32)
    noise = lambda a, s: a + rng.normal(0, s, a.shape).astype(np.float32)  # noqa: E731
    return {
        "flip-x": np.flip(hu, 2), "flip-y+z": np.flip(hu, (0, 1)), "flip-all": np.flip(hu, (0, 1, 2)),
        "roll-z (wrapped)": np.roll(hu, 13, 0),
        "shift 1/4 of the field": _shift(hu, (3, 14, -16)), "shift, cut": _shift(hu, (4, -9, 12)),
        "rotate 7 deg axial": _rotate(hu, 7), "rotate 5 deg coronal": _rotate(hu, -5, (0, 1)),
        "zoom 1.1": _zoom(hu, 1.1), "zoom 0.9": _zoom(hu, 0.9),
        "noise 40 HU": noise(hu, 40), "intensity 0.85x+70": hu * 0.85 + 70,
        "flip+shift+noise": noise(_shift(np.flip(hu, 2), (2, 7, -6)), 30),
        "rotate+zoom+intensity": _zoom(_rotate(hu, -6), 1.07) * 1.1 - 40,
        "flip+rotate+noise": noise(_rotate(np.flip(hu, 1), 5), 25),
    }


def plant(root, cases: dict[str, np.ndarray], masks: dict[str, np.ndarray], key: bytes,
          ref: sitk.Image | dict[str, sitk.Image], training_cohort):
    """A synthetic cohort holding CASES (geometry from ``ref``, or per case), with a provenance.json
    signed with the site key."""
    with CohortWriter(root, description="red team: a memorizing model's output") as w:
        for cid, hu in cases.items():
            img = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
            msk = sitk.GetImageFromArray(masks[cid].astype(np.uint8))
            for im in (img, msk):
                im.CopyInformation(ref[cid] if isinstance(ref, dict) else ref)
            w.add(cid, patient=cid, split="train", source="synthetic", image=img, mask=msk)
    header = {"checkpoint_sha256": "0" * 64, "sampler": "ddim", "steps": 50, "seed": 0, "mask_source": "relocate",
              "training_cohort": provenance.cohort_identity(training_cohort) if training_cohort else None}
    entries = [{"case": r.id, "image_sha256": r.sha256["image"], "mask_sha256": r.sha256["mask"], "seed": 0,
                "mask_source_id": "src-x", "mask_mode": "relocated"} for r in Cohort(root).cases]
    provenance.write(root, header, entries, key)


@pytest.mark.slow
def test_disguised_copies_refused_novel_scans_released(tmp_path):
    train_dir = tmp_path / "site"
    write_phantom_cohort(PhantomConfig(cases=10, seed=7, shape=SHAPE), SplitConfig(), train_dir)
    site = Cohort(train_dir)
    key_file = tmp_path / "site.key"
    key = load_site_key(key_file, create=True)
    rng = np.random.default_rng(0)
    train = site.split("train")
    ref = site.read(train[0].id)[0]
    cases, masks, kinds = {}, {}, {}
    for i, rec in enumerate(train[:2]):  # every disguise of two training scans
        hu = site.arrays(rec.id)[0]
        other = site.arrays(train[(i + 1) % len(train)].id)[1]  # an unrelated mask, relocated into the copy
        for j, (kind, arr) in enumerate(disguises(hu, rng).items()):
            cid = f"syn-copy-{i}-{j:02d}"
            cases[cid], kinds[cid] = arr, f"{kind} of {rec.id}"
            masks[cid] = relocate_nodules(other, np.clip(arr, -1024, 3071), rng)
    novel = [make_case(PhantomConfig(shape=SHAPE), 90_000 + k) for k in range(20)]  # never trained on
    for k, c in enumerate(novel):
        cid = f"syn-novel-{k:02d}"
        cases[cid], masks[cid] = c.image.astype(np.float32), relocate_nodules(c.mask, c.image, rng)
    plant(tmp_path / "syn", cases, masks, key, ref, train_dir)

    report = publish(tmp_path / "syn", train_dir, tmp_path / "release", fmt="nifti", site_key=key_file)
    refused = {c["case"]: c["reasons"] for c in report["cases"] if c["reasons"]}
    copies = [c for c in cases if "copy" in c]
    novel_ids = [c for c in cases if "novel" in c]
    copies_refused = [c for c in copies if c in refused]
    novel_refused = [c for c in novel_ids if c in refused]
    by_case = {c["case"]: c for c in report["cases"]}
    for c in copies:
        s = by_case[c]["scores"]
        print(f"{kinds[c]:42s} global {s['global']:.3f} local {s['local']:.3f} nearest {s['nearest']} "
              f"{'REFUSED' if c in refused else 'RELEASED'}")
    print(f"red team: {len(copies_refused)}/{len(copies)} disguised copies refused "
          f"({100 * len(copies_refused) / len(copies):.0f} %); {len(novel_refused)}/{len(novel_ids)} novel scans "
          f"refused ({100 * len(novel_refused) / len(novel_ids):.0f} %); thresholds "
          f"global {report['calibration']['global']['threshold']:.3f} local {report['calibration']['local']['threshold']:.3f}")
    assert len(set(kinds[c].split(" of ")[0] for c in copies)) >= 10
    assert all(all("memorization audit" in r for r in refused[c]) for c in copies_refused)
    # every copy found, and attributed to the scan it copies
    assert copies_refused == copies, [kinds[c] for c in copies if c not in refused]
    assert all(by_case[c]["scores"]["nearest"] == kinds[c].split(" of ")[-1] for c in copies)
    assert len(novel_refused) <= 0.05 * len(novel_ids), {c: refused[c] for c in novel_refused}
    # the privacy report names each case's nearest training scan, best disguise and the thresholds
    md = (tmp_path / "release" / "audit" / "privacy.md").read_text()
    assert "false-alarm" in md and all(c in md for c in cases)
    assert (tmp_path / "release" / "audit" / "scores.png").stat().st_size > 1000
    cal = json.loads((tmp_path / "release" / "audit" / "audit.json").read_text())["calibration"]
    assert cal["null_n"] == len(site.cases) and 0 < cal["global"]["false_alarm_fit"] < 0.05
    # the training features were cached beside the cohort and are reused
    assert len(list((train_dir / ".medsyn-audit").glob("features-*.npz"))) == 1


def test_publish_refuses_another_training_cohort(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root, seed in ((a, 1), (b, 2)):
        write_phantom_cohort(PhantomConfig(cases=4, seed=seed, shape=(32, 32, 24)), SplitConfig(), root)
    key_file = tmp_path / "site.key"
    key = load_site_key(key_file, create=True)
    ref, hu = Cohort(a).read(Cohort(a).cases[0].id)[0], Cohort(a).arrays(Cohort(a).cases[0].id)
    plant(tmp_path / "syn", {"syn-1": hu[0]}, {"syn-1": hu[1]}, key, ref, a)
    with pytest.raises(provenance.ProvenanceError, match="not the cohort the model was trained on"):
        publish(tmp_path / "syn", b, tmp_path / "r1", fmt="nifti", site_key=key_file)
    assert not (tmp_path / "r1").exists()
    plant(tmp_path / "syn2", {"syn-1": hu[0]}, {"syn-1": hu[1]}, key, ref, None)
    with pytest.raises(provenance.ProvenanceError, match="records no training cohort"):
        publish(tmp_path / "syn2", a, tmp_path / "r2", fmt="nifti", site_key=key_file)
    # the identity follows the files: a changed image changes it
    before = provenance.cohort_identity(a)
    path = a / "images" / f"{Cohort(a).cases[0].id}.nii.gz"
    path.write_bytes(path.read_bytes() + b"")
    assert provenance.cohort_identity(a) == before
    sitk.WriteImage(sitk.GetImageFromArray(hu[0] + 1), str(path))
    assert provenance.cohort_identity(a) != before


def test_spectrum_is_numpys_fft_of_the_zero_padded_array():
    """The axis-by-axis transform of a small array at the origin equals numpy's FFT of it padded."""
    from medsyn_site.publish.audit import spectrum

    a = np.random.default_rng(0).normal(size=(5, 7, 4)).astype(np.float32)
    padded = np.zeros((12, 10, 9), np.float32)
    padded[:5, :7, :4] = a
    np.testing.assert_allclose(spectrum(a, padded.shape), np.fft.rfftn(padded), rtol=1e-4, atol=1e-4)


def test_search_on_two_processes_gives_the_same_scores():
    """nearest_many on 2 worker processes = the same search in this process (order and values)."""
    from medsyn_site.publish import audit

    cases = [make_case(PhantomConfig(shape=(48, 48, 32)), seed) for seed in (1, 2, 3)]
    feats = [audit.Features.of(c.image, c.spacing) for c in cases]
    bank = audit.Bank(["a", "b"], feats[:2])
    jobs = [(feats[2], None), (feats[0], "a")]
    one = audit.nearest_many(jobs, bank, workers=1)
    two = audit.nearest_many(jobs, bank, workers=2)
    assert json.dumps(one, default=str) == json.dumps(two, default=str)
    assert one[1]["nearest"] == "b"  # 'a' excluded


def test_workers_that_cannot_start_give_an_error_not_a_hang(tmp_path):
    """A script that calls the audit without an ``if __name__ == "__main__":`` guard: each spawned
    worker re-runs it while starting and dies. Before, the parent waited forever on the pipe that
    hands a worker its start-up data; now it says what happened and what to do."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import numpy as np\n"
        "from medsyn_site.publish import audit\n"
        "rng = np.random.default_rng(0)\n"
        "feats = [audit.Features(rng.normal(size=(20, 20, 20)).astype('f4'), rng.normal(size=(40, 40, 40)).astype('f4'))\n"
        "         for _ in range(3)]\n"  # ~0.8 MB of bank: more than a pipe holds
        "audit.nearest_many([(feats[0], None), (feats[1], None)], audit.Bank(['a', 'b', 'c'], feats), workers=2)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    # the error's one line (the dying workers' own tracebacks share stderr and may come after it)
    line = next((x for x in r.stderr.splitlines() if "worker processes ended abruptly" in x), r.stderr[-2000:])
    assert '__name__ == "__main__"' in line and "--workers 1" in line, line


def test_box_sums_and_the_patch_search_against_brute_force():
    """box_sums = the sum over every k^3 cube (brute force); the coarse-to-fine patch search finds a
    region moved by 10 voxels exactly (score 1) when its radius covers the move, and not when it does
    not; a region with no copy scores well below 1."""
    from medsyn_site.publish.audit import box_sums, patch_scores

    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 8, 7))
    bs = box_sums(x, 3)
    brute = np.array([[[x[i:i + 3, j:j + 3, k:k + 3].sum() for k in range(5)] for j in range(6)] for i in range(7)])
    np.testing.assert_allclose(bs, brute, atol=1e-9)
    b = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 1.5).astype(np.float32)
    b /= b.std()
    a = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 1.5).astype(np.float32)  # unrelated lungs
    a /= a.std()
    a[10:30, 10:30, 10:30] = b[20:40, 10:30, 0:20]  # a copied region, moved by (+10, 0, -10)
    inside = patch_scores(a[10:30, 10:30, 10:30], b, 10, shift=(20, 10, 0), radius=0)  # the alignment says where
    assert inside.size and np.allclose(inside, 1.0, atol=1e-4), inside
    found = patch_scores(a, b, 10, radius=12)
    missed = patch_scores(a, b, 10, radius=2)
    assert found.max() > 0.999 and missed.max() < 0.9, (found.max(), missed.max())
    assert np.sort(found)[: found.size // 2].max() < 0.9  # the unrelated part matches nothing well


def test_a_large_bank_is_ranked_first_and_the_copy_still_found():
    """A bank larger than retrieval_keep is ranked on a 2x coarser grid first: a disguised copy's
    source must survive that ranking (here 2 kept of 6) and score as it does without it."""
    from medsyn_site.publish import audit

    cases = [make_case(PhantomConfig(shape=(48, 48, 32)), seed) for seed in range(6)]
    p = audit.AuditParams()
    feats = [audit.Features.of(c.image, c.spacing, p) for c in cases]
    copy = _shift(np.flip(cases[4].image.astype(np.float32), 2), (1, 3, -2))
    f = audit.Features.of(copy, cases[4].spacing, p)
    ids = [f"t{i}" for i in range(6)]
    full = audit.nearest(f, audit.Bank(ids, feats, p))
    ranked = audit.nearest(f, audit.Bank(ids, feats, p.model_copy(update={"retrieval_keep": 2})))
    assert full["nearest"] == ranked["nearest"] == "t4" and ranked["global"] > 0.6, (full, ranked)
    assert ranked["global"] == pytest.approx(full["global"], abs=1e-6)


def test_a_cohort_of_training_scans_only_calibrates_on_unseen_cohorts(tmp_path):
    """``training_bank(unseen=...)``: a cohort with no val/test scans cannot calibrate alone; given a
    cohort of real scans the model never saw, every one of those joins the null as held-out, each
    training scan as left-out, and the cache is keyed apart from the cohort's own."""
    from medsyn_site.errors import MedsynError
    from medsyn_site.publish import audit

    ph = PhantomConfig(shape=(40, 40, 24), max_nodules=1)
    all_train = SplitConfig(train=1.0, val=0.0)
    write_phantom_cohort(ph.model_copy(update={"cases": 3, "seed": 1}), all_train, tmp_path / "train")
    write_phantom_cohort(ph.model_copy(update={"cases": 2, "seed": 2}), all_train, tmp_path / "other")
    train, other = Cohort(tmp_path / "train"), Cohort(tmp_path / "other")
    with pytest.raises(MedsynError, match="held-out"):
        audit.training_bank(train)
    bank, null, cache = audit.training_bank(train, unseen=(other,), workers=1)
    assert bank.ids == [r.id for r in train.cases]
    assert sorted((s["case"], s["kind"]) for s in null) == sorted(
        [(f"other/{r.id}", "held-out") for r in other.cases] + [(r.id, "train, leave-one-out") for r in train.cases])
    assert cache.name != f"features-{audit.cohort_key(train, audit.AuditParams())[:24]}.npz"
