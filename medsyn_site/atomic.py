"""Atomic outputs: files written to a temp name then renamed; output folders built aside then swapped in.

Nothing already written is lost: an existing output folder is only replaced with ``force=True``, and
only after the new one is complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from medsyn_site.errors import DiskError, MedsynError, write_failure

log = logging.getLogger(__name__)


class OutputExistsError(MedsynError, FileExistsError):
    """The output exists and --force was not given."""


def owner_tag() -> str:
    """Host and process id, part of every temporary name, so a later run can tell that the process
    which left a temporary file is dead (and only then remove it)."""
    return f"{re.sub(r'[^A-Za-z0-9]', '', socket.gethostname())[:24] or 'host'}~{os.getpid()}"


_OWNED = re.compile(r"^\.(?:tmp-|(.+)\.(partial|old)-)([A-Za-z0-9]+)~(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files and staging folders in ``folder`` left by a dead process of this host
    (kill -9, power loss); returns what was removed. Those of live processes or other hosts stay."""
    folder, host, removed = Path(folder), owner_tag().split("~")[0], []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _OWNED.match(p.name)
        if not m or m.group(3) != host or _alive(int(m.group(4))):
            continue
        if m.group(2) == "old" and not (folder / m.group(1)).exists():
            continue  # killed while swapping: the previous output is only here; keep it
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.warning("removed %d leftover temporary file(s) of an interrupted run in %s", len(removed), folder)
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` then rename tmp_path onto ``path``.

    The temp file sits in the same folder and keeps the suffixes (``.nii.gz``, ``.png``) so that
    libraries which pick a format by extension still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{owner_tag()}-", suffix="-" + path.name)
        os.close(fd)
        tmp = Path(tmp)
        writer(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        err = write_failure(path, e)
        if err is e:
            raise
        raise err from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def read_json(path: str | os.PathLike, error: type[Exception], missing: str):
    """A JSON file the toolkit wrote (a contract: cohort.json, provenance.json, a request, ...): a
    missing or unparsable file is ``error`` with one line naming it (``missing`` says what to do)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON: {e}") from e


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """Raise OutputExistsError if ``path`` exists (and is not an empty folder) unless ``force``."""
    path = Path(path)
    if path.exists() and not force and not (path.is_dir() and not any(path.iterdir())):
        raise OutputExistsError(f"{path}: output already exists; pass --force to replace it")


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Build an output folder in a hidden sibling and swap it into place when the block succeeds.

    On an exception the staging folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{owner_tag()}-"))
    try:
        yield stage
    except DiskError as e:  # name the output the user asked for, not only the hidden staging folder
        shutil.rmtree(stage, ignore_errors=True)
        raise DiskError(f"{out}: not written, nothing changed: {e}") from e
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{owner_tag()}-"))
        os.replace(out, old / "x")
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
