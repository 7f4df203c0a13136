"""A site's policy file (``<state_dir>/policy.toml``): what the site agrees to compute and release.

This module writes the default policy and validates a policy's syntax and keys. Enforcing it
(the egress guard, the ε ledger) is the privacy layer's job; its keys are:

``version``                  policy format version (1)
``allowed_analyses``         analysis names this site runs (fedgen's analysis registry)
``min_count``                smallest number of samples a released aggregate may summarise
``epsilon_budget``           total ε the site will spend, over all studies
``delta``                    δ of each (ε, δ)-DP release
``max_variants_per_request`` largest number of variants one request may cover
``accepted_fedgen_versions`` fedgen versions whose study FABs this site accepts (its code always
                             comes from the site's installed fedgen, never from the FAB)
``accepted_fab_hashes``      SHA-256 hashes of further FABs the site accepts (hex)
``allowed_columns``          samples-table columns a study may use as phenotypes or covariates
                             (empty = every column); anything else is refused
``min_cell``                 smallest non-empty cell a released row may rest on: carriers and
                             carriers of A2 among the row's samples (default 5)
``allow_per_variant_sample_sets``  answer ``missing: drop`` requests (PLINK's per-variant drop of
                             missing calls, whose varying sample sets are a tracker); off by default
``max_sample_sets_per_study`` distinct sample sets one study may release aggregates over
``pca_rank_per_study``       largest total PCA basis width (columns, as a fraction of the site's
                             samples) one study may have the site multiply by its data
``pca_rank_lifetime``        dimension of everything PCA requests revealed over the site's lifetime
                             (the span of the sample-space projections, as a fraction of N)
``ld_max_window_bp``         largest physical span of one LD request
``dp_count_sigma``           σ of the discrete Gaussian on counts a DP-only site publishes
``extra_analyses``           analyses added to ``allowed_analyses`` (e.g. the opt-in PCA analyses,
                             left out of the default policy for the membership risk they carry)

A policy may also be given inline (a mapping) in local runs: ``sites.<name>.policy``.
:func:`load_policy` fills defaults for keys it omits and validates the result.
"""

from __future__ import annotations

import functools
import math
import tomllib
from pathlib import Path
from typing import Any

POLICY_VERSION = 1

DEFAULTS: dict[str, Any] = {
    "version": POLICY_VERSION,
    "allowed_analyses": [],  # filled from the installed analysis registry (see known_analyses)
    "min_count": 10,
    "epsilon_budget": 10.0,
    "delta": 1e-6,
    "max_variants_per_request": 65536,
    "accepted_fedgen_versions": [],  # filled with the installed version (see default_policy)
    "accepted_fab_hashes": [],
    "allowed_columns": [],
    "min_cell": 5,
    "allow_per_variant_sample_sets": False,
    "max_sample_sets_per_study": 8,
    "pca_rank_per_study": 0.25,
    "pca_rank_lifetime": 0.5,
    "ld_max_window_bp": 2_000_000,
    "dp_count_sigma": 20.0,
}

DISCLOSURE_KEYS = ("min_cell", "allow_per_variant_sample_sets", "max_sample_sets_per_study", "pca_rank_per_study",
                   "pca_rank_lifetime", "ld_max_window_bp", "dp_count_sigma")
OPTIONAL_KEYS = ("accepted_fedgen_versions", "accepted_fab_hashes", "allowed_columns", *DISCLOSURE_KEYS)
REQUIRED_KEYS = tuple(k for k in DEFAULTS if k not in OPTIONAL_KEYS)


def known_analyses() -> set[str]:
    """Names of every analysis the installed fedgen can run at a site (its registry)."""
    return set(_installed_analyses())


@functools.lru_cache(maxsize=1)
def _installed_analyses() -> frozenset[str]:
    """The registry after importing every analysis module, once per process (the guard asks per message)."""
    import importlib
    import pkgutil

    import fedgen.analyses as pkg

    pkg._load_builtin()
    for mod in pkgutil.iter_modules(pkg.__path__):
        try:
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
        except Exception:  # noqa: BLE001 - an analysis module that cannot load offers nothing
            continue
    return frozenset(pkg.REGISTRY)


def installed_version() -> str:
    import fedgen

    return fedgen.__version__


def sample_level_analyses() -> set[str]:
    """Installed analyses that release individual samples' values (never allowed by default)."""
    import fedgen.analyses as pkg

    known_analyses()
    return {name for name, spec in pkg.SPECS.items() if spec.sample_level}


def opt_in_analyses() -> dict[str, str]:
    """Installed analyses left out of the default policy for a stated disclosure risk: name -> why."""
    import fedgen.analyses as pkg

    known_analyses()
    return {name: spec.opt_in_reason for name, spec in pkg.SPECS.items() if spec.opt_in_reason}


def default_policy(analyses: list[str] | None = None) -> dict[str, Any]:
    """The default policy as a dict.

    ``allowed_analyses`` = every installed analysis except those that release individual
    samples' values (a site must name those explicitly).
    """
    if analyses is None:
        analyses = sorted(known_analyses() - sample_level_analyses() - set(opt_in_analyses()))
    return {
        **DEFAULTS,
        "allowed_analyses": sorted(analyses),
        "accepted_fedgen_versions": [installed_version()],
    }


