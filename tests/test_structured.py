"""Structured pruning end to end on tiny random models: narrower plain layers, honest byte accounting, and the
saved model: uniform widths export to a standard HF directory that transformers loads alone (same logits);
per-block widths are rebuilt by `sparselm.load` (same logits) and exported padded back to the dense shape."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from torch import nn

from sparselm import io, pipeline
from sparselm import model as adapter
from sparselm.config import FlapSpec, Ratio, Recipe, Structure, ZipLMSpec
from sparselm.errors import InputError

CPU = torch.device("cpu")
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def tiny(arch: str = "llama") -> nn.Module:
    torch.manual_seed(0)
    if arch == "bert":
        config = tf.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64)
        return tf.BertModel(config).eval()
    return tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(arch, **SMALL)).eval()


def calib(n: int = 4) -> torch.Tensor:
    return torch.randint(3, 96, (n, 32), generator=torch.Generator().manual_seed(1))


IDS = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(2))


def out(model, ids=IDS):
    o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def run(model, spec, dtype=torch.float32):
    return pipeline.compress(model, calib(), Recipe(methods=(spec,)), CPU, dtype)


@pytest.mark.parametrize("spec", [FlapSpec(target=Ratio(0.3)), ZipLMSpec(target=Ratio(0.3))])
@torch.no_grad()
def test_narrower_plain_layers_and_bytes(spec):
    model = tiny()
    dense = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    run(model, spec)
    narrowed = io.narrowed_modules(model)
    assert len(narrowed) == 2 * 7  # q, k, v, o, gate, up, down in both blocks
    assert all(type(m) is nn.Linear for m in narrowed.values())
    kept = sum(m.weight.numel() + (m.bias.numel() if io.narrowed_of(m).bias_added else 0) for m in narrowed.values())
    total = sum(dense[n][0] * dense[n][1] for n in narrowed)
    totals = io.describe(model, torch.float32)["totals"]
    assert totals["ratio_stored"] == pytest.approx(1 - kept / total)  # the bytes of what remains, added bias too
    assert 0.3 <= totals["ratio_stored"] < 0.45
    for block in adapter.find_blocks(model)[1]:
        attn = block.self_attn
        assert attn.q_proj.out_features == 2 * attn.k_proj.out_features  # whole GQA groups (g = 2) go
        assert attn.o_proj.in_features == attn.q_proj.out_features
        assert block.mlp.down_proj.in_features == block.mlp.up_proj.out_features == block.mlp.gate_proj.out_features
    assert all((m.bias is not None) == isinstance(spec, FlapSpec) for n, m in narrowed.items()
               if n.endswith(("o_proj", "down_proj")))
    assert torch.isfinite(out(model)).all()


@torch.no_grad()
def test_uniform_export_loads_in_plain_transformers(tmp_path):
    model = tiny()
    run(model, FlapSpec(target=Ratio(0.3), structure=Structure.UNIFORM))
    widths = adapter.block_widths(model)
    assert widths[0] == widths[1] and widths[0]["num_key_value_heads"] < 2 or widths[0]["intermediate_size"] < 96
    expected = out(model)
    io.save(model, None, tmp_path / "c", {"base_model": "tiny"}, torch.float32)
    torch.testing.assert_close(out(io.load(tmp_path / "c")), expected, rtol=0, atol=0)
    result = io.export(tmp_path / "c", tmp_path / "d")
    assert result["widths"] == "narrow"
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["intermediate_size"] == widths[0]["intermediate_size"]
    assert config["num_attention_heads"] == widths[0]["num_attention_heads"]
    assert config["attention_bias"] and config["mlp_bias"]  # FLAP's compensation on o_proj and down_proj
    exported = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()  # no sparselm involved
    assert exported.model.layers[0].mlp.down_proj.in_features == widths[0]["intermediate_size"]
    torch.testing.assert_close(out(exported), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch,spec", [("llama", FlapSpec(target=Ratio(0.35))), ("bert", FlapSpec(target=Ratio(0.35))),
                                       ("qwen2", ZipLMSpec(target=Ratio(0.35), structure=Structure.ADAPTIVE))])
@torch.no_grad()
def test_per_block_widths_save_load_export(arch, spec, tmp_path):
    model = tiny(arch)
    run(model, spec)
    expected = out(model)
    io.save(model, None, tmp_path / "c", {"base_model": arch}, torch.float32)
    manifest = json.loads((tmp_path / "c" / io.MANIFEST).read_text())
    assert manifest["structured"] and manifest["totals"]["ratio_stored"] >= 0.35
    loaded = io.load(tmp_path / "c")
    assert {n: tuple(m.weight.shape) for n, m in io.narrowed_modules(loaded).items()} == {
        n: tuple(m.weight.shape) for n, m in io.narrowed_modules(model).items()}
    torch.testing.assert_close(out(loaded), expected, rtol=0, atol=0)
    io.export(tmp_path / "c", tmp_path / "d")
    cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    torch.testing.assert_close(out(cls.from_pretrained(tmp_path / "d").eval()), expected, rtol=1e-5, atol=1e-5)


def test_structured_refuses_fused_projections_and_mixing():
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(InputError, match="no attention heads or MLP channels"):
        run(gpt2, FlapSpec(target=Ratio(0.3)))
    with pytest.raises(InputError, match="structured pruning alone"):
        Recipe(methods=(FlapSpec(), ZipLMSpec()), allocate=pipeline.Allocate.KNAPSACK)
    with pytest.raises(InputError, match="spreads its budget itself"):
        Recipe(methods=(FlapSpec(),), allocate=pipeline.Allocate.KNAPSACK)


@torch.no_grad()
def test_export_without_a_bias_flag_is_a_clear_error(tmp_path):
    """Qwen2 has no config flag for o_proj / down_proj biases: FLAP's compensation cannot be exported (ZipLM's
    update needs no bias and exports, above); the compressed directory still loads with sparselm."""
    model = tiny("qwen2")
    run(model, FlapSpec(target=Ratio(0.3)))
    io.save(model, None, tmp_path / "c", {"base_model": "qwen2"}, torch.float32)
    with pytest.raises(InputError, match="no standard config"):
        io.export(tmp_path / "c", tmp_path / "d")
    assert not (tmp_path / "d" / "config.json").exists()
    torch.testing.assert_close(out(io.load(tmp_path / "c")), out(model), rtol=0, atol=0)


@torch.no_grad()
def test_bench_times_narrowed_layers_against_their_dense_shape(tmp_path):
    from sparselm import bench
    model = tiny()
    run(model, FlapSpec(target=Ratio(0.3), structure=Structure.UNIFORM))
    io.save(model, None, tmp_path / "c", {"base_model": str(tmp_path / "gone")}, torch.float32)
    loaded = io.load(tmp_path / "c")
    dense, source = bench.dense_twin(loaded, io.read_manifest(tmp_path / "c"), str(tmp_path / "c"))
    assert source == "rebuilt from the factors"  # padded back to the dense widths: the same logits
    torch.testing.assert_close(out(dense), out(loaded), rtol=1e-5, atol=1e-5)
    assert dense.model.layers[0].mlp.down_proj.in_features == 96
    rows = bench.layer_rows(loaded, dense, [1], 1, CPU)
    assert rows and all(r["layer"].startswith("Linear (narrowed)") and "dense_linear_ms" in r for r in rows)
