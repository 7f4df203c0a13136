"""Model updates as Flower ``train`` messages, combined with ``flwr.serverapp.strategy.FedAvg``.

A risk-model round (:mod:`fedgen.study.learn`) sends every site the current weights as a Flower
``train`` message, in the layout Flower's own strategies use (``FedAvg.configure_train``)::

    RecordDict{"arrays": ArrayRecord{"weights": Array},
               "config": ConfigRecord{"protocol": 2, "analysis": str, "params": JSON str,
                                      "study_id": str, "arrays": bytes}}

where ``config["arrays"]`` packs the request's other arrays (the site's variant indices and
flips, the study frequencies) as :func:`fedgen.federation.flower.pack_arrays` does for queries.
The site's ClientApp answers it in its ``@app.train()`` handler, through the same site pipeline
as every query (policy, declaration, DP ledger, egress check, audit): the pipeline accepts a
``train`` message only for an analysis declared a model update (``Spec.train_message``:
``dp_model_update``, ``model_update``) and a model update only as a ``train`` message. The reply::

    RecordDict{"arrays": ArrayRecord{"weights": Array},
               "metrics": MetricRecord{"num-examples": n},
               "fedgen": ConfigRecord{"protocol": 2, "meta": JSON str, "arrays": bytes}}

(``n``: the people the site trained on; a refused request has only the ``"fedgen"`` record,
with ``meta == {"error": ...}``).

The aggregator combines the replies with :func:`fedavg`, which runs
``flwr.serverapp.strategy.FedAvg.aggregate_train`` (weighted by ``"num-examples"``) on the
replies as Flower messages. The in-process transport and a resumed study (whose replies come
from the journal) go through the same function, rebuilding each reply's record dict with
:func:`encode_train_reply`.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedgen.errors import FedgenError
from fedgen.federation.flower import PROTOCOL, json_object, pack_arrays, unpack_arrays
from fedgen.federation.transport import Reply

#: Flower message type of a model update (``flwr.app.MessageType.TRAIN``; ``@app.train()``)
TRAIN_MESSAGE_TYPE = "train"
#: the reply metric FedAvg weights by (Flower's default ``weighted_by_key``)
WEIGHT_KEY = "num-examples"
#: the array of a train message / reply that FedAvg averages
WEIGHTS = "weights"
_ARRAYS_REC, _CONFIG_REC, _METRICS_REC, _FEDGEN_REC = "arrays", "config", "metrics", "fedgen"


def _weights_record(weights: Any) -> ArrayRecord:
    w = np.ascontiguousarray(np.asarray(weights))
    if w.dtype.kind not in "fiu" or w.ndim != 1:
        raise FedgenError(f"model weights must be a 1-d numeric array, got {w.dtype} {w.shape}")
    return ArrayRecord({WEIGHTS: Array(w)})


def _weights_of(content: RecordDict, what: str) -> np.ndarray:
    rec = content.array_records.get(_ARRAYS_REC)
    if rec is None or list(rec.keys()) != [WEIGHTS] or len(content.array_records) != 1:
        raise FedgenError(f"malformed {what}: needs exactly one ArrayRecord {_ARRAYS_REC!r} holding {WEIGHTS!r}")
    try:
        w = rec[WEIGHTS].numpy()  # np.load with allow_pickle=False
    except (TypeError, ValueError) as exc:
        raise FedgenError(f"malformed {what}: bad weights array ({exc})") from None
    if w.dtype.kind not in "fiu" or w.dtype.fields is not None or w.ndim != 1:
        raise FedgenError(f"malformed {what}: weights must be a 1-d numeric array, got {w.dtype} {w.shape}")
    return w


def _protocol(rec: ConfigRecord, what: str) -> None:
    if int(rec.get("protocol", -1)) != PROTOCOL:
        raise FedgenError(f"{what} uses fedgen wire protocol {rec.get('protocol')!r}; this side speaks {PROTOCOL}")


def encode_train_request(analysis: str, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *,
                         study_id: str = "") -> RecordDict:
    """A model-update request → the record dict of a ``train`` message (weights in an ArrayRecord)."""
    if WEIGHTS not in arrays:
        raise FedgenError(f"a model update request needs {WEIGHTS!r}")
    rest = {k: v for k, v in arrays.items() if k != WEIGHTS}
    return RecordDict({
        _ARRAYS_REC: _weights_record(arrays[WEIGHTS]),
        _CONFIG_REC: ConfigRecord({"protocol": PROTOCOL, "analysis": str(analysis),
                                   "params": json.dumps(dict(params), allow_nan=False), "study_id": str(study_id),
                                   "arrays": pack_arrays(rest)}),
    })


def decode_train_request(content: RecordDict) -> tuple[str, dict[str, Any], dict[str, np.ndarray], str]:
    """A ``train`` message's record dict → (analysis, params, arrays, study_id); FedgenError if malformed."""
    rec = content.config_records.get(_CONFIG_REC)
    if rec is None or len(content.config_records) != 1 or content.metric_records:
        raise FedgenError(f"malformed train message: needs exactly one ConfigRecord {_CONFIG_REC!r} and no metrics")
    _protocol(rec, "train message")
    params = json_object(rec.get("params"), "train message", "params")
    blob = rec.get("arrays", b"")
    if not isinstance(blob, (bytes, bytearray)):
        raise FedgenError("malformed train message: 'arrays' must be bytes")
    arrays = unpack_arrays(blob)
    if WEIGHTS in arrays:
        raise FedgenError(f"malformed train message: {WEIGHTS!r} travels in the ArrayRecord only")
    arrays[WEIGHTS] = _weights_of(content, "train message")
    return str(rec.get("analysis", "")), params, arrays, str(rec.get("study_id", ""))


