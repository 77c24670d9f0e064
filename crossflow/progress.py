"""Progress of a long run (`crossflow eval`): a tqdm bar on a terminal; elsewhere (a log file, a pipe, CI), where a bar
cannot draw, one plain line on stderr at the start, then at most every LINE_EVERY seconds and at the end, so that
the run is seen to be alive."""

from __future__ import annotations

import sys
import time
from typing import Any

LINE_EVERY = 30.0  # seconds between progress lines off a terminal


class _Lines:
    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.start = self.last = time.monotonic()
        self._line(self.start)

    def _line(self, now: float) -> None:
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {now - self.start:.0f} s elapsed", file=sys.stderr,
              flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LINE_EVERY or self.n >= self.total:
            self.last = now
            self._line(now)

    def close(self) -> None:
        pass


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """An object with `update(n)` and `close()`: a tqdm bar when stderr is a terminal, progress lines when it is not,
    nothing when not `enabled`."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return _Lines(total, desc, unit)
