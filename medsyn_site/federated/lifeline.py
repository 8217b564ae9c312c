"""A site's Flower processes end with their SuperNode, even when it is killed (SIGKILL, OOM killer).

flower-supernode starts flower-superexec, which starts one ``flwr-clientapp`` process per message;
the site's trainer runs in that last one. Flower's own parent monitor is not enough there:
- it tests the parent with kill(pid, 0), which a zombie passes, and a killed SuperNode's
  flower-superexec is left a zombie wherever the process that adopts it (PID 1 of a container, a
  subreaper) does not reap;
- it raises SIGINT from a thread, whose handler runs only when the main thread returns to Python.
So ``medsyn fl supernode`` puts a ``flwr-clientapp`` of its own first on the SuperNode's PATH
(:func:`clientapp_shim`): it starts :func:`exit_with_parent` before Flower's code runs, then hands
over to Flower's ``flwr-clientapp`` unchanged. Flower has no hook to run code at that process's
start, hence the shim (a PATH entry, as Flower finds its helpers by name)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

_watching: list[int] = []


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): existence only
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def exit_with_parent(grace: float = 10.0, poll: float = 1.0) -> None:
    """End this process when the process that started it is gone (exited, a zombie, or this process
    was handed to another parent), even if the main thread is blocked: Flower's graceful exit first
    (SIGINT), then os._exit after ``grace`` s."""
    if _watching:
        return
    parent = os.getppid()
    _watching.append(parent)

    def watch() -> None:
        while os.getppid() == parent and _alive(parent):
            time.sleep(poll)
        signal.raise_signal(signal.SIGINT)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="medsyn-exit-with-parent", daemon=True).start()


def clientapp_shim(folder: str | Path) -> Path:
    """Write ``folder/flwr-clientapp`` (a script of this environment's Python, as pip writes Flower's
    own: the process still reads ``flwr-clientapp``) and return ``folder``, to be put first on the
    SuperNode's PATH."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "flwr-clientapp"
    text = f"#!{sys.executable}\nfrom medsyn_site.federated.lifeline import main\n\nmain()\n"
    if not script.is_file() or script.read_text() != text:
        tmp = folder / f".flwr-clientapp.{os.getpid()}"
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(script)
    return folder


def main() -> None:
    """Flower's ``flwr-clientapp``, watched from its first instruction."""
    exit_with_parent()
    from flwr.supernode.cli import flwr_clientapp

    sys.exit(flwr_clientapp())
