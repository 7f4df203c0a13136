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
    #: privacy events of the whole planned sequence this request starts (e.g. the remaining
    #: training rounds): the site refuses before computing if they would not fit its budget
    dp_plan: Callable[[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]], list[dict[str, Any]]] | None = None
    #: per-row disclosure rule: (reply arrays incl. site-only "_" companions, rules, n_samples)
    #: -> (arrays, boolean mask of the rows withheld, or None)
    suppress: Callable[[dict[str, np.ndarray], "Rules", int], tuple[dict[str, np.ndarray], np.ndarray | None]] | None = None
    #: releases individual samples' values (refused unless the site policy names it explicitly)
    sample_level: bool = False
    #: not in the default policy for this reason (a site opts in with ``extra_analyses``)
    opt_in_reason: str = ""
    #: replies may be empty (e.g. an accumulate-only step)
    may_be_empty: bool = False
    #: the sample sets the aggregate rests on, for the site's released-sample-set register:
    #: (cohort, request) -> list of boolean masks over the cohort's analysed samples
    sample_sets: Callable[[Any, "AnalysisRequest"], list[np.ndarray]] | None = None
    #: samples-table values summed with genotypes in each row (row-level design analyses):
    #: (cohort, request) -> [(attribute name, support mask over the cohort's samples)]; the
    #: pipeline checks each row's carriers against every set released with the same attribute
    attributes: Callable[[Any, "AnalysisRequest"], list[tuple[str, np.ndarray]]] | None = None
    #: what the aggregate sums over its sample set, for the register: "g" genotypes, "x" values
    #: of samples-table columns, "gx" their products (genotype-weighted values, per variant row).
    #: Sets are compared for differencing only with sets that summed the same kind of values (a
    #: count of people who lack a covariate reveals nothing of them).
    families: tuple[str, ...] = ("g",)
    #: request checks that need the site's data (index order, frequencies, rank caps):
    #: (cohort, request) -> None, raising on a request the site refuses
    validate: Callable[[Any, "AnalysisRequest"], None] | None = None
    #: the analysis needs no cohort (e.g. ping)
    needs_cohort: bool = True
    #: PCA-like products: basis columns this request multiplies the site's data by (charged to
    #: the site's PCA rank register; the request's ``freq`` is bound to its study)
    rank: Callable[["AnalysisRequest"], int] | None = None
    #: accepted only for a study whose PCA this site has answered (``pca_product`` rounds)
    needs_study_pca: bool = False
    #: a model update: answered only when it arrives as a Flower ``train`` message (the
    #: ``@app.train()`` path); a ``train`` message carrying any other analysis is refused
    train_message: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Rules:
    """What the site pipeline tells an analysis: the policy values and site state it may use.

    Analyses never read the policy or the site layer themselves; the pipeline fills this in.
    """

    site: str = ""
    min_count: int = 1
    min_cell: int = 1
    allow_per_variant_sample_sets: bool = True
    allowed_columns: tuple[str, ...] = ()
    state_dir: Any = None
    events: tuple[Mapping[str, Any], ...] = ()
    public_policy: Mapping[str, Any] | None = None
    #: under a DP-only policy exact counts never leave the site (see :mod:`fedgen.site.pipeline`)
    dp_only: bool = False
    #: under ``dp_only``: (cohort, name, exact count) -> the site's noisy, charged, cached count
    noisy_counts: Callable[[Any, str, int], int] | None = None
    #: per attribute shared with earlier releases: (atom label of every cohort sample, -1 = none;
    #: sets × atoms 0/1 matrix); analyses count each row's carriers per atom (``_atom_cells``)
    cell_structures: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    pca_rank_per_study: float = 1.0
    pca_rank_lifetime: float = 1e9
    ld_max_window_bp: int = 10**12
    #: the genome build the site's configuration declares (node config ``build``), if any
    declared_build: str | None = None

    def public_count(self, cohort: Any, name: str, value: int) -> int:
        """A count as it may leave the site: exact, or noised under a DP-only policy."""
        return int(value) if self.noisy_counts is None else int(self.noisy_counts(cohort, name, int(value)))

    def check_columns(self, names: Any) -> None:
        """Refuse samples-table columns outside the policy's ``allowed_columns`` (empty = all)."""
        if not self.allowed_columns:
            return
        bad = sorted({str(n) for n in names} - set(self.allowed_columns))
        if bad:
            from fedgen.errors import FedgenError

            raise FedgenError(f"column(s) {', '.join(map(repr, bad))} are not in the site policy's allowed_columns")


@dataclass(frozen=True)
class AnalysisRequest:
    """One typed request as an analysis sees it: parameters, input arrays and the site's rules."""

    analysis: str
    params: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]
    rules: Rules = field(default_factory=Rules)
    study_id: str = ""


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
    bad_meta = sorted(set(meta) - set(spec.meta) - {"site_seconds", "site_t0"})
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


