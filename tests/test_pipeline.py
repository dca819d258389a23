"""The layer-by-layer pipeline on tiny random models of every supported architecture."""
from __future__ import annotations

import pytest
import torch

from sparselm import io, pipeline
from sparselm import model as adapter
from sparselm.config import (CoSpaDiSpec, MagnitudeSpec, Pattern, Ratio, Recipe, RocketSpec, SparseGPTSpec,
                             Sparsity, SVDLLMSpec, SVDSpec, ASVDSpec, WandaSpec)
from sparselm.errors import InputError
from sparselm.modules import CompressedLinear, LowRankLinear, SparseDictLinear, SparseLinear

from .conftest import ARCHS, CAUSAL, VOCAB, tiny_model

CPU = torch.device("cpu")
SPECS = [MagnitudeSpec(target=Sparsity(0.5)), WandaSpec(target=Pattern(2, 4)), SparseGPTSpec(target=Sparsity(0.5)),
         SparseGPTSpec(target=Pattern(4, 8)), SVDSpec(target=Ratio(0.3)), ASVDSpec(target=Ratio(0.3)),
         SVDLLMSpec(target=Ratio(0.3)), CoSpaDiSpec(target=Ratio(0.3), iters=3), RocketSpec(target=Ratio(0.3))]


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _check_promise(module: CompressedLinear, spec) -> None:
    W = module.dense_weight()
    t = spec.target
    if isinstance(t, Pattern):
        kept = (W != 0).view(W.shape[0], -1, t.m).sum(-1)
        assert (kept <= t.n).all()
    elif isinstance(t, Sparsity):
        assert (W == 0).float().mean() >= t.value - 0.02
    if isinstance(t, Ratio):
        dense = module.in_features * module.out_features * 4
        bias = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
        assert module.stored_bytes() - bias <= (1 - t.value) * dense


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.target}")
def test_every_method_on_every_architecture(arch, spec, calib_ids, tmp_path):
    model = tiny_model(arch)
    n_linears = sum(len(adapter.linears(b)) for b in adapter.find_blocks(model)[1])
    ids = calib_ids[:2, :16]
    report = pipeline.compress(model, calib_ids, Recipe(methods=(spec,)), CPU, torch.float32, batch_size=4)
    assert len(report.layers) == n_linears
    for layer in report.layers:
        _check_promise(layer.module, spec)
        assert 0.0 <= layer.rel_error < 1.5, (layer.name, layer.rel_error)
    before = _outputs(model, ids)
    assert torch.isfinite(before).all()
    io.save(model, None, tmp_path / "out", {"base_model": arch}, torch.float32)
    after = _outputs(io.load(tmp_path / "out"), ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_compressed_outputs_are_propagated(calib_ids):
    """Block 1 must be calibrated on block 0's *compressed* outputs: compare with a dense-propagated run."""
    model = tiny_model("llama")
    blocks = adapter.find_blocks(model)[1]
    seen = []
    handle = blocks[1].register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                                 with_kwargs=True)
    dense_in = pipeline.run_block(blocks[0], pipeline.capture_inputs(model, blocks, calib_ids, 8, CPU)).hidden[0]
    seen.clear()
    pipeline.compress(model, calib_ids, Recipe(methods=(MagnitudeSpec(target=Sparsity(0.7)),)), CPU, torch.float32)
    handle.remove()
    compressed_in = pipeline.run_block(blocks[0], pipeline.capture_inputs(model, blocks, calib_ids, 8, CPU)).hidden[0]
    # the statistics pass of block 1 saw block 0's compressed outputs, not the dense ones
    assert torch.allclose(seen[0], compressed_in, atol=1e-5)
    assert not torch.allclose(seen[0], dense_in, atol=1e-3)


def test_targets_and_ignore_select_layers(calib_ids):
    model = tiny_model("llama")
    recipe = Recipe(methods=(MagnitudeSpec(target=Sparsity(0.5)),), targets=("*mlp*",), ignore=("*down_proj",))
    report = pipeline.compress(model, calib_ids, recipe, CPU, torch.float32)
    names = sorted(layer.name.split(".")[-1] for layer in report.layers)
    assert names == ["gate_proj", "gate_proj", "up_proj", "up_proj"]
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_no_matching_target_is_an_input_error(calib_ids):
    with pytest.raises(InputError, match="no linear layer matches"):
        pipeline.compress(tiny_model("llama"), calib_ids, Recipe(methods=(MagnitudeSpec(),), targets=("*nothing*",)),
                          CPU, torch.float32)


