"""Variant panels and allele frequencies from noisy genotype counts (``privacy=dp``).

Panels
------
``study.dp.panel: FILE`` lists the variants a DP study releases, one a line: the VCF ID
(``rs123``) or ``CHROM:POS:REF:ALT`` (contig names harmonised as everywhere in fedgen, so
``chr1`` = ``1``; REF and ALT in either order). Only the first whitespace-separated field of a
line is read; ``#`` starts a comment and blank lines are skipped. The study keeps the panel's
variants that are shared by all sites (:func:`panel_rows`), so every DP release covers those and
its noise grows with √(panel size), not with the genome.

Frequencies (post-processing)
-----------------------------
:func:`dp_alt_freq` reads nothing but the pooled noisy genotype counts (hom-REF, het, hom-ALT,
missing per variant: the exact counts of S sites, each plus independent discrete Gaussian noise
of variance σ², so ``noise_var`` = S·σ² per cell), the public total number of samples N and the
known noise variance. It never sees a genotype, so it costs no privacy. Per variant:

1. *Projection on the known total.* The four exact cells sum to N. The noisy cells ``y`` are
   replaced by their least-squares projection on that plane, ``x = y − (Σy − N)/4`` (the
   best linear unbiased estimate for i.i.d. cell noise; its noise covariance is
   ``noise_var·(I − J/4)``). This uses the missing cell and the known N honestly instead of
   discarding either, and cuts the noise variance of the ALT allele count from 5·v to 2.75·v.
2. *Raw estimate.* ``O = clamp(N − x_missing, 1, N)`` observed people,
   ``raw = (x_het + 2·x_homalt) / (2·O)`` (unbiased to first order; it may fall outside [0, 1]).
   Its noise variance by the delta method, with f the raw estimate clamped to [0, 1], is
   ``s² = v·(3f² − 3f + 2.75) / (4·O²)`` — the variance of ``g·x`` for the gradient ``g`` of
   ``a / 2O`` after the projection. ``ALT_FREQS_SE`` = s, and ``L95``/``U95`` = raw ± 1.96·s
   clamped to [0, 1]. The interval covers the exact pooled frequency about 95 % of the time
   when O's noise is small against N (the delta method's assumption); it is a statement about
   the noise, not about sampling from a population.
3. *Empirical-Bayes shrinkage* (normal–normal, James–Stein style). Model the variants' exact
   frequencies as drawn from a normal prior N(μ, τ²) and ``raw | f ~ N(f, s²)`` with s² known.
   μ is the pooled mean frequency, Σ ALT counts / Σ 2·(N − x_missing) over all released
   variants (sums of noisy counts: the noise averages out, no clamping). τ² is the spread of
   the raw estimates minus the known noise variance, estimated with the DerSimonian–Laird
   moment estimator ``τ² = (Q − (V − 1)) / (Σw − Σw²/Σw)``, ``w = 1/s²``,
   ``Q = Σ w (raw − raw_w)²`` (so variants with large noise do not dominate it), floored at
   ``TAU2_FLOOR``. The posterior mean is ``w·raw_c + (1 − w)·μ`` with ``w = τ² / (τ² + s²)``,
   applied to the raw estimate clamped to [0, 1] (raw_c); it lies in [0, 1]. This is
   ``ALT_FREQS``.

Hardy–Weinberg P values (post-processing)
-----------------------------------------
:func:`dp_hardy` tests HWE on the same projected noisy cells x (hom-REF x₀, het x₁, hom-ALT
x₂), with the noise in the test's variance. With O = x₀ + x₁ + x₂ and p = (x₁ + 2x₂) / 2O (the
ALT frequency, clamped to [0, 1]), the statistic is the heterozygote excess
``g = x₁ − 2·O·p·(1 − p)``, zero in expectation under HWE. Its variance has two parts:

* *sampling*, as in the 1-df HWE χ² test (χ² = O·F², F = 1 − x₁ / 2Opq, Var F ≈ 1/O under HWE):
  ``4·O·p²q²``;
* *noise*, by the delta method: the gradient of g in (x₀, x₁, x₂, x_missing) is
  ``(−2p², 2pq, −2q², 0)``, and the projected cells' noise covariance is ``v·(I − J/4)``, so
  ``v·(|∇g|² − (Σ∇g)²/4)``.

p itself is estimated from the noisy cells, and its noise is correlated with g's (a hom-ALT
cell pushed up by noise raises both p̂ and the het deficit), so the variance evaluated at p̂ is
too small exactly when g is large: the tail is then too heavy. The test therefore evaluates each
part at its largest over the 99 % interval of p̂ (p̂ ± 2.576·SE, the frequency SE above): the
noise part at the end of the interval farthest from ½, the sampling part at the point nearest ½.
``z = g / √(sampling + noise)`` and ``P = 2·Φ(−|z|)`` (two-sided, as PLINK's ``--hardy``).

This is conservative, never anti-conservative, in what we simulated: on null genotypes (HWE holds,
frequencies from the 1/x spectrum, 20,000 variants, 3 sites) the smallest P was ≥ 4e-5 from
hospital to biobank sizes and σ from 20 to 924 per count per site. Where the noise is small
against the counts the P values are close to uniform (genomic-control λ 0.95–1.0 at 60,000
people and σ ≤ 924, or 4,500 people and σ = 20); where the noise swamps the counts (4,500 people,
σ = 924: a genome-wide release at ε = 1) they bunch near 1 (λ ≈ 0.35), i.e. the test has no
power there rather than false positives. The exact test PLINK uses is for exact counts only; the
1-df approximation with the noise is used here because the noise is Gaussian, not multinomial.
The count columns of ``hardy.hardy`` (HOM_A1_CT, HET_A1_CT, TWO_AX_CT) are the projected cells
rounded and clamped at 0 (a negative count is not printable); O(HET_A1), E(HET_A1) and P are
computed from the unclamped cells.

Assumptions and limits: the noise of different cells, variants and sites is independent with
the variance the sites report (discrete Gaussian ≈ Gaussian at these σ); N is the sum of the
sites' public sample counts (under a DP-only policy that count is itself noised, and the
projection's total is off by that noise). The normal prior is a working model: shrinkage
towards one mean helps most when noise is large against the spread of frequencies and
unimodal; with a bimodal spectrum (many variants near 0 and near 1) it can do worse than the
clamped raw estimate at moderate noise, which is why ``ALT_FREQS_RAW`` is written too. When
the noise swamps the data (τ² at its floor) every variant gets μ: the know-nothing guess, not
worse. The interval describes the raw estimate, not the shrunk one (a shrunk estimate is
biased towards μ by design).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.cohort.contigs import harmonise_contig
from fedgen.errors import ConfigError

TAU2_FLOOR = 1e-6
Z95 = 1.959963984540054


# ----------------------------------------------------------------------------- panels


def read_panel(path: str | Path) -> list[str]:
    """The entries of a panel file (first field of each non-blank, non-comment line), in order, deduplicated."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"study.dp.panel: cannot read {p} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"study.dp.panel: {p} is not a text file (one variant ID or CHROM:POS:REF:ALT a line)") from None
    out: dict[str, None] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.setdefault(line.split()[0], None)
    if not out:
        raise ConfigError(f"study.dp.panel: {p} lists no variant (one variant ID or CHROM:POS:REF:ALT a line)")
    return list(out)


