"""The ``fedgen`` command: Hydra configs, exit codes, messages, and a real Flower QC study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import DATA, split_sites
from fedgen.cli import main
from fedgen.testing import make_synth
from test_qc_exact import CASES, assert_same_table


def _sites_config(tmp_path: Path, nodes: dict) -> Path:
    cfg = tmp_path / "cfg" / "sites"
    cfg.mkdir(parents=True)
    (cfg / "mine.yaml").write_text(yaml.safe_dump({s: {"vcf": c["vcf"], "samples": c["samples"]} for s, c in nodes.items()}))
    return tmp_path / "cfg"


def _overrides(cfg: Path, out: Path, *extra: str) -> list[str]:
    return ["sites=mine", f"hydra.searchpath=[file://{cfg}]", "study=qc", f"output_dir={out}", *extra]


def test_run_inprocess_via_cli(tmp_path, capsys):
    data = make_synth(**CASES["small"])
    nodes = split_sites(data, tmp_path / "sites", [0.7, 0.3], seed=2)
    cfg = _sites_config(tmp_path, nodes)
    assert main(["run", *_overrides(cfg, tmp_path / "out", "federation=inprocess")]) == 0
    assert f"Results: {tmp_path / 'out'}" in capsys.readouterr().out
    assert_same_table(tmp_path / "out" / "freq.afreq", DATA / "qc" / "small.afreq")
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["config"]["study"]["qc"]["maf"] == 0.01
    assert set(m["sites"]) == {"site1", "site2"}
    # results get the permissions of the umask (readable by the team), not the temporary files' 0600/0700
    from fedgen.fileio import public_mode

    for p in (tmp_path / "out", tmp_path / "out" / "freq.afreq", tmp_path / "out" / "manifest.json", tmp_path / "out" / "report.html"):
        assert p.stat().st_mode & 0o777 == public_mode(directory=p.is_dir()), p


@pytest.mark.parametrize(
    "extra,message",
    [
        (["sites=nope"], "Could not find 'sites/nope'"),
        (["study.phenotypes=[HEIGHT]"], "site site1: .*samples.tsv: no column 'HEIGHT'"),
        (["study.covariates=[bmi]"], "no column 'bmi'"),
        (["study.qc.maf=2"], r"study.qc.maf must be a number in \[0, 1\]"),
        (["study=gwas"], r"study.phenotypes is required for association"),
        (["study=risk_model"], r"study.model.phenotype is required"),
    ],
)
def test_bad_input_gives_one_clear_message(tmp_path, capsys, extra, message):
    import re

    data = make_synth(n_samples=60, n_variants=40, seed=3)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5])
    cfg = _sites_config(tmp_path, nodes)
    rc = main(["run", *_overrides(cfg, tmp_path / "out", "federation=inprocess", *extra)])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_qc_study_on_real_flower_nodes_equals_plink(tmp_path):
    """`fedgen run` end to end: SuperLink + 3 SuperNodes on loopback, results equal pooled PLINK."""
    data = make_synth(**CASES["medium"])
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.3, 0.2], seed=3)
    cfg = _sites_config(tmp_path, nodes)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedgen.cli", "run", *_overrides(cfg, out, "study.block_size=400")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    for ext, name in (("afreq", "freq.afreq"), ("vmiss", "missing.vmiss"), ("hardy", "hardy.hardy")):
        assert_same_table(out / name, DATA / "qc" / f"medium.{ext}")
    m = json.loads((out / "manifest.json").read_text())
    assert m["federation"] == "local"
    assert all(m["sites"][s]["bytes_sent"] > 0 for s in nodes)
    # site_info, then the 2 blocks of genotype counts batched into one round (one message per site)
    assert m["rounds"] == 2 and m["rounds_per_phase"] == {"genotype counts": 1}
    assert all(m["sites"][s]["messages"] == 2 for s in nodes)
    assert np.isclose(sum(m["sites"][s]["samples"] for s in nodes), len(data.samples))


@pytest.mark.slow
def test_remote_federation_submits_to_running_superlink(tmp_path):
    """federation=remote: an already running SuperLink with site nodes holding their own data."""
    from fedgen.federation.local import LocalFederation
    from fedgen.study.launch import run_study

    data = make_synth(**CASES["small"])
    nodes = split_sites(data, tmp_path / "sites", [0.6, 0.4], seed=4)
    cfg = tmp_path / "cfg" / "sites"
    cfg.mkdir(parents=True)
    (cfg / "named.yaml").write_text(yaml.safe_dump({s: None for s in nodes}))  # names only
    with LocalFederation(nodes, workdir=tmp_path / "deploy") as fed:
        manifest = run_study(
            [
                "sites=named", f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", "study=qc",
                f"output_dir={tmp_path / 'out'}", "federation=remote",
                f"federation.control_address={fed.control_address}", "federation.insecure=true",
                "federation.run_timeout=300",
            ],
            base_dir=tmp_path,
        )
    assert manifest["federation"] == "remote"
    assert_same_table(tmp_path / "out" / "freq.afreq", DATA / "qc" / "small.afreq")


def test_version_names_fedgen_and_flower(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    import fedgen

    assert out.startswith(f"fedgen {fedgen.__version__} (flwr 1.4")


def test_run_is_a_hydra_app_help_cfg_and_multirun(tmp_path, capsys):
    """`fedgen run` behaves like any @hydra.main app: --help lists the groups, --cfg job prints the
    composed config without running, and -m sweeps with one results folder per job + a summary."""
    import csv

    data = make_synth(n_samples=120, n_variants=60, seed=5)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5])
    for s, c in nodes.items():
        c["state_dir"] = str(tmp_path / "state" / s)
        if isinstance(c.get("policy"), str):
            c["policy"] = json.loads(c["policy"])
    cfg = tmp_path / "cfg" / "sites"
    cfg.mkdir(parents=True)
    (cfg / "mine.yaml").write_text(yaml.safe_dump(nodes))
    base = ["sites=mine", f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", "federation=inprocess"]

    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for group in ("federation: inprocess, local, remote", "privacy: dp, none", "study: demo, dp, gwas, qc, risk_model"):
        assert group in out, out

    assert main(["run", "--cfg", "job", *base, "study=qc", "study.qc.maf=0.2", f"output_dir={tmp_path / 'x'}"]) == 0
    composed = yaml.safe_load(capsys.readouterr().out)
    assert composed["study"]["qc"]["maf"] == 0.2 and composed["study"]["name"] == "qc"
    assert not (tmp_path / "x").exists()  # --cfg runs nothing

    sweep = tmp_path / "sweep"
    rc = main(["run", "-m", *base, "study=qc", "privacy=dp", "privacy.force=true", "privacy.epsilon=1,4", f"output_dir={sweep}"])
    assert rc == 0, capsys.readouterr().err
    with open(sweep / "sweep_summary.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert sorted(float(r["epsilon_spent_site1"]) for r in rows) == pytest.approx([1.0, 4.0], rel=1e-6)
    eps = []
    for r in rows:
        folder = Path(r["output_dir"])
        assert folder.parent == sweep and folder.name.startswith(r["job"] + "-")
        assert "privacy.epsilon=" in folder.name and "output_dir" not in folder.name
        m = json.loads((folder / "manifest.json").read_text())
        eps.append(m["config"]["privacy"]["epsilon"])
        assert (folder / "freq.afreq").exists()
    assert sorted(eps) == [1.0, 4.0]
    assert len({Path(r["output_dir"]) for r in rows}) == 2


def test_multirun_records_a_failed_job_and_exits_nonzero(tmp_path, capsys):
    data = make_synth(n_samples=60, n_variants=40, seed=3)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5])
    cfg = _sites_config(tmp_path, nodes)
    sweep = tmp_path / "sweep"
    rc = main(["run", "-m", "sites=mine", f"hydra.searchpath=[file://{cfg}]", "federation=inprocess", "study=qc",
               "study.qc.maf=0.05,2", f"output_dir={sweep}"])
    assert rc == 1
    assert "study.qc.maf must be a number" in capsys.readouterr().err
    text = (sweep / "sweep_summary.tsv").read_text()
    assert "\tok" in text and "failed: study.qc.maf must be a number" in text
