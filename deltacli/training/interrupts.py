"""Stopping on request: Ctrl-C (SIGINT) and SIGTERM (what `timeout` and job schedulers send).

While training, a stop signal does not kill the process: it is noted, the current optimizer
step finishes, a resumable checkpoint is written, and the run ends with one line saying how
to continue it, exit code 130 (SIGINT) or 143 (SIGTERM). A second Ctrl-C stops at once.
Elsewhere both raise `Stopped`, so clean-up runs (no scratch folder is left behind) and the
command ends with one line and the same exit codes.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from deltacli.errors import DeltacliError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(DeltacliError):
    """The run stopped on a signal; the message says where its checkpoint is."""

    label = "interrupted"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class Stopped(BaseException):
    """A stop signal outside training: unwinds like KeyboardInterrupt (clean-up runs), and
    tells which signal it was."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Which stop signal arrived, if any (checked by the training loop between steps)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _note(self, signum: int, frame: object) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, _stop)  # a second Ctrl-C: stop now


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Note stop signals instead of acting on them, for the length of the block."""
    request = StopRequest()
    previous = {sig: signal.signal(sig, request._note) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


def raise_on_stop_signals() -> None:
    """Turn SIGINT and SIGTERM into the `Stopped` exception for the rest of the process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
