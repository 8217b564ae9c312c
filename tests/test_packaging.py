"""A normal (non-editable) install works: the wheel carries the shipped configs, the DeepSpeed JSON
and the nnU-Net trainer, and `medsyn train --config tiny` runs from a fresh venv outside the
repository. Also how config names resolve."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from medsyn_site.config import CONFIG_DIR, ConfigError, load_config, resolve_config, shipped_configs

REPO = Path(__file__).resolve().parent.parent


def test_shipped_configs_resolve_by_name_and_old_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nowhere near the repository
    assert shipped_configs() == ["demo", "gpu24", "lidc", "tiny", "wide"]
    for name in ("tiny", "tiny.yaml", "configs/tiny.yaml"):
        assert resolve_config(name) == CONFIG_DIR / "tiny.yaml"
    assert load_config().name == "tiny"
    assert load_config("gpu24").train.deepspeed_config == "deepspeed/gpu24.json"  # base: lidc.yaml, shipped
    with pytest.raises(ConfigError, match=r"nope: config file not found .*demo, gpu24, lidc, tiny, wide"):
        resolve_config("nope")


def test_own_config_starts_from_a_shipped_one_unless_a_sibling_exists(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: tiny.yaml\nname: mine\ntrain: {steps: 7}\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert (cfg.name, cfg.train.steps, cfg.model.channels) == ("mine", 7, (16, 32, 32))
    (tmp_path / "tiny.yaml").write_text("name: sibling\nmodel: {channels: [16, 16, 16]}\n")
    assert load_config(tmp_path / "mine.yaml").model.channels == (16, 16, 16)  # the sibling wins


def test_every_imported_package_is_declared():
    """Each third-party package the library imports is a dependency in pyproject.toml, not something
    that only arrives through another package's dependencies."""
    import ast
    import importlib.metadata as md
    import re
    import tomllib

    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    mods = set()
    for f in (REPO / "medsyn_site").rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Import):
                mods |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                mods.add(n.module.split(".")[0])
    dists = md.packages_distributions()
    third = {m for m in mods if m not in sys.stdlib_module_names and m != "medsyn_site"}
    assert {"torch", "flwr", "cryptography", "tomli_w"} <= third  # the scan sees the imports
    missing = {m: dists.get(m) for m in third
               if not {d.lower().replace("_", "-") for d in dists.get(m, [m])} & declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy holding only what a source distribution would (no build/ in the repo)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "medsyn_site", src / "medsyn_site", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(tmp_path / "dist"), str(src)], check=True)
    (wheel,) = (tmp_path / "dist").glob("medsyn_site-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains_with_a_shipped_config(tmp_path, phantom_cohort):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ("medsyn_site/configs/tiny.yaml", "medsyn_site/configs/lidc.yaml", "medsyn_site/configs/gpu24.yaml",
                 "medsyn_site/configs/wide.yaml", "medsyn_site/configs/demo.yaml", "medsyn_site/pretrained/phantom-wide.pt",
                 "medsyn_site/configs/deepspeed/cpu.json", "medsyn_site/configs/deepspeed/gpu24.json",
                 "medsyn_site/evaluate/trainers/nnUNetTrainer_medsyn.py"):
        assert need in names, f"{need} missing from {wheel.name}"

    # A fresh venv from the base interpreter; the already-installed dependencies (torch, MONAI,
    # DeepSpeed, ...) are reused through a .pth line, which is appended AFTER the venv's own
    # site-packages, so the wheel's medsyn_site is the one imported.
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "reuse-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, env=env)

    work = tmp_path / "elsewhere"  # not the repository: only the installed package can be found
    work.mkdir()
    where = subprocess.run([py, "-c", "import medsyn_site; print(medsyn_site.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site), where
    every = subprocess.run([py, "-c", "import importlib, pkgutil, medsyn_site\n"
                            "for m in pkgutil.walk_packages(medsyn_site.__path__, 'medsyn_site.'):\n"
                            "    importlib.import_module(m.name)\n"
                            "print('imported', m.name)"], cwd=work, env=env, capture_output=True, text=True)
    assert every.returncode == 0, every.stderr[-3000:]  # every module of the installed wheel imports
    env |= {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    # the demo's config: the wide network, fine-tuned from the phantom model the wheel ships
    r = subprocess.run([venv / "bin" / "medsyn", "train", "--config", "demo", "--cohort", str(phantom_cohort),
                        "--out", "run", "--steps", "2"], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = (work / "run" / "config.yaml").read_text()
    assert "name: demo" in resolved and "deepspeed/cpu.json" in resolved and "builtin:phantom-wide" in resolved
    assert list((work / "run" / "checkpoints").iterdir())
