"""The federation's server side: the global run dir (a normal run dir that `medsyn sample` and
`medsyn publish` read, one checkpoint per round, resumable) and a strategy wrapper that records each
round (per-site loss, bytes each way, round time), keeps the global EMA and writes the checkpoint.

Aggregation itself is Flower's (FedAvg / FedProx, optionally inside Flower's DP wrapper)."""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.serverapp.strategy import Strategy

from medsyn_site.atomic import atomic_write_text
from medsyn_site.config import CONFIG_DIR, Config, ConfigError, dump_config, load_config
from medsyn_site.diffusion.model import EMA, build_unet
from medsyn_site.diffusion.rundir import EMA_FILE, RunDir
from medsyn_site.federated.task import TRANSFERS, decode, encode, nbytes

log = logging.getLogger(__name__)
GLOBAL_FILE = "global.pt"  # the aggregated (not averaged-over-rounds) weights: what the next round starts from
ROUNDS_CSV = "rounds.csv"
FIELDS = ["round", "node_id", "status", "loss", "steps", "seconds", "num_examples", "bytes_down", "bytes_up",
          "round_seconds"]


class FederationError(RuntimeError):
    """A round cannot complete (too few sites replied); the global model stays at the last round."""


@dataclass
class Settings:
    """The ServerApp's run config ([tool.flwr.app.config], `flwr run --run-config`)."""

    run_dir: str
    config: str = "tiny.yaml"
    rounds: int = 3
    local_steps: int = 20
    min_sites: int = 2
    round_timeout: float = 3600.0
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    global_ema: float = 0.5
    transfer: str = "fp32"
    dp_noise: float = 0.0
    dp_clip: float = 1.0
    name: str = ""

    @classmethod
    def from_run_config(cls, rc: dict) -> "Settings":
        known = {k.replace("-", "_"): v for k, v in rc.items()}
        unknown = sorted(k for k in rc if k.replace("-", "_") not in cls.__dataclass_fields__)
        if unknown:  # strict, as the YAML configs are: a misspelt key must not fall back to a default
            raise ConfigError(f"run config: unknown key(s) {', '.join(unknown)}; known: "
                              + ", ".join(k.replace("_", "-") for k in cls.__dataclass_fields__))
        s = cls(**known)
        if s.transfer not in TRANSFERS:
            raise ConfigError(f"run config transfer={s.transfer!r}: use one of {', '.join(TRANSFERS)}")
        if s.strategy not in ("fedavg", "fedprox"):
            raise ConfigError(f"run config strategy={s.strategy!r}: use fedavg or fedprox")
        if s.min_sites < 1 or s.rounds < 1 or s.local_steps < 1:
            raise ConfigError("run config: min-sites, rounds and local-steps must be >= 1")
        if not s.run_dir:
            raise ConfigError("run config run-dir is empty: name the global run dir (on the SuperLink's machine)")
        return s

    def medsyn_config(self) -> Config:
        path = Path(self.config)
        return load_config(path if path.is_absolute() or path.exists() else CONFIG_DIR / path)


