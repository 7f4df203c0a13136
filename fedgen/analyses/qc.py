"""Site-side partials for QC: site description and genotype counts per variant.

``site_info`` describes the site's data (variant table, contig lengths, sample counts) so the
aggregator can harmonise variants across sites; ``genotype_counts`` returns, per requested
variant, the number of analysed samples that are hom-REF, het, hom-ALT and missing. Both are
sums over samples; neither has a samples axis.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

import fedgen
from fedgen.analyses import register
from fedgen.analyses.spec import AnalysisRequest, Spec, arr, called_count_rule, meta_count
from fedgen.cohort.phenotypes import describe_column
from fedgen.errors import FedgenError

SUB_BLOCK = 4096  # variants decoded at once at the site (at most)
GENOTYPE_ELEMS = 1 << 24  # hard calls read at once (int8: 16 MB whatever the sample count)
DOSAGE_ELEMS = 1 << 23  # dosages decoded at once (8-byte work arrays: 64 MB whatever the sample count)


def genotype_step(n_samples: int) -> int:
    """Variants per sub-block of hard calls: SUB_BLOCK, fewer for large cohorts (a site's memory
    for a block stays the same whatever its number of samples or variants)."""
    return max(1, min(SUB_BLOCK, GENOTYPE_ELEMS // max(1, n_samples)))


def dosage_step(n_samples: int) -> int:
    """Variants per sub-block when decoding dosages: SUB_BLOCK, fewer for large cohorts."""
    return max(1, min(SUB_BLOCK, DOSAGE_ELEMS // max(1, n_samples)))


def encode_variant_table(chrom, pos, ids, ref, alt) -> np.ndarray:
    """Variant table as UTF-8 TSV bytes in a uint8 array (one line per variant)."""
    lines = "\n".join(f"{c}\t{p}\t{i}\t{r}\t{a}" for c, p, i, r, a in zip(chrom, pos.tolist(), ids, ref, alt))
    return np.frombuffer(lines.encode(), dtype=np.uint8).copy()


def decode_variant_table(buf: np.ndarray) -> tuple[list[str], np.ndarray, list[str], list[str], list[str]]:
    text = np.asarray(buf, dtype=np.uint8).tobytes().decode()
    if not text:
        return [], np.empty(0, np.int64), [], [], []
    rows = [line.split("\t") for line in text.split("\n")]
    chrom = [r[0] for r in rows]
    pos = np.fromiter((int(r[1]) for r in rows), dtype=np.int64, count=len(rows))
    return chrom, pos, [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows]


VARIANT_INPUTS = {"idx": arr("*", "v"), "flip": arr("*", "v", optional=True)}


def _site_samples(meta: Mapping[str, Any]) -> int:
    return int(meta["counts"]["samples"])


@register(
    "site_info",
    Spec(
        params=frozenset({"phenotypes", "covariates"}),
        outputs={"variants": arr("u1", "table_bytes")},
        free={"table_bytes": 1 << 34},
        opaque=frozenset({"table_bytes"}),
        meta=frozenset({"site", "version", "vcf", "samples_file", "counts", "contigs", "columns", "policy", "build"}),
        contributors=_site_samples,
        sample_sets=lambda cohort, req: [] if req.rules.dp_only else [np.ones(cohort.n_samples, bool)],
        doc="the site's variant table (public coordinates/alleles), sample counts, column kinds",
    ),
)
def site_info(cohort: Any, req: AnalysisRequest):
    params = req.params
    columns: dict[str, Any] = {}
    rows = cohort.table_rows.tolist()
    for role in ("phenotypes", "covariates"):
        names = params.get(role) or []
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise FedgenError(f"site_info: {role!r} must be a list of column names")
        req.rules.check_columns(names)
        for col in names:
            values = cohort.table.require(col)
            vals = [values[i] for i in rows]
            try:
                columns[col] = describe_column(vals, role=role[:-1])
            except ValueError as exc:
                raise FedgenError(f"{cohort.table.path}: column {col!r}: {exc}") from None
            if columns[col]["kind"] == "categorical":
                _check_levels(col, vals, columns[col]["levels"], req.rules.min_count)
            columns[col]["n"] = req.rules.public_count(cohort, f"column:{col}", columns[col]["n"])
            if columns[col]["kind"] == "binary":  # cases among them (public in any GWAS; a DP planner needs it)
                from fedgen.cohort.phenotypes import phenotype_values

                y = phenotype_values(vals, kind="binary", name=col, where=str(cohort.table.path))
                cases = int(np.nansum(y == 1))
                # a rare flag (fewer than min_count people on either side) would name how many carry it,
                # and who, once people join or leave: such a count does not leave the site
                if req.rules.dp_only:
                    # decided on the noisy counts: on the exact ones, whether the key is there before
                    # and after one person joins would tell that person's status at ε = ∞
                    noisy = req.rules.public_count(cohort, f"column_cases:{col}", cases)
                    if min(noisy, columns[col]["n"] - noisy) >= req.rules.min_count:
                        columns[col]["cases"] = noisy
                elif min(cases, int(np.sum(~np.isnan(y))) - cases) >= req.rules.min_count:
                    columns[col]["cases"] = req.rules.public_count(cohort, f"column_cases:{col}", cases)
    table = encode_variant_table(cohort.chrom.tolist(), cohort.pos, cohort.ids.tolist(), cohort.ref.tolist(), cohort.alt.tolist())
    counts = dict(cohort.counts)
    if req.rules.dp_only:  # no exact count of people leaves a DP-only site
        for key in ("vcf_samples", "table_samples", "samples", "vcf_only_samples", "table_only_samples"):
            counts[key] = req.rules.public_count(cohort, key, counts.get(key, 0))
        counts["noisy"] = 1
    meta = {
        "site": cohort.site,
        "version": fedgen.__version__,
        "build": site_build(cohort, req.rules.declared_build),
        "vcf": cohort.vcf.name,
        "samples_file": cohort.table.path.name,
        "counts": counts,
        "contigs": cohort.contigs,
        "columns": columns,
    }
    if req.rules.public_policy:  # what this site agrees to answer (public, so the aggregator can plan around it)
        meta["policy"] = dict(req.rules.public_policy)
    return {"variants": table}, meta


#: genome builds a site may declare (node config ``build``)
BUILDS = ("GRCh37", "GRCh38")


def site_build(cohort: Any, declared: str | None) -> str | None:
    """The site's genome build: declared in its configuration (``build``), else recognised from its
    genotype file's contig lengths; a declaration the header contradicts is an error."""
    from fedgen.stats.pca import detect_genome_build

    detected = detect_genome_build(cohort.contigs)
    if declared is None:
        return detected
    if declared not in BUILDS:
        raise FedgenError(f"site configuration: build must be one of {', '.join(BUILDS)}, got {declared!r}")
    if detected is not None and detected != declared:
        raise FedgenError(f"site configuration declares build {declared}, but the contig lengths of "
                          f"{cohort.vcf.name} are {detected}'s")
    return declared


