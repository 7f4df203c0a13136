"""Federated association testing at the aggregator: covariates, chi-square, linear, logistic.

Every step asks the sites for sums (see :mod:`fedgen.analyses.assoc`) and finishes the
statistic here with the same code that PLINK's pooled computation corresponds to
(:mod:`fedgen.stats.glm`, :mod:`fedgen.stats.assoc`). Logistic regression iterates all variants
of a block together: one message round per Newton step, never one per variant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.errors import ConfigError, FedgenError
from fedgen.federation.transport import Reply, Request
from fedgen.stats import assoc as assocstats
from fedgen.stats import glm
from fedgen.study import glmcols
from fedgen.study.align import Alignment
from fedgen.study.engine import BLOCKS_PER_ROUND, Replies, Task, combine_blocks, run_task, run_tasks, sum_replies
from fedgen.study.writers import atomic_write_text, write_tsv

log = logging.getLogger("fedgen.study")


def row_requests(
    ctx: Any,
    analysis: str,
    aln: Alignment,
    rows: np.ndarray,
    a1_ref: np.ndarray,
    params: dict[str, Any],
    arrays: dict[str, np.ndarray] | None = None,
) -> list[Request]:
    """Requests for ``analysis`` over study variants ``rows`` (A1-oriented), one per block.

    ``arrays`` holds per-variant inputs aligned with ``rows`` (e.g. β); they are sliced per block.
    """
    block = int(ctx.plan.get("glm_block_size") or ctx.plan.get("block_size") or 65536)
    out = []
    for b in range(0, len(rows), block):
        r = rows[b : b + block]
        flip_a1 = a1_ref[b : b + block].astype(np.uint8)
        common = {k: v[b : b + block] for k, v in (arrays or {}).items()}
        out.append(Request(
            analysis,
            params=params,
            arrays=common,
            per_site_arrays={s: {"idx": aln.idx[s][r], "flip": aln.flip[s][r] ^ flip_a1} for s in aln.idx},
        ))
    return out


def rows_task(ctx: Any, analysis: str, aln: Alignment, rows: np.ndarray, a1_ref: np.ndarray, params: dict[str, Any],
              arrays: dict[str, np.ndarray] | None = None, *, metas: dict[str, dict[str, Any]] | None = None) -> Task:
    """Engine task: ``analysis`` over ``rows`` in blocks, summed over sites (see :func:`row_requests`).

    ``metas``, when given, receives each site's reply metadata (of the last block).
    """
    from fedgen.analyses.assoc import unpack_symmetric

    reqs = row_requests(ctx, analysis, aln, rows, a1_ref, params, arrays)
    replies: Replies = []
    for g in range(0, len(reqs), BLOCKS_PER_ROUND):
        replies += yield reqs[g : g + BLOCKS_PER_ROUND]
    if metas is not None and replies:
        metas.update({s: dict(r.meta) for s, r in replies[-1].items()})
    return combine_blocks(replies, unpack_symmetric)


def query_rows(ctx: Any, analysis: str, aln: Alignment, rows: np.ndarray, a1_ref: np.ndarray, params: dict[str, Any],
               arrays: dict[str, np.ndarray] | None = None, *, metas: dict[str, dict[str, Any]] | None = None
               ) -> dict[str, np.ndarray]:
    """:func:`rows_task` on its own: one analysis over ``rows``, summed over sites."""
    return run_task(ctx, analysis, rows_task(ctx, analysis, aln, rows, a1_ref, params, arrays, metas=metas))


# --------------------------------------------------------------------------- study set-up


def phenotype_kind(info: dict[str, Reply], name: str) -> str:
    kinds = {s: r.meta["columns"][name]["kind"] for s, r in info.items()}
    uniq = set(kinds.values())
    if uniq == {"binary"}:
        return "binary"
    if uniq == {"quantitative"}:
        return "quantitative"
    if uniq <= {"binary", "quantitative"}:
        detail = ", ".join(f"{s}: {k}" for s, k in kinds.items())
        raise FedgenError(
            f"phenotype {name!r} looks binary at some sites and quantitative at others ({detail}); "
            "code a binary trait 0/1 (or PLINK's 1/2) at every site"
        )
    raise FedgenError(f"phenotype {name!r} must be numeric at every site")


def prepare_covariates(ctx: Any, info: dict[str, Reply]) -> tuple[list[dict[str, Any]], dict[str, list[float]], list[str]]:
    """Agree covariate coding across sites; standardise numeric ones with pooled mean/SD.

    Returns the covariate specs sent to sites, each site's site-indicator values, and the
    names of the design's covariate columns (for the manifest).
    """
    plan = ctx.plan
    names = list(plan.get("covariates") or [])
    specs: list[dict[str, Any]] = []
    numeric: list[str] = []
    for name in names:
        kinds = {s: r.meta["columns"][name]["kind"] for s, r in info.items()}
        if "categorical" in kinds.values():
            if set(kinds.values()) != {"categorical"}:
                detail = ", ".join(f"{s}: {k}" for s, k in kinds.items())
                raise FedgenError(f"covariate {name!r} is numeric at some sites and categorical at others ({detail})")
            levels = sorted({lv for r in info.values() for lv in r.meta["columns"][name]["levels"]})
            if len(levels) < 2:
                raise ConfigError(f"covariate {name!r} is constant (only level {levels[0] if levels else 'none'}) at every site")
            specs.append({"name": name, "kind": "categorical", "levels": levels})
        else:
            specs.append({"name": name, "kind": "numeric"})
            numeric.append(name)
    if numeric:
        rep = ctx.query(Request("covar_moments", params={"names": numeric}))
        mom = sum_replies(rep)["moments"]
        for name, (sx, sxx, n) in zip(numeric, mom.tolist()):
            if n == 0:
                raise ConfigError(f"covariate {name!r} is missing for every sample")
            mean = sx / n
            var = (sxx - n * mean * mean) / (n - 1) if n > 1 else 0.0
            if not var > 1e-12 * max(1.0, mean * mean):
                raise ConfigError(f"covariate {name!r} is constant ({mean:g} for every sample)")
            spec = next(s for s in specs if s["name"] == name)
            spec.update(mean=mean, sd=float(np.sqrt(var)))
    site_cols: dict[str, list[float]] = {}
    columns = [c for s in specs for c in ([s["name"]] if s["kind"] == "numeric" else [f"{s['name']}={lv}" for lv in s["levels"][1:]])]
    if plan.get("site_covariate"):
        sites = list(info)
        if len(sites) < 2:
            raise ConfigError("study.site_covariate needs at least two sites")
        for s in sites:
            site_cols[s] = [1.0 if s == t else 0.0 for t in sites[1:]]
        columns += [f"site={t}" for t in sites[1:]]
    return specs, site_cols, columns


# --------------------------------------------------------------------------- the analyses


def run_association(
    ctx: Any,
    aln: Alignment,
    counts: np.ndarray,
    qc_pass: np.ndarray,
    info: dict[str, Reply],
    out: Path,
    *,
    pca: dict[str, Any] | None = None,
    allele_counts: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Association for every phenotype of the plan on the variants passing QC.

    ``allele_counts`` (ALT count, allele observations per study variant), when given, choose A1
    instead of ``counts`` (chrX/chrY/MT counted by sex, as PLINK 2 chooses A1 there)."""
    plan = ctx.plan
    phenos = list(plan.get("phenotypes") or [])
    analyses = set(plan.get("analyses") or [])
    if not phenos or not analyses & {"glm", "assoc"}:
        return {"files": [], "association": {}}
    rows = np.flatnonzero(qc_pass)
    if len(rows) == 0:
        raise FedgenError("no variant passes QC; nothing to test for association")
    c = np.asarray(counts, dtype=np.int64)[rows]
    alt_ct = c[:, 1] + 2 * c[:, 2]
    obs = 2 * (c[:, 0] + c[:, 1] + c[:, 2])
    if allele_counts is not None:
        alt_ct, obs = (np.asarray(a, dtype=np.float64)[rows] for a in allele_counts)
    a1_ref = assocstats.a1_is_ref(alt_ct, obs - alt_ct)
    covs, site_cols, cov_columns = prepare_covariates(ctx, info)
    n_pcs = int(plan.get("pcs") or 0)
    pc_spec = None
    if n_pcs:
        if not pca:
            raise ConfigError("study.pcs needs the federated PCA (study.pca) to run first")
        mom = pca["pc_moments"]
        pc_spec = {"study_id": pca["study_id"], "n": n_pcs, "mean": list(mom["mean"][:n_pcs]), "sd": list(mom["sd"][:n_pcs])}
        cov_columns = cov_columns + [f"PC{i + 1}" for i in range(n_pcs)]
    summary: dict[str, Any] = {}
    tasks: dict[str, Task] = {}
    assoc_at: dict[str, np.ndarray] = {}  # positions in ``rows`` of each allelic test's rows (autosomes)
    for pheno in phenos:
        kind = phenotype_kind(info, pheno)
        params = {"phenotype": pheno, "kind": kind, "covariates": covs, "site_columns": site_cols, "pcs": pc_spec,
                  "missing": plan.get("missing", "impute")}
        if plan.get("dosage"):
            params["dosage"] = True
        if params["missing"] == "impute":
            # one sample set for the whole study: people with every phenotype and covariate present (two
            # sets that differ by a few dozen people make sites withhold every row with a carrier among them)
            params["require"] = sorted(set(phenos) | set(plan.get("covariates") or []))
        summary[pheno] = {"kind": kind, "covariates": cov_columns}
        if kind == "binary" and "assoc" in analyses:
            auto = sex_groups(aln, rows, params)[0]
            a_rows = rows[auto[0]] if auto[1] is params else rows[:0]
            if len(a_rows) < len(rows):
                ctx.notes.append(f"{pheno}.assoc: the allelic test covers autosomes only (chrX/chrY/MT rows are in the "
                                 "regression tables)")
            if len(a_rows):
                tasks[f"assoc:{pheno}"] = _chisq(ctx, aln, a_rows, a1_ref[auto[0]], params, out)
                assoc_at[pheno] = auto[0] if auto[1] is params else np.zeros(0, dtype=np.int64)
        if "glm" not in analyses:
            continue
        if kind == "binary" and ctx.sites_not_allowing("glm_logistic"):
            note = (f"{pheno}: logistic regression skipped: the policy of site(s) "
                    f"{', '.join(ctx.sites_not_allowing('glm_logistic'))} does not answer logistic/Firth rounds (their sums "
                    "at aggregator-chosen coefficients can reconstruct individuals; a site opts in with extra_analyses); "
                    f"the allelic test ({pheno}.assoc) is the binary-trait result")
            log.warning(note)
            ctx.notes.append(note)
            continue
        if kind == "binary":
            from fedgen.analyses.assoc import MAX_FIRTH_PREDICTORS

            if len(cov_columns) + 2 > MAX_FIRTH_PREDICTORS:  # sites refuse larger Firth rounds
                raise ConfigError(f"{pheno}: logistic regression with Firth fallback takes at most "
                                  f"{MAX_FIRTH_PREDICTORS - 2} covariate columns (this study has {len(cov_columns)}, "
                                  "counting each categorical level and PC)")
            tasks[f"glm:{pheno}"] = _logistic(ctx, aln, rows, a1_ref, params, out, n_cov=len(cov_columns))
        else:
            tasks[f"glm:{pheno}"] = _linear(ctx, aln, rows, a1_ref, params, out)
        if pc_spec is not None and plan.get("lambda_without_pcs", True):
            p0 = dict(params, pcs=None)
            n0 = len(cov_columns) - n_pcs
            tasks[f"glm_without_pcs:{pheno}"] = (_logistic(ctx, aln, rows, a1_ref, p0, None, n_cov=n0) if kind == "binary"
                                                 else _linear(ctx, aln, rows, a1_ref, p0, None))
    with ctx.timed("association"):
        done = run_tasks(ctx, tasks)
    files: list[str] = []
    for pheno in phenos:
        res = summary[pheno]
        chisq = done.get(f"assoc:{pheno}")
        if chisq is not None:
            files.append(chisq[0])
        glm_res = done.get(f"glm:{pheno}")
        if glm_res is not None:
            files.append(glm_res[0])
            res["file"] = glm_res[0]
            res["mlog10p"] = glm_res[1]
        if f"glm_without_pcs:{pheno}" in done:
            res["mlog10p_without_pcs"] = done[f"glm_without_pcs:{pheno}"][1]
        if "mlog10p" not in res and chisq is not None:  # no regression: λGC, top hits and plots from the allelic test
            full = np.full(len(rows), np.nan)  # its rows are the autosomal ones
            full[assoc_at[pheno]] = chisq[1]
            res["mlog10p"] = full
            res["test"] = "allelic chi-square"
    return {"files": files, "association": summary, "rows": rows, "a1_ref": a1_ref}


