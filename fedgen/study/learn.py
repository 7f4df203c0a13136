"""Federated risk models at the aggregator: feature choice, FedAvg rounds, model export and card.

Every round sends the current weights to every site as a Flower ``train`` message
(``dp_model_update``, or ``model_update`` without DP where the sites' policies allow it; layout in
:mod:`fedgen.federation.train`); each site trains locally in its ``@app.train()`` handler, through
its site pipeline, and replies its new weights with its number of people; the aggregator combines
them with ``flwr.serverapp.strategy.FedAvg.aggregate_train`` (weighted by ``num-examples``;
McMahan et al. 2017). The evaluation of each round's model on the held-out people is a query
round of its own, right after the training round. The model, its features and standardisation go to ``model/model.json``,
a model card to ``model/card.md``; ``fedgen score`` applies the model at a site.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.errors import ConfigError, FedgenError
from fedgen.federation.transport import Request
from fedgen.learn import evaluate, models
from fedgen.learn.train import steps_per_epoch
from fedgen.stats.qc import variant_alt_freq
from fedgen.study.writers import atomic_write_text

log = logging.getLogger("fedgen.study")

MODEL_DEFAULTS: dict[str, Any] = {
    "phenotype": None,
    "covariates": [],
    "variants": "top:50",
    "clump_kb": 250,
    "kind": "logistic",
    "hidden": 16,
    "rounds": 10,
    "local_epochs": 1,
    "batch": 256,
    "lr": 0.5,
    "clip": 1.0,
    "dp": True,
    "epsilon": 3.0,
    "seed": 1,
    # evaluation on each site's held-out people, after every round (issue 15 §3)
    "holdout": 0.2,
    "eval_share": 0.1,
    "eval_bins": None,  # None: 20 under DP (fewer noisy cells), 200 for exact evaluation
    "eval_range": None,  # quantitative trait: [lo, hi] y and ŷ are clipped to (None: pooled mean ± 4 SD)
}

#: bins of the held-out histograms when study.model.eval_bins is not set
DP_BINS, EXACT_BINS = 20, 200


def model_settings(m: Any) -> dict[str, Any]:
    """``study.model`` validated, defaults filled; ConfigError naming the field."""
    m = dict(m or {})
    unknown = sorted(set(m) - set(MODEL_DEFAULTS))
    if unknown:
        raise ConfigError(f"study.model: unknown key(s) {', '.join(unknown)} (known: {', '.join(MODEL_DEFAULTS)})")
    cfg = {**MODEL_DEFAULTS, **m}
    if not isinstance(cfg["phenotype"], str) or not cfg["phenotype"]:
        raise ConfigError("study.model.phenotype is required: the samples-table column the model predicts")
    if cfg["kind"] not in models.KINDS:
        raise ConfigError(f"study.model.kind must be one of {', '.join(models.KINDS)}")
    for key, lo, hi in (("rounds", 1, 1000), ("local_epochs", 1, 100), ("batch", 1, 10**7), ("hidden", 1, models.MAX_HIDDEN),
                        ("clump_kb", 0, 10**5)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ConfigError(f"study.model.{key} must be a whole number in [{lo}, {hi}], got {v!r}")
    for key in ("lr", "clip", "epsilon"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(float(v)) and float(v) > 0):
            raise ConfigError(f"study.model.{key} must be a positive number, got {v!r}")
    h = cfg["holdout"]
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not (float(h) == 0 or 0.01 <= float(h) <= 0.9):
        raise ConfigError(f"study.model.holdout must be 0 (no evaluation) or a fraction in [0.01, 0.9], got {h!r}")
    e = cfg["eval_share"]
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < float(e) < 1:
        raise ConfigError(f"study.model.eval_share must be a fraction in (0, 1), got {e!r}")
    b = cfg["eval_bins"]
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 1000):
        raise ConfigError(f"study.model.eval_bins must be a whole number in [2, 1000], got {b!r}")
    r = cfg["eval_range"]
    if r is not None:
        r = list(r)
        if len(r) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r) or not r[0] < r[1]:
            raise ConfigError(f"study.model.eval_range must be [lo, hi] with lo < hi, got {cfg['eval_range']!r}")
        cfg["eval_range"] = [float(r[0]), float(r[1])]
    if not isinstance(cfg["variants"], str) or not cfg["variants"]:
        raise ConfigError("study.model.variants must be 'top:N' or a variant-list file")
    cfg["covariates"] = [str(c) for c in cfg["covariates"] or []]
    cfg["dp"] = bool(cfg["dp"])
    return cfg


def _variant_keys(aln: Any) -> dict[str, int]:
    keys: dict[str, int] = {}
    for i, (c, p, vid, r, a) in enumerate(zip(aln.chrom.tolist(), aln.pos.tolist(), aln.ids.tolist(), aln.ref.tolist(), aln.alt.tolist())):
        keys[f"{c}:{p}:{r}:{a}"] = i
        keys[f"{c}:{p}:{a}:{r}"] = i
        if vid and vid != ".":
            keys.setdefault(str(vid), i)
    return keys


def select_features(cfg: dict[str, Any], aln: Any, assoc: dict[str, Any] | None, base: Path | None = None) -> tuple[np.ndarray, str]:
    """Study variant rows used as features, and how they were chosen (for the card)."""
    spec = cfg["variants"]
    if spec.startswith("top:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise ConfigError(f"study.model.variants: 'top:N' needs a whole number, got {spec!r}") from None
        res = (assoc or {}).get("association", {}).get(cfg["phenotype"])
        if not res or "mlog10p" not in res or assoc.get("rows") is None:
            raise ConfigError(f"study.model.variants = {spec}: the study has no association result for "
                              f"{cfg['phenotype']!r} to take the top hits from (add it to study.phenotypes)")
        rows, m = np.asarray(assoc["rows"]), np.asarray(res["mlog10p"], dtype=float)
        order = np.argsort(np.where(np.isfinite(m), -m, np.inf), kind="stable")
        chosen: list[int] = []
        window = int(cfg["clump_kb"]) * 1000
        for j in order.tolist():
            if not np.isfinite(m[j]) or len(chosen) >= n:
                break
            r = int(rows[j])
            if any(aln.chrom[r] == aln.chrom[c] and abs(int(aln.pos[r]) - int(aln.pos[c])) < window for c in chosen):
                continue
            chosen.append(r)
        if not chosen:
            raise FedgenError(f"{cfg['phenotype']}: no tested variant to use as a model feature")
        kind = "differentially private top-k release" if res.get("dp") else "exact GWAS"
        how = (f"top {len(chosen)} hits of this study's {kind} of {cfg['phenotype']} ({res.get('test', 'regression')}), "
               f"clumped by position ({cfg['clump_kb']} kb)")
        return np.asarray(chosen, dtype=np.int64), how
    path = Path(spec).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        wanted = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError as exc:
        raise ConfigError(f"study.model.variants: cannot read {path} ({exc.strerror})") from None
    keys = _variant_keys(aln)
    found = [keys[w] for w in wanted if w in keys]
    missing = [w for w in wanted if w not in keys]
    if not found:
        raise ConfigError(f"study.model.variants: none of the {len(wanted)} variants of {path} is shared by all sites")
    if missing:
        log.warning("model: %d of %d listed variants are not shared by all sites (e.g. %s)", len(missing), len(wanted),
                    ", ".join(missing[:3]))
    return np.asarray(sorted(set(found)), dtype=np.int64), f"{len(found)} of {len(wanted)} variants listed in {path.name}"


def run_risk_model(ctx: Any, stage: Path, info: dict[str, Any], aln: Any, counts: np.ndarray, assoc: dict[str, Any] | None,
                   covs: list[dict[str, Any]] | None = None, alt_freq: np.ndarray | None = None) -> dict[str, Any]:
    """Train the study's risk model (``ctx.plan["model"]``) with FedAvg; write ``model/``; return its summary."""
    from fedgen.analyses.learn import noise_multiplier_for
    from fedgen.study.gwas import phenotype_kind, prepare_covariates

    cfg = model_settings(ctx.plan.get("model"))
    kind = phenotype_kind(info, cfg["phenotype"])
    rows, how = select_features(cfg, aln, assoc, Path(ctx.plan.get("config_dir") or "."))
    from fedgen.study.runner import autosomal

    rows = rows[autosomal(aln)[rows]]  # sites score diploid dosages: autosomes only
    # scored allele: the minor allele by pooled frequency; standardised with its pooled frequency
    # (privacy=dp passes ``alt_freq``, the post-processed frequencies of freq.afreq)
    f_alt = np.asarray(alt_freq, dtype=np.float64)[rows] if alt_freq is not None else variant_alt_freq(np.asarray(counts)[rows])[0]
    flip = f_alt > 0.5
    freq = np.where(flip, 1 - f_alt, f_alt)
    ok = np.isfinite(freq) & (freq > 0) & (freq < 1)
    rows, flip, freq = rows[ok], flip[ok], freq[ok]
    if covs is None:
        saved = ctx.plan.get("covariates")
        ctx.plan["covariates"] = cfg["covariates"]
        try:
            covs, _, cov_columns = prepare_covariates(ctx, info)
        finally:
            ctx.plan["covariates"] = saved
    else:
        cov_columns = [c["name"] for c in covs]
    n_cov = sum(1 if c["kind"] == "numeric" else len(c["levels"]) - 1 for c in covs)
    n_features = len(rows) + n_cov
    sizes = {s: int(r.meta["counts"]["samples"]) for s, r in info.items()}
    q = {s: min(1.0, cfg["batch"] / max(n, 1)) for s, n in sizes.items()}
    steps = {s: cfg["local_epochs"] * steps_per_epoch(q[s]) for s in sizes}
    delta = {s: float((r.meta.get("policy") or {}).get("delta", 1e-6)) for s, r in info.items()}
    train: dict[str, Any] = {"epochs": cfg["local_epochs"], "sample_rate": q, "lr": float(cfg["lr"])}
    params = {"phenotype": cfg["phenotype"], "kind": kind, "covariates": covs, "missing": "impute",
              "model": {"kind": cfg["kind"], "hidden": int(cfg["hidden"])}, "holdout": float(cfg["holdout"])}
    ev = _evaluation_plan(ctx, cfg, kind, delta, info)
    if cfg["dp"]:
        extra = [] if ev["analysis"] != "dp_model_eval" else [
            {"type": "gaussian", "sigma": ev["sigma"], "l2": 1.0, "count": cfg["rounds"]}]
        z = {s: noise_multiplier_for(float(cfg["epsilon"]), delta[s], sample_rate=q[s], steps=steps[s] * cfg["rounds"],
                                     extra=extra) for s in sizes}
        train.update(clip=float(cfg["clip"]), noise_multiplier=z)
        if extra:
            train["eval_sigma"] = ev["sigma"]  # the sites check the evaluation releases against their budget too
        analysis = "dp_model_update"
    else:
        refusing = ctx.sites_not_allowing("model_update")
        if refusing:
            raise ConfigError(f"study.model.dp = false needs sites that allow non-private model updates; the policy of "
                              f"site(s) {', '.join(refusing)} does not (extra_analyses = [\"model_update\"])")
        analysis = "model_update"
    weights = models.initial_weights(cfg["kind"], n_features, hidden=int(cfg["hidden"]), seed=int(cfg["seed"]))
    per_site = {s: {"idx": aln.idx[s][rows], "flip": (aln.flip[s][rows] ^ flip).astype(np.uint8)} for s in aln.idx}
    curve: list[dict[str, Any]] = []
    spent: dict[str, float] = {}
    n_site: dict[str, int] = {}
    log.info("model: %s on %d features (%d variants, %d covariate columns), %d rounds, %s; evaluation: %s", cfg["kind"],
             n_features, len(rows), n_cov, cfg["rounds"], "DP-SGD" if cfg["dp"] else "no DP", ev["analysis"] or ev["note"])
    from fedgen.progress import Progress

    def eval_request(w: np.ndarray) -> Request:
        p = {k: v for k, v in params.items()}
        if kind == "binary":
            lo, hi = evaluate.window(w, cfg["kind"], n_features)
            p["bins"] = {"lo": lo, "hi": hi, "n": ev["bins"]}
        elif ev["range"] is not None:
            p["range"] = ev["range"]
        if ev["analysis"] == "dp_model_eval":
            p["sigma"] = ev["sigma"]
        return Request(ev["analysis"], params=p, arrays={"freq": freq, "weights": w}, per_site_arrays=per_site)

    def record(entry: dict[str, Any], replies: dict[str, Any]) -> None:
        entry.update(_evaluate(kind, replies, ev))
        entry["eval_bytes"] = {s: int(rep.nbytes) for s, rep in replies.items()}

    progress = Progress("model training", cfg["rounds"], unit="rounds", every=0.0)
    def note_spent(replies: dict[str, Any]) -> None:
        for s, rep in replies.items():
            pv = rep.meta.get("privacy") or {}
            if "site_epsilon_spent" in pv:
                spent[s] = float(pv["site_epsilon_spent"])

    from fedgen.federation.train import fedavg

    for r in range(cfg["rounds"]):
        req = Request(analysis, params={**params, "train": {**train, "remaining_rounds": cfg["rounds"] - r}},
                      arrays={"freq": freq, "weights": weights}, per_site_arrays=per_site)
        with ctx.timed(f"model_round_{r + 1}"):
            replies = ctx.train(req)  # Flower train messages; each site's @app.train() through its pipeline
        n_site = {s: int(rep.meta["n"]) for s, rep in replies.items()}
        weights = fedavg(replies, r + 1)  # flwr.serverapp.strategy.FedAvg.aggregate_train, by num-examples
        note_spent(replies)
        curve.append({"round": r + 1, "weight_norm": float(np.linalg.norm(weights)),
                      "bytes": {s: int(rep.nbytes) for s, rep in replies.items()}})
        if ev["analysis"]:  # this round's model on the held-out people: a query round of its own
            with ctx.timed("model_eval"):
                answered = ctx.query(eval_request(weights))
            record(curve[-1], answered)
            note_spent(answered)
        progress.update(r + 1)
    features = [{"chrom": str(aln.chrom[i]), "pos": int(aln.pos[i]), "id": str(aln.ids[i]), "ref": str(aln.ref[i]),
                 "alt": str(aln.alt[i]), "scored_allele": str(aln.ref[i] if fl else aln.alt[i]), "freq": float(fr)}
                for i, fl, fr in zip(rows.tolist(), flip.tolist(), freq.tolist())]
    model = {
        "format": "fedgen-model", "version": 1, "kind": cfg["kind"], "hidden": int(cfg["hidden"]),
        "phenotype": cfg["phenotype"], "trait": kind, "variants": features, "covariates": covs,
        "covariate_columns": cov_columns, "standardisation": "(dosage of scored allele - 2 freq) / sqrt(2 freq (1 - freq)); "
        "missing call = 0; numeric covariates (x - mean) / sd; categorical: indicators of levels[1:]",
        "weights": weights.tolist(), "features_chosen": how,
    }
    training = {"rounds": cfg["rounds"], "local_epochs": cfg["local_epochs"], "lr": cfg["lr"], "batch": cfg["batch"],
                "dp": cfg["dp"], "sites": n_site, "sample_rate": q, "steps_per_round": steps,
                "clip": cfg["clip"] if cfg["dp"] else None, "noise_multiplier": train.get("noise_multiplier"),
                "epsilon_target": cfg["epsilon"] if cfg["dp"] else None, "delta": delta if cfg["dp"] else None,
                "site_epsilon_spent": spent, "curve": curve,
                "holdout": float(cfg["holdout"]), "evaluation": dict(ev)}
    model["training"] = training
    folder = stage / "model"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "model.json", json.dumps(model, indent=1))
    atomic_write_text(folder / "card.md", model_card(model))
    per_round = [{k: c[k] for k in c if k in EVAL_KEYS or k == "round"} for c in curve]
    return {"files": ["model/model.json", "model/card.md"], "summary": {k: v for k, v in training.items() if k != "curve"}
            | {"features": len(features), "covariate_columns": cov_columns, "features_chosen": how,
               "evaluation_per_round": per_round if ev["analysis"] else []}}


