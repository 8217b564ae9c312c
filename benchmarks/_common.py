"""Helpers the benchmarks share (run as scripts: `python benchmarks/NAME.py`)."""
from __future__ import annotations

import json
import multiprocessing as mp


def in_fresh_process(target, *args) -> dict:
    """``target(*args, queue)`` in a spawned process (clean peak memory); returns what it queues."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    row = q.get()
    p.join()
    return row


def report(result: dict, out: str | None) -> None:
    """Print the summary (all but the raw rows) and write the whole result to ``out``."""
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
