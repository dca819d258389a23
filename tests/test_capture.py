"""Recording calibration statistics: one Gram per distinct input, exact values, hooks removed, errors named."""
from __future__ import annotations

import pytest
import torch

from sparselm import model as adapter
from sparselm.capture import LinearStats, gram, record
from sparselm.errors import InputError
from sparselm.methods import Pruned
from sparselm.modules import SparseLinear, dense_cache

from .conftest import tiny_model


def _inputs_by_hand(block, names, x, kw):
    seen = {}
    handles = [adapter.get_module(block, n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        block(x, **kw)
    for h in handles:
        h.remove()
    return seen


def test_projections_fed_the_same_input_share_one_exact_gram():
    model = tiny_model("llama")
    block = model.model.layers[0]
    names = list(adapter.linears(block))
    x = torch.randn(2, 16, 64)
    pos = torch.arange(16).unsqueeze(0)
    kw = {"position_embeddings": model.model.rotary_emb(x, pos)}
    stats: dict[str, LinearStats] = {}
    mods = {n: adapter.get_module(block, n) for n in names}
    with record(mods, stats), torch.no_grad():
        block(x, **kw)
        block(2 * x, **kw)  # a second batch accumulates into the same (shared) objects
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    assert len({id(s) for s in stats.values()}) == 4
    first, second = _inputs_by_hand(block, names, x, kw), _inputs_by_hand(block, names, 2 * x, kw)
    for n in names:
        X = torch.cat([first[n], second[n]])
        torch.testing.assert_close(stats[n].gram, X.T @ X, rtol=1e-5, atol=1e-5 * float(X.square().sum(0).max()))
        assert stats[n].count == X.shape[0]
    assert all(not m._forward_pre_hooks for m in mods.values())  # hooks removed


def test_non_finite_activation_names_the_layer():
    lin = torch.nn.Linear(4, 3)
    stats: dict[str, LinearStats] = {}
    x = torch.ones(5, 4)
    x[2, 1] = float("nan")
    with pytest.raises(InputError, match="blocks.7.fc"):
        with record({"blocks.7.fc": lin}, stats):
            lin(x)
    assert not lin._forward_pre_hooks


def test_dense_cache_gives_the_same_outputs_and_is_dropped():
    W = torch.randn(6, 8)
    mask = torch.rand(6, 8) > 0.5
    layer = SparseLinear.from_result(Pruned(W * mask, mask), None, torch.float32)
    block = torch.nn.Sequential(layer)
    x = torch.randn(3, 8)
    plain = block(x)
    with dense_cache(block):
        assert layer._dense is not None
        cached = block(x)
    assert layer._dense is None
    torch.testing.assert_close(cached, plain)
    torch.testing.assert_close(plain, x @ (W * mask).T)
    with dense_cache(block):  # nested (a walk's round loop around run_block): the outer context keeps the copy
        outer = layer._dense
        with dense_cache(block):
            assert layer._dense is outer
        assert layer._dense is outer
    assert layer._dense is None


@pytest.mark.parametrize("width", [3, 127, 128, 255, 256, 301, 577, 1030])
def test_gram_in_blocks_equals_the_full_product(width):  # one product below 256 wide, block rows from 256 on
    x = torch.randn(97, width, generator=torch.Generator().manual_seed(width))
    G = gram(x)
    assert torch.allclose(G, x.T @ x, rtol=1e-5, atol=1e-4) and torch.equal(G, G.T)
