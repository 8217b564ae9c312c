"""Bad inputs and faults, as a site engineer meets them, through the real command line.

One parametrised table: each row builds an input (corrupt scan, wrong key, damaged checkpoint, full
disk, ...), runs one ``medsyn`` command and checks the exit status, a message fragment that names
the file (or option) at fault, that an error is one line without a traceback, and that no file that
existed before was changed (for a failing command: nothing at all was written)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from medsyn_site.cli import main
from medsyn_site.data.cohort import image_path
from medsyn_site.sitekey import new_site_key

from conftest import write_ct_series

TRAIN_CFG = str(Path(__file__).parent / "configs" / "train_test.yaml")


# -- helpers that build bad inputs ------------------------------------------------------------
def _ct(shape_zyx=(12, 32, 32)) -> np.ndarray:
    """A small chest-like volume (HU): air outside, soft tissue, two lungs."""
    y, x = np.ogrid[: shape_zyx[1], : shape_zyx[2]]
    vol = np.full(shape_zyx, -1000, np.int16)
    vol[:, ((y - 16) / 14) ** 2 + ((x - 16) / 15) ** 2 <= 1] = 40
    for cx in (9, 23):
        vol[:, ((y - 16) / 9) ** 2 + ((x - cx) / 5) ** 2 <= 1] = -850
    return vol


def _write(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.5)) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path), useCompression=not path.name.endswith(".nii"))
    return path


def _truncate(path: Path, fraction: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _manifest(folder: Path, rows: list[tuple[str, str]]) -> Path:
    path = folder / "manifest.csv"
    path.write_text("image,mask\n" + "".join(f"{i},{m}\n" for i, m in rows))
    return path


def _site(t: Path) -> Path:
    """A folder of input scans: good.nii.gz + its mask, and an existing cohort at t/out."""
    site = t / "site"
    site.mkdir()
    vol = _ct()
    _write(site / "good.nii.gz", vol)
    mask = np.zeros_like(vol, np.uint8)
    mask[5:8, 14:18, 7:11] = 1
    _write(site / "good_mask.nii.gz", mask)
    return site


def _existing_out(t: Path) -> Path:
    out = t / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result\n")
    return out


def _run_copy(t: Path, run: Path, damage_newest: bool, damage_all: bool = False) -> Path:
    """A copy of the test run with a second, newer checkpoint step_20 (a copy of step_10); its ema.pt
    truncated (damage_newest), or both checkpoints damaged (damage_all)."""
    dst = t / "run"
    shutil.copytree(run, dst)
    ck = dst / "checkpoints"
    shutil.copytree(ck / "step_00000010", ck / "step_00000020")
    (ck / "latest").write_text("step_00000020")
    if damage_newest or damage_all:
        _truncate(ck / "step_00000020" / "ema.pt", 0.5)
    if damage_all:
        _truncate(ck / "step_00000010" / "ema.pt", 0.5)
    return dst


@dataclass
class Ctx:
    tmp: Path
    cohort: Path
    run: Path
    synth: Path
    key: Path
    mp: pytest.MonkeyPatch


# -- the table: name -> (setup(ctx) -> (argv, named, out), exit status, fragment) ---------------
def prepare_row(kind):
    def setup(c: Ctx):
        site = _site(c.tmp)
        out = _existing_out(c.tmp)
        vol = _ct()
        rows = [("good.nii.gz", "good_mask.nii.gz")]
        if kind == "truncated-nii-gz":
            rows.append((_truncate(_write(site / "cut.nii.gz", vol)).name, ""))
        elif kind == "truncated-nii":
            rows.append((_truncate(_write(site / "cut.nii", vol), 0.9).name, ""))
        elif kind == "nan-nii":
            f = vol.astype(np.float32)
            f[3, 10, 10] = np.nan
            rows.append((_write(site / "nan.nii.gz", f).name, ""))
        elif kind == "inf-nrrd":
            f = vol.astype(np.float32)
            f[3, 10, 10] = np.inf
            rows.append((_write(site / "inf.nrrd", f).name, ""))
        elif kind == "truncated-nrrd":
            rows.append((_truncate(_write(site / "cut.nrrd", vol)).name, ""))
        elif kind == "truncated-mask":
            m = np.random.default_rng(0).integers(0, 2, vol.shape).astype(np.uint8)  # the cut-off half
            # would silently read as background
            _write(site / "cutmask.nii.gz", m)
            _truncate(site / "cutmask.nii.gz", 0.5)
            rows = [("good.nii.gz", "cutmask.nii.gz")]
        elif kind == "duplicate-row":
            rows.append(rows[0])
        elif kind == "missing-image":
            rows.append(("nope.nii.gz", ""))
        elif kind == "dicom-short-slice":
            files = write_ct_series(site / "series", vol, (1.0, 1.0, 1.5), (0, 0, 0), (1, 0, 0), (0, 1, 0))
            _truncate(files[3], 0.8)
            rows.append(("series", ""))
        elif kind == "dicom-count":
            import pydicom

            files = write_ct_series(site / "series", vol, (1.0, 1.0, 1.5), (0, 0, 0), (1, 0, 0), (0, 1, 0))
            top = max(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
            for f in files:
                ds = pydicom.dcmread(f)
                ds.ImagesInAcquisition = len(files)
                ds.save_as(f)
            top.unlink()  # the end slice: spacing alone cannot tell
            rows.append(("series", ""))
        man = _manifest(site, rows)
        named = {"truncated-nii-gz": "cut.nii.gz", "truncated-nii": "cut.nii", "nan-nii": "nan.nii.gz",
                 "inf-nrrd": "inf.nrrd", "truncated-nrrd": "cut.nrrd", "truncated-mask": "cutmask.nii.gz",
                 "duplicate-row": str(man), "missing-image": "nope.nii.gz", "dicom-short-slice": "series/",
                 "dicom-count": "series"}[kind]
        return ["data", "prepare", "--manifest", str(man), "--out", str(out), "--force",
                "--site-key", str(c.key)], named, None
    return setup


def row_prepare_good(c):
    site = _site(c.tmp)
    out = c.tmp / "newcohort"
    return ["data", "prepare", "--manifest", str(_manifest(site, [("good.nii.gz", "good_mask.nii.gz")])),
            "--out", str(out), "--site-key", str(c.key)], "", out


def row_prepare_out_exists(c):
    site = _site(c.tmp)
    out = _existing_out(c.tmp)
    return ["data", "prepare", "--manifest", str(_manifest(site, [("good.nii.gz", "")])), "--out", str(out),
            "--site-key", str(c.key)], str(out), None


def row_sample_missing_key(c):
    return ["sample", "--run", str(c.run), "--masks", f"cohort:{c.cohort}", "--out", str(c.tmp / "s"),
            "--site-key", str(c.tmp / "typo.key")], "typo.key", None


def row_sample_default_key_missing(c):
    import medsyn_site.sitekey as sitekey

    c.mp.setattr(sitekey, "DEFAULT_SITE_KEY", c.tmp / "home" / "site.key")
    return ["sample", "--run", str(c.run), "--masks", f"cohort:{c.cohort}", "--out", str(c.tmp / "s")], \
        str(c.tmp / "home" / "site.key"), None


def sample_option(opt, value):
    def setup(c: Ctx):
        return ["sample", "--run", str(c.run), "--masks", f"cohort:{c.cohort}", "--out", str(c.tmp / "s"),
                "--site-key", str(c.key), opt, value], opt, None
    return setup


def row_sample_damaged_latest(c):
    run = _run_copy(c.tmp, c.run, damage_newest=True)
    out = c.tmp / "s"
    return ["sample", "--run", str(run), "--masks", f"cohort:{c.cohort}", "--out", str(out), "--steps", "1",
            "--site-key", str(c.key)], "step_00000020/ema.pt", out


def row_sample_all_damaged(c):
    run = _run_copy(c.tmp, c.run, damage_newest=True, damage_all=True)
    return ["sample", "--run", str(run), "--masks", f"cohort:{c.cohort}", "--out", str(c.tmp / "s"),
            "--steps", "1", "--site-key", str(c.key)], "step_00000010/ema.pt", None


def row_sample_truncated_weights_file(c):
    ema = c.tmp / "ema.pt"
    shutil.copy(c.run / "checkpoints" / "step_00000010" / "ema.pt", ema)
    _truncate(ema, 0.5)
    return ["sample", "--run", str(ema), "--masks", f"cohort:{c.cohort}", "--out", str(c.tmp / "s"),
            "--site-key", str(c.key)], str(ema), None


def row_sample_out_exists(c):
    out = c.tmp / "s"
    shutil.copytree(c.synth, out)
    return ["sample", "--run", str(c.run), "--masks", f"cohort:{c.cohort}", "--out", str(out),
            "--site-key", str(c.key)], str(out), None


def row_train_steps0(c):
    return ["train", "--cohort", str(c.cohort), "--out", str(c.tmp / "r"), "--steps", "0"], "--steps", None


def row_train_resume_damaged(c):
    run = _run_copy(c.tmp, c.run, damage_newest=True)
    return ["train", "--config", TRAIN_CFG, "--cohort", str(c.cohort), "--out", str(run), "--resume",
            "--steps", "12"], "step_00000020/ema.pt", run


def row_train_resume_all_damaged(c):
    run = _run_copy(c.tmp, c.run, damage_newest=True, damage_all=True)
    return ["train", "--config", TRAIN_CFG, "--cohort", str(c.cohort), "--out", str(run), "--resume",
            "--steps", "12"], "step_00000010/ema.pt", None


def row_train_out_exists(c):
    run = c.tmp / "run"
    shutil.copytree(c.run, run)
    return ["train", "--config", TRAIN_CFG, "--cohort", str(c.cohort), "--out", str(run)], str(run), None


def row_train_retry_after_failed_first_checkpoint(c):
    run = c.tmp / "run"
    run.mkdir()
    shutil.copy(c.run / "config.yaml", run / "config.yaml")  # a first run that died before its checkpoint
    return ["train", "--config", TRAIN_CFG, "--cohort", str(c.cohort), "--out", str(run), "--steps", "2"], "", run


def row_publish_wrong_key(c):
    other = new_site_key(c.tmp / "other.key")
    return ["publish", str(c.synth), "--training-cohort", str(c.cohort), "--out", str(c.tmp / "rel"),
            "--site-key", str(other)], "wrong site key", None


def row_publish_nothing_releasable(c):
    syn = c.tmp / "syn"
    shutil.copytree(c.synth, syn)
    for f in (syn / "images").glob("*.nii.gz"):
        f.write_bytes(f.read_bytes() + b"\0")  # changed after sampling: provenance refuses every case
    return ["publish", str(syn), "--training-cohort", str(c.cohort), "--out", str(c.tmp / "rel"),
            "--format", "nifti", "--site-key", str(c.key)], "nothing written", None


def row_publish_out_exists(c):
    out = _existing_out(c.tmp)
    return ["publish", str(c.synth), "--training-cohort", str(c.cohort), "--out", str(out),
            "--site-key", str(c.key)], str(out), None


def row_publish_no_provenance(c):
    syn = c.tmp / "syn"
    shutil.copytree(c.synth, syn)
    (syn / "provenance.json").unlink()
    return ["publish", str(syn), "--training-cohort", str(c.cohort), "--out", str(c.tmp / "rel"),
            "--site-key", str(c.key)], "provenance.json", None


def row_evaluate_stale_hash_leak(c):
    from medsyn_site.data.cohort import Cohort

    syn = c.tmp / "syn"
    shutil.copytree(c.synth, syn)
    test_case = Cohort(c.cohort).split("test")[0].id
    victim = Cohort(syn).cases[0].id
    shutil.copy(image_path(c.cohort, test_case), image_path(syn, victim))  # cohort.json keeps the old sha256
    return ["evaluate", "prepare", "--ws", str(c.tmp / "ws"), "--real", str(c.cohort), "--synthetic", str(syn),
            "--configuration", "2d"], str(image_path(syn, victim)), None


def row_validate_truncated(c):
    coh = c.tmp / "coh"
    shutil.copytree(c.cohort, coh)
    from medsyn_site.data.cohort import Cohort

    victim = image_path(coh, Cohort(coh).cases[0].id)
    _truncate(victim, 0.5)
    return ["data", "validate", str(coh)], str(victim), None


def row_site_key_new_exists(c):
    return ["site-key", "new", str(c.key)], str(c.key), None


def row_plain(args, named):
    return lambda c: ([a.format(tmp=c.tmp) for a in args], named, None)


TABLE = {
    # data prepare: readers check decoded bytes and non-finite values before any cast
    "prepare-good": (row_prepare_good, 0, "wrote cohort"),
    "prepare-truncated-nii-gz": (prepare_row("truncated-nii-gz"), 1, "truncated or corrupt voxel data"),
    "prepare-truncated-nii": (prepare_row("truncated-nii"), 1, "truncated or corrupt voxel data"),
    "prepare-nan-nii": (prepare_row("nan-nii"), 1, "1 NaN or infinite voxel"),
    "prepare-inf-nrrd": (prepare_row("inf-nrrd"), 1, "1 NaN or infinite voxel"),
    "prepare-truncated-nrrd": (prepare_row("truncated-nrrd"), 1, "unreadable image"),
    "prepare-truncated-mask": (prepare_row("truncated-mask"), 1, "truncated or corrupt voxel data"),
    "prepare-duplicate-row": (prepare_row("duplicate-row"), 1, "lines 2 and 3 name the same scan"),
    "prepare-missing-image": (prepare_row("missing-image"), 1, "image not found"),
    "prepare-dicom-short-slice": (prepare_row("dicom-short-slice"), 1, "the header promises"),
    "prepare-dicom-slice-count": (prepare_row("dicom-count"), 1, "ImagesInAcquisition says"),
    "prepare-out-exists": (row_prepare_out_exists, 1, "already exists; pass --force"),
    # site keys
    "sample-key-typo": (row_sample_missing_key, 2, "no site key there"),
    "sample-default-key-missing": (row_sample_default_key_missing, 1, "site key not found"),
    "site-key-new-exists": (row_site_key_new_exists, 1, "a site key exists already"),
    "publish-wrong-key": (row_publish_wrong_key, 1, "no entry verifies with"),
    # option ranges
    "sample-steps-0": (sample_option("--steps", "0"), 2, "0 is not in the range x>=1"),
    "sample-steps-negative": (sample_option("--steps", "-2"), 2, "-2 is not in the range x>=1"),
    "sample-per-mask-0": (sample_option("--per-mask", "0"), 2, "is not in the range"),
    "sample-batch-size-0": (sample_option("--batch-size", "0"), 2, "is not in the range"),
    "train-steps-0": (row_train_steps0, 2, "is not in the range"),
    "phantom-cases-0": (row_plain(["data", "phantom", "--out", "{tmp}/ph", "--cases", "0"], "--cases"), 2,
                        "is not in the range"),
    "evaluate-seeds-0": (row_plain(["evaluate", "prepare", "--ws", "{tmp}/ws", "--real", "{tmp}",
                                    "--seeds", "0"], "--seeds"), 2, "is not in the range"),
    # checkpoints: checksums, the file named, fallback to the newest intact one
    "sample-damaged-latest-falls-back": (row_sample_damaged_latest, 0, "using the newest intact checkpoint"),
    "sample-all-checkpoints-damaged": (row_sample_all_damaged, 1, "checksum differs"),
    "sample-truncated-weights-file": (row_sample_truncated_weights_file, 1, "unreadable checkpoint file"),
    "train-resume-damaged-latest-falls-back": (row_train_resume_damaged, 0, "using the newest intact checkpoint"),
    "train-resume-all-damaged": (row_train_resume_all_damaged, 1, "no intact checkpoint is left"),
    "train-retry-after-failed-first-checkpoint": (row_train_retry_after_failed_first_checkpoint, 0, "trained"),
    # --out checked before long work; zero-case release is an error
    "sample-out-exists": (row_sample_out_exists, 1, "already exists; pass --force"),
    "train-out-exists": (row_train_out_exists, 1, "already exists; pass --force"),
    "publish-out-exists": (row_publish_out_exists, 1, "already exists; pass --force"),
    "publish-nothing-releasable": (row_publish_nothing_releasable, 1, "case(s) refused"),
    "publish-no-provenance": (row_publish_no_provenance, 1, "missing (only data made by `medsyn sample`"),
    # the leak check hashes the files, not cohort.json
    "evaluate-stale-hash-leak": (row_evaluate_stale_hash_leak, 1, "identical to real test case"),
    "validate-truncated-image": (row_validate_truncated, 1, "problem(s)"),
}


def _snapshot(*roots: Path) -> dict[Path, str]:
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for r in roots if r.exists()
            for f in r.rglob("*") if f.is_file()}


@pytest.mark.parametrize("name", list(TABLE))
def test_bad_input_table(name, tmp_path, phantom_cohort, run, synth, key, monkeypatch, caplog):
    setup, status, fragment = TABLE[name]
    tmp = tmp_path / "t"
    tmp.mkdir()
    c = Ctx(tmp, phantom_cohort, run, synth, key, monkeypatch)
    argv, named, out = setup(c)
    shared = (phantom_cohort, run, synth, key.parent)
    before = _snapshot(tmp, *shared)
    res = CliRunner().invoke(main, argv)
    said = res.output + caplog.text
    assert res.exit_code == status, f"{argv}\n{said[-3000:]}"
    assert fragment in said and named in said, said[-3000:]
    after = _snapshot(tmp, *shared)
    if status == 0:  # new files only inside the output; nothing outside it changed
        assert {f: h for f, h in after.items() if out not in f.parents} == \
            {f: h for f, h in before.items() if out not in f.parents}
    else:
        assert isinstance(res.exception, SystemExit) and "Traceback" not in said, said[-3000:]
        error_lines = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
        assert len(error_lines) == 1, res.output  # one line
        assert after == before, "an error changed or wrote files"


# -- errors that are not the toolkit's keep their traceback ----------------------------------
def test_bug_keeps_traceback_and_hint(monkeypatch, tmp_path):
    import medsyn_site.data.phantom as phantom

    def broken(*a, **kw):
        return 1 / 0
    monkeypatch.setattr(phantom, "write_phantom_cohort", broken)
    res = CliRunner().invoke(main, ["data", "phantom", "--out", str(tmp_path / "p")])
    assert isinstance(res.exception, ZeroDivisionError)  # not turned into a one-line message
    assert any("may be a bug" in n for n in res.exception.__notes__)


def test_cuda_oom_keeps_its_type_and_the_stream_hint(run, monkeypatch):
    import torch

    from medsyn_site.diffusion.sample import Sampler, resolve_weights

    gen = Sampler(resolve_weights(run), "ddim", 1, "cpu")

    def oom(**kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
    monkeypatch.setattr(gen.inferer, "sample", oom)
    m = sitk.Image(16, 16, 16, sitk.sitkUInt8)
    with pytest.raises(torch.OutOfMemoryError) as err:
        gen.volumes([m, m], [0, 1])
    assert any("--stream-gb" in n and "--batch-size 1" in n for n in err.value.__notes__)
    res = CliRunner().invoke(main, ["sample", "--help"])  # the CLI adds no bug hint to an OOM
    assert res.exit_code == 0


# -- a full disk: a real small tmpfs ---------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 6 MiB tmpfs (root, or password-less sudo); skipped where mounting is impossible."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    r = subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", f"size=6m,uid={os.getuid()}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill ({r.stderr.strip()}): needs root or password-less sudo")
    yield mnt
    subprocess.run([*sudo, "umount", "-l", str(mnt)], check=False)


def _fill(fs: Path, leave: int) -> Path:
    """Fill the file system up to ``leave`` bytes free."""
    filler = fs / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(fs).free - leave))
    return filler


def test_full_disk_phantom_one_line_nothing_left(small_fs):
    _fill(small_fs, 200 * 1024)
    before = _snapshot(small_fs)
    res = CliRunner().invoke(main, ["data", "phantom", "--out", str(small_fs / "ph"), "--cases", "3",
                                     "--shape", "48", "48", "32"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output[-2000:]
    line = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert len(line) == 1 and str(small_fs / "ph") in line[0] and "free there" in line[0], res.output[-2000:]
    assert _snapshot(small_fs) == before  # the staging folder is gone too


def test_full_disk_train_names_checkpoint_then_retries_without_force(small_fs, phantom_cohort):
    filler = _fill(small_fs, 1024 * 1024)  # room for config, metrics, previews; not a 3 MB checkpoint
    args = ["train", "--config", TRAIN_CFG, "--cohort", str(phantom_cohort), "--out", str(small_fs / "run"),
            "--steps", "10"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output[-2000:]
    assert "checkpoint step_00000010 needs about" in res.output and "free there" in res.output
    filler.unlink()  # the site frees space and runs the same command again: no --force needed
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output[-2000:]


def test_full_disk_inside_a_library_write_names_the_file(small_fs):
    """torch's own message for ENOSPC is "unexpected pos ..."; atomic_write names the file instead."""
    import torch

    from medsyn_site.atomic import atomic_write
    from medsyn_site.errors import DiskError

    _fill(small_fs, 64 * 1024)
    target = small_fs / "weights.pt"
    with pytest.raises(DiskError, match=f"{target}: could not be written, the disk is full"):
        atomic_write(target, lambda p: torch.save(torch.zeros(2 ** 20), p))
    assert not target.exists() and not list(small_fs.glob(".tmp-*"))
