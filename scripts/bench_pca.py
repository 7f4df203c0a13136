#!/usr/bin/env python
"""Federated PCA vs pooled ``plink2 --pca approx`` on the same data: time, rounds, bytes, accuracy.

Uses the demo cohorts (``demo/data``, written by ``make demo``) or any folder of site
subfolders holding ``genotypes.vcf.gz`` + ``samples.tsv`` (``--data``); with ``--simulate`` it
runs ``fedgen simulate`` first. Then

* fedgen: site description + genotype counts, then :func:`fedgen.study.pca.run_pca`
  (selection with ``--maf``, optional LD pruning, block Krylov SVD, scores stored at the
  sites, histogram plot) over the in-process transport (same site code as on Flower; on a
  real federation add the per-round latency, 0.2–0.6 s per round on loopback nodes, see bench_rounds.py);
* PLINK 2 (AVX2 build pinned) on a pooled ``.bed`` written from the sites' genotype caches:
  ``--maf M [--indep-pairwise ...] --pca approx K --seed 1`` and, with ``--exact``, ``--pca K``;

and reports wall times, message rounds, bytes each site sent and received, eigenvalue
relative errors and the per-site correlation of scores with PLINK's ``.eigenvec`` rows.

``--lambda-gc PHENO`` also runs the association study (logistic/linear, covariates
``--covariates``) twice through the study runner: without PCs and with ``--pcs N`` PCs as
covariates, the PCs read back from each site's stored scores (written into a copy of the
samples table, as the association step will do from ``load_site_pcs``), and prints λGC.

Usage: ``python scripts/bench_pca.py [--data demo/data] [--k 10] [--maf 0.05]
[--ld-prune 50,5,0.2] [--exact] [--lambda-gc T2D] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedgen.cohort.cohort import load_cohort  # noqa: E402
from fedgen.cohort.pcs import load_site_pcs, read_eigenvec, site_state_dir  # noqa: E402
from fedgen.federation.transport import InProcessTransport  # noqa: E402
from fedgen.study.align import Alignment  # noqa: E402
from fedgen.study.pca import run_pca  # noqa: E402
from fedgen.study.runner import StudyContext, blockwise_sum, describe_sites, run_plan  # noqa: E402

PLINK = "/usr/lib/plink2/plink2-avx2" if Path("/usr/lib/plink2/plink2-avx2").exists() else "plink2"
_BED_CODE = np.array([0b11, 0b10, 0b00, 0b01], dtype=np.uint8)  # dosage 0, 1, 2, missing (A1 = ALT)


def write_pooled_bed(nodes: dict[str, dict[str, str]], aln: Alignment, prefix: Path) -> list[str]:
    """PLINK 1 binary fileset of all sites' analysed samples (A1 = study ALT); returns IIDs."""
    cohorts = {s: load_cohort(nc) for s, nc in nodes.items()}
    iids = [cohorts[s].vcf_samples[j] for s in nodes for j in cohorts[s].sample_cols.tolist()]
    n = len(iids)
    with open(prefix.with_suffix(".fam"), "w") as fh:
        fh.writelines(f"{i}\t{i}\t0\t0\t0\t-9\n" for i in iids)
    with open(prefix.with_suffix(".bim"), "w") as fh:
        for c, i, p, r, a in zip(aln.chrom.tolist(), aln.ids.tolist(), aln.pos.tolist(), aln.ref.tolist(), aln.alt.tolist()):
            fh.write(f"{c}\t{c}:{p}\t0\t{p}\t{a}\t{r}\n")
    pad = (-n) % 4
    with open(prefix.with_suffix(".bed"), "wb") as fh:
        fh.write(bytes([0x6C, 0x1B, 0x01]))
        for s0 in range(0, len(aln), 4096):
            rows = np.arange(s0, min(s0 + 4096, len(aln)))
            g = np.concatenate([cohorts[s].block(aln.idx[s][rows], aln.flip[s][rows]) for s in nodes], axis=1)
            code = _BED_CODE[np.where(g < 0, 3, g)]
            code = np.concatenate([code, np.zeros((len(rows), pad), np.uint8)], axis=1).reshape(len(rows), -1, 4)
            packed = code[:, :, 0] | (code[:, :, 1] << 2) | (code[:, :, 2] << 4) | (code[:, :, 3] << 6)
            fh.write(packed.astype(np.uint8).tobytes())
    return iids


