"""Whole models on the fast forwards: same greedy tokens as the reference forwards, honest resident bytes,
checkpoint dtype kept by `io.load`."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from sparselm import api, io
from sparselm import device as devices
from sparselm.modules import CompressedLinear, reference_forwards

METHODS = {"magnitude-50%": ("magnitude", None, 0.5, None), "wanda-2:4": ("wanda", None, None, "2:4"),
           "svd-0.4": ("svd", 0.4, None, None), "rocket-0.4": ("rocket", 0.4, None, None)}


@pytest.fixture(scope="module", params=list(METHODS))
def bundled_compressed(request, tmp_path_factory):
    method, ratio, sparsity, pattern = METHODS[request.param]
    out = tmp_path_factory.mktemp("kern") / request.param
    api.compress_model(None, api.build_recipe(method, ratio, sparsity, pattern), nsamples=4, seqlen=64,
                       evaluate_ppl=False, out=str(out))
    return out


def test_generate_gives_the_same_greedy_tokens(bundled_compressed):
    """float32: the very same greedy tokens. bf16 (the checkpoint's dtype): the logits of a tiny compressed model
    tie exactly in bf16 at some steps (rocket-0.4's 8th position: top-2 gap 0.0), so any other rounding order (a
    panel GEMM against the reference's) may pick the other of two tied tokens; there every token the fast
    forwards choose must be the reference's choice on the same prefix, or within bf16 rounding of it."""
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    model = io.load(bundled_compressed, dtype=torch.float32)
    with torch.no_grad():
        fast = model.generate(ids, **kw)
        with reference_forwards(model):
            ref = model.generate(ids, **kw)
    assert torch.equal(fast, ref)
    model = io.load(bundled_compressed)
    assert model.dtype == torch.bfloat16  # the bundled checkpoint's dtype
    with torch.no_grad():
        fast = model.generate(ids, **kw)
        with reference_forwards(model):
            logits = model(fast).logits[0, ids.shape[1] - 1:-1].float()  # (12, vocab): each step's reference
    chosen = fast[0, ids.shape[1]:]
    gap = logits.max(-1).values - logits.gather(1, chosen[:, None])[:, 0]  # 0 where it is the reference's pick
    assert (gap <= 2 * 2.0 ** -8 * logits.abs().amax()).all(), gap  # two bf16 roundings at the logits' scale
    assert (gap == 0).float().mean() >= 0.75  # mostly the very same pick, not a run of near-misses


def test_resident_bytes_of_compressed_layers_stay_within_budget(bundled_compressed):
    from sparselm import bench
    model = io.load(bundled_compressed)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert layers
    for m in layers:
        assert m.resident_bytes() <= 1.15 * m.stored_bytes()
    mem = bench.resident(model)
    assert mem["compressed_resident_bytes"] <= 1.15 * mem["compressed_stored_bytes"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_keeps_the_checkpoint_dtype_and_matches_export(tiny_llama_dir, tmp_path, dtype):
    src = tmp_path / "src"
    tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).save_pretrained(src)
    tf.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(src)
    api.compress_model(str(src), api.build_recipe("magnitude", None, 0.5, None), nsamples=4, seqlen=64,
                       evaluate_ppl=False, out=str(tmp_path / "c"))
    io.export(tmp_path / "c", tmp_path / "dense")
    model = io.load(tmp_path / "c")
    dense = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert model.dtype == dense.dtype == dtype
    assert all(p.dtype == dtype for n, p in model.named_parameters())
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        with reference_forwards(model):
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
        fast = model(input_ids=ids).logits
    torch.testing.assert_close(fast.float(), want.float(), rtol=0.05, atol=0.05 * want.float().abs().max().item())
    assert io.load(tmp_path / "c", dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("as_json", [True, False])
def test_bench_command_reports_both_models(bundled_compressed, as_json):
    import json

    from typer.testing import CliRunner

    from sparselm.cli import app
    if "svd" not in bundled_compressed.name:
        pytest.skip("the command is exercised once (the per-method checks are above)")
    args = ["bench", str(bundled_compressed), "--repeats", "1", "--layer-tokens", "1,9", "--prefill", "16",
            "--batch-sizes", "1,2", "--new-tokens", "3"] + (["--json"] if as_json else [])
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    if not as_json:
        assert "per layer" in r.stdout and "generate_b1" in r.stdout
        return
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"compressed", "dense", "speedup", "layers"} <= set(s)
    mem = s["compressed"]["memory"]
    assert mem["compressed_resident_bytes"] <= 1.15 * mem["compressed_stored_bytes"]
    assert s["dense"]["memory"]["resident_weight_bytes"] > mem["resident_weight_bytes"]
    assert {"generate_b1", "generate_b2", "prefill_16"} <= set(s["speedup"])
    assert {row["tokens"] for row in s["layers"]} == {1, 9} and "vs_best_dense" in s["layers"][0]
    llc = devices.last_level_cache_bytes(torch.device("cpu"))
    assert s["layer_cache_evicted_bytes"] == (min(2 * llc, 2 << 30) if llc else 64 << 20)


def test_per_layer_timings_evict_the_caches_before_every_timed_call():
    from sparselm import bench
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    bench._interleaved(fns, 3, torch.device("cpu"), lambda: order.append("evict"))
    assert order == ["a", "b"] + ["evict", "a", "evict", "b"] * 3  # the warm-up runs once, unevicted
    evict = bench._Evict(torch.device("cpu"))
    before = evict._buf.clone()
    evict()
    assert torch.equal(evict._buf, before + 1) and evict._buf.numel() * 4 == evict.nbytes


def test_last_level_cache_is_read_from_sysfs(monkeypatch, tmp_path):
    for i, size in enumerate(["48K", "2048K", "480M"]):  # L1, L2, L3
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    real = devices.Path
    monkeypatch.setattr(devices, "Path", lambda p: tmp_path if "cpu0/cache" in str(p) else real(p))
    assert devices.last_level_cache_bytes(torch.device("cpu")) == 480 << 20
    monkeypatch.setattr(devices, "Path", lambda p: tmp_path / "absent")
    assert devices.last_level_cache_bytes(torch.device("cpu")) is None


def test_bench_rebuilds_the_dense_model_when_the_base_is_gone(bundled_compressed, tmp_path):
    from sparselm import bench
    if "rocket" not in bundled_compressed.name:
        pytest.skip("once is enough")
    compressed = io.load(bundled_compressed)
    manifest = {**io.read_manifest(bundled_compressed), "base_model": str(tmp_path / "moved-away")}
    dense, source = bench.dense_twin(compressed, manifest, str(bundled_compressed))
    assert source == "rebuilt from the factors"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), reference_forwards(compressed):
        want = compressed(input_ids=ids).logits.float()
    torch.testing.assert_close(dense(input_ids=ids).logits.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
