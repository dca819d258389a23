"""The bundled trained model: it is really trained, and compression behaves on it as the methods promise."""
from __future__ import annotations

import json

import pytest
import torch

from sparselm import api, data, io, pipeline
from sparselm import model as adapter
from sparselm.config import DEFAULT_RATIO, MagnitudeSpec, Recipe, SparseGPTSpec, Sparsity
from sparselm.metrics import perplexity

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundled():
    loaded = adapter.load_hf(None)
    windows = data.evaluation_windows(loaded.tokenizer, "stdlib", 256, 8)
    calib = data.calibration_data(loaded.tokenizer, "stdlib", 16, 256)
    return loaded, windows, calib


def test_bundled_model_is_trained(bundled):
    loaded, windows, _ = bundled
    ppl = perplexity(loaded.model, windows)["perplexity"]
    assert loaded.storage_dtype == torch.bfloat16
    assert ppl < 60, ppl  # a uniform guess over the 4096-token vocabulary scores 4096
    record = json.loads((adapter.BUNDLED / "training.json").read_text())
    assert record["val_perplexity_seqlen256_fp32"] < 60


def test_sparsegpt_beats_magnitude_on_the_bundled_model(bundled):
    loaded, windows, calib = bundled
    scores = {}
    for spec in (MagnitudeSpec(target=Sparsity(0.6)), SparseGPTSpec(target=Sparsity(0.6))):
        model = adapter.load_hf(None).model
        pipeline.compress(model, calib, Recipe(methods=(spec,)), CPU, loaded.storage_dtype)
        scores[spec.name] = perplexity(model, windows)["perplexity"]
    dense = perplexity(loaded.model, windows)["perplexity"]
    assert dense < scores["sparsegpt"] < scores["magnitude"], (dense, scores)


def test_main_job_end_to_end(tmp_path):
    """`sparselm compress` with its defaults (smaller calibration to keep the test short)."""
    s = api.compress_model(None, nsamples=8, out=str(tmp_path / "out"), max_windows=8)
    assert s["perplexity_before"] < s["perplexity_after"] < 10 * s["perplexity_before"]
    assert s["ratio_stored"] >= DEFAULT_RATIO - 1e-3
    reloaded = io.load(tmp_path / "out", dtype=torch.float32)  # compress evaluated in float32 compute
    windows = data.evaluation_windows(adapter.load_hf(None).tokenizer, "stdlib", 256, 8)
    assert perplexity(reloaded, windows)["perplexity"] == pytest.approx(s["perplexity_after"], rel=1e-4)
