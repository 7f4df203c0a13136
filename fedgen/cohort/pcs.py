"""A site's own PC scores: stored in its state folder (PLINK 2 ``.eigenvec``), read back as covariates.

Scores are per-sample values, so they are written only at the site that owns the samples
(``<state_dir>/pca/<study_id>.eigenvec``, plus ``<study_id>.json`` with the study's eigenvalues
and provenance) and never sent to the aggregator. Association analyses of the same study read
them back with :func:`load_site_pcs`, aligned to the cohort's analysed samples.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fedgen.cohort.cohort import Cohort, default_state_dir
from fedgen.errors import FedgenError, InputError
from fedgen.fileio import atomic_write_text
from fedgen.stats.plinkfmt import format_g6

_STUDY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def site_state_dir(node_config: Mapping[str, Any]) -> Path:
    """The site's state folder, resolved exactly as :func:`fedgen.cohort.cohort.load_cohort` does."""
    if node_config.get("state_dir"):
        return Path(str(node_config["state_dir"])).expanduser()
    from fedgen.cohort.cohort import genotype_input

    source = genotype_input(node_config)
    if source is None:
        raise InputError("site configuration has no genotype input ('vcf', 'pgen' or 'bed')")
    return default_state_dir(source)


def cohort_state_dir(cohort: Cohort) -> Path:
    """State folder of a loaded cohort (its genotype cache is ``<state_dir>/cache/<key>/``)."""
    explicit = getattr(cohort, "state_dir", None)
    if explicit:
        return Path(explicit)
    filename = getattr(cohort.dosage, "filename", None)
    if filename:
        cache = Path(filename).resolve().parent
        if cache.parent.name == "cache":
            return cache.parent.parent
    return default_state_dir(cohort.vcf)


def check_study_id(study_id: str) -> str:
    """A study ID is used as a file name at sites: letters, digits, ``.``, ``_``, ``-``."""
    sid = str(study_id)
    if not _STUDY_ID.match(sid) or ".." in sid:
        raise FedgenError(f"study ID {sid[:40]!r} is not a safe file name (letters, digits, '.', '_', '-')")
    return sid


def pcs_path(state_dir: Path, study_id: str) -> Path:
    """``<state_dir>/pca/<study_id>.eigenvec``."""
    return Path(state_dir) / "pca" / f"{check_study_id(study_id)}.eigenvec"


def format_eigenvec(iids: Sequence[str], scores: np.ndarray) -> str:
    """PLINK 2 ``.eigenvec`` text: ``#IID PC1 .. PCk`` (tab-separated, 6 significant digits)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != len(iids):
        raise ValueError("scores must be (samples, k) with one row per IID")
    cols = [format_g6(s[:, j]) for j in range(s.shape[1])]
    lines = ["\t".join(["#IID", *[f"PC{j + 1}" for j in range(s.shape[1])]])]
    lines.extend("\t".join([iid, *row]) for iid, row in zip(iids, zip(*cols)))
    return "\n".join(lines) + "\n"


def write_site_pcs(
    state_dir: Path, study_id: str, iids: Sequence[str], scores: np.ndarray, *, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write ``<state_dir>/pca/<study_id>.eigenvec`` (and ``.json`` with ``meta``); returns the path."""
    path = pcs_path(state_dir, study_id)
    try:
        atomic_write_text(path, format_eigenvec(list(iids), scores), private=True)
        if meta is not None:
            atomic_write_text(path.with_suffix(".json"), json.dumps(dict(meta), indent=2) + "\n", private=True)
    except OSError as exc:
        raise InputError(f"{path.parent}: cannot write PC scores ({exc.strerror})") from None
    return path


def read_eigenvec(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Read a PLINK 2 ``.eigenvec`` (``#IID`` or ``#FID IID`` header). Returns IIDs, scores, PC names."""
    path = Path(path)
    try:
        lines = [ln.rstrip("\n") for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise InputError(f"{path}: PC scores not found (run the study's PCA first)") from None
    if not lines or not lines[0].startswith("#"):
        raise InputError(f"{path}: not a PLINK 2 .eigenvec file (no '#IID' header)")
    header = lines[0][1:].split("\t")
    skip = 2 if header[:2] == ["FID", "IID"] else 1
    if header[skip - 1] != "IID":
        raise InputError(f"{path}: header must start with #IID or #FID IID")
    names = header[skip:]
    rows = [ln.split("\t") for ln in lines[1:]]
    if any(len(r) != len(header) for r in rows):
        raise InputError(f"{path}: rows and header have different numbers of fields")
    iids = [r[skip - 1] for r in rows]
    try:
        scores = np.array([[float(v) for v in r[skip:]] for r in rows], dtype=np.float64).reshape(len(rows), len(names))
    except ValueError as exc:
        raise InputError(f"{path}: non-numeric score ({exc})") from None
    return iids, scores, names


def cohort_iids(cohort: Cohort) -> list[str]:
    """IIDs of the cohort's analysed samples, in analysis order (``sample_cols``)."""
    return [cohort.vcf_samples[j] for j in cohort.sample_cols.tolist()]


def load_site_pcs(cohort: Cohort, study_id: str, n: int, *, state_dir: Path | None = None) -> np.ndarray:
    """The first ``n`` PC scores of the cohort's analysed samples, (cohort.n_samples, n) float64.

    Rows follow ``cohort.sample_cols`` (= ``cohort.table_rows``), so the result stacks directly
    onto the regression design. Raises :class:`InputError` if the study's scores are missing,
    have fewer than ``n`` PCs, or do not cover every analysed sample (the cohort changed since
    the PCA ran).
    """
    path = pcs_path(state_dir if state_dir is not None else cohort_state_dir(cohort), study_id)
    iids, scores, _ = read_eigenvec(path)
    if n > scores.shape[1]:
        raise InputError(f"{path}: study asks for {n} PCs, the stored scores have {scores.shape[1]}")
    where = {iid: i for i, iid in enumerate(iids)}
    want = cohort_iids(cohort)
    missing = [s for s in want if s not in where]
    if missing:
        import logging

        logging.getLogger(__name__).warning("%s: no PC scores for %d analysed sample(s), e.g. %s", path, len(missing),
                                            ", ".join(missing[:3]))
        raise InputError(f"{path}: no PC scores for some analysed samples; the cohort changed after the PCA ran; "
                         "run the PCA again")
    return scores[[where[s] for s in want], :n].copy()


def plot_site_scores(scores: np.ndarray, path: Path, *, title: str = "", eigenvalues: Sequence[float] = ()) -> Path:
    """Scatter plots of this site's own samples (PC1×PC2, PC3×PC4), written locally only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(scores)
    pairs = [(0, 1), (2, 3)] if s.shape[1] >= 4 else [(0, 1)] if s.shape[1] >= 2 else []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, max(1, len(pairs)), figsize=(5 * max(1, len(pairs)), 4.6), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        ax.scatter(s[:, a], s[:, b], s=5, alpha=0.6, color="#3b6ea8", linewidths=0)
        ev = list(eigenvalues)
        ax.set_xlabel(f"PC{a + 1}" + (f" (eigenvalue {ev[a]:.3g})" if len(ev) > a else ""))
        ax.set_ylabel(f"PC{b + 1}" + (f" (eigenvalue {ev[b]:.3g})" if len(ev) > b else ""))
    fig.suptitle(title or f"PC scores of this site's {len(s)} samples (local only)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
