"""Small synthetic VCFs with real-world variety, for tests and reference fixtures.

A pooled genotype matrix is drawn once; :func:`write_vcf` writes any subset of its samples
with a chosen convention (``chr`` prefix, FORMAT layout, phasing, BCF, REF/ALT swap, sample
order), and :func:`write_pooled_vcf` writes the canonical pooled file PLINK reads. Splitting
the pooled samples across sites and comparing federated results with PLINK on the pooled file
is the "federated equals pooled" test.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class SynthData:
    """Pooled truth: dosages (variants × samples, -1 missing) plus per-call decorations."""

    chrom: list[str]
    pos: np.ndarray
    ids: list[str]
    ref: list[str]
    alt: list[str]
    dosage: np.ndarray
    samples: list[str]
    half_call: np.ndarray  # bool, a missing call written as './1' style half call
    haploid: np.ndarray  # bool, a call written haploid ('0' or '1'; dosage 0 or 2)
    multiallelic: list[int] = field(default_factory=list)  # extra records (not in dosage)
    pheno: dict[str, np.ndarray] = field(default_factory=dict)


def make_synth(
    n_samples: int = 300,
    n_variants: int = 400,
    *,
    seed: int = 0,
    missing_rate: float = 0.02,
    contigs: tuple[str, ...] = ("1", "2", "22"),
    extremes: bool = True,
) -> SynthData:
    """Random genotypes with HWE-ish frequencies, missing calls, half calls, haploid calls."""
    rng = np.random.default_rng(seed)
    p = rng.beta(0.6, 1.2, n_variants).clip(0.002, 0.998)
    if extremes:
        k = max(4, n_variants // 20)
        p[:k] = rng.choice([0.0, 1.0, 0.001, 0.999], k)
    g = (rng.random((n_variants, n_samples)) < p[:, None]).astype(np.int8) + (
        rng.random((n_variants, n_samples)) < p[:, None]
    ).astype(np.int8)
    if extremes:  # departures from HWE: all-het and excess-hom rows
        g[k : k + 3] = 1
        g[k + 3, : n_samples // 2] = 0
        g[k + 3, n_samples // 2 :] = 2
    miss = rng.random(g.shape) < missing_rate
    g[miss] = -1
    half = miss & (rng.random(g.shape) < 0.2)
    hap = (~miss) & (g != 1) & (rng.random(g.shape) < 0.01)
    per = -(-n_variants // len(contigs))
    chrom = [contigs[min(i // per, len(contigs) - 1)] for i in range(n_variants)]
    pos = np.zeros(n_variants, dtype=np.int64)
    for c in contigs:
        m = np.array([x == c for x in chrom])
        pos[m] = np.sort(rng.choice(np.arange(1000, 10_000_000), m.sum(), replace=False))
    bases = np.array(list("ACGT"))
    ref_i = rng.integers(0, 4, n_variants)
    alt_i = (ref_i + rng.integers(1, 4, n_variants)) % 4
    ref = bases[ref_i].tolist()
    alt = bases[alt_i].tolist()
    if n_variants > 10:  # a few indels
        ref[5] = ref[5] + "TG"
        alt[7] = alt[7] + "CCA"
    ids = [f"rs{1000 + i}" if i % 17 else "." for i in range(n_variants)]
    samples = [f"S{i:05d}" for i in range(n_samples)]
    multi = sorted(rng.choice(n_variants, size=min(3, n_variants), replace=False).tolist())
    bin_ = (rng.random(n_samples) < 0.4).astype(float)
    bin_[rng.random(n_samples) < 0.05] = np.nan
    qt = rng.normal(size=n_samples)
    qt[rng.random(n_samples) < 0.05] = np.nan
    # covariates (drawn last so the genotypes and traits above do not depend on them)
    age = np.round(rng.uniform(20, 80, n_samples), 1)
    age[rng.random(n_samples) < 0.02] = np.nan
    sex = rng.integers(1, 3, n_samples).astype(float)
    smoking = rng.integers(0, 3, n_samples).astype(float)
    smoking[rng.random(n_samples) < 0.02] = np.nan
    # a trait with real genetic and covariate effects (variant 40 and 41 causal)
    lp = -0.8 + 0.6 * np.clip(g[min(40, n_variants - 1)], 0, 2) + 0.02 * (np.nan_to_num(age, nan=50) - 50) + 0.3 * (sex - 1.5)
    cc = (rng.random(n_samples) < 1 / (1 + np.exp(-lp))).astype(float)
    cc[rng.random(n_samples) < 0.03] = np.nan
    qt2 = 0.4 * np.clip(g[min(41, n_variants - 1)], 0, 2) + 0.01 * np.nan_to_num(age, nan=50) + rng.normal(size=n_samples)
    qt2[rng.random(n_samples) < 0.03] = np.nan
    pheno = {"BIN": bin_, "QT": qt, "CC": cc, "QT2": qt2, "age": age, "sex": sex, "smoking": smoking}
    return SynthData(chrom, pos, ids, ref, alt, g, samples, half, hap, multi, pheno)


def _calls(d: np.ndarray, half: np.ndarray, hap: np.ndarray, phased: np.ndarray, swap: bool) -> np.ndarray:
    """Genotype strings (object array) for one block of records."""
    if swap:
        d = np.where(d < 0, d, 2 - d)
    sep = np.where(phased, "|", "/")
    a = np.where(d == 2, "1", "0")
    b = np.where(d >= 1, "1", "0")
    out = np.char.add(np.char.add(a, sep), b).astype(object)
    out[d < 0] = "./."
    hc = half & (d < 0)
    out[hc] = np.where(np.arange(hc.sum()) % 2, "./1", "0/.")
    hp = hap & (d >= 0) & (d != 1)
    out[hp] = np.where(d[hp] == 2, "1", "0")
    return out


def write_vcf(
    data: SynthData,
    path: Path,
    *,
    cols: np.ndarray | None = None,
    chr_prefix: bool = False,
    fmt: str = "GT",
    phased: float = 0.0,
    swap_rows: np.ndarray | None = None,
    shuffle_samples: int | None = None,
    compress: str = "bgzip",
    with_multiallelic: bool = False,
    contig_lengths: dict[str, int] | None = None,
    seed: int = 0,
) -> list[str]:
    """Write samples ``cols`` of ``data`` as a VCF/BCF; returns the sample order written.

    ``fmt`` is ``"GT"`` or ``"GT:AD:DP:GQ:PL"``; ``compress`` is ``"bgzip"``, ``"gzip"``, ``"none"``
    or ``"bcf"``. ``swap_rows`` lists variants written with REF and ALT exchanged.
    ``with_multiallelic`` adds a tri-allelic record after each of ``data.multiallelic`` with random
    calls drawn per file (not part of the pooled truth: sites split them into two variants each,
    which then differ from any pooled reference; off by default).
    """
    rng = np.random.default_rng(seed)
    cols = np.arange(len(data.samples)) if cols is None else np.asarray(cols)
    if shuffle_samples is not None:
        cols = np.random.default_rng(shuffle_samples).permutation(cols)
    names = [data.samples[c] for c in cols]
    swap = np.zeros(len(data.pos), dtype=bool)
    if swap_rows is not None:
        swap[np.asarray(swap_rows)] = True
    lengths = contig_lengths or {c: 250_000_000 - 1000 * int(c) if c.isdigit() else 150_000_000 for c in dict.fromkeys(data.chrom)}
    cname = (lambda c: f"chr{c}") if chr_prefix else (lambda c: c)
    lines = ["##fileformat=VCFv4.2"]
    for c, ln in lengths.items():
        lines.append(f"##contig=<ID={cname(c)},length={ln}>")
    lines.append('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">')
    if fmt != "GT":
        lines += [
            '##FORMAT=<ID=AD,Number=R,Type=Integer,Description="Allelic depths">',
            '##FORMAT=<ID=DP,Number=1,Type=Integer,Description="Read depth">',
            '##FORMAT=<ID=GQ,Number=1,Type=Integer,Description="Genotype quality">',
            '##FORMAT=<ID=PL,Number=G,Type=Integer,Description="Phred-scaled likelihoods">',
        ]
    lines.append("\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *names]))
    n = len(cols)
    multi = set(data.multiallelic) if with_multiallelic else set()
    for i in range(len(data.pos)):
        ph = rng.random(n) < phased
        calls = _calls(data.dosage[i, cols], data.half_call[i, cols], data.haploid[i, cols], ph, bool(swap[i]))
        r, a = (data.alt[i], data.ref[i]) if swap[i] else (data.ref[i], data.alt[i])
        if fmt != "GT":
            dp = rng.integers(5, 60, n)
            extra = [f":{x // 2},{x - x // 2}:{x}:{min(99, x + 10)}:0,{x},{3 * x}" for x in dp.tolist()]
            calls = np.array([c + e for c, e in zip(calls.tolist(), extra)], dtype=object)
        fixed = [cname(data.chrom[i]), str(data.pos[i]), data.ids[i], r, a, ".", "PASS", ".", fmt]
        lines.append("\t".join(fixed + calls.tolist()))
        if i in multi:  # a multi-allelic record right after, at a different position
            gts = rng.choice(["0/1", "1/2", "0/2", "0/0", "./."], n)
            fixed = [cname(data.chrom[i]), str(data.pos[i] + 1), ".", "A", "C,G", ".", "PASS", ".", "GT"]
            lines.append("\t".join(fixed + gts.tolist()))
    text = "\n".join(lines) + "\n"
    path = Path(path)
    if compress == "none":
        path.write_text(text)
    elif compress == "gzip":
        import gzip

        with gzip.open(path, "wt") as fh:
            fh.write(text)
    elif compress in ("bgzip", "bcf"):
        import pysam

        plain = path.with_name(path.name + ".tmp.vcf")
        plain.write_text(text)
        if compress == "bgzip":
            pysam.tabix_compress(str(plain), str(path), force=True)
            pysam.tabix_index(str(path), preset="vcf", force=True)
        else:
            with pysam.VariantFile(str(plain)) as src, pysam.VariantFile(str(path), "wb", header=src.header) as dst:
                for rec in src:
                    dst.write(rec)
        plain.unlink()
    else:
        raise ValueError(compress)
    return names


def write_pooled_vcf(data: SynthData, path: Path) -> None:
    """The canonical pooled file for PLINK: half calls as missing, haploid calls as homozygotes."""
    d = data.dosage
    none = np.zeros_like(d, dtype=bool)
    write_vcf(
        SynthData(data.chrom, data.pos, data.ids, data.ref, data.alt, d, data.samples, none, none),
        path,
        compress="none",
        with_multiallelic=False,
    )


SMOKING = ("never", "former", "current")


def _fmt(v: float, *, integer: bool = False, plus: int = 0) -> str:
    if np.isnan(v):
        return "NA"
    return str(int(v) + plus) if integer else f"{v:.6g}"


def write_samples(data: SynthData, path: Path, cols: np.ndarray, *, extra_ids: int = 0, binary_12: bool = False) -> None:
    """Samples table for ``cols`` (plus ``extra_ids`` IIDs not in any VCF), rows reversed.

    ``binary_12`` writes binary traits in PLINK's 1/2 coding instead of 0/1.
    """
    ph = data.pheno
    lines = ["IID\tBIN\tQT\tCC\tQT2\tage\tsex\tsmoking"]
    plus = 1 if binary_12 else 0
    for c in list(cols)[::-1]:
        sm = ph["smoking"][c]
        lines.append(
            "\t".join(
                [
                    data.samples[c],
                    _fmt(ph["BIN"][c], integer=True, plus=plus),
                    _fmt(ph["QT"][c]),
                    _fmt(ph["CC"][c], integer=True, plus=plus),
                    _fmt(ph["QT2"][c]),
                    _fmt(ph["age"][c]),
                    _fmt(ph["sex"][c], integer=True),
                    "NA" if np.isnan(sm) else SMOKING[int(sm)],
                ]
            )
        )
    for k in range(extra_ids):
        lines.append(f"NOTINVCF{k}\t{1 + plus}\t0.5\t{plus}\t0.1\t40\t1\tnever")
    Path(path).write_text("\n".join(lines) + "\n")


def write_pooled_pheno(data: SynthData, pheno: Path, covar: Path) -> None:
    """PLINK 2 ``--pheno`` (binary traits 1/2-coded) and ``--covar`` files for the pooled samples."""
    ph = data.pheno
    with open(pheno, "w") as f:
        f.write("#IID\tBIN\tQT\tCC\tQT2\n")
        for i, s in enumerate(data.samples):
            f.write(f"{s}\t{_fmt(ph['BIN'][i], integer=True, plus=1)}\t{_fmt(ph['QT'][i])}\t"
                    f"{_fmt(ph['CC'][i], integer=True, plus=1)}\t{_fmt(ph['QT2'][i])}\n")
    with open(covar, "w") as f:
        f.write("#IID\tage\tsex\tsmoking\n")
        for i, s in enumerate(data.samples):
            sm = ph["smoking"][i]
            cat = "NONE" if np.isnan(sm) else SMOKING[int(sm)]  # PLINK 2's missing category name
            f.write(f"{s}\t{_fmt(ph['age'][i])}\t{_fmt(ph['sex'][i], integer=True)}\t{cat}\n")


def run_plink2(args: list[str], cwd: Path) -> None:
    """Run plink2 (the AVX2 build when present, for reproducible numerics)."""
    exe = "/usr/lib/plink2/plink2-avx2" if Path("/usr/lib/plink2/plink2-avx2").exists() else "plink2"
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True)


def synth_dosages(data: SynthData, *, seed: int = 0, noise: float = 0.12, missing: float = 0.3) -> np.ndarray:
    """Imputed-looking ALT dosages for ``data``: each call plus noise, clipped to [0, 2]; a missing
    call gets a random dosage, or none (NaN) with probability ``missing``."""
    rng = np.random.default_rng(seed)
    g = data.dosage.astype(np.float64)
    d = np.clip(g + rng.normal(0.0, noise, g.shape), 0.0, 2.0)
    miss = data.dosage < 0
    d[miss] = rng.uniform(0.0, 2.0, int(miss.sum()))
    d[miss & (rng.random(g.shape) < missing)] = np.nan
    return d


def write_dosage_vcf(data: SynthData, ds: np.ndarray, path: Path, *, cols: np.ndarray | None = None, field: str = "DS",
                     with_gt: np.ndarray | None = None, digits: int = 5) -> None:
    """A plain-text VCF with imputed dosages: FORMAT ``GT:DS`` (rows where ``with_gt``) or ``DS``;
    ``field="GP"`` writes genotype probabilities with that dosage instead (GP only, no DS header).
    A NaN dosage is written ``.``; GT is the call of ``data`` (``./.`` when missing)."""
    cols = np.arange(len(data.samples)) if cols is None else np.asarray(cols)
    with_gt = np.zeros(len(data.pos), bool) if with_gt is None else np.asarray(with_gt, bool)
    head = ["##fileformat=VCFv4.2", *[f"##contig=<ID={c}>" for c in dict.fromkeys(data.chrom)],
            '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">']
    if field == "DS":
        head.append('##FORMAT=<ID=DS,Number=A,Type=Float,Description="ALT dosage">')
    else:
        head.append('##FORMAT=<ID=GP,Number=G,Type=Float,Description="Genotype probabilities">')
    head.append("\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT",
                           *[data.samples[c] for c in cols]]))
    gt_text = np.array(["./.", "0/0", "0/1", "1/1"], dtype=object)
    lines = head
    for i in range(len(data.pos)):
        d = ds[i, cols]
        nan = np.isnan(d)
        if field == "DS":
            val = np.char.mod(f"%.{digits}f", np.nan_to_num(d)).astype(object)
        else:  # a dosage d as probabilities: hom-REF, het, hom-ALT with P(het) + 2 P(hom-ALT) = d
            d0 = np.nan_to_num(d)
            p2 = d0 * d0 / 4  # Hardy-Weinberg at frequency d / 2
            p1 = d0 - 2 * p2
            val = np.char.add(np.char.add(np.char.add(np.char.mod(f"%.{digits}f", 1 - p1 - p2), ","),
                                          np.char.add(np.char.mod(f"%.{digits}f", p1), ",")),
                              np.char.mod(f"%.{digits}f", p2)).astype(object)
        val[nan] = "."
        fmt = "GT:" + field if with_gt[i] else field
        if with_gt[i]:
            val = gt_text[data.dosage[i, cols].astype(int) + 1] + ":" + val
        lines.append("\t".join([data.chrom[i], str(int(data.pos[i])), data.ids[i], data.ref[i], data.alt[i], ".", ".",
                                ".", fmt, *val.tolist()]))
    Path(path).write_text("\n".join(lines) + "\n")
