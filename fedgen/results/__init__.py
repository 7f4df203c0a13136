"""Results folders: ``load_results(PATH)`` (tables as pandas DataFrames), ``load_sweep(PATH)``,
plots, the HTML report and GWAS-SSF export.

The names are loaded on first use, so that ``fedgen`` commands build on a site-node install
(no pandas) and only the analyst-side code needs the study extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Results", "load_results", "load_sweep"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedgen.results import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedgen.results' has no attribute {name!r}")