def mlog10p_from_ln(p_ln: np.ndarray) -> np.ndarray:
    """−log10 P from ln P: P values below 1e-308 keep their size (exp(ln P) would underflow to 0)."""
    return -np.asarray(p_ln, dtype=np.float64) / np.log(10.0)


def _variant_cols(aln: Alignment, rows: np.ndarray, a1_ref: np.ndarray) -> list[list[str]]:
    ref = aln.ref[rows].tolist()
    alt = aln.alt[rows].tolist()
    a1 = [r if f else a for r, a, f in zip(ref, alt, a1_ref.tolist())]
    return [aln.chrom[rows].tolist(), aln.pos[rows].tolist(), aln.ids[rows].tolist(), ref, alt, a1]


#: ERRCODE of a row that a site's disclosure rule withheld (a cell of 1..min_cell-1 carriers or
#: carriers of A2, or IRLS weights resting on fewer than min_count people)
WITHHELD = "SMALL_CELL"


def _withheld(sums: dict[str, np.ndarray], n: int) -> np.ndarray:
    w = sums.get("withheld")
    return np.zeros(n, bool) if w is None else np.asarray(w) > 0


def _note_withheld(ctx: Any, what: str, mask: np.ndarray) -> None:
    k = int(np.count_nonzero(mask))
    if k:
        note = (f"{what}: {k} row(s) withheld by a site's small-cell rule (ERRCODE {WITHHELD}): fewer than the "
                "site's min_cell carriers of A1 or of A2, or IRLS weights on too few people")
        log.info(note)
        ctx.notes.append(note)


