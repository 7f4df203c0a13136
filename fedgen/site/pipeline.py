"""The site pipeline: the one path every request takes before anything leaves the site.

::

    request ─▶ parse (typed SiteRequest; message type, policy, analysis allowed)
            ─▶ validate (the analysis' declaration: parameters, arrays, shapes, size caps,
                         and its data-aware checks: index order, frequencies, rank caps)
            ─▶ disclosure rules (released-sample-set register against differencing;
                                 DP budget reserved in the ledger)
            ─▶ analysis (a pure function of the cohort and the typed request)
            ─▶ egress check (declared outputs only, no samples axis, small cells withheld,
                             aggregate size, metadata size)
            ─▶ audit (hash-chained entry, payload kept) ─▶ reply

It fails closed: an exception anywhere, expected or not, means the request is refused, the
ledger reservation is voided, the refusal is audited and the aggregator gets a reason that
carries no counts or data values. Each disclosure rule is documented, with the attack it stops,
in ``docs/THREAT_MODEL.md``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedgen.errors import FedgenError
from fedgen.site import audit, state_dir_for

log = logging.getLogger("fedgen.site.pipeline")

#: the Flower message type of every fedgen request but model updates
MESSAGE_TYPE = "query.fedgen"
#: the Flower message type of a model update (``@app.train()``); it carries nothing else
TRAIN_MESSAGE_TYPE = "train"
MAX_META_BYTES = 4 << 20
#: analyses that describe the site or test the connection (no per-person aggregate)
NEUTRAL_ANALYSES = frozenset({"ping", "site_info"})


class Refused(FedgenError):
    """The site refused a request (the message says why, without counts or data values)."""


@dataclass(frozen=True)
class SiteRequest:
    """A request as the site received it, parsed and typed."""

    analysis: str
    params: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]
    site: str = ""
    run_id: str = ""
    study_id: str = ""
    message_type: str = MESSAGE_TYPE
    fab_hash: str | None = None
    step: str = ""

    def audit_entry(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "run_id": self.run_id,
            "study_id": self.study_id,
            "message_type": self.message_type,
            "analysis": self.analysis or None,
            "step": self.step,
            "fab_hash": self.fab_hash,
        }


def _step(params: Mapping[str, Any]) -> str:
    parts = [f"{k}={params[k]}" for k in ("phase", "round", "block", "stage") if k in params and not isinstance(params[k], (dict, list))]
    return " ".join(parts)


def parse(node_config: Mapping[str, Any], analysis: Any, params: Any, arrays: Any, context: Mapping[str, Any] | None) -> SiteRequest:
    """Build the typed request; malformed pieces are refused."""
    context = dict(context or {})
    if not isinstance(params, dict):
        raise Refused("malformed request: parameters must be a mapping")
    if not isinstance(arrays, dict) or not all(isinstance(k, str) for k in arrays):
        raise Refused("malformed request: arrays must be named")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if any(a.dtype.hasobject for a in arrays.values()):
        raise Refused("malformed request: object arrays are not accepted")
    return SiteRequest(
        analysis=str(analysis or ""),
        params=params,
        arrays=arrays,
        site=str(node_config.get("site", "")),
        run_id=str(context.get("run_id", "")),
        study_id=str(context.get("study_id") or params.get("study_id") or ""),
        message_type=str(context.get("message_type", MESSAGE_TYPE)),
        fab_hash=context.get("fab_hash"),
        step=_step(params),
    )


def _keep_payloads(node_config: Mapping[str, Any]) -> bool:
    v = node_config.get("audit_payloads", True)
    return str(v).strip().lower() not in ("0", "false", "no", "off")


def _state(node_config: Mapping[str, Any]) -> Path | None:
    try:
        return state_dir_for(node_config)
    except ValueError:
        return None


def _audit_refusal(state: Path | None, entry: dict[str, Any], reason: str, arrays: Mapping[str, np.ndarray] | None) -> None:
    log.warning("refused %s: %s", entry.get("analysis") or entry.get("message_type"), reason)
    if state is None:
        return
    rec = {**entry, "decision": "refused", "reason": reason, "arrays": [], "bytes": 0, "sha256": None, "epsilon": 0.0, "delta": 0.0}
    if arrays:
        rec["request_arrays"] = audit.describe_arrays(arrays)
    try:
        audit.append(state, rec)
    except Exception:  # noqa: BLE001 - the refusal stands even if the log cannot be written
        log.exception("could not write the audit entry of a refusal")


def refuse_message(node_config: Mapping[str, Any], context: Mapping[str, Any], reason: str) -> str:
    """Audit the refusal of a message that never reached the pipeline (e.g. a foreign message type)."""
    entry = SiteRequest(
        analysis="", params={}, arrays={}, site=str(node_config.get("site", "")), run_id=str(context.get("run_id", "")),
        study_id=str(context.get("study_id") or ""), message_type=str(context.get("message_type", "")),
        fab_hash=context.get("fab_hash"),
    ).audit_entry()
    _audit_refusal(_state(node_config), entry, reason, None)
    return reason


def dp_only(policy: Mapping[str, Any]) -> bool:
    """A policy that allows differentially private releases only (besides ping/site_info)."""
    allowed = set(policy.get("allowed_analyses") or ())
    rest = allowed - NEUTRAL_ANALYSES
    return bool(rest) and all(a.startswith("dp_") for a in rest)


@dataclass
class _Run:
    """Mutable state of one request on its way through the pipeline (for clean-up on refusal)."""

    ledger: Any = None
    reservations: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    last_reservation: Any = None
    #: digest of a DP request (study, analysis, params, arrays, site, cohort version)
    request_key: str | None = None
    #: SHA-256 of the earlier payload this request is answered with (a replayed DP release)
    replay_of: str | None = None
    #: why an earlier release of the same request could not be replayed (answered afresh, charged)
    replay_note: str | None = None
    #: reservations committed as soon as made (a noisy count, kept once drawn): never voided
    kept: list[int] = field(default_factory=list)


def handle(
    node_config: Mapping[str, Any],
    analysis: str,
    params: dict[str, Any],
    arrays: dict[str, np.ndarray],
    *,
    context: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run one request through the pipeline. Returns (arrays, meta) or raises :class:`Refused`."""
    node_config = dict(node_config)
    state = _state(node_config)
    run = _Run()
    entry: dict[str, Any] = {"site": str(node_config.get("site", "")), "analysis": str(analysis or "") or None}
    req_arrays = arrays if isinstance(arrays, dict) else None
    try:
        req = parse(node_config, analysis, params, arrays, context)
        entry = req.audit_entry()
        out, meta, policy, contributors = _process(node_config, req, state, run)
        return _release(node_config, req, state, run, out, meta, policy, contributors)
    except BaseException as exc:
        for rid in run.reservations:
            if rid in run.kept:  # drawn and kept at the site: charged even if this reply is refused
                continue
            try:
                run.ledger.void(rid, f"nothing released: {type(exc).__name__}")
            except Exception:  # noqa: BLE001 - a reservation that cannot be voided stays counted (safe side)
                log.exception("could not void ledger reservation %s", rid)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: stop, but refuse first
            _audit_refusal(state, entry, f"interrupted ({type(exc).__name__})", req_arrays)
            raise
        if isinstance(exc, FedgenError):
            reason = str(exc)
        else:
            log.exception("internal error while answering %s", entry.get("analysis"))
            reason = f"{entry.get('analysis') or 'request'}: internal error at the site ({type(exc).__name__}); nothing was sent"
        _audit_refusal(state, entry, reason, req_arrays)
        raise Refused(reason) from None


