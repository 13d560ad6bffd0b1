"""Progress of long work: a tqdm bar on a terminal, plain log lines anywhere else.

A bar redraws itself with carriage returns, which is right on a terminal and garbage in a log file, a CI log or
``nohup.out`` (thousands of partial lines). :func:`progress_bar` therefore looks at the stream the bar would draw
on: on a terminal it is tqdm itself; off a terminal it is a :class:`LineProgress` that logs one line (through
``logging``, so ``-q`` silences it) per finished step, or per ``every`` steps for work with many small steps.

The call is a drop-in for ``tqdm(total=..., desc=..., unit=..., disable=...)``: the object has ``update(n)``,
``set_postfix(...)``, ``set_description(...)``, ``close()`` and works as a context manager. tqdm is imported
only when a bar is drawn. A terminal that reports a width of 0 columns gets a bar 80 wide: tqdm's dynamic width
would draw nothing there.

One step can be long (Square's 5,000 queries, a CW binary search on a big batch) and a bar only moves between
steps: :func:`heartbeat` logs a line every ``every`` seconds while a step runs, from a daemon thread, so a long
evaluation is never silent.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import IO, Any, Iterator

log = logging.getLogger(__name__)


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stderr, where bars are drawn) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


#: Width of a bar on a terminal that reports 0 columns.
FALLBACK_COLUMNS = 80


def _columns(stream: IO[str] | None) -> int:
    """The width the terminal behind ``stream`` (default stderr) reports, 0 when it reports none."""
    stream = sys.stderr if stream is None else stream
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, *,
                 every: int = 1, stream: IO[str] | None = None, **tqdm_options: Any) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`LineProgress` logging a line per
    ``every`` finished steps (and at the last one). ``disable`` gives an object that shows nothing either way.
    Extra keyword options (``leave``, ``dynamic_ncols`` ...) go to tqdm and are ignored off a terminal."""
    if not disable and is_terminal(stream):
        from tqdm import tqdm

        if _columns(stream) > 0:
            tqdm_options.setdefault("dynamic_ncols", True)
        else:  # a terminal that reports no width (some container consoles): tqdm would draw a bar of nothing
            tqdm_options.setdefault("ncols", FALLBACK_COLUMNS)
        return tqdm(total=total, desc=desc, unit=unit, file=stream if stream is not None else sys.stderr,
                    **tqdm_options)
    return LineProgress(total=total, desc=desc, unit=unit, disable=disable, every=every)


class LineProgress:
    """Progress as log lines: ``"attack dsn: 3/12 eval (25%), 4.1s, about 12s left, loss=0.3"``, one per ``every``
    steps (the time left from the rate so far)."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
                 every: int = 1) -> None:
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.every = max(1, int(every))
        self.n = 0
        self.postfix = ""
        self._logged = 0  # the count at the last line, so a step is never reported twice
        self._start = time.perf_counter()
        self._closed = False

    def update(self, n: int = 1) -> None:
        """``n`` more steps finished; logs a line when a multiple of ``every`` (or the total) was passed."""
        if n <= 0:
            return
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every or self.n == self.total:
            self._line()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **values: Any) -> None:
        """Values shown after the count on the next line (as tqdm's postfix)."""
        items = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        """Ends the progress; logs the final count unless it was the last line already."""
        if not self._closed and self.n != self._logged:
            self._line()
        self._closed = True

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> None:
        self._logged = self.n
        if self.disable:
            return
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        head = f"{self.desc}: " if self.desc else ""
        elapsed = time.perf_counter() - self._start
        left = ""
        remaining = elapsed * (self.total - self.n) / self.n if self.total and 0 < self.n < self.total else 0.0
        if remaining >= 1:  # the rate so far, as tqdm estimates it
            left = f", about {_duration(remaining)} left"
        log.info("%s%s %s%s, %.1fs%s%s", head, count, self.unit, share, elapsed, left, tail)


def _duration(seconds: float) -> str:
    """``8s``, ``2.5 min``, ``1.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def heartbeat(desc: str, every: float = 30.0, disable: bool = False) -> Iterator[None]:
    """While the body runs, log ``"<desc>: still running, 1.5 min"`` every ``every`` seconds (none when it ends
    sooner, or with ``disable``)."""
    if disable:
        yield
        return
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(every):
            log.info("%s: still running, %s", desc, _duration(time.monotonic() - start))

    thread = threading.Thread(target=beat, name="dsn-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
