"""Every architecture the installed transformers ships with a decoder-block list, built tiny from its config:
compress (10 % magnitude), save, load and export must all give the compressed model's logits — no tensor
lost, none re-initialized (non-persistent buffers such as rotary frequencies and embedding scales rebuilt)."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from sparselm import io, pipeline
from sparselm.config import MagnitudeSpec, Recipe, Sparsity

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXTRA = {
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "gpt2": dict(n_positions=128),
    "gemma2": dict(sliding_window=16, head_dim=16),  # alternating sliding / full attention
    "gemma3_text": dict(sliding_window=16, head_dim=16, sliding_window_pattern=2),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1),
}
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3", "phi", "opt",
         "gpt2", "gpt_neox", "stablelm", "olmo2", "granite", "cohere", "falcon", "smollm3", "starcoder2", "ernie4_5",
         "exaone4", "bert"]


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.AutoConfig.for_model(model_type, **SMALL, **EXTRA.get(model_type, {}))
    cls = tf.AutoModel if model_type == "bert" else tf.AutoModelForCausalLM
    return cls.from_config(config).eval()


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_compress_save_load_export_agree(arch, tmp_path):
    model = tiny(arch)
    calib = torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    report = pipeline.compress(model, calib, Recipe(methods=(MagnitudeSpec(target=Sparsity(0.1)),)),
                               torch.device("cpu"), torch.float32)
    assert report.layers, f"{arch}: no layer compressed"
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    expected = _out(model, ids)
    io.save(model, None, tmp_path / "c", {"base_model": arch}, torch.float32)
    torch.testing.assert_close(_out(io.load(tmp_path / "c"), ids), expected, rtol=0, atol=0)
    io.export(tmp_path / "c", tmp_path / "d")
    cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    exported = cls.from_pretrained(tmp_path / "d").eval()
    torch.testing.assert_close(_out(exported, ids), expected, rtol=1e-5, atol=1e-5)
