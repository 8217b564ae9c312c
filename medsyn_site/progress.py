"""Progress messages of long work (the demo's stages, the evaluation's trainings, a site answering a
request). The library logs them to the ``medsyn_site.progress`` logger and never prints; the
``medsyn`` CLI shows them on stdout without -v (``show``), and a program that calls the library sees
them through logging like any other message."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("medsyn_site.progress")


def show(stream=None) -> None:
    """Print progress messages, bare, to ``stream`` (default: the current stdout), at any -v level;
    replaces an earlier ``show`` (one handler however often the CLI is invoked in one process)."""
    for h in [h for h in log.handlers if getattr(h, "medsyn_progress", False)]:
        log.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.medsyn_progress = True
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # shown once, not again by the root handler under -v
