"""The cohort contract: every bad input is reported with the file it is about; outputs are atomic."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medsyn_site.atomic import OutputExistsError, staged_dir
from medsyn_site.data.cohort import Cohort, CohortWriter, image_path, mask_path, validate_cohort


def _messages(root):
    return [str(p) for p in validate_cohort(root)]


def _rewrite(path, fn, pixel_type=None):
    """Change an image's voxels or geometry in place (without updating cohort.json)."""
    im = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(im)
    out = fn(arr, im)
    if isinstance(out, np.ndarray):
        new = sitk.GetImageFromArray(out)
        new.SetSpacing(im.GetSpacing())
        new.SetOrigin(im.GetOrigin())
        new.SetDirection(im.GetDirection())
        out = new
    sitk.WriteImage(out, str(path), useCompression=True)


def test_fresh_phantom_cohort_is_valid(phantom_cohort):
    assert validate_cohort(phantom_cohort) == []
    cohort = Cohort(phantom_cohort)
    assert {c.split for c in cohort.cases} == {"train", "val", "test"}
    image, mask = cohort.arrays(cohort.cases[0].id)
    assert image.dtype == np.int16 and mask.dtype == np.uint8 and image.shape == mask.shape


def test_missing_files(cohort_copy):
    case = Cohort(cohort_copy).cases[0].id
    image_path(cohort_copy, case).unlink()
    mask_path(cohort_copy, Cohort(cohort_copy).cases[1].id).unlink()
    msgs = _messages(cohort_copy)
    assert any(f"images/{case}.nii.gz: missing image file" in m for m in msgs)
    assert any("masks/" in m and "missing mask file" in m for m in msgs)


@pytest.mark.parametrize("what, change, expect", [
    ("spacing", lambda im: im.SetSpacing((2.0, 2.0, 3.0)), "spacing"),
    ("origin", lambda im: im.SetOrigin((5.0, 0.0, 0.0)), "origin"),
    ("direction", lambda im: im.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1)), "direction"),
])
def test_geometry_mismatch_names_the_mask(cohort_copy, what, change, expect):
    case = Cohort(cohort_copy).cases[0].id
    def edit(arr, im):
        change(im)
        return im
    _rewrite(mask_path(cohort_copy, case), edit)
    msgs = _messages(cohort_copy)
    assert any(f"masks/{case}.nii.gz" in m and f"{expect}" in m and "differs from the image" in m
               for m in msgs), msgs


def test_shape_mismatch(cohort_copy):
    case = Cohort(cohort_copy).cases[0].id
    _rewrite(mask_path(cohort_copy, case), lambda a, im: np.ascontiguousarray(a[:, :, :-2]))
    assert any(f"masks/{case}.nii.gz: shape" in m for m in _messages(cohort_copy))


def test_mask_values_other_than_0_1(cohort_copy):
    case = Cohort(cohort_copy).cases[0].id
    def labels(arr, im):
        arr[0, 0, 0] = 2
        return arr
    _rewrite(mask_path(cohort_copy, case), labels)
    msgs = _messages(cohort_copy)
    assert any(f"masks/{case}.nii.gz: mask values {{0, 1, 2}}" in m or
               f"masks/{case}.nii.gz: mask values {{0, 2}}" in m for m in msgs), msgs


def test_nan_and_implausible_hu(cohort_copy):
    cases = Cohort(cohort_copy).cases
    def nan(arr, im):
        arr = arr.astype(np.float32)
        arr[1, 2, 3] = np.nan
        arr[1, 2, 4] = np.inf
        return arr
    def hot(arr, im):
        arr[0, 0, 0] = 20000
        return arr
    _rewrite(image_path(cohort_copy, cases[0].id), nan)
    _rewrite(image_path(cohort_copy, cases[1].id), hot)
    msgs = _messages(cohort_copy)
    assert any(f"images/{cases[0].id}.nii.gz: 2 NaN or infinite voxels" in m for m in msgs), msgs
    assert any(f"images/{cases[1].id}.nii.gz: intensities" in m and "outside the plausible HU" in m
               for m in msgs), msgs


def test_duplicates_split_leak_and_sha256(cohort_copy):
    index = cohort_copy / "cohort.json"
    doc = json.loads(index.read_text())
    doc["cases"].append(dict(doc["cases"][0]))  # duplicate id
    other = next(c for c in doc["cases"][1:] if c["split"] != doc["cases"][0]["split"])
    other["patient"] = doc["cases"][0]["patient"]  # one patient in two splits
    doc["cases"][2]["sha256"]["image"] = "0" * 64
    index.write_text(json.dumps(doc))
    msgs = _messages(cohort_copy)
    assert any(f"duplicate case id {doc['cases'][0]['id']!r}" in m for m in msgs)
    assert any(f"patient {doc['cases'][0]['patient']!r} appears in several splits" in m for m in msgs)
    assert any(f"images/{doc['cases'][2]['id']}.nii.gz: sha256 does not match" in m for m in msgs)