def _process(node_config: dict[str, Any], req: SiteRequest, state: Path | None, run: _Run):
    from fedgen.analyses import REGISTRY, SPECS, _load_builtin
    from fedgen.analyses.spec import MAX_REPLY_ELEMENTS, AnalysisRequest, SpecError, bind_inputs, check_outputs, expected_elements
    from fedgen.node.policy import load_policy

    _load_builtin()
    # ---------------------------------------------------------------- parse
    if req.message_type not in (MESSAGE_TYPE, TRAIN_MESSAGE_TYPE):
        raise Refused(f"message type {req.message_type!r} is not one this site answers (only {MESSAGE_TYPE!r}, "
                      f"and {TRAIN_MESSAGE_TYPE!r} for a model update)")
    try:
        policy = load_policy(node_config.get("policy"))
    except ValueError as exc:
        raise Refused(f"the site's policy is not usable, so it answers nothing: {exc}") from None
    analysis = req.analysis
    if analysis not in REGISTRY:
        raise Refused(f"unknown analysis {analysis!r}: not in this site's installed fedgen")
    spec = SPECS[analysis]
    if spec.train_message != (req.message_type == TRAIN_MESSAGE_TYPE):
        raise Refused(f"message type {req.message_type!r} is not one this site answers for {analysis!r} "
                      f"(a model update travels as a {TRAIN_MESSAGE_TYPE!r} message, and nothing else does)")
    if analysis not in policy["allowed_analyses"]:
        extra = " (it releases individual samples' values)" if spec.sample_level else (
            f" (opt-in: {spec.opt_in_reason})" if spec.opt_in_reason else "")
        raise Refused(f"analysis {analysis!r} is not allowed by the site's policy{extra}")
    # ---------------------------------------------------------------- validate
    try:
        dims = bind_inputs(spec, req.params, req.arrays, node_config)
    except SpecError as exc:
        raise Refused(f"{analysis}: request does not match the analysis' declaration: {exc}") from None
    if expected_elements(spec, dims) > MAX_REPLY_ELEMENTS:
        raise Refused(f"{analysis}: the reply this request asks for would be larger than the site's limit")
    if dims.get("v", 0) > int(policy["max_variants_per_request"]):
        raise Refused(f"{analysis}: the request covers more variants than the site's policy allows per request")
    cohort = None
    if spec.needs_cohort:
        from fedgen.cohort.cohort import load_cohort

        cohort = load_cohort(node_config)
    rules = _rules(node_config, policy, state, req, run)
    areq = AnalysisRequest(analysis=analysis, params=req.params, arrays=req.arrays, rules=rules, study_id=req.study_id)
    if spec.validate is not None:
        spec.validate(cohort, areq)
    if spec.dp_cost is not None and state is not None and req.study_id:
        # the same DP request of the same study (an aggregator that resumed after a crash) gets
        # the payload this site already released, uncharged: a fresh noisy answer would be a
        # second release. Only after the policy and validation checks above.
        hit = _earlier_release(state, req, cohort, run)
        if hit is not None:
            out, meta = hit
            return out, meta, policy, None
    # ---------------------------------------------------------------- disclosure rules
    # (the sample-set register is consulted and written at egress, once the reply is final:
    # a refused request leaves no set behind)
    if spec.rank is not None and cohort is not None:
        _charge_rank(cohort, areq, spec, policy, state)
    attrs: list[tuple[str, np.ndarray]] = []
    if spec.attributes is not None and cohort is not None:
        attrs = spec.attributes(cohort, areq)
        structures = _cell_structures(cohort, areq, spec, attrs, state)
        if structures:
            areq = AnalysisRequest(analysis=analysis, params=req.params, arrays=req.arrays, study_id=req.study_id,
                                   rules=_replace(areq.rules, cell_structures=tuple(structures)))
    if spec.dp_cost is not None:
        try:
            events = spec.dp_cost(req.params, dims, node_config)
        except (FedgenError, ValueError, KeyError, TypeError) as exc:
            raise Refused(f"{analysis}: bad privacy parameters: {exc}") from None
        run.events = list(events)
        if spec.dp_plan is not None:
            try:
                plan = spec.dp_plan(req.params, dims, node_config)
            except (FedgenError, ValueError, KeyError, TypeError) as exc:
                raise Refused(f"{analysis}: bad privacy parameters: {exc}") from None
            if not _ledger(run, policy, state, analysis).would_fit(plan):
                raise Refused(f"{analysis}: the site's remaining privacy budget is too small for the planned rounds; "
                              "nothing was computed")
        _reserve(run, node_config, policy, state, req, events)
        areq = AnalysisRequest(
            analysis=analysis, params=req.params, arrays=req.arrays, study_id=req.study_id,
            rules=_replace(rules, events=tuple(events)),
        )
    # ---------------------------------------------------------------- analysis
    out, meta = REGISTRY[analysis](cohort, areq)
    # ---------------------------------------------------------------- egress check
    out = {k: np.asarray(v) for k, v in out.items()}
    private = {k: out.pop(k) for k in list(out) if k.startswith("_")}  # site-only companions never leave
    meta = dict(meta)
    n_samples = int(cohort.n_samples) if cohort is not None else None
    try:
        check_outputs(spec, out, meta, dims, n_samples=n_samples)
    except SpecError as exc:
        raise Refused(f"{analysis}: reply does not match the analysis' declaration: {exc}") from None
    if spec.suppress is not None and out:
        full, mask = spec.suppress({**out, **private}, areq.rules, int(n_samples or 0))
        out = {k: v for k, v in full.items() if not k.startswith("_")}
        if mask is not None:
            if "withheld" in spec.outputs:
                out["withheld"] = np.asarray(mask, dtype=np.uint8)
            if mask.any():
                meta["suppressed"] = int(mask.sum())
    contributors = spec.contributors(meta) if spec.contributors is not None else None
    if contributors is not None and 0 < contributors < int(policy["min_count"]) and not _by_design(analysis, meta):
        raise Refused(f"{analysis}: the aggregate would rest on fewer samples than the site's min_count")
    if contributors == 0 and not _by_design(analysis, meta) and analysis not in NEUTRAL_ANALYSES:
        raise Refused(f"{analysis}: the aggregate would rest on no samples at this site")
    if len(json.dumps(meta, default=str)) > MAX_META_BYTES:
        raise Refused(f"{analysis}: reply metadata exceeds the site's limit")
    if spec.sample_sets is not None and cohort is not None:
        _admit_sample_sets(cohort, areq, spec, policy, state, attrs=[a for a, _ in attrs])
    if cohort is not None:
        _reveal(cohort, areq, private, policy, state)
    return out, meta, policy, contributors


