"""Federated DP risk model vs a pooled scikit-learn model, scored on an unseen cohort.

Simulates one population (``fedgen.testing.make_synth``: a binary trait CC driven by a variant,
age and sex), writes two training sites and an external cohort, trains the study's model with
FedAvg for each ε per site (DP-SGD with Opacus; ∞ = plain SGD at sites that allow it; every
round a Flower-format ``train`` message per site, combined by ``flwr.serverapp.strategy.FedAvg``),
scores the external cohort with ``fedgen score``, and prints the AUC next to a pooled
non-private scikit-learn logistic regression on the same features and training people, plus
training time and the bytes of each site's model-update reply per round (mean over rounds). Beside it, the federated AUC on the sites' held-out
people (``study.model.holdout``; from the summed histograms, ± the SE of the DP noise, and the
tie bound of the binning), per round: under DP it costs ``eval_share`` of each site's ε.

``--select dp`` measures the whole pipeline instead of given features: each ε is then the total
per site, a share (``--select-share``, default 1/3) spent by a ``privacy=dp`` study whose DP
top-k release picks the model's variants (``study.model.variants: top:N``) and the rest by
DP-SGD training; the baseline is the pooled non-private pipeline: the exact top-N of the same
study without DP, and a pooled scikit-learn model on those variants.

``--data DIR`` (with ``--select dp``) takes cohorts from a folder instead of the simulation above:
site subfolders holding ``genotypes.vcf.gz`` + ``samples.tsv`` (as ``fedgen simulate`` writes
them), ``--train a,b`` the training sites, ``--external c`` the unseen cohort, ``--pheno`` the
binary trait, and ``truth/causal.tsv`` (if present) the simulated causal variants, of which it
counts those among the model's features. On ``fedgen simulate`` cohorts (several causal loci
with linkage) the selection decides what the model can learn.

Run: ``python scripts/bench_model.py [--sites 1400,2000] [--external 1500] [--eps 1,3,8,inf]
[--select given|dp] [--top 50] [--data DIR --train a,b --external c --pheno T2D]``
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="1400,2000")
    ap.add_argument("--external", default="1500", help="people in the simulated external cohort, or with --data its site folder")
    ap.add_argument("--data", help="--select dp: cohorts from this folder (fedgen simulate's layout) instead of a simulation")
    ap.add_argument("--train", default="a,b", help="--data: the training sites' folders")
    ap.add_argument("--pheno", default="T2D", help="--data: the binary trait")
    ap.add_argument("--variants", type=int, default=400)
    ap.add_argument("--eps", default="1,3,8,inf")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--eval-share", type=float, default=0.1)
    ap.add_argument("--select", choices=("given", "dp"), default="given",
                    help="given: a fixed list of 50 variants; dp: the study's own DP top-N (end to end)")
    ap.add_argument("--top", type=int, default=50, help="--select dp: N variants from the DP top-k release")
    ap.add_argument("--select-share", type=float, default=1 / 3, help="--select dp: share of each ε for the selection")
    args = ap.parse_args()
    if args.data:
        if args.select != "dp":
            raise SystemExit("--data needs --select dp (the given-features mode simulates its own cohorts)")
        return from_folder(args)
    args.external = int(args.external)
    args.pheno = "CC"
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from fedgen.cohort.cohort import load_cohort
    from fedgen.federation.transport import InProcessTransport
    from fedgen.learn.score import load_model
    from fedgen.study.learn import model_settings
    from fedgen.study.runner import run_plan
    from fedgen.testing import make_synth, write_samples, write_vcf

    sizes = [int(x) for x in args.sites.split(",")]
    n_all = sum(sizes) + args.external
    data = make_synth(n_all, args.variants, seed=11, missing_rate=0.01, extremes=False)
    tmp = Path(tempfile.mkdtemp(prefix="fedgen-bench-model-"))
    cuts = np.cumsum([0, *sizes, args.external])
    parts = {f"site{k + 1}": np.arange(cuts[k], cuts[k + 1]) for k in range(len(sizes))}
    parts["external"] = np.arange(cuts[-2], cuts[-1])
    files = {}
    for name, cols in parts.items():
        (tmp / name).mkdir()
        write_vcf(data, tmp / name / "g.vcf.gz", cols=cols, with_multiallelic=False)
        write_samples(data, tmp / name / "samples.tsv", cols)
        files[name] = {"site": name, "vcf": str(tmp / name / "g.vcf.gz"), "samples": str(tmp / name / "samples.tsv")}
    # features: the causal variant and 49 others, by ID
    ids = [i for i in data.ids if i != "."]
    feats = [data.ids[40]] + [i for i in ids if i != data.ids[40]][:49]
    (tmp / "features.txt").write_text("\n".join(feats) + "\n")
    ext = load_cohort({**files["external"], "state_dir": str(tmp / "external" / "state")})
    y_ext = ext.sample_values("CC")
    if args.select == "dp":
        return end_to_end(args, tmp, files, parts, {data.ids[40]}, ext, y_ext)

    print(f"training sites {sizes}, external cohort {args.external}, {len(feats)} variants + age, sex; "
          f"{args.rounds} FedAvg rounds; {100 * args.holdout:.0f}% of each site held out for the federated evaluation")
    print(f"{'epsilon/site':>12} {'AUC fedgen':>11} {'AUC pooled sklearn':>19} {'gap':>7} {'train s':>8} {'bytes/round/site':>17}"
          f" {'held-out AUC (last round) ± SE':>31} {'tie bound':>9}")
    curves = {}
    pooled_auc = None
    for eps_text in args.eps.split(","):
        eps = math.inf if eps_text.strip() in ("inf", "∞") else float(eps_text)
        run = tmp / f"eps-{eps_text}"
        nodes = {s: {**files[s], "state_dir": str(run / s), "policy":
                     '{"extra_analyses": ["model_update", "model_eval_exact"], "min_count": 5}'} for s in files if s != "external"}
        plan = {"name": "bench", "study_id": "bench-model", "output_dir": str(run / "out"), "sites": list(nodes), "federation": "inprocess",
                "analyses": ["freq", "missing", "hardy", "model"], "phenotypes": [], "covariates": [],
                "qc": {"maf": None, "geno": None, "hwe": None}, "block_size": 65536, "missing": "impute",
                "model": model_settings({"phenotype": "CC", "covariates": ["age", "sex"], "variants": str(tmp / "features.txt"),
                                         "rounds": args.rounds, "dp": math.isfinite(eps),
                                         "epsilon": eps if math.isfinite(eps) else 1.0, "lr": 0.5, "batch": 256,
                                         "holdout": args.holdout, "eval_share": args.eval_share})}
        t0 = time.perf_counter()
        run_plan(plan, InProcessTransport(nodes))
        secs = time.perf_counter() - t0
        model = load_model(run / "out" / "model")
        scores = _fedgen_score(run / "out" / "model", files["external"], run / "external-scores.tsv", ext)
        ok = np.isfinite(scores) & np.isfinite(y_ext)
        auc = roc_auc_score(y_ext[ok], scores[ok])
        if pooled_auc is None:
            pooled_auc = _pooled(model, files, parts, data, ext, y_ext, LogisticRegression, roc_auc_score)
        curve = model["training"]["curve"]
        per_round = "/".join(str(int(np.mean([c["bytes"][s] for c in curve]))) for s in nodes)
        curves[eps_text] = curve
        last = curve[-1]
        fed = f"{last['auc']:.4f} ± {last['auc_se']:.4f}" if "auc" in last else "not evaluated"
        tie = f"{last['auc_tie_bound']:.4f}" if "auc" in last else ""
        print(f"{eps_text:>12} {auc:>11.4f} {pooled_auc:>19.4f} {auc - pooled_auc:>+7.4f} {secs:>8.1f} {per_round:>17}"
              f" {fed:>31} {tie:>9}")
    print("\nper-round federated AUC on the held-out people (± SE of the DP noise; exact where ε = inf):")
    for eps_text, curve in curves.items():
        print(f"{eps_text:>12}: " + "  ".join(f"r{c['round']} {c['auc']:.3f}±{c['auc_se']:.3f}" for c in curve if "auc" in c))
    print(f"(data and results in {tmp})", file=sys.stderr)


def from_folder(args) -> None:
    """--data: the training sites, the external cohort and the causal variants from a folder."""
    import csv

    from fedgen.cohort.cohort import load_cohort

    root = Path(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="fedgen-bench-model-"))
    files = {}
    for name in [*args.train.split(","), args.external]:
        d = root / name
        if not (d / "genotypes.vcf.gz").exists() or not (d / "samples.tsv").exists():
            raise SystemExit(f"{d}: no genotypes.vcf.gz + samples.tsv")
        files["external" if name == args.external else name] = {
            "site": name, "vcf": str(d / "genotypes.vcf.gz"), "samples": str(d / "samples.tsv")}
    ext = load_cohort({**files["external"], "state_dir": str(tmp / "external-state")})
    y_ext = ext.sample_values(args.pheno)
    causal: set[str] = set()
    truth = root / "truth" / "causal.tsv"
    if truth.exists():
        with open(truth) as fh:
            causal = {r["ID"] for r in csv.DictReader(fh, delimiter="\t") if r["trait"] == args.pheno}
    parts = {k: None for k in files}
    return end_to_end(args, tmp, files, parts, causal, ext, y_ext)


def end_to_end(args, tmp: Path, files: dict, parts: dict, causal: set[str], ext, y_ext) -> None:
    """--select dp: DP top-N selection + DP-SGD within each total ε, against exact top-N + pooled sklearn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from fedgen.cohort.cohort import load_cohort
    from fedgen.federation.transport import InProcessTransport
    from fedgen.learn.score import load_model
    from fedgen.study.learn import model_settings
    from fedgen.study.runner import run_plan

    def plan_for(run: Path, eps_total: float) -> dict:
        model = {"phenotype": args.pheno, "covariates": ["age", "sex"], "variants": f"top:{args.top}", "rounds": args.rounds,
                 "lr": 0.5, "batch": 256, "holdout": args.holdout, "eval_share": args.eval_share, "clump_kb": 0}
        plan = {"name": "bench", "study_id": "bench-model", "output_dir": str(run / "out"),
                "sites": [s for s in files if s != "external"], "federation": "inprocess", "phenotypes": [args.pheno],
                "covariates": [], "qc": {"maf": None, "geno": None, "hwe": None}, "block_size": 65536,
                "missing": "impute"}
        if math.isfinite(eps_total):
            eps_sel = args.select_share * eps_total
            plan.update(analyses=["freq", "topk", "model"],
                        privacy={"mode": "dp", "epsilon": eps_sel, "delta": 1e-6, "topk": args.top, "force": True},
                        model=model_settings({**model, "dp": True, "epsilon": eps_total - eps_sel}))
        else:  # the non-private pipeline: exact top-N (allelic test), non-private training
            plan.update(analyses=["freq", "assoc", "model"], model=model_settings({**model, "dp": False}))
        return plan

    sizes = {k: (len(p) if p is not None else len(load_cohort({**files[k], "state_dir": str(tmp / f"{k}-count")}).sample_cols))
             for k, p in parts.items()}
    print(f"end to end: training sites {[n for k, n in sizes.items() if k != 'external']}, external cohort "
          f"{sizes['external']}; the model's {args.top} variants from the study's own DP top-k "
          f"({args.select_share:.2f} of each ε; the rest DP-SGD), + age, sex; {args.rounds} rounds")
    print(f"{'epsilon/site (total)':>21} {'AUC fedgen':>11} {'AUC pooled exact pipeline':>26} {'gap':>7} "
          f"{'causal variants among features':>31} {'train s':>8}")
    pooled_auc = None
    for eps_text in ["inf", *[e for e in args.eps.split(",") if e.strip() not in ("inf", "∞")]]:
        eps = math.inf if eps_text == "inf" else float(eps_text)
        run = tmp / f"e2e-{eps_text}"
        nodes = {s: {**files[s], "state_dir": str(run / s), "policy":
                     '{"extra_analyses": ["model_update", "model_eval_exact"], "min_count": 5, "epsilon_budget": 100}'}
                 for s in files if s != "external"}
        t0 = time.perf_counter()
        run_plan(plan_for(run, eps), InProcessTransport(nodes))
        secs = time.perf_counter() - t0
        model = load_model(run / "out" / "model")
        scores = _fedgen_score(run / "out" / "model", files["external"], run / "external-scores.tsv", ext)
        ok = np.isfinite(scores) & np.isfinite(y_ext)
        auc = roc_auc_score(y_ext[ok], scores[ok])
        if pooled_auc is None:  # exact top-N (this first, non-private run) + pooled sklearn on the same people
            pooled_auc = _pooled(model, files, parts, None, ext, y_ext, LogisticRegression, roc_auc_score, args.pheno)
        picked = sum(v["id"] in causal for v in model["variants"])
        print(f"{eps_text:>21} {auc:>11.4f} {pooled_auc:>26.4f} {auc - pooled_auc:>+7.4f} {f'{picked} of {len(causal)}':>31} "
              f"{secs:>8.1f}")
    print(f"(data and results in {tmp})", file=sys.stderr)


