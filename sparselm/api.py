"""The user-level flows behind the CLI: compress a model into a directory (`job`), evaluate, inspect, export.

Each returns a plain dict (what ``--json`` prints); nothing here prints.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from . import data, device as devices, fidelity as fidelity_mod, harness, io
from . import model as adapter
from .plan import Allocation
from .config import Recipe
from .errors import InputError, check_count
from .job import CompressJob, build_recipe, check_job, clamp_seqlen, run_files, run_job, versions  # noqa: F401
from .metrics import dense_accounting, perplexity


def compress_model(model: str | None = None, recipe: Recipe | None = None, calib: str | None = None,
                   nsamples: int | None = None, seqlen: int | None = None, out: str | None = None,
                   overwrite: bool = False, device: str | None = None, evaluate_ppl: bool | None = None,
                   eval_dataset: str = "stdlib", eval_seqlen: int | None = None, max_windows: int = 64,
                   batch_size: int | None = None, seed: int | None = None, trust_remote_code: bool = False,
                   progress=None, resume: bool = False, tasks: str | list[str] | None = None,
                   num_fewshot: int | None = None, limit: float | None = None,
                   lazy_load: bool | None = None, offload_activations: str | None = None) -> dict:
    """Load, (evaluate), compress layer by layer, (evaluate), save. Returns the summary.

    Calibration settings left None come from the recipe's ``calibration:`` section, else the defaults
    (stdlib, seed 0, batch 8; nsamples / seqlen by model). ``tasks``: lm-eval task scores before and after.
    The output holds ``recipe.yaml`` (every setting explicit: it reproduces the run), ``report.html`` and a
    model card ``README.md``, written in the same atomic step as the model. ``lazy_load`` (default: whenever
    possible, see `_streams`): the model is read block by block from its safetensors and written window by
    window, so host memory is about one block, not the model (`lazy`); the output is the same either way.
    ``offload_activations``: a folder where the calibration activations are kept between blocks (one batch in
    memory at a time; the same output).

    Everything that depends only on the arguments is checked before the model is read (`check_job`); the
    output is locked for the whole run (one writer per ``out``)."""
    job = check_job(model, recipe, calib, nsamples, seqlen, out, overwrite, device, evaluate_ppl, eval_dataset,
                    eval_seqlen, max_windows, batch_size, seed, trust_remote_code, resume, tasks, num_fewshot, limit,
                    lazy_load, offload_activations)
    return run_job(job, progress)


def evaluate(model: nn.Module, tokenizer, *, dataset: str = "stdlib", seqlen: int = 512,
             max_windows: int | None = 64, batch_size: int = 8, device: str | None = None,
             tasks: str | list[str] | None = None, num_fewshot: int | None = None, limit: float | None = None,
             include_path: str | None = None, reference: nn.Module | None = None) -> dict:
    """What `sparselm eval` measures, on model objects (a loaded compressed model needs no export): token-level
    perplexity with the pinned protocol (causal LMs); with ``tasks``, lm-eval task scores in process; with
    ``reference`` (the dense model), label-free fidelity. Returns a JSON-able dict with the library versions."""
    check_count("seqlen", seqlen, 2)
    check_count("max_windows", max_windows, 1)
    check_count("batch_size", batch_size, 1)
    check_count("num_fewshot", num_fewshot, 0)
    task_list = harness.requested(tasks)
    causal = adapter.is_causal(model.config)
    if not causal and reference is None:
        raise InputError("the model is an encoder: perplexity needs a causal LM",
                         "evaluate a causal LM, or pass the dense model as reference= (fidelity)")
    dev = devices.pick(device)
    seqlen = clamp_seqlen(seqlen, getattr(model.config, "max_position_embeddings", None) or seqlen, "seqlen")
    windows = data.evaluation_windows(tokenizer, dataset, seqlen, max_windows)
    result = {"dataset": dataset}
    if causal:
        result.update(perplexity(model.to(dev), windows, batch_size))
    if reference is not None:
        result["fidelity"] = fidelity_mod.compare(reference.to(dev), model.to(dev), windows, batch_size)
        reference.to("cpu")
    if task_list is not None:
        result["lm_eval"] = harness.run_tasks(model.to(dev), tokenizer, task_list, num_fewshot, limit, batch_size,
                                              str(dev), include_path=include_path)
    result["versions"] = versions()
    return result


def evaluate_model(path: str | None, dataset: str = "stdlib", seqlen: int = 512, max_windows: int | None = 64,
                   device: str | None = None, batch_size: int = 8, trust_remote_code: bool = False,
                   tasks: str | list[str] | None = None, num_fewshot: int | None = None, limit: float | None = None,
                   include_path: str | None = None, fidelity: bool = False, record: bool = False) -> dict:
    """`sparselm eval`: `evaluate` on a dense model (dir or hub id) or a sparselm output directory; with
    ``fidelity``, against the manifest's dense base model; with ``record``, the result is added to the
    directory's manifest and its report and model card rebuilt."""
    check_count("--seqlen", seqlen, 2)
    check_count("--max-windows", max_windows, 1)
    check_count("--batch-size", batch_size, 1)
    check_count("--num-fewshot", num_fewshot, 0)
    harness.requested(tasks)
    devices.pick(device)
    net, tok, manifest = _load_any(path, trust_remote_code, need_manifest=fidelity or record)
    if not adapter.is_causal(net.config) and not fidelity:
        raise InputError(f"{path!r} is an encoder: perplexity needs a causal LM", "evaluate a causal LM")
    reference = None
    if fidelity:
        if not manifest.get("base_model"):
            raise InputError(f"--fidelity: {io.MANIFEST} of {path!r} names no base_model to compare with",
                             "compress with `sparselm compress` (it records the base model), or pass a "
                             "directory whose manifest has base_model")
        reference = adapter.load_hf(manifest["base_model"], dtype=getattr(net, "dtype", torch.float32),
                                    trust_remote_code=trust_remote_code).model  # the compressed model's dtype
    result = {"model": path or "bundled",
              **evaluate(net, tok, dataset=dataset, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
                         device=device, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                         include_path=include_path, reference=reference)}
    if fidelity:
        result["fidelity"]["base_model"] = manifest.get("base_model")
    if record:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        io.record_evaluation(path, {"date": stamp, "max_windows": max_windows, "batch_size": batch_size, **result},
                             extras=lambda full: {k: v for k, v in run_files(full, None, Path(path).name).items()
                                                  if k != "recipe.yaml"})
    return result