def _by_design(analysis: str, meta: Mapping[str, Any]) -> bool:
    """A case/control aggregate at a site that holds only cases (or only controls) by design.

    An empty cell is nobody: the site's other group still has to clear min_count.
    """
    if "n_cases" in meta and "n_controls" in meta:
        cells = [int(meta["n_cases"]), int(meta["n_controls"])]
        return 0 in cells and max(cells) > 0
    return False


def _replace(rules, **kw):
    from dataclasses import replace

    return replace(rules, **kw)


def _rules(node_config: Mapping[str, Any], policy: Mapping[str, Any], state: Path | None, req: SiteRequest, run: _Run):
    from fedgen.analyses.spec import Rules

    public = {k: policy[k] for k in ("allowed_analyses", "min_count", "min_cell", "max_variants_per_request",
                                      "allow_per_variant_sample_sets", "delta")}
    is_dp_only = dp_only(policy)
    noisy = None
    if is_dp_only:
        noisy = _NoisyCounts(node_config, policy, state, req, run)
    return Rules(
        site=req.site,
        min_count=int(policy["min_count"]),
        min_cell=int(policy["min_cell"]),
        allow_per_variant_sample_sets=bool(policy["allow_per_variant_sample_sets"]),
        allowed_columns=tuple(policy.get("allowed_columns") or ()),
        state_dir=state,
        public_policy=public,
        dp_only=is_dp_only,
        noisy_counts=noisy,
        pca_rank_per_study=float(policy["pca_rank_per_study"]),
        pca_rank_lifetime=float(policy["pca_rank_lifetime"]),
        ld_max_window_bp=int(policy["ld_max_window_bp"]),
        declared_build=str(node_config.get("build") or "").strip() or None,
    )


