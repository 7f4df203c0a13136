#!/usr/bin/env python3
"""Regenerate the PLINK ``--glm`` / ``--assoc`` reference fixtures in ``tests/data/glm/``.

Three synthetic data sets, each built from :func:`fedgen.testing.make_synth` genotypes plus
phenotypes and covariates drawn here (:func:`build`, deterministic in the seed):

- ``main``  2000 samples x 600 variants; covariates age, sex (1/2), pc1, pc2 (a few missing);
  a binary trait and a height-like quantitative trait with real genetic and covariate effects;
  planted rare variants carried only by controls / only by cases / almost only by cases and a
  variant whose controls are all hom-ALT (logistic pre-check or IRLS failure -> Firth).
- ``edge``  150 samples x 200 variants; covariates age, sex, smoker (0/1), pc1; planted
  CORR_TOO_HIGH, VIF_INFINITE, VIF_TOO_HIGH, SAMPLE_CT<=PREDICTOR_CT and 1-4 residual df
  variants, on top of make_synth's monomorphic / all-het rows (CONST_OMITTED_ALLELE).
- ``sep``   300 samples x 150 variants; a covariate whose case and control ranges do not
  overlap, so PLINK fits every variant with Firth.

For each set it writes the pooled VCF, phenotype and covariate files, runs (AVX2 build pinned)
``plink2 --glm hide-covar --covar-variance-standardize`` (firth-fallback: BIN -> .hybrid,
QT -> .linear), ``plink2 ... --glm no-firth`` (main, edge) and ``plink1.9 --assoc``, and stores

- ``<set>.npz``  the inputs as the tests use them (A1 choice is the tests' job): dosages
  (V, N) int8 with -1 missing, BIN (1 case / 0 control / NaN), QT, raw covariates (NaN
  missing), names, variant table;
- ``<set>.glm.logistic.hybrid``, ``<set>.glm.linear``, ``<set>.glm.logistic`` (no-firth),
  ``<set>.assoc``: PLINK's outputs, unmodified;
- ``provenance.json``: seeds, binaries, versions, command lines.

Usage: ``python scripts/make_glm_fixtures.py [--out tests/data/glm] [--keep-workdir DIR]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedgen.testing import SynthData, make_synth, write_pooled_vcf  # noqa: E402

SETS: dict[str, dict] = {
    "main": dict(seed=20240611, n_samples=2000, n_variants=600),
    "edge": dict(seed=1957, n_samples=150, n_variants=200),
    "sep": dict(seed=4242, n_samples=300, n_variants=150),
}


@dataclass
class GlmData:
    """One data set: genotypes in the VCF's sample order plus traits and covariates."""

    name: str
    synth: SynthData
    bin: np.ndarray  # 1 case, 0 control, NaN missing
    qt: np.ndarray
    covar: np.ndarray  # (N, k) raw values, NaN missing
    covar_names: list[str]
    planted: dict[str, list[int]]


def _carriers(d: np.ndarray, v: int, pool: np.ndarray, rng: np.random.Generator, n: int,
              value: int = 1) -> None:
    """Make variant v monomorphic REF except ``n`` carriers drawn from ``pool``."""
    miss = d[v] < 0
    d[v] = 0
    d[v, rng.choice(pool, size=min(n, pool.size), replace=False)] = value
    d[v, miss] = -1