def _coord_key(entry: str) -> tuple[str, int, str, str] | None:
    parts = entry.split(":")
    if len(parts) != 4:
        return None
    c, p, r, a = parts
    try:
        pos = int(p)
    except ValueError:
        return None
    return harmonise_contig(c), pos, r.upper(), a.upper()


def panel_rows(aln: Any, entries: list[str]) -> tuple[np.ndarray, list[str]]:
    """Study rows (sorted, unique) of the panel entries found in ``aln``, and the entries not found.

    An entry matches a study variant by ID, or as CHROM:POS:REF:ALT with the contig harmonised
    and REF/ALT in either order."""
    by_id: dict[str, int] = {}
    by_key: dict[tuple[str, int, str, str], int] = {}
    for i, (c, p, vid, r, a) in enumerate(zip(aln.chrom.tolist(), aln.pos.tolist(), aln.ids.tolist(),
                                              aln.ref.tolist(), aln.alt.tolist())):
        c = harmonise_contig(str(c))
        by_key[(c, int(p), str(r).upper(), str(a).upper())] = i
        by_key.setdefault((c, int(p), str(a).upper(), str(r).upper()), i)
        if vid and vid != ".":
            by_id.setdefault(str(vid), i)
    rows: set[int] = set()
    unknown: list[str] = []
    for e in entries:
        i = by_id.get(e)
        if i is None:
            key = _coord_key(e)
            i = by_key.get(key) if key else None
        if i is None:
            unknown.append(e)
        else:
            rows.add(i)
    return np.asarray(sorted(rows), dtype=np.int64), unknown


