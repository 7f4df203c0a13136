"""Run a study plan over a transport: describe sites, harmonise variants, QC, write results.

The plan is a plain dict (built from the Hydra config by :mod:`fedgen.study.plan`), so the
same runner serves the Flower ServerApp and the in-process transport used by fast tests.
Results are written to a staging folder and published only when complete.
"""

from __future__ import annotations

import logging
import platform
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

import fedgen
from fedgen.analyses.qc import decode_variant_table
from fedgen.errors import ConfigError, FedgenError, SiteError
from fedgen.federation.transport import Reply, Request, Transport
from fedgen.stats import qc as qcstats
from fedgen.stats.pvalues import p_text
from fedgen.study.align import Alignment, SiteVariants, align_variants, check_genome_builds
from fedgen.study.writers import atomic_write_json, publish_dir, staging_dir, write_tsv

log = logging.getLogger("fedgen.study")

DEFAULT_BLOCK = 8192


class StudyContext:
    """Mutable state of one run: bytes and rounds per site, timings, notes."""

    def __init__(self, plan: dict[str, Any], transport: Transport) -> None:
        self.plan = plan
        self.transport = transport
        self.bytes_sent: dict[str, int] = {}
        self.messages: dict[str, int] = {}
        self.rounds = 0
        #: message rounds per phase (task label of fedgen.study.engine, or the analysis name)
        self.phase_rounds: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.privacy_releases: list[dict[str, Any]] = []
        self.site_info: dict[str, Reply] = {}
        self.suppressed: dict[str, int] = {}  # "analysis@site" -> variant rows withheld (min_count)

    def query(self, request: Request) -> dict[str, Reply]:
        return self.query_many([request])[0]

    def query_many(self, requests: list[Request]) -> list[dict[str, Reply]]:
        """Independent requests in one message round (a batch per site when there are several)."""
        for request in requests:
            if not request.study_id:
                request.study_id = str(self.plan.get("study_id") or "")
        try:
            if len(requests) == 1:
                out = [self.transport.query(requests[0])]
            else:
                out = self.transport.query_many(requests)
        except SiteError as exc:  # where the study was when the site failed (for the drop-out rules)
            exc.phase = getattr(self, "phase", None) or "+".join(sorted({r.analysis for r in requests}))  # type: ignore[attr-defined]
            self.rounds += 1  # sent (the other sites may have answered it), so counted
            exc.round = self.rounds  # type: ignore[attr-defined]
            raise
        self.rounds += 1
        for site in out[0]:
            self.messages[site] = self.messages.get(site, 0) + 1
        for request, replies in zip(requests, out):
            self._account(request, replies)
        return out

    def train(self, request: Request) -> dict[str, Reply]:
        """One model-update round: Flower ``train`` messages (``Transport.train``), accounted like a query."""
        if not request.study_id:
            request.study_id = str(self.plan.get("study_id") or "")
        replies = self.transport.train(request)
        self.rounds += 1
        for site in replies:
            self.messages[site] = self.messages.get(site, 0) + 1
        self._account(request, replies)
        return replies

    def _account(self, request: Request, replies: dict[str, Reply]) -> None:
        for site, r in replies.items():
            self.bytes_sent[site] = self.bytes_sent.get(site, 0) + int(r.nbytes)
            if r.meta.get("suppressed"):
                key = f"{request.analysis}@{site}"
                self.suppressed[key] = self.suppressed.get(key, 0) + int(r.meta["suppressed"])
            priv = r.meta.get("privacy")
            if priv:  # a differentially private release: record what it cost this site
                self.privacy_releases.append({"site": site, "analysis": request.analysis, **priv})

    def carry_over(self, prev: "StudyContext") -> None:
        """Keep what an abandoned attempt (before a site dropped out) really cost: bytes, messages,
        rounds, time and every differentially private release (the sites' ledgers keep them)."""
        self.bytes_sent, self.messages = dict(prev.bytes_sent), dict(prev.messages)
        self.rounds, self.phase_rounds, self.timings = prev.rounds, dict(prev.phase_rounds), dict(prev.timings)
        self.privacy_releases = list(prev.privacy_releases)

    def sites_not_allowing(self, analysis: str) -> list[str]:
        """Sites whose policy (as their ``site_info`` reported it) does not allow ``analysis``."""
        return sorted(
            s for s, r in self.site_info.items()
            if analysis not in ((r.meta.get("policy") or {}).get("allowed_analyses") or [analysis])
        )

    def timed(self, name: str) -> "_Timer":
        return _Timer(self, name)


