"""User-level flows: resume after an interruption gives the same model as an uninterrupted run."""
from __future__ import annotations

import pytest
import torch

from sparselm import api, io


class Interrupt(Exception):
    pass


def _stop_after_first_block(done, total):
    if done == 1:
        raise Interrupt


@pytest.mark.parametrize("method, knob", [("sparsegpt", {"sparsity": 0.5}), ("svd-llm", {"ratio": 0.3})])
def test_resume_continues_an_interrupted_run(tiny_llama_dir, tmp_path, method, knob):
    recipe = api.build_recipe(method, knob.get("ratio"), knob.get("sparsity"), None)
    common = dict(nsamples=4, seqlen=64, evaluate_ppl=False)
    api.compress_model(str(tiny_llama_dir), recipe, out=str(tmp_path / "full"), **common)
    with pytest.raises(Interrupt):
        api.compress_model(str(tiny_llama_dir), recipe, out=str(tmp_path / "cut"), progress=_stop_after_first_block,
                           **common)
    assert not (tmp_path / "cut").exists() and io.checkpoint_dir(tmp_path / "cut").is_dir()
    api.compress_model(str(tiny_llama_dir), recipe, out=str(tmp_path / "cut"), resume=True, **common)
    assert not io.checkpoint_dir(tmp_path / "cut").exists()
    ids = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        a = io.load(tmp_path / "full")(input_ids=ids).logits
        b = io.load(tmp_path / "cut")(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_refuses_other_settings(tiny_llama_dir, tmp_path):
    common = dict(nsamples=4, seqlen=64, evaluate_ppl=False, out=str(tmp_path / "o"))
    with pytest.raises(Interrupt):
        api.compress_model(str(tiny_llama_dir), api.build_recipe("wanda", None, 0.5, None),
                           progress=_stop_after_first_block, **common)
    from sparselm.errors import InputError
    with pytest.raises(InputError, match="other settings"):
        api.compress_model(str(tiny_llama_dir), api.build_recipe("wanda", None, 0.6, None), resume=True, **common)
