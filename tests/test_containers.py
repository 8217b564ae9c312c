"""The container recipes, checked statically where no builder exists: the Apptainer definition
files parse (spython), fill %help/%labels/%test, and every %runscript/%apprun calls an existing
`medsyn` command with existing options (checked against the click CLI itself); the Dockerfile
installs the dependencies in a layer before the source, through scripts/install.sh. They are
built for real wherever `apptainer` exists."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from spython.main.parse.parsers import SingularityParser

from medsyn_site.cli import main

REPO = Path(__file__).resolve().parent.parent
DEFS = sorted((REPO / "containers").glob("*.def"))


def _sections(path: Path) -> dict[str, list[str]]:
    """'%name [app]' -> its lines. spython 0.3 reads the standard sections but files SCI-F app
    sections (%apprun, %apphelp, ...) under comments, so those are split here."""
    out: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("%"):
            current = " ".join(line[1:].split())
            out[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            out[current].append(line.strip())
    return out


def _check_medsyn_call(line: str, where: str) -> None:
    """`exec medsyn CMD... --opt ...`: CMD exists in the click group and every --opt is one of its options."""
    words = shlex.split(line.replace('"$@"', "ARGS"))
    assert words[:2] == ["exec", "medsyn"], f"{where}: {line!r} does not exec medsyn"
    cmd: click.Command = main
    args = words[2:]
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        assert args[0] in cmd.commands, f"{where}: `medsyn ... {args[0]}` is not a command"
        cmd, args = cmd.commands[args[0]], args[1:]
    assert not isinstance(cmd, click.Group), f"{where}: {line!r} names a group, not a command"
    known = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    for word in args:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{where}: {cmd.name} has no option {word}"
    required = [p for p in cmd.params if p.required and isinstance(p, click.Option)]
    for p in required:  # a required option must be given by the runscript or left to "$@"
        assert set(p.opts) & set(args) or "ARGS" in args, f"{where}: {cmd.name} needs {p.opts[0]}"


def test_there_are_recipes():
    assert {p.name for p in DEFS} >= {"train.def", "evaluate.def"}
    assert (REPO / "containers" / "Dockerfile").is_file()


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_definition_file_parses_and_calls_real_commands(path):
    (recipe,) = SingularityParser(str(path)).recipe.values()
    assert recipe.fromHeader.lower() == "{{ base }}" and "BASE=" in path.read_text()  # base image a build argument
    assert recipe.labels and recipe.test and recipe.install, f"{path.name}: %labels, %test and %post must be filled"
    assert any("install.sh" in line for line in recipe.install), f"{path.name}: %post must use scripts/install.sh"
    sections = _sections(path)
    assert sections.get("help"), f"{path.name}: %help is empty"
    for src, _ in (f.split() for f in sections["files"]):
        assert (REPO / src).exists(), f"{path.name}: %files source {src} does not exist"
    runs = {"runscript": [recipe.cmd]} | {k: v for k, v in sections.items() if k.startswith("apprun ")}
    assert len(runs) >= 2
    for name, lines in runs.items():
        calls = [line for line in lines if "medsyn" in line]
        assert len(calls) == 1, f"{path.name} %{name}: one medsyn call expected, got {lines}"
        _check_medsyn_call(calls[0], f"{path.name} %{name}")
    # Nothing written inside the image at run time: caches go to /tmp.
    env = " ".join(sections["environment"])
    assert "MPLCONFIGDIR=/tmp" in env and "TORCH_EXTENSIONS_DIR=/tmp" in env


def test_runscript_check_catches_a_wrong_option():
    with pytest.raises(AssertionError, match="has no option --cohrt"):
        _check_medsyn_call('exec medsyn train --cohrt /cohort "$@"', "x")
    with pytest.raises(AssertionError, match="not a command"):
        _check_medsyn_call('exec medsyn evaluate trian "$@"', "x")


def test_train_image_trains_by_default():
    run = _sections(REPO / "containers" / "train.def")["runscript"]
    assert re.search(r"exec medsyn train .*--cohort /cohort --out /run", run[0])


def test_dockerfile_layers_dependencies_before_the_source():
    text = (REPO / "containers" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=", text, re.M) and "FROM ${BASE}" in text
    deps = text.index("MEDSYN_DEPS_ONLY=1")
    assert deps < text.index("COPY medsyn_site"), "the dependency layer must come before the source"
    assert "COPY medsyn_site" not in text[:deps]


@pytest.mark.skipif(not shutil.which("apptainer"), reason="apptainer is not installed here (no Debian 12 or "
                    "PyPI package); the definition files are checked statically above")
@pytest.mark.slow
@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_apptainer_builds(path, tmp_path):
    subprocess.run(["apptainer", "build", str(tmp_path / path.with_suffix(".sif").name), str(path)], cwd=REPO,
                   check=True)
