"""The federation's server side: the global run dir (a normal run dir that `medsyn sample` and
`medsyn publish` read, one checkpoint per round, resumable) and a strategy wrapper that records each
round (per-site loss, bytes each way, round time), keeps the global EMA and writes the checkpoint.

Every site's update is input from another party and is validated before aggregation
(``check_update``, ``norm_outliers``): exactly the global model's keys, shapes and dtypes, finite,
and not too far from the global model; a bad one is dropped for the round, with its reason in
rounds.csv, and a site dropped in ``alert-after`` rounds in a row is reported. Aggregation itself is
Flower's: FedAvg / FedProx, or the robust FedMedian / FedTrimmedAvg, optionally inside Flower's DP
wrapper. (Krum is not offered: it needs more than 2f + 2 sites to outvote f attackers, so the 2-4
sites of a hospital consortium leave it f = 0.)"""
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
from medsyn_site.diffusion.rundir import EMA_FILE, RunDir, ema_blob
from medsyn_site.federated.task import TRANSFERS, decode, encode, nbytes

log = logging.getLogger(__name__)
GLOBAL_FILE = "global.pt"  # the aggregated (not averaged-over-rounds) weights: what the next round starts from
ROUNDS_CSV = "rounds.csv"
FIELDS = ["round", "node_id", "status", "loss", "steps", "seconds", "num_examples", "bytes_down", "bytes_up",
          "round_seconds", "update_norm"]
