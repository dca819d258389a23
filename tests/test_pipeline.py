"""The layer-by-layer pipeline on tiny random models of every supported architecture."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers as tf

from sparselm import blocks as blocks_mod, io, pipeline
from sparselm import model as adapter
from sparselm.config import (CoSpaDiSpec, MagnitudeSpec, Pattern, Ratio, Recipe, RocketSpec, SparseGPTSpec,
                             Sparsity, SVDLLMSpec, SVDSpec, ASVDSpec, WandaSpec)
from sparselm.errors import InputError
from sparselm.modules import CompressedLinear

from .conftest import ARCHS, CAUSAL, tiny_model

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
    elif isinstance(t, Sparsity):  # exact: (in · sparsity) is a whole number for these widths
        assert W.numel() - module.nnz == round(t.value * W.numel())
        assert int((W != 0).sum()) <= module.nnz
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
        assert 0.0 < layer.rel_error < 1.0, (layer.name, layer.rel_error)  # better than removing the layer
        assert layer.module.spec == spec and layer.spec == spec
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
    inputs = blocks_mod.capture_inputs(model, blocks, calib_ids, 8, CPU)
    dense_in = blocks_mod.run_block(blocks[0], inputs.hidden, inputs.kwargs[0])[0]
    seen.clear()
    pipeline.compress(model, calib_ids, Recipe(methods=(MagnitudeSpec(target=Sparsity(0.7)),)), CPU, torch.float32)
    handle.remove()
    inputs = blocks_mod.capture_inputs(model, blocks, calib_ids, 8, CPU)
    compressed_in = blocks_mod.run_block(blocks[0], inputs.hidden, inputs.kwargs[0])[0]
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


@pytest.mark.parametrize("dict_storage, key", [("dtype", "D"), ("int8", "Dt_int8")])
def test_grouped_cospadi_shares_one_dictionary_stored_once(calib_ids, tmp_path, dict_storage, key):
    """Also with an int8 dictionary (`dict_storage`): its codes and scales are shared and stored once."""
    from sparselm.io import tensor_names_and_bytes
    from sparselm.recipes import spec_from_dict
    model = tiny_model("llama")
    spec = spec_from_dict({"method": "cospadi", "iters": 3, "group_size": 2, "dict_storage": dict_storage})
    report = pipeline.compress(model, calib_ids, Recipe(methods=(spec.with_target(Ratio(0.3)),)), CPU, torch.float32)
    layers = model.model.layers
    q0, q1 = layers[0].self_attn.q_proj, layers[1].self_attn.q_proj
    assert all(getattr(q0, b) is getattr(q1, b) for b in q0.dictionary_buffers()) and key in q0.dictionary_buffers()
    assert getattr(layers[0].self_attn.o_proj, key) is not getattr(layers[1].self_attn.o_proj, key)  # private
    assert all(r.info.get("shared_dictionary") == ("o_proj" not in r.name and "down_proj" not in r.name)
               for r in report.layers)
    ids = calib_ids[:2, :16]
    want = _outputs(model, ids)
    io.save(model, None, tmp_path / "g", {}, torch.float32)
    names = tensor_names_and_bytes(tmp_path / "g" / io.WEIGHTS)
    assert f"model.layers.0.self_attn.q_proj.{key}" in names and f"model.layers.1.self_attn.q_proj.{key}" not in names
    loaded = io.load(tmp_path / "g")
    assert loaded.model.layers[1].self_attn.q_proj.dict_store == spec.dict_store
    torch.testing.assert_close(_outputs(loaded, ids), want, rtol=0, atol=0)


def test_knapsack_profile_cache_gives_the_same_plan(calib_ids, monkeypatch):
    from sparselm.config import Allocate
    from sparselm import profile
    recipe = lambda r: Recipe(methods=(RocketSpec(target=Ratio(r)), SVDLLMSpec(target=Ratio(r))),
                              allocate=Allocate.KNAPSACK)
    fresh = pipeline.compress(tiny_model("llama"), calib_ids, recipe(0.4), CPU, torch.float32).allocation
    cache: dict = {}
    first = pipeline.compress(tiny_model("llama"), calib_ids, recipe(0.2), CPU, torch.float32, profile_cache=cache)
    assert len(first.allocation) == 14 and first.allocation != fresh  # every layer planned; another budget
    calls = []  # the whitened SVD (ROCKET and SVD-LLM) or any factorization at all, computed again
    for name in ("whitened_svd", "factorize", "compress_weight"):
        real = getattr(profile, name)
        monkeypatch.setattr(profile, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    cached = pipeline.compress(tiny_model("llama"), calib_ids, recipe(0.4), CPU, torch.float32,
                               profile_cache=cache).allocation
    assert not calls
    assert cached == fresh


def test_knapsack_caps_every_layer_error_at_alpha_times_the_uniform_mean(calib_ids):
    from sparselm.config import Allocate
    rows = pipeline.compress(tiny_model("llama"), calib_ids, Recipe(methods=(SVDLLMSpec(target=Ratio(0.4)),),
                             allocate=Allocate.KNAPSACK), CPU, torch.float32).allocation
    cap = rows[0].error_cap
    assert cap is not None and all(r.error_cap == cap for r in rows)
    assert all(r.predicted_error <= cap for r in rows)
    assert max(r.predicted_error for r in rows) > 0


def test_uniform_reference_is_the_mean_error_at_the_target_ratio():
    from sparselm.budget import Option
    from sparselm.plan import uniform_reference
    opts = {"a": [Option(8, 0.0, None), Option(4, 0.2, SVDLLMSpec(target=Ratio(0.5))),
                  Option(6, 0.1, SVDLLMSpec(target=Ratio(0.25)))],
            "b": [Option(8, 0.0, None), Option(4, 0.4, SVDLLMSpec(target=Ratio(0.5))),
                  Option(4, 0.3, RocketSpec(target=Ratio(0.5)))]}
    assert uniform_reference(opts, 0.5) == pytest.approx((0.2 + 0.3) / 2)
    assert uniform_reference(opts, 0.3) == pytest.approx((0.1 + 0.3) / 2)  # nearest grid ratio


def test_every_layer_of_a_shared_set_follows_its_own_planned_spec(calib_ids):
    """Knapsack + shared dictionaries: a layer planned at another ratio than its partner is compressed at its
    own ratio (it was compressed with the first layer's spec), and only layers with one spec share."""
    from sparselm.plan import Plan
    from sparselm.methods.cospadi import sizes_for_ratio
    model = tiny_model("llama")
    base = CoSpaDiSpec(target=Ratio(0.3), iters=2, group_size=2)
    recipe = Recipe(methods=(base,))
    names = pipeline.targets(model, recipe)
    odd = "model.layers.1.mlp.gate_proj"
    specs = {n: base for block in names for n in block} | {odd: base.with_target(Ratio(0.4))}
    plan = Plan(specs, pipeline.share_sets(specs, names, "model.layers", 2))
    assert ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj") in plan.sets
    assert ("model.layers.0.mlp.gate_proj",) in plan.sets and (odd,) in plan.sets
    report = pipeline.compress(model, calib_ids, recipe, CPU, torch.float32, plan=plan)
    assert sorted(la.name for la in report.layers) == sorted(specs)
    for layer in report.layers:
        assert layer.spec == specs[layer.name], layer.name
    gate = model.model.layers[1].mlp.gate_proj
    assert gate.k == sizes_for_ratio(0.4, 64, 128, 2.0, torch.float32, base.store)[0] and not gate.group
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert q0.D is q1.D and q0.group == q1.group == ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")


def test_knapsack_with_shared_dictionaries_compresses_every_layer_as_planned(calib_ids):
    from sparselm.config import Allocate
    spec = CoSpaDiSpec(target=Ratio(0.3), iters=2, group_size=2)
    report = pipeline.compress(tiny_model("llama"), calib_ids, Recipe(methods=(spec,), allocate=Allocate.KNAPSACK),
                               CPU, torch.float32)
    planned = {a.layer: a.spec for a in report.allocation}
    assert {la.name: la.spec for la in report.layers} == {n: s for n, s in planned.items() if s is not None}
    for group in report.plan.shared:
        assert len({planned[n] for n in group}) == 1


def test_plan_survives_a_round_trip_through_json():
    import json
    from sparselm.plan import Allocation, Plan
    specs = {"a": RocketSpec(target=Ratio(0.25), ks=1.5), "b": CoSpaDiSpec(target=Ratio(0.3), group_size=2),
             "c": CoSpaDiSpec(target=Ratio(0.3), group_size=2)}
    rows = [Allocation("a", specs["a"], 10.0, 0.1, (4, 8), 0.5), Allocation("d", None, 64.0, 0.0, (4, 4), 0.5)]
    plan = Plan(specs, [("a",), ("b", "c")], rows)
    back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and back.shared == [("b", "c")] and back.predicted == {"a": 0.1, "d": 0.0}
    assert rows[1].kept_dense and Allocation.kept_dense_row(rows[1].to_dict())
    with pytest.raises(ValueError, match="different specs"):
        Plan({"b": specs["b"], "c": specs["b"].with_target(Ratio(0.4))}, [("b", "c")])


def test_mixed_menu_keeps_the_best_scored_of_the_knapsack_and_each_method_alone(calib_ids):
    """A mixed menu's plan is scored end to end against every method of the menu alone (uniform): the plan
    returned is the best scored one, and the scores are the real ones (twin: a uniform run scored by hand)."""
    from sparselm.config import Allocate
    specs = (RocketSpec(target=Ratio(0.3)), SVDLLMSpec(target=Ratio(0.3)), WandaSpec(target=Ratio(0.3)))
    model = tiny_model("llama")
    report = pipeline.compress(model, calib_ids, Recipe(methods=specs, allocate=Allocate.KNAPSACK), CPU, torch.float32)
    sel = {row["candidate"]: row for row in report.plan.selection}
    assert list(sel) == ["knapsack", "uniform rocket", "uniform svd-llm", "uniform wanda", "knapsack, calibrated"]
    chosen = [row for row in sel.values() if row["chosen"]]
    singles = [row["score"] for label, row in sel.items() if label.startswith("uniform")]
    assert len(chosen) == 1 and chosen[0]["score"] <= min(singles)  # `choose`: never scored worse than one alone
    if not chosen[0]["candidate"].startswith("uniform"):  # a mixed plan is kept only on evidence
        assert sum(sel[chosen[0]["candidate"]]["vs_best_single"]) < 0
    held = min(pipeline.SELECT_SEQUENCES, len(calib_ids) // pipeline.SELECT_HELD_OUT)
    alone = tiny_model("llama")
    pipeline.compress(alone, calib_ids[:-held], Recipe(methods=(specs[2],)), CPU, torch.float32)
    by_hand = pipeline.plan_score(tiny_model("llama"), alone, calib_ids[-held:])
    assert sel["uniform wanda"]["score"] == pytest.approx(by_hand, rel=1e-9)
    # the chosen plan was applied: every layer got its planned spec, and the rows cover every layer
    planned = {a.layer: a.spec for a in report.allocation}
    assert {la.name: la.spec for la in report.layers} == {n: s for n, s in planned.items() if s is not None}
    assert len(planned) == 14


def test_method_errors_and_rescale_by_hand():
    from sparselm.budget import Option
    from sparselm.plan import method_errors, rescale
    r, s = RocketSpec(target=Ratio(0.3)), WandaSpec(target=Ratio(0.3))
    opts = {"a": [Option(8, 0.0, None), Option(4, 0.2, r), Option(5, 0.1, r.with_target(Ratio(0.25))),
                  Option(4, 0.5, s)],
            "b": [Option(8, 0.0, None), Option(4, 0.4, r), Option(4, 0.3, s)]}
    assert method_errors(opts, 0.3) == pytest.approx({"rocket": 0.2 + 0.4, "wanda": 0.5 + 0.3})
    scaled = rescale(opts, {"rocket": 2.0, "wanda": 0.5})
    assert [o.error for o in scaled["a"]] == pytest.approx([0.0, 0.4, 0.2, 0.25])
    assert [o.size for o in scaled["b"]] == [8, 4, 4] and scaled["b"][2].payload == s


def test_menu_labels_tell_storages_apart_and_make_a_mixed_menu(calib_ids):
    """One method at two storages is two menu entries (`plan.menu_label`): the menu is mixed, each entry has its
    own uniform candidate, and the two candidates are different compressions (int8 values round)."""
    from sparselm.plan import menu_label
    from sparselm.config import Allocate, CoefStorage
    plain, int8 = SparseGPTSpec(target=Ratio(0.3)), SparseGPTSpec(target=Ratio(0.3), storage=CoefStorage.INT8)
    assert (menu_label(plain), menu_label(int8)) == ("sparsegpt", "sparsegpt/int8")
    assert menu_label(plain.with_target(Ratio(0.5))) == "sparsegpt"  # the target is not part of the entry
    assert menu_label(RocketSpec(ks=2.5)) == "rocket"  # nor a field the profile varies
    report = pipeline.compress(tiny_model("llama"), calib_ids, Recipe(methods=(plain, int8), allocate=Allocate.KNAPSACK),
                               CPU, torch.float32)
    sel = {row["candidate"]: row["score"] for row in report.plan.selection}
    assert list(sel) == ["knapsack", "uniform sparsegpt", "uniform sparsegpt/int8", "knapsack, calibrated"]
    assert sel["uniform sparsegpt"] != sel["uniform sparsegpt/int8"]


def test_structured_pruning_in_a_mixed_menu_is_a_whole_model_candidate(calib_ids, monkeypatch):
    """FLAP in a mixed menu is not profiled per layer: it is scored as one more candidate (pruning the whole model
    at the target ratio); when it scores best, compress prunes the model exactly as FLAP alone does (twin), and the
    plan (which records it) survives a round trip through a checkpoint's dict."""
    from sparselm.plan import Plan
    from sparselm.config import Allocate, FlapSpec
    from sparselm.modules import Narrowed  # noqa: F401  (the records structured pruning leaves)
    flap, wanda = FlapSpec(target=Ratio(0.3)), WandaSpec(target=Ratio(0.3))
    real = pipeline.window_scores

    def prefer_structured(reference, compressed, windows):  # the real scores, minus 100 for a structurally pruned model
        narrowed = any(m.in_features < reference.get_submodule(n).in_features or
                       m.out_features < reference.get_submodule(n).out_features
                       for n, m in compressed.named_modules() if isinstance(m, torch.nn.Linear))
        return real(reference, compressed, windows) - (100.0 if narrowed else 0.0)
    monkeypatch.setattr(pipeline, "window_scores", prefer_structured)
    model = tiny_model("llama")
    report = pipeline.compress(model, calib_ids, Recipe(methods=(wanda, flap), allocate=Allocate.KNAPSACK), CPU,
                               torch.float32)
    sel = {row["candidate"]: row for row in report.plan.selection}
    assert list(sel) == ["knapsack", "uniform wanda", "flap alone", "knapsack, calibrated"]
    assert sel["flap alone"]["chosen"] and sel["flap alone"]["score"] < 0 < sel["uniform wanda"]["score"]
    assert report.plan.structured == flap and not report.plan.specs and report.layers == []
    twin = tiny_model("llama")
    pipeline.compress(twin, calib_ids, Recipe(methods=(flap,)), CPU, torch.float32)
    got, want = model.state_dict(), twin.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    again = Plan.from_dict(report.plan.to_dict())
    assert again.structured == flap and again.selection == report.plan.selection


def test_encoder_pieces_cut_windows_into_sentence_length_rows():
    w = torch.arange(2 * 70).view(2, 70)
    pieces = pipeline.encoder_pieces(w, 32)
    assert pieces.shape == (4, 32)
    assert pieces[1].tolist() == list(range(32, 64)) and pieces[2].tolist() == list(range(70, 102))
    assert pipeline.encoder_pieces(w[:, :20], 32).shape == (2, 20)  # short windows stay whole


def test_choose_keeps_the_best_method_alone_unless_a_mixed_plan_wins_beyond_the_noise():
    """Hand-checked: paired differences to the best single entry ``b`` (mean 1.0). The knapsack is better on
    average (mean difference -0.05) but its standard error (std 0.2309 / sqrt(4) = 0.1155) exceeds the gain; the
    calibrated knapsack wins on every window (difference -0.2, standard error 0)."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    b, worse = t(1.0, 1.0, 1.0, 1.0), t(2.0, 2.0, 2.0, 2.0)
    noisy = b + t(-0.25, 0.15, -0.25, 0.15)  # mean -0.05, std 0.2309, stderr 0.1155
    cands = {"knapsack": (None, noisy), "uniform a": (None, worse), "uniform b": (None, b)}
    chosen, margins = pipeline.choose(cands, ["uniform a", "uniform b"])
    assert chosen == "uniform b"
    assert margins["knapsack"] == pytest.approx([-0.05, 0.2309401 / 2])
    cands["knapsack, calibrated"] = (None, b - 0.2)
    assert pipeline.choose(cands, ["uniform a", "uniform b"])[0] == "knapsack, calibrated"
    inf = t(math.inf)  # every single entry failed to apply: the best finite plan
    assert pipeline.choose({"knapsack": (None, noisy), "uniform a": (None, inf)}, ["uniform a"])[0] == "knapsack"


def test_menus_at_one_ratio_share_their_single_entries_scores(calib_ids, monkeypatch):
    """With one profile cache, a second menu at the same ratio reuses the first one's score of an entry both
    list (wanda alone), and scores only what is new (its knapsack plans and svd-llm alone)."""
    from sparselm.config import Allocate
    real, calls = pipeline.window_scores, []
    monkeypatch.setattr(pipeline, "window_scores", lambda *a: calls.append(1) or real(*a))
    cache: dict = {}
    wanda, mag, svd = (WandaSpec(target=Ratio(0.3)), MagnitudeSpec(target=Ratio(0.3)), SVDLLMSpec(target=Ratio(0.3)))
    first = pipeline.make_plan(tiny_model("llama"), calib_ids, Recipe(methods=(wanda, mag), allocate=Allocate.KNAPSACK),
                               CPU, torch.float32, cache=cache)
    assert len(calls) == 4  # knapsack, wanda, magnitude, calibrated
    second = pipeline.make_plan(tiny_model("llama"), calib_ids, Recipe(methods=(wanda, svd), allocate=Allocate.KNAPSACK),
                                CPU, torch.float32, cache=cache)
    assert len(calls) == 4 + 3  # wanda alone was not compressed again
    score = {r["candidate"]: r["score"] for r in first.selection}["uniform wanda"]
    assert {r["candidate"]: r["score"] for r in second.selection}["uniform wanda"] == score


def test_config_dtype_is_read_without_the_deprecated_name():
    """A config's dtype, or the old ``torch_dtype`` only where a config stores it: transformers 5's ``torch_dtype``
    property logs a deprecation on every read (MiniLM's config has neither name)."""
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    root = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root logger
    root.addHandler(handler)
    try:
        assert adapter._dtype_of(tf.PretrainedConfig()) is None
        assert adapter._dtype_of(tf.PretrainedConfig(dtype="bfloat16")) == torch.bfloat16
        old = tf.PretrainedConfig()
        vars(old)["torch_dtype"] = "float16"
        assert adapter._dtype_of(old) == torch.float16
    finally:
        root.removeHandler(handler)
    assert not [m for m in said if "torch_dtype" in m]


@pytest.mark.parametrize("allocate", ["knapsack", "uniform"])
def test_layers_side_by_side_on_two_threads_give_the_one_thread_results(allocate, calib_ids, monkeypatch):
    """With two torch threads a CPU profiles and compresses a window's layers two at a time, each on one thread
    (`device.map_layers`): the same plan, modules and errors as one thread running them one after another."""
    from sparselm.config import Allocate
    specs = (RocketSpec(target=Ratio(0.3)), SVDLLMSpec(target=Ratio(0.3)))
    recipe = Recipe(methods=specs if allocate == "knapsack" else specs[:1], allocate=Allocate(allocate))
    from sparselm import device
    monkeypatch.setattr(device, "available_memory", lambda: 1 << 40)  # the memory cap is tested in test_device.py
    sides = []
    real = pipeline.layer_workers
    monkeypatch.setattr(pipeline, "layer_workers", lambda *a: sides.append(real(*a)) or sides[-1])
    one = pipeline.compress(tiny_model("llama"), calib_ids, recipe, CPU, torch.float32)
    assert set(sides) == {1}
    sides.clear()
    torch.set_num_threads(2)
    try:
        two = pipeline.compress(tiny_model("llama"), calib_ids, recipe, CPU, torch.float32)
    finally:
        torch.set_num_threads(1)
    assert set(sides) == {2} and torch.get_num_threads() == 1
    assert two.allocation == one.allocation
    assert [la.name for la in two.layers] == [la.name for la in one.layers]
    for a, b in zip(one.layers, two.layers):
        assert a.rel_error == pytest.approx(b.rel_error, rel=1e-6, abs=1e-12), a.name
        for key, t in a.module.state_dict().items():
            torch.testing.assert_close(b.module.state_dict()[key], t, rtol=1e-5, atol=1e-6)
