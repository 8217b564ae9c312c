"""The Slurm scripts' `medsyn` command lines, checked against the real click CLI without a cluster:
each script runs under bash with a stand-in `medsyn` that records its arguments, and those arguments
must parse as the named command (existing options, valid choices and ranges, required options
given). The scripts on a real Slurm: tests/test_slurm.py."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import click
import pytest

from medsyn_site.cli import main

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "slurm"


def parse(argv: list[str]) -> tuple[str, dict]:
    """('fl supernode', its parsed parameters) for a medsyn argv; raises click's error when it would not run."""
    cmd, names, args = main, [], list(argv)
    while isinstance(cmd, click.Group):
        assert args and args[0] in cmd.commands, f"`medsyn {' '.join(names + args[:1])}` is not a command"
        names.append(args[0])
        cmd, args = cmd.commands[args[0]], args[1:]
    with cmd.make_context(" ".join(names), args) as ctx:
        return " ".join(names), ctx.params


def medsyn_calls(script: str, tmp_path: Path, env: dict, *args: str) -> tuple[list[list[str]], str]:
    """Run slurm/SCRIPT outside Slurm with a stand-in medsyn; its recorded argvs and the script's output."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    record = tmp_path / "calls.jsonl"
    fake = venv / "bin" / "medsyn"
    fake.write_text(f"#!/usr/bin/env python3\nimport json, sys\nopen({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MEDSYN_VENV": str(venv), "MEDSYN_REPO": str(REPO),
           **env}
    out = subprocess.run(["bash", str(SLURM / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    record.unlink(missing_ok=True)
    return calls, out.stdout + out.stderr


def test_parse_catches_a_wrong_call():
    with pytest.raises(click.NoSuchOption):
        parse(["fl", "superlink", "--pkii", "pki"])
    with pytest.raises(click.BadParameter):
        parse(["fl", "supernode", "--superlink", "h:1", "--cohort", "c", "--work-dir", "w", "--device", "tpu"])
    with pytest.raises(click.MissingParameter):
        parse(["fl", "supernode", "--superlink", "h:1", "--cohort", "c"])
    with pytest.raises(AssertionError, match="not a command"):
        parse(["fl", "superlinc"])


def test_superlink_script_defaults_and_overrides(tmp_path):
    (calls, log) = medsyn_calls("superlink.sh", tmp_path, {})
    assert len(calls) == 1, log
    name, p = parse(calls[0])
    assert name == "fl superlink" and (p["pki"], p["port"], p["host"], p["database"], p["insecure"]) == \
        ("pki", 9100, "0.0.0.0", None, False)
    calls, log = medsyn_calls("superlink.sh", tmp_path, {"MEDSYN_FL_PORT": "9555", "MEDSYN_FL_HOST": "127.0.0.1",
                                                         "MEDSYN_FL_DATABASE": "fl/link.db", "MEDSYN_FL_INSECURE": "1"})
    name, p = parse(calls[0])
    assert (p["pki"], p["port"], p["host"], p["database"], p["insecure"]) == (None, 9555, "127.0.0.1", "fl/link.db", True)
    assert "exited with status 0" in log and not (tmp_path / "superlink.address").exists()


def test_supernode_script_defaults_and_overrides(tmp_path):
    calls, log = medsyn_calls("supernode.sh", tmp_path, {})
    assert not calls and "set MEDSYN_SUPERLINK=HOST:PORT" in log  # no SuperLink named: a clear error, no call
    (tmp_path / "superlink.address").write_text("node7.cluster:9100\n")  # what superlink.sh writes
    calls, log = medsyn_calls("supernode.sh", tmp_path, {"SLURM_CPUS_PER_TASK": "6"})
    name, p = parse(calls[0])
    assert name == "fl supernode", log
    assert (p["superlink"], p["cohort"], p["work_dir"], p["port"], p["ca"], p["key"], p["threads"], p["device"],
            p["precision"], p["insecure"]) == ("node7.cluster:9100", "cohorts/site", "fl-work", 9200, "ca.pem",
                                               f"{tmp_path}/.config/medsyn/fl-node", 6, None, None, False)
    calls, log = medsyn_calls("supernode.sh", tmp_path, {
        "MEDSYN_SUPERLINK": "10.0.0.5:9300", "MEDSYN_COHORT": "c", "MEDSYN_FL_WORK": "w", "MEDSYN_FL_NODE_PORT": "9201",
        "MEDSYN_DEVICE": "cuda", "MEDSYN_PRECISION": "bf16", "MEDSYN_THREADS": "3", "MEDSYN_FL_CA": "x/ca.pem",
        "MEDSYN_FL_KEY": "k"})
    _, p = parse(calls[0])
    assert (p["superlink"], p["cohort"], p["work_dir"], p["port"], p["device"], p["precision"], p["threads"],
            p["ca"], p["key"]) == ("10.0.0.5:9300", "c", "w", 9201, "cuda", "bf16", 3, "x/ca.pem", "k")
    calls, _ = medsyn_calls("supernode.sh", tmp_path, {"MEDSYN_FL_INSECURE": "1"})
    _, p = parse(calls[0])
    assert p["insecure"] and p["ca"] is None and p["key"] is None
    assert (tmp_path / "w").is_dir() and (tmp_path / "fl-work").is_dir()


def test_train_and_sample_scripts_call_real_commands(tmp_path, monkeypatch):
    """The existing scripts through the same check (their behaviour on Slurm: tests/test_slurm.py)."""
    monkeypatch.chdir(tmp_path)  # options that must name an existing path are parsed where the script ran
    (tmp_path / "runs" / "site").mkdir(parents=True)
    calls, log = medsyn_calls("train.sh", tmp_path, {"MEDSYN_STEPS": "5", "MEDSYN_ARGS": "--precision bf16"})
    name, p = parse(calls[0])
    assert name == "train" and (p["cohort"], p["out"], p["steps"], p["precision"]) == \
        ("cohorts/site", "runs/site", 5, "bf16"), log
    (tmp_path / "site.key").write_text("k")
    env = {"MEDSYN_SITE_KEY": str(tmp_path / "site.key"), "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
           "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "1"}  # not the first task: submits no merge job
    calls, log = medsyn_calls("sample.sh", tmp_path, env)
    assert "the array must be 0..N-1" in log and not calls
    calls, log = medsyn_calls("sample.sh", tmp_path, env | {"SLURM_ARRAY_TASK_MIN": "0"})
    name, p = parse(calls[0])
    assert name == "sample" and (p["shard"], p["out"]) == ("1/2", "synth/site.shards/1"), log
    calls, log = medsyn_calls("sample.sh", tmp_path, {**env, "MEDSYN_SHARDS": "2"}, "merge")
    assert parse(calls[0])[0] == "sample-merge", log