def encode_train_reply(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> RecordDict:
    """A site's answer to a model update → the record dict FedAvg aggregates (see the module docstring)."""
    if "error" in meta or WEIGHTS not in arrays:
        from fedgen.federation.flower import error_reply

        return error_reply(str(meta.get("error") or f"internal error at site: the model update has no {WEIGHTS!r}"))
    n = meta.get("n")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not np.isfinite(n) or n < 0:
        raise FedgenError("a model update reply needs its number of people 'n'")
    rest = {k: v for k, v in arrays.items() if k != WEIGHTS}
    return RecordDict({
        _ARRAYS_REC: _weights_record(arrays[WEIGHTS]),
        _METRICS_REC: MetricRecord({WEIGHT_KEY: int(n)}),
        _FEDGEN_REC: ConfigRecord({"protocol": PROTOCOL, "meta": json.dumps(dict(meta), allow_nan=False),
                                   "arrays": pack_arrays(rest)}),
    })


def decode_train_reply(content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """Record dict of a ``train`` reply → (arrays incl. weights, meta, bytes received); FedgenError if malformed."""
    rec = content.config_records.get(_FEDGEN_REC)
    if rec is None:
        raise FedgenError(f"malformed train reply: no {_FEDGEN_REC!r} config record")
    _protocol(rec, "train reply")
    meta_json = str(rec.get("meta", "{}"))
    meta = json_object(meta_json, "train reply", "meta")
    blob = rec.get("arrays", b"")
    if not isinstance(blob, (bytes, bytearray)):
        raise FedgenError("malformed train reply: 'arrays' must be bytes")
    if "error" in meta:
        return {}, meta, len(meta_json)
    arrays = unpack_arrays(blob)
    w = _weights_of(content, "train reply")
    metrics = content.metric_records.get(_METRICS_REC)
    if metrics is None or WEIGHT_KEY not in metrics:
        raise FedgenError(f"malformed train reply: no MetricRecord {_METRICS_REC!r} with {WEIGHT_KEY!r}")
    if int(metrics[WEIGHT_KEY]) != int(meta.get("n", -1)):
        raise FedgenError(f"malformed train reply: {WEIGHT_KEY} differs from the reply's n")
    arrays[WEIGHTS] = w
    return arrays, meta, len(blob) + int(w.nbytes) + len(meta_json.encode("utf-8"))


class _ReplyMessage:
    """A site's train reply as ``FedAvg.aggregate_train`` reads a reply ``Message``: ``has_error()``
    and ``content``. (A real ``flwr.app.Message`` can be built only inside a Flower process; the
    in-process transport and the journal's replayed rounds have none, so every path uses this.)"""

    __slots__ = ("content",)

    def __init__(self, content: RecordDict) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


def fedavg(replies: Mapping[str, Reply], server_round: int) -> np.ndarray:
    """The sites' new weights averaged by ``flwr.serverapp.strategy.FedAvg.aggregate_train``
    (weighted by each reply's ``num-examples``, the people it trained on)."""
    from flwr.serverapp.strategy import FedAvg

    if not replies:
        raise FedgenError("model: no site replied to the training round")
    if sum(int(r.meta.get("n", 0)) for r in replies.values()) <= 0:
        raise FedgenError("model: no site has people to train on")
    strategy = FedAvg(min_train_nodes=1, min_evaluate_nodes=0, min_available_nodes=1, weighted_by_key=WEIGHT_KEY)
    messages = [_ReplyMessage(encode_train_reply(r.arrays, r.meta)) for r in replies.values()]
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # its INFO line per round would go to the study's stdout
    try:
        arrays, _ = strategy.aggregate_train(int(server_round), messages)
    finally:
        flwr_log.setLevel(level)
    if arrays is None:
        raise FedgenError("model: FedAvg found no usable reply")
    return np.asarray(arrays[WEIGHTS].numpy(), dtype=np.float64)