def sex_groups(aln: Alignment, rows: np.ndarray, params: dict[str, Any]) -> list[tuple[np.ndarray, dict[str, Any], int]]:
    """Positions in ``rows`` per contig class with the design parameters of that class and the
    number of predictors it adds (chrX: sex as a covariate, PLINK 2's default ``--xchr-model 2``;
    none when the study's covariates already include sex, as PLINK's ``--glm no-x-sex``)."""
    from fedgen.cohort.sex import contig_class

    cls = np.asarray([contig_class(c) for c in aln.chrom[rows].tolist()], dtype=object)
    has_sex = any(str(cv.get("name", "")).lower() == "sex" for cv in params.get("covariates") or [])
    out = []
    for c in ("A", "X", "Y", "MT"):
        sel = np.flatnonzero(cls == c)
        if not len(sel):
            continue
        if c == "A":
            out.append((sel, params, 0))
        elif c == "X":
            out.append((sel, {**params, "sex_model": "X_nosex" if has_sex else "X"}, 0 if has_sex else 1))
        elif c == "Y" and has_sex:  # males only: sex is constant there, and PLINK leaves a constant covariate out
            keep = [cv for cv in params["covariates"] if str(cv.get("name", "")).lower() != "sex"]
            dropped = sum(1 if cv.get("kind") != "categorical" else len(cv["levels"]) - 1
                          for cv in params["covariates"] if cv not in keep)
            out.append((sel, {**params, "covariates": keep, "sex_model": c}, -dropped))
        else:
            out.append((sel, {**params, "sex_model": c}, 0))
    return out


