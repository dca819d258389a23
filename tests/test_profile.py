"""Profiling: fast paths equal compress_weight, sizes are the modules' real bytes, and the normalization."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sparselm.budget import Option, allocate
from sparselm.capture import LinearStats
from sparselm.config import CoefStorage, MagnitudeSpec, MethodSpec, Ratio, RocketSpec, SVDLLMSpec, WandaSpec
from sparselm.methods import Factored, compress_weight, register
from sparselm.pipeline import build_module
from sparselm.profile import (DEFAULT_RATIOS, functional_error, output_energy, output_importance,
                              profile_layer)

RATIOS = (0.1, 0.3, 0.5, 0.7)


def layer(seed: int = 0, tokens: int = 160, in_f: int = 32, out_f: int = 24):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)  # (tokens, in)
    W = torch.randn(out_f, in_f, generator=g)  # (out, in)
    return W, LinearStats.from_inputs(X)


def rel_error(W, stats, res) -> float:
    return functional_error(W - res.reconstruct(), stats.gram) / output_energy(W, stats)


def written(module) -> int:
    """The bytes `io.save` writes for a module: its buffers."""
    return sum(b.numel() * b.element_size() for b in module.buffers())


def test_dense_option_and_default_grid():
    W, stats = layer()
    opts = profile_layer(W, stats, [], dtype=torch.bfloat16)
    assert opts == [Option(float(W.numel() * 2), 0.0, None)]
    assert DEFAULT_RATIOS[0] == 0.05 and DEFAULT_RATIOS[-1] == 0.7 and len(DEFAULT_RATIOS) == 14


def test_svdllm_fast_path_equals_compress_weight():
    W, stats = layer()
    opts = profile_layer(W, stats, [SVDLLMSpec()], RATIOS, torch.float16, dense=False)
    assert len(opts) == len(RATIOS)
    for opt in opts:
        res = compress_weight(opt.payload, W, stats, torch.float16)
        assert opt.error == pytest.approx(rel_error(W, stats, res), rel=1e-5, abs=1e-9)
        assert opt.size == written(build_module(res, None, torch.float16))


def test_rocket_fast_path_equals_compress_weight():
    W, stats = layer(1)
    opts = profile_layer(W, stats, [RocketSpec()], RATIOS, torch.bfloat16, dense=False, ks_grid=(1.0, 2.0, 3.0))
    assert [o.payload.target.value for o in opts] == list(RATIOS)
    for opt in opts:
        res = compress_weight(opt.payload, W, stats, torch.bfloat16)
        assert opt.error == pytest.approx(rel_error(W, stats, res), rel=1e-4)
        assert opt.size == written(build_module(res, None, torch.bfloat16))
        assert opt.size <= (1 - opt.payload.target.value) * W.numel() * 2
        # the kept ks is the best of the grid at that ratio
        for ks in (1.0, 2.0, 3.0):
            other = compress_weight(dataclasses.replace(opt.payload, ks=ks), W, stats, torch.bfloat16)
            # float32 products (rocket.WORK): ks values tied to ~1e-6 may rank either way on another CPU
            assert opt.error <= rel_error(W, stats, other) * (1 + 1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_rocket_ks_search_finds_the_exhaustive_option_where_the_error_is_unimodal(monkeypatch, seed):
    """The search walks from the previous ratio's best ks to lower errors: where a ratio's errors over the ks grid
    fall then rise (every (layer, ratio) of the real models measured), it finds the exhaustive search's option;
    elsewhere (tiny random layers, where rounding ``keep`` to whole entries makes steps), a local minimum."""
    import sparselm.profile as prof
    W, stats = layer(3 + seed, in_f=48, out_f=40)
    calls = []
    prof_factorize = prof.factorize
    monkeypatch.setattr(prof, "factorize", lambda *a, **k: calls.append(1) or prof_factorize(*a, **k))
    searched = profile_layer(W, stats, [RocketSpec()], dtype=torch.bfloat16, dense=False)
    n_searched = len(calls)
    monkeypatch.setattr(prof, "ROCKET_EXHAUSTIVE", True)  # every ks of every ratio factorized
    full = profile_layer(W, stats, [RocketSpec()], dtype=torch.bfloat16, dense=False)
    assert len(calls) - n_searched == len(DEFAULT_RATIOS) * len(prof.DEFAULT_KS)  # no ks clipped here: all 70
    assert n_searched < 0.7 * len(DEFAULT_RATIOS) * len(prof.DEFAULT_KS)  # the search skips most ks
    unimodal = 0
    for got, best in zip(searched, full):
        assert got.payload.target == best.payload.target
        curve = [profile_layer(W, stats, [RocketSpec(ks=ks)], [got.payload.target.value], torch.bfloat16,
                               dense=False, ks_grid=(ks,))[0].error for ks in prof.DEFAULT_KS]
        low = curve.index(min(curve))
        if all(a > b for a, b in zip(curve[:low], curve[1:low + 1])) and all(
                a < b for a, b in zip(curve[low:], curve[low + 1:])):
            unimodal += 1
            assert (got.payload, got.size, got.error) == (best.payload, best.size, best.error)
        i = prof.DEFAULT_KS.index(got.payload.ks)
        assert got.error == curve[i] and all(got.error <= curve[j] for j in (i - 1, i + 1) if 0 <= j < len(curve))
    assert unimodal >= len(DEFAULT_RATIOS) // 2


def test_rocket_ks_search_stops_at_the_rank_bound(monkeypatch):
    """A ks whose rank bound Σ_{i≥k} σ_i² exceeds the best error found is not factorized: with a margin that
    lets no bound stop the walk, it factorizes more, and finds the same options."""
    import sparselm.profile as prof
    W, stats = layer(3, in_f=48, out_f=40)
    calls = []
    prof_factorize = prof.factorize
    monkeypatch.setattr(prof, "factorize", lambda *a, **k: calls.append(1) or prof_factorize(*a, **k))
    bounded = profile_layer(W, stats, [RocketSpec()], dtype=torch.bfloat16, dense=False)
    n_bounded = len(calls)
    monkeypatch.setattr(prof, "ROCKET_PRUNE_MARGIN", float("inf"))
    calls.clear()
    walked = profile_layer(W, stats, [RocketSpec()], dtype=torch.bfloat16, dense=False)
    assert n_bounded < len(calls)
    assert [(o.payload, o.error) for o in bounded] == [(o.payload, o.error) for o in walked]


@pytest.mark.parametrize("spec", [MagnitudeSpec(), WandaSpec()])
def test_pruning_fast_path_equals_compress_weight(spec):
    W, stats = layer(2)
    opts = profile_layer(W, stats, [spec], RATIOS, torch.float16, dense=False)
    assert len(opts) == len(RATIOS)
    for opt in opts:
        res = compress_weight(opt.payload, W, stats, torch.float16)
        assert opt.error == pytest.approx(rel_error(W, stats, res), rel=1e-6)
        assert opt.size == written(build_module(res, None, torch.float16))


@dataclasses.dataclass(frozen=True)
class _TruncSpec(MethodSpec):  # a test-only method that goes through the generic path
    name = "test-trunc"


@register(_TruncSpec)
def _trunc(W, stats, spec, dtype):
    r = max(1, int((1 - spec.target.value) * W.shape[0] * W.shape[1] / sum(W.shape)))
    U, s, Vh = torch.linalg.svd(W.T, full_matrices=False)
    return Factored(U[:, :r] * s[:r], Vh[:r])


def test_generic_path_measures_module_bytes_and_error():
    W, stats = layer(3)
    opts = profile_layer(W, stats, [_TruncSpec()], (0.2, 0.6), torch.float32, dense=False)
    for opt, r in zip(opts, (0.2, 0.6)):
        res = _trunc(W, stats, opt.payload, torch.float32)
        assert opt.payload.target == Ratio(r)
        assert opt.size == written(build_module(res, None, torch.float32))
        assert opt.error == pytest.approx(rel_error(W, stats, res), rel=1e-6)


@pytest.mark.parametrize("spec", [RocketSpec(storage=CoefStorage.INT8), WandaSpec(storage=CoefStorage.INT4, quant_group=8),
                                  SVDLLMSpec(storage=CoefStorage.BF16_14BIT)])
def test_options_of_another_storage_are_its_modules_bytes_and_rounded_error(spec):
    """A storage the fast paths do not model goes through compress_weight: the option's size is the module's
    bytes (scales included) and its error the one after rounding."""
    W, stats = layer(4)
    opts = profile_layer(W, stats, [spec], RATIOS, torch.float32, dense=False, ks_grid=(2.0,))
    assert opts and all(o.payload.store == spec.store for o in opts)
    for opt in opts:
        res = compress_weight(opt.payload, W, stats, torch.float32)
        assert opt.size == written(build_module(res, None, torch.float32)) <= (1 - opt.payload.target.value) * W.numel() * 4
        assert opt.error == pytest.approx(rel_error(W, stats, res), rel=1e-5)


def test_knapsack_chooses_storage_like_any_other_option():
    """The same method at two storages is two option lists: under a tight budget the int8 options (about 4× the
    coefficients per byte of float32 ones) are chosen."""
    W, stats = layer(5)
    opts = profile_layer(W, stats, [RocketSpec(), RocketSpec(storage=CoefStorage.INT8)], RATIOS, torch.float32,
                         ks_grid=(2.0,))
    kinds = {o.payload.storage for o in opts if o.payload is not None}
    assert kinds == {CoefStorage.DTYPE, CoefStorage.INT8}
    choice = allocate({"l": opts}, 0.35 * W.numel() * 4, solver="dp")
    assert opts[choice["l"]].payload.storage is CoefStorage.INT8


def sizes_chosen(tables: dict[str, list[Option]], keep: float) -> dict[str, float]:
    budget = keep * sum(t[0].size for t in tables.values())  # t[0] is the dense option
    choice = allocate(tables, budget, solver="dp", resolution=4000)
    return {n: tables[n][i].size for n, i in choice.items()}


def test_relative_error_is_scale_free_and_importance_shifts_compression():
    W, stats = layer(4)
    small = 0.1 * W  # same layer, output 10x smaller
    grid = dict(ratios=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), dtype=torch.float16, ks_grid=(2.0,))
    a = profile_layer(W, stats, [RocketSpec()], **grid)
    b = profile_layer(small, stats, [RocketSpec()], **grid)
    # relative error: a scaled copy is indistinguishable (layers are comparable whatever their scale)
    # (to float32 rounding: the closed-form residual's products are float32, rocket.WORK)
    assert [o.error for o in a] == pytest.approx([o.error for o in b], rel=1e-5)
    # an explicit importance: the layer that matters less is compressed more (by an exchange argument
    # the optimum never gives it more bytes; strictly fewer here)
    low = profile_layer(W, stats, [RocketSpec()], importance=0.1, **grid)
    shifted = sizes_chosen({"a": a, "b": low}, 0.55)
    assert shifted["b"] < shifted["a"]
    # importance from output energy: the 10x smaller output weighs 100x less and is compressed more
    w = output_importance({"a": output_energy(W, stats), "b": output_energy(small, stats)})
    assert w["a"] / w["b"] == pytest.approx(100.0)
    tables = {n: profile_layer(m, stats, [RocketSpec()], importance=w[n], **grid)
              for n, m in (("a", W), ("b", small))}
    by_energy = sizes_chosen(tables, 0.55)
    assert by_energy["b"] < by_energy["a"]


def test_output_importance_reference():
    assert output_importance({"a": 2.0, "b": 6.0}) == {"a": 0.5, "b": 1.5}
    assert output_importance({"a": 2.0, "b": 6.0}, {"a": 4.0, "b": 6.0}) == {"a": 0.5, "b": 1.0}
    assert output_importance({"a": 2.0}, 0.0) == {"a": 0.0}


def test_cache_reuses_options_and_one_whitened_svd_serves_every_method(monkeypatch):
    from sparselm import profile
    W, stats = layer()
    specs = [RocketSpec(target=Ratio(0.3)), SVDLLMSpec(target=Ratio(0.3))]
    calls, real = [], profile.whitened_svd
    monkeypatch.setattr(profile, "whitened_svd", lambda *a: calls.append(1) or real(*a))
    cache: dict = {}
    first = profile_layer(W, stats, specs, RATIOS, cache=cache, key="layer")
    assert len(calls) == 1 and len(cache) == 2  # one SVD for both methods, one entry per method
    again = profile_layer(W, stats, [dataclasses.replace(s, target=Ratio(0.6)) for s in specs], RATIOS,
                          cache=cache, key="layer")  # another budget: same options, nothing recomputed
    assert again == first and len(calls) == 1
    profile_layer(W, stats, specs, RATIOS, cache=cache, key="other layer")
    assert len(calls) == 2 and len(cache) == 4


def test_cache_hit_builds_nothing(monkeypatch):
    from sparselm import profile
    W, stats = layer()
    cache: dict = {}
    first = profile_layer(W, stats, [SVDLLMSpec(target=Ratio(0.3))], RATIOS, cache=cache, key="layer")
    monkeypatch.setattr(profile, "output_energy", lambda *a: pytest.fail("energy recomputed on a cache hit"))
    assert profile_layer(W, stats, [SVDLLMSpec(target=Ratio(0.5))], RATIOS, cache=cache, key="layer") == first


def test_gptq_is_one_option_whatever_the_grid():
    """GPTQ's size is set by its storage (int8, one fp16 scale per 8 inputs: 1 + 2/8 bytes a weight), not by the
    ratio: one option, the module GPTQ builds at the grid's smallest ratio, whatever the grid."""
    from sparselm.config import GPTQSpec
    W, stats = layer(5)
    spec = GPTQSpec(storage=CoefStorage.INT8, quant_group=8)
    opts = profile_layer(W, stats, [spec], RATIOS, torch.float32, dense=False)
    assert len(opts) == 1 and opts[0].payload.target == Ratio(RATIOS[0])
    res = compress_weight(opts[0].payload, W, stats, torch.float32)
    assert opts[0].size == written(build_module(res, None, torch.float32)) == W.numel() * (1 + 2 / 8)
    assert opts[0].error == pytest.approx(rel_error(W, stats, res), rel=1e-5)


def test_walk_down_stops_at_the_first_rise_and_at_the_bound():
    from sparselm.profile import walk_down
    values = [5.0, 3.0, 2.0, 4.0, 6.0]
    for start, seen_expected in ((0, [0, 1, 2, 3]), (4, [4, 3, 2, 1]), (2, [2, 3, 1])):
        seen = {}
        walk_down(5, start, lambda p: seen.setdefault(p, values[p]), lambda p: False)
        assert list(seen) == seen_expected and min(seen.values()) == 2.0
    seen = {}  # a bound that forbids position 2: the walk from 0 stops at 1
    walk_down(5, 0, lambda p: seen.setdefault(p, values[p]), lambda p: p == 2)
    assert list(seen) == [0, 1]