def subset_alignment(aln: Any, rows: np.ndarray) -> Any:
    """The alignment restricted to ``rows`` (same sites, same harmonisation report)."""
    from fedgen.study.align import Alignment

    rows = np.asarray(rows, dtype=np.int64)
    return Alignment(
        chrom=aln.chrom[rows], pos=aln.pos[rows], ids=aln.ids[rows], ref=aln.ref[rows], alt=aln.alt[rows],
        idx={s: v[rows] for s, v in aln.idx.items()}, flip={s: v[rows] for s, v in aln.flip.items()},
        report=aln.report,
    )


# ----------------------------------------------------------------------------- frequencies


def dp_alt_freq(noisy_counts: np.ndarray, n_samples: float, noise_var: float) -> dict[str, Any]:
    """ALT allele frequencies from pooled noisy genotype counts (see the module docstring).

    ``noisy_counts``: (V, 4) hom-REF, het, hom-ALT, missing, summed over sites, noise included
    and NOT clipped; ``n_samples``: the public total N; ``noise_var``: the noise variance of
    each pooled cell (number of sites × σ²). Returns arrays ``alt_freq`` (shrunk),
    ``alt_freq_raw`` (clamped to [0, 1]), ``se``, ``l95``, ``u95``, ``obs_ct`` (2·O, rounded) and
    the scalars ``mean``, ``tau2``, ``noise_var``.
    """
    y = np.asarray(noisy_counts, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != 4:
        raise ValueError("noisy_counts must have shape (variants, 4)")
    N = float(n_samples)
    v = float(noise_var)
    if not (N >= 1 and math.isfinite(N)):
        raise ValueError(f"n_samples must be at least 1, got {n_samples!r}")
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"noise_var must be a non-negative number, got {noise_var!r}")
    x = y - (y.sum(axis=1, keepdims=True) - N) / 4.0  # projection on Σ cells = N
    alt = x[:, 1] + 2.0 * x[:, 2]
    observed = N - x[:, 3]
    O = np.clip(observed, 1.0, N)
    raw = alt / (2.0 * O)
    raw_c = np.clip(raw, 0.0, 1.0)
    s2 = v * (3.0 * raw_c**2 - 3.0 * raw_c + 2.75) / (4.0 * O**2)
    V = len(raw)
    if V == 0:
        e = np.empty(0)
        return {"alt_freq": e, "alt_freq_raw": e, "se": e, "l95": e, "u95": e, "obs_ct": np.empty(0, np.int64),
                "mean": math.nan, "tau2": math.nan, "noise_var": v}
    mu = float(np.clip(alt.sum() / max(2.0 * observed.sum(), 1.0), 0.0, 1.0))
    if v == 0:  # no noise: nothing to shrink
        tau2, w = math.inf, np.ones(V)
    else:
        prec = 1.0 / s2
        mean_w = float((prec * raw).sum() / prec.sum())
        q = float((prec * (raw - mean_w) ** 2).sum())
        denom = float(prec.sum() - (prec**2).sum() / prec.sum())
        tau2 = max((q - (V - 1)) / denom, TAU2_FLOOR) if denom > 0 else TAU2_FLOOR
        w = tau2 / (tau2 + s2)
    shrunk = w * raw_c + (1.0 - w) * mu
    se = np.sqrt(s2)
    return {
        "alt_freq": np.clip(shrunk, 0.0, 1.0),
        "alt_freq_raw": raw_c,
        "se": se,
        "l95": np.clip(raw - Z95 * se, 0.0, 1.0),
        "u95": np.clip(raw + Z95 * se, 0.0, 1.0),
        "obs_ct": np.rint(2.0 * O).astype(np.int64),
        "weight": w,
        "mean": mu,
        "tau2": float(tau2),
        "noise_var": v,
    }


