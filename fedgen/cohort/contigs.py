"""Contig names: one spelling for every site (``chr1`` ≡ ``1``, ``chrM`` ≡ ``MT``)."""

from __future__ import annotations

_ALIASES = {"M": "MT", "23": "X", "24": "Y", "25": "XY", "26": "MT"}


def harmonise_contig(name: str) -> str:
    """Canonical contig name as PLINK 2 prints it by default: no ``chr`` prefix, ``MT`` for mito."""
    n = name.strip()
    if n[:3].lower() == "chr":
        n = n[3:]
    n = n.upper() if n.lower() in {"x", "y", "m", "mt", "xy"} else n
    return _ALIASES.get(n, n)


def autosome_number(canonical: str) -> int:
    """1–22 for human autosomes, 0 otherwise."""
    if canonical.isdigit():
        k = int(canonical)
        if 1 <= k <= 22:
            return k
    return 0


def contig_sort_key(canonical: str) -> tuple[int, str]:
    k = autosome_number(canonical)
    order = {"X": 23, "Y": 24, "XY": 25, "MT": 26}
    return (k if k else order.get(canonical, 100), canonical)
