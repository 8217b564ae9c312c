"""The Slurm scripts on a REAL single-node Slurm (Debian's slurmctld, slurmd, munge) that this
module brings up on localhost without systemd and tears down after: sample.sh's array + merge makes
a cohort that publishes; a training job sent USR1 checkpoints, requeues itself and resumes; a failed
evaluate.sh task shows FAILED and the report job never runs."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from medsyn_site.data.cohort import Cohort, validate_cohort
from medsyn_site.diffusion.engine import free_port
from medsyn_site.publish.release import publish

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and not shutil.which("sudo") or not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and cannot be (needs apt-get and root or passwordless sudo)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], check=True,
                   env=env, capture_output=True)


class Cluster:
    """munged + slurmctld + slurmd in a temp dir; the env the clients need."""

    def __init__(self, root: Path):
        if os.geteuid() != 0:
            pytest.skip("the test Slurm runs slurmd as root (SlurmUser=root); run the tests as root")
        self.root, self.procs = root, []
        try:
            self._up(root)
        except BaseException:
            self.stop()
            raise

    def _up(self, root: Path) -> None:
        for d in ("munge", "state", "spool", "log"):
            (root / d).mkdir(mode=0o755)
        shutil.chown(root / "munge", "munge", "munge")
        key, sock = root / "munge" / "munge.key", root / "munge" / "munge.socket"
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create", "--keyfile", str(key)], check=True)
        self._start(["runuser", "-u", "munge", "--", "munged", "--foreground", "--force", f"--socket={sock}",
                     f"--key-file={key}", f"--pid-file={root / 'munge' / 'munged.pid'}",
                     f"--log-file={root / 'munge' / 'munged.log'}", f"--seed-file={root / 'munge' / 'seed'}"])
        self._wait(lambda: sock.exists(), "munged socket")
        cpus = os.cpu_count() or 1
        mem = int(re.search(r"RealMemory=(\d+)", subprocess.run(["slurmd", "-C"], capture_output=True,
                                                                   text=True).stdout)[1])
        conf = root / "slurm.conf"
        conf.write_text(f"""ClusterName=medsyntest
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=20
CredType=cred/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root / 'log' / 'jobcomp.txt'}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MinJobAge=600
ReturnToService=2
SchedulerParameters=nohold_on_prolog_fail
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        # One count-only "GPU" so the scripts' --gres=gpu:1 is schedulable on this CPU machine.
        (root / "gres.conf").write_text("AutoDetect=off\nNodeName=localhost Name=gpu File=/dev/null\n")
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        self._start(["slurmctld", "-D", "-c", "-f", str(conf)])
        self._start(["slurmd", "-D", "-N", "localhost", "-f", str(conf)])
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, "an idle node")

    def _start(self, cmd: list[str]) -> None:
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           env=getattr(self, "env", None), start_new_session=True))

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))

    def _wait(self, ok, what: str, timeout: float = 60) -> None:
        end = time.time() + timeout
        while not ok():
            if time.time() > end:
                raise TimeoutError(f"waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, check=check)

    def sbatch(self, script: str, *opts: str, cwd: Path, env: dict) -> str:
        r = subprocess.run(["sbatch", "--parsable", *opts, str(REPO / "slurm" / script)], cwd=cwd,
                           env=self.env | env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """scontrol's fields of a job (kept MinJobAge seconds after it ends)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def states(self, job_id: str) -> dict[str, str]:
        """JobId -> state for a job and its array tasks."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return {m[0]: m[1] for m in re.findall(r"JobId=(\d+) .*?JobState=(\w+)", out)}

    def wait_done(self, job_id: str, timeout: float = 600) -> dict[str, str]:
        def done():
            s = self.states(job_id)
            return s and all(v in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") for v in s.values())
        self._wait(done, f"job {job_id}", timeout)
        return self.states(job_id)

    def stop(self) -> None:
        if getattr(self, "env", None):  # end this cluster's jobs first, so no job process outlives slurmd
            self.run("scancel", "--partition=debug", "--full")
            self._wait(lambda: not self.run("squeue", "-h").stdout.strip(), "jobs to end", 60)
        for p in reversed(self.procs):  # only what this class started
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster():
    _ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="medsyn-slurm-"))
    os.chmod(root, 0o755)
    c = None
    try:
        c = Cluster(root)
        yield c
    finally:
        if c:
            c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _job_env(key: Path | None = None) -> dict:
    """What the jobs need: the medsyn to use (this interpreter's, with this checkout importable)."""
    env = {"MEDSYN_VENV": str(Path(sys.executable).parent.parent), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MEDSYN_REPO": str(REPO)}
    return env | ({"MEDSYN_SITE_KEY": str(key)} if key else {})


def test_sample_array_merges_into_a_cohort_that_publishes(cluster, run, phantom_cohort, key, synth, tmp_path):
    env = _job_env(key) | {"MEDSYN_RUN": str(run), "MEDSYN_MASKS": f"relocate:{phantom_cohort}",
                           "MEDSYN_OUT": "synth", "MEDSYN_SAMPLER": "ddim", "MEDSYN_STEPS": "4", "MEDSYN_SEED": "1", "MEDSYN_DEVICE": "cpu",
                           "MEDSYN_LOG_DIR": str(tmp_path)}
    job = cluster.sbatch("sample.sh", "--array=0-1", "--cpus-per-task=1", cwd=tmp_path, env=env)
    states = cluster.wait_done(job)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert set(states.values()) == {"COMPLETED"}, logs
    merge = (tmp_path / "medsyn-sample-merge.jobid").read_text().strip()
    assert cluster.wait_done(merge) == {merge: "COMPLETED"}, logs
    out = tmp_path / "synth"
    assert validate_cohort(out) == [] and not (tmp_path / "synth.shards").exists()
    # The same volumes a single `medsyn sample` run makes (conftest's synth: same run, masks, seed).
    assert {c.id: c.sha256 for c in Cohort(out).cases} == {c.id: c.sha256 for c in Cohort(synth).cases}
    report = publish(out, phantom_cohort, tmp_path / "release", fmt="nifti", site_key=key)
    assert not [r for c in report["cases"] for r in c["reasons"] if "provenance" in r or "signed" in r]
    assert (tmp_path / "release" / "dataset_card.json").is_file()


def test_training_job_sent_usr1_checkpoints_requeues_and_resumes(cluster, phantom_cohort, tmp_path):
    env = _job_env() | {"MEDSYN_CONFIG": str(REPO / "tests" / "configs" / "train_test.yaml"),
                        "MEDSYN_COHORT": str(phantom_cohort), "MEDSYN_OUT": "run", "MEDSYN_STEPS": "60"}
    job = cluster.sbatch("train.sh", "--cpus-per-task=1", cwd=tmp_path, env=env)
    log = tmp_path / f"medsyn-train-{job}.out"
    metrics = tmp_path / "run" / "metrics.csv"
    cluster._wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 2, "training steps", 300)
    cluster.run("scancel", "--signal=USR1", "--batch", job, check=True)
    cluster._wait(lambda: "requeueing" in log.read_text(), "the requeue", 120)
    first = re.search(r"stopped by SIGUSR1 at step (\d+)", log.read_text())
    assert first, log.read_text()[-3000:]
    # A requeued job waits for its begin time: the credential lifetime (cred_expire, 20 s in this
    # cluster's slurm.conf; 120 s by default). Forcing an earlier start fails the job ("Job credential
    # revoked": the node still holds the first run's revoked credential).
    assert cluster.wait_done(job, 900) == {job: "COMPLETED"}, (cluster.job(job), cluster.logs(), log.read_text()[-3000:])
    text = log.read_text()
    assert int(cluster.job(job)["Restarts"]) == 1
    assert re.search(r"medsyn train .* --resume \(restart 1\)", text), text[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip().endswith("60"), text[-3000:]
    steps = [int(line.split(",")[0]) for line in metrics.read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # resumed: no step twice, none lost at the end


def test_failed_evaluate_task_is_failed_and_the_report_never_runs(cluster, phantom_cohort, tmp_path):
    ws = tmp_path / "ws"  # a workspace with the real arm only, its seed-0 training already finished
    (ws / "runs" / "real" / "seed0").mkdir(parents=True)
    (ws / "workspace.json").write_text(f'{{"arms": ["real"], "real": "{phantom_cohort}", "configuration": "2d"}}')
    from medsyn_site.evaluate.runs import RESULT, run_dir
    result = run_dir(ws, "real", 0) / RESULT
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text("{}")
    env = _job_env() | {"MEDSYN_WS": str(ws), "MEDSYN_ARMS": "real real+targeted", "MEDSYN_SEEDS": "1",
                        "MEDSYN_DEVICE": "cpu", "MEDSYN_LOG_DIR": str(tmp_path)}
    job = cluster.sbatch("evaluate.sh", "--array=0-1", "--cpus-per-task=1", "--no-requeue", cwd=tmp_path, env=env)
    states = cluster.wait_done(job)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert sorted(states.values()) == ["COMPLETED", "FAILED"], (states, logs)
    assert "arm 'real+targeted' was not prepared" in logs
    report = (tmp_path / "medsyn-evaluate-report.jobid").read_text().strip()
    time.sleep(3)
    info = cluster.job(report)
    assert info.get("JobState") in (None, "CANCELLED", "PENDING"), info  # never RUNNING nor COMPLETED
    assert not (ws / "report").exists()


def test_superlink_and_a_sites_supernode_run_as_jobs(cluster, phantom_cohort, tmp_path):
    """superlink.sh serves TLS with SuperNode authentication and publishes its address; the operator's
    CLI registers a site over TLS; that site's supernode.sh finds the SuperLink through the address
    file and comes online; scancel ends both and the address file goes."""
    import json

    from medsyn_site.federated import deploy

    names = {subprocess.run(["hostname", *f], capture_output=True, text=True).stdout.strip() for f in ([], ["-f"])}
    deploy.make_pki(tmp_path / "pki", tuple(n for n in names if n))  # as the README: --host "$(hostname -f)"
    key, pub = deploy.make_node_key(tmp_path / "site-a")
    port = free_port()
    env = _job_env() | {"MEDSYN_PKI": "pki", "MEDSYN_FL_PORT": str(port), "FLWR_HOME": str(tmp_path / "operator")}
    link = cluster.sbatch("superlink.sh", "--cpus-per-task=1", cwd=tmp_path, env=env)
    address = tmp_path / "superlink.address"
    log = tmp_path / f"medsyn-superlink-{link}.out"
    cluster._wait(lambda: address.exists() or cluster.job(link).get("JobState") not in ("PENDING", "RUNNING"),
                  "the SuperLink's address file", 180)
    assert address.exists(), log.read_text()
    host, _, got_port = address.read_text().strip().rpartition(":")
    assert host in names and got_port == str(port), address.read_text()

    bin_ = Path(sys.executable).parent
    op = cluster.env | env | {"PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}  # medsyn calls the venv's flwr
    subprocess.run([bin_ / "medsyn", "fl", "connect", "--superlink", f"127.0.0.1:{port}", "--ca", "pki/ca.pem"],
                   cwd=tmp_path, env=op, check=True, capture_output=True)
    end = time.time() + 120
    while (reg := subprocess.run([bin_ / "medsyn", "fl", "register", str(pub), "--name", "site-a"], env=op,
                                 capture_output=True, text=True)).returncode and time.time() < end:
        time.sleep(2)
    assert reg.returncode == 0, reg.stdout + reg.stderr + log.read_text()
    node_id = re.search(r"SuperNode (\d+)", reg.stdout)[1]

    site = env | {"MEDSYN_COHORT": str(phantom_cohort), "MEDSYN_FL_CA": "pki/ca.pem", "MEDSYN_FL_KEY": str(key),
                  "MEDSYN_FL_NODE_PORT": str(free_port()), "MEDSYN_DEVICE": "cpu", "FLWR_HOME": ""}
    node = cluster.sbatch("supernode.sh", "--cpus-per-task=1", cwd=tmp_path, env=site)

    def online():
        out = subprocess.run([bin_ / "flwr", "supernode", "list", deploy.CONNECTION, "--format", "json"], env=op,
                             capture_output=True, text=True).stdout
        try:
            return {n["node-id"] for n in json.loads(out)["nodes"] if n["status"] == "online"}
        except (ValueError, KeyError):
            return set()
    try:
        cluster._wait(lambda: node_id in {str(n) for n in online()}, "the site's SuperNode online", 180)
    except TimeoutError:
        raise AssertionError("".join(p.read_text() for p in tmp_path.glob("*.out"))) from None
    assert (tmp_path / "fl-work" / "flwr-home").is_dir()  # Flower's own folder stays in the site's work dir
    assert cluster.job(node)["JobState"] == cluster.job(link)["JobState"] == "RUNNING"
    cluster.run("scancel", node, link, check=True)
    assert set(cluster.wait_done(node, 120).values()) | set(cluster.wait_done(link, 120).values()) == {"CANCELLED"}
    cluster._wait(lambda: not address.exists(), "the address file removed", 30)
