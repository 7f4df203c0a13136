#!/usr/bin/env python
"""Utility of the privacy=dp study against ε: a Hydra multirun on the simulated cohorts.

Uses the demo cohorts (``demo/data``, written by ``make demo``) or any folder of site
subfolders holding ``genotypes.vcf.gz`` + ``samples.tsv`` (``--data``; ``truth/causal.tsv``
gives the simulated causal variants). In one invocation it

1. runs the exact reference once (``study=gwas``, analyses freq, missing, hardy, assoc, the
   phenotype, no covariates, ``privacy=none``, in-process): exact ``freq.afreq`` and the
   allelic test ``<PHENO>.assoc``. QC filters are off, as in the DP study, so both rank the same
   candidate variants (on the demo data the exact top 10 is the same with the default filters);
2. launches a Hydra multirun of ``scripts/bench_dp_conf/bench_dp.yaml`` (fedgen's study
   config with ``study=dp privacy=dp federation=inprocess``) sweeping
   ``privacy.epsilon=<--eps>`` × ``rep=0..<--reps>-1`` × ``bench.scope=all,panel`` (``panel``:
   the DP study with ``study.dp.panel`` = a panel of ``--panel-size`` variants drawn at random
   from the study variants, ``<out>/panel.txt``; ``--panel-size 0`` runs scope ``all`` only);
   every job runs the DP study in this process and writes ``metrics.json`` in its Hydra job
   folder (``<out>/multirun/eps=E/rep=R/SCOPE/``):

   * the error of the DP ``ALT_FREQS`` (shrunk) and ``ALT_FREQS_RAW`` against exact: mean
     absolute error and RMSE over the variants the DP study released, and over those with exact
     MAF >= 0.05, beside the know-nothing guess (every released variant at their mean exact
     frequency) on the same variants;
   * of the exact top k by allelic P (genome-wide, also for the panel scope), how many the DP top-k release
     ``<PHENO>.dp_topk.assoc`` holds (match by chromosome + position, or SNP id);
   * of the simulated causal variants of the phenotype, how many the DP top-k holds (and, as
     the ceiling, how many the exact top k holds);
   * the causal-locus recall of the DP top-k against the exact top-k of the same k: of the
     causal variants the exact top k holds, the share the DP top-k holds too (undefined, and
     left out of the mean, when the exact top k holds none; for the panel scope the exact top k
     is the panel's);
   * ε spent per site, from the manifest (it must equal the target ε);
   * the planner's predictions, made by the study before any release (it is given each causal
     locus's marginal effect from the exact test and, as ``privacy.planner.exact_loci``, how many
     causal loci the exact top k holds): AF MAE, causal loci in the DP top k (independent-variant
     model), the recall, and the count of the exact top k's causal loci in the DP top k;
3. prints the command it was run with, per ε and scope the mean (min-max over repetitions) of each figure, writes
   ``<out>/summary.json`` and the plot ``<out>/dp_utility.png``.

The sites get their own state folders under ``<out>/state`` (genotype caches, privacy ledgers,
audit logs) and an inline policy with a ε budget of 1e9, so the benchmark never spends from the
ledgers of the data folder's own ``fedgen-state``. The first run decodes the VCFs there.

Usage: ``python scripts/bench_dp.py [--data demo/data] [--out bench/dp] [--reps 3]
[--eps 0.1,0.5,1,2,5,10] [--k 10] [--pheno T2D] [--panel-size 1000] [--keep-outputs]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedgen.federation.transport import InProcessTransport  # noqa: E402
from fedgen.study.plan import CONF_DIR, build_plan, compose_config  # noqa: E402
from fedgen.study.runner import run_plan  # noqa: E402

BENCH_CONF = Path(__file__).resolve().parent / "bench_dp_conf"
DEMO_SITES = ("hk", "sz")  # the sites of fedgen's `sites=demo` group
BUDGET = 1.0e9  # the benchmark sites' inline policy: ε budget over all of the benchmark's runs
MAF_MIN = 0.05
log = logging.getLogger("bench_dp")


# ---------------------------------------------------------------------------------------------
# reading fedgen outputs


def norm_chrom(c: Any) -> str:
    c = str(c)
    return c[3:] if c.lower().startswith("chr") else c


def read_afreq(path: Path, column: str = "ALT_FREQS") -> tuple[list[tuple[str, ...]], np.ndarray]:
    """``freq.afreq``: variant keys (CHROM, POS, ID, REF, ALT) and ``column`` (NaN where undefined)."""
    keys, freqs = [], []
    with open(path) as fh:
        head = fh.readline().rstrip("\n").split("\t")
        ic, ip, ii, ir, ia, fi = (head.index(c) for c in ("#CHROM", "POS", "ID", "REF", "ALT", column))
        for line in fh:
            f = line.rstrip("\n").split("\t")
            keys.append((norm_chrom(f[ic]), f[ip], f[ii], f[ir], f[ia]))
            try:
                freqs.append(float(f[fi]))
            except ValueError:  # NA
                freqs.append(math.nan)
    return keys, np.asarray(freqs, dtype=float)


def read_assoc(path: Path) -> list[dict[str, Any]]:
    """A PLINK 1.9 ``.assoc`` file (whitespace-separated): rows with chrom, id, pos, chisq, p."""
    rows = []
    with open(path) as fh:
        head = fh.readline().split()
        for line in fh:
            f = dict(zip(head, line.split()))
            if not f:
                continue
            p = float(f["P"]) if f["P"] not in ("NA", "nan") else math.nan
            num = {k: (float(f[k]) if f.get(k) not in (None, "NA", "nan") else math.nan) for k in ("F_U", "OR")}
            rows.append({"chrom": norm_chrom(f["CHR"]), "id": f["SNP"], "pos": int(f["BP"]), "p": p,
                         "f_u": num["F_U"], "or": num["OR"]})
    return rows


def read_causal(path: Path, pheno: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    out = []
    for line in lines[1:]:
        r = dict(zip(head, line.split("\t")))
        if r.get("trait") == pheno:
            out.append({"chrom": norm_chrom(r["CHROM"]), "pos": int(r["POS"]), "id": r.get("ID", "."),
                        "effect": float(r.get("effect", "nan"))})
    return out


def hits(variants: list[dict[str, Any]], release: list[dict[str, Any]]) -> list[bool]:
    """Which of ``variants`` are in ``release`` (same chromosome + position, or same SNP id)."""
    at = {(r["chrom"], r["pos"]) for r in release}
    ids = {r["id"] for r in release if r["id"] not in (".", "")}
    return [(v["chrom"], v["pos"]) in at or v["id"] in ids for v in variants]


def af_errors(dp: np.ndarray, exact: np.ndarray, raw: np.ndarray | None = None) -> dict[str, Any]:
    """Errors of the DP frequencies ``dp`` (and ``raw``) against ``exact``, on the same variants, beside
    the know-nothing guess (every variant at the mean exact frequency of the scored variants)."""
    maf = np.minimum(exact, 1 - exact)
    ok = np.isfinite(dp) & np.isfinite(exact)
    out: dict[str, Any] = {"af_undefined": int(np.sum(np.isfinite(exact) & ~np.isfinite(dp)))}
    for tag, sel in (("", ok), ("_common", ok & (maf >= MAF_MIN))):
        d = dp[sel] - exact[sel]
        out[f"af_mae{tag}"] = float(np.mean(np.abs(d))) if d.size else math.nan
        out[f"af_rmse{tag}"] = float(np.sqrt(np.mean(d * d))) if d.size else math.nan
        out[f"af_scored{tag}"] = int(d.size)
        x = exact[sel]
        out[f"af_mae_guess{tag}"] = float(np.mean(np.abs(x - x.mean()))) if x.size else math.nan
        if raw is not None:
            out[f"af_mae_raw{tag}"] = float(np.mean(np.abs(raw[sel] - x))) if x.size else math.nan
    out["af_ratio"] = out["af_mae"] / out["af_mae_guess"] if out["af_mae_guess"] > 0 else math.nan
    if raw is not None:
        out["af_ratio_raw"] = out["af_mae_raw"] / out["af_mae_guess"] if out["af_mae_guess"] > 0 else math.nan
    return out


# ---------------------------------------------------------------------------------------------
# overrides shared by the exact run and the sweep


def site_overrides(data: Path, sites: list[str], out: Path) -> list[str]:
    ov = []
    for s in sites:
        ov += [f"++sites.{s}.vcf={data / s / 'genotypes.vcf.gz'}", f"++sites.{s}.samples={data / s / 'samples.tsv'}",
               f"++sites.{s}.state_dir={out / 'state' / s}", f"++sites.{s}.policy={{epsilon_budget:{BUDGET:.1e}}}"]
    ov += [f"~sites.{s}" for s in DEMO_SITES if s not in sites]
    return ov


def quiet_fedgen() -> None:
    logging.getLogger("fedgen").setLevel(logging.WARNING)


def exact_reference(data: Path, sites: list[str], out: Path, pheno: str, k: int) -> dict[str, Any]:
    """Run the exact (privacy=none) study once; write and return ``<out>/exact/reference.json``."""
    res = out / "exact" / "results"
    cfg = compose_config([
        *site_overrides(data, sites, out), "study=gwas", "privacy=none", "federation=inprocess",
        "study.analyses=[freq,missing,hardy,assoc]", f"study.phenotypes=[{pheno}]", "study.covariates=[]",
        "study.pcs=0", "study.qc.maf=null", "study.qc.geno=null", "study.qc.hwe=null", f"output_dir={res}",
    ])
    plan, node_configs = build_plan(cfg)
    t0 = time.perf_counter()
    manifest = run_plan(plan, InProcessTransport(node_configs))
    wall = time.perf_counter() - t0
    assoc = read_assoc(res / f"{pheno}.assoc")
    ranked = sorted((r for r in assoc if math.isfinite(r["p"])), key=lambda r: r["p"])
    top = ranked[:k]
    causal = read_causal(data / "truth" / "causal.tsv", pheno)
    study_at = {(r["chrom"], r["pos"]) for r in assoc}
    for c, in_top in zip(causal, hits(causal, top)):
        c["in_study"] = (c["chrom"], c["pos"]) in study_at
        c["in_exact_top"] = in_top
    keys_x, f_x = read_afreq(res / "freq.afreq")
    ok = np.isfinite(f_x)
    # the planner's assumed signal: each causal locus in the study with its marginal effect as the
    # pooled exact allelic test sees it (A1 frequency in controls, allelic OR); the simulation's
    # per-allele effects are conditional on covariates and ancestry, so they overstate it
    by_pos = {(r["chrom"], r["pos"]): r for r in assoc}
    for c in causal:
        r = by_pos.get((c["chrom"], c["pos"]))
        ok = r is not None and math.isfinite(r["f_u"]) and math.isfinite(r["or"]) and r["or"] > 0
        c["maf"] = float(r["f_u"]) if ok else None
        c["odds_ratio"] = float(r["or"]) if ok else None
    effect = planner_effect(causal)
    ref = {
        "planner_effect": effect,
        "phenotype": pheno,
        "k": k,
        "afreq": str(res / "freq.afreq"),
        "assoc": str(res / f"{pheno}.assoc"),
        "exact_top": top,
        "causal": causal,
        "variants": int(manifest["variants"]["study"]),
        "samples": {s: int(v["samples"]) for s, v in manifest["sites"].items()},
        # for scale: the error of guessing every variant's ALT frequency as the mean one
        "af_mae_constant": float(np.mean(np.abs(f_x[ok] - f_x[ok].mean()))),
        "wall_seconds": wall,
    }
    path = out / "exact" / "reference.json"
    path.write_text(json.dumps(ref, indent=1))
    return ref


def planner_effect(causal: list[dict[str, Any]], ids: set[str] | None = None,
                   in_exact_top: list[bool] | None = None) -> dict[str, Any]:
    """``privacy.planner`` settings for the causal loci with a frequency (and, with ``ids``, in that set),
    with ``exact_loci``: how many of them the exact top k holds (``in_exact_top``: per causal variant;
    default each variant's ``in_exact_top``)."""
    flags = in_exact_top if in_exact_top is not None else [bool(c.get("in_exact_top")) for c in causal]
    use = [(c, f) for c, f in zip(causal, flags) if c.get("maf") and c.get("odds_ratio") and (ids is None or c["id"] in ids)]
    if not use:
        return {"n_causal": 0, "maf": 0.2, "odds_ratio": 1.0}
    return {"n_causal": len(use), "maf": [c["maf"] for c, _ in use], "odds_ratio": [c["odds_ratio"] for c, _ in use],
            "exact_loci": int(sum(f for _, f in use))}


def panel_exact_top(ref: dict[str, Any], entries: set[str], k: int) -> list[dict[str, Any]]:
    """The exact top ``k`` by allelic P among the panel's variants (IDs, or CHROM:POS:REF:ALT entries)."""
    at = set()
    for e in entries:
        parts = e.split(":")
        if len(parts) == 4 and parts[1].isdigit():
            at.add((norm_chrom(parts[0]), int(parts[1])))
    rows = [r for r in read_assoc(Path(ref["assoc"])) if math.isfinite(r["p"]) and (r["id"] in entries or (r["chrom"], r["pos"]) in at)]
    return sorted(rows, key=lambda r: r["p"])[:k]


def recall(found: list[bool], in_exact: list[bool]) -> float:
    """Of the variants in the exact top k (``in_exact``), the share the DP top k holds (``found``); NaN when none."""
    n = sum(in_exact)
    return sum(f and x for f, x in zip(found, in_exact)) / n if n else math.nan


def write_panel(ref: dict[str, Any], out: Path, size: int, seed: int = 1) -> Path:
    """``<out>/panel.txt``: ``size`` study variants drawn at random (IDs, or CHROM:POS:REF:ALT where there is none)."""
    keys, _ = read_afreq(Path(ref["afreq"]))
    pick = np.sort(np.random.default_rng(seed).choice(len(keys), min(size, len(keys)), replace=False))
    lines = [f"# bench_dp: {len(pick)} of the {len(keys)} study variants, drawn at random (seed {seed})"]
    for i in pick.tolist():
        c, p, vid, r, a = keys[i]
        lines.append(vid if vid not in (".", "") else f"{c}:{p}:{r}:{a}")
    path = out / "panel.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# one Hydra job: the DP study at one (epsilon, rep)


@hydra.main(config_path=str(BENCH_CONF), config_name="bench_dp", version_base="1.3")
def dp_job(cfg: DictConfig) -> dict[str, Any]:
    quiet_fedgen()
    ref = json.loads(Path(cfg.bench.reference).read_text())
    pheno, k = ref["phenotype"], int(ref["k"])
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    scope = str(cfg.bench.scope)
    if scope not in ("all", "panel"):
        raise ValueError(f"bench.scope must be all or panel, got {scope!r}")
    cfg.study.dp.panel = str(cfg.bench.panel) if scope == "panel" else None
    effect = ref.get("planner_effect") or {}
    causal_in_exact = [bool(c["in_exact_top"]) for c in ref["causal"]]
    if scope == "panel":  # only the causal loci the panel holds can be found; the exact top k is the panel's
        entries = {ln.split()[0] for ln in Path(cfg.bench.panel).read_text().splitlines() if ln.strip() and not ln.startswith("#")}
        causal_in_exact = hits(ref["causal"], panel_exact_top(ref, entries, k))
        effect = planner_effect(ref["causal"], entries, causal_in_exact)
    for key, value in effect.items():  # predict for the simulation's own signal
        cfg.privacy.planner[key] = value
    plan, node_configs = build_plan(cfg)
    eps = float(plan["privacy"]["epsilon"])
    t0 = time.perf_counter()
    manifest = run_plan(plan, InProcessTransport(node_configs))
    wall = time.perf_counter() - t0
    res = Path(plan["output_dir"])
    keys_x, f_x = read_afreq(Path(ref["afreq"]))
    keys_d, f_d = read_afreq(res / "freq.afreq")
    f_raw = read_afreq(res / "freq.afreq", "ALT_FREQS_RAW")[1]
    if keys_d != keys_x:  # score the variants the DP study released (all, or the panel's), aligned by variant
        pos = {key: i for i, key in enumerate(keys_x)}
        f_x = np.asarray([f_x[pos[key]] if key in pos else math.nan for key in keys_d])
    release = read_assoc(res / f"{pheno}.dp_topk.assoc")
    top_hit = hits(ref["exact_top"], release)
    causal_hit = hits(ref["causal"], release)
    assoc = (manifest.get("association") or {}).get(pheno) or {}
    metrics = {
        "epsilon": eps,
        "rep": int(cfg.rep),
        "scope": scope,
        "variants": len(keys_d),
        "delta": float(plan["privacy"]["delta"]),
        "k": int(plan["privacy"]["topk"]),
        **af_errors(f_d, f_x, f_raw),
        "top_recovered": int(sum(top_hit)),
        "top_of": len(top_hit),
        "top_recovered_ids": [v["id"] for v, h in zip(ref["exact_top"], top_hit) if h],
        "causal_recovered": int(sum(causal_hit)),
        "causal_of": len(causal_hit),
        "causal_recovered_ids": [v["id"] for v, h in zip(ref["causal"], causal_hit) if h],
        # causal-locus recall of the DP top-k against the exact top-k of the same k
        "causal_in_exact_top": int(sum(causal_in_exact)),
        "causal_recall": recall(causal_hit, causal_in_exact),
        "release": [r["id"] for r in release],
        "candidates": assoc.get("candidates") or (assoc.get("topk") or {}).get("candidates"),
        "epsilon_spent": {s: float(v.get("epsilon_spent", math.nan)) for s, v in manifest["sites"].items()},
        "wall_seconds": round(wall, 3),
        "results": str(res),
    }
    # the planner's predictions for this job, made by the study before any release
    planned = {r["release"]: r for r in ((manifest.get("privacy") or {}).get("planner") or {}).get("releases", [])}
    af_plan = next((r for name, r in planned.items() if name.startswith("genotype counts")), {})
    top_plan = next((r for name, r in planned.items() if name.startswith("DP top-k")), {})
    metrics["pred_af_mae"] = af_plan.get("af_mae_shrunk", math.nan)
    metrics["pred_af_mae_raw"] = af_plan.get("af_mae_raw", math.nan)
    metrics["pred_causal_recovered"] = top_plan.get("expected_causal_found", math.nan)
    metrics["pred_causal_recall"] = top_plan.get("expected_recall_of_exact", math.nan)
    metrics["pred_causal_found_of_exact"] = top_plan.get("expected_causal_found_of_exact", math.nan)
    metrics["causal_found_of_exact"] = int(sum(h and x for h, x in zip(causal_hit, causal_in_exact)))
    (job_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if not cfg.bench.keep_outputs:  # keep the manifest and the top-k release, drop the bulky files
        for p in res.iterdir():
            if p.name not in ("manifest.json", f"{pheno}.dp_topk.assoc"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    log.info("eps=%g rep=%d %s (%d variants): AF MAE %.4g (raw %.4g, guess %.4g), top-%d %d/%d, causal %d/%d, "
             "eps spent %s (%.1f s)", eps, metrics["rep"], scope, metrics["variants"], metrics["af_mae"],
             metrics["af_mae_raw"], metrics["af_mae_guess"], k, metrics["top_recovered"], metrics["top_of"], metrics["causal_recovered"],
             metrics["causal_of"], ", ".join(f"{s} {v:.4g}" for s, v in metrics["epsilon_spent"].items()), wall)
    return metrics


def launch_multirun(overrides: list[str]) -> None:
    """Run :func:`dp_job` as a Hydra multirun with ``overrides`` (as if given on its command line)."""
    argv = sys.argv
    sys.argv = [str(Path(__file__).resolve()), *overrides]
    try:
        dp_job()
    finally:
        sys.argv = argv


# ---------------------------------------------------------------------------------------------
# summary


def stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    if not np.isfinite(v).any():
        return {"mean": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": float(np.nanmean(v)), "min": float(np.nanmin(v)), "max": float(np.nanmax(v))}


def fmt(s: dict[str, float], spec: str) -> str:
    if s["min"] == s["max"]:
        return format(s["mean"], spec)
    return f"{s['mean']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"


def summarise(jobs: list[dict[str, Any]], eps_list: list[float], scopes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for scope, e in ((sc, e) for sc in scopes for e in eps_list):
        js = [j for j in jobs if math.isclose(j["epsilon"], e) and j.get("scope", "all") == scope]
        sites = sorted({s for j in js for s in j["epsilon_spent"]})
        spent = {s: stats([j["epsilon_spent"].get(s, math.nan) for j in js]) for s in sites}
        rows.append({
            "epsilon": e,
            "scope": scope,
            "reps": len(js),
            **{m: stats([j[m] for j in js]) for m in ("variants", "af_mae", "af_mae_raw", "af_mae_guess", "af_ratio",
                                                       "af_ratio_raw", "af_rmse", "af_mae_common", "af_rmse_common",
                                                       "af_undefined", "top_recovered", "causal_recovered",
                                                       "wall_seconds", "pred_af_mae", "pred_causal_recovered",
                                                       "causal_recall", "pred_causal_recall", "causal_in_exact_top",
                                                       "causal_found_of_exact", "pred_causal_found_of_exact")},
            "epsilon_spent": spent,
            "epsilon_spent_ok": all(math.isclose(j["epsilon_spent"].get(s, math.nan), e, rel_tol=1e-6)
                                    for j in js for s in sites),
        })
    return rows


def print_table(rows: list[dict[str, Any]], ref: dict[str, Any], k: int) -> None:
    n_causal = len(ref["causal"])
    sites = sorted(rows[0]["epsilon_spent"]) if rows else []
    cols = ["eps", "released", "variants", "AF MAE shrunk", "AF MAE raw", "guess MAE", "shrunk/guess", "raw/guess",
            "AF MAE (MAF>=5%)", f"top-{k} recovered", f"causal recovered (of {n_causal})", "planner: AF MAE",
            "planner: causal", "causal in exact top", "causal recall of exact", "planner: recall",
            "exact's causal in DP top", "planner: exact's causal", f"eps spent ({', '.join(sites)})"]
    table = []
    for r in rows:
        spent = ", ".join(fmt(r["epsilon_spent"][s], ".4g") for s in sites)
        table.append([f"{r['epsilon']:g}", r["scope"], fmt(r["variants"], ".0f"), fmt(r["af_mae"], ".4f"),
                      fmt(r["af_mae_raw"], ".4f"), fmt(r["af_mae_guess"], ".4f"), fmt(r["af_ratio"], ".2f"),
                      fmt(r["af_ratio_raw"], ".2f"), fmt(r["af_mae_common"], ".4f"), fmt(r["top_recovered"], ".3g"),
                      fmt(r["causal_recovered"], ".3g"), fmt(r["pred_af_mae"], ".4f"), fmt(r["pred_causal_recovered"], ".3g"),
                      fmt(r["causal_in_exact_top"], ".3g"), fmt(r["causal_recall"], ".2f"), fmt(r["pred_causal_recall"], ".2f"),
                      fmt(r["causal_found_of_exact"], ".3g"), fmt(r["pred_causal_found_of_exact"], ".3g"), spent])
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print(" | ".join(c.rjust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for t in table:
        print(" | ".join(v.rjust(w) for v, w in zip(t, widths)))


def plot(all_rows: list[dict[str, Any]], ref: dict[str, Any], k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in all_rows if r["scope"] == "all"]
    panel = [r for r in all_rows if r["scope"] == "panel"]

    eps = np.array([r["epsilon"] for r in rows])

    def band(ax, key, label, color, marker, **kw):
        m = np.array([r[key]["mean"] for r in rows])
        lo = np.array([r[key]["min"] for r in rows])
        hi = np.array([r[key]["max"] for r in rows])
        ax.plot(eps, m, marker=marker, color=color, label=label, **kw)
        ax.fill_between(eps, lo, hi, color=color, alpha=0.2, linewidth=0)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    band(a1, "af_mae", "MAE, all variants", "tab:blue", "o")
    band(a1, "af_rmse", "RMSE, all variants", "tab:blue", "s")
    band(a1, "af_mae_common", f"MAE, exact MAF ≥ {MAF_MIN:g}", "tab:orange", "o")
    band(a1, "af_rmse_common", f"RMSE, exact MAF ≥ {MAF_MIN:g}", "tab:orange", "s")
    for line in a1.get_lines()[1::2]:
        line.set_linestyle("--")
    if panel:
        pm = np.array([r["af_mae"]["mean"] for r in panel])
        a1.plot([r["epsilon"] for r in panel], pm, marker="D", color="tab:purple",
                label=f"MAE, {int(panel[0]['variants']['mean'])}-variant panel (shrunk)")
        a1.axhline(panel[0]["af_mae_guess"]["mean"], color="tab:purple", linestyle=":", linewidth=1,
                   label="MAE of no data on the panel")
    a1.axhline(ref["af_mae_constant"], color="grey", linestyle=":", linewidth=1,
               label="MAE of no data (every ALT freq. = their mean)")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("ε per site")
    a1.set_ylabel("|DP − exact| ALT allele frequency")
    a1.set_title(f"Allele frequencies ({ref['variants']} variants)")
    a1.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)
    n_causal = len(ref["causal"])
    ceiling = sum(c["in_exact_top"] for c in ref["causal"])
    band(a2, "top_recovered", f"exact top {k} in DP top {k}", "tab:green", "o", markersize=10, markerfacecolor="none",
         linewidth=2.5)
    band(a2, "causal_recovered", f"causal {ref['phenotype']} variants in DP top {k} (of {n_causal})", "tab:red", "s",
         markersize=5)
    a2.axhline(k, color="tab:green", linestyle=":", linewidth=1, label=f"all of the exact top {k}")
    a2.axhline(ceiling, color="tab:red", linestyle=":", linewidth=1, label=f"causal in exact top {k} ({ceiling})")
    a2.set_xscale("log")
    a2.set_ylim(-0.3, k * 1.45)
    a2.set_xlabel("ε per site")
    a2.set_ylabel("variants recovered")
    a2.set_title(f"{ref['phenotype']}: DP top-{k} release")
    a2.grid(True, which="both", alpha=0.3)
    a2.legend(fontsize=8, loc="upper left")
    reps = max(r["reps"] for r in rows)
    fig.suptitle(f"fedgen privacy=dp on the simulated cohorts: mean and min–max over {reps} repetitions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="demo/data", help="folder of site subfolders (genotypes.vcf.gz, samples.tsv) and truth/")
    ap.add_argument("--out", default="bench/dp", help="benchmark folder (state, exact reference, Hydra multirun, summary)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per epsilon")
    ap.add_argument("--eps", default="0.1,0.5,1,2,5,10", help="comma-separated epsilons (per site)")
    ap.add_argument("--k", type=int, default=10, help="size of the DP top-k release and of the exact top list")
    ap.add_argument("--pheno", default="T2D", help="binary phenotype")
    ap.add_argument("--panel-size", type=int, default=1000,
                    help="also run every job with study.dp.panel = this many study variants drawn at random (0: no panel)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep every job's full DP study folder")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every DP study, e.g. privacy.select_k=30 "
                                                 "privacy.split.select=0.7")
    args = ap.parse_args()
    t_start = time.perf_counter()
    command = shlex.join(["python", *sys.argv])
    print(f"command: {command}", flush=True)

    data = Path(args.data).expanduser().resolve()
    sites = sorted(p.name for p in data.iterdir() if (p / "genotypes.vcf.gz").is_file() and (p / "samples.tsv").is_file()) \
        if data.is_dir() else []
    if not sites:
        print(f"error: no simulated cohorts in {args.data} (site folders with genotypes.vcf.gz + samples.tsv); "
              f"run `make demo` or `fedgen simulate --out {args.data}` first", file=sys.stderr)
        sys.exit(2)
    eps_tokens = [t.strip() for t in args.eps.split(",") if t.strip()]
    try:
        eps_list = [float(t) for t in eps_tokens]
    except ValueError:
        ap.error(f"--eps: not a comma-separated list of numbers: {args.eps!r}")
    if not eps_list or any(not (math.isfinite(e) and e > 0) for e in eps_list):
        ap.error("--eps: every epsilon must be a positive number")
    if args.reps < 1 or args.k < 1 or args.panel_size < 0:
        ap.error("--reps and --k must be at least 1, --panel-size at least 0")
    out = Path(args.out).expanduser().resolve()
    (out / "exact").mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_fedgen()

    print(f"exact reference (privacy=none) on {', '.join(sites)} ...", flush=True)
    ref = exact_reference(data, sites, out, args.pheno, args.k)
    scopes = ["all", "panel"] if args.panel_size > 0 else ["all"]
    panel = write_panel(ref, out, args.panel_size) if args.panel_size > 0 else out / "panel.txt"

    sweep_dir = out / "multirun"
    shutil.rmtree(sweep_dir, ignore_errors=True)  # this run's jobs only
    overrides = [
        "hydra.mode=MULTIRUN",
        f"hydra.searchpath=[file://{CONF_DIR}]",
        f"bench.out={out}",
        f"bench.keep_outputs={str(args.keep_outputs).lower()}",
        *site_overrides(data, sites, out),
        f"study.phenotypes=[{args.pheno}]",
        f"privacy.topk={args.k}",
        f"privacy.epsilon={','.join(eps_tokens)}",
        f"rep={','.join(str(r) for r in range(args.reps))}",
        f"bench.panel={panel}",
        f"bench.scope={','.join(scopes)}",
        *args.overrides,
    ]
    n_jobs = len(eps_list) * args.reps * len(scopes)
    print(f"Hydra multirun: {len(eps_list)} epsilons x {args.reps} repetitions x {len(scopes)} scopes "
          f"({', '.join(scopes)}) = {n_jobs} DP studies -> {sweep_dir}", flush=True)
    t_sweep = time.perf_counter()
    launch_multirun(overrides)
    t_sweep = time.perf_counter() - t_sweep

    jobs = []
    for p in sorted(sweep_dir.glob("*/*/*/metrics.json")):
        jobs.append(json.loads(p.read_text()))
    if len(jobs) != n_jobs:
        print(f"error: {len(jobs)} of {n_jobs} jobs wrote metrics under {sweep_dir}", file=sys.stderr)
        sys.exit(1)
    rows = summarise(jobs, eps_list, scopes)

    n_causal = len(ref["causal"])
    ceiling = sum(c["in_exact_top"] for c in ref["causal"])
    in_study = sum(c["in_study"] for c in ref["causal"])
    k = args.k
    print()
    print(f"data: {args.data}: {', '.join(f'{s} {n} samples' for s, n in ref['samples'].items())}; {ref['variants']} study variants; "
          f"{args.pheno}: {n_causal} simulated causal variants ({in_study} among the study variants)")
    print(f"exact (privacy=none): the top {k} by allelic P holds {ceiling} of the {n_causal} causal variants (the ceiling); "
          f"top {k}: {', '.join(v['id'] for v in ref['exact_top'])}")
    print(f"DP (study=dp privacy=dp, delta {jobs[0]['delta']:g} per site, top-{k} release); per epsilon the mean (min-max) "
          f"over {args.reps} repetitions; released = all study variants, or the {args.panel_size}-variant panel "
          f"{panel} (study.dp.panel); AF errors against exact on the released variants: ALT_FREQS (shrunk), "
          "ALT_FREQS_RAW, and the know-nothing guess (every released variant at their mean exact frequency)")
    print()
    print_table(rows, ref, k)
    print()
    print(f"for scale: guessing every study variant's ALT frequency as the mean exact one (no data) has AF MAE "
          f"{ref['af_mae_constant']:.4f}")
    undef = [(r["epsilon"], r["af_undefined"]["max"]) for r in rows if r["af_undefined"]["max"] > 0]
    if undef:
        print("variants without a DP frequency (all noisy counts clipped to 0; not scored): "
              + ", ".join(f"eps {e:g}: up to {int(n)}" for e, n in undef))
    ok = all(r["epsilon_spent_ok"] for r in rows)
    print(f"eps spent per site equals the target eps in every job: {'yes' if ok else 'NO'}")

    summary = {
        "command": command,
        "panel": str(panel) if args.panel_size > 0 else None,
        "data": str(data),
        "sites": sites,
        "phenotype": args.pheno,
        "k": k,
        "reps": args.reps,
        "maf_min_common": MAF_MIN,
        "exact": ref,
        "per_epsilon": rows,
        "jobs": jobs,
        "epsilon_spent_ok": ok,
        "wall_seconds": {"total": round(time.perf_counter() - t_start, 1), "sweep": round(t_sweep, 1),
                         "exact": round(ref["wall_seconds"], 1)},
        "hydra_sweep_dir": str(sweep_dir),
    }
    plot(rows, ref, k, out / "dp_utility.png")
    summary["wall_seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {out / 'summary.json'}; plot: {out / 'dp_utility.png'}; Hydra jobs: {sweep_dir}")
    print(f"command: {command}")
    print(f"wall time: {summary['wall_seconds']['total']:.1f} s (exact reference {ref['wall_seconds']:.1f} s, "
          f"{n_jobs} DP studies {t_sweep:.1f} s)")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
