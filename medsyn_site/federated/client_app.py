"""The Flower ClientApp (runs at a site, inside its SuperNode): one local round of the site's own
trainer from the global weights. Node config (``flower-supernode --node-config``): cohort, work-dir,
and optionally device, precision, threads, deepspeed-config (this site's hardware)."""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medsyn_site.federated.task import decode, encode, run_local_round, site_config

app = ClientApp()
_watching: list[int] = []


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): existence only
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def exit_with_parent(grace: float = 10.0, poll: float = 1.0) -> None:
    """End this process when the Flower process that started it (the SuperExec) is gone, even if
    the main thread is blocked. Flower's own monitor is not enough: it raises SIGINT from a thread,
    whose handler runs only when the main thread returns to Python (not while a call to the dead
    SuperNode blocks or backs off), and it tests the parent with kill(pid, 0), which an unreaped
    zombie passes. Here: Flower's graceful exit first (SIGINT), then os._exit after ``grace`` s."""
    if _watching:
        return
    parent = os.getppid()
    _watching.append(parent)

    def watch() -> None:
        while os.getppid() == parent and _alive(parent):
            time.sleep(poll)
        signal.raise_signal(signal.SIGINT)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="medsyn-exit-with-parent", daemon=True).start()
HARDWARE = {"device": str, "precision": str, "threads": int, "deepspeed-config": str}


@app.train()
def train(msg: Message, context: Context) -> Message:
    exit_with_parent()  # a killed SuperNode leaves nothing of this site running
    node, conf = context.node_config, msg.content["config"]
    for key in ("cohort", "work-dir"):
        if key not in node:
            raise ValueError(f"node config has no {key!r}: start the SuperNode with `medsyn fl supernode --cohort ... "
                             f"--work-dir ...`")
    hardware = {k.replace("-", "_"): cast(node[k]) for k, cast in HARDWARE.items() if k in node}
    cfg = site_config(str(conf["medsyn-config"]), hardware)
    mu = float(conf["proximal-mu"]) if "proximal-mu" in conf else 0.0
    # one local run dir per federation (its optimizer state and data order carry across rounds)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(conf["federation"])) if "federation" in conf else "federation"
    work = Path(str(node["work-dir"])) / name
    r = run_local_round(cfg, str(node["cohort"]), work, decode(msg.content["arrays"]), int(conf["local-steps"]),
                        prox_mu=mu)
    metrics = MetricRecord({"num-examples": r.num_examples, "loss": r.loss, "steps": r.steps, "seconds": r.seconds})
    content = RecordDict({"arrays": encode(r.weights, str(conf["transfer"])), "metrics": metrics})
    return Message(content=content, reply_to=msg)
