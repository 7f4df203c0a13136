"""Summary statistics in the GWAS Catalog's standard format (GWAS-SSF v1.0).

For every association table (``<PHENO>.glm.linear`` / ``<PHENO>.glm.logistic.hybrid``) the
study writes ``sumstats/<PHENO>.tsv.gz`` (bgzip), its tabix index ``.tbi`` and the metadata
``<PHENO>.tsv.gz-meta.yaml``, ready for meta-analysis tools and GWAS Catalog submission.

Columns, in the standard's order: ``chromosome`` (1–22, X = 23, Y = 24, MT = 25),
``base_pair_location``, ``effect_allele`` (PLINK's A1), ``other_allele``, ``beta`` (linear) or
``odds_ratio`` (logistic), ``standard_error`` (of β or of log OR), ``effect_allele_frequency``
(A1 frequency over all the study's called samples), ``p_value`` (as PLINK prints it, so values
below 1e-308 keep their digits), ``neg_log_10_p_value``, ``variant_id``, ``rsid`` (when the ID is
one), ``n`` (OBS_CT), ``ci_lower``/``ci_upper`` (95 %, of β or OR), ``errcode``. Rows are
sorted by chromosome and position. Rows without a statistic (a PLINK ERRCODE, or withheld by a
site's small-cell rule) are left out of the file; the glm table keeps them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.results.plots import mlog10p_from_text

#: the standard's chromosome codes
CHROM_CODE = {**{str(i): i for i in range(1, 23)}, "X": 23, "Y": 24, "MT": 25, "M": 25}
FILE_TYPE = "GWAS-SSF v1.0"
Z95 = 1.959963984540054


def chrom_code(name: str) -> int | None:
    n = str(name)
    if n.lower().startswith("chr"):
        n = n[3:]
    return CHROM_CODE.get(n.upper())


def _read_glm(path: Path) -> dict[str, list[str]]:
    with open(path) as fh:
        head = fh.readline().rstrip("\n").split("\t")
        cols = list(zip(*(line.rstrip("\n").split("\t") for line in fh))) or [[] for _ in head]
    return {h.lstrip("#"): list(c) for h, c in zip(head, cols)}


def _p_from_mlog10(m: float) -> str:
    """P as text from −log10 P, also below 1e-308 (``3.1e-400``); plain ``%g`` above 1e-4."""
    from fedgen.stats.pvalues import p_text

    return p_text(m, sig=4, trim=True) if m > 4 else f"{10.0 ** -m:.6g}"


def _g(x: float) -> str:
    return "NA" if not math.isfinite(x) else f"{x:.6g}"


def write_gwas_ssf(
    table: Path,
    out_dir: Path,
    *,
    phenotype: str,
    a1_freq: np.ndarray,
    build: str | None,
    trait_kind: str,
    fedgen_version: str,
    covariates: list[str] | None = None,
) -> list[Path]:
    """Write ``out_dir/<phenotype>.tsv.gz`` (+ ``.tbi``, ``-meta.yaml``) from a glm table.

    ``a1_freq`` holds the A1 frequency of each row of the table, in its order.
    """
    import pysam

    t = _read_glm(table)
    n_rows = len(t["ID"])
    a1_freq = np.asarray(a1_freq, dtype=float)
    if len(a1_freq) != n_rows:
        raise ValueError(f"{table.name}: {n_rows} rows but {len(a1_freq)} A1 frequencies")
    logistic = "OR" in t
    effect_col, se_col = ("OR", "LOG(OR)_SE") if logistic else ("BETA", "SE")
    if "P" not in t and "LOG10_P" in t:  # the table was written with PLINK's log10 modifier
        mlog10 = np.array([float(v) if v not in ("NA", "nan") else np.nan for v in t["LOG10_P"]])
        t["P"] = ["NA" if not math.isfinite(m) else _p_from_mlog10(m) for m in mlog10.tolist()]
    else:
        mlog10 = mlog10p_from_text(t["P"])
    records = []
    for i in range(n_rows):
        code = chrom_code(t["CHROM"][i])
        if code is None or t["ERRCODE"][i] not in (".", "UNFINISHED") or t["P"][i] in ("NA", "nan"):
            continue
        eff, se = float(t[effect_col][i]), float(t[se_col][i])
        if not (math.isfinite(eff) and math.isfinite(se)):
            continue
        a1, ref, alt = t["A1"][i], t["REF"][i], t["ALT"][i]
        other = ref if a1 == alt else alt
        centre = math.log(eff) if logistic else eff
        lo, hi = centre - Z95 * se, centre + Z95 * se
        if logistic:
            lo, hi = math.exp(lo), math.exp(hi)
        vid = t["ID"][i]
        records.append((code, int(t["POS"][i]), [
            str(code), t["POS"][i], a1, other, t[effect_col][i], t[se_col][i], _g(float(a1_freq[i])), t["P"][i],
            _g(float(mlog10[i])), vid if vid != "." else f"{t['CHROM'][i]}_{t['POS'][i]}_{ref}_{alt}",
            vid if vid.lower().startswith("rs") else "NA", t["OBS_CT"][i], _g(lo), _g(hi), t["ERRCODE"][i],
        ]))
    records.sort(key=lambda r: (r[0], r[1]))
    header = ["chromosome", "base_pair_location", "effect_allele", "other_allele",
              "odds_ratio" if logistic else "beta", "standard_error", "effect_allele_frequency", "p_value",
              "neg_log_10_p_value", "variant_id", "rsid", "n", "ci_lower", "ci_upper", "errcode"]
    out_dir.mkdir(parents=True, exist_ok=True)
    gz = out_dir / f"{phenotype}.tsv.gz"
    fd, tmp_txt = tempfile.mkstemp(prefix=f".{phenotype}.", suffix=".tsv", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write("\t".join(header) + "\n")
            for _, _, row in records:
                fh.write("\t".join(row) + "\n")
        tmp_gz = str(gz) + ".tmp.gz"
        pysam.tabix_compress(tmp_txt, tmp_gz, force=True)
        pysam.tabix_index(tmp_gz, seq_col=0, start_col=1, end_col=1, line_skip=1, zerobased=False, force=True)
        os.replace(tmp_gz, gz)
        os.replace(tmp_gz + ".tbi", str(gz) + ".tbi")
    finally:
        for leftover in (tmp_txt, str(gz) + ".tmp.gz", str(gz) + ".tmp.gz.tbi"):
            try:
                os.unlink(leftover)
            except OSError:
                pass
    md5 = hashlib.md5(gz.read_bytes()).hexdigest()  # noqa: S324 - the format's checksum field
    meta = {
        "file_type": FILE_TYPE,
        "data_file_name": gz.name,
        "data_file_md5sum": md5,
        "is_harmonised": False,
        "is_sorted": True,
        "date_last_modified": _dt.date.today().isoformat(),
        "genome_assembly": build or "unknown",
        "coordinate_system": "1-based",
        "sample_size": max((int(x) for x in t["OBS_CT"] if x.isdigit()), default=0),
        "trait_description": [phenotype],
        "analysis_software": f"fedgen {fedgen_version} (federated PLINK 2 --glm: "
                             f"{'logistic with Firth fallback' if logistic else 'linear'})",
        "effect_statistic": "odds_ratio" if logistic else "beta",
        "sex": "combined",
        "covariates": list(covariates or []),
        "trait_type": trait_kind,
    }
    meta_path = out_dir / f"{gz.name}-meta.yaml"
    meta_path.write_text(_yaml(meta))
    return [gz, Path(str(gz) + ".tbi"), meta_path]


def _yaml(d: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)
