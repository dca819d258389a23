"""The user-level flows behind the CLI: compress a model into a directory, evaluate, inspect, export.

Each returns a plain dict (what ``--json`` prints); nothing here prints.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from . import data, device as devices, io, outdir, pipeline
from .budget import Allocation, Plan
from .evaluate import dense_accounting, perplexity
from . import model as adapter
from .config import (DEFAULT_METHOD, SPECS, Allocate, Pattern, Ratio, Recipe, Sparsity,
                     load_recipe, recipe_to_dict, spec_to_dict)
from .errors import InputError, check_count

log = logging.getLogger(__name__)
BUNDLED_CALIB = {"nsamples": 64, "seqlen": 256}
LARGE_CALIB = {"nsamples": 128, "seqlen": 2048}


def build_recipe(method: str | None, ratio: float | None, sparsity: float | None, pattern: str | None,
                 allocate: str | None = None, recipe_file: str | None = None) -> Recipe:
    """A recipe from command-line knobs (exactly one of ratio / sparsity / pattern, or the defaults).

    No method: the default, ROCKET; each method's default budget is its spec's (ROCKET: ratio 0.2) and its
    default allocation `Allocate.default_for` it (ROCKET: knapsack; every other method: uniform), so
    ``--method rocket`` alone is the default run.
    """
    if recipe_file:
        if any(v is not None for v in (method, ratio, sparsity, pattern)):
            raise InputError("--recipe was given together with --method/--ratio/--sparsity/--pattern",
                             "put everything in the recipe file, or drop --recipe")
        return load_recipe(recipe_file)
    given = [v for v in (ratio, sparsity, pattern) if v is not None]
    if len(given) > 1:
        raise InputError("more than one of --ratio, --sparsity, --pattern given", "pass only one budget knob")
    name = method or DEFAULT_METHOD
    if name not in SPECS:
        raise InputError(f"unknown method {name!r}", f"choose one of {', '.join(SPECS)}")
    target = (Ratio(ratio) if ratio is not None else Sparsity(sparsity) if sparsity is not None
              else Pattern.parse(pattern) if pattern is not None else None)
    if target is None:
        target = SPECS[name].target
    try:
        alloc = Allocate.default_for(name) if allocate is None else Allocate(allocate)
    except ValueError:
        raise InputError(f"--allocate {allocate!r} is not valid", "use uniform or knapsack") from None
    return Recipe(methods=(SPECS[name](target=target),), allocate=alloc)


def _clamp_seqlen(seqlen: int, max_pos: int, name: str) -> int:
    if seqlen > max_pos:
        log.warning("%s %d is longer than the model's max_position_embeddings; using %d", name, seqlen, max_pos)
    return min(seqlen, max_pos)


def _default_out(model: str | None, recipe: Recipe) -> Path:
    name = Path(model).name if model else "tiny-llama"
    spec = recipe.methods[0]
    t = spec.target
    knob = f"r{t.value:g}" if isinstance(t, Ratio) else f"s{t.value:g}" if isinstance(t, Sparsity) else f"{t.n}of{t.m}"
    return Path("compressed") / f"{name}-{'mixed' if len(recipe.methods) > 1 else spec.name}-{knob}"


def compress_model(model: str | None = None, recipe: Recipe | None = None, calib: str = "stdlib",
                   nsamples: int | None = None, seqlen: int | None = None, out: str | None = None,
                   overwrite: bool = False, device: str | None = None, evaluate_ppl: bool | None = None,
                   eval_dataset: str = "stdlib", eval_seqlen: int | None = None, max_windows: int = 64,
                   batch_size: int = 8, seed: int = 0, trust_remote_code: bool = False, progress=None,
                   resume: bool = False) -> dict:
    """Load, (evaluate), compress layer by layer, (evaluate), save. Returns the summary.

    Everything that depends only on the arguments (counts, the output path, an earlier run's leftovers) is
    checked before the model is read; the output is locked for the whole run (one writer per ``out``)."""
    recipe = recipe or build_recipe(None, None, None, None)
    out_dir = Path(out) if out else _default_out(model, recipe)
    for name, value, least in (("--nsamples", nsamples, 1), ("--seqlen", seqlen, 2), ("--batch-size", batch_size, 1),
                               ("--max-windows", max_windows, 1), ("eval seqlen", eval_seqlen, 2)):
        check_count(name, value, least)
    outdir.check_out(out_dir, "compress", overwrite, sources=(model,))
    dev = devices.pick(device)
    with outdir.locked(out_dir):
        t0 = time.perf_counter()
        ckpt = io.checkpoint_dir(out_dir)
        if not resume and ckpt.exists():
            log.warning("discarding the checkpoint of an earlier interrupted run at %s (pass --resume to continue it "
                        "instead)", ckpt)
            shutil.rmtree(ckpt)
        loaded = adapter.load_hf(model, trust_remote_code=trust_remote_code)
        net, tok = loaded.model, loaded.tokenizer
        causal = adapter._is_causal(net.config)
        evaluate_ppl = (model is None) if evaluate_ppl is None else evaluate_ppl
        if evaluate_ppl and not causal:
            raise InputError("perplexity evaluation needs a causal LM; this model is an encoder", "pass --no-eval")
        defaults = BUNDLED_CALIB if model is None else LARGE_CALIB
        max_pos = getattr(net.config, "max_position_embeddings", None) or 2048
        seqlen = _clamp_seqlen(seqlen or defaults["seqlen"], max_pos, "--seqlen")
        windows = data.calibration_data(tok, calib, nsamples or defaults["nsamples"], seqlen, seed)
        summary: dict = {"out": str(out_dir), "model": loaded.source, "device": str(dev)}
        if evaluate_ppl:
            eval_windows = data.evaluation_windows(tok, eval_dataset, _clamp_seqlen(eval_seqlen or seqlen, max_pos,
                                                                                     "eval seqlen"), max_windows)
            before = perplexity(net.to(dev), eval_windows, batch_size)
            summary["perplexity_before"] = before["perplexity"]
        key = {"model": loaded.source, "recipe": recipe_to_dict(recipe), "calib": calib, "nsamples": int(windows.shape[0]),
               "seqlen": int(windows.shape[1]), "seed": seed}
        start, done, plan = _restore(net, ckpt, key) if resume else (0, [], None)
        report = pipeline.compress(net, windows, recipe, dev, loaded.storage_dtype, batch_size, progress, done, start,
                                   checkpoint=lambda n, layers, p: _checkpoint(ckpt, key, n, layers, p), plan=plan)
        net.to("cpu")
        run = run_manifest(loaded, report, recipe, calib, windows, seed)
        totals = run["totals"]
        summary.update(method="mixed" if len(recipe.methods) > 1 else recipe.methods[0].name,
                       allocate=recipe.allocate.value, **{k: totals[k] for k in ("ratio_stored", "ratio_params",
                                                                               "ratio_paper")},
                       compress_seconds=round(report.seconds, 2))
        if evaluate_ppl:
            after = perplexity(net.to(dev), eval_windows, batch_size)
            net.to("cpu")
            summary["perplexity_after"] = after["perplexity"]
            run["evaluation"] = {"dataset": eval_dataset, "split": "validation", **{k: before[k] for k in (
                "tokens", "windows", "seqlen", "metric")}, "perplexity_before": before["perplexity"],
                "perplexity_after": after["perplexity"]}
        io.save(net, tok, out_dir, run, loaded.storage_dtype, overwrite)
        shutil.rmtree(ckpt, ignore_errors=True)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        return summary


def _record(layer: pipeline.LayerResult) -> dict:
    return {"spec": spec_to_dict(layer.spec), "rel_error": layer.rel_error, "predicted_error": layer.predicted_error,
            "info": layer.info, "group": list(layer.group)}


def _checkpoint(ckpt: Path, key: dict, blocks_done: int, layers: list[pipeline.LayerResult], plan: Plan) -> None:
    io.save_checkpoint(ckpt, key, blocks_done, {la.name: _record(la) for la in layers},
                       {la.name: la.module for la in layers}, plan.to_dict())


def _restore(net, ckpt: Path, key: dict) -> tuple[int, list[pipeline.LayerResult], Plan | None]:
    """Swap in the layers an interrupted run finished; (blocks done, their records, the plan it followed)."""
    found = io.load_checkpoint(ckpt, key)
    if found is None:
        log.warning("--resume: no interrupted run found at %s; starting from the first block", ckpt)
        return 0, [], None
    blocks_done, layers, plan = found
    done, groups = [], {}
    for name, (module, rec) in layers.items():
        io.restore_record(module, rec)
        adapter.swap(net, name, module)
        done.append(pipeline.LayerResult(name, module, rec["rel_error"], rec["predicted_error"]))
        if module.group:
            groups.setdefault(module.group, []).append(module)
    for modules in groups.values():
        pipeline.tie_group(modules)  # one dictionary again, stored once
    log.info("--resume: %d blocks already compressed", blocks_done)
    return blocks_done, done, plan


def run_manifest(loaded, report: pipeline.CompressReport, recipe: Recipe, calib: str, windows, seed: int) -> dict:
    """The manifest of a compression run: the model's own part (`io.describe`: every layer's entry and the
    totals, the layers the knapsack kept dense counted at full size) + the run's errors, recipe, calibration
    protocol, regularization and allocation."""
    own = io.describe(loaded.model, loaded.storage_dtype, report.allocation)
    layers = {la.name: {**own["layers"][la.name], "rel_error": la.rel_error, "predicted_error": la.predicted_error}
              for la in report.layers}
    regular = {n: v["info"]["whitening_shift"] for n, v in layers.items() if v["info"].get("whitening_shift")}
    return {**own, "base_model": loaded.source, "recipe": recipe_to_dict(recipe), "layers": layers,
            "calibration": {"source": calib, "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                            "seed": seed},
            "regularization": regular,
            "allocation": None if report.allocation is None else [a.to_dict() for a in report.allocation],
            "compress_seconds": report.seconds, "torch_version": torch.__version__}


def evaluate_model(path: str | None, dataset: str = "stdlib", seqlen: int = 512, max_windows: int | None = 64,
                   device: str | None = None, batch_size: int = 8, trust_remote_code: bool = False) -> dict:
    """Perplexity of a dense model (dir or hub id) or of a sparselm output directory."""
    check_count("--seqlen", seqlen, 2)
    check_count("--max-windows", max_windows, 1)
    check_count("--batch-size", batch_size, 1)
    dev = devices.pick(device)
    if path is not None and (Path(path) / io.MANIFEST).is_file():
        net = io.load(path, trust_remote_code=trust_remote_code)
        tok = adapter.load_tokenizer(path, trust_remote_code)
    else:
        loaded = adapter.load_hf(path, trust_remote_code=trust_remote_code)
        net, tok = loaded.model, loaded.tokenizer
    if not adapter._is_causal(net.config):
        raise InputError(f"{path!r} is an encoder: perplexity needs a causal LM", "evaluate a causal LM")
    seqlen = _clamp_seqlen(seqlen, getattr(net.config, "max_position_embeddings", None) or seqlen, "--seqlen")
    windows = data.evaluation_windows(tok, dataset, seqlen, max_windows)
    result = perplexity(net.to(dev), windows, batch_size)
    return {"model": path or "bundled", "dataset": dataset, **result}


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


def export_dense(path: str, out: str, overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    return io.export(path, out, overwrite, trust_remote_code)

