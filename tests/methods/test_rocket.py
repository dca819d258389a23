"""ROCKET: byte budgets, sizing, the two-stage mask, the refit, and the gain over plain truncation."""
from __future__ import annotations

import pytest
import torch

from sparselm.capture import LinearStats
from sparselm.config import CoefStorage, Ratio, RocketSpec
from sparselm.errors import InputError
from sparselm.methods import SparseDict, compress_weight, rocket_cpu
from sparselm.formats import dict_bytes
from sparselm.methods.rocket import factorize, keep_counts, largest, rocket_size, sparse_mask, whitened_svd
from sparselm.pipeline import build_module


def correlated(seed: int = 0, tokens: int = 192, in_f: int = 32, out_f: int = 24):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)  # (tokens, in)
    W = torch.randn(out_f, in_f, generator=g)  # (out, in)
    return X, W, LinearStats.from_inputs(X)


def functional_sq(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    return float((X.double() @ (W - W_hat).double().T).pow(2).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", list(CoefStorage))
def test_stored_bytes_within_target(dtype, storage):
    X, W, stats = correlated()
    dense = W.numel() * (torch.finfo(dtype).bits // 8)
    for ratio, ks in ((0.1, 3.0), (0.4, 1.0), (0.4, 2.5), (0.7, 1.5)):
        res = compress_weight(RocketSpec(Ratio(ratio), ks=ks, storage=storage), W, stats, dtype)
        module = build_module(res, None, dtype)
        written = sum(b.numel() * b.element_size() for b in module.buffers())
        assert written == module.stored_bytes() == res.stored_bytes(dtype) <= (1 - ratio) * dense
        assert written == dict_bytes(32, 24, res.info["k"], res.info["nnz"], storage, dtype)
        assert torch.allclose(module.dense_weight(), res.reconstruct(), rtol=0.05, atol=0.05)


def test_sizing_hand_example():
    # 24x32 float32, ratio 0.5, ks 2: per atom 32*4 + 24/8 + 24*4/2 = 179 bytes; target 1536 -> k = 8, nnz 96
    size = rocket_size(0.5, 2.0, 32, 24, CoefStorage.DTYPE, torch.float32)
    assert (size.k, size.nnz, size.clipped) == (8, 96, False)
    assert dict_bytes(32, 24, 8, 96, CoefStorage.DTYPE, torch.float32) == 32 * 8 * 4 + 24 + 96 * 4
    # beta = refill = 0.005: keep floor(8 * 0.495) = 3 per column, refill round(0.005 * 192) = 1
    assert keep_counts(size, 24, RocketSpec(Ratio(0.5), ks=2.0)) == (3, 1)
    # refill larger than beta's slack is capped by the nnz budget
    keep, refill = keep_counts(size, 24, RocketSpec(Ratio(0.5), ks=2.0, beta=0.0, refill=0.5))
    assert keep * 24 + refill <= size.nnz
    # a very wide layer at a low ratio: k is clipped to min(in, out) and the layer lands below target
    assert rocket_size(0.05, 3.0, 8, 512, CoefStorage.DTYPE, torch.float32).clipped
    with pytest.raises(InputError, match="no room"):
        rocket_size(0.999, 1.0, 32, 24, CoefStorage.DTYPE, torch.float32)


def test_two_stage_mask_hand_example():
    C = torch.tensor([[4.0, 1.0], [3.0, 2.0], [0.5, 0.1]], dtype=torch.float64)  # (k=3, out=2)
    norms = torch.tensor([1.0, 1.0, 100.0], dtype=torch.float64)
    # keep 1 per column by |c|·n^0.5: column 0 -> 4 vs 3 vs 5 -> atom 2; column 1 -> 1, 2, 1 -> atom 1
    # refill 1 by |c|·n: the masked entries score 4, 3 | 1, 10 -> atom 2 of column 1
    mask = sparse_mask(C, norms, keep=1, refill=1, lam=0.5)
    assert mask.tolist() == [[False, False], [False, True], [True, True]]


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_mask_from_the_one_ranking_equals_topk(lam):
    _, W, stats = correlated()
    svd = whitened_svd(W, stats)  # m = 24
    for k, keep, refill in ((24, 12, 3), (17, 8, 0), (9, 1, 5), (5, 5, 0)):
        C, norms = svd.coeffs[:k], svd.atom_norms(k)
        fast = sparse_mask(C, norms, keep, refill, lam, svd.ranking(lam), svd.refill_scores)
        assert torch.equal(fast, sparse_mask(C, norms, keep, refill, lam))
        assert int(fast.sum()) == keep * C.shape[1] + refill


def test_result_shapes_and_info():
    X, W, stats = correlated()
    res = compress_weight(RocketSpec(Ratio(0.4), ks=2.0), W, stats, torch.float32)
    assert isinstance(res, SparseDict)
    k = res.info["k"]
    assert res.D.shape == (32, k) and res.S.shape == (k, 24) and res.mask.shape == (k, 24)
    assert res.info["whitening_shift"] == 0.0 and int(res.mask.sum()) == res.info["nnz"]
    assert not (res.S * ~res.mask).any()
    # the whitened error reported equals the functional error on the calibration inputs
    rel = functional_sq(X, W, res.reconstruct()) / functional_sq(X, W, torch.zeros_like(W))
    assert rel == pytest.approx(res.info["whitened_rel_error"], rel=1e-4)
    with pytest.raises(InputError, match="calibration"):
        compress_weight(RocketSpec(Ratio(0.4)), W, None, torch.float32)


@pytest.mark.parametrize("seed", range(3))
def test_beats_magnitude_truncation_of_whitened_svd(seed):
    X, W, stats = correlated(seed)
    svd = whitened_svd(W, stats)
    for ratio in (0.3, 0.5):
        res = compress_weight(RocketSpec(Ratio(ratio), ks=2.0), W, stats, torch.float32)
        k, nnz = res.info["k"], res.info["nnz"]
        # baseline at the same k and nnz (same bytes): the nnz largest |c| of Bᵀ W_L, no refit
        C = svd.R[:k]  # (k, out) = diag(σ) Vh
        keep = torch.zeros(C.numel(), dtype=torch.bool)
        keep[C.abs().reshape(-1).topk(nnz).indices] = True
        W_base = (svd.wh.unapply(svd.U[:, :k]) @ (C * keep.view_as(C))).T.float()  # (out, in)
        assert functional_sq(X, W, res.reconstruct()) < functional_sq(X, W, W_base)


@pytest.mark.parametrize("seed", range(3))
def test_refit_never_worse_than_basis(seed):
    _, W, stats = correlated(seed)
    svd = whitened_svd(W, stats)
    for ratio, ks in ((0.2, 1.0), (0.4, 2.0), (0.6, 3.0)):
        spec = RocketSpec(Ratio(ratio), ks=ks)
        size = rocket_size(ratio, ks, 32, 24, spec.store, torch.float32)
        keep, refill = keep_counts(size, 24, spec)
        with_refit = factorize(svd, size.k, keep, refill, spec.lam)
        without = factorize(svd, size.k, keep, refill, spec.lam, refit=False)
        assert torch.equal(with_refit.mask, without.mask)
        assert with_refit.error <= without.error
        # closed form of the no-refit error = direct evaluation
        direct = float((svd.WL - without.D @ without.C.double()).pow(2).sum())
        assert without.error == pytest.approx(direct, rel=1e-6)  # C_s in float32 (rocket.WORK)
        # closed form of the refit's residual (no (in, k) x (k, out) product) = direct evaluation
        if with_refit.refit:
            direct = float((svd.WL - with_refit.D.double() @ with_refit.C.double()).pow(2).sum())
            assert with_refit.error == pytest.approx(direct, rel=1e-5)
        if ks > 1:
            assert with_refit.refit and with_refit.error < 0.99 * without.error


def test_refill_beyond_beta_stays_within_bytes():
    _, W, stats = correlated()
    dense = W.numel() * 2
    for beta, refill in ((0.0, 0.3), (0.2, 0.0), (0.0, 0.0)):
        spec = RocketSpec(Ratio(0.4), ks=2.0, beta=beta, refill=refill)
        res = compress_weight(spec, W, stats, torch.float16)
        size = rocket_size(0.4, 2.0, 32, 24, spec.store, torch.float16)
        assert res.info["nnz"] <= size.nnz
        assert build_module(res, None, torch.float16).stored_bytes() <= 0.6 * dense


def test_singular_gram_records_shift():
    X, W, _ = correlated(tokens=8)  # 8 tokens, 32 inputs: rank-deficient Gram
    res = compress_weight(RocketSpec(Ratio(0.5)), W, LinearStats.from_inputs(X), torch.float32)
    assert res.info["whitening_shift"] > 0
    assert torch.isfinite(res.D).all() and torch.isfinite(res.S).all()


@pytest.mark.parametrize("in_f,out_f", [(16, 40), (40, 16), (24, 24), (300, 70)])
def test_whitened_svd_wide_by_eigh_and_tall_by_qr_then_eigh(in_f, out_f):
    """``W_L = U R``: ``U`` orthonormal, ``R``'s rows orthogonal with norms σ (descending, the singular values of
    ``W_L``), whichever way it was computed (eigh of ``W_L W_Lᵀ`` when in ≤ out, else ``W_L = Q T`` and eigh of
    ``T Tᵀ``)."""
    g = torch.Generator().manual_seed(in_f)
    X = torch.randn(200, in_f, generator=g, dtype=torch.float64) @ torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    W = torch.randn(out_f, in_f, generator=g)
    svd = whitened_svd(W, LinearStats.from_inputs(X))
    m = min(in_f, out_f)
    assert svd.U.shape == (in_f, m) and svd.R.shape == (m, out_f)
    assert torch.allclose(svd.U.T @ svd.U, torch.eye(m, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(svd.R @ svd.R.T, torch.diag(svd.sigma ** 2), atol=1e-9 * float(svd.sigma[0]) ** 2)
    assert torch.allclose(svd.sigma, torch.linalg.svdvals(svd.WL), rtol=1e-10)
    assert bool((svd.sigma[:-1] >= svd.sigma[1:]).all())
    assert torch.allclose(svd.U @ svd.R, svd.WL, atol=1e-10 * float(svd.WL.abs().max()))


def test_one_factorization_and_the_table_path_agree():
    """`factorize(many=False)` (the final compression: plain top-k) gives the mask and error of the knapsack
    table's path (the layer's ranking and cached refill scores)."""
    _, W, stats = correlated(1)
    svd = whitened_svd(W, stats)
    for k, keep, refill in ((20, 9, 4), (12, 3, 0), (24, 24, 0)):
        a, b = factorize(svd, k, keep, refill, 0.5), factorize(svd, k, keep, refill, 0.5, many=False)
        assert torch.equal(a.mask, b.mask) and a.error == b.error and a.refit == b.refit


@pytest.mark.parametrize("n", [1, 7, 50, 400])
def test_largest_picks_the_topk_set(n):
    x = torch.randn(30_000, generator=torch.Generator().manual_seed(n))
    x[::3] = -float("inf")  # masked entries, as in the refill
    assert torch.equal(largest(x, n).sort().values, x.topk(n).indices.sort().values)
    # the same entries excluded by a mask instead: the excluded ones include the largest values
    z = torch.randn(30_000, generator=torch.Generator().manual_seed(n + 1))
    out = torch.zeros(30_000, dtype=torch.bool)
    out[::3] = True
    out[z.topk(2 * n).indices] = True
    expect = torch.where(out, -float("inf"), z).topk(n).indices.sort().values
    got = largest(z, n, out)
    assert torch.equal(got.sort().values, expect) and not out[got].any()
    # a mask that leaves too few allowed entries above the sampled threshold -> the plain path, same set
    sparse = torch.ones(30_000, dtype=torch.bool)
    sparse[1::16] = False
    assert torch.equal(largest(z, n, sparse).sort().values,
                       torch.where(sparse, -float("inf"), z).topk(n).indices.sort().values)
    # only the sampled entries finite: about 2n/16 pass the threshold, fewer than n -> the plain top-k
    y = torch.full((30_000,), -float("inf"))
    y[::16] = torch.randperm(y[::16].numel(), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(largest(y, n).sort().values, y.topk(n).indices.sort().values)


def _torch_mask(svd, k, keep, refill, lam):
    C = svd.coeffs[:k]
    mask = sparse_mask(C, svd.atom_norms(k), keep, refill, lam, svd.ranking(lam), svd.refill_scores)
    return mask, C * mask


@pytest.mark.skipif(not rocket_cpu.usable(torch.zeros(1)), reason="numba is not installed")
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_compiled_mask_and_energy_equal_the_torch_forms(lam):
    """`rocket_cpu.masked_coefficients` (ranking walk, one pass, sampled refill threshold) gives the mask and
    C_s of `sparse_mask` + ``C * mask``, and ‖C_s‖² summed in float64, on a small and a wider layer (there the
    refill's sampled threshold decides)."""
    for seed, in_f, out_f in ((0, 32, 24), (1, 96, 200)):
        _, W, stats = correlated(seed, tokens=400, in_f=in_f, out_f=out_f)
        svd = whitened_svd(W, stats)
        m = svd.sigma.numel()
        rk = svd.ranking(lam)
        for k, keep, refill in ((m, m // 2, 3), (m - 7, 8, 0), (9, 1, 5), (5, 5, 0), (m, 0, 40), (m // 2, 3, 96)):
            mask, Cs, energy = rocket_cpu.masked_coefficients(rk.order, rk.position, svd.coeffs, svd.refill_scores,
                                                              k, keep, refill)
            want_mask, want_Cs = _torch_mask(svd, k, keep, refill, lam)
            assert torch.equal(mask, want_mask) and torch.equal(Cs, want_Cs), (seed, k, keep, refill)
            assert energy == pytest.approx(float(want_Cs.double().square().sum()), rel=1e-12)


@pytest.mark.skipif(not rocket_cpu.usable(torch.zeros(1)), reason="numba is not installed")
def test_compiled_refill_falls_back_to_every_allowed_entry():
    """The refill's two fallbacks: too many entries above the sampled threshold (equal scores: every entry
    passes) and too few (only the sampled entries are large). Either way: ``refill`` entries outside the top-keep
    mask, the largest there are."""
    k, out_f, m = 40, 64, 48
    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(m, generator=g) for _ in range(out_f)]).to(torch.int16)  # (out, m)
    position = torch.empty_like(order).scatter_(1, order.long(), torch.arange(m, dtype=torch.int16).expand(out_f, m))
    position = position.T.contiguous()  # (m, out)
    coeffs = torch.randn(m, out_f, generator=g)
    for scores in (torch.ones(m, out_f), torch.where(torch.arange(m * out_f).view(m, out_f) % 16 == 0,
                                                     10 + torch.rand(m, out_f, generator=g), torch.rand(m, out_f, generator=g))):
        keep, refill = 4, 300
        mask, Cs, _ = rocket_cpu.masked_coefficients(order, position, coeffs, scores, k, keep, refill)
        top = position[:k] <= torch.stack([(order[j] < k).cumsum(0).eq(keep).nonzero()[0, 0] for j in range(out_f)])
        extra = mask & ~top
        assert bool((mask >= top).all()) and int(extra.sum()) == refill
        allowed = scores[:k][~top]
        assert float(scores[:k][extra].min()) >= float(allowed.topk(refill).values[-1])
        assert torch.equal(Cs, coeffs[:k] * mask)


@pytest.mark.skipif(not rocket_cpu.usable(torch.zeros(1)), reason="numba is not installed")
def test_compiled_squared_norm_sums_in_float64():
    x = torch.randn(301, 257, generator=torch.Generator().manual_seed(0)) * 1e3
    want = float(x.double().square().sum())
    for view in (x, x.T, x[:, :100], x[:, 3]):  # contiguous, column-major, strided, a strided vector
        assert rocket_cpu.sq_norm(view) == pytest.approx(float(view.double().square().sum()), rel=1e-12)
    assert rocket_cpu.sq_norm(x) == pytest.approx(want, rel=1e-12)


def test_factorize_is_the_same_with_and_without_the_compiled_forms(monkeypatch):
    """Same mask, coefficients and choice; the closed-form error of each within its rounding of the residual
    evaluated directly in float64 (the compiled float64 sums are the closer: 2e-6 against 1e-5 here, where the
    error is 1/56 of the energy it is subtracted from)."""
    _, W, stats = correlated(2, tokens=400, in_f=96, out_f=200)
    cases = ((90, 40, 96), (30, 10, 20))
    svd = whitened_svd(W, stats)
    compiled = [factorize(svd, k, keep, refill, 0.5) for k, keep, refill in cases]
    monkeypatch.setattr(rocket_cpu, "usable", lambda *t: False)
    svd = whitened_svd(W, stats)  # its cached energy summed the torch way
    for a, (k, keep, refill) in zip(compiled, cases):
        b = factorize(svd, k, keep, refill, 0.5)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.C, b.C) and a.refit == b.refit
        direct = float((svd.coeffs.double() - a.Z.double() @ a.C.double()).square().sum())
        assert a.error == pytest.approx(direct, rel=1e-5) and b.error == pytest.approx(direct, rel=1e-4)
