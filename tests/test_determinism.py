"""Identical runs write identical directories: byte-identical tensors and files, one manifest up to timings."""
from __future__ import annotations

import json

import pytest

from sparselm import api, io
from sparselm.config import CoefStorage, CoSpaDiSpec, Ratio, Recipe


def _without_timings(value):
    """The manifest with every ``*seconds`` field removed (wall-clock times differ between runs)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


RECIPES = {
    "default": lambda: api.build_recipe(None, None, None, None),  # ROCKET + knapsack: profiling, allocation
    "sparsegpt-2:4": lambda: api.build_recipe("sparsegpt", None, None, "2:4"),
    "cospadi-int8": lambda: Recipe(methods=(CoSpaDiSpec(target=Ratio(0.3), iters=3,
                                                        storage=CoefStorage.INT8),)),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_identical_runs_write_identical_files(tiny_llama_dir, tmp_path, name):
    outs = [tmp_path / f"run{i}" for i in range(2)]
    for out in outs:
        api.compress_model(str(tiny_llama_dir), RECIPES[name](), out=str(out), nsamples=4, seqlen=64,
                           evaluate_ppl=False)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and io.WEIGHTS in files
    assert "recipe.yaml" in files
    for f in files:
        if f not in (io.MANIFEST, "report.html", "README.md"):  # these three carry the run's timing
            assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    a, b = (json.loads((out / io.MANIFEST).read_text()) for out in outs)
    assert "compress_seconds" in a  # the timing that is allowed to differ is there ...
    # ... and nothing else differs, not even the order of keys
    assert json.dumps(_without_timings(a)) == json.dumps(_without_timings(b))