def build(name: str) -> GlmData:
    """Deterministic data set ``name`` (see the module docstring)."""
    cfg = SETS[name]
    syn = make_synth(cfg["n_samples"], cfg["n_variants"], seed=cfg["seed"], missing_rate=0.02)
    d = syn.dosage
    n = d.shape[1]
    rng = np.random.default_rng(cfg["seed"] + 1)
    age = rng.integers(20, 81, n).astype(float)
    sex = rng.integers(1, 3, n).astype(float)
    pc1 = rng.normal(0, 0.02, n)
    planted: dict[str, list[int]] = {}
    if name == "edge":
        smoker = (rng.random(n) < 0.35).astype(float)
        covar = np.column_stack([age, sex, smoker, pc1])
        names = ["AGE", "SEX12", "SMOKER", "PC1"]
    elif name == "sep":
        batch = np.zeros(n)  # filled once the trait is known
        covar = np.column_stack([age, sex, batch])
        names = ["AGE", "SEX12", "BATCH"]
    else:
        pc2 = rng.normal(0, 0.02, n)
        covar = np.column_stack([age, sex, pc1, pc2])
        names = ["AGE", "SEX12", "PC1", "PC2"]
    # genetic effects on common variants (ALT dosage, missing treated as 0 for the simulation)
    freq = np.where(d >= 0, d, 0).sum(1) / (2.0 * np.maximum((d >= 0).sum(1), 1))
    common = np.flatnonzero((freq > 0.05) & (freq < 0.95))
    causal = rng.choice(common, size=min(12, common.size), replace=False)
    eff = rng.choice([-1, 1], causal.size) * rng.uniform(0.15, 0.6, causal.size)
    gsc = (np.where(d[causal] >= 0, d[causal], 0) * eff[:, None]).sum(0)
    zc = (covar - covar.mean(0)) / np.where(covar.std(0) > 0, covar.std(0), 1.0)
    lin = -1.4 + gsc + zc @ rng.uniform(-0.5, 0.5, covar.shape[1])
    bin_ = (rng.random(n) < 1.0 / (1.0 + np.exp(-lin))).astype(float)
    qt = 170.0 + 6.0 * (gsc + zc @ rng.uniform(-0.6, 0.6, covar.shape[1]) + rng.normal(0, 1.2, n))
    bin_[rng.random(n) < 0.03] = np.nan
    qt[rng.random(n) < 0.03] = np.nan
    planted["causal"] = causal.tolist()
    cases = np.flatnonzero(bin_ == 1)
    ctrls = np.flatnonzero(bin_ == 0)
    if name == "sep":
        covar[:, 2] = np.where(bin_ == 1, rng.uniform(0.0, 1.0, n), rng.uniform(1.5, 2.5, n))
    # covariate missingness
    for j, rate in ((0, 0.01), (covar.shape[1] - 1, 0.01)):
        covar[rng.random(n) < rate, j] = np.nan
    taken = set(causal.tolist()) | set(range(0, 40))  # keep make_synth's extremes
    free = [v for v in range(d.shape[0]) if v not in taken]
    pick = iter(rng.permutation(free).tolist())
    if name in ("main", "edge"):
        for key, pool, sizes in (("ctrl_only", ctrls, (1, 2, 3, 5, 8)),
                                 ("case_only", cases, (1, 2, 4, 6)),):
            planted[key] = []
            for s in sizes:
                v = next(pick)
                _carriers(d, v, pool, rng, s)
                planted[key].append(v)
        planted["almost_case_only"] = []
        for s in (4, 6, 9, 12):
            v = next(pick)
            _carriers(d, v, cases, rng, s)
            d[v, rng.choice(ctrls, 1)] = 1
            planted["almost_case_only"].append(v)
        v = next(pick)  # every control hom-ALT: the REF allele is absent from controls
        miss = d[v] < 0
        d[v] = 2
        d[v, cases] = rng.integers(0, 3, cases.size)
        d[v, miss] = -1
        planted["ctrl_hom_alt"] = [v]
    if name == "edge":
        sexv = np.where(np.isnan(covar[:, 1]), 1.0, covar[:, 1]) - 1.0
        smk = np.where(np.isnan(covar[:, 2]), 0.0, covar[:, 2])
        specs = {}
        specs["corr_too_high"] = [sexv, 1.0 - sexv]
        specs["vif_infinite"] = [sexv + smk]
        flips = []
        for k_flip in (1, 2, 3):
            x = sexv + smk
            idx = rng.choice(np.flatnonzero(x == 1), k_flip, replace=False)
            x[idx] = np.where(sexv[idx] == 1, 0, 2)
            flips.append(x)
        specs["vif_high"] = flips
        for key, cols in specs.items():
            planted[key] = []
            for x in cols:
                v = next(pick)
                miss = d[v] < 0
                d[v] = x.astype(np.int8)
                d[v, miss] = -1
                planted[key].append(v)
        planted["few_obs"] = []
        for keep in (4, 5, 6, 7, 8, 9, 10, 12):
            v = next(pick)
            row = rng.integers(0, 3, n).astype(np.int8)
            row[rng.permutation(n)[keep:]] = -1
            d[v] = row
            planted["few_obs"].append(v)
    syn.dosage = d
    return GlmData(name, syn, bin_, qt, covar, names, planted)


def fmt_value(x: float) -> str:
    return "NA" if np.isnan(x) else repr(float(x))


