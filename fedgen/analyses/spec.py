"""What an analysis may receive and send: the declaration the site's egress guard checks.

Every registered analysis declares

* the request parameters it accepts (anything else is refused),
* its input arrays and their shapes, whose symbolic axes (``v`` = variants in the request,
  ``b`` = basis columns, …) are *bound* from the request,
* its output arrays (dtype and shape in the same symbols; never a samples axis),
* the metadata keys it returns,
* how many samples its aggregate rests on (checked against the site policy's ``min_count``),
* for a differentially private analysis, the privacy events one request costs, computed by the
  site from the request and its own data sizes (never taken from the aggregator).

Symbols that no input binds (``p``: predictors of a model, chosen by the study's covariates) are
*free*: the first output binds them, each has a cap, and a free axis as long as the site's
sample count is refused as sample-shaped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

Shape = tuple[str | int, ...]


@dataclass(frozen=True)
class ArraySpec:
    """One array: allowed dtypes (numpy ``dtype.str`` without byte order, e.g. ``"i8"``) and shape."""

    dtypes: tuple[str, ...]
    shape: Shape
    optional: bool = False

    def describe(self) -> str:
        return f"{'|'.join(self.dtypes)}[{', '.join(str(s) for s in self.shape)}]"


def arr(dtypes: str, *shape: str | int, optional: bool = False) -> ArraySpec:
    """``arr("i8", "v", 4)``; several dtypes as ``"u2|u4"``; ``"*"`` in dtypes = any numeric."""
    return ArraySpec(tuple(dtypes.split("|")), tuple(shape), optional)


@dataclass(frozen=True)
class Spec:
    """The declaration of one analysis (see the module docstring)."""

    params: frozenset[str] = frozenset()
    inputs: Mapping[str, ArraySpec] = field(default_factory=dict)
    outputs: Mapping[str, ArraySpec] = field(default_factory=dict)
    meta: frozenset[str] = frozenset()
    free: Mapping[str, int] = field(default_factory=dict)  # free symbol -> cap
    #: symbols bound from the parameters: (params, node_config) -> {symbol: size}
    param_dims: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, int]] | None = None
    #: free symbols that are byte lengths, not counts (exempt from the sample-shape check)
    opaque: frozenset[str] = frozenset()
    limits: Mapping[str, int] = field(default_factory=dict)  # bound symbol -> cap
    #: samples the aggregate rests on, from (reply meta, node_config); None = holds no sample data
    contributors: Callable[[Mapping[str, Any]], int | None] | None = None
    #: privacy events of one request: (params, bound dims, node_config) -> list of event dicts
    dp_cost: Callable[[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]], list[dict[str, Any]]] | None = None
    #: per-row small-cell rule: (reply arrays, min_count, n_samples) -> (arrays, rows suppressed)
    suppress: Callable[[dict[str, np.ndarray], int, int], tuple[dict[str, np.ndarray], int]] | None = None
    #: releases individual samples' values (refused unless the site policy names it explicitly)
    sample_level: bool = False
    #: replies may be empty (e.g. an accumulate-only step)
    may_be_empty: bool = False
    doc: str = ""


def meta_count(*keys: str) -> Callable[[Mapping[str, Any]], int | None]:
    """Contributors = the smallest of these integer meta values."""

    def f(meta: Mapping[str, Any]) -> int | None:
        vals = [int(meta[k]) for k in keys if k in meta]
        if len(vals) != len(keys):
            raise ValueError(f"reply metadata lacks {', '.join(k for k in keys if k not in meta)}")
        return min(vals)

    return f


class SpecError(Exception):
    """A request or reply does not match its analysis' declaration."""


def _dtype_ok(a: np.ndarray, allowed: tuple[str, ...]) -> bool:
    if "*" in allowed:
        return a.dtype.kind in "biuf"
    return a.dtype.str[1:] in allowed