def cohort_member_hashes(cohort) -> np.ndarray:
    """64-bit hashes of the cohort's analysed samples' IDs, aligned with its sample order.

    Kept on the cohort object itself (a persistent site worker answers many requests; a cache
    keyed by ``id()`` could hand a reloaded cohort another cohort's hashes)."""
    from fedgen.site.register import hash_ids

    hit = cohort.__dict__.get("_member_hashes")
    if hit is None or len(hit) != cohort.n_samples:
        hit = hash_ids([cohort.vcf_samples[j] for j in cohort.sample_cols.tolist()])
        cohort.__dict__["_member_hashes"] = hit
    return hit


def _cell_structures(cohort, areq, spec, attrs, state: Path | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each support of the values this request sums with genotypes (everyone; the cases; a
    level's members): the atoms that every set earlier released with genotype-weighted values and
    this one cut it into (see ``isolable_small_cells``)."""
    from fedgen.site.register import REGISTER_FILE, SampleSetRegister

    if state is None or not (Path(state) / REGISTER_FILE).exists():
        return []
    masks = spec.sample_sets(cohort, areq)
    if not masks:
        return []
    own = np.asarray(masks[0], dtype=bool)
    hashes = cohort_member_hashes(cohort)
    with SampleSetRegister(state) as reg:
        released = reg.sets_with_attrs()
    out: list[tuple[np.ndarray, np.ndarray]] = []
    seen: set[bytes] = set()
    # every set some genotype-weighted values were released over, whatever the column's name or
    # role: the same values can be summed as a phenotype, a covariate, a level or an alias column
    others = [np.isin(hashes, members) for members, names in released if "#gx" in names]
    supports = {np.packbits(s).tobytes(): s for _, s in attrs}
    for support in supports.values():
        vectors = [m & support for m in others if not np.array_equal(m, own)]
        if not vectors:
            continue  # only this set carries genotype-weighted values: the plain cell rule covers it
        V = np.vstack([*vectors, own & support])
        key = np.packbits(V).tobytes()
        if key in seen:
            continue
        seen.add(key)
        inside = V.any(axis=0)
        sig, labels = np.unique(V[:, inside].T, axis=0, return_inverse=True)
        lab = np.full(V.shape[1], -1, dtype=np.int64)
        lab[inside] = labels.ravel()
        out.append((lab, sig.T.astype(np.uint8)))
    return out


def _admit_sample_sets(cohort, areq, spec, policy: Mapping[str, Any], state: Path | None, *, attrs: list[str] = ()) -> None:
    """Released-sample-set register (route: differencing aggregates over nearly equal sets)."""
    from fedgen.site.register import SampleSetRegister

    masks = spec.sample_sets(cohort, areq)
    if not masks:
        return
    if state is None:
        raise Refused(f"{areq.analysis}: the site has no state folder for its sample-set register")
    hashes = cohort_member_hashes(cohort)
    with SampleSetRegister(state) as reg:
        for k, mask in enumerate(masks):
            mask = np.asarray(mask, dtype=bool)
            if not mask.any():
                continue
            reg.admit(
                hashes[mask], min_count=int(policy["min_count"]), study_id=areq.study_id or "-", analysis=areq.analysis,
                max_per_study=int(policy["max_sample_sets_per_study"]), attrs=list(attrs) if k == 0 else [],
                families=_families(spec, areq, k, attrs),
            )


def _families(spec, areq, k: int, attrs: list[str]) -> list[str]:
    """The kinds of values the k-th set's aggregate sums: genotypes ("g"), genotype-weighted values
    ("gx"), and each samples-table column's values ("x:<column>")."""
    out = [f for f in spec.families if f != "x"]
    if "x" in spec.families:
        if spec.attributes is not None:  # design rows: the phenotype and every covariate column
            out += sorted({"x:" + a.split(":", 1)[1].split("=", 1)[0] for a in attrs if a.startswith(("y:", "x:"))})
            out += ["x:pcs"] if any(a.startswith("pc:") for a in attrs) else []
        else:  # one set per requested column (covariate moments)
            names = list(areq.params.get("names") or [])
            out.append(f"x:{names[k]}" if k < len(names) else "x")
    return out


def _charge_rank(cohort, areq, spec, policy: Mapping[str, Any], state: Path | None) -> None:
    """PCA rank register (route: many or wide bases, crafted frequencies, planted PC covariates)."""
    import hashlib

    from fedgen.site.register import PcaRegister

    if state is None:
        raise Refused(f"{areq.analysis}: the site has no state folder for its PCA register")
    study = areq.study_id or str(areq.params.get("study_id") or "")
    if areq.params.get("study_id") and str(areq.params["study_id"]) != study:
        raise Refused(f"{areq.analysis}: the request names another study than its message")
    if not study:
        raise Refused(f"{areq.analysis}: PCA requests must name their study")
    from fedgen.cohort.pcs import check_study_id

    check_study_id(study)
    cols = int(spec.rank(areq))
    n = int(cohort.n_samples)
    key = hashlib.sha256(np.ascontiguousarray(areq.arrays.get("idx", np.zeros(0)), dtype=np.int64).tobytes()
                         + np.ascontiguousarray(areq.arrays.get("flip", np.zeros(0)), dtype=np.uint8).tobytes()).hexdigest()
    freq = areq.arrays.get("freq")
    with PcaRegister(state) as reg:
        if spec.needs_study_pca and not reg.has_pca(study):
            raise Refused(f"{areq.analysis}: this site answered no PCA for this study, so it computes no PC scores for it")
        if freq is not None:
            reg.bind_freq(study, key, hashlib.sha256(np.ascontiguousarray(freq, dtype=np.float64).tobytes()).hexdigest())
        if cols:
            reg.charge(study, cols, analysis=areq.analysis, per_study_cap=int(float(policy["pca_rank_per_study"]) * n))


def _reveal(cohort, areq, private: Mapping[str, np.ndarray], policy: Mapping[str, Any], state: Path | None) -> None:
    """Lifetime PCA register: the span of every sample-space matrix H the site multiplied its data by."""
    import hashlib

    from fedgen.site.register import PcaRegister

    H = private.get("_H")
    if H is None:
        return
    if state is None:
        raise Refused(f"{areq.analysis}: the site has no state folder for its PCA register")
    key = hashlib.sha256(np.ascontiguousarray(cohort_member_hashes(cohort)).tobytes()).hexdigest()[:16]
    with PcaRegister(state) as reg:
        reg.reveal(state, key, np.asarray(H, dtype=np.float64), analysis=areq.analysis,
                   lifetime_cap=int(float(policy["pca_rank_lifetime"]) * int(cohort.n_samples)))


def _ledger(run: _Run, policy: Mapping[str, Any], state: Path | None, what: str):
    from fedgen.privacy.ledger import LEDGER_FILE, Ledger

    if state is None:
        raise Refused(f"{what}: the site has no state folder for its privacy ledger")
    if run.ledger is None:
        state.mkdir(parents=True, exist_ok=True)
        run.ledger = Ledger(state / LEDGER_FILE, epsilon_budget=float(policy["epsilon_budget"]), delta=float(policy["delta"]))
    return run.ledger


def _reserve(run: _Run, node_config, policy, state, req: SiteRequest, events) -> None:
    from fedgen.privacy.ledger import BudgetExceeded

    ledger = _ledger(run, policy, state, req.analysis)
    try:
        res = ledger.reserve(events, site=req.site, study_id=req.study_id, run_id=req.run_id, analysis=req.analysis, step=req.step)
    except BudgetExceeded as exc:  # ε figures only: they describe the site's budget, not its data
        raise Refused(str(exc)) from None
    run.reservations.append(res.id)
    run.last_reservation = res


class _NoisyCounts:
    """Counts a DP-only site publishes: discrete-Gaussian noised, charged once per cohort version.

    Route closed: exact counts next to DP releases (e.g. site_info or DP replies before and after
    one person joins give that person's phenotype at ε = 0). Each count is drawn once for a given
    version of the site's data and kept in ``<state_dir>/noisy_counts.json``, so asking again
    costs nothing and reveals nothing new; a changed cohort draws (and charges) afresh.
    """

    def __init__(self, node_config, policy, state: Path | None, req: SiteRequest, run: _Run) -> None:
        self.node_config, self.policy, self.state, self.req, self.run = node_config, policy, state, req, run

    def __call__(self, cohort, name: str, value: int) -> int:
        from fedgen.fileio import atomic_write_text
        from fedgen.privacy.mechanisms import NoiseSource, discrete_gaussian

        if self.state is None:
            raise Refused(f"{self.req.analysis}: the site has no state folder for its noisy counts")
        sigma = float(self.policy["dp_count_sigma"])
        path = self.state / "noisy_counts.json"
        version = json.dumps([str(cohort.vcf), cohort.counts, str(cohort.table.path), _fingerprint(cohort)], sort_keys=True, default=str)
        try:
            book = json.loads(path.read_text())
        except (OSError, ValueError):
            book = {}
        if book.get("version") != version:
            book = {"version": version, "sigma": sigma, "counts": {}}
        if name in book["counts"]:
            return int(book["counts"][name])
        event = {"type": "gaussian", "sigma": sigma, "l2": 1.0, "count": 1}
        _reserve(self.run, self.node_config, self.policy, self.state, self.req, [event])
        noisy = int(max(0, value + int(discrete_gaussian(sigma, (1,), NoiseSource())[0])))
        book["counts"][name] = noisy
        self.state.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(book), private=True)
        # the count is kept and will leave with this or a later reply (never charged again): its
        # charge is committed now, not voided if this request is refused further on
        rid = self.run.reservations[-1]
        self.run.ledger.commit(rid)
        self.run.kept.append(rid)
        self.run.events.append(event)
        return noisy


def _fingerprint(cohort) -> str:
    from fedgen.cohort.vcf import file_fingerprint

    try:
        return json.dumps([file_fingerprint(Path(cohort.vcf)), file_fingerprint(Path(cohort.table.path))], default=str)
    except Exception:  # noqa: BLE001
        return ""


_PRUNED: dict[str, float] = {}
EFFECTIVE_POLICY = "policy.effective.json"


def _retention(node_config: Mapping[str, Any], state: Path) -> None:
    """Kept payloads older than ``audit_payload_retention_days`` (node config) are deleted, hourly at most."""
    import time

    days = node_config.get("audit_payload_retention_days")
    if days in (None, "", 0, "0"):
        return
    now = time.time()
    if now - _PRUNED.get(str(state), 0.0) < 3600:
        return
    _PRUNED[str(state)] = now
    audit.prune_payloads(state, older_than_days=float(days))


def _record_policy(node_config: Mapping[str, Any], policy: Mapping[str, Any], state: Path) -> None:
    """Keep the policy the site actually answered under (``fedgen ledger`` reads it back)."""
    from fedgen.fileio import atomic_write_text

    src = node_config.get("policy")
    source = "default policy" if not src else ("inline policy (node configuration)" if str(src).lstrip().startswith("{") or
                                                isinstance(src, Mapping) else str(src))
    text = json.dumps({"source": source, "policy": dict(policy)}, sort_keys=True, default=str)
    path = state / EFFECTIVE_POLICY
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text, private=True)


