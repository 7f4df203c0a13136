"""A study under ``privacy=dp``: every statistic the aggregator sees carries site-added noise.

The study's budget (``privacy.epsilon``, ``privacy.delta``, per site) is turned into a zCDP
budget ρ (:func:`fedgen.privacy.accounting.rho_for_epsilon`) and split between releases
(``privacy.split``):

* ``counts``: genotype counts of every study variant (one discrete-Gaussian release per site,
  σ = √V / √(2ρ_counts)); ``missing.vmiss``, ``hardy.hardy`` and the QC pass list are computed
  from the pooled noisy counts (negative cells clipped to 0; the HWE P values and filter by the
  noise-aware test :func:`fedgen.study.dpfreq.dp_hardy`); ``freq.afreq`` holds the
  post-processed ALT frequencies of :func:`fedgen.study.dpfreq.dp_alt_freq` (projection on the
  public sample total, empirical-Bayes shrinkage towards the pooled mean; raw estimate, its noise
  SE and a 95 % interval in extra columns after OBS_CT);
* per binary phenotype with ``assoc`` in the analyses, ``assoc``: noisy case/control allele
  counts of every variant passing QC (σ = 2√M / √(2ρ_assoc)) → ``<PHENO>.assoc`` (PLINK 1.9
  allelic test on the pooled noisy counts);
* per binary phenotype with ``topk`` in the analyses, ``select``: each site picks k variants with the one-shot Gumbel
  mechanism on its own case-control allele-frequency differences, weighted by the released pooled
  frequencies so that common variants rank by their z-score (ε₀ = √(8ρ_select / k) per pick;
  :func:`fedgen.analyses.dp.selection_weights`), and ``topk``: noisy
  case/control allele counts (σ = 2√U / √(2ρ_topk)) of the U variants any site picked; the
  aggregator ranks them by the pooled noisy χ² and writes the top k as
  ``<PHENO>.dp_topk.assoc`` (PLINK 1.9 columns).

With a panel (``study.dp.panel``, :mod:`fedgen.study.dpfreq`), "study variant" above means the
panel's variants shared by all sites: V, M and the selection candidates are that set, so the
noise scales with √(panel size). The panel changes which variants are released, nothing else:
the sites account and refuse exactly as without it.

Analyses with no DP version (regression, PCA) are refused at planning time. Each site checks
and charges every release against its own ledger; the manifest records ε/δ per site and
release and each release's noise scale.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.analyses.dp import selection_weights
from fedgen.errors import ConfigError, FedgenError
from fedgen.federation.transport import Request, Transport
from fedgen.study.runner import StudyContext, blockwise_sum, run_published, write_qc_outputs
from fedgen.study.writers import atomic_write_text

log = logging.getLogger("fedgen.study")

DP_ANALYSES = ("freq", "missing", "hardy", "assoc", "topk", "model")
DEFAULT_SPLIT = {"counts": 0.2, "assoc": 0.2, "select": 0.5, "topk": 0.1}


def check_dp_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """Validate ``plan["privacy"]`` for mode dp; return the normalised privacy settings."""
    p = dict(plan.get("privacy") or {})
    try:
        eps = float(p.get("epsilon"))
        delta = float(p.get("delta", 1e-6))
    except (TypeError, ValueError):
        raise ConfigError("privacy.epsilon and privacy.delta must be numbers") from None
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"privacy.epsilon must be > 0, got {p.get('epsilon')!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {p.get('delta')!r}")
    bad = [a for a in plan.get("analyses") or [] if a not in DP_ANALYSES]
    if bad:
        raise ConfigError(
            f"analysis {', '.join(bad)} has no differentially private version in fedgen; under privacy=dp use only "
            f"{', '.join(DP_ANALYSES)} (assoc = allelic test on noisy counts, topk = DP top-k release), "
            "or run with privacy=none"
        )
    if plan.get("pca") is not None or int(plan.get("pcs") or 0):
        raise ConfigError("PCA has no differentially private version in fedgen: set study.pcs=0 and drop pca under privacy=dp")
    if plan.get("covariates"):
        raise ConfigError("under privacy=dp association uses the allelic test without covariates: set study.covariates=[]")
    split = {**DEFAULT_SPLIT, **(p.get("split") or {})}
    if set(split) != set(DEFAULT_SPLIT) or any(not (isinstance(v, (int, float)) and v >= 0) for v in split.values()):
        raise ConfigError(f"privacy.split must give non-negative shares for {', '.join(DEFAULT_SPLIT)}")
    k = int(p.get("topk", 10))
    if not 1 <= k <= 1000:
        raise ConfigError("privacy.topk must be between 1 and 1000")
    select_k = p.get("select_k")
    if select_k is not None and not (isinstance(select_k, int) and k <= select_k <= 1000):
        raise ConfigError(f"privacy.select_k must be a whole number from privacy.topk ({k}) to 1000, or null (= topk)")
    planner = dict(p.get("planner") or {})
    unknown = sorted(set(planner) - {"n_causal", "maf", "odds_ratio", "af_spectrum", "exact_loci"})
    if unknown:
        raise ConfigError(f"privacy.planner: unknown key(s) {', '.join(unknown)} "
                          "(known: n_causal, maf, odds_ratio, af_spectrum, exact_loci)")
    exact_loci = planner.get("exact_loci")
    if exact_loci is not None and not (isinstance(exact_loci, int) and not isinstance(exact_loci, bool) and exact_loci >= 0):
        raise ConfigError(f"privacy.planner.exact_loci must be a whole number >= 0 or null, got {exact_loci!r}")
    panel = (plan.get("dp") or {}).get("panel") or p.get("panel")
    if panel is not None:
        from fedgen.study.dpfreq import read_panel

        panel = str(panel)
        read_panel(panel)  # readable, and lists at least one variant
    return {"mode": "dp", "epsilon": eps, "delta": delta, "split": split, "topk": k, "panel": panel,
            "select_k": select_k, "force": bool(p.get("force", False)), "planner": planner}


def planner_inputs(priv: dict[str, Any], sizes: dict[str, tuple[int, int, int]], *, n_variants: int, phenotypes: int,
                   assoc: bool, topk: bool) -> tuple[list[Any], Any, Any]:
    """(sites, settings, effect) for :func:`fedgen.privacy.planner.plan_dp` from a study's privacy settings."""
    from fedgen.privacy.planner import Effect, Settings, Site

    pl = priv.get("planner") or {}
    eff = Effect(**{k: pl[k] for k in ("n_causal", "maf", "odds_ratio", "exact_loci") if k in pl})
    settings = Settings(epsilon=priv["epsilon"], delta=priv["delta"], split=dict(priv["split"]), topk=priv["topk"],
                        select_k=priv.get("select_k"),
                        n_variants=n_variants, phenotypes=max(phenotypes, 1), assoc=assoc, select=topk,
                        af_spectrum=str(pl.get("af_spectrum", "neutral")))
    sites = [Site(name, n, c, ctl) for name, (n, c, ctl) in sizes.items()]
    return sites, settings, eff


