"""One poisoned site against the aggregation (benchmarks/RESULTS.md, "Federated training").

Three sites train one local round each from the same global model (the site's own trainer,
`federated.task.run_local_round`, on its own phantom cohort); the third then sends its update scaled
1000x (a stolen key, a bug). Flower's strategies aggregate the replies exactly as the ServerApp hands
them over (Messages with the arrays and metrics): FedAvg, FedMedian, FedTrimmedAvg, and FedAvg after
this app's update validation (`server.check_update` / `norm_outliers`). Reported: the aggregate's
L2 distance from the honest sites' average, and its diffusion loss on held-out patches (64 fixed
noised patches of a phantom no site holds) beside the honest average's.

  python benchmarks/poisoning.py --out benchmarks/poisoning_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from medsyn_site.config import PhantomConfig, SplitConfig, load_config
from medsyn_site.data.cohort import Cohort
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.diffusion.model import build_unet, scheduler
from medsyn_site.diffusion.patches import PatchDataset
from medsyn_site.diffusion.train import diffusion_loss
from medsyn_site.federated import server
from medsyn_site.federated.task import decode, encode, run_local_round

CONFIG = Path(__file__).resolve().parent.parent / "tests" / "configs" / "federated_test.yaml"


def reply(weights: dict, n: int, node: int):
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # what a running ServerApp has set

    content = RecordDict({"arrays": encode(weights), "metrics": MetricRecord({"num-examples": n, "loss": 0.0})})
    return Message(content=content, dst_node_id=node, message_type="train")


def val_loss(cfg, weights: dict, cohort: Path) -> float:
    net = build_unet(cfg.model)
    net.load_state_dict(weights)
    net.eval()
    ds = PatchDataset(Cohort(cohort), "train", cfg.train.patch_size, cfg.diffusion.hu_window, 0.5, seed=123)
    batch = torch.utils.data.default_collate([ds[i] for i in range(64)])
    with torch.no_grad():
        return float(diffusion_loss(net, scheduler(cfg.diffusion), batch, cfg, 0, "cpu", torch.float32))


def distance(a: dict, b: dict) -> float:
    return server.update_norm(a, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/poisoning_cpu.json")
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--scale", type=float, default=1000.0)
    a = ap.parse_args()
    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 90))
    torch.manual_seed(0)
    cfg = load_config(CONFIG)
    tmp = Path(tempfile.mkdtemp())
    cohorts = []
    for k, seed in enumerate((41, 42, 43, 44)):  # three sites and a held-out phantom
        root = tmp / f"c{k}"
        write_phantom_cohort(PhantomConfig(cases=3, seed=seed, shape=(48, 48, 32), max_nodules=2),
                             SplitConfig(train=1.0, val=0.0), root)
        cohorts.append(root)
    glob = {k: v.detach().float().clone() for k, v in build_unet(cfg.model).state_dict().items()}
    ups = [run_local_round(cfg, cohorts[k], tmp / f"work{k}", glob, a.local_steps) for k in range(3)]
    honest = {k: (ups[0].weights[k] + ups[1].weights[k]) / 2 for k in glob}
    bad = {k: glob[k] + a.scale * (v - glob[k]) if v.is_floating_point() else v for k, v in ups[2].weights.items()}
    sent = [u.weights for u in ups[:2]] + [bad]
    rows = {"honest average (2 sites)": honest}
    from flwr.serverapp import strategy as fl

    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2,
                  min_evaluate_nodes=0)
    for name, strat in (("FedAvg", fl.FedAvg(**common)), ("FedMedian", fl.FedMedian(**common)),
                        ("FedTrimmedAvg (beta 0.34: one of three cut each end)", fl.FedTrimmedAvg(beta=0.34, **common))):
        arrays, _ = strat.aggregate_train(1, [reply(w, 2, i) for i, w in enumerate(sent)])
        rows[name] = decode(arrays)
    norms = {i: server.update_norm(w, glob) for i, w in enumerate(sent) if server.check_update(w, glob) is None}
    refused = server.norm_outliers(norms, [], 10.0)
    kept = [w for i, w in enumerate(sent) if i not in refused]
    arrays, _ = fl.FedAvg(**common).aggregate_train(1, [reply(w, 2, i) for i, w in enumerate(kept)])
    rows["FedAvg after update validation (medsyn)"] = decode(arrays)
    result = {"local_steps": a.local_steps, "scale": a.scale, "update_norms": {str(k): v for k, v in norms.items()},
              "refused_by_validation": {str(k): v for k, v in refused.items()},
              "global_model_loss": val_loss(cfg, glob, cohorts[3]), "rows": {}}
    for name, w in rows.items():
        finite = all(bool(torch.isfinite(v).all()) for v in w.values() if v.is_floating_point())
        result["rows"][name] = {"distance_from_honest_average": distance(w, honest),
                                "held_out_loss": val_loss(cfg, w, cohorts[3]) if finite else float("nan")}
        print(name, json.dumps(result["rows"][name]), flush=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