def _earlier_release(state: Path, req: SiteRequest, cohort, run: _Run):
    """(arrays, meta) this site sent for the same DP request of the same study, or None.

    The key is a SHA-256 over the canonical encoding of the analysis, params, arrays, study id,
    site and cohort version (:func:`fedgen.federation.transport.request_digest`). The payload is
    the one kept in ``audit-payloads/`` (checked against its hash); without it (``audit_payloads
    = false``, or pruned) the request is answered as a new, charged release and the audit entry
    says why."""
    from fedgen.federation.transport import request_digest

    try:
        run.request_key = request_digest(req.analysis, req.params, req.arrays, req.study_id,
                                         extra={"site": req.site, "cohort": _fingerprint(cohort) if cohort is not None else ""})
    except (TypeError, ValueError):
        return None
    try:
        earlier = next((e for e in audit.read(state) if e.get("decision") == "sent" and e.get("sha256")
                        and e.get("request_sha256") == run.request_key and e.get("study_id") == req.study_id
                        and e.get("analysis") == req.analysis), None)
    except (OSError, ValueError):
        earlier = None
    if earlier is None:
        return None
    digest = str(earlier["sha256"])
    stored = state / audit.PAYLOAD_DIR / f"{digest}.npz"
    try:
        arrays, meta = audit.load_payload(stored)
        if audit.payload_digest(arrays, meta)[0] != digest:
            raise ValueError("hash differs")
    except (OSError, ValueError, KeyError) as exc:
        reason = "not kept" if isinstance(exc, FileNotFoundError) else f"unusable ({exc})"
        run.replay_note = (f"this request was answered before (payload {digest}) but that payload is {reason} "
                           "(audit_payloads = false, or pruned): answered as a new release, charged")
        log.warning("%s: %s", req.analysis, run.replay_note)
        return None
    run.replay_of = digest
    log.info("%s: same request as release %s of study %s; its payload sent again, not charged", req.analysis,
             digest[:12], req.study_id)
    return arrays, meta