class GlobalRun:
    """The global run dir: config.yaml, federation.json, checkpoints/round_NNNNN/{ema.pt, global.pt},
    rounds.csv, tensorboard/, federation.log. Written atomically round by round; resumed on restart."""

    def __init__(self, s: Settings, cfg: Config, run_id: int | str):
        self.s, self.cfg, self.run_id = s, cfg, str(run_id)
        self.run = RunDir(s.run_dir)
        self.root = self.run.root
        if self.run.tags():
            self.run.check_resume(cfg)  # same model, diffusion and recipe, or a clear error
            tag = self.run.resume_tag  # the newest intact round (checksums)
            blob = torch.load(self.run.ckpt / tag / EMA_FILE, map_location="cpu")
            self.round = int(blob["round"])
            self.weights = torch.load(self.run.ckpt / tag / GLOBAL_FILE, map_location="cpu")
            self.ema = EMA(build_unet(cfg.model), s.global_ema)
            self.ema.load_state_dict(blob["ema"])
        else:
            self.run.create(cfg, force=(self.root / "federation.json").is_file())  # refuses foreign folders
            torch.manual_seed(cfg.train.seed)
            net = build_unet(cfg.model)
            self.weights = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
            self.ema = EMA(net, s.global_ema)
            self.round = 0
            atomic_write_text(self.root / ROUNDS_CSV, ",".join(FIELDS) + "\n")
        history = json.loads((self.root / "federation.json").read_text()) if (self.root / "federation.json").is_file() else {}
        atomic_write_text(self.root / "federation.json", json.dumps(
            {"name": self.name, "settings": vars(s), "flower_runs": history.get("flower_runs", []) + [self.run_id]},
            indent=1))
        self._handler = logging.FileHandler(self.root / "federation.log")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("medsyn_site").addHandler(self._handler)
        logging.getLogger("medsyn_site").setLevel(logging.INFO)
        if self.round:
            log.info("resuming federation %s at round %d of %d", self.root, self.round, s.rounds)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.root / "tensorboard"), purge_step=self.round + 1)

    @property
    def name(self) -> str:
        return self.s.name or self.root.name

    def save_round(self, rnd: int, weights: dict, rows: list[dict]) -> Path:
        """EMA update, then the round's checkpoint (the run dir's one checkpoint writer)."""
        self.weights = weights
        self.ema.decay = self.s.global_ema
        for k, v in weights.items():
            if rnd == 1 or not v.is_floating_point():  # the first round's model starts the average
                self.ema.shadow[k].copy_(v)
            else:
                self.ema.shadow[k].lerp_(v, 1 - self.ema.decay)
        tag = f"round_{rnd:05d}"
        ok = [r for r in rows if r["status"] == "ok"]
        fed = {"name": self.name, "flower_run_id": self.run_id, "round": rnd, "run_dir": str(self.root.resolve()),
               "sites": [r["node_id"] for r in ok], "strategy": self.s.strategy, "transfer": self.s.transfer,
               "dp_noise": self.s.dp_noise}
        ema = {"ema": self.ema.state_dict(), "step": rnd * self.s.local_steps, "round": rnd,
               "model": self.cfg.model.model_dump(mode="json"),
               "diffusion": self.cfg.diffusion.model_dump(mode="json"), "federation": fed}
        final = self.run.write_checkpoint(tag, {EMA_FILE: ema, GLOBAL_FILE: weights}, self.cfg.train.keep_checkpoints)
        self.round = rnd
        self._record(rnd, rows)
        return final

    def _record(self, rnd: int, rows: list[dict]) -> None:
        with open(self.root / ROUNDS_CSV, "a", newline="") as f:
            w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
            for r in rows:
                w.writerow({**r, "round": rnd})
        ok = [r for r in rows if r["status"] == "ok"]
        for r in ok:
            self.tb.add_scalar(f"site_{r['node_id']}/loss", r["loss"], rnd)
            self.tb.add_scalar(f"site_{r['node_id']}/bytes_up", r["bytes_up"], rnd)
            self.tb.add_scalar(f"site_{r['node_id']}/bytes_down", r["bytes_down"], rnd)
        if ok:
            n = sum(r["num_examples"] for r in ok)
            self.tb.add_scalar("global/loss", sum(r["loss"] * r["num_examples"] for r in ok) / n, rnd)
            self.tb.add_scalar("global/round_seconds", rows[0]["round_seconds"], rnd)
            self.tb.add_scalar("global/bytes", sum(r["bytes_up"] + r["bytes_down"] for r in rows), rnd)
        self.tb.flush()
        log.info("round %d: %s; round %.1f s", rnd, "; ".join(
            f"site {r['node_id']}: " + (f"loss {r['loss']:.4f}, {r['steps']} steps in {r['seconds']:.1f} s, "
                                        f"{r['bytes_down']} B down / {r['bytes_up']} B up"
                                        if r["status"] == "ok" else r["status"]) for r in rows),
            rows[0]["round_seconds"] if rows else 0.0)

    def close(self) -> None:
        self.tb.close()
        logging.getLogger("medsyn_site").removeHandler(self._handler)
        self._handler.close()


