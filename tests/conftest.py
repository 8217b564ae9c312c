"""Shared fixtures: a small phantom cohort and a DICOM CT series writer (independent of the
package's own code, so the readers are tested against geometry the test sets by hand)."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medsyn_site.config import PhantomConfig, SplitConfig
from medsyn_site.data.phantom import write_phantom_cohort

PHI = {"PatientName": "DOE^JANE", "PatientID": "MRN-4711-XYZ", "StudyDate": "20190314",
       "PatientBirthDate": "19580102", "AccessionNumber": "ACC998877"}


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory) -> Path:
    """A 5-case phantom cohort at 64x64x40 (written once; tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("cohorts") / "phantom"
    write_phantom_cohort(PhantomConfig(cases=5, seed=3, shape=(64, 64, 40)), SplitConfig(), out)
    return out


@pytest.fixture(scope="session")
def run(phantom_cohort, tmp_path_factory) -> Path:
    """A diffusion run trained for 10 steps on the phantom cohort (the smallest test model)."""
    from medsyn_site.config import load_config
    from medsyn_site.diffusion.train import train

    out = tmp_path_factory.mktemp("runs") / "run"
    train(load_config(Path(__file__).parent / "configs" / "train_test.yaml", {"train.steps": 10}), phantom_cohort, out)
    return out


@pytest.fixture(scope="session")
def key(tmp_path_factory) -> Path:
    from medsyn_site.sitekey import new_site_key

    return new_site_key(tmp_path_factory.mktemp("keys") / "site.key")


@pytest.fixture(scope="session")
def synth(run, phantom_cohort, key, tmp_path_factory) -> Path:
    """Synthetic volumes sampled from that run, conditioned on relocated train masks."""
    from medsyn_site.diffusion.sample import sample_cohort

    out = tmp_path_factory.mktemp("synth") / "syn"
    with one_torch_thread():  # the bytes depend on the thread count; the shard and Slurm tests compare them
        sample_cohort(run, f"relocate:{phantom_cohort}", out, sampler="ddim", steps=4, seed=1, site_key=key)
    return out


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`medsyn demo` as the README runs it (the console script), at test size: every stage, and an
    evaluation whose nnU-Net learns. Run once; the CLI and evaluator tests read its outputs.
    Returns (output folder, the finished process)."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("medsyn")
    out = tmp_path_factory.mktemp("demo") / "demo"
    config = Path(__file__).parent / "configs" / "demo_test.yaml"
    proc = subprocess.run([str(exe), "demo", "--out", str(out), "--config", str(config)], capture_output=True,
                          text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@contextlib.contextmanager
def one_torch_thread():
    """CPU float reductions (and so sampled volumes, byte for byte) depend on torch's thread count,
    which any test may have changed (the trainer sets its own): sample at 1 thread, like a Slurm task."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def cohort_copy(phantom_cohort, tmp_path) -> Path:
    dst = tmp_path / "cohort"
    shutil.copytree(phantom_cohort, dst)
    return dst


def write_ct_series(folder: Path, volume_zyx: np.ndarray, spacing_xyz, origin, row, col,
                    slice_thickness: float = 9.9, series_uid: str | None = None) -> list[Path]:
    """Write volume (HU, int16) as a DICOM CT series, files in shuffled order, with misleading
    SliceThickness and InstanceNumber, so readers must use ImagePositionPatient."""
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    paths = []
    rng = np.random.default_rng(0)
    for k in rng.permutation(volume_zyx.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{rng.integers(1e9):09d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientSex, ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName = "F", "101500", "1", ""
        ds.Manufacturer = "test"
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber = 1, int(rng.integers(1, 1000))
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin) + k * spacing_xyz[2] * normal]
        ds.PixelSpacing = [f"{spacing_xyz[1]:.4f}", f"{spacing_xyz[0]:.4f}"]
        ds.SliceThickness = f"{slice_thickness}"
        ds.Rows, ds.Columns = volume_zyx.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = (volume_zyx[k].astype(np.int16) + 1024).astype(np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_series_datasets(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
