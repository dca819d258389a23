"""User-level flows: resume after an interruption gives the same model as an uninterrupted run."""
from __future__ import annotations

import pytest
import torch

from sparselm import api, io, outdir
from sparselm.config import Allocate, CoefStorage, CoSpaDiSpec, Ratio, Recipe, RocketSpec, SVDLLMSpec, WandaSpec


class Interrupt(Exception):
    pass


def _stop_after_first_block(done, total):
    if done == 1:
        raise Interrupt


RESUMED = {
    "magnitude": lambda: api.build_recipe("magnitude", None, 0.5, None),
    "wanda-4:8": lambda: api.build_recipe("wanda", None, None, "4:8"),
    "sparsegpt": lambda: api.build_recipe("sparsegpt", None, 0.5, None),
    "svd": lambda: api.build_recipe("svd", 0.3, None, None),
    "asvd": lambda: api.build_recipe("asvd", 0.3, None, None),
    "svd-llm": lambda: api.build_recipe("svd-llm", 0.3, None, None),
    "rocket-uniform": lambda: api.build_recipe("rocket", 0.3, None, None, "uniform"),
    "cospadi": lambda: Recipe(methods=(CoSpaDiSpec(target=Ratio(0.3), iters=2),)),
    "gqsa": lambda: api.build_recipe("gqsa", None, 0.5, None, storage="int4", quant_group=8),
    "svd-int4-groups": lambda: api.build_recipe("svd", 0.3, None, None, storage="int4", quant_group=8),
    "sparsegpt-2:4-int8": lambda: api.build_recipe("sparsegpt", None, None, "2:4", storage="int8"),
    "knapsack-over-storages": lambda: Recipe(methods=(RocketSpec(target=Ratio(0.4)),
                                                      RocketSpec(target=Ratio(0.4), storage=CoefStorage.INT8)),
                                             allocate=Allocate.KNAPSACK),
    "mixed-knapsack": lambda: Recipe(methods=(SVDLLMSpec(target=Ratio(0.3)), WandaSpec(target=Ratio(0.3))),
                                     allocate=Allocate.KNAPSACK),
}


@pytest.mark.parametrize("name", RESUMED)
def test_resume_continues_an_interrupted_run(tiny_llama_dir, tmp_path, name):
    """Every method and allocation: interrupted after the first block, resumed, the same bytes as a clean run."""
    recipe = RESUMED[name]()
    common = dict(nsamples=4, seqlen=64, evaluate_ppl=False)
    api.compress_model(str(tiny_llama_dir), recipe, out=str(tmp_path / "full"), **common)
    with pytest.raises(Interrupt):
        api.compress_model(str(tiny_llama_dir), recipe, out=str(tmp_path / "cut"), progress=_stop_after_first_block,
                           **common)
    assert not (tmp_path / "cut").exists() and outdir.checkpoint_dir(tmp_path / "cut").is_dir()
    api.compress_model(str(tiny_llama_dir), recipe, out=str(tmp_path / "cut"), resume=True, **common)
    assert not outdir.checkpoint_dir(tmp_path / "cut").exists()
    ids = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        a = io.load(tmp_path / "full")(input_ids=ids).logits
        b = io.load(tmp_path / "cut")(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (tmp_path / "full" / io.WEIGHTS).read_bytes() == (tmp_path / "cut" / io.WEIGHTS).read_bytes()


def test_resume_refuses_other_settings(tiny_llama_dir, tmp_path):
    common = dict(nsamples=4, seqlen=64, evaluate_ppl=False, out=str(tmp_path / "o"))
    with pytest.raises(Interrupt):
        api.compress_model(str(tiny_llama_dir), api.build_recipe("wanda", None, 0.5, None),
                           progress=_stop_after_first_block, **common)
    from sparselm.errors import InputError
    with pytest.raises(InputError, match="other settings"):
        api.compress_model(str(tiny_llama_dir), api.build_recipe("wanda", None, 0.6, None), resume=True, **common)


def _tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path / io.WEIGHTS))


def test_resume_of_a_knapsack_run_follows_the_stored_plan(tiny_llama_dir, tmp_path):
    """It planned again on the half-compressed model: 24 tensors differed, ratio 0.212 instead of 0.200."""
    recipe = api.build_recipe("rocket", 0.2, None, None, "knapsack")
    common = dict(nsamples=4, seqlen=64, evaluate_ppl=False)
    full = api.compress_model(str(tiny_llama_dir), recipe, out=str(tmp_path / "full"), **common)
    with pytest.raises(Interrupt):
        api.compress_model(str(tiny_llama_dir), recipe, out=str(tmp_path / "cut"), progress=_stop_after_first_block,
                           **common)
    cut = api.compress_model(str(tiny_llama_dir), recipe, out=str(tmp_path / "cut"), resume=True, **common)
    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "cut")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert cut["ratio_stored"] == full["ratio_stored"]
    ma, mb = io.read_manifest(tmp_path / "full"), io.read_manifest(tmp_path / "cut")
    assert ma["allocation"] == mb["allocation"] and ma["totals"] == mb["totals"]


def test_package_save_writes_a_directory_inspect_reads(tmp_path, calib_ids):
    """`sparselm.save(model, tok, dir, {}, dtype)` as the package docstring shows (inspect: KeyError 'spec')."""
    import sparselm
    from sparselm.cli import app
    from typer.testing import CliRunner
    from .conftest import tiny_model
    model = tiny_model("llama")
    recipe = sparselm.Recipe(methods=(sparselm.CoSpaDiSpec(target=sparselm.Ratio(0.3), iters=2, group_size=2),))
    sparselm.compress(model, calib_ids, recipe, torch.device("cpu"), torch.float32)
    sparselm.save(model, None, tmp_path / "plain", {}, torch.float32)
    info = api.inspect_dir(str(tmp_path / "plain"))
    assert len(info["layers"]) == 14 and all(row["method"] == "cospadi" for row in info["layers"])
    assert 0.3 <= info["ratio_stored"] < 0.4
    entry = io.read_manifest(tmp_path / "plain")["layers"]["model.layers.1.self_attn.q_proj"]
    assert entry["group"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert entry["spec"]["group_size"] == 2 and entry["info"]["shared_dictionary"]
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "plain"), "--json"])
    assert r.exit_code == 0, r.output
    # the dictionary shared by two layers counts once: the totals equal the bytes really written
    written = sum(t.numel() * t.element_size() for n, t in _tensors(tmp_path / "plain").items()
                  if ".layers." in n and not n.endswith((".bias", "norm.weight")))
    assert info["layers"] and sum(row["stored_bytes"] for row in info["layers"]) == written