def load_policy(source: Any) -> dict[str, Any]:
    """The effective policy from a path to ``policy.toml``, an inline mapping, or None (defaults).

    Keys the source omits take their defaults; a policy with problems raises ValueError naming them.
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        policy: dict[str, Any] = {}
        where = "default policy"
    elif isinstance(source, str) and source.lstrip().startswith("{"):  # inline, passed on as JSON
        import json

        try:
            policy = json.loads(source)
        except ValueError as exc:
            raise ValueError(f"inline policy: not valid JSON ({exc})") from None
        if not isinstance(policy, dict):
            raise ValueError("inline policy: expected a mapping")
        where = "inline policy"
    elif isinstance(source, (str, Path)):
        policy = read_policy(Path(source))
        where = str(source)
    else:
        policy = {str(k): v for k, v in dict(source).items()}
        where = "inline policy"
    for key, value in list(policy.items()):  # OmegaConf / TOML containers → plain lists
        if isinstance(value, tuple) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict))):
            policy[key] = list(value)
    extra = policy.pop("extra_analyses", [])
    if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
        raise ValueError(f"{where}: extra_analyses must be a list of analysis names")
    effective = {**default_policy(), **policy}
    if extra:  # opt-ins added to the (default or listed) analyses
        effective["allowed_analyses"] = sorted(set(effective["allowed_analyses"]) | set(extra))
    problems = validate_policy(effective, known_analyses=known_analyses())
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return effective


def default_policy_text(site: str, analyses: list[str] | None = None) -> str:
    """The policy file ``fedgen node init`` writes (TOML with comments)."""
    policy = default_policy(analyses)
    analyses_text = ",\n".join(f'    "{a}"' for a in policy["allowed_analyses"])
    sample_level = sorted(sample_level_analyses())
    sample_note = (
        f"Not listed by default because they release single samples' values: {', '.join(sample_level)}."
        if sample_level else "No installed analysis releases single samples' values."
    )
    opt = opt_in_analyses()
    if opt:
        sample_note += ("\n# Not listed by default for the disclosure risk they carry (docs/THREAT_MODEL.md); add them only\n"
                        "# if the site accepts it (extra_analyses = [...] adds them to the default list):\n"
                        "#   PCA (pca_product, pca_scores) reveals cohort membership;\n"
                        "#   logistic/Firth rounds (glm_logistic, glm_firth) at aggregator-chosen coefficients can\n"
                        "#   reconstruct people with a unique covariate value.")
    return f"""\
# fedgen site policy for site "{site}": what this site agrees to compute and release.
# Only this site edits this file; the aggregator cannot change it. Check it after editing with
#   fedgen node check --config <node.toml>
version = {POLICY_VERSION}

# Analyses this node agrees to run for a study (names from fedgen's analysis registry).
# Names starting with dp_ are differentially private releases, charged to the privacy budget.
# {sample_note}
allowed_analyses = [
{analyses_text},
]

# Smallest number of samples an aggregate released by this site may summarise.
min_count = {DEFAULTS["min_count"]}

# Differential privacy: total epsilon this site will spend over all studies, and the delta
# of each (epsilon, delta)-DP release.
epsilon_budget = {DEFAULTS["epsilon_budget"]!r}
delta = {DEFAULTS["delta"]!r}

# Largest number of variants one request may cover.
max_variants_per_request = {DEFAULTS["max_variants_per_request"]}

# Which study FABs this node accepts. Whatever a FAB contains, this node runs only the
# ClientApp of its own installed fedgen; a run whose FAB is not accepted here is refused
# before any data is opened. A fedgen study FAB (manifest only, no code) is accepted when it
# names one of these fedgen versions; add SHA-256 hashes to accept specific other FABs.
accepted_fedgen_versions = [{", ".join(f'"{v}"' for v in policy["accepted_fedgen_versions"])}]
accepted_fab_hashes = []

# Samples-table columns a study may use as phenotypes or covariates (empty = every column).
# List them to keep identifiers, dates and other columns out of every aggregate.
allowed_columns = []

# Disclosure rules (docs/THREAT_MODEL.md names the attack each one stops).
# Smallest non-empty cell a released row may rest on (carriers of either allele).
min_cell = {DEFAULTS["min_cell"]}
# PLINK's per-variant drop of missing calls (study.glm.missing: drop) gives every variant its own
# sample set, which differencing turns into individual values. Off: missing calls are imputed.
allow_per_variant_sample_sets = false
# Distinct sample sets (phenotype/covariate missingness patterns) one study may use.
max_sample_sets_per_study = {DEFAULTS["max_sample_sets_per_study"]}
# PCA (only if allowed above): total basis width per study, and the dimension of everything PCA
# requests have revealed over the site's lifetime, as fractions of its samples. Below 1, the
# site's genotype relationship matrix is never revealed in full.
pca_rank_per_study = {DEFAULTS["pca_rank_per_study"]!r}
pca_rank_lifetime = {DEFAULTS["pca_rank_lifetime"]!r}
# Largest physical span of one LD request (base pairs).
ld_max_window_bp = {DEFAULTS["ld_max_window_bp"]}
# A site whose policy allows only DP releases publishes its counts with this much discrete
# Gaussian noise (charged to the budget once per version of its data).
dp_count_sigma = {DEFAULTS["dp_count_sigma"]!r}
"""


def read_policy(path: Path) -> dict[str, Any]:
    """Parse a policy file; raise ValueError with a message naming the file on bad TOML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: policy file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read policy file ({exc})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None