MAX_LEVELS = 50


def _check_levels(col: str, vals: list[str], levels: list[str], min_count: int) -> None:
    """A categorical column's level names leave the site only if each level holds min_count samples."""
    if len(levels) > MAX_LEVELS:
        raise FedgenError(f"column {col!r} has more than {MAX_LEVELS} categories; recode it")
    counts = {lev: 0 for lev in levels}
    for v in vals:
        if v in counts:
            counts[v] += 1
    rare = sum(1 for c in counts.values() if c < min_count)
    if rare:
        raise FedgenError(
            f"column {col!r}: some of its categories hold fewer than the site's min_count of samples; their names "
            "would identify people: merge or recode them"
        )


def _block_args(cohort, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if "idx" not in arrays:
        raise FedgenError("request has no variant index array 'idx'")
    idx = np.asarray(arrays["idx"], dtype=np.int64)
    if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= cohort.dosage.shape[0])):
        raise FedgenError("variant indices out of range for this site's data")
    if len(np.unique(idx)) != len(idx):  # honest requests never repeat a variant (route: one variant, many β)
        raise FedgenError("a request names a variant more than once")
    flip = np.asarray(arrays.get("flip", np.zeros(len(idx), np.uint8)), dtype=bool)
    if flip.shape != idx.shape:
        raise FedgenError("'flip' must have one entry per requested variant")
    return idx, flip


