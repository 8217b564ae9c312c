"""The toolkit's own errors. Only these (and OS errors such as a full disk, which name a path) are
shown by the command line as one line without a traceback; anything else is a bug and keeps its
traceback."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class MedsynError(Exception):
    """Bad input or a state the user can fix; the message names the file and says what to do."""


class DiskError(MedsynError):
    """Writing failed for a reason of the file system (full, read-only, no permission, quota)."""


# OS errors that are about the machine, not the code: shown on one line with the path and free space.
USER_OS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                  errno.EFBIG, errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR, errno.EISDIR}
LOW_SPACE = 64 * 2 ** 20  # below this, a failed write is taken for a full disk


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def free_note(path: str | os.PathLike) -> str:
    free = free_bytes(path)
    return "free space unknown" if free is None else f"{human_bytes(free)} free there"


def os_error_message(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """One line: the path, the system's reason and the free space on that file system."""
    path = path or exc.filename or "?"
    reason = exc.strerror or str(exc)
    return f"{path}: {reason} ({free_note(path)})"


def write_failure(path: str | os.PathLike, exc: BaseException) -> BaseException:
    """What a failed write should raise: a DiskError naming ``path`` if the cause is the file system
    (an OSError with a user errno, or a library's RuntimeError while the disk is nearly full, e.g.
    torch's "unexpected pos"), else the original exception."""
    if isinstance(exc, OSError) and exc.errno in USER_OS_ERRNOS:
        return DiskError(os_error_message(exc, path))
    free = free_bytes(path)
    if isinstance(exc, (OSError, RuntimeError)) and free is not None and free < LOW_SPACE:
        return DiskError(f"{path}: could not be written, the disk is full ({human_bytes(free)} free there): "
                         f"free space and run again")
    return exc


def check_free(path: str | os.PathLike, need: int, what: str) -> None:
    """Refuse to start writing ``what`` at ``path`` if the file system has less than ``need`` bytes free."""
    free = free_bytes(path)
    if free is not None and free < need:
        raise DiskError(f"{path}: {what} needs about {human_bytes(need)}, only {human_bytes(free)} free there: "
                        "free space and run again")