def _merge_rows(parts: list[tuple[np.ndarray, dict[str, Any]]], n: int) -> dict[str, Any]:
    """Per-row result arrays of several row groups put back in row order."""
    out: dict[str, Any] = {}
    for sel, r in parts:
        for k, v in r.items():
            v = np.asarray(v)
            if v.ndim != 1 or len(v) != len(sel):
                continue
            if k not in out:
                out[k] = np.zeros(n, dtype=v.dtype) if v.dtype.kind != "U" else np.full(n, "", dtype="<U32")
            out[k][sel] = v
    return out


def _linear(ctx, aln, rows, a1_ref, params, out: Path | None) -> Task:
    parts = []
    for sel, p, _ in sex_groups(aln, rows, params):
        sums = yield from rows_task(ctx, "glm_linear", aln, rows[sel], a1_ref[sel], p)
        rg = glm.linear_from_suffstats(sums["XtX"], sums["Xty"], sums["yty"], sums["n"])
        rg["_held"] = _withheld(sums, len(sel))
        rg["_a1"], rg["_obs"] = sums["XtX"][:, 0, 1], 2.0 * np.asarray(sums["n"], dtype=np.float64)
        parts.append((sel, rg))
    r = _merge_rows(parts, len(rows))
    held = r.pop("_held")
    sums = {"XtX": np.zeros((len(rows), 2, 2)), "n": r["_obs"] / 2}
    sums["XtX"][:, 0, 1] = r["_a1"]
    r["errcode"] = np.where(held, WITHHELD, r["errcode"])
    if out is not None:
        _note_withheld(ctx, f"{params['phenotype']} linear", held)
    bad = r["errcode"] != "."
    name = f"{params['phenotype']}.glm.linear"
    p = np.where(bad, np.nan, mlog10p_from_ln(r["p_ln"]))
    if out is None:
        return name, p
    counts = None
    if glmcols.needs_counts(_cols(ctx)):  # over the regression's own samples: Σ A1 dosage and n from X'X
        counts = {"a1": sums["XtX"][:, 0, 1], "obs": 2.0 * np.asarray(sums["n"], dtype=np.float64)}
    head, body = glmcols.table(
        _cols(ctx), variant=_variant_cols(aln, rows, a1_ref), logistic=False, firth=None, obs_ct=r["obs_ct"],
        beta=r["beta"], beta_ln=False, se=r["se"], tz=r["t"], p_ln=r["p_ln"], errcode=list(r["errcode"]), show=~bad,
        counts=counts, ci=_ci(ctx))
    write_tsv(out / name, head, body)
    return name, p