def dosage_param(params: Mapping[str, Any]) -> bool:
    """The request's ``dosage`` flag (``study.dosage``): use the site's imputed dosages."""
    d = params.get("dosage", False)
    if not isinstance(d, bool):
        raise FedgenError("'dosage' must be true or false")
    return d


def _counts_rule(out: dict[str, np.ndarray], rules: Any, n_samples: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """:func:`called_count_rule`, and for dosage sums the same: a variant with a dosage in
    1..min_count-1 samples at the site is reported as having none there."""
    out, mask = called_count_rule(out, rules, n_samples)
    if "dosage_sums" in out:
        d = np.array(out["dosage_sums"], copy=True)
        small = (d[:, 1] > 0) & (d[:, 1] < int(rules.min_count))
        d[small] = 0
        out = {**out, "dosage_sums": d}
        mask = small if mask is None else (mask | small)
    return out, mask


@register(
    "genotype_counts",
    Spec(
        params=frozenset({"dosage"}),
        inputs=VARIANT_INPUTS,
        outputs={"counts": arr("i8", "v", 4), "dosage_sums": arr("i8", "v", 2, optional=True)},
        meta=frozenset({"n_samples", "suppressed"}),
        contributors=meta_count("n_samples"),
        suppress=_counts_rule,
        sample_sets=lambda cohort, req: [np.ones(cohort.n_samples, bool)],
        doc="per variant: hom-REF, het, hom-ALT, missing counts (a variant called in fewer than "
        "min_count samples at the site is reported as all-missing there); with dosage: the counts of "
        "the hard calls PLINK 2 derives from the dosages, and dosage_sums = (Σ ALT dosage in 1/16384 "
        "units, samples with a dosage), likewise withheld below min_count",
    ),
)
def genotype_counts(cohort: Any, req: AnalysisRequest):
    """Per variant: (hom-REF, het, hom-ALT, missing) counts over the analysed samples, (V, 4) int64.

    With ``dosage: true``: counts of the hard calls derived from the dosages (as PLINK 2's
    ``--missing``/``--hardy`` count them) and ``dosage_sums`` (V, 2) int64."""
    if dosage_param(req.params):
        counts, sums = dosage_class_counts(cohort, req.arrays)
        return {"counts": counts, "dosage_sums": sums}, {"n_samples": cohort.n_samples}
    return {"counts": genotype_class_counts(cohort, req.arrays)}, {"n_samples": cohort.n_samples}


def dosage_class_counts(cohort, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(V, 4) hard-call class counts derived from the dosages and (V, 2) dosage sums (Σ units, n)."""
    from fedgen.cohort.dosage import MISSING, UNIT, to_hardcalls

    cohort.require_dosages()
    idx, flip = _block_args(cohort, arrays)
    counts = np.empty((len(idx), 4), dtype=np.int64)
    sums = np.empty((len(idx), 2), dtype=np.int64)
    step = dosage_step(cohort.n_samples)
    for s in range(0, len(idx), step):
        u = cohort._dosage_rows(idx[s : s + step])
        f = flip[s : s + step]
        g = to_hardcalls(u, f)
        for k, code in enumerate((0, 1, 2, -1)):
            counts[s : s + step, k] = np.count_nonzero(g == code, axis=1)
        have = u != MISSING
        v = np.where(have, u, 0).astype(np.int64)
        tot = v.sum(1)
        n_have = have.sum(1)
        sums[s : s + step, 0] = np.where(f, 2 * UNIT * n_have - tot, tot)
        sums[s : s + step, 1] = n_have
    return counts, sums


def genotype_class_counts(cohort, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """(V, 4) int64: hom-REF, het, hom-ALT and missing counts of the requested variants."""
    idx, flip = _block_args(cohort, arrays)
    counts = np.empty((len(idx), 4), dtype=np.int64)
    step = genotype_step(cohort.n_samples)
    for s in range(0, len(idx), step):  # bounded memory whatever the request size
        g = cohort.block(idx[s : s + step], flip[s : s + step])
        for k, code in enumerate((0, 1, 2, -1)):
            counts[s : s + step, k] = np.count_nonzero(g == code, axis=1)
    if np.any(counts.sum(axis=1) != cohort.n_samples):
        raise FedgenError("internal check failed: genotype codes outside {0,1,2,missing}")
    return counts


def _sex_groups(cohort) -> list[np.ndarray]:
    """Masks of the analysed samples that are male, female and of unknown sex."""
    from fedgen.cohort.sex import FEMALE, MALE, UNKNOWN, cohort_sex

    sex = cohort_sex(cohort)
    return [sex == MALE, sex == FEMALE, sex == UNKNOWN]


def sex_called_count_rule(out: dict[str, np.ndarray], rules, n_samples: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Sex-split genotype counts: a group called in 1..min_count-1 of its samples at a variant is
    reported as all-missing in that group (the rule of ``genotype_counts``, per sex group), and so
    is every other group at that variant: the groups add up to the all-sample counts, which
    ``genotype_counts`` releases when the other groups make them large, so the all-sample counts
    minus the groups left would be the withheld group's (red-team: one man called among the men,
    every woman called, gave that man's genotype)."""
    if not out:
        return out, None
    c = np.array(out["counts"], copy=True)
    size = c.sum(axis=2)
    called = c[:, :, :3].sum(axis=2)
    rows = ((called > 0) & (called < int(rules.min_count))).any(axis=1)
    if rows.any():
        c[rows] = 0
        c[rows, :, 3] = size[rows]
    return {**out, "counts": c}, rows


@register(
    "sex_genotype_counts",
    Spec(
        inputs=VARIANT_INPUTS,
        outputs={"counts": arr("i8", "v", 3, 4)},
        meta=frozenset({"n_samples", "suppressed"}),
        contributors=meta_count("n_samples"),
        suppress=sex_called_count_rule,
        # each group is a sample set of its own: the register refuses a group of 1..min_count-1
        # people, or one that differs from a set already released by that few (differencing)
        sample_sets=lambda cohort, req: _sex_groups(cohort),
        families=("g",),
        doc="per variant and sex group (male, female, unknown sex): hom-REF, het, hom-ALT, missing counts, "
        "for chrX/chrY/MT statistics counted by sex as PLINK 2 does",
    ),
)
def sex_genotype_counts(cohort: Any, req: AnalysisRequest):
    """(V, 3, 4) int64: genotype counts of the requested variants among males, females, unknown sex."""
    idx, flip = _block_args(cohort, req.arrays)
    groups = _sex_groups(cohort)
    counts = np.empty((len(idx), 3, 4), dtype=np.int64)
    step = genotype_step(cohort.n_samples)
    for s in range(0, len(idx), step):
        g = cohort.block(idx[s : s + step], flip[s : s + step])
        for j, m in enumerate(groups):
            gm = g[:, m]
            for k, code in enumerate((0, 1, 2, -1)):
                counts[s : s + step, j, k] = np.count_nonzero(gm == code, axis=1)
    return {"counts": counts}, {"n_samples": cohort.n_samples}