class _Timer:
    def __init__(self, ctx: StudyContext, name: str) -> None:
        self.ctx, self.name = ctx, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        self.outer = getattr(self.ctx, "phase", None)
        self.ctx.phase = self.name  # progress lines name the phase they report on

    def __exit__(self, *exc: Any) -> None:
        self.ctx.phase = self.outer
        self.ctx.timings[self.name] = round(self.ctx.timings.get(self.name, 0.0) + time.perf_counter() - self.t0, 3)


def blockwise_sum(
    ctx: StudyContext,
    analysis: str,
    aln: Alignment,
    *,
    key: str,
    params: dict[str, Any] | None = None,
    rows: np.ndarray | None = None,
    label: str = "",
) -> np.ndarray:
    """Request ``analysis`` for all study variants (or ``rows`` of them) in blocks; sum sites.

    Runs on the round engine: up to ``BLOCKS_PER_ROUND`` blocks travel in one round."""
    from fedgen.study.engine import run_task

    return run_task(ctx, label or analysis, blockwise_task(ctx, analysis, aln, key=key, params=params, rows=rows,
                                                           label=label))


def blockwise_task(ctx: StudyContext, analysis: str, aln: Alignment, *, key: str, params: dict[str, Any] | None = None,
                   rows: np.ndarray | None = None, label: str = ""):
    """Engine task of :func:`blockwise_sum` (checks every site's reply has ``key`` with one row per variant)."""
    from fedgen.study.engine import BLOCKS_PER_ROUND

    keys = (key,) if isinstance(key, str) else tuple(key)  # several keys: their arrays side by side
    sel = np.arange(len(aln)) if rows is None else np.asarray(rows)
    block = int(ctx.plan.get("block_size") or DEFAULT_BLOCK)
    n_blocks = max(1, -(-len(sel) // block))
    report = _progress(label or analysis, n_blocks)
    parts: list[np.ndarray] = []
    for g0 in range(0, n_blocks, BLOCKS_PER_ROUND):
        chunk = [sel[b * block : (b + 1) * block] for b in range(g0, min(n_blocks, g0 + BLOCKS_PER_ROUND))]
        reqs = [
            Request(analysis, params=dict(params or {}),
                    per_site_arrays={s: {"idx": aln.idx[s][r], "flip": aln.flip[s][r]} for s in aln.idx})
            for r in chunk
        ]
        replies = yield reqs
        for r, rep_by_site in zip(chunk, replies):
            total = None
            for site, rep in rep_by_site.items():
                for k in keys:
                    if k not in rep.arrays:
                        raise FedgenError(f"site {site}: reply to {analysis} has no {k!r} array")
                a = rep.arrays[key] if len(keys) == 1 else np.concatenate([rep.arrays[k] for k in keys], axis=1)
                if a.shape[0] != len(r):
                    raise FedgenError(f"site {site}: reply to {analysis} has {a.shape[0]} rows, expected {len(r)}")
                total = a.copy() if total is None else total + a
            assert total is not None
            parts.append(total)
        report(len(parts))
    return np.concatenate(parts, axis=0)


def _progress(label: str, total: int) -> Callable[[int], None]:
    from fedgen.progress import Progress

    return Progress(label, total, unit="blocks").update


def describe_sites(ctx: StudyContext) -> tuple[dict[str, Reply], Alignment]:
    plan = ctx.plan
    model = plan.get("model") or {}
    phenotypes = list(dict.fromkeys([*(plan.get("phenotypes") or []), *([model["phenotype"]] if model.get("phenotype") else [])]))
    covariates = list(dict.fromkeys([*(plan.get("covariates") or []), *(model.get("covariates") or [])]))
    req = Request("site_info", params={"phenotypes": phenotypes, "covariates": covariates})
    replies = ctx.query(req)
    ctx.site_info = replies
    expected = list(plan.get("sites") or [])
    if expected:
        missing = [s for s in expected if s not in replies]
        if missing:
            raise FedgenError(f"site(s) {', '.join(missing)} did not take part")
        replies = {s: replies[s] for s in expected}
    for site, rep in replies.items():
        c = rep.meta["counts"]
        log.info(
            "site %s: %d samples analysed (%d in VCF only, %d in samples table only), %d variants",
            site, c["samples"], c["vcf_only_samples"], c["table_only_samples"], c["variants"],
        )
    ctx.notes.extend(check_genome_builds({s: r.meta.get("contigs", {}) for s, r in replies.items()},
                                         {s: r.meta.get("build") for s, r in replies.items()}))
    tables = {}
    for s, rep in replies.items():
        chrom, pos, ids, ref, alt = decode_variant_table(rep.arrays["variants"])
        tables[s] = SiteVariants(chrom, pos, ids, ref, alt)
    # chrX/chrY/XY/MT are analysed as PLINK 2 does by exact studies (sex-split counts); DP studies keep autosomes
    aln = align_variants(tables, sex_chroms=(plan.get("privacy") or {}).get("mode", "none") != "dp")
    log.info("%d variants shared by all %d sites", len(aln), len(replies))
    return replies, aln


def run_plan(plan: dict[str, Any], transport: Transport) -> dict[str, Any]:
    """Run ``plan`` and publish results to ``plan["output_dir"]``; returns the manifest."""
    if (plan.get("privacy") or {}).get("mode", "none") == "dp":
        from fedgen.study.dp import run_dp_plan

        return run_dp_plan(plan, transport)
    return run_published(plan, transport, _exact_study)


def run_published(plan: dict[str, Any], transport: Transport, body: Any) -> dict[str, Any]:
    """The frame every study runs in: describe the sites, run ``body``, write the manifest, publish.

    ``body(ctx, stage, info, aln)`` writes its files into the staging folder ``stage`` and
    returns ``(results, manifest_extra)``; results go to :func:`build_manifest`, and
    ``manifest_extra`` updates the manifest. Results are published atomically: on any failure
    the staging folder is removed and an earlier results folder stays as it was.

    A site that fails (no answer within the timeout, an error reply, its node gone) is handled
    per ``plan["min_sites"]`` (``federation.min_sites``; None: every site). If at least that many
    sites are left, the failed site is dropped and the whole study restarts on the others (what
    was staged is discarded), so every result is exactly the pooled computation over one and the
    same set of sites; the manifest names it (``sites_contributed``) and the dropped sites
    (``dropped``: site, phase, round, reason, and the ε their releases cost). Otherwise the study
    stops with an error naming the site and the phase, and nothing is written.
    """
    t_start = time.time()
    journal = None
    if plan.get("journal", True):
        # a study killed mid-way and relaunched with the same output folder and plan resumes
        # from its journal (fedgen.study.journal): same study id, answered rounds not asked again
        from fedgen.study.journal import JournalTransport, open_journal

        journal = open_journal(plan)
        plan = {**plan, "study_id": journal.study_id}
        transport = JournalTransport(transport, journal)
    if not plan.get("study_id"):
        plan = {**plan, "study_id": uuid.uuid4().hex}
    out = Path(plan["output_dir"]).resolve()
    try:
        survivors = list(plan.get("sites") or transport.sites())
        min_sites = resolve_min_sites(plan.get("min_sites"), len(survivors))
        stage = staging_dir(out)
    except BaseException:
        if journal is not None:
            journal.close()
        raise
    dropped: list[dict[str, Any]] = []
    prev: StudyContext | None = None
    try:
        while True:  # one attempt per site set: a site that drops out restarts the study on the others
            ctx = StudyContext({**plan, "sites": survivors}, transport)
            if prev is not None:
                ctx.carry_over(prev)
            try:
                with ctx.timed("describe_sites"):
                    info, aln = describe_sites(ctx)
                results, extra = body(ctx, stage, info, aln)
                break
            except SiteError as exc:
                survivors = _drop_sites(ctx, exc, survivors, dropped, min_sites)
                shutil.rmtree(stage, ignore_errors=True)  # nothing of the abandoned attempt is kept
                stage = staging_dir(out)
                prev = ctx
        with ctx.timed("plots"):
            from fedgen.results.plots import qc_plots

            results["files"] += [f"plots/{p.name}" for p in qc_plots(stage)]
        manifest = {**build_manifest(plan, ctx, info, aln, results, t_start), **extra}
        manifest.update(_dropout_manifest(ctx, dropped, min_sites, survivors, manifest))
        if journal is not None:
            manifest["resumed"] = journal.summary()
        from fedgen.results.report import write_study_report

        write_study_report(stage, manifest)  # report.html, listed in manifest["files"]
        manifest["sites_contributed"]["outputs"] = {f: list(survivors) for f in manifest["files"]}
        atomic_write_json(stage / "manifest.json", manifest)
        publish_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if journal is not None:
            journal.abandon()  # kept if it holds any round: a relaunch resumes from it
        raise
    if journal is not None:
        journal.remove()
        if journal.rounds_replayed:
            log.info("resumed: %d round(s) replayed from the journal, %d asked live", journal.rounds_replayed,
                     journal.rounds_live)
    log.info("results written to %s", out)
    return manifest


def resolve_min_sites(value: Any, n_sites: int) -> int:
    """``federation.min_sites``: null (every site) or a whole number 1..number of sites."""
    if value is None:
        return n_sites
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n_sites:
        raise ConfigError(f"federation.min_sites must be a whole number from 1 to the number of sites ({n_sites}), "
                          f"or null for all of them; got {value!r}")
    return int(value)


def _drop_sites(ctx: StudyContext, exc: SiteError, survivors: list[str], dropped: list[dict[str, Any]],
                min_sites: int) -> list[str]:
    """A site failed (no answer in time, an error reply, its node gone): drop it (and any other
    site that failed in the same round) and return the sites the study restarts on, or stop with
    a clear error when fewer than ``min_sites`` would be left."""
    failed = dict(getattr(exc, "failed", None) or {exc.site: exc.reason})
    failed = {s: r for s, r in failed.items() if s in survivors}
    if not failed:
        raise exc
    phase, rnd = getattr(exc, "phase", "?"), getattr(exc, "round", ctx.rounds + 1)
    left = [s for s in survivors if s not in failed]
    what = "; ".join(f"site {s} failed during {phase} (round {rnd}): {r}" for s, r in failed.items())
    before = "".join(f"; dropped earlier: site {d['site']} during {d['phase']} ({d['reason']})" for d in dropped)
    if len(left) < min_sites:
        rule = ("all sites" if min_sites == len(survivors) + len(dropped) else f"at least {min_sites} sites")
        first, *others = failed
        also = "".join(f"; site {s} failed too: {failed[s]}" for s in others)
        raise SiteError(first, f"failed during {phase} (round {rnd}): {failed[first]}{also}. The study needs {rule} "
                        f"(federation.min_sites={min_sites}) and only {len(left)} would be left "
                        f"({', '.join(left) or 'none'}), so it stopped; no results were written{before}") from None
    if not hasattr(ctx.transport, "drop_site"):
        raise FedgenError(f"{what}; this transport cannot drop a site, so the study stopped; no results were "
                          "written") from None
    spent = _privacy_spent(ctx.plan, ctx)
    for site, reason in failed.items():
        ctx.transport.drop_site(site)
        dropped.append({
            "site": site, "phase": phase, "round": rnd, "reason": reason,
            "rounds_discarded": ctx.rounds,
            "bytes_sent": ctx.bytes_sent.get(site, 0), "messages": ctx.messages.get(site, 0),
            "epsilon_spent": spent.get(site, {}).get("epsilon", 0.0),
            "delta_spent": spent.get(site, {}).get("delta", 0.0),
            **({"privacy_releases": spent[site]["releases"]} if site in spent else {}),
        })
    log.warning("%s; dropped (federation.min_sites=%d): the study restarts on %s, and every result will be over "
                "those sites only", what, min_sites, ", ".join(left))
    return left


def _dropout_manifest(ctx: StudyContext, dropped: list[dict[str, Any]], min_sites: int, survivors: list[str],
                      manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's drop-out record: the rule, who contributed to each output and phase, who
    dropped out (where, why, what it had sent and the ε its releases cost)."""
    phases = sorted(set(ctx.phase_rounds) | set(ctx.timings))
    out: dict[str, Any] = {
        "min_sites": min_sites,
        "sites_contributed": {
            "outputs": {f: list(survivors) for f in manifest.get("files", [])},
            "phases": {p: list(survivors) for p in phases},
        },
        "dropped": dropped,
        "attempts": 1 + len({d["rounds_discarded"] for d in dropped}),
    }
    if dropped:
        spent = _privacy_spent(ctx.plan, ctx)
        for d in dropped:  # its releases before it dropped out still count (the site's ledger keeps them)
            d["epsilon_spent"] = spent.get(d["site"], {}).get("epsilon", d["epsilon_spent"])
        notes = list(manifest.get("notes") or [])
        for d in dropped:
            eps = f"; ε it spent before (in its own ledger too): {d['epsilon_spent']:.6g}" if d["epsilon_spent"] else ""
            notes.append(
                f"site {d['site']} dropped out during {d['phase']} (round {d['round']}: {d['reason']}); with "
                f"federation.min_sites={min_sites} the study restarted on {', '.join(survivors)}, and every result here "
                f"is over those sites only (the {d['rounds_discarded']} rounds before were discarded){eps}")
        out["notes"] = notes
    return out


def _exact_study(ctx: StudyContext, stage: Path, info: dict[str, Reply], aln: Alignment) -> tuple[dict[str, Any], dict[str, Any]]:
    """QC, PCA and association with exact (federated == pooled) statistics."""
    plan = ctx.plan
    results: dict[str, Any] = {}
    analyses = list(plan.get("analyses") or ["freq", "missing", "hardy"])
    dosage_sums = None
    with ctx.timed("genotype_counts"):
        if plan.get("dosage"):  # hard calls derived from the dosages, and the dosage sums, in one pass
            check_dosage_sites(info)
            if not autosomal(aln).all():
                from fedgen.errors import ConfigError

                raise ConfigError("study.dosage: dosages on chrX/chrY/MT are not read yet; run the study on autosomes only")
            both = blockwise_sum(ctx, "genotype_counts", aln, key=("counts", "dosage_sums"), params={"dosage": True},
                                 label="genotype counts and dosages")
            counts, dosage_sums = both[:, :4], both[:, 4:]
        else:
            counts = blockwise_sum(ctx, "genotype_counts", aln, key="counts", label="genotype counts")
    sex = sex_split_counts(ctx, aln)  # chrX/chrY/MT: counted by the samples' sex, as PLINK 2 does
    with ctx.timed("write_qc"):
        results.update(write_qc_outputs(stage, aln, counts, analyses=analyses, qc=plan.get("qc") or {}, sex=sex,
                                        dosage_sums=dosage_sums))
    if plan.get("pca") is not None:
        from fedgen.study.pca import run_pca

        with ctx.timed("pca"):
            results["pca"] = run_pca(ctx, aln, counts, results["qc_pass"] & autosomal(aln), stage, info=info)
        results["files"] += results["pca"]["files"]
    association = run_association_step(ctx, aln, counts, results["qc_pass"], info, stage, pca=results.get("pca"),
                                       allele_counts=results.pop("allele_counts", None))
    results["files"] += association.pop("files")
    raw = association.pop("_raw", None)
    results["association"] = association
    extra: dict[str, Any] = {}
    if "model" in analyses:
        from fedgen.study.learn import run_risk_model

        with ctx.timed("model"):
            trained = run_risk_model(ctx, stage, info, aln, counts, raw)
        results["files"] += trained["files"]
        extra["model"] = trained["summary"]
    return results, extra


def run_association_step(
    ctx: StudyContext,
    aln: Alignment,
    counts: np.ndarray,
    qc_pass: np.ndarray,
    info: dict[str, Reply],
    stage: Path,
    *,
    pca: dict[str, Any] | None = None,
    allele_counts: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Association tests (if the plan asks for them), plots, λGC and the top hits."""
    from fedgen.results.plots import lambda_gc, manhattan_qq
    from fedgen.study.gwas import run_association

    res = run_association(ctx, aln, counts, qc_pass, info, stage, pca=pca, allele_counts=allele_counts)
    summary: dict[str, Any] = {}
    rows = res.get("rows")
    for pheno, r in res["association"].items():
        entry = {k: v for k, v in r.items() if k not in ("mlog10p", "mlog10p_without_pcs")}
        if "mlog10p_without_pcs" in r:
            entry["lambda_gc_without_pcs"] = round(lambda_gc(mlog10p=r["mlog10p_without_pcs"]), 4)
        if "mlog10p" in r:
            m = np.asarray(r["mlog10p"], dtype=float)
            entry["lambda_gc"] = round(lambda_gc(mlog10p=m), 4)
            entry["tested"] = int(np.isfinite(m).sum())
            order = np.argsort(np.where(np.isfinite(m), -m, np.inf), kind="stable")[:10]
            entry["top_hits"] = [
                {"chrom": str(aln.chrom[rows[i]]), "pos": int(aln.pos[rows[i]]), "id": str(aln.ids[rows[i]]),
                 "p": float(10.0 ** -m[i]), "log10p": round(float(-m[i]), 4)}
                for i in order if np.isfinite(m[i])
            ]
            with ctx.timed("plots"):
                plots = manhattan_qq(aln.chrom[rows], aln.pos[rows], mlog10p=m, title=pheno, out_prefix=stage / "plots" / pheno)
            res["files"] += [f"plots/{q.name}" for q in plots]
            top = entry["top_hits"][:5]
            if "lambda_gc_without_pcs" in entry:
                log.info("%s: λGC %.3f without PCs, %.3f with %d PCs", pheno, entry["lambda_gc_without_pcs"],
                         entry["lambda_gc"], int(ctx.plan.get("pcs") or 0))
            log.info(
                "%s (%s): λGC = %.3f; top hits: %s", pheno, r["kind"], entry["lambda_gc"],
                ", ".join(f"{h['id'] if h['id'] != '.' else h['chrom'] + ':' + str(h['pos'])} (P={p_text(-h['log10p'])})" for h in top),
            )
        summary[pheno] = entry
    if res.get("rows") is not None and ctx.plan.get("sumstats", True):
        with ctx.timed("sumstats"):
            res["files"] += _write_sumstats(ctx, aln, counts, info, stage, res, summary, allele_counts=allele_counts)
    return {"files": res["files"], **({"phenotypes": summary} if summary else {}), "_raw": res}


def genome_build(info: dict[str, Reply]) -> str | None:
    """The sites' genome build, as each declares it (node config ``build``) or as its VCF
    header's contig lengths show (None if unknown)."""
    from fedgen.stats import pca as pcastats

    builds = {rep.meta.get("build") or pcastats.detect_genome_build(rep.meta.get("contigs") or {}) for rep in info.values()}
    return builds.pop() if len(builds) == 1 and None not in builds else None


def _write_sumstats(ctx: StudyContext, aln: Alignment, counts: np.ndarray, info: dict[str, Reply], stage: Path,
                    res: dict[str, Any], summary: dict[str, Any],
                    allele_counts: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
    """GWAS-SSF files (fedgen.results.sumstats) for every regression table of the study.

    ``allele_counts`` (ALT alleles, allele observations per variant, as ``freq.afreq`` counts
    them: haploid males on chrX, males only on chrY) gives the effect allele frequency; without
    it every variant is counted diploid."""
    from fedgen.results.sumstats import write_gwas_ssf

    rows, a1_ref = np.asarray(res["rows"]), np.asarray(res["a1_ref"], dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        if allele_counts is not None:
            alt = np.asarray(allele_counts[0], dtype=np.float64)[rows] / np.asarray(allele_counts[1], dtype=np.float64)[rows]
        else:
            c = np.asarray(counts, dtype=np.float64)[rows]
            alt = (c[:, 1] + 2.0 * c[:, 2]) / (2.0 * c[:, :3].sum(1))
    a1_freq = np.where(a1_ref, 1.0 - alt, alt)
    build = genome_build(info)
    files: list[str] = []
    for pheno, r in res["association"].items():
        name = r.get("file")
        if not name:
            continue
        written = write_gwas_ssf(stage / name, stage / "sumstats", phenotype=pheno, a1_freq=a1_freq, build=build,
                                 trait_kind=r.get("kind", ""), fedgen_version=fedgen.__version__,
                                 covariates=r.get("covariates"))
        files += [f"sumstats/{p.name}" for p in written]
        summary.setdefault(pheno, {})["sumstats"] = f"sumstats/{written[0].name}"
    return files



def autosomal(aln: Alignment) -> np.ndarray:
    """Study variants on autosomes 1-22 (PCA and risk models use only these)."""
    from fedgen.cohort.contigs import autosome_number

    return np.asarray([autosome_number(c) > 0 for c in aln.chrom.tolist()], dtype=bool)


def sex_split_counts(ctx: StudyContext, aln: Alignment) -> tuple[np.ndarray, np.ndarray] | None:
    """Contig class per study variant (``A``, ``X``, ``Y``, ``MT``) and, for the chrX/chrY/MT
    variants, genotype counts per sex group summed over sites, (variants, 3, 4); None when the
    study has no such variant."""
    from fedgen.cohort.sex import contig_class

    cls = np.asarray([contig_class(c) for c in aln.chrom.tolist()], dtype=object)
    rows = np.flatnonzero(cls != "A")
    if len(rows) == 0:
        return None
    with ctx.timed("sex_genotype_counts"):
        part = blockwise_sum(ctx, "sex_genotype_counts", aln, key="counts", rows=rows, label="genotype counts by sex")
    sc = np.zeros((len(aln), 3, 4), dtype=np.int64)
    sc[rows] = part
    return cls.astype(str), sc


def check_dosage_sites(info: dict[str, Reply]) -> None:
    """``study.dosage``: every site must hold imputed dosages (its site_info counts say so)."""
    from fedgen.errors import ConfigError

    lacking = sorted(s for s, r in info.items() if not (r.meta.get("counts") or {}).get("dosage_store"))
    if lacking:
        raise ConfigError(f"study.dosage: site(s) {', '.join(lacking)} hold no imputed dosages (FORMAT DS or GP in "
                          "a VCF/BCF, or dosages in a .pgen); run the study without study.dosage")


def dosage_alt_freq(dosage_sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``--freq`` from dosages: ALT frequency and OBS_CT (2 × samples with a dosage)."""
    from fedgen.cohort.dosage import UNIT

    s = np.asarray(dosage_sums, dtype=np.int64)
    obs = 2 * s[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return s[:, 0] / (UNIT * obs.astype(np.float64)), obs


def write_qc_outputs(
    out: Path, aln: Alignment, counts: np.ndarray, *, analyses: list[str], qc: dict[str, Any],
    sex: tuple[np.ndarray, np.ndarray] | None = None,
    hardy: dict[str, np.ndarray] | None = None,
    dosage_sums: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write ``freq.afreq``, ``missing.vmiss``, ``hardy.hardy`` (``hardy.x`` for chrX) and the QC pass list.

    ``sex`` (from :func:`sex_split_counts`) makes chrX/chrY/MT rows count as PLINK 2 counts them.
    ``hardy``: the ``.hardy`` columns to write and filter on instead of the exact test of ``counts``
    (privacy=dp passes its noise-aware test).
    With ``dosage_sums`` (``study.dosage``) frequencies (and the MAF filter) come from the
    dosages, as PLINK 2's ``--freq`` reads them; ``counts`` are of the derived hard calls.
    """
    chrom, ids = aln.chrom.tolist(), aln.ids.tolist()
    ref, alt = aln.ref.tolist(), aln.alt.tolist()
    pos = aln.pos
    # POS after #CHROM, as PLINK 2 writes with --freq cols=+pos, --missing vcols=+pos, --hardy cols=+pos
    written = []
    if hardy is None:
        hardy = qcstats.variant_hardy(counts)
    f, obs = qcstats.variant_alt_freq(counts)
    m, n, fm = qcstats.variant_missing(counts)
    auto = np.ones(len(aln), dtype=bool)
    hwe_p = hardy["P"]
    if sex is not None:
        from fedgen.stats import sexqc

        cls, sc = sex
        auto = cls == "A"
        srows = np.flatnonzero(~auto)
        fs, obss = sexqc.sex_alt_freq(cls[srows], sc[srows])
        ms, ns, fms = sexqc.sex_missing(cls[srows], sc[srows])
        f, obs, m, n, fm = (np.array(a, dtype=np.result_type(a, b)) for a, b in ((f, fs), (obs, obss), (m, ms), (n, ns), (fm, fms)))
        f[srows], obs[srows], m[srows], n[srows], fm[srows] = fs, obss, ms, ns, fms
        xrows = np.flatnonzero(cls == "X")
        hx = sexqc.hardy_x(sc[xrows])
        hwe_p = np.array(hwe_p, dtype=np.float64)
        hwe_p[~auto] = 1.0  # chrY and MT: no HWE test (--hwe keeps them)
        hwe_p[xrows] = hx["P"]
    if dosage_sums is not None:
        f, obs = dosage_alt_freq(dosage_sums)
    if "freq" in analyses:
        write_tsv(out / "freq.afreq", ["#CHROM", "POS", "ID", "REF", "ALT", "ALT_FREQS", "OBS_CT"],
                  [chrom, pos, ids, ref, alt, f, obs])
        written.append("freq.afreq")
    if "missing" in analyses:
        write_tsv(out / "missing.vmiss", ["#CHROM", "POS", "ID", "MISSING_CT", "OBS_CT", "F_MISS"], [chrom, pos, ids, m, n, fm])
        written.append("missing.vmiss")
    if "hardy" in analyses:
        cols = ["HOM_A1_CT", "HET_A1_CT", "TWO_AX_CT", "O(HET_A1)", "E(HET_A1)", "P"]
        a = np.flatnonzero(auto)
        write_tsv(out / "hardy.hardy", ["#CHROM", "POS", "ID", "A1", "AX", *cols],
                  [[x[i] for i in a] for x in (chrom, pos, ids, ref, alt)] + [np.asarray(hardy[c])[a] for c in cols])
        written.append("hardy.hardy")
        if sex is not None and len(xrows):
            from fedgen.stats.sexqc import HARDY_X_COLS

            write_tsv(out / "hardy.x", ["#CHROM", "POS", "ID", "A1", "AX", *HARDY_X_COLS],
                      [[x[i] for i in xrows] for x in (chrom, pos, ids, ref, alt)] + [hx[c] for c in HARDY_X_COLS])
            written.append("hardy.x")
    filt = qcstats.qc_pass(counts, maf=qc.get("maf"), geno=qc.get("geno"), hwe=qc.get("hwe"), hwe_p=hwe_p,
                           freq=f if (sex is not None or dosage_sums is not None) else None,
                           fmiss=fm if sex is not None else None)
    fails = [k for k in ("fail_geno", "fail_maf", "fail_hwe") if k in filt]
    reason = []
    for i in range(len(aln)):
        r = ",".join(k[5:] for k in fails if filt[k][i])
        reason.append(r or ".")
    write_tsv(
        out / "variants.tsv",
        ["#CHROM", "POS", "ID", "REF", "ALT", "QC_PASS", "QC_FAIL"],
        [chrom, aln.pos, ids, ref, alt, filt["pass"].astype(np.int64), reason],
    )
    written.append("variants.tsv")
    qc_summary = {
        "filters": {k: qc.get(k) for k in ("maf", "geno", "hwe")},
        "variants": len(aln),
        "pass": int(filt["pass"].sum()),
        **{k: int(filt[k].sum()) for k in fails},
    }
    log.info("QC: %d of %d variants pass (%s)", qc_summary["pass"], len(aln),
             ", ".join(f"{k}: {qc_summary[k]}" for k in fails) or "no filters")
    out_ = {"files": written, "qc": qc_summary, "qc_pass": filt["pass"]}
    if sex is not None:  # ALT count and allele observations as PLINK 2 counts them (A1 choice of --glm)
        out_["allele_counts"] = (np.where(np.isnan(f), 0.0, f * obs), obs.astype(np.float64))
    if dosage_sums is not None:  # dosage sums in 1/16384 units (exact): A1 and the pooled frequency
        from fedgen.cohort.dosage import UNIT

        d = np.asarray(dosage_sums, dtype=np.int64)
        out_["allele_counts"] = (d[:, 0].astype(np.float64), (2 * UNIT * d[:, 1]).astype(np.float64))
    return out_


def _privacy_spent(plan: dict[str, Any], ctx: StudyContext) -> dict[str, dict[str, Any]]:
    """Per site: ε/δ this study spent there (its releases composed) and each release's noise."""
    by_site: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, float]] = set()
    for r in ctx.privacy_releases:
        # a site answers a request it already released (same study, same bytes: e.g. asked again
        # after another site dropped out) with the kept payload, uncharged: its meta, and so the
        # ledger total after the release, is the original's; count that release once
        after = r.get("site_epsilon_spent")
        if after is not None:
            if (r["site"], float(after)) in seen:
                continue
            seen.add((r["site"], float(after)))
        by_site.setdefault(r["site"], []).append(r)
    if not by_site:
        return {}
    from fedgen.privacy.accounting import compose_epsilon

    delta = float((plan.get("privacy") or {}).get("delta") or 1e-6)
    out = {}
    for site, rels in by_site.items():
        events = [e for r in rels for e in r.get("events", [])]
        out[site] = {
            "epsilon": compose_epsilon(events, delta),
            "delta": delta,
            "releases": [
                {"analysis": r["analysis"], "epsilon": r.get("epsilon"), "events": r.get("events"),
                 "site_epsilon_spent_after": r.get("site_epsilon_spent")}
                for r in rels
            ],
        }
    return out


def build_manifest(
    plan: dict[str, Any], ctx: StudyContext, info: dict[str, Reply], aln: Alignment, results: dict[str, Any], t_start: float
) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"fedgen": fedgen.__version__, "python": platform.python_version()}
    for pkg in ("flwr", "numpy", "scipy", "pysam", "hydra-core"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    spent = _privacy_spent(plan, ctx)
    sites = {}
    for s, rep in info.items():
        sites[s] = {
            "fedgen_version": rep.meta.get("version"),
            "genome_build": rep.meta.get("build"),
            "vcf": rep.meta.get("vcf"),
            "samples_file": rep.meta.get("samples_file"),
            **rep.meta["counts"],
            "harmonisation": aln.report.get(s, {}),
            "bytes_sent": ctx.bytes_sent.get(s, 0),
            "messages": ctx.messages.get(s, 0),
            "epsilon_spent": spent.get(s, {}).get("epsilon", 0.0),
            "delta_spent": spent.get(s, {}).get("delta", 0.0),
            **({"privacy_releases": spent[s]["releases"]} if s in spent else {}),
        }
    return {
        "fedgen_manifest": 1,
        "study_id": plan.get("study_id") or uuid.uuid4().hex,
        "study": plan.get("name", "study"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(time.time() - t_start, 3),
        "federation": plan.get("federation", "unknown"),
        "privacy": plan.get("privacy", {"mode": "none"}),
        "versions": versions,
        "platform": {"system": platform.system(), "machine": platform.machine(), "argv": sys.argv[:1]},
        "config": plan.get("config", {}),
        "sites": sites,
        "samples_total": int(sum(r.meta["counts"]["samples"] for r in info.values())),
        "variants": {"study": len(aln), **{f"qc_{k}": v for k, v in results["qc"].items() if k != "filters"}},
        "qc": results["qc"],
        "association": results.get("association", {}).get("phenotypes", {}),
        "pca": {k: v for k, v in (results.get("pca") or {}).items() if k != "files"} or None,
        "files": results["files"],
        "genome_build": genome_build(info),
        "rounds": ctx.rounds,
        "rounds_per_phase": dict(ctx.phase_rounds),
        "timings": ctx.timings,
        "suppressed_by_sites": dict(ctx.suppressed),
        "notes": ctx.notes + [
            f"{key.split('@')[1]}: {n} rows of {key.split('@')[0]} withheld by the site's disclosure rules (too few "
            "people called, or too few carriers of an allele); pooled values for those rows lack that site"
            for key, n in ctx.suppressed.items()
        ],
    }
