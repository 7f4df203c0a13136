"""The egress guard: every reply a site sends passes through :func:`answer`.

For one request it

1. loads the site's policy (``node_config["policy"]``: a path to ``policy.toml``, or an inline
   mapping in local runs; defaults when absent) — the request cannot change it;
2. refuses an unknown message type or analysis, an analysis the policy does not allow, a
   parameter or input array the analysis does not declare, a request over more variants than
   the policy's ``max_variants_per_request``;
3. for a differentially private analysis, reserves the privacy cost (computed here from the
   request's sizes, never taken from the aggregator) in the site's ledger, refusing a request
   that would exceed the site's budget *before* any computation;
4. runs the analysis from the site's installed fedgen;
5. checks the reply against the analysis' declaration (names, dtypes, shapes in request terms,
   no axis as long as the site's sample count, declared metadata only) and that the aggregate
   rests on at least ``min_count`` samples;
6. writes one audit entry (sent / refused / error) with array shapes, bytes, payload SHA-256
   and ε/δ charged, keeps a copy of the payload, and commits the ledger reservation.

Any refusal raises :class:`Refused` (a :class:`~fedgen.errors.FedgenError`) whose message the
site sends to the aggregator, where the run fails naming the site and the reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedgen.errors import FedgenError
from fedgen.site import audit, state_dir_for

log = logging.getLogger("fedgen.site.guard")

#: the only Flower message type a fedgen site answers
MESSAGE_TYPE = "query.fedgen"
MAX_META_BYTES = 4 << 20


class Refused(FedgenError):
    """The site's guard refused a request (the message says why)."""


def _step(params: Mapping[str, Any]) -> str:
    parts = [f"{k}={params[k]}" for k in ("phase", "round", "block", "stage") if k in params and not isinstance(params[k], (dict, list))]
    return " ".join(parts)


def _keep_payloads(node_config: Mapping[str, Any]) -> bool:
    v = node_config.get("audit_payloads", True)
    return str(v).strip().lower() not in ("0", "false", "no", "off")


def _entry(node_config: Mapping[str, Any], context: Mapping[str, Any], analysis: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "site": str(node_config.get("site", "")),
        "run_id": str(context.get("run_id", "")),
        "study_id": str(context.get("study_id") or params.get("study_id") or ""),
        "message_type": str(context.get("message_type", MESSAGE_TYPE)),
        "analysis": analysis,
        "step": _step(params),
        "fab_hash": context.get("fab_hash"),
    }


def _log_refusal(state: Path | None, entry: dict[str, Any], reason: str, request_arrays: Mapping[str, np.ndarray] | None = None) -> None:
    log.warning("refused %s: %s", entry.get("analysis") or entry.get("message_type"), reason)
    if state is None:
        return
    rec = {
        **entry,
        "decision": "refused",
        "reason": reason,
        "arrays": [],
        "bytes": 0,
        "sha256": None,
        "epsilon": 0.0,
        "delta": 0.0,
    }
    if request_arrays:
        rec["request_arrays"] = audit.describe_arrays(request_arrays)
    audit.append(state, rec)


def refuse_message(node_config: Mapping[str, Any], context: Mapping[str, Any], reason: str) -> str:
    """Log the refusal of a message that never reached an analysis (e.g. a foreign message type)."""
    try:
        state = state_dir_for(node_config)
    except ValueError:
        state = None
    _log_refusal(state, _entry(node_config, context, None, {}), reason)
    return reason


def _site_samples(node_config: Mapping[str, Any]) -> int | None:
    try:
        from fedgen.cohort.cohort import load_cohort

        return int(load_cohort(node_config).n_samples)
    except Exception:  # noqa: BLE001 - only used to spot sample-shaped axes
        return None