def test_non_finite_weight_names_the_layer(calib_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj"):
        pipeline.compress(model, calib_ids, Recipe(methods=(MagnitudeSpec(),)), CPU, torch.float32)


def test_pattern_not_dividing_width_is_an_input_error(calib_ids):
    with pytest.raises(InputError):
        pipeline.compress(tiny_model("llama"), calib_ids, Recipe(methods=(WandaSpec(target=Pattern(3, 7)),)),
                          CPU, torch.float32)


@pytest.mark.parametrize("arch", CAUSAL)
def test_export_is_a_plain_dense_model(arch, calib_ids, tmp_path):
    from transformers import AutoModelForCausalLM
    model = tiny_model(arch)
    pipeline.compress(model, calib_ids, Recipe(methods=(WandaSpec(target=Sparsity(0.5)),)), CPU, torch.float32)
    ids = calib_ids[:2, :16]
    want = _outputs(model, ids)
    io.save(model, None, tmp_path / "c", {}, torch.float32)
    io.export(tmp_path / "c", tmp_path / "d")
    assert not (tmp_path / "d" / io.MANIFEST).exists()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    torch.testing.assert_close(_outputs(dense, ids), want, rtol=1e-5, atol=1e-5)


def test_grouped_cospadi_shares_one_dictionary_stored_once(calib_ids, tmp_path):
    from sparselm.io import tensor_names_and_bytes
    model = tiny_model("llama")
    spec = CoSpaDiSpec(target=Ratio(0.3), iters=3, group_size=2)
    report = pipeline.compress(model, calib_ids, Recipe(methods=(spec,)), CPU, torch.float32)
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.D is layers[1].self_attn.q_proj.D          # shared
    assert layers[0].self_attn.o_proj.D is not layers[1].self_attn.o_proj.D      # private
    assert all(r.info.get("shared_dictionary") == ("o_proj" not in r.name and "down_proj" not in r.name)
               for r in report.layers)
    ids = calib_ids[:2, :16]
    want = _outputs(model, ids)
    io.save(model, None, tmp_path / "g", {}, torch.float32)
    names = tensor_names_and_bytes(tmp_path / "g" / io.WEIGHTS)
    assert "model.layers.0.self_attn.q_proj.D" in names and "model.layers.1.self_attn.q_proj.D" not in names
    torch.testing.assert_close(_outputs(io.load(tmp_path / "g"), ids), want, rtol=0, atol=0)


def test_knapsack_profile_cache_gives_the_same_plan(calib_ids, monkeypatch):
    from sparselm.config import Allocate
    from sparselm import profile
    recipe = lambda r: Recipe(methods=(RocketSpec(target=Ratio(r)), SVDLLMSpec(target=Ratio(r))),
                              allocate=Allocate.KNAPSACK)
    fresh = pipeline.compress(tiny_model("llama"), calib_ids, recipe(0.4), CPU, torch.float32).allocation
    cache: dict = {}
    pipeline.compress(tiny_model("llama"), calib_ids, recipe(0.2), CPU, torch.float32, profile_cache=cache)
    assert len(cache) == 28  # one option table per targeted layer (2 blocks x 7 linears) and method
    calls = []
    for builder in ("svd", "svdllm", "rocket"):  # any option built again, or the whitened SVD recomputed
        real = getattr(profile._Table, builder)
        monkeypatch.setattr(profile._Table, builder,
                            lambda self, *a, _real=real, _name=builder: calls.append(_name) or _real(self, *a))
    cached = pipeline.compress(tiny_model("llama"), calib_ids, recipe(0.4), CPU, torch.float32,
                               profile_cache=cache).allocation
    assert not calls
    assert cached == fresh


def test_knapsack_caps_every_layer_error_at_alpha_times_the_uniform_mean(calib_ids):
    from sparselm.budget import ALPHAS
    from sparselm.config import Allocate
    rows = pipeline.compress(tiny_model("llama"), calib_ids, Recipe(methods=(SVDLLMSpec(target=Ratio(0.4)),),
                             allocate=Allocate.KNAPSACK), CPU, torch.float32).allocation
    cap = rows[0]["error_cap"]
    assert cap is not None and all(r["error_cap"] == cap for r in rows)
    assert all(r["predicted_error"] <= cap for r in rows)
    assert max(r["predicted_error"] for r in rows) > 0


def test_uniform_reference_is_the_mean_error_at_the_target_ratio():
    from sparselm.budget import Option
    opts = {"a": [Option(8, 0.0, None), Option(4, 0.2, SVDLLMSpec(target=Ratio(0.5))),
                  Option(6, 0.1, SVDLLMSpec(target=Ratio(0.25)))],
            "b": [Option(8, 0.0, None), Option(4, 0.4, SVDLLMSpec(target=Ratio(0.5))),
                  Option(4, 0.3, RocketSpec(target=Ratio(0.5)))]}
    assert pipeline.uniform_reference(opts, 0.5) == pytest.approx((0.2 + 0.3) / 2)
    assert pipeline.uniform_reference(opts, 0.3) == pytest.approx((0.1 + 0.3) / 2)  # nearest grid ratio