def _load_any(path: str | None, trust_remote_code: bool, need_manifest: bool = False):
    """(model, tokenizer, manifest or None) of a sparselm output directory or a dense model."""
    if path is not None and (Path(path) / io.MANIFEST).is_file():
        return (io.load(path, trust_remote_code=trust_remote_code), adapter.load_tokenizer(path, trust_remote_code),
                io.read_manifest(path))
    if need_manifest:
        raise InputError(f"--fidelity / --record: {path or 'the bundled model'!r} is not a sparselm output directory",
                         "give a directory written by `sparselm compress` (it names its dense base model)")
    loaded = adapter.load_hf(path, dtype=None, trust_remote_code=trust_remote_code)  # like io.load: its own dtype
    return loaded.model, loaded.tokenizer, None


def inspect_dir(path: str) -> dict:
    """The manifest's per-layer table and totals, validated (a broken manifest is an input error, not a crash)."""
    manifest = io.read_manifest(path)
    io.layer_entries(manifest)
    try:
        return _inspect_rows(path, manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{str(Path(path) / io.MANIFEST)!r} lacks or garbles a field inspect shows "
                         f"({type(e).__name__}: {e})", "the manifest is corrupt; compress again") from None


def _inspect_rows(path: str, manifest: dict) -> dict:
    rows = [{"layer": name, "class": entry.get("class"), "method": entry["spec"]["method"],
             "target": entry["spec"].get("target"), "k": entry["info"].get("k"), "s": _nonzeros_per_channel(entry),
             **entry["accounting"], "rel_error": entry.get("rel_error"), "predicted_error": entry.get("predicted_error")}
            for name, entry in manifest["layers"].items()]
    for name, entry in io.structured_entries(manifest):
        rows.append({"layer": name, "class": "Linear (narrowed)", "method": entry["spec"].get("method"),
                     "target": entry["spec"].get("target"), "k": None, "s": None, **entry["accounting"],
                     "rel_error": None, "predicted_error": None})
    for row in manifest.get("allocation") or []:
        if Allocation.kept_dense_row(row):
            rows.append({"layer": row["layer"], "class": "Linear", "method": "dense (knapsack)", "target": None,
                         "k": None, "s": None, **dense_accounting(*row["shape"], getattr(torch, manifest[
                             "storage_dtype"])), "rel_error": 0.0, "predicted_error": 0.0})
    return {"dir": str(path), "base_model": manifest.get("base_model"), "sparselm_version": manifest.get(
        "sparselm_version"), "storage_dtype": manifest.get("storage_dtype"), "layers": rows,
            **{k: manifest["totals"][k] for k in ("ratio_stored", "ratio_params", "ratio_paper")},
            "evaluation": manifest.get("evaluation"), "regularization": manifest.get("regularization")}


def _nonzeros_per_channel(entry: dict):
    """s of a dictionary layer (CoSpaDi's exact s, or ROCKET's mean nonzeros per output channel)."""
    info = entry["info"]
    if "s" in info or "nnz" not in info:
        return info.get("s")
    return round(info["nnz"] / entry["accounting"]["shape"][0], 1)


def report_dirs(dirs: list[str], out: str | None = None) -> dict:
    """(Re)build one run's ``report.html`` (in its directory unless ``out``), or compare several runs
    (``out`` default ``comparison.html``). Every number comes from the directories' manifests."""
    from . import report
    if not dirs:
        raise InputError("no directory given", "sparselm report DIR [DIR2 ...] [--out FILE]")
    names = [Path(d).name or str(d) for d in dirs]
    labels = names if len(set(names)) == len(names) else [str(d) for d in dirs]
    runs = [(label, io.read_manifest(d)) for label, d in zip(labels, dirs)]
    if len(runs) == 1:
        target = Path(out) if out else Path(dirs[0]) / "report.html"
        text = report.render(runs[0][1])
    else:
        target, text = Path(out or "comparison.html"), report.compare(runs)
    io.write_report(target, text, report.GENERATOR)
    return {"out": str(target), "runs": len(runs), "images": text.count("<img ")}


def export_dense(path: str, out: str, overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    return io.export(path, out, overwrite, trust_remote_code)

