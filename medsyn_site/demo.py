"""``medsyn demo``: every stage that exists, on the built-in phantom cohort, at CPU size."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from medsyn_site.atomic import atomic_write_text, refuse_existing
from medsyn_site.config import Config, dump_config
from medsyn_site.data.cohort import CohortError, validate_cohort
from medsyn_site.data.phantom import write_phantom_cohort
from medsyn_site.data.show import show_cohort

log = logging.getLogger(__name__)


def run_demo(out: Path, cfg: Config, force: bool = False) -> Path:
    """data (phantom -> validate -> picture). Later stages add themselves here."""
    refuse_existing(out, force)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    cohort = out / "phantom"
    click.echo(f"[demo 1/1 data] building {cfg.data.phantom.cases} phantom cases in {cohort}")
    write_phantom_cohort(cfg.data.phantom, cfg.data.split, cohort, force=True)
    problems = validate_cohort(cohort, tuple(cfg.data.hu_range))
    if problems:
        raise CohortError("; ".join(map(str, problems)))
    picture = show_cohort(cohort, out / "phantom.png")
    click.echo(f"[demo 1/1 data] cohort valid; picture: {picture}")
    click.echo(f"demo finished: {out}")
    return out
