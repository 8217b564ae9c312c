"""The Flower ClientApp (runs at a site, inside its SuperNode): one local round of the site's own
trainer from the global weights. Node config (``flower-supernode --node-config``): cohort, work-dir,
and optionally device, precision, threads, deepspeed-config (this site's hardware)."""
from __future__ import annotations

import re
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medsyn_site.federated import secure
from medsyn_site.federated.lifeline import exit_with_parent
from medsyn_site.federated.task import decode, encode, run_local_round, site_config

app = ClientApp(mods=[secure.secure_when_asked])  # Flower's secaggplus_mod in SecAgg+ rounds (federated/secure.py)
HARDWARE = {"device": str, "precision": str, "threads": int, "deepspeed-config": str}


@app.train()
def train(msg: Message, context: Context) -> Message:
    exit_with_parent()  # already watching when started through `medsyn fl supernode` (lifeline.py)
    if secure.is_secure(msg):  # a SecAgg+ round: Flower's legacy records, the update masked by the mod
        conf, start = secure.read_instruction(msg)
    else:
        conf, start = msg.content["config"], decode(msg.content["arrays"])
    node = context.node_config
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
    r = run_local_round(cfg, str(node["cohort"]), work, start, int(conf["local-steps"]), prox_mu=mu)
    metrics = {"num-examples": r.num_examples, "loss": r.loss, "steps": r.steps, "seconds": r.seconds}
    if secure.is_secure(msg):
        return secure.reply(msg, conf, start, r.weights, r.num_examples, metrics)
    metrics = MetricRecord(metrics)
    content = RecordDict({"arrays": encode(r.weights, str(conf["transfer"])), "metrics": metrics})
    return Message(content=content, reply_to=msg)
