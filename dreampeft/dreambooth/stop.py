"""Stopping a run by signal: SIGTERM (the app's Stop button, a job scheduler) and Ctrl-C end the run
the same way — a "stopped" event naming the last checkpoint, exit 2 or 130.

The handler raises at once, to leave a long step; the training loop raises again between steps
(``raise_if_asked``), because a raise that lands in a finaliser is printed as "Exception ignored" and
lost. A Ctrl-C in CI once left a run training on for 3 minutes (the cause was not pinned down; this
is the one way to lose it that a handler can see).
"""

from __future__ import annotations

import signal

_ASKED: list[int] = []  # the stop signals received since ``install``


class RunStopped(Exception):
    """SIGTERM arrived (the app's Stop button, a job scheduler): the run ends like Ctrl-C does."""


def _exception(signum: int) -> BaseException:
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return RunStopped(f"stopped by {signal.Signals(signum).name}")


def _handler(signum, frame):
    _ASKED.append(signum)
    raise _exception(signum)


def install() -> dict:
    """The stop handlers, on the main thread: SIGTERM always, SIGINT unless the process started with it
    ignored (as a shell starts background jobs). Returns the handlers ``restore`` puts back."""
    _ASKED.clear()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _handler)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _handler)
    return previous


def restore(previous: dict) -> None:
    """Put back what ``install`` replaced (nothing when it did not run: a run off the main thread)."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    if previous:
        _ASKED.clear()


def raise_if_asked() -> None:
    """Between steps: a stop signal whose own raise was lost stops the run here."""
    if _ASKED:
        raise _exception(_ASKED[0])
