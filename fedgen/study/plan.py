"""Hydra configuration → study plan (a plain JSON-able dict) and per-site node configs."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from fedgen.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
KNOWN_ANALYSES = ("freq", "missing", "hardy", "pca", "assoc", "glm", "topk", "model")


def compose_config(overrides: list[str]) -> Any:
    """Compose the study config from ``fedgen/conf`` (= ``configs/``) plus Hydra overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def _site_policy(site: str, policy: Any, base: Path) -> str:
    """``sites.<name>.policy`` for a local run: an inline mapping (passed on as JSON) or a path."""
    import json

    from fedgen.node.policy import load_policy

    if isinstance(policy, dict):
        try:
            load_policy(policy)
        except ValueError as exc:
            raise ConfigError(f"sites.{site}.policy: {exc}") from None
        return json.dumps(policy)
    path = (base / str(policy)).expanduser().resolve()
    try:
        load_policy(path)
    except ValueError as exc:
        raise ConfigError(f"sites.{site}.policy: {exc}") from None
    return str(path)


def _min_sites(value: Any, n_sites: int) -> int | None:
    from fedgen.study.runner import resolve_min_sites

    return None if value is None else resolve_min_sites(value, n_sites)


def _check_dp_model_plan(plan: dict[str, Any]) -> None:
    """``privacy=dp`` with a risk model: features from the study's DP top-k (``top:N``) or a
    variant list, trained with DP-SGD only (a non-private update would undo the study's DP)."""
    model = plan["model"]
    if not model.get("dp", True):
        raise ConfigError("study.model.dp = false under privacy=dp: a non-private model update would reveal what the "
                          "DP releases protect; train with DP-SGD (study.model.dp: true) or run privacy=none")
    if str(model["variants"]).startswith("top:"):
        ph = model.get("phenotype")
        if ph not in (plan.get("phenotypes") or []) or "topk" not in plan["analyses"]:
            raise ConfigError(f"study.model.variants = {model['variants']} under privacy=dp takes the model's variants from "
                              f"the study's DP top-k release: add {ph!r} to study.phenotypes and 'topk' to study.analyses, "
                              "or give a variant-list file")
        try:
            n = int(str(model["variants"])[4:])
        except ValueError:
            raise ConfigError(f"study.model.variants: 'top:N' needs a whole number, got {model['variants']!r}") from None
        k = int((plan.get("privacy") or {}).get("topk", 10))
        if n > k:
            raise ConfigError(f"study.model.variants = top:{n} under privacy=dp needs a DP top-k release of at least "
                              f"{n} variants: set privacy.topk={n} (it is {k})")


def _check_dosage_plan(plan: dict[str, Any], mode: str) -> None:
    """``study.dosage: true``: what runs on imputed dosages, and what is refused (not built yet)."""
    if mode == "dp":
        raise ConfigError("study.dosage: differentially private releases count hard calls; run privacy=dp without "
                          "study.dosage")
    if plan.get("pca") is not None:
        raise ConfigError("study.dosage: the federated PCA reads hard calls, not dosages; run it without study.dosage "
                          "(study.pcs=0 and no pca in study.analyses)")
    if "model" in plan["analyses"]:
        raise ConfigError("study.dosage: risk-model training reads hard calls; run study=risk_model without study.dosage")
    cc = sorted({"a1countcc", "totallelecc", "a1freqcc"} & set(plan["glm_cols"]))
    if cc:
        raise ConfigError(f"study.dosage: study.glm.cols {', '.join(cc)} (case/control dosage counts) are not available "
                          "with dosages yet; leave them out")


