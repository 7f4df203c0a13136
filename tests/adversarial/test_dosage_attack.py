"""A curious aggregator tries to read people's imputed dosages out of ``genotype_counts`` with
``dosage: true`` (the new ``dosage_sums`` array: Σ dosage and the number of samples with one, per
variant, over all the site's samples) at the default policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hostile import HostileAggregator, idx

from fedgen.cohort.dosage import UNIT, quantise
from fedgen.testing import make_synth, synth_dosages, write_dosage_vcf

N, V = 120, 40
FEW = 3  # variant 0 has a dosage for these people only


class DosageSite:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.data = make_synth(N, V, seed=5, missing_rate=0.02)
        ds = synth_dosages(self.data, seed=5, missing=0.0)
        ds[0, FEW:] = np.nan  # variant 0: dosages of FEW people only
        self.units = quantise(ds).astype(np.int64)
        self.vcf = root / "g.vcf"
        write_dosage_vcf(self.data, ds, self.vcf)
        self.samples = root / "samples.tsv"
        self.write_samples()
        self.node_config = {"site": "hk", "vcf": str(self.vcf), "samples": str(self.samples), "state_dir": str(root / "state")}

    def write_samples(self, drop: int | None = None) -> None:
        rows = ["IID\tY"] + [f"{s}\t{k % 7}" for k, s in enumerate(self.data.samples) if k != drop]
        self.samples.write_text("\n".join(rows) + "\n")


def _sums(agg: HostileAggregator, arrays, study: str):
    got = agg.try_ask("genotype_counts", {"dosage": True}, arrays, study_id=study)
    return None if got is None else got[0]["dosage_sums"]


def test_dosages_of_a_few_people_are_withheld(tmp_path):
    """Variant 0 has dosages for 3 people: its sum would be theirs alone (a small cell)."""
    site = DosageSite(tmp_path / "hk")
    agg = HostileAggregator(site.node_config)
    arrays, meta = agg.ask("genotype_counts", {"dosage": True}, idx(V))
    sums = arrays["dosage_sums"]
    assert sums[0].tolist() == [0, 0], "a sum over fewer than min_count people left the site"
    assert meta["suppressed"] >= 1
    assert sums[1:, 1].min() >= 10  # the other variants are answered
    # flipping the alleles gives nothing new: REF dosage = 2n − ALT dosage, and row 0 stays withheld
    flipped = agg.ask("genotype_counts", {"dosage": True}, {**idx(V), "flip": np.ones(V, np.uint8)})[0]["dosage_sums"]
    assert flipped[0].tolist() == [0, 0]
    assert np.array_equal(flipped[1:, 0], 2 * UNIT * sums[1:, 1] - sums[1:, 0])


def test_a_person_joining_is_not_differenced_out(tmp_path):
    """Ask, let one person join the cohort, ask again: the difference would be their dosages."""
    site = DosageSite(tmp_path / "hk")
    agg = HostileAggregator(site.node_config)
    target = 17
    site.write_samples(drop=target)
    before = _sums(agg, idx(V), "s1")
    site.write_samples()
    after = _sums(agg, idx(V), "s2")
    truth = site.units[1:, target]
    assert before is not None  # the honest first request is answered
    if after is not None:
        diff = after[1:, 0] - before[1:, 0]
        assert not np.array_equal(diff, truth), "the joining person's dosages were recovered"
    else:
        assert any("differenc" in r or "min_count" in r for r in agg.refusals), agg.refusals


def test_repeated_or_chosen_indices_isolate_no_one(tmp_path):
    """One variant many times in a request is refused; any subset of variants gives the same
    per-variant sums as the full request (rows never mix people across requests)."""
    site = DosageSite(tmp_path / "hk")
    agg = HostileAggregator(site.node_config)
    assert _sums(agg, {"idx": np.array([3, 3, 3]), "flip": np.zeros(3, np.uint8)}, "a") is None
    full = _sums(agg, idx(V), "a")
    part = _sums(agg, idx(np.array([5, 9])), "a")
    assert np.array_equal(part, full[[5, 9]])