#: the evaluation figures a training-curve entry may carry
EVAL_KEYS = ("auc", "auc_se", "auc_tie_bound", "r2", "r2_se", "n_eval")


def _evaluation_plan(ctx: Any, cfg: dict[str, Any], kind: str, delta: dict[str, float], info: dict[str, Any]) -> dict[str, Any]:
    """How the held-out people are evaluated: the analysis, its noise, bins or range (or why not at all)."""
    from fedgen.privacy.accounting import rho_for_epsilon

    ev: dict[str, Any] = {"analysis": None, "note": "", "sigma": None, "bins": None, "range": cfg["eval_range"],
                          "epsilon": None, "holdout": float(cfg["holdout"])}
    if float(cfg["holdout"]) == 0:
        ev["note"] = "no held-out split (study.model.holdout = 0)"
        return ev
    if cfg["dp"]:
        # a share of each site's ε: `rounds` releases of unit L2 sensitivity compose (zCDP/RDP) to
        # eval_share × ε at the smallest δ of the sites; DP-SGD gets the rest (noise_multiplier_for)
        eps_eval = float(cfg["eval_share"]) * float(cfg["epsilon"])
        rho = rho_for_epsilon(eps_eval, min(delta.values())) / cfg["rounds"]
        ev.update(analysis="dp_model_eval", sigma=1.0 / math.sqrt(2.0 * rho), epsilon=eps_eval,
                  bins=int(cfg["eval_bins"] or DP_BINS))
    else:
        refusing = ctx.sites_not_allowing("model_eval_exact")
        if refusing:
            ev["note"] = (f"skipped: exact evaluation of a non-private model needs sites that opt in (extra_analyses = "
                          f"[\"model_eval_exact\"]); {', '.join(refusing)} did not")
            log.warning("model: evaluation %s", ev["note"])
            return ev
        ev.update(analysis="model_eval_exact", bins=int(cfg["eval_bins"] or EXACT_BINS))
    if kind != "binary":
        ev["bins"] = None
        if ev["range"] is None and cfg["dp"]:
            ev["range"] = _phenotype_range(ctx, cfg["phenotype"])
    return ev


