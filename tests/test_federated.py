"""Federated training with Flower: the weights on the wire, the trainer's init-weights hook (DeepSpeed's
fp32 master copy), the global run dir, the certificates; and a real federation on 127.0.0.1 (SuperLink
with TLS and SuperNode authentication, two SuperNodes on two phantom cohorts, an unregistered node
refused, a node killed mid-round, a restarted ServerApp continuing from its last round, the node
rejoining the next round)."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from medsyn_site.config import PhantomConfig, SplitConfig, load_config
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.diffusion.engine import free_port
from medsyn_site.diffusion.model import build_unet
from medsyn_site.federated import deploy
from medsyn_site.federated.server import GlobalRun, Settings
from medsyn_site.federated.task import decode, encode, nbytes

CONFIG = Path(__file__).parent / "configs" / "federated_test.yaml"
MEDSYN = str(Path(sys.executable).with_name("medsyn"))


# -- fast ---------------------------------------------------------------------------------------
def test_wire_fp32_exact_bf16_half_the_bytes():
    torch.manual_seed(0)
    state = {"w": torch.randn(64, 32), "b": torch.randn(32), "steps": torch.tensor([7])}
    fp32, bf16 = encode(state, "fp32"), encode(state, "bf16")
    assert all(torch.equal(decode(fp32)[k], state[k]) for k in state)
    back = decode(bf16)
    assert torch.equal(back["w"], state["w"].to(torch.bfloat16).float())  # exactly torch's bf16 rounding
    assert back["steps"].dtype == torch.int64 and back["steps"].item() == 7
    big = {"w": torch.randn(256, 256)}
    assert 0.49 < nbytes(encode(big, "bf16")) / nbytes(encode(big, "fp32")) < 0.51  # (.npy headers aside)
    with pytest.raises(ValueError, match="fp16"):
        encode(state, "fp16")


@pytest.mark.parametrize("precision, ds", [("fp32", "deepspeed/cpu.json"), ("bf16", "deepspeed/gpu.json")])
def test_init_weights_reach_deepspeeds_fp32_master_copy(precision, ds):
    """bf16 + ZeRO keeps fp32 master weights in the optimizer: the global model must land there,
    not only in the (bf16) module, or the next step would start from the old weights."""
    from medsyn_site.diffusion import engine as eng
    from medsyn_site.diffusion.train import get_weights, set_weights

    cfg = load_config(CONFIG, {"train.precision": precision, "train.deepspeed_config": ds})
    eng.init_distributed()
    engine, _ = eng.make_engine(build_unet(cfg.model), cfg.train)
    torch.manual_seed(1)
    target = {k: torch.randn_like(v.float()) if v.is_floating_point() else v
              for k, v in build_unet(cfg.model).state_dict().items()}
    set_weights(engine, target)
    got = get_weights(engine)
    for k, v in target.items():
        assert torch.equal(got[k], v.float()), k
    if precision == "bf16":
        p = next(engine.module.parameters())
        assert p.dtype == torch.bfloat16


def _distance(a: dict, b: dict) -> float:
    return sum((a[k].float() - b[k].float()).pow(2).sum().item() for k in a if a[k].is_floating_point()) ** 0.5


def test_local_round_in_process_resumes_and_fedprox_pulls_to_the_global_model(tmp_path):
    """The site's local round drives the Trainer in this process: it starts from the global weights
    (not the run dir's own), resumes the local run dir round after round (step count, optimizer), and
    returns the losses of the steps it ran. FedProx's term, a hook of the federation, keeps the local
    model nearer the global one: with a huge mu the local weights barely move."""
    from medsyn_site.diffusion.rundir import RunDir
    from medsyn_site.federated.task import LOCAL_RUN, run_local_round

    cohort = tmp_path / "cohort"
    write_phantom_cohort(PhantomConfig(cases=2, seed=3, shape=(48, 48, 32)), SplitConfig(train=0.5, val=0.5), cohort)
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    glob = build_unet(cfg.model).state_dict()
    r1 = run_local_round(cfg, cohort, tmp_path / "plain", glob, 2)
    assert r1.steps == 2 and r1.num_examples == 1 and r1.loss == r1.loss  # a number, not NaN
    run = RunDir(tmp_path / "plain" / LOCAL_RUN)
    assert run.latest() == "step_00000002"
    r2 = run_local_round(cfg, cohort, tmp_path / "plain", glob, 2)
    assert run.latest() == "step_00000004"  # resumed: steps 3-4 of one local run
    with open(run.root / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)][-1] == 4
    moved = _distance(r2.weights, glob)
    assert moved > 0
    # Adam's first step moves every weight by ~lr whatever the gradient; from the second on the
    # proximal gradient (zero at the global weights) pulls them back
    far = run_local_round(cfg, cohort, tmp_path / "far", glob, 4).weights
    near = run_local_round(cfg, cohort, tmp_path / "prox", glob, 4, prox_mu=1e4).weights
    print("distance to the global model, mu 0 / 1e4:", _distance(far, glob), _distance(near, glob))
    assert _distance(near, glob) < 0.6 * _distance(far, glob)


def test_clientapp_ends_when_its_superexec_dies_even_unreaped(tmp_path):
    """A site's flwr-clientapp must not outlive the flower-superexec that started it, whatever it is
    doing. Here, as in a container whose PID 1 does not reap: the superexec is killed and left an
    unreaped zombie (which passes Flower's kill(pid, 0) test) while the ClientApp, just started,
    retries a dead SuperNode. Flower's own flwr-clientapp stays (the control); the one `medsyn fl
    supernode` puts on the SuperNode's PATH ends."""
    from medsyn_site.federated.deploy import BIN, flower_env
    from medsyn_site.federated.lifeline import _alive, clientapp_shim

    path = flower_env(clientapp_shim(tmp_path / ".flower-bin"))["PATH"]
    ours = shutil.which("flwr-clientapp", path=path)
    assert ours == str(tmp_path / ".flower-bin" / "flwr-clientapp")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the SuperNode is gone
    apps = [[exe, "--runtime-api-address", dead, "--token", "t" * 64, "--insecure"]
            for exe in (ours, str(BIN / "flwr-clientapp"))]
    superexec = ("import os, subprocess, sys, time; "
                 f"ps = [subprocess.Popen(a + ['--parent-pid', str(os.getpid())], stderr=subprocess.DEVNULL) "
                 f"for a in {apps!r}]; print(*(p.pid for p in ps), flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", superexec], stdout=subprocess.PIPE, text=True)
    try:
        pid_ours, pid_flower = map(int, parent.stdout.readline().split())
        time.sleep(4)  # both started and retrying
        assert _alive(pid_ours) and _alive(pid_flower), "no ClientApp may end while its parent lives"
        assert "flwr-clientapp" in " ".join(psutil.Process(pid_ours).cmdline())  # as `ps` shows Flower's
        os.kill(parent.pid, signal.SIGKILL)  # not reaped: a zombie parent
        t0 = time.monotonic()
        _until(lambda: not _alive(pid_ours), 30, "our flwr-clientapp to end with its parent", poll=0.2)
        print(f"ours ended {time.monotonic() - t0:.1f} s after its parent")
        assert _alive(pid_flower), "control: Flower's own flwr-clientapp was expected to stay here"
    finally:
        for pid in (pid_ours, pid_flower):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_update_checks_name_what_is_wrong():
    """Each site's update against the global model: keys, shapes, dtypes, finiteness (oracle: edits
    made by hand), and the norm bound (analytic: norms set by hand)."""
    from medsyn_site.federated.server import check_update, norm_outliers, update_norm

    g = {"w": torch.zeros(3, 4), "b": torch.zeros(4), "n": torch.tensor(7)}
    ok = {"w": torch.ones(3, 4), "b": torch.zeros(4), "n": torch.tensor(7)}
    assert check_update(ok, g) is None and update_norm(ok, g) == pytest.approx(12 ** 0.5)
    assert "1 missing" in check_update({"w": ok["w"], "n": ok["n"]}, g)
    assert "1 unexpected" in check_update({**ok, "evil": torch.zeros(1)}, g)
    assert "w: shape (4, 3)" in check_update({**ok, "w": torch.zeros(4, 3)}, g)
    assert "b: dtype torch.float64" in check_update({**ok, "b": torch.zeros(4, dtype=torch.float64)}, g)
    for bad in (float("nan"), float("inf")):
        w = ok["w"].clone()
        w[1, 2] = bad
        assert "w: non-finite" in check_update({**ok, "w": w}, g)
    # two sites, one 1000x: the lower median keeps the bar at the honest norm
    assert set(norm_outliers({"a": 1.0, "b": 1000.0}, [], 10)) == {"b"}
    # an attacker sending no change cannot get the honest site dropped once there is history
    assert norm_outliers({"a": 1.2, "b": 0.0}, [1.0, 1.1, 0.9, 1.0], 10) == {}
    assert norm_outliers({"a": 1.0, "b": 2.0, "c": 3.0}, [], 10) == {}
    assert "max-update-norm 2" in norm_outliers({"a": 1.0, "b": 3.0}, [], 0, limit=2.0)["b"]
    assert norm_outliers({"a": 1.0, "b": 1e6}, [], 0) == {}  # ratio 0: off


def test_global_run_saves_each_round_resumes_and_samples(tmp_path):
    from medsyn_site.diffusion.sample import Sampler, resolve_weights

    s = Settings.from_run_config({"run-dir": str(tmp_path / "fed"), "config": str(CONFIG), "rounds": 3,
                                  "local-steps": 4, "global-ema": 0.5})
    cfg = s.medsyn_config()
    run = GlobalRun(s, cfg, run_id=11)
    w1 = {k: v + 1 if v.is_floating_point() else v for k, v in run.weights.items()}
    w2 = {k: v + 3 if v.is_floating_point() else v for k, v in run.weights.items()}
    row = {"node_id": 5, "status": "ok", "loss": 0.5, "steps": 4, "seconds": 1.0, "num_examples": 2,
           "bytes_down": 10, "bytes_up": 10, "round_seconds": 2.0}
    run.save_round(1, w1, [row])
    run.save_round(2, w2, [row])
    run.close()
    key = next(k for k, v in w1.items() if v.is_floating_point())
    again = GlobalRun(s, cfg, run_id=12)  # a restarted ServerApp
    assert again.round == 2 and torch.equal(again.weights[key], w2[key])
    assert torch.allclose(again.ema.shadow[key], 0.5 * w1[key] + 0.5 * w2[key])  # EMA over rounds
    again.close()
    gen = Sampler(resolve_weights(tmp_path / "fed"), steps=1)  # as `medsyn sample --run` reads a run dir
    assert gen.federation["round"] == 2 and gen.federation["flower_run_id"] == "11"
    assert gen.window == tuple(cfg.train.patch_size[::-1])  # federated weights sample on their training patch too
    with open(tmp_path / "fed" / "checkpoints" / "round_00002" / "global.pt", "r+b") as f:
        f.truncate(100)  # a damaged last round: a restart falls back to the newest intact one
    again = GlobalRun(s, cfg, run_id=12)
    assert again.round == 1 and torch.equal(again.weights[key], w1[key])
    again.close()
    assert json.loads((tmp_path / "fed" / "federation.json").read_text())["flower_runs"] == ["11", "12", "12"]
    other = Settings.from_run_config({"run-dir": str(tmp_path / "fed"), "config": str(CONFIG), "local-steps": 4})
    from medsyn_site.errors import MedsynError

    with pytest.raises(MedsynError, match="different config"):
        GlobalRun(other, load_config(CONFIG, {"model.channels": (16, 16, 16)}), run_id=13)
    with pytest.raises(MedsynError, match="transfer"):
        Settings.from_run_config({"run-dir": "x", "transfer": "int8"})
    with pytest.raises(MedsynError, match="unknown key.*local-step\\b.*known: run-dir"):
        Settings.from_run_config({"run-dir": "x", "local-step": 5})  # misspelt: not silently the default 20
    with pytest.raises(MedsynError, match="secagg hides each site's update, which strategy='fedmedian'"):
        Settings.from_run_config({"run-dir": "x", "secagg": True, "strategy": "fedmedian"})
    with pytest.raises(MedsynError, match="and dp-noise need"):
        Settings.from_run_config({"run-dir": "x", "secagg": True, "dp-noise": 1.0})


def test_certificates_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    deploy.make_pki(tmp_path / "pki", hosts=("link.example.org",))
    ca = x509.load_pem_x509_certificate((tmp_path / "pki" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "superlink.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "link.example.org"} <= set(sans.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert (tmp_path / "pki" / "ca.key").stat().st_mode & 0o077 == 0
    with pytest.raises(deploy.DeployError, match="already exists"):
        deploy.make_pki(tmp_path / "pki")
    key, pub = deploy.make_node_key(tmp_path / "site")
    private = load_ssh_private_key(key.read_bytes(), None)
    assert private.curve.name == "secp384r1" and key.stat().st_mode & 0o077 == 0
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == private.public_key().public_numbers()
    secure = deploy.superlink_command(tmp_path / "pki")
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert "--disable-runtime-dependency-installation" in secure
    assert deploy.flower_env()["FLWR_TELEMETRY_ENABLED"] == "0"  # nothing reported to a third party
    with pytest.raises(deploy.DeployError, match="--insecure"):
        deploy.superlink_command(None)
    with pytest.raises(deploy.DeployError, match="not found"):
        deploy.superlink_command(tmp_path / "nothing")


def test_insecure_needs_the_flag_and_warns(tmp_path):
    out = subprocess.run([MEDSYN, "fl", "connect", "--superlink", "127.0.0.1:1"], capture_output=True, text=True,
                         env={**os.environ, "FLWR_HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 1 and "--ca" in out.stderr
    out = subprocess.run([MEDSYN, "fl", "connect", "--superlink", "127.0.0.1:1", "--insecure"], capture_output=True,
                         text=True, env={**os.environ, "FLWR_HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 0 and "INSECURE" in out.stderr
    assert "insecure = true" in (tmp_path / "config.toml").read_text()


# -- a real federation on 127.0.0.1 ------------------------------------------------------------------
def _until(cond, timeout: float, what: str, poll: float = 2.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _ours(marks: list[str]) -> list[psutil.Process]:
    """Live processes whose command line names one of this test's folders or ports."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(m in line for m in marks) and p.pid != os.getpid():
                found.append(p)
        except psutil.Error:
            pass
    return found


def _adopt_orphans_unreaped(on: bool) -> None:
    """Make this test process the adopter of its descendants' orphans (a Linux child subreaper) and
    never reap them, as PID 1 in many containers does: the harshest place for Flower's kill(pid, 0)
    parent monitor (a zombie parent looks alive)."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def _sweep(marks: list[str], grace: float = 60) -> list[str]:
    """Wait up to ``grace`` s for this test's processes to end by themselves, then kill those left
    (so that none outlives the test, whatever happened) and name them."""
    end = time.monotonic() + grace
    while (left := _ours(marks)) and time.monotonic() < end:
        time.sleep(2)
    names = []
    for p in left:
        try:
            names.append(" ".join(p.cmdline())[:300])
            p.kill()
        except psutil.Error:
            pass
    return names


class Federation:
    """Processes started by the test, each in its own session; stop() ends them all."""

    def __init__(self, tmp: Path, env: dict):
        self.tmp, self.env, self.procs = tmp, env, {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        p = subprocess.Popen([MEDSYN, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([MEDSYN, *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def online(self) -> set[str]:
        client = deploy.control()
        try:
            return {str(n) for n, status in deploy.nodes(client).items() if status == "online"}
        finally:
            client.close()

    def insecure_sites(self, link_port: int, ports: dict, site_env: dict) -> str:
        """An insecure SuperLink on 127.0.0.1 and one SuperNode per site (cohort_X, work_X under the
        test's folder; ``site_env``: extra environment per site); returns when all are online."""
        link = f"127.0.0.1:{link_port}"
        self.start("superlink", ["fl", "superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port)])
        assert self.cli("fl", "connect", "--superlink", link, "--insecure").returncode == 0
        env = self.env
        for site, port in ports.items():
            self.env = {**env, **site_env.get(site, {})}
            self.start(f"supernode_{site}", ["fl", "supernode", "--insecure", "--superlink", link,
                                             "--cohort", str(self.tmp / f"cohort_{site}"), "--work-dir",
                                             str(self.tmp / f"work_{site}"), "--port", str(port), "--threads", "1"])
        self.env = env

        def all_online() -> bool:
            try:
                return len(self.online()) == len(ports)
            except deploy.DeployError:  # the SuperLink still starting
                return False
        _until(all_online, 180, f"{len(ports)} sites online")
        return link

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(15)


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "rounds.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_federation_tls_auth_two_sites_drop_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))  # this test's flwr CLI connection
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fed = Federation(tmp_path, env)
    link_port, ports = free_port(), {"a": free_port(), "b": free_port(), "rogue": free_port()}
    marks = [str(tmp_path), *(f"127.0.0.1:{p}" for p in (link_port, *ports.values()))]
    link = f"127.0.0.1:{link_port}"
    run_dir = tmp_path / "global"
    _adopt_orphans_unreaped(True)  # as PID 1 of a CI container: a killed SuperNode's helpers stay zombies
    base = f'run-dir="{run_dir}" config="{CONFIG}" local-steps=2 transfer="bf16"'
    t0 = time.monotonic()

    def mark(what: str) -> None:  # where the time goes (shown with -s or on failure)
        print(f"[{time.monotonic() - t0:6.1f} s] {what}", flush=True)

    try:
        # the federation operator: CA + SuperLink certificate; each site: its node key pair
        assert fed.cli("fl", "init", "--out", str(tmp_path / "pki")).returncode == 0
        for site in ("a", "b", "rogue"):
            assert fed.cli("fl", "site-key", "--out", str(tmp_path / "keys" / site)).returncode == 0
        # two sites with different data: different seeds and nodule mixes
        write_phantom_cohort(PhantomConfig(cases=3, seed=21, shape=(48, 48, 32), max_nodules=4),
                             SplitConfig(train=0.67, val=0.33), tmp_path / "cohort_a")
        write_phantom_cohort(PhantomConfig(cases=3, seed=22, shape=(48, 48, 32), max_nodules=1),
                             SplitConfig(train=0.67, val=0.33), tmp_path / "cohort_b")

        mark("PKI, keys and cohorts ready")
        fed.start("superlink", ["fl", "superlink", "--pki", str(tmp_path / "pki"), "--host", "127.0.0.1",
                                "--port", str(link_port)])
        assert fed.cli("fl", "connect", "--superlink", link, "--ca", str(tmp_path / "pki" / "ca.pem")).returncode == 0
        node_ids = {}
        for site in ("a", "b"):
            out = _until(lambda: (r := fed.cli("fl", "register", str(tmp_path / "keys" / f"{site}.pub"),
                                               "--name", f"site-{site}")).returncode == 0 and r, 120,
                         f"registering site {site}")
            node_ids[site] = re.search(r"SuperNode (\d+)", out.stdout).group(1)

        def supernode(site: str, cohort: str):
            return fed.start(f"supernode_{site}", [
                "fl", "supernode", "--superlink", link, "--ca", str(tmp_path / "pki" / "ca.pem"),
                "--key", str(tmp_path / "keys" / site), "--cohort", str(tmp_path / cohort),
                "--work-dir", str(tmp_path / f"work_{site}"), "--port", str(ports[site]), "--threads", "1"])

        mark("SuperLink up, sites registered")
        rogue = supernode("rogue", "cohort_a")  # a valid key pair, never registered
        supernode("a", "cohort_a")
        supernode("b", "cohort_b")
        _until(lambda: fed.online() == set(node_ids.values()), 180, "both registered sites online")
        assert rogue.wait(180) != 0, "an unregistered SuperNode must be refused"
        assert "Failed to activate SuperNode" in fed.log("supernode_rogue")

        mark("both sites online, the unregistered one refused")
        # two rounds of the tiny model, both sites
        done = fed.cli("fl", "run", "--run-config", f"{base} rounds=2 min-sites=2 round-timeout=900.0", timeout=1200)
        assert done.returncode == 0, done.stdout + done.stderr + fed.log("superlink")[-3000:]
        first_run = re.search(r"Flower run (\d+)", done.stdout).group(1)
        mark("rounds 1-2 done")
        rows = _rows(run_dir)
        assert [(r["round"], r["status"]) for r in rows] == [("1", "ok")] * 2 + [("2", "ok")] * 2
        assert {r["node_id"] for r in rows} == set(node_ids.values())
        assert all(int(r["bytes_up"]) == int(r["bytes_down"]) > 0 for r in rows)
        for rnd in (1, 2):
            blob = torch.load(run_dir / "checkpoints" / f"round_{rnd:05d}" / "ema.pt", map_location="cpu")
            assert blob["federation"]["round"] == rnd and blob["federation"]["flower_run_id"] == first_run
            assert sorted(map(str, blob["federation"]["sites"])) == sorted(node_ids.values())

        # `medsyn sample` loads the global checkpoint; provenance names the federation run
        assert fed.cli("site-key", "new", str(tmp_path / "site.key")).returncode == 0
        syn = fed.cli("sample", "--run", str(run_dir), "--masks", f"cohort:{tmp_path / 'cohort_a'}", "--out",
                      str(tmp_path / "syn"), "--steps", "2", "--site-key", str(tmp_path / "site.key"))
        assert syn.returncode == 0, syn.stderr
        header = json.loads((tmp_path / "syn" / "provenance.json").read_text())
        assert header["federation"]["flower_run_id"] == first_run and header["federation"]["round"] == 2

        mark("sampled from the global checkpoint")
        # restart the ServerApp for a third round; site b's SuperNode is killed mid-round
        third = fed.start("run3", ["fl", "run", "--run-config", f"{base} rounds=3 min-sites=1 round-timeout=600.0"])
        # site b's ClientApp process (Flower starts one per message; the Trainer runs in it)
        _until(lambda: any("flwr-clientapp" in " ".join(p.cmdline())
                           for p in _ours([f"127.0.0.1:{ports['b']}"])), 600, "site b training in round 3")
        mark("site b training in round 3: killing its SuperNode")
        os.kill(fed.procs["supernode_b"].pid, signal.SIGKILL)
        # reap it, as its parent at a site would (a shell, systemd, Slurm): Flower's helpers watch their parent
        # with kill(pid, 0), which a zombie still passes, so an unreaped SuperNode keeps them waiting
        fed.procs["supernode_b"].wait(15)
        assert third.wait(900) == 0, fed.log("run3")
        mark("round 3 done without site b")
        rows = _rows(run_dir)
        assert [r["round"] for r in rows] == ["1", "1", "2", "2", "3", "3"]  # rounds 1-2 not redone
        r3 = {r["node_id"]: r["status"] for r in rows if r["round"] == "3"}
        assert r3[node_ids["a"]] == "ok" and r3[node_ids["b"]] != "ok"
        blob = torch.load(run_dir / "checkpoints" / "round_00003" / "ema.pt", map_location="cpu")
        assert [str(s) for s in blob["federation"]["sites"]] == [node_ids["a"]]
        assert "resuming federation" in (run_dir / "federation.log").read_text()
        # the killed site left nothing running (its trainer dies with its Flower process)
        left = _sweep([str(tmp_path / "work_b"), f"127.0.0.1:{ports['b']}"], grace=60)
        assert not left, f"site b's processes outlived its SuperNode by 60 s: {left}"
        mark("site b's processes ended")
        # site b comes back (after the SuperLink has seen it go) and joins the next round
        _until(lambda: node_ids["b"] not in fed.online(), 180, "the SuperLink to see site b gone")
        supernode("b", "cohort_b")
        _until(lambda: fed.online() == set(node_ids.values()), 180, "site b online again")
        fourth = fed.cli("fl", "run", "--run-config", f"{base} rounds=4 min-sites=2 round-timeout=600.0", timeout=900)
        assert fourth.returncode == 0, fourth.stdout + fourth.stderr
        r4 = {r["node_id"]: r["status"] for r in _rows(run_dir) if r["round"] == "4"}
        assert r4 == {node_ids["a"]: "ok", node_ids["b"]: "ok"}, r4
        mark("round 4 with site b back")
    finally:
        fed.stop()
        left = _sweep(marks)
        _adopt_orphans_unreaped(False)
    assert not left, f"processes left behind after the federation stopped: {left}"
    mark("all processes ended")


SITECUSTOMIZE = """
import sys
if sys.argv[0].endswith("flwr-clientapp"):  # only the site's trainer process
    import os, pathlib, torch
    from medsyn_site.federated import task
    honest = task.run_local_round

    def run_local_round(cfg, cohort, work_dir, weights, steps, prox_mu=0.0):
        r = honest(cfg, cohort, work_dir, weights, steps, prox_mu=prox_mu)
        out = pathlib.Path(work_dir).parent / "record"
        out.mkdir(exist_ok=True)
        n = len(list(out.glob("round_*.pt"))) + 1  # this site's n-th local round
        if str(n) in os.environ.get("MEDSYN_NAN_AT", "").split(","):  # a GPU that returned NaN
            r.weights = {k: v.float() * float("nan") if v.is_floating_point() else v for k, v in r.weights.items()}
        if str(n) in os.environ.get("MEDSYN_X1000_AT", "").split(","):  # a stolen key: the update scaled 1000x
            r.weights = {k: weights[k] + 1000 * (v - weights[k]) if v.is_floating_point() else v
                         for k, v in r.weights.items()}
        torch.save({"start": weights, "weights": r.weights, "num_examples": r.num_examples}, out / f"round_{n}.pt")
        return r

    task.run_local_round = run_local_round
"""


def _recording_sites(tmp_path: Path) -> Path:
    """A folder to put first on a site's PYTHONPATH: its trainer records each local round (and is
    poisoned in the rounds MEDSYN_NAN_AT / MEDSYN_X1000_AT name)."""
    (tmp_path / "sitecustomize").mkdir()
    (tmp_path / "sitecustomize" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return tmp_path / "sitecustomize"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_poisoned_site_cannot_move_the_global_model(tmp_path, monkeypatch):
    """A real SuperLink and two SuperNodes; site b's trainer is modified (sitecustomize on its PATH):
    round 1 it sends NaN, round 2 its update scaled 1000x. Both are refused with their reasons in
    rounds.csv, the rounds go on with site a, the global model stays finite and equal to the honest
    average, and the operator is told site b was refused twice in a row. Printed: how far plain
    FedAvg would have pushed the global model."""
    from medsyn_site.federated.server import update_norm

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fed = Federation(tmp_path, env)
    link_port, ports = free_port(), {"a": free_port(), "b": free_port()}
    marks = [str(tmp_path), *(f"127.0.0.1:{p}" for p in (link_port, *ports.values()))]
    run_dir = tmp_path / "global"
    evil = _recording_sites(tmp_path)
    try:
        for site, seed in (("a", 31), ("b", 32)):
            write_phantom_cohort(PhantomConfig(cases=3, seed=seed, shape=(48, 48, 32), max_nodules=2),
                                 SplitConfig(train=0.67, val=0.33), tmp_path / f"cohort_{site}")
        fed.insecure_sites(link_port, ports, {"b": {"PYTHONPATH": str(evil), "MEDSYN_NAN_AT": "1",
                                                     "MEDSYN_X1000_AT": "2"}})
        done = fed.cli("fl", "run", "--run-config", f'run-dir="{run_dir}" config="{CONFIG}" local-steps=2 rounds=2 '
                       f'min-sites=1 round-timeout=600.0', timeout=800)
        assert done.returncode == 0, done.stdout + done.stderr + fed.log("superlink")[-3000:]
        rows = {(r["round"], r["status"].split(":")[0]) for r in _rows(run_dir)}
        assert sorted(rows) == [("1", "ok"), ("1", "refused"), ("2", "ok"), ("2", "refused")], rows
        reasons = {r["round"]: r["status"] for r in _rows(run_dir) if r["status"] != "ok"}
        assert "non-finite values" in reasons["1"] and "above 10 x the round's reference" in reasons["2"], reasons
        honest_norm = [float(r["update_norm"]) for r in _rows(run_dir) if r["round"] == "2" and r["status"] == "ok"][0]
        g1, g2 = (torch.load(run_dir / "checkpoints" / f"round_{n:05d}" / "global.pt") for n in (1, 2))
        assert all(torch.isfinite(v).all() for g in (g1, g2) for v in g.values() if v.is_floating_point())
        # with site b refused, the global model IS site a's update (the honest average); plain FedAvg would
        # have moved it by n_b / (n_a + n_b) x |poisoned - honest|
        poison = torch.load(tmp_path / "work_b" / "record" / "round_2.pt")
        n_a = [int(r["num_examples"]) for r in _rows(run_dir) if r["round"] == "2" and r["status"] == "ok"][0]
        pushed = poison["num_examples"] / (n_a + poison["num_examples"]) * update_norm(poison["weights"], g2)
        print(f"round 2: honest update norm {honest_norm:.4g}; plain FedAvg would have put the global model "
              f"{pushed:.4g} away from the honest average ({pushed / honest_norm:.0f}x the honest update); "
              f"with validation: 0")
        assert pushed > 100 * honest_norm
        assert "refused in the last 2 rounds in a row" in (run_dir / "federation.log").read_text()
    finally:
        fed.stop()
        left = _sweep(marks)
    assert not left, f"processes left behind: {left}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_secagg_plus_sums_updates_the_server_never_sees(tmp_path, monkeypatch):
    """A real SuperLink and three SuperNodes; every site records what it trained (sitecustomize).
    A plain FedAvg round, then SecAgg+ rounds (Flower's SecAggPlusWorkflow + secaggplus_mod): the
    global model after a secure round equals the weighted average of the recorded updates within
    SecAgg+'s quantization, no site's update crosses in the clear (only masked integers), and in the
    next round site c's update scaled 1000x makes the secure sum fail the norm check: the round is
    refused and the global model stays. Printed: SecAgg+'s cost against the plain round (time, bytes)."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fed = Federation(tmp_path, env)
    sites = ("a", "b", "c")
    link_port, ports = free_port(), {s: free_port() for s in sites}
    marks = [str(tmp_path), *(f"127.0.0.1:{p}" for p in (link_port, *ports.values()))]
    recording = _recording_sites(tmp_path)
    base = f'config="{CONFIG}" local-steps=2 min-sites=3 round-timeout=600.0'
    try:
        for site, seed, cases in (("a", 41, 3), ("b", 42, 5), ("c", 43, 3)):  # b: more training cases
            write_phantom_cohort(PhantomConfig(cases=cases, seed=seed, shape=(48, 48, 32), max_nodules=2),
                                 SplitConfig(train=0.67, val=0.33), tmp_path / f"cohort_{site}")
        fed.insecure_sites(link_port, ports, {s: {"PYTHONPATH": str(recording), "MEDSYN_X1000_AT": "3" if s == "c" else ""}
                                              for s in sites})
        plain = fed.cli("fl", "run", "--run-config", f'run-dir="{tmp_path / "plain"}" {base} rounds=1', timeout=600)
        assert plain.returncode == 0, plain.stdout + plain.stderr + fed.log("superlink")[-3000:]
        run_dir = tmp_path / "secure"
        done = fed.cli("fl", "run", "--run-config", f'run-dir="{run_dir}" {base} rounds=2 secagg=true', timeout=800)
        assert done.returncode != 0, "the poisoned secure round must stop the run"
        rows = _rows(run_dir)
        assert [(r["round"], r["status"].split(":")[0]) for r in rows] == [("1", "ok")] * 3 + [("2", "refused")] * 3
        assert all("secure sum: update norm" in r["status"] for r in rows if r["round"] == "2"), rows
        assert not (run_dir / "checkpoints" / "round_00002").exists()
        # round 1: the global model is the example-weighted average of the updates the sites recorded
        rec = {s: torch.load(tmp_path / f"work_{s}" / "record" / "round_2.pt") for s in sites}
        g0 = rec["a"]["start"]
        n = {s: rec[s]["num_examples"] for s in sites}
        avg = {k: sum(n[s] * (rec[s]["weights"][k] - g0[k]) for s in sites) / sum(n.values()) for k in g0}
        g1 = torch.load(run_dir / "checkpoints" / "round_00001" / "global.pt")
        err = max(float((g1[k] - g0[k] - avg[k]).abs().max()) for k in g0)
        rel = _distance(g1, {k: g0[k] + avg[k] for k in g0}) / _distance({k: g0[k] + avg[k] for k in g0}, g0)
        assert err < 1e-4 and rel < 0.02, (err, rel)  # 2^22 levels over +-0.5, scaled by 2/100 .. 3/100
        # what crossed: masked integers, not the update (nothing in the server's rows resembles one site's)
        plain_rows, sec_rows = _rows(tmp_path / "plain"), [r for r in rows if r["round"] == "1"]
        t_plain, t_sec = float(plain_rows[0]["round_seconds"]), float(sec_rows[0]["round_seconds"])
        b_plain = sum(int(r["bytes_up"]) + int(r["bytes_down"]) for r in plain_rows) / 3
        b_sec = sum(int(r["bytes_up"]) + int(r["bytes_down"]) for r in sec_rows) / 3
        print(f"SecAgg+ round: {t_sec:.1f} s vs {t_plain:.1f} s plain FedAvg (3 sites, 2 local steps); "
              f"{b_sec / 1e6:.2f} MB vs {b_plain / 1e6:.2f} MB per site per round; secure sum vs exact average: "
              f"max |error| {err:.2e}, relative L2 {rel:.2e}; round 2 refused: {rows[-1]['status']}")
        assert b_sec > b_plain > 0
    finally:
        fed.stop()
        left = _sweep(marks)
    assert not left, f"processes left behind: {left}"
