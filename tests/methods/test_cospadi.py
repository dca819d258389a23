"""CoSpaDi and its engines (batched OMP, block K-SVD) on tiny hand-checkable problems, and against the
plain reference twin."""
import pytest
import torch

from sparselm.capture import LinearStats
from sparselm.config import CoefStorage, CoSpaDiSpec, Init, Ratio
from sparselm.errors import InputError
from sparselm.methods import SparseDict, compress_group
from sparselm.methods._reference import cospadi_reference, ksvd_reference, learn_reference, omp_column
from sparselm.formats import group_dict_bytes
from sparselm.methods.cospadi import cospadi, init_dictionary, learn_dictionary, paper_sizes, sizes_for_ratio
from sparselm.methods.ksvd import ksvd_update
from sparselm.methods import omp_cpu
from sparselm.methods.omp import Engine, omp
from sparselm.methods.whiten import whiten
from sparselm.modules import SparseDictLinear
from sparselm.packing import round_values


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dictionary(n, k, seed=0):
    D = torch.randn(n, k, generator=_gen(seed))
    return D / D.norm(dim=0)


def _layer(out=48, inp=32, tokens=256, seed=0):
    g = _gen(seed)
    U = torch.randn(out, 8, generator=g)
    W = U @ torch.randn(8, inp, generator=g) + 0.3 * torch.randn(out, inp, generator=g)  # low rank + noise
    X = torch.randn(tokens, inp, generator=g) * torch.linspace(2, 0.2, inp)
    return W, LinearStats.from_inputs(X), X


# --- OMP -----------------------------------------------------------------------------------------------
ENGINES = [Engine.TORCH, pytest.param(Engine.COMPILED, marks=pytest.mark.skipif(not omp_cpu.available(), reason="no numba"))]