def test_unlisted_file_and_broken_index(cohort_copy):
    shutil.copy(image_path(cohort_copy, Cohort(cohort_copy).cases[0].id), cohort_copy / "images" / "stray.nii.gz")
    assert any("images/stray.nii.gz: file is not listed" in m for m in _messages(cohort_copy))
    (cohort_copy / "cohort.json").write_text("{not json")
    msgs = _messages(cohort_copy)
    assert len(msgs) == 1 and "cohort.json" in msgs[0] and "not valid JSON" in msgs[0]


def test_writer_refuses_existing_output_and_keeps_it(phantom_cohort, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(phantom_cohort, out)
    before = (out / "cohort.json").read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        with CohortWriter(out):
            pass
    assert (out / "cohort.json").read_bytes() == before


def test_failed_write_leaves_previous_output_untouched(phantom_cohort, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(phantom_cohort, out)
    before = sorted(p.name for p in out.rglob("*"))
    img, msk = Cohort(out).read(Cohort(out).cases[0].id)
    with pytest.raises(RuntimeError, match="boom"):
        with CohortWriter(out, force=True) as w:
            w.add("new", patient="p", split="train", source="real", image=img, mask=msk)
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no staging folder left behind


def test_force_replaces_atomically(tmp_path):
    out = tmp_path / "o"
    with staged_dir(out) as d:
        (d / "a").write_text("1")
    with staged_dir(out, force=True) as d:
        (d / "b").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_hostile_release_is_refused_before_any_voxel_is_read(cohort_copy, tmp_path):
    """What the central side checks in a release before reading voxels (release_problems), each
    attack made by hand: a header claiming 2.7 x 10^13 voxels, a gzip bomb (a valid 16-voxel header whose
    stream inflates to 64 MB), a wrong voxel type, a shape unlike cohort.json's, an unlisted file.
    `medsyn evaluate prepare` refuses such a release in one line."""
    import gzip
    import tracemalloc

    import nibabel as nib

    from medsyn_site.config import PhantomConfig, SplitConfig
    from medsyn_site.data.cohort import release_problems
    from medsyn_site.data.phantom import write_phantom_cohort
    from medsyn_site.evaluate.datasets import EvaluationError, prepare_workspace

    assert release_problems(cohort_copy) == []
    c = Cohort(cohort_copy).cases
    huge = nib.load(image_path(cohort_copy, c[0].id))
    hdr = huge.header.copy()
    hdr.set_data_shape((30_000, 30_000, 30_000))
    raw = gzip.decompress(image_path(cohort_copy, c[0].id).read_bytes())
    image_path(cohort_copy, c[0].id).write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))
    small = nib.Nifti1Image(np.zeros(tuple(c[1].shape), np.int16), np.eye(4))
    bomb = small.header.binaryblock + b"\0" * 4 + b"\0" * (64 << 20)
    image_path(cohort_copy, c[1].id).write_bytes(gzip.compress(bomb, 9))
    nib.save(nib.Nifti1Image(np.zeros(tuple(c[2].shape), np.float64), np.eye(4)), image_path(cohort_copy, c[2].id))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), mask_path(cohort_copy, c[3].id))
    shutil.copy(mask_path(cohort_copy, c[4].id), cohort_copy / "masks" / "extra.nii.gz")
    tracemalloc.start()
    problems = [str(p) for p in release_problems(cohort_copy)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print("\n".join(problems), f"\npeak Python memory {peak / 2 ** 20:.1f} MiB")
    expect = [(image_path(cohort_copy, c[0].id), "header claims 30000x30000x30000 voxels"),
              (image_path(cohort_copy, c[1].id), "gzip stream expands beyond"),
              (image_path(cohort_copy, c[2].id), "image voxels are float64, expected int16"),
              (mask_path(cohort_copy, c[3].id), "shape (4, 4, 4) differs from cohort.json's"),
              (cohort_copy / "masks" / "extra.nii.gz", "file is not listed in cohort.json")]
    for path, what in expect:
        assert any(m.startswith(str(path)) and what in m for m in problems), (path, what, problems)
    assert len(problems) == len(expect)
    assert peak < 16 * 2 ** 20  # the bomb was never inflated in memory, nor the huge volume allocated
    # validate_cohort (the site's own check) does not read the unsafe files either
    assert any("gzip stream expands beyond" in str(p) for p in validate_cohort(cohort_copy))
    real = write_phantom_cohort(PhantomConfig(cases=2, shape=(32, 32, 24)), SplitConfig(train=1.0, val=0.0),
                                tmp_path / "real")  # no test split: nothing to leak into
    with pytest.raises(EvaluationError) as e:
        prepare_workspace(tmp_path / "ws", real, synthetic=cohort_copy)
    assert "header claims" in str(e.value) and "4 more problem(s)" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ws").exists()
