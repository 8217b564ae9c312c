"""SecAgg+ rounds (run config ``secagg = true``): Flower's ``SecAggPlusWorkflow`` at the server and
``secaggplus_mod`` at each site, so that the server learns only the weighted sum of the sites'
updates, never one site's.

Flower 1.41 runs SecAgg+ only inside its legacy workflow (``DefaultWorkflow`` with a
``LegacyContext`` and a legacy ``Strategy``; the Message-API strategies of ``server.py`` cannot host
it), so this is the federation's second round loop; the global run dir, rounds.csv, checkpoints and
resume are the same ``GlobalRun``.

What travels is each site's update (its weights minus the global model's, in the global model's key
order), not its weights: SecAgg+ quantizes within ``[-secagg-clip, secagg-clip]`` per coordinate, and
updates are 100-1000x smaller than weights, so the same integers resolve them 100-1000x finer. A
site counts the coordinates it had to clip and reports them.

Validation moves to the aggregate: the per-site checks of ``server.py`` need each site's update,
which SecAgg+ hides by design. The securely summed update must have the global model's keys and
shapes, be finite, and stay within ``update-norm-ratio`` x the norms of earlier rounds' accepted
updates or ``max-update-norm``; otherwise the whole round is refused (every site's row in rounds.csv
says so), the global model stays at the last round, and the run stops. SecAgg+ cannot say which site
it was. Robust aggregation (median, trimmed mean) and server-side DP need individual updates too, and
are refused with ``secagg``.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from medsyn_site.federated.server import (REFUSED, FederationError, GlobalRun, check_update, norm_outliers,
                                          update_norm)

log = logging.getLogger(__name__)
KEYS = "medsyn-keys"  # fit config: the global model's keys, newline-separated (the order of the arrays)
CLIP = "secagg-clip"  # fit config: SecAgg+'s clipping range (the site counts what it clips)
MAX_WEIGHT = "secagg-max-weight"  # fit config: SecAgg+'s max_weight (a site's training cases must not exceed it)


# -- the site's side (client_app.py) -------------------------------------------------------------
def secure_when_asked(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round; every other message as is."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def is_secure(msg: Message) -> bool:
    """A SecAgg+ round's train instruction (legacy FitIns records) rather than the Message API's."""
    return "fitins.parameters" in msg.content.array_records


def read_instruction(msg: Message) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, global weights) of a SecAgg+ round's train instruction."""
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins

    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    keys = str(fitins.config[KEYS]).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(keys):
        raise ValueError(f"SecAgg+ instruction: {len(arrays)} arrays for {len(keys)} keys")
    return dict(fitins.config), {k: torch.from_numpy(np.array(a, np.float32)) for k, a in zip(keys, arrays)}


def reply(msg: Message, config: dict, start: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
          num_examples: int, metrics: dict) -> Message:
    """The site's update (weights - start) as a legacy FitRes, which ``secaggplus_mod`` masks."""
    from flwr.common import Code, FitRes, Status
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    if num_examples > float(config[MAX_WEIGHT]):
        raise ValueError(f"this site trains on {num_examples} cases, more than the federation's secagg-max-weight "
                         f"{config[MAX_WEIGHT]:g}: ask the operator to raise it (SecAgg+'s integers would overflow)")
    clip = float(config[CLIP])
    deltas = [(weights[k].float() - start[k]).numpy() for k in str(config[KEYS]).split("\n")]
    clipped = int(sum((np.abs(d) > clip).sum() for d in deltas))
    if clipped:
        log.warning("SecAgg+: %d update coordinates beyond secagg-clip %g were clipped", clipped, clip)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(deltas), num_examples,
                 {**metrics, "secagg-clipped": clipped})
    return Message(content=fitres_to_recorddict(res, keep_input=True), reply_to=msg)


# -- the server's side ---------------------------------------------------------------------------
def payload_bytes(msg: Message) -> int:
    """Bytes of a message's arrays and config values (SecAgg+'s keys, shares and masked vectors)."""
    if msg.has_error():
        return 0
    c = msg.content
    n = sum(len(a.data) for rec in c.array_records.values() for a in rec.values())
    for rec in c.config_records.values():
        for v in rec.values():
            n += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in (v if isinstance(v, list) else [v]))
    return n