def _cols(ctx: Any) -> tuple[str, ...]:
    return tuple(ctx.plan.get("glm_cols") or glmcols.DEFAULT)


def _ci(ctx: Any) -> float | None:
    ci = ctx.plan.get("glm_ci")
    return None if ci is None else float(ci)


def _regression_counts(ctx, aln, rows, a1_ref, params) -> Task:
    """A1/A2 allele counts in cases and controls over the regression's samples (those with the
    phenotype and every covariate), for the count columns of a logistic table."""
    names = [cv["name"] for cv in params.get("covariates") or []]
    req = sorted(set(params.get("require") or []) | {params["phenotype"], *names})
    sums = yield from rows_task(ctx, "assoc_counts", aln, rows, a1_ref, {**params, "require": req})
    c = np.asarray(sums["counts"], dtype=np.float64)
    return {"a1": c[:, 0] + c[:, 2], "obs": c.sum(axis=1), "a1_case": c[:, 0], "obs_case": c[:, 0] + c[:, 1],
            "a1_ctrl": c[:, 2], "obs_ctrl": c[:, 2] + c[:, 3]}


def _covariates_separated(ctx, params) -> Task:
    """PLINK's check that some covariate separates cases from controls (→ Firth for all).

    Sites report each covariate's min/max among their cases and controls; the aggregator
    combines them with min/max.
    """
    if not params["covariates"] and not params["site_columns"] and not params.get("pcs"):
        return False
    refusing = ctx.sites_not_allowing("covar_ranges")
    if refusing:
        note = (
            f"{params['phenotype']}: PLINK's covariate-separation check was skipped: the policy of site(s) "
            f"{', '.join(refusing)} does not release covariate extremes (single samples' values); if a covariate "
            "separated cases from controls PLINK would send every variant to Firth regression"
        )
        log.info(note)
        ctx.notes.append(note)
        return False
    replies = (yield [Request("covar_ranges", params=params)])[0]
    parts = [r.arrays for r in replies.values()]
    ranges = {k: (np.min if k.endswith("min") else np.max)(np.stack([p[k] for p in parts]), axis=0) for k in parts[0]}
    return glm.covariates_separated(ranges)


def _logistic(ctx, aln, rows, a1_ref, params, out: Path | None, *, n_cov: int) -> Task:
    """Logistic regression per contig class (see :func:`sex_groups`), one table in row order."""
    groups = sex_groups(aln, rows, params)
    if len(groups) == 1 and groups[0][1] is params:
        return (yield from _logistic_rows(ctx, aln, rows, a1_ref, params, out, n_cov=n_cov))
    parts = []
    for sel, p, extra in groups:
        fit = yield from _logistic_rows(ctx, aln, rows[sel], a1_ref[sel], p, None, n_cov=n_cov + extra, fit_only=True)
        parts.append((sel, fit))
    r = _merge_rows(parts, len(rows))
    show = (r["err"] == ".") | (r["err"] == "UNFINISHED")
    name = f"{params['phenotype']}.glm.logistic.hybrid"
    p_out = np.where(show, mlog10p_from_ln(r["p_ln"]), np.nan)
    if out is None:
        return name, p_out
    _note_withheld(ctx, f"{params['phenotype']} logistic", r["held"])
    counts = None
    if glmcols.needs_counts(_cols(ctx)):
        cparts = []
        for sel, p, _ in groups:
            c = yield from _regression_counts(ctx, aln, rows[sel], a1_ref[sel], p)
            cparts.append((sel, c))
        counts = _merge_rows(cparts, len(rows))
    head, body = glmcols.table(
        _cols(ctx), variant=_variant_cols(aln, rows, a1_ref), logistic=True, firth=r["firth"], obs_ct=r["obs_ct"],
        beta=r["beta"], beta_ln=True, se=r["se"], tz=r["z"], p_ln=r["p_ln"], errcode=r["err"].tolist(), show=show,
        counts=counts, ci=_ci(ctx))
    write_tsv(out / name, head, body)
    return name, p_out