def _phenotype_range(ctx: Any, phenotype: str) -> list[float]:
    """Pooled mean ± 4 SD of a quantitative phenotype (the clipping range of the DP R² sums)."""
    from fedgen.study.engine import sum_replies

    mom = sum_replies(ctx.query(Request("covar_moments", params={"names": [phenotype]})))["moments"][0]
    sx, sxx, n = (float(x) for x in mom)
    mean = sx / max(n, 1.0)
    sd = math.sqrt(max((sxx - n * mean * mean) / max(n - 1, 1.0), 1e-12))
    return [mean - 4 * sd, mean + 4 * sd]


def _evaluate(kind: str, replies: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    """Pooled AUC (summed histograms) or R² (summed sums) of one evaluation round, with the noise SE."""
    from fedgen.learn import evaluate as E

    if kind == "binary":
        hist = sum(np.asarray(rep.arrays["hist"], dtype=np.float64) for rep in replies.values())
        auc, tie = E.histogram_auc(hist[0], hist[1])
        sigmas = [float(rep.meta.get("sigma") or 0.0) for rep in replies.values()]
        se = E.histogram_auc_se(hist[0], hist[1], sum(x * x for x in sigmas))
        return {"auc": auc, "auc_se": se, "auc_tie_bound": tie, "n_eval": float(np.clip(hist, 0, None).sum())}
    sums = sum(np.asarray(rep.arrays["sums"], dtype=np.float64) for rep in replies.values())
    var = [0.0] * 4
    for rep in replies.values():
        for k, sd in enumerate(rep.meta.get("noise_sd") or [0.0] * 4):
            var[k] += float(sd) ** 2
    srr, sy, syy, n = (float(x) for x in sums)
    return {"r2": E.pooled_r2(srr, sy, syy, n), "r2_se": E.pooled_r2_se(srr, sy, syy, n, tuple(var)), "n_eval": n}


def model_card(model: dict[str, Any]) -> str:
    t = model["training"]
    lines = [
        f"# Risk model: {model['phenotype']} ({model['trait']})", "",
        f"- Model: {model['kind']}" + (f" (hidden {model['hidden']})" if model["kind"] == "mlp" else "")
        + f", {len(model['variants'])} variants + {len(model['covariate_columns'])} covariate columns "
        f"({', '.join(model['covariate_columns']) or 'none'})",
        f"- Features: {model['features_chosen']}",
        f"- Training: FedAvg over {len(t['sites'])} sites, {t['rounds']} rounds of {t['local_epochs']} local epoch(s), "
        f"learning rate {t['lr']}, expected batch {t['batch']}",
        "- People per site: " + ", ".join(f"{s}: {n}" for s, n in t["sites"].items()),
    ]
    if t["dp"]:
        lines += [
            f"- Privacy: DP-SGD (Opacus) at each site, clipping norm {t['clip']}, noise multiplier "
            + ", ".join(f"{s}: {z:.3g}" for s, z in (t["noise_multiplier"] or {}).items())
            + ", sampling rate " + ", ".join(f"{s}: {q:.3g}" for s, q in t["sample_rate"].items()),
            f"- Target ε per site {t['epsilon_target']} at δ " + ", ".join(f"{s}: {d:g}" for s, d in (t["delta"] or {}).items())
            + "; site ε after training (all releases on its ledger): "
            + ", ".join(f"{s}: {e:.3g}" for s, e in t["site_epsilon_spent"].items()),
        ]
    else:
        lines.append("- Privacy: none (sites that allowed non-private updates)")
    lines += [
        "", "## Intended use",
        "Risk stratification research at the contributing hospitals: a site scores its own patients with "
        "`fedgen score`. Not validated for clinical decisions; check calibration on each population before use.",
        "", "## Evaluation", *evaluation_lines(t), "",
        "A site can also evaluate the model on its own patients (`fedgen score --phenotype`); no per-person "
        "prediction leaves a site.", "",
    ]
    return "\n".join(lines)


def evaluation_lines(t: dict[str, Any]) -> list[str]:
    """The card's per-round evaluation on the sites' held-out people."""
    ev = t.get("evaluation") or {}
    if not ev.get("analysis"):
        return [f"No federated evaluation: {ev.get('note') or 'not run'}."]
    binary = any("auc" in c for c in t["curve"])
    what = "AUC" if binary else "R²"
    out = [f"Each site held out {100 * ev['holdout']:.0f}% of its people (keyed hash of sample ID and study id; never "
           "trained on) and, after every round, scored them with the current weights."]
    if binary:
        out.append(f"It sent per-class histograms of the logit ({ev['bins']} equal bins on a window set from the weights); "
                   "the AUC is computed from the histograms summed over sites, pairs within a bin counting one half. Its "
                   "difference from the exact AUC of the pooled held-out people is at most the tie bound.")
    else:
        out.append("It sent Σ(y−ŷ)², Σy, Σy² and n" + (f" (y and ŷ clipped to [{ev['range'][0]:.4g}, {ev['range'][1]:.4g}])"
                                                       if ev.get("range") else "") + "; R² is computed from their sums.")
    if ev["analysis"] == "dp_model_eval":
        out.append(f"Differentially private: discrete Gaussian noise σ = {ev['sigma']:.4g} per cell/sum at each site "
                   f"(L2 sensitivity 1), ε = {ev['epsilon']:.3g} of each site's ε for all rounds together; the SE is the "
                   "noise's.")
    else:
        out.append("Exact (sites that opted in to model_eval_exact); histogram bins with a class cell of 1..min_cell−1 "
                   "people are merged.")
    out += ["", f"| round | {what} | noise SE |" + (" tie bound |" if binary else "") + " people |",
            "| --- | --- | --- |" + (" --- |" if binary else "") + " --- |"]
    for c in t["curve"]:
        if what == "AUC" and "auc" in c:
            out.append(f"| {c['round']} | {c['auc']:.4f} | {c['auc_se']:.4f} | {c['auc_tie_bound']:.4f} | {c['n_eval']:.0f} |")
        elif what == "R²" and "r2" in c:
            out.append(f"| {c['round']} | {c['r2']:.4f} | {c['r2_se']:.4f} | {c['n_eval']:.0f} |")
    return out