def _release(node_config, req: SiteRequest, state, run: _Run, out, meta, policy, contributors):
    from fedgen.privacy.accounting import compose_epsilon

    if run.replay_of is not None:
        digest, nbytes = audit.payload_digest(out, meta)
        if state is not None:
            audit.append(state, {
                **req.audit_entry(), "decision": "sent", "reason": None, "arrays": audit.describe_arrays(out),
                "bytes": nbytes, "sha256": digest, "epsilon": 0.0, "delta": 0.0, "events": None,
                "contributors": None, "request_sha256": run.request_key, "replay_of": run.replay_of,
                "note": "replay: the same request of the same study was answered before; that payload was sent "
                        "again and not charged (no new noise)",
            })
        return out, meta
    events = run.events
    eps_release = compose_epsilon(events, float(policy["delta"])) if events else 0.0
    if events and run.reservations:
        res = run.last_reservation
        meta["privacy"] = {
            "events": events,
            "epsilon": eps_release,
            "delta": float(policy["delta"]),
            "site_epsilon_spent": float(res.epsilon_after) if res is not None else None,
            "site_epsilon_budget": float(policy["epsilon_budget"]),
        }
    digest, nbytes = audit.payload_digest(out, meta)
    if state is not None:
        if _keep_payloads(node_config):
            audit.keep_payload(state, digest, out, meta)
            _retention(node_config, state)
        _record_policy(node_config, policy, state)
        audit.append(
            state,
            {
                **req.audit_entry(),
                "decision": "sent",
                "reason": None,
                "arrays": audit.describe_arrays(out),
                "bytes": nbytes,
                "sha256": digest,
                "epsilon": eps_release,
                "delta": float(policy["delta"]) if events else 0.0,
                "events": events or None,
                "contributors": contributors,
                **({"request_sha256": run.request_key} if run.request_key and events else {}),
                **({"replay_unavailable": run.replay_note} if run.replay_note else {}),
            },
        )
    for rid in run.reservations:
        run.ledger.commit(rid)
    run.reservations = []
    return out, meta

