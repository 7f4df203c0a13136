"""The samples table (⚑ contract): tab-separated, header row, ``IID`` column = VCF sample ID."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedgen.errors import InputError

_log = logging.getLogger(__name__)

MISSING_TOKENS = frozenset({"", "NA", "na", "NaN", "nan", ".", "N/A"})


@dataclass
class SamplesTable:
    """Columns of the samples table as strings, in file order."""

    path: Path
    iid: list[str]
    columns: dict[str, list[str]]

    def numeric(self, name: str) -> np.ndarray:
        """Column ``name`` as float64 with NaN for missing; error naming the file if not numeric."""
        col = self.require(name)
        out = np.full(len(col), np.nan)
        for i, v in enumerate(col):
            v = v.strip()
            if v in MISSING_TOKENS:
                continue
            try:
                out[i] = float(v)
            except ValueError:
                # the detail stays in the site's own log; the message may travel to the aggregator
                _log.warning("%s: column %r row %d (IID %s): %r is not a number", self.path, name, i + 2, self.iid[i], v)
                raise InputError(
                    f"{self.path}: column {name!r} has a value that is not a number (the site's log names the row)"
                ) from None
        return out

    def require(self, name: str) -> list[str]:
        if name not in self.columns:
            raise InputError(
                f"{self.path}: no column {name!r} in samples table (columns: {', '.join(self.columns) or 'none'})"
            )
        return self.columns[name]


def read_samples_table(path: Path) -> SamplesTable:
    """Read and validate a samples table."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: samples table not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: samples table is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read samples table ({exc.strerror})") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"{path}: samples table is empty (expected a header row with an IID column)")
    header = [h.strip() for h in rows[0]]
    names = ["IID" if h == "#IID" else h for h in header]
    if "IID" not in names:
        hint = " (is it tab-separated?)" if len(header) == 1 else ""
        raise InputError(f"{path}: samples table has no IID column{hint}; header is: {' | '.join(header)[:200]}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"{path}: duplicate column names in samples table: {', '.join(dup)}")
    width = len(names)
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != width:
            raise InputError(f"{path}: line {i} has {len(r)} fields, header has {width}")
    cols = {n: [r[j].strip() for r in rows[1:]] for j, n in enumerate(names)}
    iid = cols.pop("IID")
    if any(v == "" for v in iid):
        raise InputError(f"{path}: empty IID in samples table")
    seen: set[str] = set()
    dups = [v for v in iid if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
    if dups:
        raise InputError(f"{path}: duplicate IIDs in samples table: {', '.join(sorted(set(dups))[:5])}")
    return SamplesTable(path=path, iid=iid, columns=cols)