def _check_with_planner(ctx: StudyContext, info, priv: dict[str, Any], *, n_variants: int, tested: list[str],
                        assoc: bool, topk: bool) -> dict[str, Any]:
    """Predict every release's worth from the sites' public sizes before any ε is spent; refuse the
    study when a release cannot beat knowing nothing, unless ``privacy.force`` (recorded)."""
    from fedgen.privacy.planner import describe, plan_dp

    ph = tested[0] if tested else None
    sizes = {}
    for s, r in info.items():
        n = int(r.meta.get("counts", {}).get("samples") or r.meta.get("samples") or 0)
        col = (r.meta.get("columns") or {}).get(ph, {}) if ph else {}
        n_ph = int(col.get("n", n))
        cases = int(col.get("cases", n_ph // 2))
        sizes[s] = (n, cases, max(n_ph - cases, 0))
    sites, settings, eff = planner_inputs(priv, sizes, n_variants=n_variants, phenotypes=len(tested), assoc=assoc, topk=topk)
    forced = bool(priv.get("force"))
    plan = plan_dp(sites, settings, eff, thresholds=not forced)
    text = describe(plan)
    useless = [r["release"] for r in plan["releases"] if not r["useful"]]
    if useless and not forced:
        raise ConfigError("the DP planner predicts that these releases cannot beat knowing nothing at these site sizes "
                          f"and ε: {'; '.join(useless)}. Nothing was released and no ε was spent.\n{text}\n"
                          "Raise privacy.epsilon, restrict the releases to a panel, or run anyway with privacy.force=true "
                          "(recorded in the manifest).")
    if useless:
        note = f"privacy.force=true: released although the planner predicted no better than knowing nothing: {'; '.join(useless)}"
        log.warning(note)
        ctx.notes.append(note)
    log.info("DP plan:\n%s", text)
    return {**plan, "forced": forced and bool(useless)}


def _budget(priv: dict[str, Any], *, assoc: bool, topk: bool) -> dict[str, float]:
    """ρ per release kind; the shares of releases that do not happen go to those that do."""
    from fedgen.privacy.accounting import rho_for_epsilon

    rho = rho_for_epsilon(priv["epsilon"], priv["delta"])
    split = dict(priv["split"])
    if not assoc:
        split["assoc"] = 0.0
    if not topk:
        split["select"] = split["topk"] = 0.0
    total = sum(split.values())
    if total <= 0:
        raise ConfigError("privacy.split gives the study no budget")
    return {k: rho * v / total for k, v in split.items()} | {"total": rho}


def run_dp_plan(plan: dict[str, Any], transport: Transport) -> dict[str, Any]:
    """Run a study whose every release is differentially private; publish results and manifest."""
    priv = check_dp_plan(plan)
    return run_published(plan, transport, lambda ctx, stage, info, aln: _dp_study(ctx, stage, info, aln, priv))


def _dp_study(ctx: StudyContext, stage: Path, info, aln, priv: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The releases of a DP study (see the module docstring); returns (results, manifest privacy)."""
    from fedgen.privacy.mechanisms import sigma_for_rho
    from fedgen.study.gwas import assoc_text, phenotype_kind, query_rows

    plan = ctx.plan
    phenos = list(plan.get("phenotypes") or [])
    kinds = {ph: phenotype_kind(info, ph) for ph in phenos}
    nonbinary = [ph for ph, k in kinds.items() if k != "binary"]
    analyses = list(plan.get("analyses") or [])
    want_assoc, want_topk = bool(phenos) and "assoc" in analyses, bool(phenos) and "topk" in analyses
    if nonbinary and (want_assoc or want_topk):
        raise ConfigError(
            f"phenotype(s) {', '.join(nonbinary)} are not binary: under privacy=dp fedgen tests binary traits only "
            "(allelic test)"
        )
    tested = phenos if (want_assoc or want_topk) else []
    # every site accounts at its own policy's δ: a different study δ would make a site refuse
    # half-way through the study, after other releases were already charged
    off = {s: r.meta.get("policy", {}).get("delta") for s, r in info.items()
           if r.meta.get("policy", {}).get("delta") not in (None, priv["delta"])}
    if off:
        detail = ", ".join(f"{s}: {d:g}" for s, d in off.items())
        raise ConfigError(f"privacy.delta = {priv['delta']:g} differs from the δ of site polic(ies) {detail}; "
                          "set privacy.delta to the sites' δ (nothing was released)")
    rho = _budget(priv, assoc=want_assoc, topk=want_topk)
    panel_info = None
    if priv.get("panel"):
        aln, panel_info = _apply_panel(ctx, aln, priv["panel"])
    V = len(aln)
    planned = _check_with_planner(ctx, info, priv, n_variants=V, tested=tested, assoc=want_assoc, topk=want_topk)
    releases: list[dict[str, Any]] = []

    sigma_counts = sigma_for_rho(math.sqrt(max(V, 1)), rho["counts"])
    log.info("DP genotype counts: %d variants, σ = %.1f per count (ρ = %.4g)", V, sigma_counts, rho["counts"])
    with ctx.timed("dp_genotype_counts"):
        noisy = blockwise_sum(ctx, "dp_genotype_counts", aln, key="counts", params={"sigma": sigma_counts},
                              label="DP genotype counts")
    releases.append({"release": "genotype counts", "variants": V, "sigma": sigma_counts, "l2_sensitivity": math.sqrt(V),
                     "rho": rho["counts"]})
    counts = np.clip(noisy, 0, None).astype(np.int64)
    from fedgen.study.dpfreq import dp_hardy

    n_total = sum(int(r.meta["counts"]["samples"]) for r in info.values())
    # post-processing of the noisy counts and the public sample total only
    hardy = dp_hardy(noisy, n_total, len(aln.idx) * sigma_counts**2)
    ctx.notes.append(
        f"privacy=dp: missing.vmiss and hardy.hardy come from pooled noisy genotype counts (σ = {sigma_counts:.1f} per count "
        "per site, negative counts clipped to 0); hardy.hardy P values (and the HWE filter) come from a noise-aware test "
        "that includes the noise variance (fedgen.study.dpfreq.dp_hardy: conservative where the noise swamps the counts), "
        "its count columns are the noisy cells projected on the public total, rounded and clamped at 0"
    )
    results: dict[str, Any] = {}
    freq_summary = None
    with ctx.timed("write_qc"):
        results.update(write_qc_outputs(stage, aln, counts, analyses=[a for a in analyses if a != "freq"],
                                        qc=plan.get("qc") or {}, hardy=hardy))
        results["files"] = list(results["files"])
        if "freq" in analyses:
            freq_summary = _write_freq(ctx, stage, aln, info, noisy, len(aln.idx) * sigma_counts**2)
            results["files"].insert(0, "freq.afreq")
    assoc_summary: dict[str, Any] = {}
    top_rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    k = priv["topk"]
    for ph in tested:
        rows = np.flatnonzero(results["qc_pass"])
        if len(rows) == 0:
            raise FedgenError(f"{ph}: no variant passes QC")
        # A1 by the pooled noisy counts (post-processing): the minor allele
        alt_ct = counts[:, 1] + 2 * counts[:, 2]
        ref_ct = counts[:, 1] + 2 * counts[:, 0]
        a1_ref = (alt_ct > ref_ct)[rows]
        params = {"phenotype": ph, "kind": "binary", "covariates": []}
        assoc_summary[ph] = {"kind": "binary"}
        if want_assoc:
            rho_a = rho["assoc"] / len(tested)
            sigma_a = sigma_for_rho(2 * math.sqrt(len(rows)), rho_a)
            metas: dict[str, dict[str, Any]] = {}
            with ctx.timed(f"dp_assoc_counts.{ph}.all"):
                sums = query_rows(ctx, "dp_assoc_counts", aln, rows, a1_ref, {**params, "sigma": sigma_a}, metas=metas)
            r = _noisy_test(sums["counts"], metas, sigma_a)
            name = f"{ph}.assoc"
            atomic_write_text(stage / name, assoc_text(aln, rows, a1_ref, r))
            results["files"].append(name)
            releases.append({"release": f"{ph}: case/control allele counts of all QC-passing variants", "phenotype": ph,
                             "variants": len(rows), "sigma": sigma_a, "l2_sensitivity": 2 * math.sqrt(len(rows)), "rho": rho_a})
            assoc_summary[ph]["assoc"] = {"test": "allelic test on noisy counts, noise variance included in the SE",
                                          "tested": len(rows), "sigma": sigma_a}
        if not want_topk:
            continue
        rho_sel = rho["select"] / len(tested)
        rho_top = rho["topk"] / len(tested)
        kk = min(k, len(rows))
        ks = min(int(priv.get("select_k") or kk), len(rows))  # candidates each site picks (>= k)
        eps0 = math.sqrt(8 * rho_sel / ks)
        # selection weights from the released pooled frequencies (post-processing of the counts release)
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = selection_weights((alt_ct / (alt_ct + ref_ct))[rows])
        with ctx.timed(f"dp_topk_select.{ph}"):
            picked, scales = _select(ctx, aln, rows, params, ks, eps0, weight)
        union = np.unique(np.concatenate(list(picked.values())))
        U = len(union)
        sigma_top = sigma_for_rho(2 * math.sqrt(U), rho_top)
        metas = {}
        with ctx.timed(f"dp_assoc_counts.{ph}.topk"):
            sums = query_rows(ctx, "dp_assoc_counts", aln, rows[union], a1_ref[union], {**params, "sigma": sigma_top},
                              metas=metas)
        r = _noisy_test(sums["counts"], metas, sigma_top)
        order = np.argsort(-np.where(np.isfinite(r["chisq"]), r["chisq"], -1.0), kind="stable")[:kk]
        sel_rows = rows[union][order]
        rr = {key: np.asarray(v)[order] for key, v in r.items()}
        name = f"{ph}.dp_topk.assoc"
        atomic_write_text(stage / name, assoc_text(aln, sel_rows, a1_ref[union][order], rr))
        results["files"].append(name)
        releases += [
            {"release": f"{ph}: top-k selection", "phenotype": ph, "k": ks, "epsilon_per_pick": eps0, "rho": rho_sel,
             "gumbel_scale": scales},
            {"release": f"{ph}: case/control allele counts of selected variants", "phenotype": ph, "variants": U,
             "sigma": sigma_top, "l2_sensitivity": 2 * math.sqrt(U), "rho": rho_top},
        ]
        assoc_summary[ph].update({
            "test": "DP top-k allelic chi-square",
            "k": kk,
            "candidates": U,
            "top_hits": [
                {"chrom": str(aln.chrom[i]), "pos": int(aln.pos[i]), "id": str(aln.ids[i]),
                 "chisq": float(rr["chisq"][j]), "p": float(rr["p"][j])}
                for j, i in enumerate(sel_rows.tolist())
            ],
        })
        log.info("%s: DP top-%d from %d candidates; top: %s", ph, kk, U,
                 ", ".join(f"{h['id']} (P={h['p']:.2e})" for h in assoc_summary[ph]["top_hits"][:5]))
        top_rows[ph] = (sel_rows, np.asarray(rr["chisq"], dtype=np.float64))
    results["association"] = {"phenotypes": assoc_summary, "files": []}
    model_summary = None
    if "model" in analyses:
        model_summary = _dp_model(ctx, stage, info, aln, counts, top_rows, results,
                                  noisy=noisy, noise_var=len(aln.idx) * sigma_counts**2)
    privacy = {**priv, "rho_total": rho["total"], "releases": releases, "planner": planned,
               "public": "variant lists and numbers of samples, cases and controls per site"}
    if panel_info is not None:
        privacy["panel"] = panel_info
    if freq_summary is not None:
        privacy["frequencies"] = freq_summary
    extra: dict[str, Any] = {"privacy": privacy}
    if model_summary is not None:
        extra["model"] = model_summary
    return results, extra


def _dp_model(ctx: StudyContext, stage: Path, info, aln, counts: np.ndarray,
              top_rows: dict[str, tuple[np.ndarray, np.ndarray]], results: dict[str, Any], *,
              noisy: np.ndarray, noise_var: float) -> dict[str, Any]:
    """The study's risk model under privacy=dp: its variants are the model phenotype's DP top-k
    (``top:N``, in the order of the released noisy χ²) or a variant list, standardised with the
    frequencies of freq.afreq (post-processed from the noisy counts: shrunk, so never 0 or 1 for
    a variant that varies); training is DP-SGD (study.model.epsilon per site, on
    top of privacy.epsilon)."""
    from fedgen.study.learn import run_risk_model

    cfg = ctx.plan["model"]
    assoc = None
    if str(cfg["variants"]).startswith("top:"):
        rows, chisq = top_rows[cfg["phenotype"]]
        from fedgen.stats.pvalues import chisq1_ln_p

        mlog10p = -chisq1_ln_p(np.where(np.isfinite(chisq), chisq, 0.0)) / np.log(10.0)
        assoc = {"rows": rows, "association": {cfg["phenotype"]: {
            "mlog10p": mlog10p, "test": "DP top-k allelic chi-square", "dp": True}}}
    from fedgen.study.dpfreq import dp_alt_freq

    n_total = sum(int(r.meta["counts"]["samples"]) for r in info.values())
    freq = dp_alt_freq(noisy, n_total, noise_var)["alt_freq"]
    with ctx.timed("model"):
        trained = run_risk_model(ctx, stage, info, aln, counts, assoc, alt_freq=freq)
    results["files"] += trained["files"]
    return trained["summary"]


def _apply_panel(ctx: StudyContext, aln, path: str):
    """The study variants restricted to the panel's (before any release), and the panel's manifest record."""
    from fedgen.study.dpfreq import panel_rows, read_panel, subset_alignment

    entries = read_panel(path)
    rows, unknown = panel_rows(aln, entries)
    if len(rows) == 0:
        raise ConfigError(
            f"study.dp.panel: none of the {len(entries)} variants of {path} is a study variant (shared by all "
            f"{len(aln.idx)} sites; e.g. {', '.join(entries[:3])}); nothing was released. List VCF IDs or "
            "CHROM:POS:REF:ALT of variants the sites have"
        )
    info = {"file": str(path), "entries": len(entries), "in_study": int(len(rows)), "unknown": len(unknown),
            "unknown_examples": unknown[:5], "study_variants": len(aln)}
    log.info("DP panel %s: %d of %d entries are study variants", path, len(rows), len(entries))
    if unknown:
        ctx.notes.append(
            f"study.dp.panel: {len(unknown)} of {len(entries)} panel entries are not study variants (not shared by all "
            f"sites, or not in the data) and were left out, e.g. {', '.join(unknown[:5])}"
        )
    ctx.notes.append(f"privacy=dp: every DP release covers the {len(rows)} panel variants in the study "
                     f"({len(aln)} study variants in all)")
    return subset_alignment(aln, rows), info


def _write_freq(ctx: StudyContext, stage: Path, aln, info, noisy: np.ndarray, noise_var: float) -> dict[str, Any]:
    """``freq.afreq`` from the released noisy counts and public sample counts only (post-processing)."""
    from fedgen.study.dpfreq import dp_alt_freq, write_dp_afreq

    n_total = sum(int(r.meta["counts"]["samples"]) for r in info.values())
    est = dp_alt_freq(noisy, n_total, noise_var)
    write_dp_afreq(stage / "freq.afreq", aln, est)
    tau2 = est["tau2"]
    ctx.notes.append(
        "privacy=dp: freq.afreq ALT_FREQS are post-processed from the pooled noisy genotype counts (projection on the "
        "public sample total, empirical-Bayes shrinkage towards the pooled mean frequency "
        f"{est['mean']:.4g}); ALT_FREQS_RAW is the unshrunk estimate clamped to [0, 1], ALT_FREQS_SE its noise SE, "
        "L95/U95 a 95 % interval from the known noise"
    )
    return {"estimator": "projection on the public total + normal-normal empirical Bayes (fedgen.study.dpfreq)",
            "samples": n_total, "noise_var_per_cell": noise_var, "mean": est["mean"],
            "tau2": tau2 if math.isfinite(tau2) else None,
            "median_se": float(np.median(est["se"])) if len(est["se"]) else None}


def _noisy_test(counts: np.ndarray, metas: dict[str, dict[str, Any]], sigma: float) -> dict[str, np.ndarray]:
    """The allelic test of pooled noisy counts with the noise of every site in its variance."""
    from fedgen.stats import assoc as assocstats

    cases = sum(int(m.get("n_cases", 0)) for m in metas.values())
    controls = sum(int(m.get("n_controls", 0)) for m in metas.values())
    c = np.asarray(counts, dtype=np.float64)
    return assocstats.noisy_allelic_assoc(c[:, 0], c[:, 1], c[:, 2], c[:, 3], noise_var=len(metas) * sigma**2,
                                          case_alleles=2 * cases, control_alleles=2 * controls)


def _select(
    ctx: StudyContext, aln, rows: np.ndarray, params: dict[str, Any], k: int, eps0: float, weight: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Each site's k Gumbel picks (positions within ``rows``, scores weighted by ``weight``,
    :func:`fedgen.analyses.dp.selection_weights`) and its Gumbel noise scale."""
    # one request with every candidate: the Gumbel picks are over the whole set (a site whose
    # policy caps variants per request below this refuses, and says so)
    req = Request(
        "dp_topk_select",
        params={**params, "k": k, "epsilon_per_pick": eps0},
        per_site_arrays={s: {"idx": aln.idx[s][rows], "flip": aln.flip[s][rows],
                             "weight": np.ascontiguousarray(weight, dtype=np.float64)} for s in aln.idx},
    )
    replies = ctx.query(req)
    out = {}
    for s, rep in replies.items():
        sel = np.asarray(rep.arrays["selected"], dtype=np.int64)
        if sel.shape != (k,) or sel.min(initial=0) < 0 or sel.max(initial=0) >= len(rows):
            raise FedgenError(f"site {s}: malformed top-k selection")
        out[s] = sel
    return out, {s: float(rep.meta.get("gumbel_scale", float("nan"))) for s, rep in replies.items()}