STRATEGIES = ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg")
REFUSED = "refused: "  # the status of an update that failed validation


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
    trim_beta: float = 0.2  # fedtrimmedavg: the fraction cut at each end
    update_norm_ratio: float = 10.0  # an update farther than this x the round's reference norm is refused (0: off)
    max_update_norm: float = 0.0  # the operator's absolute bound on an update's L2 distance (0: none)
    alert_after: int = 2  # report a site refused in this many rounds in a row
    secagg: bool = False  # SecAgg+ (federated/secure.py): the server sees only the sum of the sites' updates
    secagg_threshold: float = 0.67  # the fraction of the sites whose shares rebuild a dropped site's mask
    secagg_clip: float = 0.5  # SecAgg+'s per-coordinate range of an update (a site counts what it clips)
    secagg_max_weight: float = 100.0  # the most training cases a site may have (SecAgg+'s weights scale by it)
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
        if s.strategy not in STRATEGIES:
            raise ConfigError(f"run config strategy={s.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if s.min_sites < 1 or s.rounds < 1 or s.local_steps < 1:
            raise ConfigError("run config: min-sites, rounds and local-steps must be >= 1")
        if s.secagg and (s.strategy not in ("fedavg", "fedprox") or s.dp_noise > 0):
            raise ConfigError(f"run config: secagg hides each site's update, which strategy={s.strategy!r}"
                              + (" and dp-noise" if s.dp_noise > 0 else "") + " need; use strategy=\"fedavg\" "
                              "(or fedprox) and dp-noise=0 with secagg")
        if s.secagg and not (0 < s.secagg_threshold <= 1 and s.secagg_clip > 0 and s.secagg_max_weight > 0):
            raise ConfigError("run config: secagg-threshold must be in (0, 1], secagg-clip and secagg-max-weight > 0")
        if not s.run_dir:
            raise ConfigError("run config run-dir is empty: name the global run dir (on the SuperLink's machine)")
        return s

    def medsyn_config(self) -> Config:
        path = Path(self.config)
        return load_config(path if path.is_absolute() or path.exists() else CONFIG_DIR / path)


def check_update(update: dict, reference: dict) -> str | None:
    """Why a site's weights cannot be aggregated with the global model ``reference``, or None: they
    must have exactly its keys, shapes and dtypes, and finite values."""
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        return (f"keys differ from the global model's ({len(missing)} missing, e.g. {missing[:2]}; "
                f"{len(extra)} unexpected, e.g. {extra[:2]})")
    for k, ref in reference.items():
        v = update[k]
        if tuple(v.shape) != tuple(ref.shape):
            return f"{k}: shape {tuple(v.shape)}, the global model's is {tuple(ref.shape)}"
        if v.dtype != ref.dtype:
            return f"{k}: dtype {v.dtype}, the global model's is {ref.dtype}"
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"{k}: non-finite values (NaN or inf)"
    return None


def update_norm(update: dict, reference: dict) -> float:
    """The L2 distance of a site's weights from the global model it started from."""
    return float(sum(((update[k] - v) ** 2).sum() for k, v in reference.items() if v.is_floating_point()) ** 0.5)


def norm_outliers(norms: dict, history: list[float], ratio: float, limit: float = 0.0) -> dict:
    """{site: reason} for updates too far from the global model: above the operator's ``limit``
    (0: none), or above ``ratio`` x the reference, the LOWER median of this round's norms and the
    accepted norms of earlier rounds. The lower median, so that with two sites a huge update cannot
    raise the bar for itself (but a site that sends nothing cannot lower it below its own history)."""
    pool = sorted(list(norms.values()) + list(history))
    ref = pool[(len(pool) - 1) // 2] if pool else 0.0
    out = {}
    for node, n in norms.items():
        if limit > 0 and n > limit:
            out[node] = f"update norm {n:.4g} above the operator's max-update-norm {limit:g}"
        elif ratio > 0 and ref > 0 and n > ratio * ref:
            out[node] = f"update norm {n:.4g} above {ratio:g} x the round's reference {ref:.4g}"
    return out


class GlobalRun:
    """The global run dir: config.yaml, federation.json, checkpoints/round_NNNNN/{ema.pt, global.pt},
    rounds.csv, tensorboard/, federation.log. Written atomically round by round; resumed on restart."""

    def __init__(self, s: Settings, cfg: Config, run_id: int | str):
        self.s, self.cfg, self.run_id = s, cfg, str(run_id)
        self.run = RunDir(s.run_dir)
        self.root = self.run.root
        if self.run.tags():
            self.run.check_resume(cfg)  # same model, diffusion and recipe, or a clear error
            self._upgrade_rounds_csv()
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

    def rows(self) -> list[dict]:
        """rounds.csv as written so far."""
        with open(self.root / ROUNDS_CSV, newline="") as f:
            return list(csv.DictReader(f))

    def _upgrade_rounds_csv(self) -> None:  # a run dir from before the update_norm column
        rows = self.rows()
        if rows and set(rows[0]) != set(FIELDS):
            text = [",".join(FIELDS)] + [",".join(str(r.get(k) or "") for k in FIELDS) for r in rows]
            atomic_write_text(self.root / ROUNDS_CSV, "\n".join(text) + "\n")

    def accepted_norms(self, rounds: int = 3) -> list[float]:
        """The update norms aggregated in the last ``rounds`` rounds (the norm check's history)."""
        rows = [r for r in self.rows() if r["status"] == "ok" and r.get("update_norm")]
        last = sorted({int(r["round"]) for r in rows})[-rounds:]
        return [float(r["update_norm"]) for r in rows if int(r["round"]) in last]

    def refused_streak(self, node) -> int:
        """In how many of the last rounds in a row this site's update was refused."""
        by_round = {}
        for r in self.rows():
            if str(r["node_id"]) == str(node):
                by_round[int(r["round"])] = r["status"]
        n = 0
        for rnd in sorted(by_round, reverse=True):
            if not by_round[rnd].startswith(REFUSED):
                break
            n += 1
        return n

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
        ema = ema_blob(self.ema.state_dict(), rnd * self.s.local_steps, self.cfg, round=rnd, federation=fed)
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
        candidates = []  # (message, fp32 weights, row) of the replies that passed the checks so far
        for m in replies:
            # an error reply (e.g. Node Unavailable) comes from the SuperLink: name the site it was for
            node = to_node.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
            answered.add(node)
            row = {"node_id": node, "bytes_down": self.down.get(node, 0), "bytes_up": 0, "loss": "", "steps": "",
                   "seconds": "", "num_examples": "", "update_norm": ""}
            if m.has_error():
                rows.append({**row, "status": f"error: {m.error.reason}"})
                log.warning("round %d: site %s failed: %s", rnd, node, m.error.reason)
                continue
            try:  # everything a site sends is untrusted input
                arrays, metrics = m.content["arrays"], m.content["metrics"]
                row.update(bytes_up=nbytes(arrays), loss=float(metrics["loss"]), steps=int(metrics["steps"]),
                           seconds=float(metrics["seconds"]), num_examples=int(metrics["num-examples"]))
                weights = decode(arrays)
                reason = check_update(weights, self.run.weights)
                if not reason and not row["num_examples"] > 0:
                    reason = f"num-examples {row['num_examples']} (must be > 0)"
            except Exception as e:  # noqa: BLE001 (a malformed reply of any kind)
                weights, reason = None, f"malformed reply ({type(e).__name__}: {e})"[:300]
            if reason:
                self._refuse(rnd, row, reason, rows)
                continue
            row["update_norm"] = update_norm(weights, self.run.weights)
            candidates.append((m, weights, row))
        s = self.run.s
        far = norm_outliers({row["node_id"]: row["update_norm"] for _, _, row in candidates},
                            self.run.accepted_norms(), s.update_norm_ratio, s.max_update_norm)
        for m, weights, row in candidates:
            if row["node_id"] in far:
                self._refuse(rnd, row, far[row["node_id"]], rows)
                continue
            m.content["arrays"] = ArrayRecord(weights)  # fp32 for the aggregation
            rows.append({**row, "status": "ok"})
            good.append(m)
        for node in sorted(set(self.down) - answered):
            rows.append({"node_id": node, "status": "no reply within round-timeout", "bytes_down": self.down[node],
                         "bytes_up": 0, "loss": "", "steps": "", "seconds": "", "num_examples": ""})
            log.warning("round %d: site %s sent no reply within %.0f s (dropped this round)", rnd, node,
                        self.run.s.round_timeout)
        elapsed = time.perf_counter() - self.t0
        for r in rows:
            r["round_seconds"] = round(elapsed, 3)
        if len(good) < s.min_sites:
            self.run._record(rnd, rows)
            self._alert(rows)
            raise FederationError(f"round {rnd}: {len(good)} site update(s) accepted, fewer than min-sites="
                                  f"{self.run.s.min_sites}; the global model stays at round {rnd - 1} in "
                                  f"{self.run.root}; start the run again to retry")
        arrays, metrics = self.inner.aggregate_train(server_round, good)
        self.run.save_round(rnd, {k: v.clone() for k, v in decode(arrays).items()}, rows)
        self._alert(rows)
        return arrays, metrics

    def _alert(self, rows: list[dict]) -> None:
        """Tell the operator about a site whose update was refused ``alert-after`` rounds in a row."""
        for r in rows:
            streak = self.run.refused_streak(r["node_id"]) if r["status"].startswith(REFUSED) else 0
            if streak >= self.run.s.alert_after:
                log.error("site %s: its update was refused in the last %d rounds in a row (now: %s); check that "
                          "site (its software, its data, its key) before the next run", r["node_id"], streak,
                          r["status"][len(REFUSED):])

    def _refuse(self, rnd: int, row: dict, reason: str, rows: list[dict]) -> None:
        rows.append({**row, "status": REFUSED + reason, "update_norm": row.get("update_norm", "")})
        log.warning("round %d: site %s's update refused (dropped this round): %s", rnd, row["node_id"], reason)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None


def build_strategy(s: Settings):
    """Flower's FedAvg or FedProx (weighted by examples), or its robust FedMedian (coordinate-wise
    median) or FedTrimmedAvg (``trim-beta`` cut at each end), inside Flower's server-side DP wrapper
    (fixed clipping + Gaussian noise) when dp-noise > 0."""
    from flwr.serverapp import strategy as fl

    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=s.min_sites,
                  min_available_nodes=s.min_sites, min_evaluate_nodes=0)
    inner = {"fedavg": lambda: fl.FedAvg(**common), "fedprox": lambda: fl.FedProx(proximal_mu=s.proximal_mu, **common),
             "fedmedian": lambda: fl.FedMedian(**common),
             "fedtrimmedavg": lambda: fl.FedTrimmedAvg(beta=s.trim_beta, **common)}[s.strategy]()
    if s.dp_noise > 0:
        inner = fl.DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=s.dp_noise, clipping_norm=s.dp_clip,
                                                           num_sampled_clients=s.min_sites)
    return inner


