"""What a long-running command shows and hears: a console, progress bars, and clean stops on signals.

Only the main process of a distributed run prints; the others get a console that says nothing.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol


class Printer(Protocol):
    def print(self, *args: Any, **kwargs: Any) -> None: ...


class Quiet:
    """The console of non-main processes."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def make_console(is_main: bool = True) -> Any:
    """A rich console on stderr (stdout stays clean for JSON), no wrapping of long lines in logs."""
    if not is_main:
        return Quiet()
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def progress(console: Any, total: int, start: int = 0, label: str = "", unit: str = "") -> Iterator[Any]:
    """A progress bar with elapsed time and ETA; yields `update(done, rate_text="")`. Silent on `Quiet`."""
    if isinstance(console, Quiet):
        yield lambda done, rate_text="": None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=total, completed=start, rate="")

        def update(done: int, rate_text: str = "") -> None:
            bar.update(task, completed=done, rate=rate_text)

        yield update


@contextmanager
def progress_counter(
    console: Any, total: int, label: str = "", unit: str = "", rate_unit: str = ""
) -> Iterator[Callable[[int], None]]:
    """`progress` fed by increments: yields `advance(n)` and shows how many `rate_unit` (else `unit`) per second.
    Silent on `Quiet` and when there is nothing to count."""
    if total <= 0:
        console = Quiet()
    with progress(console, total, label=label, unit=unit) as update:
        started = time.perf_counter()
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            update(done, f"{done / max(time.perf_counter() - started, 1e-9):.2f} {rate_unit or unit}/s")

        yield advance


@dataclass
class StopRequest:
    """Set by SIGINT or SIGTERM; the loop that owns it stops cleanly at its next safe point."""

    signal_name: str = ""
    signum: int = 0

    @property
    def requested(self) -> bool:
        return self.signum != 0


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """SIGINT/SIGTERM ask for a clean stop; a second SIGINT interrupts at once (KeyboardInterrupt)."""
    stop = StopRequest()
    watched = (signal.SIGINT, signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        stop.signal_name, stop.signum = signal.Signals(signum).name, signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        previous = {s: signal.signal(s, handler) for s in watched}
    except ValueError:  # not the main thread (a notebook worker, say): no signal handling there
        previous = {}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
