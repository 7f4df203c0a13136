"""Packaging for sites: a site-node install (``pip install 'fedgen[node]'``) carries no study-side
packages and still answers every analysis; the node's container image installs exactly that.

The slow test builds a fresh virtual environment the way a hospital's IT would (torch's CPU
wheel first, then ``fedgen[node]`` from this source tree), and replays through the installed
ClientApp the requests that real studies (QC, PCA, association, regression, DP releases, DP-SGD
and plain training) sent to one site in this process.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: packages of the ``study`` extra, by import name; a site-node install has none of them
STUDY_ONLY = ["msprime", "tskit", "matplotlib", "hydra", "omegaconf", "sklearn", "plotly", "pandas"]
#: the torch a venv here must get first (a CPU wheel of exactly this version is on disk)
TORCH = "torch==2.13.0"
#: analyses whose replies carry fresh noise (values differ run to run; shapes do not)
RANDOMISED = {"dp_genotype_counts", "dp_assoc_counts", "dp_topk_select", "dp_model_update", "dp_model_eval"}
#: the node image runs as this user; compose's FEDGEN_UID/GID example and the runbook use it too
NODE_UID = 10001


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}


# ---------------------------------------------------------------- the dependency split (fast)


def test_base_install_is_the_site_node_and_study_packages_are_an_extra():
    proj = _pyproject()["project"]
    base, extras = _names(proj["dependencies"]), proj["optional-dependencies"]
    study_dists = {"msprime", "matplotlib", "hydra-core", "omegaconf", "scikit-learn", "plotly", "pandas"}
    assert not base & study_dists, f"site-node install would pull {sorted(base & study_dists)}"
    assert {"flwr", "numpy", "scipy", "pysam", "pgenlib", "torch", "opacus", "dp-accounting", "cryptography"} <= base
    assert "torch>=2.2,<=2.13.0" in proj["dependencies"]
    assert extras["node"] == []
    assert study_dists <= _names(extras["study"])
    assert any(r.startswith("fedgen[") and "study" in r for r in extras["all"])
    assert "pytest" in _names(extras["test"])
    # the developer/CI install: torch first, then the study and test extras (`.ci/run` runs `make test`)
    make = (ROOT / "Makefile").read_text()
    torch_at, study_at = make.index(f"install --quiet {TORCH}"), make.index("install --quiet -e '.[study,test]'")
    assert torch_at < study_at


_BLOCK_STUDY = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def _python_without_study(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in this interpreter with the study packages made unimportable."""
    script = tmp_path / "without_study.py"
    script.write_text(_BLOCK_STUDY + textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), ",".join(STUDY_ONLY)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


