"""What a DP study's releases will be worth, before any ε is spent.

``plan_dp`` takes the study's DP settings (ε, δ, split, k, an optional panel size) and the
sites' public sizes (samples, cases, controls) and predicts, for every release:

* **genotype counts → allele frequencies**: the noise σ per count, the expected mean absolute
  error of the raw and of the shrunk frequency estimate, against the know-nothing guess
  (every variant at the mean frequency). Frequencies are drawn from an assumed spectrum
  (``af_spectrum``: ``neutral``, density ∝ 1/x on [0.01, 0.99], the standard-neutral spectrum of
  derived alleles; or ``uniform``), genotype counts drawn under Hardy-Weinberg at the pooled
  size, the release's noise added, and the study's own estimator run on them
  (:func:`fedgen.study.dpfreq.dp_alt_freq`: the raw frequency, and its empirical-Bayes
  shrinkage towards the pooled mean).
* **DP top-k**: the expected number of causal loci in the released top k, under a stated
  effect (``n_causal`` loci at allele frequency ``maf`` with per-allele odds ratio
  ``odds_ratio``), beside the same figure for the exact top-k and for a random pick (chance),
  and the expected **recall of the exact top-k**: of the causal loci the exact top-k (same k)
  holds, the share the DP top-k holds too. Each simulated draw ranks the exact pooled statistic
  and the DP pipeline on the same data, so both top-k lists come from one draw and the ratio is
  taken per draw (draws whose exact top-k holds no causal locus are left out), then averaged.
  The simulation follows the study step by step: at each site the weighted score
  w(f) · |p̂_case − p̂_ctrl| with its sampling noise (null variants at frequencies drawn from
  ``af_spectrum``), the one-shot Gumbel top-k with the site's
  own scale 2Δ/ε₀, the union of the sites' picks, the noisy counts of that union and the
  noise-aware pooled test that ranks it.

  The model's variants are independent. In real data linkage puts proxies (non-causal variants
  in LD with a strong locus) beside the causal variants, and they take slots of the exact and the
  DP top-k: the exact top-k then holds fewer causal loci than the model's, and the model's count
  of causal loci in the DP top-k is too high. The recall is much less affected (a locus the
  exact ranking finds is found by the DP ranking of the same statistic about as often with or
  without proxies beside it). When the user knows how many causal loci the exact top-k holds
  (``exact_loci``: from an earlier exact study, or a published scan of similar size), the
  planner takes, in each draw, that many causal loci with the largest exact statistic as the
  exact top-k's loci, predicts the recall of those, and the count as ``exact_loci`` × that
  recall (``expected_causal_found_of_exact``). That count leaves out causal loci the DP top-k
  holds although the exact top-k does not (rare: a weaker locus that wins a slot by noise, or
  because the sites did not pick the proxies that outrank it exactly), so it can fall short of
  the measured count by such a locus.

A release is *useful* when its prediction beats the know-nothing answer clearly: frequencies
whose shrunk MAE is below 0.9 × the guess's, a top-k expected to hold at least half a causal
locus more than chance. For a release that is not, the planner finds the ε per site (at these
sizes) and the site size (at this ε) at which it would be, by bisection on the same model.

Everything here is arithmetic on public numbers and a seeded simulation: it reads no data and
spends no budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# the site selection score's weights and sensitivity, as the sites compute them; the pooled
# ranking is modelled on the variance-stabilised (arcsine) scale
from fedgen.analyses.dp import selection_sensitivity, selection_weights
from fedgen.privacy.accounting import rho_for_epsilon
from fedgen.privacy.mechanisms import sigma_for_rho

def stabilised(x: np.ndarray) -> np.ndarray:
    """arcsin √x: the variance-stabilised frequency scale on which the pooled test is modelled."""
    return np.arcsin(np.sqrt(np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)))


USEFUL_AF = 0.9        # shrunk MAE below this share of the know-nothing guess's MAE
USEFUL_LOCI = 0.5      # top-k: at least this many causal loci more than chance


@dataclass(frozen=True)
class Site:
    name: str
    samples: int
    cases: int = 0
    controls: int = 0


@dataclass(frozen=True)
class Effect:
    """The signal a top-k is asked to find (an assumption the plan states): ``n_causal`` loci at
    allele frequency ``maf`` with per-allele odds ratio ``odds_ratio``; either may also be a list
    with one value per locus."""

    n_causal: int = 10
    maf: float | tuple[float, ...] | list[float] = 0.2
    odds_ratio: float | tuple[float, ...] | list[float] = 1.3
    exact_loci: int | None = None  # causal loci the exact top-k holds, when the user knows it

    def per_locus(self) -> tuple[np.ndarray, np.ndarray]:
        """(allele frequency, frequency in cases) of each causal locus."""
        n = int(self.n_causal)
        f0 = np.broadcast_to(np.asarray(self.maf, dtype=np.float64), (n,)).copy() if n else np.zeros(0)
        orr = np.broadcast_to(np.asarray(self.odds_ratio, dtype=np.float64), (n,)).copy() if n else np.zeros(0)
        f0 = np.clip(f0, 1e-4, 0.5)
        return f0, f0 * orr / (1.0 - f0 + f0 * orr)

    def describe(self) -> str:
        def one(v: Any) -> str:
            a = np.atleast_1d(np.asarray(v, dtype=np.float64))
            return f"{a[0]:g}" if a.size == 1 or np.all(a == a[0]) else f"{np.median(a):.3g} (median of {a.size})"

        text = f"{self.n_causal} loci at MAF {one(self.maf)}, OR {one(self.odds_ratio)}"
        return text + (f", {self.exact_loci} of them in the exact top-k" if self.exact_loci is not None else "")


@dataclass
class Settings:
    epsilon: float
    delta: float = 1e-6
    split: dict[str, float] = field(default_factory=lambda: {"counts": 0.2, "assoc": 0.2, "select": 0.5, "topk": 0.1})
    topk: int = 10
    select_k: int | None = None      # candidates each site picks (default topk)
    n_variants: int = 10000          # variants in the genotype-count release (the panel's size with a panel)
    n_candidates: int | None = None  # variants the top-k ranks (default n_variants)
    phenotypes: int = 1
    assoc: bool = False
    select: bool = True
    af_spectrum: str = "neutral"


def _draw_af(rng: np.random.Generator, n: int, spectrum: str) -> np.ndarray:
    if spectrum == "uniform":
        return rng.uniform(0.01, 0.99, n)
    if spectrum == "neutral":  # density ∝ 1/x on [a, b]: x = a (b/a)^U
        a, b = 0.01, 0.99
        return a * (b / a) ** rng.uniform(0.0, 1.0, n)
    raise ValueError(f"af_spectrum must be neutral or uniform, got {spectrum!r}")


def rho_shares(s: Settings) -> dict[str, float]:
    """ρ per release kind (as the study splits it: shares of releases that do not run move to those that do)."""
    rho = rho_for_epsilon(s.epsilon, s.delta)
    split = dict(s.split)
    if not s.assoc:
        split["assoc"] = 0.0
    if not s.select:
        split["select"] = split["topk"] = 0.0
    total = sum(split.values())
    return {k: rho * v / total for k, v in split.items()} | {"total": rho}


def predict_af(sites: list[Site], s: Settings, *, rng: np.random.Generator, n_sim: int = 20000) -> dict[str, Any]:
    """Simulate the genotype-count release and the study's own estimator
    (:func:`fedgen.study.dpfreq.dp_alt_freq`) on frequencies drawn from the assumed spectrum."""
    from fedgen.study.dpfreq import dp_alt_freq

    rho = rho_shares(s)["counts"]
    sigma = sigma_for_rho(math.sqrt(max(s.n_variants, 1)), rho)
    n_total = sum(x.samples for x in sites)
    af = _draw_af(rng, n_sim, s.af_spectrum)
    geno = np.stack([(1 - af) ** 2, 2 * af * (1 - af), af**2], axis=1)
    counts = np.zeros((n_sim, 4))
    counts[:, :3] = rng.multinomial(n_total, geno / geno.sum(axis=1, keepdims=True)) if n_total else 0
    noise_var = len(sites) * sigma**2
    noisy = counts + rng.normal(0.0, math.sqrt(noise_var), counts.shape)
    est = dp_alt_freq(noisy, n_total, noise_var)
    truth = (counts[:, 1] + 2 * counts[:, 2]) / (2.0 * max(n_total, 1))
    guess = float(np.mean(np.abs(truth - truth.mean())))
    mae_raw = float(np.mean(np.abs(est["alt_freq_raw"] - truth)))
    mae_shrunk = float(np.mean(np.abs(est["alt_freq"] - truth)))
    return {"release": "genotype counts (frequencies, missingness, HWE)", "variants": s.n_variants, "sigma": sigma,
            "rho": rho, "af_se": float(np.median(est["se"])), "af_mae_raw": mae_raw, "af_mae_shrunk": mae_shrunk,
            "af_mae_know_nothing": guess, "useful": mae_shrunk < USEFUL_AF * guess}


def _site_scores(rng, m_null: int, eff: Effect, site: Site, reps: int, f_null: np.ndarray) -> np.ndarray:
    """(reps, n_causal + m_null) site selection scores, causal loci first: the weighted
    case-control allele-frequency difference of :func:`fedgen.analyses.dp.selection_scores`,
    with null variants at the frequencies ``f_null``."""
    f0, f1 = eff.per_locus()
    R, S = max(site.cases, 1), max(site.controls, 1)
    fbar = np.concatenate([(f0 + f1) / 2.0, f_null])
    w = selection_weights(fbar)
    var_c = f1 * (1.0 - f1) / (2.0 * R) + f0 * (1.0 - f0) / (2.0 * S)
    var_n = f_null * (1.0 - f_null) * (1.0 / (2.0 * R) + 1.0 / (2.0 * S))
    sd = np.sqrt(np.concatenate([var_c, var_n]))
    z = rng.normal(0.0, 1.0, (reps, eff.n_causal + m_null)) * sd
    z[:, : eff.n_causal] += f1 - f0
    return np.abs(z) * w


def predict_topk(sites: list[Site], s: Settings, eff: Effect, *, rng: np.random.Generator, reps: int | None = None
                 ) -> dict[str, Any]:
    shares = rho_shares(s)
    M = int(s.n_candidates or s.n_variants)
    k = min(s.topk, M)
    ks = min(int(s.select_k or k), M)
    n_causal = min(eff.n_causal, M)
    m_null = M - n_causal
    reps = reps or int(max(3, min(30, 3e7 / max(M * len(sites), 1))))
    rho_sel = shares["select"] / s.phenotypes
    rho_top = shares["topk"] / s.phenotypes
    eps0 = math.sqrt(8.0 * rho_sel / ks)
    picks = np.zeros((reps, M), dtype=bool)
    site_scores = []
    f_null = _draw_af(rng, m_null, s.af_spectrum)
    for site in sites:
        sc = _site_scores(rng, m_null, eff, site, reps, f_null)
        site_scores.append(sc)
        scale = 2.0 * selection_sensitivity(max(site.cases, 1), max(site.controls, 1)) / eps0
        noisy = sc + rng.gumbel(0.0, scale, sc.shape)
        top = np.argpartition(-noisy, ks - 1, axis=1)[:, :ks]
        np.put_along_axis(picks, top, True, axis=1)
    # pooled test of the union with the released noise: the sites' score noise pooled by their
    # information (1 / sd²), plus the counts' noise on the stabilised scale
    R = sum(x.cases for x in sites)
    S_ = sum(x.controls for x in sites)
    sd_pool = math.sqrt(1.0 / (8.0 * max(R, 1)) + 1.0 / (8.0 * max(S_, 1)))
    f0, f1 = eff.per_locus()
    f0, f1 = f0[:n_causal], f1[:n_causal]
    delta = stabilised(f1) - stabilised(f0)
    U = picks.sum(axis=1)
    sigma_top = np.array([sigma_for_rho(2.0 * math.sqrt(max(u, 1)), rho_top) for u in U])
    # noise of a frequency difference: Σ_sites σ² on each count, over (2R)² and (2S)²; h' ≈ 1/(2√(f(1−f)))
    f_typ = float(np.median(f0)) if f0.size else 0.2
    hprime2 = 1.0 / (4.0 * f_typ * (1.0 - f_typ))
    noise_sd = np.sqrt(len(sites) * sigma_top**2 * (1.0 / (2.0 * max(R, 1)) ** 2 + 1.0 / (2.0 * max(S_, 1)) ** 2) * hprime2)
    pooled = rng.normal(0.0, sd_pool, (reps, M))
    pooled[:, :n_causal] += delta
    exact_rank = np.abs(pooled)
    dp_stat = (pooled + rng.normal(0.0, 1.0, (reps, M)) * noise_sd[:, None]) / np.sqrt(sd_pool**2 + noise_sd[:, None] ** 2)
    dp_stat = np.where(picks, np.abs(dp_stat), -np.inf)
    n_exact = None if eff.exact_loci is None else max(0, min(int(eff.exact_loci), n_causal, k))
    found_dp, found_exact, recall, found_of_exact = [], [], [], []
    for r in range(reps):
        top_dp = np.argsort(-dp_stat[r], kind="stable")[:k]
        top_dp = top_dp[np.isfinite(dp_stat[r, top_dp])]
        found_dp.append(int(np.sum(top_dp < n_causal)))
        top_x = np.argpartition(-exact_rank[r], k - 1)[:k]
        found_exact.append(int(np.sum(top_x < n_causal)))
        # the causal loci of this draw's exact top-k: those the exact ranking puts in its top k,
        # or, with exact_loci stated, that many causal loci with the largest exact statistic
        if n_exact is None:
            loci = top_x[top_x < n_causal]
        else:
            loci = np.argsort(-exact_rank[r, :n_causal], kind="stable")[:n_exact]
        if loci.size:
            both = int(np.isin(loci, top_dp).sum())
            recall.append(both / loci.size)
            found_of_exact.append(both)
    chance = k * n_causal / M
    dp_mean = float(np.mean(found_dp))
    exact_mean = float(np.mean(found_exact))
    recall_mean = float(np.mean(recall)) if recall else float("nan")
    return {"release": "DP top-k (selection + counts of the selected)", "k": k, "candidates": M,
            "epsilon_per_pick": eps0, "rho": rho_sel + rho_top, "expected_union": float(U.mean()),
            "expected_causal_found": dp_mean, "expected_causal_found_exact": exact_mean,
            "expected_causal_found_chance": chance,
            # of the causal loci in the exact top-k of the same draw, the share the DP top-k holds
            "expected_recall_of_exact": recall_mean,
            "expected_recall_chance": k / M,
            "recall_draws": len(recall),
            "exact_loci": n_exact,
            # with exact_loci stated: how many of the exact top-k's causal loci the DP top-k holds
            "expected_causal_found_of_exact": (float(np.mean(found_of_exact)) if n_exact is not None and found_of_exact
                                               else float("nan")),
            "assumed_effect": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(eff).items()},
            "assumed_effect_text": eff.describe(), "simulations": reps,
            "useful": dp_mean - chance >= USEFUL_LOCI}


def _useful_at(kind: str, sites: list[Site], s: Settings, eff: Effect, seed: int) -> bool:
    rng = np.random.default_rng(seed)
    if kind == "af":
        return bool(predict_af(sites, s, rng=rng, n_sim=6000)["useful"])
    return bool(predict_topk(sites, s, eff, rng=rng, reps=4)["useful"])


def _threshold(kind: str, sites: list[Site], s: Settings, eff: Effect, *, seed: int, what: str) -> float | None:
    """The smallest ε per site (``what="epsilon"``) or site-size factor (``"size"``) at which the
    release becomes useful (bisection on a log scale; None when not within 1000×)."""

    def ok(x: float) -> bool:
        if what == "epsilon":
            return _useful_at(kind, sites, Settings(**{**asdict(s), "epsilon": x}), eff, seed)
        scaled = [Site(t.name, int(t.samples * x), int(t.cases * x), int(t.controls * x)) for t in sites]
        return _useful_at(kind, scaled, s, eff, seed)

    lo = s.epsilon if what == "epsilon" else 1.0
    hi = lo
    for _ in range(10):
        hi *= 2.0
        if ok(hi):
            break
    else:
        return None
    for _ in range(12):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def plan_dp(sites: list[Site], s: Settings, eff: Effect | None = None, *, seed: int = 0, thresholds: bool = True
            ) -> dict[str, Any]:
    """Predictions for every release of a DP study, and for those not useful the ε / site size
    at which they would be."""
    eff = eff or Effect()
    rng = np.random.default_rng(seed)
    shares = rho_shares(s)
    out: dict[str, Any] = {"epsilon_per_site": s.epsilon, "delta": s.delta, "rho_total": shares["total"],
                           "sites": [asdict(x) for x in sites], "releases": []}
    af = predict_af(sites, s, rng=rng)
    out["releases"].append(af)
    if s.select:
        out["releases"].append(predict_topk(sites, s, eff, rng=rng))
    for rel, kind in zip(out["releases"], ("af", "topk")):
        if not rel["useful"] and thresholds:
            eps_at = _threshold(kind, sites, s, eff, seed=seed, what="epsilon")
            size_at = _threshold(kind, sites, s, eff, seed=seed, what="size")
            rel["useful_at_epsilon"] = eps_at
            rel["useful_at_site_size"] = (None if size_at is None
                                          else {x.name: int(math.ceil(x.samples * size_at)) for x in sites})
    return out


def describe(plan: dict[str, Any]) -> str:
    """The plan as text, one block per release."""
    lines = [f"ε = {plan['epsilon_per_site']:g} per site (δ = {plan['delta']:g}), ρ = {plan['rho_total']:.4g}; sites: "
             + ", ".join(f"{x['name']} {x['samples']} ({x['cases']} cases, {x['controls']} controls)" for x in plan["sites"])]
    for r in plan["releases"]:
        lines.append(f"- {r['release']}: " + ("useful" if r["useful"] else "NOT USEFUL (no better than knowing nothing)"))
        if "af_mae_shrunk" in r:
            lines.append(f"    {r['variants']} variants, σ = {r['sigma']:.1f} per count per site; allele-frequency SE "
                         f"{r['af_se']:.3f}; expected MAE {r['af_mae_shrunk']:.3f} shrunk, {r['af_mae_raw']:.3f} raw, "
                         f"against {r['af_mae_know_nothing']:.3f} for the know-nothing guess")
        else:
            lines.append(f"    top-{r['k']} of {r['candidates']} variants, ε₀ = {r['epsilon_per_pick']:.3g} per pick; expected "
                         f"causal loci found {r['expected_causal_found']:.2f} (exact top-{r['k']}: "
                         f"{r['expected_causal_found_exact']:.2f}, chance: {r['expected_causal_found_chance']:.2f}) for "
                         f"{r['assumed_effect_text']}")
            rec = r.get("expected_recall_of_exact", float("nan"))
            if math.isfinite(rec):
                line = (f"    expected recall of the exact top-{r['k']}'s causal loci: {rec:.0%} (chance "
                        f"{r['expected_recall_chance']:.1%})")
                if r.get("exact_loci") is not None:
                    line += (f"; of the {r['exact_loci']} causal loci stated to be in the exact top-{r['k']}, "
                             f"{r['expected_causal_found_of_exact']:.2f} expected in the DP top-{r['k']}")
                lines.append(line)
        if not r["useful"]:
            eps_at, size_at = r.get("useful_at_epsilon"), r.get("useful_at_site_size")
            lines.append("    useful from ε ≈ " + (f"{eps_at:.3g}" if eps_at else "> 1000×") + " per site at these sizes, or "
                         + ("at site sizes " + ", ".join(f"{k} {v}" for k, v in size_at.items()) if size_at
                            else "not within 1000× these sizes") + " at this ε")
    return "\n".join(lines)
