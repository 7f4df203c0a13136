"""Atomic file writes shared by every layer (results at the aggregator, state at the sites)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the process's umask when fedgen was imported: new result files get the permissions a plain
#: ``open()`` would give them (a temporary file is created owner-only)
UMASK = _umask()


def public_mode(directory: bool = False) -> int:
    """The mode ``open()``/``mkdir()`` would give a new file (folder) under the process umask."""
    return (0o777 if directory else 0o666) & ~UMASK


def atomic_write_text(path: Path, text: str, *, private: bool = False) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename, so a
    reader never sees a half-written file and a crash never corrupts an existing one.

    The file gets the permissions a plain ``open()`` would give it (the umask), or owner-only
    with ``private`` (a site's state: ledger, registers, caches)."""
    atomic_write_bytes(path, text.encode(), private=private)


def atomic_write_bytes(path: Path, data: bytes, *, private: bool = False) -> None:
    """:func:`atomic_write_text` for bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if not private:
            os.chmod(tmp, public_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays and sets; anything else as ``str``."""
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)
