"""One progress display for every long phase: ingest, QC blocks, association rounds, Firth, PCA,
training. A line at most every few seconds (and one when the phase ends) with what is done,
the time spent and, where the amount of work is known, an estimate of the time left.

Lines go to the ``fedgen`` logger, so they show in the terminal, in Flower's logs and in
notebooks alike, and never on stdout (which carries command output).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("fedgen.progress")

#: seconds between progress lines of one phase
EVERY = 5.0


def _secs(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Progress:
    """``Progress("QC", total=40, unit="blocks")``; call ``update(done)`` as work completes.

    With ``total`` unknown (``None``), lines show what is done and the time spent; ``update``
    may also pass a new ``total`` and a ``detail`` text (e.g. the rows still iterating).
    """

    def __init__(self, label: str, total: int | None = None, *, unit: str = "blocks", every: float = EVERY,
                 logger: logging.Logger | None = None) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.t0 = self._last = time.monotonic()
        self.log = logger or log

    def eta(self, done: float) -> float | None:
        if not self.total or done <= 0 or done >= self.total:
            return None
        return (time.monotonic() - self.t0) / done * (self.total - done)

    def line(self, done: float, detail: str = "") -> str:
        spent = time.monotonic() - self.t0
        of = f"/{self.total}" if self.total else ""
        text = f"{self.label}: {done:g}{of} {self.unit}, {_secs(spent)}"
        eta = self.eta(done)
        if eta is not None:
            text += f", about {_secs(eta)} left"
        return text + (f" ({detail})" if detail else "")

    def update(self, done: float, *, total: int | None = None, detail: str = "", force: bool = False) -> None:
        if total is not None:
            self.total = total
        now = time.monotonic()
        finished = self.total is not None and done >= self.total
        if force or finished or now - self._last >= self.every:
            self._last = now
            self.log.info(self.line(done, detail))