def _fedgen_score(model_dir: Path, site: dict, out: Path, ext) -> np.ndarray:
    """``fedgen score`` on the external cohort; its SCORE column in the cohort's sample order."""
    from fedgen.cli import main as cli

    if cli(["score", "--model", str(model_dir), "--vcf", site["vcf"], "--samples", site["samples"], "--out", str(out)]) != 0:
        raise SystemExit("fedgen score failed")
    rows = [ln.split("\t") for ln in out.read_text().splitlines()[1:]]
    by_id = {r[0]: float(r[1]) if r[1] not in ("", "NA", "nan") else math.nan for r in rows}
    ids = [ext.vcf_samples[j] for j in ext.sample_cols.tolist()]
    return np.asarray([by_id.get(i, math.nan) for i in ids], dtype=float)


def _pooled(model, files, parts, data, ext, y_ext, LogisticRegression, roc_auc_score, pheno: str = "CC") -> float:
    """Pooled non-private scikit-learn model on the same features (same standardisation), same people."""
    from fedgen.cohort.cohort import load_cohort
    from fedgen.learn.evaluate import holdout_mask
    from fedgen.learn.score import feature_matrix

    X, y = [], []
    for s in files:
        if s == "external":
            continue
        c = load_cohort({**files[s], "state_dir": str(Path(files[s]["vcf"]).parent / "pooled-state")})
        Xs, keep, _ = feature_matrix(model, c)
        ys = c.sample_values(pheno)
        ids = [c.vcf_samples[j] for j in c.sample_cols.tolist()]
        held = holdout_mask(ids, "bench-model", float(model["training"].get("holdout") or 0.0))
        ok = keep & np.isfinite(ys) & ~held  # the people fedgen trained on
        X.append(Xs[ok])
        y.append(ys[ok])
    clf = LogisticRegression(C=1e6, max_iter=5000).fit(np.vstack(X), np.concatenate(y))
    Xe, keep, _ = feature_matrix(model, ext)
    ok = keep & np.isfinite(y_ext)
    return float(roc_auc_score(y_ext[ok], clf.predict_proba(Xe[ok])[:, 1]))


if __name__ == "__main__":
    main()
