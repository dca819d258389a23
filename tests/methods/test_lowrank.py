"""Low-rank methods: SVD, ASVD, SVD-LLM on tiny hand-checkable problems."""
import pytest
import torch

from sparselm import formats
from sparselm.capture import LinearStats
from sparselm.config import ASVDSpec, Ratio, SVDLLMSpec, SVDSpec
from sparselm.methods import Factored, compress_weight
from sparselm.methods.lowrank import asvd, svd, svd_llm
from sparselm.methods.whiten import upper_mm, whiten


def _data(out=24, inp=16, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(tokens, inp, generator=g) * torch.linspace(3, 0.1, inp)  # uneven channels
    return W, X, LinearStats.from_inputs(X.double())  # float64 products: the identities below hold to 1e-9


def _functional(X, W, R):
    return float((X.double() @ (W - R.reconstruct()).double().T).norm())


def test_whitening_identity():
    W, X, stats = _data()
    W_hat = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1))
    L = whiten(stats).L
    lhs = (X.double() @ (W - W_hat).double().T).norm()
    rhs = (L @ (W - W_hat).double().T).norm()
    assert torch.allclose(lhs, rhs, rtol=1e-9)


@pytest.mark.parametrize("n", [5, 255, 256, 301, 520])  # one product below 256, halves (and quarters) above
def test_upper_triangular_product_in_blocks_equals_the_full_product(n):
    g = torch.Generator().manual_seed(n)
    U = torch.randn(n, n, generator=g, dtype=torch.float64).triu()
    B = torch.randn(n, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(upper_mm(U, B), U @ B, rtol=1e-12, atol=1e-12)


def test_svd_llm_error_is_discarded_whitened_singular_values():
    W, X, stats = _data()
    spec = SVDLLMSpec(target=Ratio(0.4))
    res = svd_llm(W, stats, spec, torch.float32)
    r = formats.rank_for_ratio(0.4, 16, 24)
    assert isinstance(res, Factored) and res.U.shape == (16, r) and res.V.shape == (r, 24)
    sig = torch.linalg.svdvals(whiten(stats).L @ W.double().T)
    discarded = float(sig[r:].square().sum())
    assert _functional(X, W, res) ** 2 == pytest.approx(discarded, rel=1e-4)
    assert res.info["discarded_energy"] == pytest.approx(discarded, rel=1e-9)
    assert res.info["whitening_shift"] == 0.0
    # data-aware beats data-free on the functional error
    assert _functional(X, W, res) < _functional(X, W, svd(W, None, SVDSpec(target=Ratio(0.4)), torch.float32))
    assert _functional(X, W, res) <= _functional(X, W, asvd(W, stats, ASVDSpec(target=Ratio(0.4)), torch.float32))


def test_svd_is_truncated_svd_with_balanced_factors():
    W, _, _ = _data()
    res = compress_weight(SVDSpec(target=Ratio(0.5)), W, None, torch.float16)
    r = res.U.shape[1]
    sig = torch.linalg.svdvals(W.double())
    assert float((W - res.reconstruct()).double().norm()) ** 2 == pytest.approx(float(sig[r:].square().sum()), rel=1e-4)
    assert torch.allclose(res.U.norm(dim=0), res.V.norm(dim=1), rtol=1e-4)  # √σ on each side


def test_asvd_alpha_zero_is_svd_and_scaling_helps_its_own_norm():
    W, X, stats = _data()
    plain = svd(W, None, SVDSpec(target=Ratio(0.4)), torch.float32)
    a0 = asvd(W, stats, ASVDSpec(target=Ratio(0.4), alpha=0.0), torch.float32)
    assert torch.allclose(plain.reconstruct(), a0.reconstruct(), atol=1e-4)
    a = asvd(W, stats, ASVDSpec(target=Ratio(0.4), alpha=1.0), torch.float32)
    scale = (stats.sq_norms / stats.count).sqrt().float()  # ASVD's channel magnitude (RMS), alpha = 1
    assert float(((W - a.reconstruct()) * scale).norm()) <= float(((W - plain.reconstruct()) * scale).norm()) + 1e-5


@pytest.mark.parametrize("tokens", [0, 5])
def test_rank_deficient_and_zero_activations(tokens):
    W, _, _ = _data()
    X = torch.randn(tokens, 16)  # 5 tokens: rank 5 < 16; 0 tokens: an all-zero Gram
    stats = LinearStats.from_inputs(X) if tokens else LinearStats.empty(16)
    res = svd_llm(W, stats, SVDLLMSpec(target=Ratio(0.3)), torch.float32)
    assert res.info["whitening_shift"] > 0
    assert torch.isfinite(res.U).all() and torch.isfinite(res.V).all()
    a = asvd(W, stats, ASVDSpec(target=Ratio(0.3)), torch.float32)
    assert torch.isfinite(a.reconstruct()).all()


def test_whitening_of_a_shared_gram_is_computed_once_and_redone_after_it_changes(monkeypatch):
    from sparselm.methods import whiten as wmod
    calls = []
    real = wmod._whiten
    monkeypatch.setattr(wmod, "_whiten", lambda s: calls.append(1) or real(s))
    stats = LinearStats.from_inputs(torch.randn(40, 6, generator=torch.Generator().manual_seed(0)))
    first = wmod.whiten(stats)
    assert wmod.whiten(stats) is first and len(calls) == 1  # q, k, v: one Cholesky
    other = LinearStats.from_inputs(torch.randn(40, 6, generator=torch.Generator().manual_seed(1)))
    assert wmod.whiten(other) is not first and len(calls) == 2
    stats.add_batch(torch.randn(5, 6, generator=torch.Generator().manual_seed(2)))  # changed in place
    again = wmod.whiten(stats)
    assert len(calls) == 3 and torch.allclose(again.L.T @ again.L, stats.gram)
