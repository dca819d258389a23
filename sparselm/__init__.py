"""sparselm: compress pretrained transformers without retraining, to the size you choose.

Public API, in flow order::

    import sparselm
    loaded = sparselm.load_model("./my-llama")                      # or None: the bundled tiny model
    calib = sparselm.calibration_data(loaded.tokenizer, "stdlib", nsamples=64, seqlen=256)
    recipe = sparselm.Recipe(methods=(sparselm.SparseGPTSpec(target=sparselm.Sparsity(0.5)),))
    report = sparselm.compress(loaded.model, calib, recipe, torch.device("cpu"), loaded.storage_dtype)
    sparselm.save(loaded.model, loaded.tokenizer, "pruned/", {}, loaded.storage_dtype)
    model = sparselm.load("pruned/")                                 # a working transformers model
    sparselm.evaluate(model, loaded.tokenizer, seqlen=256, max_windows=16)  # perplexity; tasks=, reference=

``docs/api.md`` walks through it with examples the tests run.
"""
from .version import __version__  # noqa: E402,F401

from .config import (Allocate, ASVDSpec, CoSpaDiSpec, MagnitudeSpec, Pattern, Ratio, Recipe, RocketSpec,  # noqa: E402
                     SparseGPTSpec, Sparsity, SVDLLMSpec, SVDSpec, WandaSpec)
from .model import load_hf as load_model  # noqa: E402
from .data import calibration_data  # noqa: E402
from .pipeline import compress  # noqa: E402
from .io import save, load, export  # noqa: E402
from .metrics import perplexity  # noqa: E402
from .api import evaluate  # noqa: E402

__all__ = ["load_model", "calibration_data", "compress", "save", "load", "export", "evaluate", "perplexity", "Recipe",
           "Allocate", "Ratio", "Sparsity", "Pattern", "MagnitudeSpec", "WandaSpec", "SparseGPTSpec", "SVDSpec", "ASVDSpec", "SVDLLMSpec",
           "CoSpaDiSpec", "RocketSpec", "__version__"]
