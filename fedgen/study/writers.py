"""Write results atomically in PLINK's file formats."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedgen.fileio import atomic_write_text  # noqa: F401 - re-exported for study code
from fedgen.stats.plinkfmt import format_g6


def fmt_column(values: Any) -> list[str]:
    """Strings for one column: ints as integers, floats in PLINK 2's %g-like format."""
    if isinstance(values, list) and (not values or isinstance(values[0], str)):
        return values
    arr = np.asarray(values)
    if arr.dtype.kind in "iub":
        return [str(v) for v in arr.astype(np.int64).tolist()]
    if arr.dtype.kind == "f":
        return list(format_g6(arr))
    return [str(v) for v in arr.tolist()]


def write_tsv(path: Path, header: Sequence[str], columns: Sequence[Any]) -> None:
    """Write a tab-separated table (PLINK 2 style) via a temporary file and rename."""
    cols = [fmt_column(c) for c in columns]
    n = len(cols[0]) if cols else 0
    if any(len(c) != n for c in cols):
        raise ValueError("columns of unequal length")
    lines = ["\t".join(header)]
    lines.extend("\t".join(row) for row in zip(*cols))
    atomic_write_text(path, "\n".join(lines) + "\n")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def staging_dir(output_dir: Path) -> Path:
    """A fresh hidden folder beside ``output_dir`` where a run writes before publishing."""
    output_dir = Path(output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    from fedgen.fileio import public_mode

    os.chmod(stage, public_mode(directory=True))  # the published folder gets the umask's permissions
    return stage


def publish_dir(staging: Path, output_dir: Path) -> None:
    """Move a completed staging folder to ``output_dir``.

    An existing results folder is replaced only once the new one is complete: it is renamed
    aside, the new one renamed in, then the old one removed, so a crash never leaves a folder
    that looks complete but is not.
    """
    output_dir = Path(output_dir).resolve()
    old = None
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old-{int(time.time() * 1e6)}"
        os.replace(output_dir, old)
    os.replace(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