@pytest.mark.parametrize("engine", ENGINES)
def test_omp_recovers_planted_sparse_codes(engine):
    n, k, s, cols = 64, 128, 4, 200
    D = _dictionary(n, k)
    g = _gen(1)
    idx = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(cols)])  # (cols, s)
    val = (1 + torch.rand(cols, s, generator=g)) * torch.sign(torch.randn(cols, s, generator=g))
    S = torch.zeros(cols, k).scatter_(1, idx, val).T  # (k, cols)
    codes = omp(D, D @ S, s, engine=engine)
    assert torch.equal(codes.mask(k), S != 0)
    assert torch.allclose(codes.dense(k), S, atol=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_omp_matches_textbook_omp(engine):
    D, Y = _dictionary(24, 40).double(), torch.randn(24, 6, generator=_gen(2)).double()
    codes = omp(D, Y, 10, dtype=torch.float64, engine=engine)
    for j in range(Y.shape[1]):
        support, coef = omp_column(D, Y[:, j], 10)
        assert codes.idx[j].tolist() == support
        assert torch.allclose(codes.val[j], coef, atol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_omp_keeps_exactly_s_atoms_when_the_residual_vanishes(engine):
    D = _dictionary(16, 30)
    D = torch.cat([D, D[:, :5], torch.zeros(16, 2)], 1)  # duplicate and zero atoms: (16, 37)
    Y = D[:, :2] @ torch.tensor([[1.0, -2.0], [0.5, 1.0]])  # 2-sparse columns
    codes = omp(D, Y, 20, engine=engine)  # more steps than the rank allows (20 > 16)
    assert (codes.mask(37).sum(0) == 20).all()
    assert torch.isfinite(codes.val).all()
    assert torch.allclose(D @ codes.dense(37), Y, atol=1e-4)


@pytest.mark.skipif(not omp_cpu.available(), reason="no numba")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_and_batched_omp_agree(dtype):
    """Same algorithm, summation order aside: same supports and values on a well-separated problem."""
    D, Y = _dictionary(48, 90, seed=3).to(dtype), torch.randn(48, 70, generator=_gen(4)).to(dtype)
    a, b = (omp(D, Y, 30, max_bytes=1 << 16, engine=e) for e in (Engine.COMPILED, Engine.TORCH))
    same = (a.idx == b.idx).all(1).float().mean()
    assert same == 1 if dtype == torch.float64 else same >= 0.95  # float32: a rare near-tie may flip
    rows = (a.idx == b.idx).all(1)
    torch.testing.assert_close(a.val[rows], b.val[rows], rtol=1e-3 if dtype == torch.float32 else 1e-9, atol=1e-5)
    err = lambda c: (Y - D @ c.dense(90)).norm(dim=0)
    torch.testing.assert_close(err(a), err(b), rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not omp_cpu.available(), reason="no numba")
def test_compiled_omp_handles_zero_repeated_atoms_and_vanishing_residuals():
    D = torch.cat([_dictionary(48, 90, seed=3), torch.zeros(48, 1), _dictionary(48, 90, seed=3)[:, :4]], 1)
    Y = D[:, 10:13].sum(1, keepdim=True).expand(48, 5).contiguous()  # exact after 3 atoms
    codes = omp(D, Y, 30, engine=Engine.COMPILED)
    assert (codes.mask(95).sum(0) == 30).all() and torch.isfinite(codes.val).all()
    assert sorted(codes.idx[0, :3].tolist()) == [10, 11, 12] and (codes.val[:, 3:] == 0).all()
    torch.testing.assert_close(D @ codes.dense(95), Y, atol=1e-5, rtol=0)


def test_omp_rejects_unknown_engine():
    with pytest.raises(ValueError, match="engine"):
        omp(_dictionary(8, 10), torch.randn(8, 3), 2, engine="fast")


# --- K-SVD ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [1, 5, None, 60])
def test_ksvd_never_increases_the_objective(block):
    Y = torch.randn(20, 50, generator=_gen(3))
    D = _dictionary(20, 60, seed=4)
    for _ in range(3):
        codes = omp(D, Y, 6)
        S, mask = codes.dense(60), codes.mask(60)
        up = ksvd_update(Y, D, S, mask, power_iters=3, block_size=block)
        assert up.objective_after <= up.objective_before
        assert float((Y - up.D @ up.S).double().square().sum()) <= up.objective_before * (1 + 1e-5)
        assert torch.equal(up.S != 0, mask & (up.S != 0)) and torch.allclose(up.D.norm(dim=0), torch.ones(60))
        D = up.D


def test_ksvd_block_of_one_is_sequential_ksvd():
    Y = torch.randn(16, 40, generator=_gen(5)).double()
    D = _dictionary(16, 24, seed=6).double()
    codes = omp(D, Y, 5, dtype=torch.float64)
    S, mask = codes.dense(24), codes.mask(24)
    fast = ksvd_update(Y, D, S, mask, power_iters=4, block_size=1)
    D_ref, S_ref = ksvd_reference(Y, D, S, mask, power_iters=4)
    assert torch.allclose(fast.D, D_ref, atol=1e-8) and torch.allclose(fast.S, S_ref, atol=1e-8)


def _whitened(out, inp, seed):
    W, stats, _ = _layer(out=out, inp=inp, seed=seed)
    Y = whiten(stats).L @ W.double().T  # (inp, out)
    k, s = paper_sizes(0.2, inp, out, 2.0)
    return Y, init_dictionary(Y, k, Init.RANDOM_COLUMNS, seed), s


def test_fast_engine_with_blocks_of_one_is_the_reference_algorithm():
    Y, D0, s = _whitened(40, 16, seed=7)  # float64: same supports, same values
    D0 = _dictionary(16, D0.shape[1], seed=7).double()  # random atoms: no column is fit exactly early
    fast = learn_dictionary(Y, D0, s, iters=4, power_iters=5, tol=None, block_size=1)
    ref = learn_reference(Y, D0, s, iters=4, power_iters=5, tol=None)
    assert fast.history[:5] == pytest.approx(ref.history, rel=1e-6)
    assert fast.history[5] <= ref.history[-1] * (1 + 1e-9)  # the final exact refit can only help


def test_fast_engine_matches_reference_twin_error():
    ratios = []
    for seed in range(3):
        Y, D0, s = _whitened(64, 32, seed)
        Y, D0 = Y.float(), D0.float()
        fast = learn_dictionary(Y, D0, s, iters=6, power_iters=8, tol=None)  # default blocks, float32
        ref = learn_reference(Y, D0, s, iters=6, power_iters=8, tol=None)
        assert fast.iterations == ref.iterations == 6
        ratios.append(fast.rel_error / ref.rel_error)
    # float32 rounding sends the two greedy trajectories apart (a few % either way); on average equal
    assert sum(ratios) / len(ratios) <= 1.02 and max(ratios) <= 1.05


# --- sizing --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,d,kv,ffn,expected", [
    # methods.md §2.4 (ρ = 2): (q/o k/s, k_proj k/s, gate/up k/s, down k/s)
    (0.2, 2048, 512, 8192, [(1092, 546), (364, 182), (2184, 1092), (1456, 728)]),   # Llama-3.2-1B
    (0.2, 4096, 1024, 14336, [(2184, 1092), (728, 364), (4170, 2085), (2867, 1433)]),  # Llama-3-8B
    (0.4, 4096, 1024, 14336, [(1638, 819), (546, 273), (3127, 1563), (2150, 1075)]),   # Llama-3-8B
])
def test_paper_sizes_match_worked_table(ratio, d, kv, ffn, expected):
    shapes = [(d, d), (d, kv), (d, ffn), (ffn, d)]  # (d1 = in, d2 = out)
    assert [paper_sizes(ratio, i, o, 2.0) for i, o in shapes] == expected


def test_stored_sizing_fits_the_budget_and_agrees_with_eq11_for_bf16_14bit():
    for inp, out in [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]:
        k, s = sizes_for_ratio(0.2, inp, out, 2.0, torch.bfloat16, CoefStorage.BF16_14BIT)
        assert abs(k - paper_sizes(0.2, inp, out, 2.0)[0]) <= 1 and s == round(k / 2)
    k, s = sizes_for_ratio(0.3, 32, 48, 3.0, torch.float16, CoefStorage.INT8)
    budget = 0.7 * 32 * 48 * 2
    assert group_dict_bytes(32, [48], k, [s * 48], CoefStorage.INT8, torch.float16) <= budget
    assert group_dict_bytes(32, [48], k + 1, [round((k + 1) / 3) * 48], CoefStorage.INT8, torch.float16) > budget


