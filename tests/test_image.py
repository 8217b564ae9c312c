"""The Docker image for real: containers/Dockerfile is built with podman (Debian's podman and runc)
on a Debian 12 base made with debootstrap (no container registry is needed), then `medsyn train`
and `medsyn sample` run inside it on a bind-mounted phantom cohort with a read-only image and no
network, writing only to the bind mount.

Caches between runs (under MEDSYN_TEST_CACHE, default ~/.cache/medsyn-test): the debootstrap base
as a tarball and podman's image store, so a second run rebuilds only the layers whose inputs changed.
The build uses the host pip's own wheel sources (its find-links folders and file:// indexes,
bind-mounted read-only), so torch is not downloaded again where the host has it on disk.
Skipped, saying why, where podman cannot be installed (no root or apt-get) or cannot run a container."""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from medsyn_site.data.cohort import Cohort, validate_cohort

# From nothing (no cache) on the idle 2-core machine: 6 min 43 s for this module (debootstrap ~1 min,
# the build 312 s, train + sample inside ~30 s), ~29 GB written to disk, 7 GB kept in the cache.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MEDSYN_TEST_CACHE", "~/.cache/medsyn-test")).expanduser()
PACKAGES = ["podman", "runc", "debootstrap"]
BASE = "localhost/medsyn-test-base:bookworm"
IMAGE = "localhost/medsyn-test:latest"
MOUNT_POINTS = {"/data", "/tmp", "/etc", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run", "/run/.containerenv"}
MIRROR = os.environ.get("MEDSYN_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def _ensure_installed() -> None:
    if all(shutil.which(b) for b in ("podman", "debootstrap")) and Path("/usr/sbin/runc").exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("podman, runc and debootstrap are not installed and cannot be (needs apt-get as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   capture_output=True)


class Podman:
    """podman with its own image store and run state, both cached (podman's database records the
    pair); Debian's runc with the container's rlimits inside this machine's hard limits (podman's
    defaults exceed them here)."""

    def __init__(self, driver: str = "overlay"):
        self.base = ["podman", "--root", str(CACHE / f"podman-{driver}"), "--runroot", str(CACHE / f"podman-{driver}-run"),
                     "--storage-driver", driver, "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
        nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
        self.oci = ["--runtime", "/usr/sbin/runc", "--ulimit", f"nofile={nofile}:{nofile}",
                    "--ulimit", f"nproc={nproc}:{nproc}"]

    def __call__(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        r = subprocess.run([*self.base, *args], text=True, **kw)
        if check and r.returncode:
            raise AssertionError(f"podman {' '.join(args[:3])} ... failed ({r.returncode}):\n"
                                 f"{(r.stdout or '')[-4000:]}\n{(r.stderr or '')[-4000:]}")
        return r

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self("run", *self.oci, *args, **kw)


def _base_tarball() -> Path:
    """A minimal Debian 12 root file system with python3-venv (debootstrap, ~1 minute; cached)."""
    tar = CACHE / "debian12-python3.tar"
    if tar.is_file():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp) / "rootfs"
        r = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                            "bookworm", str(root), MIRROR], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"debootstrap could not make a Debian 12 base from {MIRROR}: {r.stdout[-1500:]}{r.stderr[-500:]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (root / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        subprocess.run(["tar", "-C", str(root), "-cf", f"{tar}.part", "."], check=True)
        os.replace(f"{tar}.part", tar)
    return tar


def _pip_sources() -> tuple[list[str], list[str]]:
    """The host pip's local wheel sources as build args + read-only binds: find-links folders,
    file:// indexes, and its CA bundle (a TLS-intercepting proxy)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    conf: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        conf[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    links = [p for p in conf.get("find-links", "").split() if Path(p).is_dir()]
    indexes = [u for u in conf.get("extra-index-url", "").split() if u.startswith("file://")]
    roots = {*links, *(str(Path(u[len("file://"):]).parent) for u in indexes)}
    args, binds = [], [f"{r}:{r}:ro" for r in sorted(roots) if Path(r).is_dir()]
    if links:
        args += ["--build-arg", f"PIP_FIND_LINKS={' '.join(links)}"]
    if indexes:
        args += ["--build-arg", f"PIP_EXTRA_INDEX_URL={' '.join(indexes)}"]
    if Path(conf.get("cert", "")).is_file():
        binds.append(f"{conf['cert']}:/run/host-ca.crt:ro")
        args += ["--build-arg", "PIP_CERT=/run/host-ca.crt"]
    return args, [a for b in binds for a in ("--volume", b)]


@pytest.fixture(scope="module")
def podman():
    CACHE.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(CACHE).free
    if free < 20e9 and not (CACHE / "podman-overlay").is_dir():
        pytest.skip(f"{CACHE}: {free / 1e9:.0f} GB free; a first build needs ~20 GB (the 7 GB CUDA torch layer, "
                    "written twice while podman commits it); set MEDSYN_TEST_CACHE to a larger disk")
    _ensure_installed()
    why = []
    for driver in ("overlay", "vfs"):  # vfs: where overlay mounts are not allowed (slower, more disk)
        p = Podman(driver)
        if p("image", "exists", BASE, check=False).returncode:
            p("import", str(_base_tarball()), BASE)
        r = p.run("--rm", "--network", "none", BASE, "python3", "-c", "import venv, ensurepip", check=False)
        if r.returncode == 0:
            return p
        why.append(f"{driver}: {r.stderr.strip()[-300:]}")
    pytest.skip("podman cannot run a container here: " + " | ".join(why))


@pytest.fixture(scope="module")
def image(podman):
    args, binds = _pip_sources()
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    build = ["build", *podman.oci, "--pull=never", "--layers", "-f", str(REPO / "containers" / "Dockerfile"),
             "--build-arg", f"BASE={BASE}", *args, *binds, "-t", IMAGE, str(REPO)]
    r = podman(*build, check=False)
    if r.returncode and "rlimit" in r.stderr + r.stdout:  # an OCI runtime that cannot run build steps here
        r = podman(*build, "--isolation", "chroot", check=False)
    assert r.returncode == 0, f"podman build failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"\n[image] built {IMAGE} in {time.time() - t0:.0f} s wall "
          f"(podman's own CPU {c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime:.0f} s)")
    podman("image", "prune", "-f", check=False)  # the previous build's layers, now untagged
    return IMAGE


def test_image_trains_and_samples_on_a_bind_mount_only(podman, image, phantom_cohort, key, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_cohort, data / "cohort")
    shutil.copy(REPO / "tests" / "configs" / "train_test.yaml", data / "train.yaml")
    shutil.copy(key, data / "site.key")
    before = _hashes(data)
    name = f"medsyn-test-{os.getpid()}"
    common = ["--read-only", "--tmpfs", "/tmp", "--network", "none", "--env", "OMP_NUM_THREADS=1",
              "--volume", f"{data}:/data", image]
    try:
        podman.run("--name", name, *common, "train", "--config", "train.yaml", "--cohort", "cohort", "--out", "run",
                   "--steps", "4")
        # the image itself is unchanged: nothing written outside /data and the /tmp tmpfs (podman's own
        # mount points for the bind, /etc/hosts, /etc/resolv.conf, ... are all the diff may show)
        changed = {line.split(maxsplit=1)[1] for line in podman("diff", name).stdout.splitlines() if line.strip()}
        assert changed <= MOUNT_POINTS, changed - MOUNT_POINTS
        podman("rm", name)
        podman.run("--rm", *common, "sample", "--run", "run", "--masks", "relocate:cohort", "--out", "synth",
                   "--sampler", "ddim", "--steps", "4", "--seed", "1", "--device", "cpu", "--site-key", "/data/site.key")
    finally:
        podman("rm", "-f", name, check=False)
    assert (data / "run" / "checkpoints" / "latest").read_text().strip().endswith("4")
    assert validate_cohort(data / "synth") == []
    assert Cohort(data / "synth").cases and (data / "synth" / "provenance.json").is_file()
    after = _hashes(data)
    assert {k: after.get(k) for k in before} == before  # the cohort, config and key untouched
    assert {p.split("/")[0] for p in after.keys() - before.keys()} == {"run", "synth"}  # nothing else written


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}