class Recorder(Strategy):
    """Wraps a Flower strategy: sends the global weights in the configured precision, decodes the
    sites' replies to fp32 before the inner strategy aggregates them, and after each round checks the
    minimum number of sites and hands the result to the GlobalRun."""

    def __init__(self, inner, run: GlobalRun, offset: int):
        self.inner, self.run, self.offset = inner, run, offset
        self.t0, self.down, self.sent = 0.0, {}, []

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round, arrays, config, grid):
        self.t0 = time.perf_counter()
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        wire = encode(decode(arrays), self.run.s.transfer)
        for m in messages:
            m.content["arrays"] = wire
        self.down = {m.metadata.dst_node_id: nbytes(wire) for m in messages}
        self.sent = messages  # the Grid sets their message ids when it pushes them
        log.info("round %d: sent the global model to %d site(s) (%d bytes each)",
                 self.offset + server_round, len(messages), nbytes(wire))
        return messages

    def aggregate_train(self, server_round, replies):
        from flwr.app import ArrayRecord

        rnd = self.offset + server_round
        replies = list(replies)
        rows, good, answered = [], [], set()
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
        for m in replies:
            # an error reply (e.g. Node Unavailable) comes from the SuperLink: name the site it was for
            node = to_node.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
            answered.add(node)
            row = {"node_id": node, "bytes_down": self.down.get(node, 0), "bytes_up": 0, "loss": "", "steps": "",
                   "seconds": "", "num_examples": ""}
            if m.has_error():
                rows.append({**row, "status": f"error: {m.error.reason}"})
                log.warning("round %d: site %s failed: %s", rnd, node, m.error.reason)
                continue
            arrays, metrics = m.content["arrays"], m.content["metrics"]
            row.update(status="ok", bytes_up=nbytes(arrays), loss=float(metrics["loss"]), steps=int(metrics["steps"]),
                       seconds=float(metrics["seconds"]), num_examples=int(metrics["num-examples"]))
            m.content["arrays"] = ArrayRecord(decode(arrays))  # fp32 for the aggregation
            rows.append(row)
            good.append(m)
        for node in sorted(set(self.down) - answered):
            rows.append({"node_id": node, "status": "no reply within round-timeout", "bytes_down": self.down[node],
                         "bytes_up": 0, "loss": "", "steps": "", "seconds": "", "num_examples": ""})
            log.warning("round %d: site %s sent no reply within %.0f s (dropped this round)", rnd, node,
                        self.run.s.round_timeout)
        elapsed = time.perf_counter() - self.t0
        for r in rows:
            r["round_seconds"] = round(elapsed, 3)
        if len(good) < self.run.s.min_sites:
            self.run._record(rnd, rows)
            raise FederationError(f"round {rnd}: {len(good)} site(s) replied, fewer than min-sites="
                                  f"{self.run.s.min_sites}; the global model stays at round {rnd - 1} in "
                                  f"{self.run.root}; start the run again to retry")
        arrays, metrics = self.inner.aggregate_train(server_round, good)
        self.run.save_round(rnd, {k: v.clone() for k, v in decode(arrays).items()}, rows)
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None


def build_strategy(s: Settings):
    """Flower's FedAvg or FedProx (weighted by examples), inside Flower's server-side DP wrapper
    (fixed clipping + Gaussian noise) when dp-noise > 0."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx

    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=s.min_sites,
                  min_available_nodes=s.min_sites, min_evaluate_nodes=0)
    inner = FedProx(proximal_mu=s.proximal_mu, **common) if s.strategy == "fedprox" else FedAvg(**common)
    if s.dp_noise > 0:
        inner = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=s.dp_noise, clipping_norm=s.dp_clip,
                                                           num_sampled_clients=s.min_sites)
    return inner


def run_federation(grid, run_config: dict, run_id) -> Path:
    """The ServerApp's work: resume or start the global run, then the remaining rounds."""
    from flwr.app import ArrayRecord, ConfigRecord

    s = Settings.from_run_config(run_config)
    cfg = s.medsyn_config()
    run = GlobalRun(s, cfg, run_id)
    try:
        todo = s.rounds - run.round
        if todo <= 0:
            log.info("federation %s already at round %d of %d", run.root, run.round, s.rounds)
            return run.root
        strategy = Recorder(build_strategy(s), run, offset=run.round)
        train_config = ConfigRecord({"medsyn-config": dump_config(cfg), "local-steps": s.local_steps,
                                     "transfer": s.transfer, "federation": run.name})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(run.weights), num_rounds=todo,
                       timeout=s.round_timeout, train_config=train_config)
        log.info("federation %s finished round %d; global EMA weights: %s", run.root, run.round,
                 run.run.latest_weights())
        return run.root
    finally:
        run.close()
