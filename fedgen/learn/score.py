"""``fedgen score``: apply a federated risk model to a site's own patients (no data leaves the site).

The model's variants are found in the site's VCF/BCF by contig (``chr1`` ≡ ``1``), position and
alleles (REF/ALT in either order); the dosage of the scored allele is standardised exactly as in
training. A variant the file lacks, or a missing call, takes the mean (0 on the standardised
scale) and is reported. A person with a missing covariate gets no score (``NA``).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.errors import FedgenError, InputError

log = logging.getLogger("fedgen.score")


def load_model(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "model.json" if Path(folder).is_dir() else Path(folder)
    try:
        model = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a fedgen model ({exc})") from None
    if model.get("format") != "fedgen-model":
        raise InputError(f"{path}: not a fedgen model (format {model.get('format')!r})")
    return model


def feature_matrix(model: dict[str, Any], cohort: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(samples × features) standardised features, a mask of samples with every covariate, and
    the variants the cohort lacks (as CHROM:POS:REF:ALT)."""
    from fedgen.cohort.contigs import harmonise_contig

    where: dict[tuple[str, int], list[int]] = {}
    for i, (c, p) in enumerate(zip(cohort.chrom.tolist(), cohort.pos.tolist())):
        where.setdefault((harmonise_contig(str(c)), int(p)), []).append(i)
    n = cohort.n_samples
    G = np.zeros((n, len(model["variants"])))
    missing: list[str] = []
    for j, v in enumerate(model["variants"]):
        hit = None
        for i in where.get((harmonise_contig(v["chrom"]), int(v["pos"])), []):
            ref, alt = str(cohort.ref[i]), str(cohort.alt[i])
            if {ref, alt} == {v["ref"], v["alt"]}:
                hit = (i, v["scored_allele"] == ref)
                break
        if hit is None:
            missing.append(f"{v['chrom']}:{v['pos']}:{v['ref']}:{v['alt']}")
            continue
        i, scored_is_ref = hit
        g = cohort.block(np.array([i]), np.array([scored_is_ref]))[0].astype(float)
        f = float(v["freq"])
        z = (g - 2 * f) / np.sqrt(2 * f * (1 - f))
        z[g < 0] = 0.0
        G[:, j] = z
    covs = model.get("covariates") or []
    if covs:
        C, keep = _covariates(cohort, covs)
    else:
        C, keep = np.zeros((n, 0)), np.ones(n, bool)
    return np.hstack([G, C]), keep, missing


def _covariates(cohort: Any, covs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The model's covariate columns, standardised as in training, and who has all of them."""
    from fedgen.cohort.phenotypes import _is_missing, _numeric

    rows = cohort.table_rows.tolist()
    blocks = []
    for cv in covs:
        vals = [cohort.table.require(cv["name"])[i] for i in rows]
        if cv["kind"] == "categorical":
            ind = np.zeros((len(vals), max(0, len(cv["levels"]) - 1)))
            for k, lev in enumerate(cv["levels"][1:]):
                ind[:, k] = [v == lev for v in vals]
            ind[[_is_missing(v) for v in vals]] = np.nan
            blocks.append(ind)
        else:
            x = _numeric(vals)
            if x is None:
                raise InputError(f"{cohort.table.path.name}: covariate {cv['name']!r} is not numeric")
            blocks.append(((x - float(cv.get("mean", 0.0))) / float(cv.get("sd", 1.0)))[:, None])
    C = np.hstack(blocks)
    keep = ~np.isnan(C).any(axis=1)
    return np.nan_to_num(C), keep


def score_cohort(model: dict[str, Any], cohort: Any) -> tuple[list[str], np.ndarray, list[str]]:
    """IIDs, scores (NaN where a covariate is missing) and the model variants the cohort lacks."""
    from fedgen.learn import models

    X, keep, missing = feature_matrix(model, cohort)
    pred = models.predict(model["kind"], np.asarray(model["weights"]), X, hidden=int(model.get("hidden", 16)),
                          binary=model.get("trait") == "binary")
    pred = np.where(keep, pred, np.nan)
    iids = [cohort.vcf_samples[j] for j in cohort.sample_cols.tolist()]
    return iids, pred, missing


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("score", help="apply a federated risk model to a site's own VCF/BCF and samples table")
    p.add_argument("--model", required=True, help="the results' model folder (RESULTS/model) or its model.json")
    p.add_argument("--vcf", required=True, help="VCF/BCF of the people to score")
    p.add_argument("--samples", required=True, help="samples table (IID + the model's covariate columns)")
    p.add_argument("--out", required=True, help="output TSV: IID, SCORE")
    p.add_argument("--state-dir", default=None, help="where to keep the genotype cache (default: a temporary folder)")
    p.add_argument("--phenotype", default=None, help="also report the AUC (binary) or R² (quantitative) against this column")
    p.set_defaults(func=cmd_score)
    return p


def cmd_score(args: argparse.Namespace) -> int:
    from fedgen.cohort.cohort import load_cohort
    from fedgen.fileio import atomic_write_text

    model = load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="fedgen-score-") as tmp:
        cohort = load_cohort({"site": "score", "vcf": args.vcf, "samples": args.samples,
                              "state_dir": args.state_dir or tmp})
        iids, scores, missing = score_cohort(model, cohort)
        metric = None
        if args.phenotype:
            metric = evaluate(model, cohort, scores, args.phenotype)
    lines = ["IID\tSCORE"] + [f"{i}\t{'NA' if not np.isfinite(s) else f'{s:.6g}'}" for i, s in zip(iids, scores)]
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n", private=True)
    print(f"scored {int(np.isfinite(scores).sum())} of {len(iids)} people with {len(model['variants'])} variants"
          f" and {len(model.get('covariate_columns') or [])} covariate columns -> {args.out}")
    if missing:
        print(f"{len(missing)} model variant(s) not in {Path(args.vcf).name}, scored at the mean: {', '.join(missing[:5])}"
              + (" ..." if len(missing) > 5 else ""))
    if metric is not None:
        print(f"{metric[0]} against {args.phenotype}: {metric[1]:.4f} ({metric[2]} people)")
    return 0


def evaluate(model: dict[str, Any], cohort: Any, scores: np.ndarray, phenotype: str) -> tuple[str, float, int]:
    """AUC (binary trait) or R² (quantitative) of the scores against a samples-table column."""
    from fedgen.cohort.phenotypes import phenotype_values

    kind = "binary" if model.get("trait") == "binary" else "quantitative"
    y = phenotype_values([cohort.table.require(phenotype)[i] for i in cohort.table_rows.tolist()], kind=kind,
                         name=phenotype, where=cohort.table.path.name)
    ok = np.isfinite(y) & np.isfinite(scores)
    if ok.sum() < 2:
        raise FedgenError(f"too few people with both a score and {phenotype!r}")
    if kind == "binary":
        return "AUC", roc_auc(y[ok], scores[ok]), int(ok.sum())
    resid = y[ok] - scores[ok]
    return "R²", float(1 - (resid ** 2).sum() / ((y[ok] - y[ok].mean()) ** 2).sum()), int(ok.sum())


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for 0/1 labels ``y`` (ties count one half).

    The Mann-Whitney form, equal to scikit-learn's ``roc_auc_score``; computed here so that
    ``fedgen score`` runs on a site-node install (no scikit-learn).
    """
    from scipy.stats import rankdata

    pos = np.asarray(y) > 0.5
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        raise FedgenError("AUC needs both cases and controls among the scored people")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