def answer(
    node_config: Mapping[str, Any],
    analysis: str,
    params: dict[str, Any],
    arrays: dict[str, np.ndarray],
    *,
    context: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run one request through the guard (see the module docstring). Raises :class:`Refused`."""
    from fedgen.analyses import REGISTRY, SPECS, _load_builtin
    from fedgen.analyses.spec import MAX_REPLY_ELEMENTS, SpecError, bind_inputs, check_outputs, expected_elements
    from fedgen.node.policy import load_policy

    _load_builtin()
    context = dict(context or {})
    node_config = dict(node_config)
    entry = _entry(node_config, context, analysis, params)
    try:
        state: Path | None = state_dir_for(node_config)
    except ValueError:
        state = None

    def refuse(reason: str) -> Refused:
        _log_refusal(state, entry, reason, arrays)
        return Refused(reason)

    if context.get("message_type", MESSAGE_TYPE) != MESSAGE_TYPE:
        raise refuse(f"message type {context.get('message_type')!r} is not one this site answers (only {MESSAGE_TYPE!r})")
    try:
        policy = load_policy(node_config.get("policy"))
    except ValueError as exc:
        raise refuse(f"the site's policy is not usable, so it answers nothing: {exc}") from None
    if analysis not in REGISTRY:
        raise refuse(f"unknown analysis {analysis!r}: not in this site's installed fedgen")
    if analysis not in policy["allowed_analyses"]:
        extra = " (it releases individual samples' values)" if SPECS[analysis].sample_level else ""
        raise refuse(f"analysis {analysis!r} is not allowed by the site's policy{extra}")
    spec = SPECS[analysis]
    try:
        dims = bind_inputs(spec, params, arrays, node_config)
    except SpecError as exc:
        raise refuse(f"{analysis}: request does not match the analysis' declaration: {exc}") from None
    if expected_elements(spec, dims) > MAX_REPLY_ELEMENTS:
        raise refuse(f"{analysis}: the reply this request asks for would hold {expected_elements(spec, dims)} numbers (limit {MAX_REPLY_ELEMENTS})")
    if dims.get("v", 0) > int(policy["max_variants_per_request"]):
        raise refuse(
            f"{analysis}: request covers {dims['v']} variants; the site's policy allows at most {policy['max_variants_per_request']} per request"
        )

    reservation = None
    ledger = None
    events: list[dict[str, Any]] = []
    eps_release = 0.0
    if spec.dp_cost is not None:
        from fedgen.privacy.accounting import compose_epsilon
        from fedgen.privacy.ledger import LEDGER_FILE, BudgetExceeded, Ledger

        try:
            events = spec.dp_cost(params, dims, node_config)
        except (FedgenError, ValueError, KeyError, TypeError) as exc:
            raise refuse(f"{analysis}: bad privacy parameters: {exc}") from None
        if state is None:
            raise refuse(f"{analysis}: the site has no state folder for its privacy ledger")
        eps_release = compose_epsilon(events, float(policy["delta"]))
        state.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(state / LEDGER_FILE, epsilon_budget=float(policy["epsilon_budget"]), delta=float(policy["delta"]))
        try:
            reservation = ledger.reserve(
                events, site=entry["site"], study_id=entry["study_id"], run_id=entry["run_id"], analysis=analysis, step=entry["step"]
            )
        except BudgetExceeded as exc:
            raise refuse(str(exc)) from None

    run_config = {**node_config, "_policy": policy, "_events": events}
    try:
        out, meta = REGISTRY[analysis](run_config, params, arrays)
        out = {k: np.asarray(v) for k, v in out.items()}
        private = {k: out.pop(k) for k in list(out) if k.startswith("_")}  # site-only companions
        meta = dict(meta)
        n_samples = _site_samples(node_config) if (set(spec.free) - set(spec.opaque)) or spec.suppress else None
        check_outputs(spec, out, meta, dims, n_samples=n_samples)
        if spec.suppress is not None:  # the analysis' small-cell rule (rows resting on < min_count samples)
            out, n_small = spec.suppress({**out, **private}, int(policy["min_count"]), int(n_samples or 0))
            out = {k: v for k, v in out.items() if not k.startswith("_")}
            if n_small:
                meta["suppressed"] = n_small
        contributors = spec.contributors(meta) if spec.contributors is not None else None
        if contributors is not None and contributors < int(policy["min_count"]):
            raise Refused(
                f"{analysis}: the aggregate would rest on {contributors} samples at this site, fewer than its policy's min_count of {policy['min_count']}"
            )
        meta_json = json.dumps(meta, default=str)
        if len(meta_json) > MAX_META_BYTES:
            raise Refused(f"{analysis}: reply metadata of {len(meta_json)} bytes exceeds {MAX_META_BYTES}")
    except (Refused, SpecError) as exc:
        if reservation is not None:
            ledger.void(reservation.id, f"refused after computation, nothing released: {exc}")
        reason = str(exc) if isinstance(exc, Refused) else f"{analysis}: reply does not match the analysis' declaration: {exc}"
        raise refuse(reason) from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        # malformed request parameters that got past the declaration: refuse without echoing values
        log.warning("%s failed on the request's parameters", analysis, exc_info=exc)
        if reservation is not None:
            ledger.void(reservation.id, f"failed before release: {type(exc).__name__}")
        raise refuse(f"{analysis}: the request's parameters could not be used ({type(exc).__name__}); nothing was computed for it") from None
    except BaseException as exc:
        if reservation is not None:
            ledger.void(reservation.id, f"failed before release: {type(exc).__name__}: {exc}")
        if state is not None and isinstance(exc, Exception):
            audit.append(
                state,
                {**entry, "decision": "error", "reason": f"{type(exc).__name__}: {exc}", "arrays": [], "bytes": 0, "sha256": None,
                 "epsilon": 0.0, "delta": 0.0},
            )
        raise

    if events:
        meta["privacy"] = {
            "events": events,
            "epsilon": eps_release,
            "delta": float(policy["delta"]),
            "site_epsilon_spent": float(reservation.epsilon_after),
            "site_epsilon_budget": float(policy["epsilon_budget"]),
        }
    digest, nbytes = audit.payload_digest(out, meta)
    if state is not None:
        if _keep_payloads(node_config):
            audit.keep_payload(state, digest, out, meta)
        audit.append(
            state,
            {
                **entry,
                "decision": "sent",
                "reason": None,
                "arrays": audit.describe_arrays(out),
                "bytes": nbytes,
                "sha256": digest,
                "epsilon": eps_release,
                "delta": float(policy["delta"]) if events else 0.0,
                "events": events or None,
                "contributors": contributors,
            },
        )
    if reservation is not None:
        ledger.commit(reservation.id)
    return out, meta


def check_columns(node_config: Mapping[str, Any], names: Any) -> None:
    """Refuse samples-table columns outside the policy's ``allowed_columns`` (empty = all)."""
    allowed = (node_config.get("_policy") or {}).get("allowed_columns") or []
    if not allowed:
        return
    bad = sorted({str(n) for n in names} - set(allowed))
    if bad:
        raise FedgenError(f"column(s) {', '.join(map(repr, bad))} are not in the site policy's allowed_columns")


def site_min_count(node_config: Mapping[str, Any]) -> int:
    """The policy's ``min_count`` as handed to an analysis by the guard (1 outside it)."""
    return int((node_config.get("_policy") or {}).get("min_count", 1))