def build_plan(cfg: Any, *, base_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """Validate a composed config and return (plan, node_configs)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = Path(base_dir or Path.cwd())
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        import re

        missing = re.search(r"Missing mandatory value: ([\w.\[\]]+)", str(exc))
        if missing:  # a required field (??? in the config): name it and say how to set it
            raise ConfigError(f"{missing.group(1)} is required: set it on the command line, e.g. "
                              f"'{missing.group(1)}=VALUE', or in your config") from None
        raise ConfigError(f"invalid configuration: {exc}") from None
    assert isinstance(resolved, dict)
    study = resolved.get("study") or {}
    fed = resolved.get("federation") or {}
    sites_cfg = resolved.get("sites") or {}
    if not isinstance(sites_cfg, dict) or not sites_cfg:
        raise ConfigError("no sites configured (select a sites file with sites=NAME)")
    node_configs: dict[str, dict[str, str]] = {}
    for name, sc in sites_cfg.items():
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"site name {name!r}: use letters, digits, '-' or '_'")
        sc = sc or {}
        if not isinstance(sc, dict):
            raise ConfigError(f"sites.{name}: expected a mapping with vcf and samples")
        nc = {"site": str(name)}
        if fed.get("mode") != "remote":
            inputs = [k for k in ("vcf", "pgen", "bed") if sc.get(k)]
            if len(inputs) != 1:
                raise ConfigError(f"sites.{name}: give exactly one genotype input: vcf (VCF/BCF file), pgen (PLINK 2 "
                                  f"fileset prefix) or bed (PLINK 1 fileset prefix); got {', '.join(inputs) or 'none'}")
            for key in (inputs[0], "samples"):
                if not sc.get(key):
                    raise ConfigError(f"sites.{name}.{key} is not set")
                value = sc[key]
                if key == "vcf" and isinstance(value, (list, tuple)):  # several files (e.g. one per chromosome)
                    nc[key] = "\n".join(str((base / str(v)).expanduser().resolve()) for v in value)
                else:
                    nc[key] = str((base / str(value)).expanduser().resolve())
            if sc.get("state_dir"):
                nc["state_dir"] = str((base / str(sc["state_dir"])).expanduser().resolve())
            if sc.get("build"):  # the genome build, when the genotype files' headers do not show it
                nc["build"] = str(sc["build"])
            if sc.get("policy") is not None:
                nc["policy"] = _site_policy(name, sc["policy"], base)
            for key in ("threads", "row_cache_mb"):  # the site's resources (see nodes/README.md)
                if sc.get(key) is not None:
                    nc[key] = str(sc[key])
        node_configs[str(name)] = nc
    analyses = list(study.get("analyses") or KNOWN_ANALYSES[:3])
    unknown = [a for a in analyses if a not in KNOWN_ANALYSES]
    if unknown:
        raise ConfigError(f"study.analyses: unknown analysis {', '.join(unknown)} (known: {', '.join(KNOWN_ANALYSES)})")
    qc = study.get("qc") or {}
    for k, v in qc.items():
        if k not in ("maf", "geno", "hwe"):
            raise ConfigError(f"study.qc.{k}: unknown filter (known: maf, geno, hwe)")
        if v is not None and not (isinstance(v, (int, float)) and 0 <= float(v) <= 1):
            raise ConfigError(f"study.qc.{k} must be a number in [0, 1] or null, got {v!r}")
    if set(analyses) & {"assoc", "glm", "topk"} and not (study.get("phenotypes") or []):
        raise ConfigError(
            "study.phenotypes is required for association (study.analyses has "
            f"{', '.join(sorted(set(analyses) & {'assoc', 'glm', 'topk'}))}): name the samples-table column(s) to test, "
            "e.g. 'study.phenotypes=[T2D]'"
        )
    glm_cfg = study.get("glm") or {}
    unknown_glm = sorted(set(glm_cfg) - {"missing", "cols", "ci"})
    if unknown_glm:
        raise ConfigError(f"study.glm: unknown key(s) {', '.join(unknown_glm)} (known: missing, cols, ci)")
    from fedgen.study.glmcols import parse_cols

    glm_cols = parse_cols(glm_cfg.get("cols"))
    if study.get("sumstats", True) and "glm" in analyses:
        need = {"chrom", "pos", "ref", "alt", "se", "nobs", "err"}
        lacking = sorted(need - set(glm_cols)) + ([] if {"beta", "orbeta"} & set(glm_cols) else ["orbeta"]) \
            + ([] if "p" in glm_cols else ["p"])
        if lacking:
            raise ConfigError(f"study.glm.cols leaves out {', '.join(lacking)}, which the GWAS-SSF summary statistics "
                              "(study.sumstats) are written from: keep them, or set study.sumstats=false")
    glm_ci = glm_cfg.get("ci")
    if glm_ci is not None and not (isinstance(glm_ci, (int, float)) and 0 < float(glm_ci) < 1):
        raise ConfigError(f"study.glm.ci must be a confidence level in (0, 1) such as 0.95, or null; got {glm_ci!r}")
    missing = str(glm_cfg.get("missing", "impute"))
    if missing not in ("impute", "drop"):
        raise ConfigError(f"study.glm.missing must be impute or drop, got {missing!r}")
    dosage = study.get("dosage", False)
    if not isinstance(dosage, bool):
        raise ConfigError(f"study.dosage must be true or false, got {dosage!r}")
    out = resolved.get("output_dir")
    if not out:
        raise ConfigError("output_dir is not set")
    plan = {
        "study_id": uuid.uuid4().hex,
        "name": str(study.get("name", "study")),
        "output_dir": str((base / str(out)).expanduser().resolve()),
        "sites": list(node_configs),
        "analyses": analyses,
        "phenotypes": [str(p) for p in study.get("phenotypes") or []],
        "covariates": [str(c) for c in study.get("covariates") or []],
        "qc": {k: (None if qc.get(k) is None else float(qc[k])) for k in ("maf", "geno", "hwe")},
        "block_size": int(study.get("block_size") or 65536),
        "glm_block_size": int(study.get("glm_block_size") or 65536),
        "site_covariate": bool(study.get("site_covariate") or False),
        "missing": missing,
        "dosage": dosage,
        "glm_cols": list(glm_cols),
        "glm_ci": None if glm_ci is None else float(glm_ci),
        "lambda_without_pcs": bool(study.get("lambda_without_pcs", True)),
        "sumstats": bool(study.get("sumstats", True)),
        "timeout": float(fed.get("timeout") or 600),
        "connect_timeout": float(fed.get("connect_timeout") or 120),
        "run_timeout": float(fed.get("run_timeout") or 7200),
        # how often the aggregator asks the SuperLink for replies: `poll` s at first, then a tenth
        # of the time waited so far, at most `max_poll` s (fedgen.federation.polling)
        "poll": float(fed.get("poll") or (0.005 if fed.get("mode", "local") == "local" else 0.05)),
        "max_poll": float(fed.get("max_poll") or 0.5),
        "federation": fed.get("mode", "local"),
        # resume an interrupted study with the same output_dir and plan from its journal
        # (fedgen.study.journal); false: move an old journal aside and start afresh
        "resume": bool(fed.get("resume", True)),
        # a site that drops out mid-study: with at least min_sites left the study restarts on the
        # others, else it stops with an error (None: every site is needed; fedgen.study.runner)
        "min_sites": _min_sites(fed.get("min_sites"), len(node_configs)),
        "privacy": resolved.get("privacy") or {"mode": "none"},
        "config": resolved,
    }
    from fedgen.study.pca import pca_settings

    pcs = int(study.get("pcs") or 0)
    if pcs < 0:
        raise ConfigError("study.pcs must be 0 or a positive number of PCs")
    want_pca = "pca" in analyses or pcs > 0
    plan["pca"] = pca_settings(study.get("pca"), pcs=pcs) if want_pca else None
    plan["pcs"] = pcs
    if "model" in analyses:
        from fedgen.study.learn import model_settings

        model = model_settings(study.get("model"))
        v = model["variants"]
        if not v.startswith("top:"):  # a variant-list file, relative to where fedgen runs
            model["variants"] = str((base / v).expanduser().resolve())
        plan["model"] = model
    mode = plan["privacy"].get("mode", "none")
    dp_cfg = study.get("dp") or {}
    if not isinstance(dp_cfg, dict):
        raise ConfigError("study.dp must be a mapping (known key: panel)")
    unknown_dp = sorted(set(dp_cfg) - {"panel"})
    if unknown_dp:
        raise ConfigError(f"study.dp: unknown key(s) {', '.join(unknown_dp)} (known: panel)")
    panel = dp_cfg.get("panel")
    if panel is not None:
        if not isinstance(panel, str) or not panel:
            raise ConfigError(f"study.dp.panel must be a file of variants (one a line) or null, got {panel!r}")
        if mode != "dp":
            raise ConfigError("study.dp.panel restricts differentially private releases: use it with privacy=dp "
                              "(under privacy=none every study variant is analysed exactly)")
        panel = str((base / panel).expanduser().resolve())  # relative to where fedgen runs
    plan["dp"] = {"panel": panel}
    if mode == "dp" and "model" in analyses:
        _check_dp_model_plan(plan)
    if dosage:
        _check_dosage_plan(plan, mode)
    if mode == "dp":
        from fedgen.study.dp import check_dp_plan

        plan["privacy"] = check_dp_plan(plan)
    elif "topk" in analyses:
        raise ConfigError("study.analyses: topk is the differentially private top-k release; run it with privacy=dp")
    elif mode != "none":
        raise ConfigError(f"privacy.mode must be none or dp, got {mode!r}")
    return plan, node_configs