class CountingGrid:
    """Flower's Grid, counting each site's payload bytes both ways over a round's four SecAgg+ stages."""

    def __init__(self, grid):
        self._grid, self.down, self.up = grid, {}, {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            self.down[m.metadata.dst_node_id] = self.down.get(m.metadata.dst_node_id, 0) + payload_bytes(m)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for m in replies:
            self.up[m.metadata.src_node_id] = self.up.get(m.metadata.src_node_id, 0) + payload_bytes(m)
        return replies

    def take(self) -> tuple[dict, dict]:
        out = (self.down, self.up)
        self.down, self.up = {}, {}
        return out


class SecureRecorder(FedAvg):
    """Flower's legacy FedAvg as SecAgg+ needs it: sends the global model with the keys' order, adds
    the securely summed update to it, checks it and writes the round to the GlobalRun."""

    def __init__(self, run: GlobalRun, offset: int, train_config: dict, grid: CountingGrid):
        s, self.keys = run.s, list(run.weights)
        config = {**train_config, KEYS: "\n".join(self.keys), CLIP: s.secagg_clip, MAX_WEIGHT: s.secagg_max_weight}
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=s.min_sites, min_evaluate_clients=0,
                         min_available_clients=s.min_sites, accept_failures=True,
                         on_fit_config_fn=lambda rnd: dict(config),
                         initial_parameters=ndarrays_to_parameters([run.weights[k].numpy() for k in self.keys]))
        self.run, self.offset, self.grid, self.t0 = run, offset, grid, 0.0

    def configure_fit(self, server_round, parameters, client_manager):
        self.t0 = time.perf_counter()
        self.grid.take()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        run, s, rnd = self.run, self.run.s, self.offset + server_round
        down, up = self.grid.take()
        elapsed = round(time.perf_counter() - self.t0, 3)
        rows = []
        for proxy, res in results:
            m = res.metrics
            rows.append({"node_id": proxy.node_id, "status": "ok", "loss": float(m.get("loss", "nan")),
                         "steps": int(m.get("steps", 0)), "seconds": float(m.get("seconds", 0.0)),
                         "num_examples": res.num_examples, "bytes_down": down.get(proxy.node_id, 0),
                         "bytes_up": up.get(proxy.node_id, 0), "update_norm": ""})
            if m.get("secagg-clipped"):
                log.warning("round %d: site %s clipped %s update coordinates to secagg-clip %g", rnd,
                            proxy.node_id, m["secagg-clipped"], s.secagg_clip)
        for node in sorted(set(down) - {r["node_id"] for r in rows}):
            rows.append({"node_id": node, "status": "no masked update in time (dropped this round)",
                         "bytes_down": down[node], "bytes_up": up.get(node, 0), "loss": "", "steps": "",
                         "seconds": "", "num_examples": "", "update_norm": ""})
        for r in rows:
            r["round_seconds"] = elapsed
        if len(results) < s.min_sites:
            run._record(rnd, rows)
            raise FederationError(f"round {rnd}: {len(results)} site(s) in the secure sum, fewer than min-sites="
                                  f"{s.min_sites}; the global model stays at round {rnd - 1} in {run.root}")
        summed = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the same sum
        delta = {k: torch.from_numpy(np.array(a, np.float32)) for k, a in zip(self.keys, summed)}
        reason = (f"{len(summed)} arrays, the global model has {len(self.keys)}" if len(summed) != len(self.keys)
                  else check_update(delta, run.weights))
        norm = float("nan")
        if not reason:
            weights = {k: run.weights[k] + delta[k] for k in self.keys}
            norm = update_norm(weights, run.weights)
            reason = norm_outliers({"sum": norm}, run.accepted_norms(), s.update_norm_ratio,
                                   s.max_update_norm).get("sum")
        for r in rows:
            if r["status"] == "ok":
                r["update_norm"] = norm  # the sum's: SecAgg+ hides each site's own
                if reason:
                    r["status"] = f"{REFUSED}secure sum: {reason}"
        if reason:
            run._record(rnd, rows)
            raise FederationError(
                f"round {rnd}: the securely aggregated update was refused ({reason}); SecAgg+ hides which site "
                f"sent it, so check every site before the next run; the global model stays at round {rnd - 1} "
                f"in {run.root}")
        run.save_round(rnd, weights, rows)
        return ndarrays_to_parameters([weights[k].numpy() for k in self.keys]), {}


def run_rounds(grid, context: Context, run: GlobalRun, todo: int, train_config: dict) -> None:
    """``todo`` SecAgg+ rounds through Flower's DefaultWorkflow; each round's result goes to ``run``."""
    from flwr.server import ServerConfig
    from flwr.server.compat import LegacyContext
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    s = run.s
    counting = CountingGrid(grid)
    strategy = SecureRecorder(run, run.round, train_config, counting)
    secagg = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=s.secagg_threshold,
                                max_weight=s.secagg_max_weight, clipping_range=s.secagg_clip,
                                timeout=s.round_timeout)

    def fit(g, ctx) -> None:  # a halted protocol aggregates nothing and says so only in Flower's log
        before = run.round
        secagg(g, ctx)
        if run.round == before:
            raise FederationError(f"round {before + 1}: the SecAgg+ protocol halted (too few sites answered a stage "
                                  f"within round-timeout, or fewer than the reconstruction threshold); the global "
                                  f"model stays at round {before} in {run.root}")
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=todo, round_timeout=s.round_timeout),
                           strategy=strategy)
    DefaultWorkflow(fit_workflow=fit)(counting, legacy)