def _logistic_rows(ctx, aln, rows, a1_ref, params, out: Path | None, *, n_cov: int, fit_only: bool = False) -> Task:
    """Logistic IRLS with Firth fallback. Firth starts for rows as soon as they are flagged
    (zero-count cells in the first round, non-convergence later), in the same rounds as the
    IRLS rows still iterating: one batch carries both steps."""
    from fedgen.analyses.assoc import unpack_symmetric

    n_pred = 2 + n_cov
    separated = yield from _covariates_separated(ctx, params)
    if separated:
        log.warning("%s: a covariate separates cases from controls; every variant uses Firth regression", params["phenotype"])
    drv = glm.LogisticDriver(len(rows), n_pred, covar_separated=separated, a1_is_ref=a1_ref)
    rounds = 0
    held = np.zeros(len(rows), bool)
    firths: list[tuple[np.ndarray, glm.FirthDriver]] = []
    started = np.zeros(len(rows), bool)
    while True:
        new = np.flatnonzero(drv.needs_firth & ~started)
        if new.size:
            firths.append((new, glm.FirthDriver(new.size, n_pred, obs_ct=drv.obs_ct[new])))
            started[new] = True
        # per driver, its levels: (rows, requests); a Firth driver adds the rest of running
        # step-halving ladders as further levels (each request names a variant once)
        steps: list[tuple[Any, list[tuple[np.ndarray, list[Request]]]]] = []
        if not drv.done:
            act = np.flatnonzero(drv.active)
            steps.append((drv, [(act, row_requests(ctx, "glm_logistic", aln, rows[act], a1_ref[act], params,
                                                   {"beta": drv.beta[act]}))]))
        for fidx, fd in firths:
            if not fd.done:
                steps.append((fd, [(fidx[act], row_requests(ctx, "glm_firth", aln, rows[fidx[act]], a1_ref[fidx[act]],
                                                             params, {"beta": beta}))
                                   for act, beta in fd.evaluations()]))
        if not steps:
            break
        replies = yield [r for _, levels in steps for _, reqs in levels for r in reqs]
        rounds += 1
        pos = 0
        for driver, levels in steps:
            level_sums = []
            for k, (target, reqs) in enumerate(levels):
                level_sums.append(combine_blocks(replies[pos : pos + len(reqs)], unpack_symmetric))
                pos += len(reqs)
            withheld = [_withheld(sums, len(target)) for sums, (target, _) in zip(level_sums, levels)]
            held[levels[0][0]] |= withheld[0]  # a speculative level's withheld rows are asked again
            if isinstance(driver, glm.FirthDriver):
                driver.step_levels([(t["I"], t["loglik"], t["U"], t["T"]) for t in level_sums], [~w for w in withheld])
            else:
                driver.step(level_sums[0]["H"], level_sums[0]["grad"])
    res = drv.results()
    firth = res["needs_firth"].copy()
    for fidx, fd in firths:
        fr = fd.results()
        for key in ("beta", "se", "z", "p_ln", "errcode"):
            res[key][fidx] = fr[key]
    fidx = np.flatnonzero(firth)
    log.info("%s: logistic regression in %d rounds (%d variants with Firth)", params["phenotype"], rounds, len(fidx))
    err = np.where(held, WITHHELD, np.asarray(res["errcode"]).astype(str)).astype(str)
    if fit_only:
        return {"beta": res["beta"], "se": res["se"], "z": res["z"], "p_ln": res["p_ln"], "obs_ct": res["obs_ct"],
                "firth": firth, "err": err, "held": held}
    if out is not None:
        _note_withheld(ctx, f"{params['phenotype']} logistic", held)
    show = (err == ".") | (err == "UNFINISHED")
    name = f"{params['phenotype']}.glm.logistic.hybrid"
    if out is None:
        return name, np.where(show, mlog10p_from_ln(res["p_ln"]), np.nan)
    counts = None
    if glmcols.needs_counts(_cols(ctx)):
        counts = yield from _regression_counts(ctx, aln, rows, a1_ref, params)
    head, body = glmcols.table(
        _cols(ctx), variant=_variant_cols(aln, rows, a1_ref), logistic=True, firth=firth, obs_ct=res["obs_ct"],
        beta=res["beta"], beta_ln=True, se=res["se"], tz=res["z"], p_ln=res["p_ln"], errcode=err.tolist(), show=show,
        counts=counts, ci=_ci(ctx))
    write_tsv(out / name, head, body)
    return name, np.where(show, mlog10p_from_ln(res["p_ln"]), np.nan)