def zero_rows(out: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """Zero, in every array whose leading axes match ``mask``, the positions where ``mask`` is set."""
    mask = np.asarray(mask, dtype=bool)
    res: dict[str, np.ndarray] = {}
    for name, a in out.items():
        a = np.asarray(a)
        if mask.any() and a.ndim >= mask.ndim and a.shape[: mask.ndim] == mask.shape:
            a = np.array(a, copy=True)
            a[mask] = 0
        res[name] = a
    return res


def small_cells(cells: np.ndarray, min_cell: int) -> np.ndarray:
    """Rows (leading axes of ``cells``) any of whose cells (last axis) holds 1..min_cell-1 people.

    An empty cell (0) is not small: it is either the study's design (a site of cases only) or a
    monomorphic variant, and it singles nobody out.
    """
    c = np.asarray(cells)
    return np.any((c > 0) & (c < int(min_cell)), axis=-1)


def cell_rule(*, kish: bool = False):
    """A ``Spec.suppress`` rule for row-level analyses (one row per variant or variant pair).

    The analysis returns, beside its arrays, a site-only ``_cells`` array: per row the number of
    carriers of A1 and of carriers of A2 (people with at least one copy of each allele) among the
    samples the row rests on, and (association rows) of people unlike the row's most common
    genotype or dosage (Σ(g − c)·y is known for any c). A row with a cell of
    1..``min_cell``-1 people is withheld (zeroed; its ``withheld`` flag set): its sums would be
    a few identifiable people's values (route: small carrier cells). With ``kish``, a row whose
    IRLS weights have a Kish effective size below ``min_count`` is withheld too (route: a β
    that weights the fit onto a few people).
    """

    def rule(out: dict[str, np.ndarray], rules: "Rules", n_samples: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        cells = out.get("_cells")
        if cells is None:
            return out, None
        mask = small_cells(cells, rules.min_cell)
        for k, (_, M) in enumerate(rules.cell_structures):
            atom_cells = out.get(f"_atom_cells{k}")
            if atom_cells is not None:
                mask |= isolable_small_cells(np.asarray(atom_cells), M, rules.min_cell)
        if kish and "_neff" in out and "n" in out:
            neff = np.floor(np.asarray(out["_neff"], dtype=np.float64) + 1e-9)
            n = np.asarray(out["n"])
            mask |= (n > 0) & (neff < int(rules.min_count))
        return zero_rows(out, mask), mask

    return rule


def isolable_small_cells(atom_cells: np.ndarray, M: np.ndarray, min_cell: int) -> np.ndarray:
    r"""Rows whose carriers in some group of atoms the released sets can isolate number 1..min_cell-1.

    ``atom_cells`` (rows, atoms, 2): carriers of A1 and of A2 per atom; ``M`` (sets × atoms): which
    sets (with a genotype-weighted sum of the same attribute released) hold each atom. A
    combination v of those sums is non-zero on a group T of the carrier-holding atoms P and zero
    on the rest of P exactly when rank(M[:, P]) > rank(M[:, P \ T]); its value is then the sum
    over T's carriers alone. Route closed: two released sets that each pass the cell rule but
    whose difference holds one carrier (one person's phenotype and covariates by subtraction).
    """
    from itertools import combinations

    c = np.asarray(atom_cells)
    out = np.zeros(c.shape[0], dtype=bool)
    memo: dict[tuple, bool] = {}
    M = np.asarray(M, dtype=float)
    for allele in range(c.shape[2]):
        cells = c[:, :, allele]
        suspect = np.flatnonzero(np.any((cells > 0) & (cells < min_cell), axis=1))
        for r in suspect.tolist():
            row = cells[r]
            key = (allele, tuple(np.minimum(row, min_cell).tolist()))
            hit = memo.get(key)
            if hit is None:
                P = np.flatnonzero(row > 0)
                small = [a for a in P.tolist() if row[a] < min_cell]
                full = np.linalg.matrix_rank(M[:, P])
                hit = False
                for size in range(1, min(len(small), min_cell - 1) + 1):
                    for group in combinations(small, size):
                        if row[list(group)].sum() >= min_cell:
                            continue
                        rest = [a for a in P.tolist() if a not in group]
                        if (np.linalg.matrix_rank(M[:, rest]) if rest else 0) < full:
                            hit = True
                            break
                    if hit:
                        break
                memo[key] = hit
            out[r] |= hit
    return out


def called_count_rule(out: dict[str, np.ndarray], rules: "Rules", n_samples: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Genotype counts: a variant called in 1..min_count-1 samples is reported as all-missing."""
    if not out:
        return out, None
    c = np.array(out["counts"], copy=True)
    called = c[:, :3].sum(1)
    mask = (called > 0) & (called < int(rules.min_count))
    if mask.any():
        c[mask] = 0
        c[mask, 3] = n_samples
    return {**out, "counts": c}, mask