def run_plink(args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([PLINK, *args], cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def compare(summary: dict, nodes: dict, study_id: str, ref_prefix: Path, k_cmp: int) -> dict:
    ev_ref = np.loadtxt(Path(f"{ref_prefix}.eigenval"))
    ev = np.asarray(summary["eigenvalues"])
    m = min(len(ev), len(ev_ref))
    iids, sc, _ = read_eigenvec(Path(f"{ref_prefix}.eigenvec"))
    where = {s: i for i, s in enumerate(iids)}
    corr: dict[str, list[float]] = {}
    for site, nc in nodes.items():
        s_iids, s_sc, _ = read_eigenvec(site_state_dir(nc) / "pca" / f"{study_id}.eigenvec")
        rows = [where[x] for x in s_iids]
        corr[site] = [round(abs(float(np.corrcoef(s_sc[:, j], sc[rows, j])[0, 1])), 5) for j in range(min(k_cmp, sc.shape[1]))]
    rel = np.abs(ev[:m] / ev_ref[:m] - 1)
    return {
        "plink_eigenvalues": ev_ref[:m].tolist(),
        "eigenvalue_rel_err": [float(f"{x:.3g}") for x in rel],
        "max_rel_err_top4": float(rel[: min(4, m)].max()),
        "abs_r": corr,
        "min_abs_r_top4": float(min(min(v[:4]) for v in corr.values())),
    }


def lambda_gc_runs(nodes, study_id, pheno: str, covariates: list[str], pcs: int, work: Path) -> dict:
    """λGC of ``pheno`` without and with ``pcs`` PCs as covariates (study runner, in-process)."""
    aug: dict[str, dict[str, str]] = {}
    for site, nc in nodes.items():
        cohort = load_cohort(nc)
        pcs_arr = load_site_pcs(cohort, study_id, pcs, state_dir=site_state_dir(nc))
        by_iid = {cohort.vcf_samples[j]: pcs_arr[i] for i, j in enumerate(cohort.sample_cols.tolist())}
        lines = Path(nc["samples"]).read_text().splitlines()
        out = [lines[0] + "".join(f"\tPC{j + 1}" for j in range(pcs))]
        for line in lines[1:]:
            row = by_iid.get(line.split("\t")[0])
            out.append(line + "".join(f"\t{v:.8g}" for v in row) if row is not None else line + "\tNA" * pcs)
        d = work / "aug" / site
        d.mkdir(parents=True, exist_ok=True)
        (d / "samples.tsv").write_text("\n".join(out) + "\n")
        aug[site] = {**nc, "samples": str(d / "samples.tsv")}
    res = {}
    for label, covs, cfg in (("without_pcs", covariates, nodes), (f"with_{pcs}_pcs", covariates + [f"PC{j + 1}" for j in range(pcs)], aug)):
        plan = {
            "name": "gwas", "output_dir": str(work / label), "sites": list(cfg), "analyses": ["freq", "missing", "hardy", "glm"],
            "phenotypes": [pheno], "covariates": covs, "qc": {"maf": 0.01, "geno": 0.1, "hwe": 1e-6},
            "block_size": 65536, "glm_block_size": 65536, "federation": "inprocess",
        }
        t0 = time.perf_counter()
        m = run_plan(plan, InProcessTransport(cfg))
        a = m["association"][pheno]
        res[label] = {"lambda_gc": a["lambda_gc"], "tested": a["tested"], "kind": a["kind"],
                      "top_hits": [h["id"] for h in a["top_hits"][:5]], "seconds": round(time.perf_counter() - t0, 1)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "demo" / "data")
    ap.add_argument("--simulate", action="store_true", help="run `fedgen simulate` into a temporary folder first")
    ap.add_argument("--sites", default="hk=2000,sz=2000", help="with --simulate")
    ap.add_argument("--variants", type=int, default=30000, help="with --simulate")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--maf", type=float, default=0.05)
    ap.add_argument("--ld-prune", default=None, help="window,step,r2 (e.g. 50,5,0.2)")
    ap.add_argument("--exact", action="store_true", help="also time plink2 --pca (exact)")
    ap.add_argument("--lambda-gc", default=None, metavar="PHENO")
    ap.add_argument("--covariates", default="age,sex,smoking")
    ap.add_argument("--pcs", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep the working folder here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench_pca_")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if args.simulate:
        data = work / "data"
        subprocess.run([sys.executable, "-m", "fedgen.cli", "simulate", "--out", str(data), "--sites", args.sites,
                        "--variants", str(args.variants), "--seed", "1"], check=True)
    sites = sorted(p.name for p in data.iterdir() if (p / "genotypes.vcf.gz").exists())
    if not sites:
        sys.exit(f"{data}: no site folders with genotypes.vcf.gz (run `make demo` or pass --simulate)")
    nodes = {s: {"site": s, "vcf": str(data / s / "genotypes.vcf.gz"), "samples": str(data / s / "samples.tsv"),
                 "state_dir": str(work / "state" / s)} for s in sites}
    pca_cfg: dict = {"k": args.k, "maf": args.maf}
    if args.ld_prune:
        w, st, r2 = args.ld_prune.split(",")
        pca_cfg["ld_prune"] = {"window": int(w), "step": int(st), "r2": float(r2)}
    study_id = "bench"
    plan = {"study_id": study_id, "pca": pca_cfg, "block_size": 65536, "output_dir": str(work / "out")}
    ctx = StudyContext(plan, InProcessTransport(nodes))
    t0 = time.perf_counter()
    info, aln = describe_sites(ctx)  # builds the genotype caches on a first run
    t_describe = time.perf_counter() - t0
    t0 = time.perf_counter()
    counts = blockwise_sum(ctx, "genotype_counts", aln, key="counts")
    t_counts = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = run_pca(ctx, aln, counts, np.ones(len(aln), dtype=bool), work / "out", info=info)
    t_pca = time.perf_counter() - t0

    pl = work / "plink"
    pl.mkdir(exist_ok=True)
    write_pooled_bed(nodes, aln, pl / "pooled")
    base = ["--bfile", "pooled", "--maf", str(args.maf), "--seed", "1"]
    t_prune = 0.0
    if args.ld_prune:
        w, st, r2 = args.ld_prune.split(",")
        t_prune = run_plink([*base, "--indep-pairwise", w, st, r2, "--out", "pooled"], pl)
        base += ["--extract", "pooled.prune.in"]
    t_approx = run_plink([*base, "--pca", "approx", str(args.k), "--out", "approx"], pl)
    result = {
        "data": str(data),
        "sites": {s: summary["samples_per_site"][s] for s in sites},
        "variants_study": len(aln),
        "pca": {k: summary[k] for k in ("variants_used", "rounds", "converged", "max_relative_residual", "basis_columns")},
        "fedgen_seconds": {"pca_total": round(t_pca, 2), **{k: v for k, v in ctx.timings.items() if k.startswith("pca")},
                           "describe_sites": round(t_describe, 2), "genotype_counts": round(t_counts, 2)},
        "bytes_sent_by_site": summary["bytes_sent_by_site"],
        "bytes_received_by_site": summary["bytes_received_by_site"],
        "plink_seconds": {"pca_approx": round(t_approx, 2), **({"indep_pairwise": round(t_prune, 2)} if args.ld_prune else {})},
        "eigenvalues": [round(x, 6) for x in summary["eigenvalues"]],
        "vs_plink_approx": compare(summary, nodes, study_id, pl / "approx", args.k),
    }
    if args.ld_prune:
        ours = {f"{c}:{p}" for c, p in (line.split("\t")[:2] for line in (work / "out" / "pca.variants.tsv").read_text().splitlines()[1:])}
        theirs = set((pl / "pooled.prune.in").read_text().split())
        result["ld_prune"] = {"fedgen_kept": len(ours), "plink_kept": len(theirs), "symmetric_difference": len(ours ^ theirs)}
    if args.exact:
        result["plink_seconds"]["pca_exact"] = round(run_plink([*base, "--pca", str(args.k), "--out", "exact"], pl), 2)
        result["vs_plink_exact"] = compare(summary, nodes, study_id, pl / "exact", args.k)
    if args.lambda_gc:
        covs = [c for c in args.covariates.split(",") if c]
        result["lambda_gc"] = lambda_gc_runs(nodes, study_id, args.lambda_gc, covs, args.pcs, work / "gwas")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