def bind_inputs(
    spec: Spec, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray], node_config: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """Check the request against the declaration; return the bound symbols."""
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise SpecError(f"parameter(s) {', '.join(map(repr, unknown))} are not declared by this analysis")
    extra = sorted(set(arrays) - set(spec.inputs))
    if extra:
        raise SpecError(f"input array(s) {', '.join(map(repr, extra))} are not declared by this analysis")
    dims: dict[str, int] = {}
    if spec.param_dims is not None:
        try:
            dims.update({k: int(v) for k, v in spec.param_dims(params, node_config or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise SpecError(f"bad parameters ({type(exc).__name__}: {exc})") from None
        neg = [k for k, v in dims.items() if v < 0]
        if neg:
            raise SpecError(f"bad parameters: negative size for {', '.join(neg)}")
    for name, decl in spec.inputs.items():
        if name not in arrays:
            if decl.optional:
                continue
            raise SpecError(f"input array {name!r} is missing")
        a = np.asarray(arrays[name])
        if not _dtype_ok(a, decl.dtypes):
            raise SpecError(f"input array {name!r} has dtype {a.dtype.str}, declared {decl.describe()}")
        _bind_shape(f"input array {name!r}", a.shape, decl, dims, free=None)
    for sym, cap in spec.limits.items():
        if sym in dims and dims[sym] > cap:
            raise SpecError(f"{sym} = {dims[sym]} exceeds this analysis' limit of {cap}")
    return dims


def _bind_shape(what: str, shape: tuple[int, ...], decl: ArraySpec, dims: dict[str, int], *, free: Mapping[str, int] | None) -> None:
    if len(shape) != len(decl.shape):
        raise SpecError(f"{what} has shape {shape}, declared {decl.describe()}")
    for size, sym in zip(shape, decl.shape):
        if isinstance(sym, int):
            if size != sym:
                raise SpecError(f"{what} has shape {shape}, declared {decl.describe()}")
            continue
        if sym in dims:
            if dims[sym] != size:
                raise SpecError(f"{what} has shape {shape}, declared {decl.describe()} with {sym} = {dims[sym]}")
            continue
        if free is None or sym in free:
            if free is not None and size > free[sym]:
                raise SpecError(f"{what}: axis {sym} = {size} exceeds its cap of {free[sym]}")
            dims[sym] = int(size)
        else:
            raise SpecError(f"{what}: axis {sym!r} is not bound by the request")


def check_outputs(
    spec: Spec, out: Mapping[str, np.ndarray], meta: Mapping[str, Any], dims: Mapping[str, int], *, n_samples: int | None
) -> dict[str, int]:
    """Check a reply against the declaration; return the dims incl. free symbols bound here."""
    d = dict(dims)
    extra = sorted(set(out) - set(spec.outputs))
    if extra:
        raise SpecError(f"reply carries undeclared array(s) {', '.join(map(repr, extra))}")
    bad_meta = sorted(set(meta) - set(spec.meta) - {"site_seconds"})
    if bad_meta:
        raise SpecError(f"reply carries undeclared metadata {', '.join(map(repr, bad_meta))}")
    empty_ok = spec.may_be_empty or d.get("v", 1) == 0
    for name, decl in spec.outputs.items():
        if name not in out:
            if decl.optional or (empty_ok and not out):
                continue
            raise SpecError(f"reply lacks declared array {name!r}")
        a = np.asarray(out[name])
        if not _dtype_ok(a, decl.dtypes):
            raise SpecError(f"reply array {name!r} has dtype {a.dtype.str}, declared {decl.describe()}")
        before = set(d)
        _bind_shape(f"reply array {name!r}", a.shape, decl, d, free=spec.free)
        if n_samples is not None and n_samples > 1:
            for sym in set(d) - before - set(spec.opaque):
                if d[sym] == n_samples:
                    raise SpecError(f"reply array {name!r} has an axis as long as the site's sample count ({n_samples}): sample-shaped output")
    return d


MAX_REPLY_ELEMENTS = 1 << 25  # 256 MiB of float64 per reply: far above any legitimate request


def expected_elements(spec: Spec, dims: Mapping[str, int]) -> int:
    """Elements of the declared outputs whose axes the request binds (free axes count as 1)."""
    total = 0
    for decl in spec.outputs.values():
        n = 1
        for sym in decl.shape:
            n *= sym if isinstance(sym, int) else int(dims.get(sym, 1))
        total += n
    return total


def suppress_small_variant_rows(column: Callable[[dict[str, np.ndarray]], np.ndarray], fill: str = "zero"):
    """A ``Spec.suppress`` rule: rows (variants) whose aggregate rests on 0 < n < min_count samples.

    ``column(out)`` gives, per row, the number of samples the row rests on (the smallest group
    for case/control tables). ``fill="zero"`` zeroes every per-variant array's row (the site then
    contributes nothing to that variant); ``fill="missing"`` makes a genotype-count row
    all-missing ``(0, 0, 0, n)``.
    """

    def rule(out: dict[str, np.ndarray], min_count: int, n_samples: int) -> tuple[dict[str, np.ndarray], int]:
        if not out:
            return out, 0
        n = np.asarray(column(out))
        small = (n > 0) & (n < int(min_count))
        k = int(small.sum())
        if not k:
            return out, 0
        res = {}
        for name, a in out.items():
            a = np.array(a, copy=True)
            if a.ndim >= 1 and a.shape[0] == len(small):
                a[small] = 0
                if fill == "missing" and name == "counts":
                    a[small, 3] = n_samples
            res[name] = a
        return res, k

    return rule
