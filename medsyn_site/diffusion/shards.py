"""Sampling in shards (one Slurm array task each) and the merge into one synthetic cohort.

A shard ``i/n`` samples every n-th volume of the full job list, starting at the i-th (0-based), with
the same case ids and seeds a single run would use. Every shard's provenance.json has the same
header (checkpoint, sampler, steps, seed, mask source), so each entry's signature stays valid when
the entries are joined: ``merge_shards`` checks the signatures, headers, file hashes and that every
shard is present, then writes one cohort + provenance.json that ``medsyn publish`` accepts.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from medsyn_site import provenance
from medsyn_site.atomic import sha256_file, staged_dir
from medsyn_site.data.cohort import INDEX, Cohort, CohortError, image_path, mask_path, write_index
from medsyn_site.sitekey import DEFAULT_SITE_KEY, load_site_key

log = logging.getLogger(__name__)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) as (I, N)."""
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise CohortError(f"--shard {text!r}: use I/N with 0 <= I < N (e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m[1]), int(m[2])


def shard_jobs(jobs: list, shard: tuple[int, int] | None) -> list:
    if shard is None:
        return jobs
    i, n = shard
    if len(jobs) < n:
        log.warning("shard %d/%d: only %d volume(s) to sample; some shards are empty", i, n, len(jobs))
    return jobs[i::n]


def merge_shards(shards: list[str | Path], out: str | Path, force: bool = False,
                 site_key: Path = DEFAULT_SITE_KEY) -> Path:
    """Join the shard cohorts into one synthetic cohort with one signed provenance.json."""
    if not shards:
        raise CohortError("sample-merge: no shard folders given")
    key = load_site_key(site_key)
    header0, entries, records, seen, index = None, [], [], {}, {}
    for shard in map(Path, shards):
        cohort = Cohort(shard)  # names a missing or unfinished shard (no cohort.json)
        header, files = provenance.read(shard)
        if header0 is None:
            header0, first = header, shard
        elif header != header0:
            diff = sorted(k for k in header0.keys() | header.keys() if header0.get(k) != header.get(k))
            raise provenance.ProvenanceError(f"{shard / provenance.FILE}: made with other settings than "
                                             f"{first} ({', '.join(diff)} differ); not shards of one run")
        by_case = {}
        for e in files:
            if not provenance.verify(e, header, key):
                raise provenance.ProvenanceError(f"{shard / provenance.FILE}: entry {e.get('case')!r} is not "
                                                 "signed with this site key (use the key that sampled it)")
            by_case[e["case"]] = e
        for rec in cohort.cases:
            if rec.id in seen:
                raise CohortError(f"{shard / INDEX}: case {rec.id} is also in {seen[rec.id]} (overlapping shards)")
            if rec.id not in by_case:
                raise provenance.ProvenanceError(f"{shard / provenance.FILE}: no entry for case {rec.id}")
            seen[rec.id] = shard
            records.append((shard, rec))
            entries.append({k: v for k, v in by_case[rec.id].items() if k != "signature"})
        index[shard] = cohort.index
    if any(ix.shard for ix in index.values()):
        unlabelled = [str(s) for s, ix in index.items() if not ix.shard]
        if unlabelled:
            raise CohortError(f"{unlabelled[0]}: not a shard (sampled without --shard)")
        totals = {ix.shard[1] for ix in index.values()}
        got = sorted(ix.shard[0] for ix in index.values())
        if len(totals) > 1:
            raise CohortError(f"shards of different splits ({', '.join(f'/{t}' for t in sorted(totals))})")
        n = totals.pop()
        if got != list(range(n)):
            missing = sorted(set(range(n)) - set(got))
            raise CohortError(f"shard(s) {', '.join(map(str, missing))} of {n} missing: merge when every array "
                              "task has finished" if missing else f"a shard of {n} is given twice")
    with staged_dir(out, force) as stage:
        for shard, rec in records:
            for src, dst, key_ in ((image_path(shard, rec.id), image_path(stage, rec.id), "image"),
                                   (mask_path(shard, rec.id), mask_path(stage, rec.id), "mask")):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                if sha256_file(dst) != rec.sha256[key_]:
                    raise CohortError(f"{src}: sha256 differs from {shard / INDEX} (changed after sampling)")
        desc = next(iter(index.values())).description + f", merged from {len(shards)} shard(s)"
        write_index(stage, [r for _, r in records], desc)
        provenance.write(stage, header0, entries, key)
    return Path(out)
