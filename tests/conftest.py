"""Shared fixtures: synthetic sites split from one pooled data set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedgen.testing import SynthData, write_samples, write_vcf

DATA = Path(__file__).parent / "data"
HAVE_PLINK2 = shutil.which("plink2") is not None
HAVE_PLINK19 = shutil.which("plink1.9") is not None or shutil.which("plink") is not None

needs_plink2 = pytest.mark.skipif(not HAVE_PLINK2, reason="plink2 not installed (CI installs it)")

# One convention per site, cycling: the general case, not the simulator's output.
CONVENTIONS: list[dict[str, Any]] = [
    dict(chr_prefix=False, fmt="GT", phased=0.0, compress="bgzip"),
    dict(chr_prefix=True, fmt="GT:AD:DP:GQ:PL", phased=1.0, compress="bcf"),
    dict(chr_prefix=False, fmt="GT", phased=0.5, compress="gzip", swap=True),
    dict(chr_prefix=True, fmt="GT:AD:DP:GQ:PL", phased=0.0, compress="none"),
]


#: The permissive site policy under which results equal pooled PLINK 2 exactly (with the plan's
#: ``missing: drop``): no small-cell or sample-set rules. Tests of the default policy pass
#: ``policy=None`` to :func:`split_sites`.
PLINK_EXACT_POLICY: dict[str, Any] = {
    "min_count": 1,
    "min_cell": 1,
    "allow_per_variant_sample_sets": True,
    "pca_rank_per_study": 1000.0,
    "pca_rank_lifetime": 1e6,
    "extra_analyses": ["pca_product", "pca_scores", "glm_logistic", "glm_firth"],
}


def split_sites(
    data: SynthData, tmp: Path, fractions: list[float], *, seed: int = 0, conventions: list[dict[str, Any]] | None = None,
    policy: dict[str, Any] | None = PLINK_EXACT_POLICY,
) -> dict[str, Any]:
    """Split the pooled samples into sites (uneven sizes, shuffled) and write each site's files."""
    rng = np.random.default_rng(seed)
    n = len(data.samples)
    perm = rng.permutation(n)
    cuts = np.cumsum(np.round(np.asarray(fractions) / sum(fractions) * n).astype(int))[:-1]
    parts = np.split(perm, cuts)
    convs = conventions or CONVENTIONS
    node_configs: dict[str, dict[str, str]] = {}
    for k, cols in enumerate(parts):
        site = f"site{k + 1}"
        conv = dict(convs[k % len(convs)])
        swap = conv.pop("swap", False)
        d = tmp / site
        d.mkdir(parents=True, exist_ok=True)
        ext = {"bgzip": "vcf.gz", "gzip": "vcf.gz", "none": "vcf", "bcf": "bcf"}[conv["compress"]]
        vcf = d / f"genotypes.{ext}"
        swap_rows = np.arange(0, len(data.pos), 7) if swap else None
        write_vcf(data, vcf, cols=np.sort(cols), shuffle_samples=seed + k, swap_rows=swap_rows, seed=seed + k, **conv)
        write_samples(data, d / "samples.tsv", cols, extra_ids=k, binary_12=bool(k % 2))
        node_configs[site] = {"site": site, "vcf": str(vcf), "samples": str(d / "samples.tsv"), "state_dir": str(d / "state")}
        if policy is not None:
            node_configs[site]["policy"] = json.dumps(policy)  # as a node config carries it
    return node_configs


def qc_plan(out: Path, sites: list[str], **kw: Any) -> dict[str, Any]:
    plan = {
        "name": "qc",
        "output_dir": str(out),
        "sites": sites,
        "analyses": ["freq", "missing", "hardy"],
        "qc": {"maf": 0.01, "geno": 0.1, "hwe": 1e-6},
        "block_size": 97,
        "federation": "inprocess",
        "missing": "drop",  # PLINK 2's per-variant drop: results equal pooled PLINK 2
    }
    plan.update(kw)
    return plan


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name: str, tmp_path: Path, **parameters: Any) -> str:
    """Execute ``notebooks/<name>.ipynb`` with papermill (its ``parameters`` cell overridden) and
    return the text every code cell printed; a cell that raises fails the test."""
    import nbformat
    import papermill as pm

    src = NOTEBOOKS / f"{name}.ipynb"
    assert any("parameters" in c.metadata.get("tags", []) for c in nbformat.read(src, as_version=4).cells), \
        f"{name}: no cell tagged 'parameters'"
    out = tmp_path / f"{name}.out.ipynb"
    pm.execute_notebook(str(src), str(out), parameters=parameters, cwd=str(NOTEBOOKS), kernel_name="python3",
                        progress_bar=False, log_output=False)
    nb = nbformat.read(out, as_version=4)
    texts = []
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            texts.append(o.get("text", ""))
            texts.append(str((o.get("data") or {}).get("text/plain", "")))
    return "".join(texts)
