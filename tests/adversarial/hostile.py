"""A curious aggregator that talks to one site the way a SuperNode delivers messages.

Every request is a well-formed fedgen message (``query.fedgen``, encoded with the public wire
helpers) handed to the site's real ClientApp object, ``fedgen.federation.client_app:app``,
with the site's own node config. The attacks in this folder use only what comes back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.testing import make_synth, write_vcf


class Refusal(Exception):
    """The site answered with an error reply."""


class HostileAggregator:
    """Sends fedgen requests to one site through its ClientApp and decodes the replies."""

    def __init__(self, node_config: dict[str, Any]) -> None:
        self.node_config = dict(node_config)
        self.refusals: list[str] = []

    def ask(self, analysis: str, params: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None,
            *, study_id: str = "attack") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        from flwr.app import Context, Message, RecordDict

        from fedgen.federation.client_app import app
        from fedgen.federation.flower import decode_reply, encode_request

        from flwr.supercore.task_identity import TaskIdentity

        saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 7, 1, 1  # as the SuperNode's runtime sets them
        try:
            msg = Message(encode_request(analysis, params or {}, arrays or {}, study_id=study_id), 1, "query.fedgen", ttl=60)
            ctx = Context(run_id=7, node_id=1, node_config=dict(self.node_config), state=RecordDict(), run_config={})
            reply = app(msg, ctx)
        finally:
            TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
        out, meta, _ = decode_reply(reply.content)
        if "error" in meta:
            self.refusals.append(str(meta["error"]))
            raise Refusal(str(meta["error"]))
        return out, meta

    def ask_batch(self, requests: list[tuple[str, dict[str, Any], dict[str, np.ndarray]]], *, study_id: str = "attack"
                  ) -> list[tuple[dict[str, np.ndarray], dict[str, Any]] | None]:
        """Several requests in ONE message (wire protocol 2's batch); None for each one refused."""
        from flwr.app import Context, Message, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        from fedgen.federation.client_app import app
        from fedgen.federation.flower import decode_batch_reply, encode_batch

        saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 7, 1, 1
        try:
            msg = Message(encode_batch(requests, study_id=study_id), 1, "query.fedgen", ttl=60)
            ctx = Context(run_id=7, node_id=1, node_config=dict(self.node_config), state=RecordDict(), run_config={})
            reply = app(msg, ctx)
        finally:
            TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
        out: list[tuple[dict[str, np.ndarray], dict[str, Any]] | None] = []
        for arrays, meta, _ in decode_batch_reply(reply.content, len(requests)):
            if "error" in meta:
                self.refusals.append(str(meta["error"]))
                out.append(None)
            else:
                out.append((arrays, meta))
        return out

    def try_ask(self, *args: Any, **kw: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        try:
            return self.ask(*args, **kw)
        except Refusal:
            return None


def idx(v: int | np.ndarray) -> dict[str, np.ndarray]:
    i = np.arange(v, dtype=np.int64) if np.ndim(v) == 0 else np.asarray(v, dtype=np.int64)
    return {"idx": i, "flip": np.zeros(len(i), np.uint8)}


def glm_params(phenotype: str, kind: str = "quantitative", covariates: list[str] = (), **kw: Any) -> dict[str, Any]:
    return {"phenotype": phenotype, "kind": kind,
            "covariates": [{"name": c, "kind": "numeric", "mean": 0.0, "sd": 1.0} for c in covariates], **kw}


class Site:
    """One simulated hospital: its files, node config and the truth an attack is scored against."""

    def __init__(self, root: Path, *, n: int = 320, v: int = 240, seed: int = 21, policy: dict[str, Any] | None = None,
                 members: np.ndarray | None = None) -> None:
        self.data = make_synth(n, v, seed=seed, missing_rate=0.02)
        self.members = np.arange(n) if members is None else np.asarray(members)
        root.mkdir(parents=True, exist_ok=True)
        self.vcf = root / "genotypes.vcf.gz"
        write_vcf(self.data, self.vcf, cols=self.members, with_multiallelic=False)
        rng = np.random.default_rng(seed)
        m = len(self.members)
        self.y = np.round(rng.normal(5.0, 1.0, m), 4)
        self.d = (rng.random(m) < 0.3).astype(int)
        self.age = np.round(rng.uniform(20, 80, m), 1)
        self.one = 0  # the person whose Y_ONE is missing
        self.rare = 7  # the only person whose RARE flag is 1
        self.a_set = np.r_[1:21]  # A_M missing for these 20 people
        self.b_set = np.r_[[1], 21:40]  # B_M missing for these 20: A ∩ B = {person 1}
        self.samples = root / "samples.tsv"
        self.write_samples()
        self.node_config: dict[str, Any] = {"site": "hk", "vcf": str(self.vcf), "samples": str(self.samples),
                                            "state_dir": str(root / "state")}
        if policy is not None:
            self.node_config["policy"] = json.dumps(policy)

    def write_samples(self, drop: int | None = None) -> None:
        rows = ["IID\tY\tD\tage\tY_ONE\tA_M\tB_M\tRARE\tE_M\tF_M"]
        for k, c in enumerate(self.members.tolist()):
            if k == drop:
                continue
            rows.append("\t".join([
                self.data.samples[c], f"{self.y[k]}", str(self.d[k]), f"{self.age[k]}",
                "NA" if k == self.one else f"{self.y[k]}",
                "NA" if k in self.a_set else f"{self.age[k]}",
                "NA" if k in self.b_set else f"{self.age[k]}",
                "1" if k == self.rare else "0",
                "NA" if 40 <= k < 60 else f"{self.age[k]}",  # E_M: missing for people 40..59
                "NA" if 60 <= k < 80 else f"{self.age[k]}",  # F_M: missing for people 60..79
            ]))
        self.samples.write_text("\n".join(rows) + "\n")

    def genotype(self, k: int) -> np.ndarray:
        """Person k's dosages at every variant (-1 = missing), in the site's variant order."""
        return self.data.dosage[:, self.members[k]]

    @property
    def n_variants(self) -> int:
        return self.data.dosage.shape[0]

    def carriers(self) -> np.ndarray:
        g = self.data.dosage[:, self.members]
        return (g > 0).sum(1)

    def other_carriers(self) -> np.ndarray:
        """People with at least one copy of the other allele (REF)."""
        g = self.data.dosage[:, self.members]
        return ((g >= 0) & (g < 2)).sum(1)


def triu_col(p: int, i: int, j: int) -> int:
    """Column of (i, j) in a packed upper triangle (numpy's triu_indices order)."""
    iu, ju = np.triu_indices(p)
    return int(np.flatnonzero((iu == i) & (ju == j))[0])