AFREQ_COLUMNS = ["#CHROM", "POS", "ID", "REF", "ALT", "ALT_FREQS", "OBS_CT", "ALT_FREQS_RAW", "ALT_FREQS_SE", "L95", "U95"]


def write_dp_afreq(path: Path, aln: Any, est: dict[str, Any]) -> None:
    """``freq.afreq`` in PLINK 2's columns (POS after #CHROM) with the DP estimate's extra columns after OBS_CT."""
    from fedgen.study.writers import write_tsv

    write_tsv(path, AFREQ_COLUMNS,
              [aln.chrom.tolist(), aln.pos, aln.ids.tolist(), aln.ref.tolist(), aln.alt.tolist(), est["alt_freq"],
               est["obs_ct"], est["alt_freq_raw"], est["se"], est["l95"], est["u95"]])


HWE_P_INTERVAL_Z = 2.5758293035489004  # the 99 % interval of p̂ over which the variance is maximised


def dp_hardy(noisy_counts: np.ndarray, n_samples: float, noise_var: float) -> dict[str, np.ndarray]:
    """``hardy.hardy`` columns (A1 = REF) from pooled noisy genotype counts, the P value noise-aware
    (see the module docstring). Same inputs as :func:`dp_alt_freq`; also returns ``Z``."""
    from scipy.special import ndtr

    y = np.asarray(noisy_counts, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != 4:
        raise ValueError("noisy_counts must have shape (variants, 4)")
    N, v = float(n_samples), float(noise_var)
    if not (N >= 1 and math.isfinite(N)):
        raise ValueError(f"n_samples must be at least 1, got {n_samples!r}")
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"noise_var must be a non-negative number, got {noise_var!r}")
    x = y - (y.sum(axis=1, keepdims=True) - N) / 4.0  # projection on Σ cells = N
    O = np.clip(x[:, 0] + x[:, 1] + x[:, 2], 1.0, None)
    p = np.clip((x[:, 1] + 2.0 * x[:, 2]) / (2.0 * O), 0.0, 1.0)
    q = 1.0 - p
    g = x[:, 1] - 2.0 * O * p * q
    se_p = np.sqrt(v * (3.0 * p**2 - 3.0 * p + 2.75) / (4.0 * O**2))
    lo = np.clip(p - HWE_P_INTERVAL_Z * se_p, 0.0, 1.0)
    hi = np.clip(p + HWE_P_INTERVAL_Z * se_p, 0.0, 1.0)
    far = np.where(np.abs(lo - 0.5) > np.abs(hi - 0.5), lo, hi)  # largest noise part
    near = np.clip(0.5, lo, hi)  # largest sampling part
    fq = 1.0 - far
    grad = np.stack([-2.0 * far**2, 2.0 * far * fq, -2.0 * fq**2], axis=1)
    noise = v * ((grad**2).sum(axis=1) - grad.sum(axis=1) ** 2 / 4.0)
    var = 4.0 * O * (near * (1.0 - near)) ** 2 + noise
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, g / np.sqrt(var), 0.0)
    cells = np.clip(np.rint(x[:, :3]), 0, None).astype(np.int64)
    return {
        "HOM_A1_CT": cells[:, 0],
        "HET_A1_CT": cells[:, 1],
        "TWO_AX_CT": cells[:, 2],
        "O(HET_A1)": np.clip(x[:, 1] / O, 0.0, 1.0),
        "E(HET_A1)": 2.0 * p * q,
        "P": 2.0 * ndtr(-np.abs(z)),
        "Z": z,
    }
