"""Download progress for the model fetcher: tqdm bars on a terminal, a status line every few seconds in build logs."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..common import human_size
from .config import PROG


class Progress:
    """A bar per file and a total (tqdm on a terminal), or a status line every few seconds (build logs)."""

    def __init__(self, mode: str, interval_s: float, jobs: int) -> None:
        if mode == "auto":
            mode = "bars" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self.active: dict[int, list[Any]] = {}  # id -> [name, done, total]
        self.done = 0
        self.total = 0
        self.started = time.monotonic()
        self._slots = list(range(jobs, 0, -1))
        self._keys = itertools.count()
        self._stop = threading.Event()
        self._tqdm: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.mode == "bars":
            from tqdm import tqdm

            self._tqdm = tqdm
            self._total_bar = tqdm(total=0, desc="total", unit="B", unit_scale=True, unit_divisor=1024, position=0,
                                   dynamic_ncols=True, leave=True)
        elif self.mode == "lines":
            self._thread = threading.Thread(target=self._report_loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._tqdm:
            self._total_bar.close()

    def log(self, message: str) -> None:
        """One line to stderr that does not tear the bars apart."""
        if self._tqdm:
            self._tqdm.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    @contextmanager
    def file(self, name: str, total: int | None, initial: int) -> Iterator[Callable[[int], None]]:
        """Track one download attempt; yields the function to call with each chunk's byte count.

        A failed attempt takes its bytes back out of the total: the retry announces them again as resumed.
        """
        with self.lock:
            key = next(self._keys)
            slot = self._slots.pop() if self._slots else 0
            self.active[key] = [name, initial, total]
            self.total += total or 0
            self.done += initial
        bar = None
        if self._tqdm:
            self._total_bar.total = self.total
            self._total_bar.update(initial)
            bar = self._tqdm(total=total, initial=initial, desc=name[:40], unit="B", unit_scale=True,
                             unit_divisor=1024, position=slot, leave=False, dynamic_ncols=True)

        def update(n: int) -> None:
            with self.lock:
                self.active[key][1] += n
                self.done += n
            if bar is not None:
                bar.update(n)
                self._total_bar.update(n)

        ok = False
        try:
            yield update
            ok = True
        finally:
            with self.lock:
                _, got, tot = self.active.pop(key)
                if not ok:
                    self.done -= got
                    self.total -= tot or 0
                self._slots.append(slot)
            if bar is not None:
                bar.close()
                if not ok:
                    self._total_bar.total = self.total
                    self._total_bar.update(-got)

    def _report_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self.lock:
                if not self.active:
                    continue
                files = "; ".join(f"{n} {_pct(d, t)}" for n, d, t in self.active.values())
                rate = self.done / max(time.monotonic() - self.started, 1e-6)
                line = (f"{PROG}: progress {human_size(self.done)} of {human_size(self.total)} "
                        f"({_pct(self.done, self.total)}) at {human_size(int(rate))}/s -- {files}")
            print(line, file=sys.stderr, flush=True)


def _pct(done: int, total: int | None) -> str:
    return f"{100 * done / total:.0f}%" if total else human_size(done)