# --- the method ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", [CoefStorage.BF16_14BIT, CoefStorage.INT8])
def test_cospadi_layer_rounds_like_the_module_and_fits_its_budget(storage):
    W, stats, X = _layer()
    spec = CoSpaDiSpec(target=Ratio(0.3), iters=4, storage=storage)
    res, = compress_group(spec, [W], [stats], torch.bfloat16)
    assert isinstance(res, SparseDict) and res.D.shape == (32, res.info["k"]) and res.S.shape == (res.info["k"], 48)
    assert (res.mask.sum(0) == res.info["s"]).all() and not (res.S * ~res.mask).any()
    module = SparseDictLinear(res.D, res.S, res.mask, store=storage, dtype=torch.bfloat16)
    assert torch.equal(module.coefficients().float(), res.S)  # rounded once, exactly as stored
    assert module.stored_bytes() <= 0.7 * W.numel() * 2
    # reported error = functional error of what is stored (whitening identity)
    Wq = module.dense_weight().double()
    rel = (X.double() @ (W.double() - Wq).T).norm() / (X.double() @ W.double().T).norm()
    assert res.info["rel_error"] == pytest.approx(float(rel), rel=1e-3)
    assert res.info["whitening_shift"] == 0.0 and 1 <= res.info["iterations"] <= 4


def test_an_int8_dictionary_buys_more_atoms_at_the_same_bytes_and_reports_its_stored_error():
    """``dict_storage: int8`` (fp32 model): D costs 1 byte per entry + a scale per atom instead of 4 bytes, so the
    same ratio affords more atoms; the coefficients are refit to the rounded D; ``rel_error`` is the stored layer's."""
    W, stats, X = _layer()
    plain, = cospadi([W], [stats], CoSpaDiSpec(target=Ratio(0.3), iters=4), torch.float32)
    spec = CoSpaDiSpec(target=Ratio(0.3), iters=4, dict_storage=CoefStorage.INT8)
    res, = cospadi([W], [stats], spec, torch.float32)
    assert res.info["k"] > plain.info["k"] and res.info["dict_storage"] == "int8"
    module = SparseDictLinear.from_result(res, None, torch.float32)
    assert module.stored_bytes() == res.stored_bytes(torch.float32) <= 0.7 * W.numel() * 4
    assert res.info["k"] == sizes_for_ratio(0.3, 32, 48, 2.0, torch.float32, spec.store, spec.dict_store)[0]
    Wq = module.dense_weight().double()
    rel = (X.double() @ (W.double() - Wq).T).norm() / (X.double() @ W.double().T).norm()
    assert res.info["rel_error"] == pytest.approx(float(rel), rel=1e-3)
    with pytest.raises(InputError, match="dict_quant_group"):
        CoSpaDiSpec(dict_storage=CoefStorage.BF16, dict_quant_group=16)


@pytest.mark.parametrize("tokens", [0, 4])
def test_cospadi_survives_rank_deficient_and_zero_activations(tokens):
    W, _, _ = _layer()
    stats = LinearStats.from_inputs(torch.randn(tokens, 32)) if tokens else LinearStats.empty(32)
    for init in Init:
        res, = cospadi([W], [stats], CoSpaDiSpec(target=Ratio(0.3), iters=2, init=init), torch.float32)
        assert res.info["whitening_shift"] > 0
        assert torch.isfinite(res.D).all() and torch.isfinite(res.S).all()


def test_grouped_cospadi_shares_one_dictionary_and_reconstructs_each_layer():
    layers = [_layer(out=out, seed=i) for i, out in enumerate([48, 24, 48])]
    spec = CoSpaDiSpec(target=Ratio(0.2), iters=6, group_size=3, storage=CoefStorage.FP16)
    results = cospadi([w for w, _, _ in layers], [st for _, st, _ in layers], spec, torch.float32)
    assert len(results) == 3 and all(r.D is results[0].D for r in results)
    for (W, stats, X), r in zip(layers, results):
        assert r.S.shape == (r.info["k"], W.shape[0]) and (r.mask.sum(0) == r.info["s"]).all()
        rel = float((X @ (W - r.reconstruct()).T).norm() / (X @ W.T).norm())
        assert rel < 0.5  # a shared dictionary still reconstructs every layer
        assert r.info["group_size"] == 3 and r.info["shared_dictionary"]
    single, = cospadi([layers[0][0]], [layers[0][1]], spec, torch.float32)
    assert not single.info["shared_dictionary"]


def test_reference_twin_runs_the_same_pipeline():
    W, stats, _ = _layer(out=24, inp=16)
    spec = CoSpaDiSpec(target=Ratio(0.3), iters=3)
    fast, = cospadi([W], [stats], spec, torch.float32)
    ref, = cospadi_reference([W], [stats], spec, torch.float32)
    assert (fast.info["k"], fast.info["s"]) == (ref.info["k"], ref.info["s"])
    assert fast.info["rel_error"] <= ref.info["rel_error"] * 1.05
