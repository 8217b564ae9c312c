"""How long does one Flower round take at a site? A real federation on 127.0.0.1 (SuperLink and one
SuperNode, `medsyn fl` as a user runs it, insecure: TLS is not what is timed), R rounds of K local
steps of the test-size model on a small phantom cohort. Reports each round's wall time as the
ServerApp saw it (rounds.csv: send, the site's whole ClientApp, receive, aggregate, checkpoint) and
the local training time the site reported.

    python benchmarks/flower_round.py --rounds 3 --local-steps 2 --out /tmp/flower_round.json

Run it from another checkout with PYTHONPATH=that/checkout to time that version's ClientApp with the
same environment.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "tests" / "configs" / "federated_test.yaml"
MEDSYN = [sys.executable, "-m", "medsyn_site.cli"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import medsyn_site
    from medsyn_site.config import PhantomConfig, SplitConfig
    from medsyn_site.diffusion.engine import free_port
    from medsyn_site.data.phantom import write_phantom_cohort

    tmp = Path(tempfile.mkdtemp(prefix="flower_round_"))
    env = {**os.environ, "FLWR_HOME": str(tmp / "flwr"), "OMP_NUM_THREADS": "1"}
    procs, keep = [], False
    try:
        write_phantom_cohort(PhantomConfig(cases=3, seed=21, shape=(48, 48, 32), max_nodules=4),
                             SplitConfig(train=0.67, val=0.33), tmp / "cohort")
        link = f"127.0.0.1:{free_port()}"
        for name, args in (("superlink", ["fl", "superlink", "--insecure", "--host", "127.0.0.1", "--port",
                                          link.split(":")[1]]),
                           ("supernode", ["fl", "supernode", "--insecure", "--superlink", link, "--cohort",
                                          str(tmp / "cohort"), "--work-dir", str(tmp / "work"), "--port",
                                          str(free_port()), "--threads", "1"])):
            log = open(tmp / f"{name}.log", "w")
            procs.append(subprocess.Popen(MEDSYN + args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            time.sleep(3)
        subprocess.run(MEDSYN + ["fl", "connect", "--superlink", link, "--insecure"], env=env, check=True,
                       capture_output=True)
        run_dir = tmp / "global"
        t0 = time.perf_counter()
        done = subprocess.run(MEDSYN + ["fl", "run", "--run-config",
                                        f'run-dir="{run_dir}" config="{CONFIG}" local-steps={a.local_steps} '
                                        f'rounds={a.rounds} min-sites=1 round-timeout=600.0'],
                              env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            keep = True
            sys.exit(f"flower run failed (logs in {tmp}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
        with open(run_dir / "rounds.csv") as f:
            rows = list(csv.DictReader(f))
        result = {"command": "python benchmarks/flower_round.py " + " ".join(sys.argv[1:]),
                  "medsyn_site": str(Path(medsyn_site.__file__).parent), "run_wall_s": round(wall, 1),
                  "round_s": [float(r["round_seconds"]) for r in rows],
                  "local_train_s": [round(float(r["seconds"]), 2) for r in rows]}
        print(json.dumps(result))
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