def run_federation(grid, run_config: dict, run_id, context=None) -> Path:
    """The ServerApp's work: resume or start the global run, then the remaining rounds (SecAgg+ rounds
    through federated/secure.py, which needs the ServerApp's ``context``)."""
    from flwr.app import ArrayRecord, ConfigRecord

    s = Settings.from_run_config(run_config)
    cfg = s.medsyn_config()
    run = GlobalRun(s, cfg, run_id)
    try:
        todo = s.rounds - run.round
        if todo <= 0:
            log.info("federation %s already at round %d of %d", run.root, run.round, s.rounds)
            return run.root
        train_config = {"medsyn-config": dump_config(cfg), "local-steps": s.local_steps,
                        "transfer": s.transfer, "federation": run.name}
        if s.secagg:
            from medsyn_site.federated.secure import run_rounds

            if s.strategy == "fedprox":  # (Flower's FedProx adds it to its own messages)
                train_config["proximal-mu"] = s.proximal_mu
            run_rounds(grid, context, run, todo, train_config)
            log.info("federation %s finished round %d (SecAgg+); global EMA weights: %s", run.root, run.round,
                     run.run.latest_weights())
            return run.root
        strategy = Recorder(build_strategy(s), run, offset=run.round)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(run.weights), num_rounds=todo,
                       timeout=s.round_timeout, train_config=ConfigRecord(train_config))
        log.info("federation %s finished round %d; global EMA weights: %s", run.root, run.round,
                 run.run.latest_weights())
        return run.root
    finally:
        run.close()
