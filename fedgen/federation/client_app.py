"""Site side of fedgen on Flower: request → site pipeline (validate, disclosure rules, analysis, egress check, audit) → reply.

Loaded by each SuperNode from the site's INSTALLED fedgen (the FAB carries no code; see
:mod:`fedgen.federation.superexec`). The site's settings come only from ``context.node_config``
(set by the site with ``flower-supernode --node-config``); a request cannot change them.

Every message passes through :mod:`fedgen.site.pipeline`: a message of any type other than
``query.fedgen`` is refused and logged before Flower's dispatch; a fedgen query is checked
against the site policy and the analysis' declaration, and its reply is audited.
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
    """A ClientApp that answers fedgen queries only; anything else is refused and audited."""

    def __call__(self, message: Message, context: Context) -> Message:
        from fedgen.site.pipeline import MESSAGE_TYPE, refuse_message

        mtype = str(message.metadata.message_type)
        if mtype != MESSAGE_TYPE:
            reason = refuse_message(
                dict(context.node_config), _context(message, context),
                f"message type {mtype!r} is not one this fedgen site answers (only {MESSAGE_TYPE!r})",
            )
            return Message(error_reply(f"site refused: {reason}"), reply_to=message)
        return super().__call__(message, context)


app = SiteClientApp()


def _handle_batch(msg: Message, context: Context, node_config: dict, t0: float, t_wall: float):
    """Each request of a batch takes its own pass through the site pipeline, in order; a refused
    one is answered with its error and does not stop the others."""
    from fedgen.analyses import execute

    try:
        requests = decode_batch(msg.content)
    except FedgenError as exc:
        from fedgen.site.pipeline import refuse_message

        return error_reply(refuse_message(node_config, _context(msg, context), f"malformed request: {exc}"))
    replies = []
    for analysis, params, arrays, study_id in requests:
        t1 = time.perf_counter()
        try:
            out_arrays, meta = execute(node_config, analysis, params, arrays,
                                       context={**_context(msg, context), "study_id": study_id})
            meta = {**meta, "site_seconds": round(time.perf_counter() - t1, 4), "site_t0": round(t_wall, 4)}
            replies.append((out_arrays, meta))
        except FedgenError as exc:
            log.warning("refused request: %s", exc)
            replies.append(({}, {"error": str(exc)}))
        except Exception as exc:  # noqa: BLE001 - any failure must reach the aggregator as a reply
            log.exception("internal error while answering a request")
            replies.append(({}, {"error": f"internal error at site: {type(exc).__name__}: {exc}"}))
    log.info("answered %s in %.2f s", "+".join(a for a, *_ in requests), time.perf_counter() - t0)
    return encode_batch_reply(replies)


@app.query("fedgen")
def handle(msg: Message, context: Context) -> Message:
    """Answer one fedgen request; refusals and failures become ``{"error": ...}`` replies."""
    from fedgen.analyses import execute

    node_config = dict(context.node_config)
    t0 = time.perf_counter()
    t_wall = time.time()
    if is_batch(msg.content):
        return Message(_handle_batch(msg, context, node_config, t0, t_wall), reply_to=msg)
    try:
        try:
            analysis, params, arrays = decode_request(msg.content)
        except FedgenError as exc:
            from fedgen.site.pipeline import refuse_message

            raise FedgenError(refuse_message(node_config, _context(msg, context), f"malformed request: {exc}")) from None
        ctx = {**_context(msg, context), "study_id": request_study_id(msg.content)}
        out_arrays, meta = execute(node_config, analysis, params, arrays, context=ctx)
        meta = {**meta, "site_seconds": round(time.perf_counter() - t0, 4), "site_t0": round(t_wall, 4)}
        content = encode_reply(out_arrays, meta)
        log.info("answered %s in %.2f s", analysis, meta["site_seconds"])
    except FedgenError as exc:
        log.warning("refused request: %s", exc)
        content = error_reply(str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure must reach the aggregator as a reply
        log.exception("internal error while answering a request")
        content = error_reply(f"internal error at site: {type(exc).__name__}: {exc}")
    return Message(content, reply_to=msg)
