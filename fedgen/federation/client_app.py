"""Site side of fedgen on Flower: request → site pipeline (validate, disclosure rules, analysis, egress check, audit) → reply.

Loaded by each SuperNode from the site's INSTALLED fedgen (the FAB carries no code; see
:mod:`fedgen.federation.superexec`). The site's settings come only from ``context.node_config``
(set by the site with ``flower-supernode --node-config``); a request cannot change them.

Every message passes through :mod:`fedgen.site.pipeline`: a message of any type other than
``query.fedgen`` and ``train`` is refused and logged before Flower's dispatch; a fedgen query is
checked against the site policy and the analysis' declaration, and its reply is audited. A
``train`` message (a risk-model round, :mod:`fedgen.federation.train`) is answered by the
``@app.train()`` handler through the same pipeline, which accepts it only for a model update.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgen.errors import FedgenError
from fedgen.federation.flower import (
    decode_batch,
    decode_request,
    encode_batch_reply,
    encode_reply,
    error_reply,
    is_batch,
    request_study_id,
)

log = logging.getLogger("fedgen.site")


def _context(msg: Message, context: Context) -> dict:
    return {
        "run_id": str(msg.metadata.run_id),
        "message_type": str(msg.metadata.message_type),
        "fab_hash": context.node_config.get("fab_hash") if hasattr(context, "node_config") else None,
    }


class SiteClientApp(ClientApp):
    """A ClientApp that answers fedgen queries and model updates only; anything else is refused and audited."""

    def __call__(self, message: Message, context: Context) -> Message:
        from fedgen.site.pipeline import MESSAGE_TYPE, TRAIN_MESSAGE_TYPE, refuse_message

        mtype = str(message.metadata.message_type)
        if mtype not in (MESSAGE_TYPE, TRAIN_MESSAGE_TYPE):
            reason = refuse_message(
                dict(context.node_config), _context(message, context),
                f"message type {mtype!r} is not one this fedgen site answers (only {MESSAGE_TYPE!r}, "
                f"and {TRAIN_MESSAGE_TYPE!r} for a model update)",
            )
            return Message(error_reply(f"site refused: {reason}"), reply_to=message)
        return super().__call__(message, context)


app = SiteClientApp()


def _answer(node_config: dict, ctx: dict, analysis: str, params: dict, arrays: dict, t_wall: float):
    """One request through the site pipeline: (arrays, meta), or ``({}, {"error": ...})``."""
    from fedgen.analyses import execute

    t1 = time.perf_counter()
    try:
        out_arrays, meta = execute(node_config, analysis, params, arrays, context=ctx)
        return out_arrays, {**meta, "site_seconds": round(time.perf_counter() - t1, 4), "site_t0": round(t_wall, 4)}
    except FedgenError as exc:
        log.warning("refused request: %s", exc)
        return {}, {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any failure must reach the aggregator as a reply
        log.exception("internal error while answering a request")
        return {}, {"error": f"internal error at site: {type(exc).__name__}: {exc}"}


@app.query("fedgen")
def handle(msg: Message, context: Context) -> Message:
    """Answer one fedgen request, or each request of a batch in order (each its own pass through
    the site pipeline; a refused one does not stop the others); refusals and failures become
    ``{"error": ...}`` replies."""
    node_config = dict(context.node_config)
    t0 = time.perf_counter()
    t_wall = time.time()
    batch = is_batch(msg.content)
    try:
        if batch:
            requests = decode_batch(msg.content)
        else:
            analysis, params, arrays = decode_request(msg.content)
            requests = [(analysis, params, arrays, request_study_id(msg.content))]
    except FedgenError as exc:
        from fedgen.site.pipeline import refuse_message

        return Message(error_reply(refuse_message(node_config, _context(msg, context), f"malformed request: {exc}")),
                       reply_to=msg)
    base = _context(msg, context)
    replies = [_answer(node_config, {**base, "study_id": sid}, a, p, arr, t_wall) for a, p, arr, sid in requests]
    log.info("answered %s in %.2f s", "+".join(r[0] for r in requests), time.perf_counter() - t0)
    try:
        content = encode_batch_reply(replies) if batch else encode_reply(*replies[0])
    except Exception as exc:  # noqa: BLE001 - fail closed: nothing half-encoded leaves
        log.exception("could not encode the reply")
        content = error_reply(f"internal error at site: {type(exc).__name__}: {exc}")
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Answer one model update (a Flower ``train`` message, :mod:`fedgen.federation.train`) through
    the site pipeline, which accepts a ``train`` message only for a model-update analysis (DP-SGD
    by default) and charges, checks and audits it like any other egress."""
    from fedgen.federation.train import decode_train_request, encode_train_reply

    node_config = dict(context.node_config)
    t_wall = time.time()
    base = _context(msg, context)
    try:
        analysis, params, arrays, study_id = decode_train_request(msg.content)
    except FedgenError as exc:
        from fedgen.site.pipeline import refuse_message

        return Message(error_reply(refuse_message(node_config, base, f"malformed train message: {exc}")), reply_to=msg)
    out, meta = _answer(node_config, {**base, "study_id": study_id}, analysis, params, arrays, t_wall)
    log.info("answered %s (train message)", analysis)
    try:
        content = encode_train_reply(out, meta)
    except Exception as exc:  # noqa: BLE001 - fail closed: nothing half-encoded leaves
        log.exception("could not encode the reply")
        content = error_reply(f"internal error at site: {type(exc).__name__}: {exc}")
    return Message(content, reply_to=msg)