def _chisq(ctx, aln, rows, a1_ref, params, out: Path) -> Task:
    sums = yield from rows_task(ctx, "assoc_counts", aln, rows, a1_ref, {**params, "covariates": [], "site_columns": {}, "pcs": None})
    c = sums["counts"]
    r = assocstats.allelic_assoc(c[:, 0], c[:, 1], c[:, 2], c[:, 3])
    held = _withheld(sums, len(rows))
    if held.any():  # PLINK 1.9's .assoc has no ERRCODE column: withheld rows print NA (manifest note)
        _note_withheld(ctx, f"{params['phenotype']} allelic test", held)
        for key in ("chisq", "p", "or_", "f_a", "f_u"):
            if key in r:
                r[key] = np.where(held, np.nan, np.asarray(r[key], dtype=np.float64))
    name = f"{params['phenotype']}.assoc"
    atomic_write_text(out / name, assoc_text(aln, rows, a1_ref, r))
    from scipy import stats

    with np.errstate(invalid="ignore"):
        mlog10p = -stats.chi2.logsf(np.asarray(r["chisq"], dtype=np.float64), 1) / np.log(10.0)
    return name, np.where(np.isfinite(np.asarray(r["p"], dtype=np.float64)), mlog10p, np.nan)


def assoc_text(aln: Alignment, rows: np.ndarray, a1_ref: np.ndarray, r: dict[str, np.ndarray]) -> str:
    """The ``.assoc`` text of study variants ``rows`` with A1 = REF where ``a1_ref``."""
    ref, alt = aln.ref[rows].tolist(), aln.alt[rows].tolist()
    flip = np.asarray(a1_ref).tolist()
    a1 = [rf if f else a for rf, a, f in zip(ref, alt, flip)]
    a2 = [a if f else rf for rf, a, f in zip(ref, alt, flip)]
    return format_assoc(aln.chrom[rows].tolist(), aln.ids[rows].tolist(), aln.pos[rows].tolist(), a1, a2, r)


def format_assoc(chrom: list[str], snp: list[str], bp: list[int], a1: list[str], a2: list[str], r: dict[str, np.ndarray]) -> str:
    """PLINK 1.9 ``.assoc`` text: fixed-width, right-aligned columns, trailing space."""
    cols = assocstats.format_assoc_columns(r)
    maxlen = max((len(x) for x in snp), default=0)
    w = 4 if maxlen <= 4 else maxlen + 2  # PLINK 1.9's SNP column width
    ci = [k for k in ("SE", "L95", "U95") if k in cols]  # PLINK 1.9 --ci 0.95 columns (DP studies)
    lines = [f" CHR {'SNP':>{w}} {'BP':>10} {'A1':>4} {'F_A':>8} {'F_U':>8} {'A2':>4} {'CHISQ':>12} {'P':>12} {'OR':>12} "
             + "".join(f"{k:>12} " for k in ci)]
    for i in range(len(snp)):
        lines.append(
            f"{chrom[i]:>4} {snp[i]:>{w}} {bp[i]:>10} {a1[i]:>4} {cols['F_A'][i]:>8} {cols['F_U'][i]:>8} "
            f"{a2[i]:>4} {cols['CHISQ'][i]:>12} {cols['P'][i]:>12} {cols['OR'][i]:>12} "
            + "".join(f"{cols[k][i]:>12} " for k in ci)
        )
    return "\n".join(lines) + "\n"
