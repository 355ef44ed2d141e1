"""Stopping on request: SIGTERM and SIGUSR1, what Slurm and Kubernetes send before they kill a job.

A long loop runs inside ``with stop_on_signals() as stop:`` and looks at
``stop.requested`` where stopping is safe (finetune after a step, train-head
and sweep at an epoch boundary, extract after the block in flight); there it
writes its checkpoint and raises :class:`Preempted`, which the command line
turns into one line saying how to resume and the exit status
:data:`EXIT_PREEMPTED`. A second signal (a second or more after the first:
a closer one is the same request delivered twice) does not wait: it raises
``KeyboardInterrupt`` at once, like Ctrl-C (the last checkpoint still stands).
Outside such a block the signals keep their default action (the process ends).
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from mcpipe.errors import MCPipeError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL ("try again later"): a requeued job resumes
RESUME_HINT = "run the same command with --resume (or --resume auto) to continue"
# A repeat within this many seconds is the same request: under Slurm a torchrun rank gets the step's SIGTERM
# and torchrun's forwarded copy milliseconds apart.
SAME_SIGNAL_SECONDS = 1.0
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class Preempted(MCPipeError):
    """Stopped on a signal after the work so far was saved; the message says how to resume."""

    exit_code = EXIT_PREEMPTED


@dataclass
class StopRequest:
    """Set by the first signal; ``signal_name`` says which; ``resume_hint``: how this command is resumed."""

    requested: bool = False
    signal_name: str = ""
    resume_hint: str = RESUME_HINT
    at: float = 0.0  # time.monotonic() of the first signal
    _at_once: tuple[str, str | None] | None = field(default=None, repr=False)

    def preempted(self, what: str, resume: str | None = None) -> Preempted:
        """The exception to raise once the checkpoint is written: ``what`` was saved, ``resume`` (default
        ``resume_hint``) says how to continue. Raised with no request of its own, the process stops with the
        others under torchrun (their flags are all-reduced): its line says so."""
        why = (self.signal_name or "request") if self.requested else "another rank's signal"
        return Preempted(f"stopped on {why}: {what}; {resume or self.resume_hint}")

    @contextmanager
    def at_once(self, what: str, resume: str | None = None) -> Iterator[None]:
        """Within the block a signal stops at once, raising ``preempted(what, resume)`` where the code is: for
        work with no checkpoint of its own (it is redone on resume), so waiting for its end would only cost."""
        if self.requested:
            raise self.preempted(what, resume)
        self._at_once = (what, resume)
        try:
            yield
        finally:
            self._at_once = None


@contextmanager
def stop_on_signals(resume_hint: str = RESUME_HINT) -> Iterator[StopRequest]:
    """Within the block the first SIGTERM/SIGUSR1 sets ``requested``; a second raises ``KeyboardInterrupt``.

    When the block ends by a stop (``Preempted``, or the second signal's ``KeyboardInterrupt``) the process is
    only exiting, which can take seconds (threads, DataLoader workers, torch's teardown): the signals are then
    ignored rather than given back their old handlers, so a repeated SIGTERM cannot turn the exit code that says
    "preempted, resume me" (75) into a kill. Otherwise the old handlers come back.

    Outside the main thread (signal handlers can only be set there) the block only yields a request that
    nothing sets."""
    stop = StopRequest(resume_hint=resume_hint)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.requested:
            if time.monotonic() - stop.at < SAME_SIGNAL_SECONDS:
                return  # the same request delivered twice (Slurm and torchrun)
            raise KeyboardInterrupt
        stop.requested, stop.signal_name, stop.at = True, signal.Signals(signum).name, time.monotonic()
        if stop._at_once is not None:
            raise stop.preempted(*stop._at_once)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    stopping = False
    try:
        yield stop
    except (Preempted, KeyboardInterrupt):
        stopping = True
        raise
    finally:
        for s, old in previous.items():
            signal.signal(s, signal.SIG_IGN if stopping else old)
