"""Sampling in shards (one Slurm array task each) and the merge: the merged cohort equals a single
run's (same ids, same bytes), its provenance stays signed and publish accepts it; a missing shard,
a shard of another run or a forged entry is refused, naming the file."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from medsyn_site import provenance
from medsyn_site.cli import main
from medsyn_site.data.cohort import Cohort, CohortError, validate_cohort
from medsyn_site.diffusion.sample import sample_cohort
from medsyn_site.diffusion.shards import merge_shards, parse_shard
from medsyn_site.publish.release import check_provenance

from conftest import one_torch_thread


pytestmark = pytest.mark.slow  # samples 4 small volumes (~1-2 min on 2 cores)


@pytest.fixture(scope="module")
def shards(run, phantom_cohort, key, tmp_path_factory):
    """The conftest `synth` run (relocated masks, DDIM 4, seed 1), sampled as 2 shards."""
    root = tmp_path_factory.mktemp("shards")
    with one_torch_thread():  # as conftest's synth, which these must equal byte for byte
        return [sample_cohort(run, f"relocate:{phantom_cohort}", root / f"s{i}", sampler="ddim", steps=4, seed=1,
                              site_key=key, shard=(i, 2)) for i in range(2)]


def test_merged_shards_equal_one_run_and_pass_the_provenance_gate(shards, synth, key, tmp_path):
    sizes = [len(Cohort(s).cases) for s in shards]
    assert sizes == [2, 1]  # 3 train masks, round robin
    r = CliRunner().invoke(main, ["sample-merge", *map(str, shards), "--out", str(tmp_path / "m"),
                                  "--site-key", str(key)])
    assert r.exit_code == 0, r.output
    merged, whole = Cohort(tmp_path / "m"), Cohort(synth)
    assert {c.id: c.sha256 for c in merged.cases} == {c.id: c.sha256 for c in whole.cases}
    assert validate_cohort(tmp_path / "m") == []
    header, entries = provenance.read(tmp_path / "m")
    assert header == provenance.read(synth)[0] and len(entries) == 3
    _, decisions, _ = check_provenance(tmp_path / "m", (key.read_text().strip()).encode(), allow_verbatim=False)
    assert all(not d.reasons for d in decisions.values()), {c: d.reasons for c, d in decisions.items()}


def test_merge_refuses_missing_foreign_or_forged_shards(shards, run, phantom_cohort, key, tmp_path):
    with pytest.raises(CohortError, match=r"shard\(s\) 1 of 2 missing"):
        merge_shards([shards[0]], tmp_path / "a", site_key=key)
    other = sample_cohort(run, f"relocate:{phantom_cohort}", tmp_path / "other", sampler="ddim", steps=2, seed=1,
                          site_key=key, shard=(1, 2))
    with pytest.raises(provenance.ProvenanceError, match=r"other/provenance.json: made with other settings .*steps"):
        merge_shards([shards[0], other], tmp_path / "b", site_key=key)
    forged = shutil.copytree(shards[1], tmp_path / "forged")
    doc = json.loads((forged / "provenance.json").read_text())
    doc["files"][0]["seed"] += 1
    (forged / "provenance.json").write_text(json.dumps(doc))
    with pytest.raises(provenance.ProvenanceError, match="forged/provenance.json: entry .* not signed"):
        merge_shards([shards[0], forged], tmp_path / "c", site_key=key)
    (tmp_path / "killed" / "images").mkdir(parents=True)  # an unfinished shard: no cohort.json yet
    with pytest.raises(CohortError, match="killed/cohort.json: missing"):
        merge_shards([shards[0], tmp_path / "killed"], tmp_path / "d", site_key=key)
    assert not any((tmp_path / x).exists() for x in "abcd")  # nothing half-written
    with pytest.raises(CohortError, match="--shard '2/2': use I/N"):
        parse_shard("2/2")
