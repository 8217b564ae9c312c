"""Stop signals (SIGTERM, SIGUSR1: a kill, Slurm preemption) at any point of a training run.

Before the first step there is nothing to save: the signal stops the run at once (the run dir, if
made, resumes from step 0). In the training loop it is recorded and the loop writes a checkpoint
at the end of the current step. Either way the command exits with status 3. Cheap to import, so
the CLI installs it before loading torch.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(BaseException):  # not Exception: no library's `except Exception` may swallow a stop
    """Training stopped on SIGTERM/SIGUSR1, leaving a resumable run dir (or nothing written)."""


class StopSignals:
    """Context: SIGTERM/SIGUSR1 raise ``Interrupted(message)`` at once until ``defer()``; after it
    they only set ``signum`` for the caller to act on at its next safe point."""

    def __init__(self, message: str = "before the run started; nothing was written"):
        self.message, self.signum, self.deferred, self._old = message, None, False, {}

    def __enter__(self) -> "StopSignals":
        self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        if not self.deferred:
            raise Interrupted(f"stopped by {self.name} {self.message}")

    def defer(self) -> None:
        self.deferred = True

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