def validate_policy(policy: dict[str, Any], *, known_analyses: set[str] | None = None) -> list[str]:
    """Problems with a parsed policy (empty list = valid)."""
    problems: list[str] = []
    unknown = sorted(set(policy) - set(DEFAULTS))
    if unknown:
        problems.append(f"unknown key(s): {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    missing = [k for k in REQUIRED_KEYS if k not in policy]
    if missing:
        problems.append(f"missing key(s): {', '.join(missing)}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return (is_int(v) or isinstance(v, float)) and math.isfinite(float(v))

    if "version" in policy and policy["version"] != POLICY_VERSION:
        problems.append(f"version must be {POLICY_VERSION}, got {policy['version']!r}")
    if "allowed_analyses" in policy:
        a = policy["allowed_analyses"]
        if isinstance(a, tuple):
            a = list(a)
        if not isinstance(a, list) or not all(isinstance(x, str) and x for x in a):
            problems.append("allowed_analyses must be a list of analysis names")
        else:
            if not a:
                problems.append("allowed_analyses is empty (the node would refuse every request)")
            if known_analyses is not None:
                bad = sorted(set(a) - set(known_analyses))
                if bad:
                    problems.append(
                        f"allowed_analyses: unknown analysis {', '.join(bad)} (this fedgen knows: {', '.join(sorted(known_analyses))})"
                    )
    if "min_count" in policy and not (is_int(policy["min_count"]) and policy["min_count"] >= 1):
        problems.append(f"min_count must be a whole number >= 1, got {policy['min_count']!r}")
    if "epsilon_budget" in policy and not (is_num(policy["epsilon_budget"]) and policy["epsilon_budget"] > 0):
        problems.append(f"epsilon_budget must be a number > 0, got {policy['epsilon_budget']!r}")
    if "delta" in policy and not (is_num(policy["delta"]) and 0 < policy["delta"] < 1):
        problems.append(f"delta must be a number in (0, 1), got {policy['delta']!r}")
    if "max_variants_per_request" in policy and not (
        is_int(policy["max_variants_per_request"]) and policy["max_variants_per_request"] >= 1
    ):
        problems.append(f"max_variants_per_request must be a whole number >= 1, got {policy['max_variants_per_request']!r}")
    if "min_cell" in policy and not (is_int(policy["min_cell"]) and policy["min_cell"] >= 1):
        problems.append(f"min_cell must be a whole number >= 1, got {policy['min_cell']!r}")
    if "allow_per_variant_sample_sets" in policy and not isinstance(policy["allow_per_variant_sample_sets"], bool):
        problems.append("allow_per_variant_sample_sets must be true or false")
    if "max_sample_sets_per_study" in policy and not (is_int(policy["max_sample_sets_per_study"]) and policy["max_sample_sets_per_study"] >= 1):
        problems.append(f"max_sample_sets_per_study must be a whole number >= 1, got {policy['max_sample_sets_per_study']!r}")
    for key in ("pca_rank_per_study", "pca_rank_lifetime"):
        if key in policy and not (is_num(policy[key]) and policy[key] > 0):
            problems.append(f"{key} must be a number > 0 (a fraction of the site's samples), got {policy[key]!r}")
    if "ld_max_window_bp" in policy and not (is_int(policy["ld_max_window_bp"]) and policy["ld_max_window_bp"] >= 1):
        problems.append(f"ld_max_window_bp must be a whole number >= 1, got {policy['ld_max_window_bp']!r}")
    if "dp_count_sigma" in policy and not (is_num(policy["dp_count_sigma"]) and policy["dp_count_sigma"] > 0):
        problems.append(f"dp_count_sigma must be a number > 0, got {policy['dp_count_sigma']!r}")
    if "accepted_fedgen_versions" in policy:
        v = policy["accepted_fedgen_versions"]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            problems.append("accepted_fedgen_versions must be a list of version strings")
    if "allowed_columns" in policy:
        c = policy["allowed_columns"]
        if not isinstance(c, list) or not all(isinstance(x, str) and x for x in c):
            problems.append("allowed_columns must be a list of column names (empty = every column)")
    if "accepted_fab_hashes" in policy:
        h = policy["accepted_fab_hashes"]
        if not isinstance(h, list) or not all(
            isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x.lower()) for x in h
        ):
            problems.append("accepted_fab_hashes must be a list of 64-character hex SHA-256 hashes")
    return problems
