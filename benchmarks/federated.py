"""Does federated training work? Two phantom sites with different data (seeds and nodule mixes),
R rounds of K local steps per site, against centralized training on the union of their training
cases for the same total number of steps; validation loss (fixed patches, timesteps and noise, from
both sites' validation cases) after every round, and the bytes each round moves.

The rounds run without the network: each site's local round is the federation's own
(``run_local_round``: the `medsyn train` Trainer, in this process), the average is Flower's FedAvg
aggregation (``aggregate_arrayrecords``) over the weights as they travel (``encode``/``decode``),
so loss and bytes are those of `medsyn fl`; gRPC time is predicted, not measured.

    python benchmarks/federated.py --rounds 5 --local-steps 10 --out benchmarks/federated_cpu.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _common import report
from medsyn_site.config import PhantomConfig, SplitConfig, load_config
from medsyn_site.data.cohort import Cohort, CohortWriter
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.diffusion.model import build_unet, scheduler
from medsyn_site.diffusion.patches import PatchDataset
from medsyn_site.diffusion.train import diffusion_loss
from medsyn_site.federated.task import decode, encode, nbytes, run_local_round

CONFIG = Path(__file__).resolve().parent.parent / "tests" / "configs" / "federated_test.yaml"
SITES = {"a": dict(seed=31, max_nodules=4), "b": dict(seed=32, max_nodules=1)}  # many vs few nodules


def union(cohorts: list[Path], out: Path) -> Path:
    """One cohort holding every case of ``cohorts`` (what centralized training would see)."""
    with CohortWriter(out) as w:
        for c in map(Cohort, cohorts):
            for r in c.cases:
                img, msk = c.read(r.id)
                w.add(f"{c.root.name}-{r.id}", patient=f"{c.root.name}-{r.patient}", split=r.split, source=r.source,
                      image=img, mask=msk)
    return out


@torch.no_grad()
def val_loss(cfg, weights: dict, cohorts: list[Path], n_batches: int = 6) -> float:
    """The diffusion loss on fixed validation patches of every site, fixed timesteps and noise."""
    net = build_unet(cfg.model)
    net.load_state_dict(weights)
    net.eval()
    sched = scheduler(cfg.diffusion)
    losses = []
    for c in cohorts:
        data = PatchDataset(Cohort(c), "val", cfg.train.patch_size, cfg.diffusion.hu_window, 0.5, seed=123)
        for i in range(n_batches):
            batch = {k: torch.stack([data[2 * i + j][k] for j in range(2)]) for k in ("image", "mask", "coords")}
            losses.append(diffusion_loss(net, sched, batch, cfg, 10_000 + i, torch.device("cpu"), torch.float32).item())
    return sum(losses) / len(losses)


def fedavg(results: list, transfer: str) -> tuple[dict, int]:
    """Flower's FedAvg over the replies as they travel; returns the average and the bytes sent up."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    wires = [encode(r.weights, transfer) for r in results]
    replies = [RecordDict({"arrays": ArrayRecord(decode(w)), "metrics": MetricRecord({"num-examples": r.num_examples})})
               for w, r in zip(wires, results)]
    return decode(aggregate_arrayrecords(replies, "num-examples")), sum(nbytes(w) for w in wires)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--transfer", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    tmp = Path(tempfile.mkdtemp(prefix="medsyn-fed-bench-"))
    try:
        cohorts = []
        for name, kw in SITES.items():
            out = tmp / f"site_{name}"
            write_phantom_cohort(PhantomConfig(cases=a.cases, shape=(48, 48, 32), **kw),
                                 SplitConfig(train=0.6, val=0.4), out)
            cohorts.append(out)
        central = union(cohorts, tmp / "union")
        torch.manual_seed(cfg.train.seed)
        init = {k: v.float() for k, v in build_unet(cfg.model).state_dict().items()}
        rows = [{"round": 0, "fed_val_loss": val_loss(cfg, init, cohorts), "central_val_loss": None}]
        rows[0]["central_val_loss"] = rows[0]["fed_val_loss"]
        glob, cen = init, init
        for rnd in range(1, a.rounds + 1):
            t0 = time.perf_counter()
            down = sum(nbytes(encode(glob, a.transfer)) for _ in cohorts)
            results = [run_local_round(cfg, c, tmp / f"work_{c.name}", decode(encode(glob, a.transfer)), a.local_steps)
                       for c in cohorts]
            glob, up = fedavg(results, a.transfer)
            fed_s = time.perf_counter() - t0
            # centralized: the same number of steps this round as all sites together, on the union
            central_steps = a.local_steps * len(cohorts)
            cen = run_local_round(cfg, central, tmp / "work_central", cen, central_steps).weights
            rows.append({"round": rnd, "steps_per_site": rnd * a.local_steps, "central_steps": rnd * central_steps,
                         "site_losses": [r.loss for r in results], "fed_val_loss": val_loss(cfg, glob, cohorts),
                         "central_val_loss": val_loss(cfg, cen, cohorts), "bytes_down": down, "bytes_up": up,
                         "round_seconds_no_network": fed_s})
            print(rows[-1], flush=True)
        params = sum(v.numel() for k, v in init.items() if v.is_floating_point())
        bytes_per_param = {"fp32": 4, "bf16": 2}[a.transfer]
        measured = rows[-1]["bytes_up"] / len(cohorts) / params
        predict = {}
        for mbit in (100, 1000):  # a hospital uplink; gRPC also tops out near 500 Mbit/s
            rate = min(mbit, 500) * 1e6 / 8
            for t, bpp in (("fp32", 4), ("bf16", 2)):
                payload = 67.0e6 * bpp * measured / bytes_per_param
                predict[f"{t}@{mbit}Mbit"] = {"bytes_each_way_per_site": payload,
                                              "seconds_each_way": payload / rate}
        report({"config": str(CONFIG), "rounds": a.rounds, "local_steps": a.local_steps, "transfer": a.transfer,
                "sites": {k: {**v, "train_cases": len(Cohort(tmp / f"site_{k}").split("train"))} for k, v in SITES.items()},
                "tiny_params": params, "wire_bytes_per_param": measured, "rows": rows,
                "final": {"fed_val_loss": rows[-1]["fed_val_loss"], "central_val_loss": rows[-1]["central_val_loss"],
                          "initial_val_loss": rows[0]["fed_val_loss"]},
                "prediction_67M_per_round": predict}, a.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