def test_site_code_path_imports_without_study_packages(tmp_path):
    """The site's modules, every analysis and the `fedgen` parser load with the study extra absent;
    study-only commands say which extra they need (exit code 2, no traceback)."""
    r = _python_without_study("""
        import fedgen.federation.client_app, fedgen.federation.superexec, fedgen.federation.supernode
        import fedgen.node.cli, fedgen.node.check, fedgen.node.ops, fedgen.site.pipeline
        from fedgen.analyses import REGISTRY, _load_builtin
        _load_builtin()
        assert "dp_model_update" in REGISTRY and "glm_firth" in REGISTRY and "pca_scores" in REGISTRY
        from fedgen.cli import main
        print("run", main(["run", "study=qc"]))
        print("simulate", main(["simulate", "--out", "x"]))
        print("aggregator", main(["aggregator", "start", "--config", "nowhere.toml"]))
        main(["node", "--help"])
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "run 2" in r.stdout and "simulate 2" in r.stdout and "aggregator 2" in r.stdout and "fedgen node init" in r.stdout
    assert "fedgen aggregator start needs the study extra (module 'hydra'" in r.stderr
    assert "fedgen run needs the study extra (module 'hydra' is not installed): pip install 'fedgen[study]'" in r.stderr
    assert "fedgen simulate needs the study extra (module 'msprime'" in r.stderr
    assert "Traceback" not in r.stderr


def test_other_import_errors_are_not_blamed_on_the_study_extra():
    from fedgen.cli import _need_study_extra

    err = _need_study_extra(ModuleNotFoundError("No module named 'hydra.core'", name="hydra.core"), "run")
    assert "pip install 'fedgen[study]'" in str(err)
    with pytest.raises(ModuleNotFoundError, match="flwr"):
        _need_study_extra(ModuleNotFoundError("No module named 'flwr'", name="flwr"), "run")


def test_auc_without_scikit_learn_equals_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    from fedgen.learn.score import roc_auc

    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(2, 80))
        y = rng.integers(0, 2, n).astype(float)
        if y.min() == y.max():
            continue
        s = np.round(rng.normal(size=n), 1)  # ties
        assert roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)


# ---------------------------------------------------------------- the container image (offline)


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of nodes/compose/Dockerfile, continuation lines joined."""
    text = (ROOT / "nodes" / "compose" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def test_node_image_installs_the_node_extra_and_runs_as_the_state_owner():
    steps = _dockerfile()
    runs = [a for i, a in steps if i == "RUN"]
    torch = [k for k, a in enumerate(runs) if re.search(r"pip install .*\btorch==2\.13\.0\b", a)]
    node = [k for k, a in enumerate(runs) if re.search(r"pip install .*\S+\[node\]", a)]
    assert torch and node and torch[0] < node[0], "the image installs torch's CPU wheel, then fedgen[node]"
    assert not any(re.search(r"\[(study|all|test)[],]", a) for a in runs), "a node image has no study or test extra"
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1].split(":")[0] == str(NODE_UID)
    assert any(f"--uid {NODE_UID}" in a for a in runs)
    assert [a for i, a in steps if i == "ENTRYPOINT"][-1] == '["fedgen"]'
    # compose runs it as the state folder's owner; the example .env and the runbook make that 10001
    env = dict(line.split("=", 1) for line in (ROOT / "nodes" / "compose" / "env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["FEDGEN_UID"] == env["FEDGEN_GID"] == str(NODE_UID)
    compose = (ROOT / "nodes" / "compose" / "compose.yaml").read_text()
    assert 'user: "${FEDGEN_UID:?set FEDGEN_UID}:${FEDGEN_GID:?set FEDGEN_GID}"' in compose
    assert "dockerfile: nodes/compose/Dockerfile" in compose
    readme = (ROOT / "nodes" / "README.md").read_text()
    assert f"-o {NODE_UID} -g {NODE_UID}" in readme  # the container's state folder, made for its user
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^node-image:.*\n\tdocker build .*-f nodes/compose/Dockerfile", make, re.M)


# ---------------------------------------------------------------- a real site-node install (slow)


def _record_site_requests(tmp: Path) -> tuple[list[dict], dict[str, str], Path]:
    """Run real studies in this process and keep what site1 was asked and answered.

    Returns (cases, site1's node config, the risk model folder). Each case: analysis, params,
    arrays (site1's), study_id, and the reply arrays this process computed.
    """
    from conftest import CONVENTIONS, PLINK_EXACT_POLICY, qc_plan, split_sites

    from fedgen.analyses import REGISTRY, _load_builtin
    from fedgen.federation.transport import InProcessTransport, Request
    from fedgen.study.learn import model_settings
    from fedgen.study.pca import pca_settings
    from fedgen.study.runner import run_plan
    from fedgen.testing import make_synth

    cases: list[dict] = []

    class Recording(InProcessTransport):
        def query(self, request, *, train=False):
            replies = super().train(request) if train else super().query(request)
            cases.append({"analysis": request.analysis, "params": json.loads(json.dumps(request.params)),
                          "arrays": request.arrays_for("site1"), "study_id": request.study_id, "train": train,
                          "reply": {k: np.asarray(v) for k, v in replies["site1"].arrays.items()}})
            return replies

        def train(self, request):  # model updates: Flower train messages
            return self.query(request, train=True)

    # chrX too: its sex-split counts and the chrX regression model are site analyses like the others
    data = make_synth(300, 150, seed=5, missing_rate=0.01, extremes=False, contigs=("1", "2", "X"))
    extra = [*PLINK_EXACT_POLICY["extra_analyses"], "pca_histograms", "covar_ranges", "model_update", "model_eval_exact"]
    policy = {**PLINK_EXACT_POLICY, "epsilon_budget": 100, "extra_analyses": extra}
    nodes = split_sites(data, tmp / "sites", [0.5, 0.5], seed=1, policy=policy, conventions=CONVENTIONS[:2])
    tr = Recording(nodes)
    tr.query(Request("ping"))
    # QC, PCA (LD-pruned, per-site histograms, a local plot), allelic test, regression with PCs
    gwas = qc_plan(tmp / "gwas", list(nodes), analyses=["freq", "missing", "hardy", "pca", "assoc", "glm"],
                   phenotypes=["CC", "QT2"], covariates=["age", "sex", "smoking"], qc={"maf": 0.01, "geno": None, "hwe": None},
                   study_id="pkg-gwas")
    gwas.update(pcs=2, pca=pca_settings({"k": 3, "ld_prune": {"window": 50, "step": 5, "r2": 0.5}, "build": None,
                                         "local_plot": True}, pcs=2))
    run_plan(gwas, tr)
    # DP releases: noisy genotype and case/control counts, private top-k selection
    dp = qc_plan(tmp / "dp", list(nodes), analyses=["freq", "missing", "hardy", "assoc", "topk"], phenotypes=["BIN"],
                 covariates=[], qc={"maf": None, "geno": None, "hwe": None}, pca=None, pcs=0, study_id="pkg-dp")
    dp["privacy"] = {"mode": "dp", "epsilon": 2.0, "delta": 1e-6, "topk": 3, "force": True}
    run_plan(dp, tr)
    # a risk model: DP-SGD at each site (and plain SGD, which this policy also allows)
    for name, dp_sgd in (("model", True), ("model-sgd", False)):
        m = qc_plan(tmp / name, list(nodes), analyses=["freq", "missing", "hardy", "assoc", "model"], phenotypes=["CC"],
                    covariates=[], qc={"maf": 0.05, "geno": None, "hwe": None}, pca=None, pcs=0, missing="impute",
                    study_id=f"pkg-{name}")
        m["model"] = model_settings({"phenotype": "CC", "variants": "top:8", "rounds": 2, "covariates": ["age"],
                                     "epsilon": 2.0, "dp": dp_sgd})
        run_plan(m, tr)
    # Firth regression runs only where logistic fails; ask for it at a block logistic answered
    logistic = next(c for c in cases if c["analysis"] == "glm_logistic")
    tr.query(Request("glm_firth", params=logistic["params"], arrays=logistic["arrays"], study_id=logistic["study_id"]))
    _load_builtin()
    missing = set(REGISTRY) - {c["analysis"] for c in cases}
    assert not missing, f"no request recorded for {sorted(missing)}: extend the studies above"
    return cases, nodes["site1"], tmp / "model" / "model"


_REPLAY = r'''
"""Replay recorded requests through the installed fedgen's ClientApp, as a SuperNode's worker calls it."""
import pickle, sys

cases, node_config, out = pickle.load(open(sys.argv[1], "rb"))

import fedgen.federation.superexec, fedgen.federation.supernode  # the node's own Flower glue loads
from flwr.app import Context, Message, RecordDict
try:  # creating a Message outside a Flower process needs a task identity
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 7, 1
except ImportError:
    pass
from fedgen.federation.client_app import app
from fedgen.federation.flower import decode_reply, encode_request
from fedgen.federation.train import decode_train_reply, encode_train_request

results = []
for c in cases:
    if c.get("train"):
        msg = Message(encode_train_request(c["analysis"], c["params"], c["arrays"], study_id=c["study_id"]), 7, "train")
    else:
        msg = Message(encode_request(c["analysis"], c["params"], c["arrays"], study_id=c["study_id"]), 7, "query.fedgen")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    if reply.has_error():
        results.append({"analysis": c["analysis"], "error": f"Flower error: {reply.error.reason}", "arrays": {}})
        continue
    arrays, meta, _ = (decode_train_reply if c.get("train") else decode_reply)(reply.content)
    results.append({"analysis": c["analysis"], "error": meta.get("error"), "arrays": arrays})
study = [m for m in ("msprime", "tskit", "matplotlib", "hydra", "omegaconf", "sklearn", "plotly", "pandas")
         if m in sys.modules]
pickle.dump({"results": results, "imported_study_modules": study}, open(out, "wb"))
'''


#: the environment of commands in the node venv: nothing on PYTHONPATH (this tree must not shadow the install)
_VENV_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(cmd: list, *, timeout: float = 600, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=_VENV_ENV if env is None else env, **kw)


def _source_copy(dest: Path) -> Path:
    """What the package is built from (as the Dockerfile copies it): no build/ leftovers of the work tree."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "fedgen", dest / "fedgen", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.mark.slow
def test_site_node_install_has_no_study_packages_and_answers_every_analysis(tmp_path):
    venv = tmp_path / "node-venv"
    r = _run([sys.executable, "-m", "venv", venv], timeout=120)
    assert r.returncode == 0, r.stderr
    py, pip = venv / "bin" / "python", [venv / "bin" / "python", "-m", "pip"]
    probe = _run([*pip, "index", "versions", "flwr"], timeout=240)
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach a package index: {probe.stderr.strip().splitlines()[-1:]}")
    r = _run([*pip, "install", "--quiet", TORCH], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    src = _source_copy(tmp_path / "src")
    r = _run([*pip, "install", "--quiet", f"{src}[node]"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    # no study-side package came along (directly or through another dependency)
    code = "import importlib.util, json, sys; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))"
    r = _run([py, "-c", code, *STUDY_ONLY], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {m: False for m in STUDY_ONLY}
    r = _run([py, "-c", "import torch, opacus, fedgen; print(torch.__version__, fedgen.__file__)"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("2.13.0") and str(venv) in r.stdout, r.stderr

    # the commands hospital IT uses
    fedgen = venv / "bin" / "fedgen"
    r = _run([fedgen, "--version"], cwd=tmp_path)
    assert r.returncode == 0 and re.match(r"fedgen \d+\.\d+\.\d+ \(flwr ", r.stdout), r.stdout + r.stderr
    r = _run([fedgen, "node", "--help"], cwd=tmp_path)
    assert r.returncode == 0 and all(c in r.stdout for c in ("init", "check", "start", "rotate-key")), r.stderr
    r = _run([fedgen, "run", "study=qc"], cwd=tmp_path)
    assert r.returncode == 2 and "pip install 'fedgen[study]'" in r.stderr and "Traceback" not in r.stderr

    # every analysis, through the installed ClientApp, at a site with a fresh state folder
    cases, site1, model_dir = _record_site_requests(tmp_path / "study")
    node_config = {**site1, "state_dir": str(tmp_path / "node-state")}
    blob = tmp_path / "cases.pkl"
    out = tmp_path / "replies.pkl"
    blob.write_bytes(pickle.dumps(([{k: v for k, v in c.items() if k != "reply"} for c in cases], node_config, str(out))))
    script = tmp_path / "replay.py"
    script.write_text(_REPLAY)
    r = _run([py, script, blob], cwd=tmp_path, env={**_VENV_ENV, "PYTHONSAFEPATH": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = pickle.loads(out.read_bytes())
    assert got["imported_study_modules"] == []
    assert len(got["results"]) == len(cases)
    for k, (case, res) in enumerate(zip(cases, got["results"])):
        what = f"request {k} ({case['analysis']})"
        assert res["error"] is None, f"{what} refused by the node install: {res['error']}"
        want, have = case["reply"], res["arrays"]
        assert sorted(have) == sorted(want), what
        for name, a in want.items():
            assert have[name].dtype == a.dtype and have[name].shape == a.shape, f"{what}: {name}"
            if case["analysis"] not in RANDOMISED:
                np.testing.assert_allclose(have[name], a, rtol=1e-9, atol=1e-12, err_msg=f"{what}: {name}")
    assert (tmp_path / "node-state" / "audit.jsonl").exists()

    # a site scores its own patients with the federated model (AUC without scikit-learn)
    r = _run([fedgen, "score", "--model", model_dir, "--vcf", site1["vcf"], "--samples", site1["samples"],
              "--out", tmp_path / "scores.tsv", "--phenotype", "CC"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"AUC against CC: 0\.\d{4}", r.stdout)
