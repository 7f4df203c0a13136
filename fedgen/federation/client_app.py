"""Site side of fedgen on Flower: request → :func:`fedgen.analyses.execute` → reply.

Loaded by each SuperNode from the site's INSTALLED fedgen (the FAB carries no
code). The site's settings come only from ``context.node_config`` (set by the
site with ``flower-supernode --node-config``); a request cannot change them.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgen.errors import FedgenError
from fedgen.federation.flower import decode_request, encode_reply, error_reply

log = logging.getLogger("fedgen.site")

app = ClientApp()


@app.query("fedgen")
def handle(msg: Message, context: Context) -> Message:
    """Answer one fedgen request; refusals and failures become ``{"error": ...}`` replies."""
    from fedgen.analyses import execute

    node_config = dict(context.node_config)
    t0 = time.perf_counter()
    try:
        analysis, params, arrays = decode_request(msg.content)
        out_arrays, meta = execute(node_config, analysis, params, arrays)
        meta = {**meta, "site_seconds": round(time.perf_counter() - t0, 3)}
        content = encode_reply(out_arrays, meta)
        log.info("answered %s in %.2f s", analysis, meta["site_seconds"])
    except FedgenError as exc:
        log.warning("refused request: %s", exc)
        content = error_reply(str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure must reach the aggregator as a reply
        log.exception("internal error while answering a request")
        content = error_reply(f"internal error at site: {type(exc).__name__}: {exc}")
    return Message(content, reply_to=msg)
