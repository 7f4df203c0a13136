"""The compiled logistic kernel (fedgen/stats/_glmkernel.c) gives the numpy kernel's sums.

Both compute one site's IRLS sums (Hessian, gradient, n, Kish's n, log-likelihood); they differ
only in the order of floating-point additions and in e^x (a vectorised polynomial within a few
ulp of libm), so they agree to ~1e-13 of each sum's scale, including missing calls, imputed
(fill) calls, no covariates and fitted values that saturate at 0 or 1.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fedgen.stats import glm, kernel


def _numpy_sums(monkeypatch, *args, **kw):
    monkeypatch.setattr(kernel, "_lib", lambda: None)
    try:
        return glm.site_logistic_partials(*args, **kw)
    finally:
        monkeypatch.undo()


CASES = [  # V, N, k, missing rate, fill, β scale
    (60, 300, 6, 0.05, False, 0.5),
    (40, 211, 0, 0.10, False, 0.5),
    (30, 100, 3, 0.20, True, 0.5),
    (5, 7, 1, 0.50, False, 0.5),
    (25, 150, 2, 0.05, False, 300.0),  # |η| up to ~1e3: p saturates, e^x clamps
    (3, 64, 4, 1.00, False, 0.5),  # every call missing
]


@pytest.mark.skipif(kernel.name() != "compiled", reason="the compiled kernel was not built")
@pytest.mark.parametrize("V,N,k,miss,use_fill,scale", CASES)
def test_compiled_kernel_equals_numpy(monkeypatch, V, N, k, miss, use_fill, scale) -> None:
    rng = np.random.default_rng(V * N + k)
    g = rng.integers(0, 3, (V, N)).astype(np.int8)
    g[rng.random((V, N)) < miss] = -1
    y = (rng.random(N) < 0.3).astype(float)
    C = rng.normal(size=(N, k))
    beta = rng.normal(scale=scale, size=(V, k + 2))
    fill = rng.integers(0, 3, V).astype(float) if use_fill else None
    fast = glm.site_logistic_partials(g, y, C, beta, with_loglik=True, fill=fill)
    slow = _numpy_sums(monkeypatch, g, y.copy(), C.copy(), beta, with_loglik=True, fill=fill)
    assert set(fast) == set(slow)
    assert (fast["n"] == slow["n"]).all()
    for key in ("H", "grad", "neff", "loglik"):
        a, b = fast[key], slow[key]
        assert a.shape == b.shape
        scale_b = np.maximum(1.0, np.abs(b).reshape(V, -1).max(1)).reshape((V,) + (1,) * (b.ndim - 1))
        assert np.all(np.abs(a - b) <= 1e-12 * scale_b), key


@pytest.mark.skipif(kernel.name() != "compiled", reason="the compiled kernel was not built")
def test_compiled_kernel_serves_irls_rounds_and_numpy_switch(monkeypatch) -> None:
    """A block of hard calls goes to the compiled kernel; FEDGEN_KERNEL=numpy turns it off."""
    rng = np.random.default_rng(3)
    g = rng.integers(0, 3, (4, 50)).astype(np.int8)
    y = (rng.random(50) < 0.5).astype(float)
    C = rng.normal(size=(50, 2))
    beta = np.zeros((4, 4))
    calls = []
    real = kernel.logistic_sums
    monkeypatch.setattr(kernel, "logistic_sums", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    glm.site_logistic_partials(g, y, C, beta)
    assert calls
    monkeypatch.setenv("FEDGEN_KERNEL", "numpy")
    kernel._lib.cache_clear()
    try:
        assert kernel.name() == "numpy"
        assert kernel.logistic_sums(g, kernel.CovariateTerms(y, C), beta, fill=None, with_loglik=False) is None
    finally:
        monkeypatch.delenv("FEDGEN_KERNEL")
        kernel._lib.cache_clear()
    assert kernel.name() == "compiled"


def test_kernel_is_built_where_a_compiler_is() -> None:
    """`pip install` builds the kernel wherever a C compiler exists (else sites run numpy's)."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert kernel.name() == "compiled"


def test_design_memo_is_per_design() -> None:
    """A kernel's design products follow the arrays passed, never a previous design's."""
    rng = np.random.default_rng(4)
    g = rng.integers(0, 3, (6, 40)).astype(np.int8)
    beta = rng.normal(scale=0.3, size=(6, 4))
    y1, C1 = (rng.random(40) < 0.5).astype(float), rng.normal(size=(40, 2))
    y2, C2 = (rng.random(40) < 0.5).astype(float), rng.normal(size=(40, 2))
    a = glm.site_logistic_partials(g, y1, C1, beta)
    b = glm.site_logistic_partials(g, y2, C2, beta)
    again = glm.site_logistic_partials(g, y1, C1, beta)
    assert not np.allclose(a["H"], b["H"])
    np.testing.assert_array_equal(a["H"], again["H"])
    fresh = glm.site_logistic_partials(g, y2.copy(), C2.copy(), beta)
    np.testing.assert_array_equal(b["H"], fresh["H"])


@pytest.mark.skipif(kernel.name() != "compiled", reason="the compiled kernel was not built")
def test_compiled_kernel_refuses_mismatched_shapes() -> None:
    """The C code reads every array to the lengths it is given: mismatched inputs never reach it."""
    rng = np.random.default_rng(5)
    g = rng.integers(0, 3, (4, 30)).astype(np.int8)
    y = (rng.random(30) < 0.5).astype(float)
    terms = kernel.CovariateTerms(y, rng.normal(size=(30, 2)))
    with pytest.raises(ValueError):
        kernel.logistic_sums(g, terms, np.zeros((4, 3)), fill=None, with_loglik=False)  # p = 4
    with pytest.raises(ValueError):
        kernel.logistic_sums(g, terms, np.zeros((4, 4)), fill=np.zeros(3), with_loglik=False)
    with pytest.raises(ValueError):
        kernel.logistic_sums(g[:, :20], terms, np.zeros((4, 4)), fill=None, with_loglik=False)


def _vcf_chunk(rng, n_rec: int, n: int, *, bad: bool = False) -> bytes:
    """VCF data lines mixing every kind of call the fixed-width decoder must take or hand over."""
    calls_ok = ["0/0", "0/1", "1/1", "0|1", "1|0", "./.", ".|.", "0/.", "./1"]
    lines = []
    for r in range(n_rec):
        alts = ["A", "A,T", "A,T,G"][rng.integers(0, 3)] if r % 3 == 0 else "A"
        k = alts.count(",") + 1
        pool = calls_ok + ([f"0/{k}", f"{k}|1", f"{k}/{k}"] if k > 1 else [])
        calls = [pool[i] for i in rng.integers(0, len(pool), n)]
        kind = r % 7
        if kind == 1:
            calls[rng.integers(0, n)] = "0"  # haploid: not fixed width
        elif kind == 2 and bad and r > 40:
            calls[rng.integers(0, n)] = "0/x"  # invalid allele: the general path's error
        elif kind == 3 and bad and r > 40:
            calls[-1] = "1/2" if k == 1 else calls[-1]  # an allele beyond the record's ALTs
        elif kind == 4 and bad and r > 40:
            calls[rng.integers(0, n)] = "0-1"  # not a GT separator
        fmt = "GT" if kind != 5 else "GT:DP"
        if kind == 5:
            calls = [c + ":7" for c in calls]
        lines.append("\t".join(["1", str(100 + r), f"rs{r}", "C", alts, ".", "PASS", ".", fmt, *calls]))
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.skipif(kernel.name() != "compiled", reason="the compiled kernel was not built")
@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_compiled_gt_decoder_parses_like_the_numpy_path(monkeypatch, tmp_path, n) -> None:
    """parse_records with the compiled fixed-width decoder gives the numpy path's block: the same
    dosages (multi-allelic records split, missing alleles), the same records sent to the general
    path, and the same error for a call neither path can read."""
    for bad in (False, True):
        _compare_parses(monkeypatch, tmp_path, n, _vcf_chunk(np.random.default_rng(n), 60, n, bad=bad), bad)


def _compare_parses(monkeypatch, tmp_path, n: int, chunk: bytes, bad: bool) -> None:
    from fedgen.cohort.vcf import ParseStats, parse_records
    from fedgen.errors import FedgenError

    def parse(use_kernel: bool):
        if not use_kernel:
            monkeypatch.setattr(kernel, "_lib", lambda: None)
        stats = ParseStats()
        try:
            out = parse_records(chunk, n, first_line=1, path=tmp_path / "x.vcf", stats=stats)
            return out, stats, None
        except FedgenError as exc:
            return None, stats, str(exc)
        finally:
            monkeypatch.undo()

    (a, sa, ea), (b, sb, eb) = parse(True), parse(False)
    assert ea == eb
    assert (ea is not None) == bad  # the clean chunk parses; the bad one fails the same way in both
    if a is not None:
        np.testing.assert_array_equal(a.dosage, b.dosage)
        assert a.chrom == b.chrom and list(a.pos) == list(b.pos) and a.alt == b.alt
        assert sa == sb and sa.multiallelic > 0


@pytest.mark.skipif(kernel.name() != "compiled", reason="the compiled kernel was not built")
def test_compiled_gt_decoder_refuses_out_of_bounds_records() -> None:
    dosage = np.zeros((2, 3), dtype=np.int8)
    chunk = b"0/1\t1/1\t0/0"
    with pytest.raises(ValueError):
        kernel.decode_gt(chunk, np.array([2]), np.array([0]), np.array([1]), dosage)  # runs past the chunk
    with pytest.raises(ValueError):
        kernel.decode_gt(chunk, np.array([0]), np.array([1]), np.array([2]), dosage)  # past the output rows
    assert kernel.decode_gt(chunk, np.array([0]), np.array([0]), np.array([1]), dosage).tolist() == [True]
    assert dosage[0].tolist() == [1, 2, 0]