def write_inputs(data: GlmData, work: Path) -> None:
    """Pooled VCF, PLINK 2 phenotype/covariate files and the PLINK 1.9 phenotype file."""
    write_pooled_vcf(data.synth, work / f"{data.name}.vcf")
    ids = data.synth.samples
    with open(work / f"{data.name}.pheno", "w") as fh:
        fh.write("#IID\tBIN\tQT\n")
        for i, s in enumerate(ids):
            b = "NA" if np.isnan(data.bin[i]) else str(int(data.bin[i]) + 1)
            fh.write(f"{s}\t{b}\t{fmt_value(data.qt[i])}\n")
    with open(work / f"{data.name}.covar", "w") as fh:
        fh.write("#IID\t" + "\t".join(data.covar_names) + "\n")
        for i, s in enumerate(ids):
            fh.write(s + "\t" + "\t".join(fmt_value(x) for x in data.covar[i]) + "\n")
    with open(work / f"{data.name}.pheno1", "w") as fh:
        fh.write("FID IID BIN\n")
        for i, s in enumerate(ids):
            b = "-9" if np.isnan(data.bin[i]) else str(int(data.bin[i]) + 1)
            fh.write(f"{s} {s} {b}\n")


def save_npz(data: GlmData, path: Path) -> None:
    s = data.synth
    np.savez_compressed(
        path, dosage=s.dosage.astype(np.int8), bin=data.bin, qt=data.qt, covar=data.covar,
        covar_names=np.array(data.covar_names), samples=np.array(s.samples),
        chrom=np.array(s.chrom), pos=s.pos, ids=np.array(s.ids), ref=np.array(s.ref),
        alt=np.array(s.alt), planted=json.dumps(data.planted))


def plink2_binary() -> str | None:
    """Pin one PLINK 2 build: the AVX2 one when the CPU has AVX2, else ``plink2`` on PATH."""
    avx2 = Path("/usr/lib/plink2/plink2-avx2")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if avx2.exists() and " avx2" in flags:
        return str(avx2)
    return shutil.which("plink2")


def plink19_binary() -> str | None:
    return shutil.which("plink1.9") or shutil.which("plink")


def plink2_glm_cmds(plink2: str, name: str, out: str, *, no_firth: bool) -> list[str]:
    mods = ["hide-covar"] + (["no-firth"] if no_firth else [])
    cmd = [plink2, "--vcf", f"{name}.vcf", "--pheno", f"{name}.pheno", "--covar", f"{name}.covar",
           "--covar-variance-standardize", "--glm", *mods, "--threads", "1", "--out", out]
    if no_firth:
        cmd[cmd.index("--pheno") + 2:cmd.index("--pheno") + 2] = ["--pheno-name", "BIN"]
    return cmd


def plink19_assoc_cmd(plink19: str, name: str, out: str) -> list[str]:
    return [plink19, "--vcf", f"{name}.vcf", "--double-id", "--allow-no-sex", "--pheno",
            f"{name}.pheno1", "--pheno-name", "BIN", "--assoc", "--out", out]


def run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "glm")
    ap.add_argument("--plink2", default=None)
    ap.add_argument("--plink19", default=None)
    ap.add_argument("--keep-workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    plink2 = args.plink2 or plink2_binary()
    plink19 = args.plink19 or plink19_binary()
    if plink2 is None or plink19 is None:
        print("plink2 and plink1.9 are required", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep_workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in SETS:
            data = build(name)
            write_inputs(data, work)
            save_npz(data, args.out / f"{name}.npz")
            cmd = plink2_glm_cmds(plink2, name, name, no_firth=False)
            run(cmd, work)
            commands.append(" ".join(cmd))
            shutil.copyfile(work / f"{name}.BIN.glm.logistic.hybrid", args.out / f"{name}.glm.logistic.hybrid")
            shutil.copyfile(work / f"{name}.QT.glm.linear", args.out / f"{name}.glm.linear")
            if name != "sep":  # complete covariate separation: PLINK skips the phenotype
                cmd = plink2_glm_cmds(plink2, name, f"{name}_nofirth", no_firth=True)
                run(cmd, work)
                commands.append(" ".join(cmd))
                shutil.copyfile(work / f"{name}_nofirth.BIN.glm.logistic", args.out / f"{name}.glm.logistic")
            cmd = plink19_assoc_cmd(plink19, name, name)
            run(cmd, work)
            commands.append(" ".join(cmd))
            shutil.copyfile(work / f"{name}.assoc", args.out / f"{name}.assoc")
    v2 = subprocess.run([plink2, "--version"], capture_output=True, text=True).stdout.strip()
    v19 = subprocess.run([plink19, "--version"], capture_output=True, text=True).stdout.strip()
    prov = {
        "generator": "scripts/make_glm_fixtures.py",
        "sets": SETS,
        "plink2": plink2,
        "plink2_version": v2,
        "plink19": plink19,
        "plink19_version": v19,
        "commands": commands,
    }
    (args.out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(f"wrote fixtures for {', '.join(SETS)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
