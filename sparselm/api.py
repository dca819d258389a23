"""The user-level flows behind the CLI: compress a model into a directory, evaluate, inspect, export.

Each returns a plain dict (what ``--json`` prints); nothing here prints.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import torch

from . import config, data, device as devices, fidelity as fidelity_mod, harness, io, outdir, pipeline
from .budget import Allocation, Plan
from .evaluate import dense_accounting, perplexity
from . import model as adapter
from .config import (DEFAULT_METHOD, SPECS, Allocate, CoefStorage, Calibration, Pattern, Ratio, Recipe, Sparsity,
                     load_recipe, recipe_to_dict, spec_to_dict)
from .errors import InputError, check_count

log = logging.getLogger(__name__)
BUNDLED_CALIB = {"nsamples": 64, "seqlen": 256}
LARGE_CALIB = {"nsamples": 128, "seqlen": 2048}


def build_recipe(method: str | None, ratio: float | None, sparsity: float | None, pattern: str | None,
                 allocate: str | None = None, recipe_file: str | None = None, storage: str | None = None,
                 quant_group: int | None = None) -> Recipe:
    """A recipe from command-line knobs (exactly one of ratio / sparsity / pattern, or the defaults).

    No method: the default, ROCKET; each method's default budget is its spec's (ROCKET: ratio 0.2) and its
    default allocation `Allocate.default_for` it (ROCKET: knapsack; every other method: uniform), so
    ``--method rocket`` alone is the default run.
    """
    if recipe_file:
        if any(v is not None for v in (method, ratio, sparsity, pattern, storage, quant_group)):
            raise InputError("--recipe was given together with --method/--ratio/--sparsity/--pattern/--storage/"
                             "--quant-group", "put everything in the recipe file (storage, quant_group), or drop --recipe")
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
    values = {}
    if storage is not None:
        values["storage"] = config._coerce("--storage", storage, CoefStorage)
    if quant_group is not None:
        values["quant_group"] = quant_group
    return Recipe(methods=(SPECS[name](target=target, **values),), allocate=alloc)


def _clamp_seqlen(seqlen: int, max_pos: int, name: str) -> int:
    if seqlen > max_pos:
        log.warning("%s %d is longer than the model's max_position_embeddings; using %d", name, seqlen, max_pos)
    return min(seqlen, max_pos)


def _default_out(model: str | None, recipe: Recipe) -> Path:
    name = Path(model).name if model else "tiny-llama"
    spec = recipe.methods[0]
    t = spec.target
    knob = f"r{t.value:g}" if isinstance(t, Ratio) else f"s{t.value:g}" if isinstance(t, Sparsity) else f"{t.n}of{t.m}"
    if spec.store != type(spec)().store:  # e.g. -int4-g128: another storage is another output
        knob += "-" + str(spec.store).replace("/", "-")
    return Path("compressed") / f"{name}-{'mixed' if len(recipe.methods) > 1 else spec.name}-{knob}"


def compress_model(model: str | None = None, recipe: Recipe | None = None, calib: str | None = None,
                   nsamples: int | None = None, seqlen: int | None = None, out: str | None = None,
                   overwrite: bool = False, device: str | None = None, evaluate_ppl: bool | None = None,
                   eval_dataset: str = "stdlib", eval_seqlen: int | None = None, max_windows: int = 64,
                   batch_size: int | None = None, seed: int | None = None, trust_remote_code: bool = False,
                   progress=None, resume: bool = False, tasks: str | list[str] | None = None,
                   num_fewshot: int | None = None, limit: float | None = None) -> dict:
    """Load, (evaluate), compress layer by layer, (evaluate), save. Returns the summary.

    Calibration settings left None come from the recipe's ``calibration:`` section, else the defaults
    (stdlib, seed 0, batch 8; nsamples / seqlen by model). ``tasks``: lm-eval task scores before and after.
    The output holds ``recipe.yaml`` (every setting explicit: it reproduces the run), ``report.html`` and a
    model card ``README.md``, written in the same atomic step as the model.

    Everything that depends only on the arguments (counts, the output path, an earlier run's leftovers) is
    checked before the model is read; the output is locked for the whole run (one writer per ``out``)."""
    recipe = recipe or build_recipe(None, None, None, None)
    calib, nsamples, seqlen, seed, batch_size = _calibration(recipe, calib, nsamples, seqlen, seed, batch_size)
    task_list = harness.requested(tasks)
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
        lm_before = _task_scores(net, tok, dev, task_list, num_fewshot, limit, batch_size)
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
        if task_list:
            _add_tasks(run, summary, lm_before, _task_scores(net, tok, dev, task_list, num_fewshot, limit,
                                                            batch_size))
            net.to("cpu")
        run["versions"] = versions()
        used = dataclasses.replace(recipe, calibration=Calibration(calib, *windows.shape, seed, batch_size))
        io.save(net, tok, out_dir, run, loaded.storage_dtype, overwrite,
                extras=lambda full: run_files(full, used, out_dir.name))
        shutil.rmtree(ckpt, ignore_errors=True)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        return summary


def _task_scores(net, tok, dev, task_list, num_fewshot, limit, batch_size) -> dict | None:
    """lm-eval scores of ``net`` on ``dev`` (left there), or None when no tasks were asked for."""
    return task_list and harness.run_tasks(net.to(dev), tok, task_list, num_fewshot, limit, batch_size, str(dev))


def _add_tasks(manifest: dict, summary: dict, before: dict, after: dict) -> None:
    manifest["lm_eval"] = {"before": before["tasks"], "after": after["tasks"], "reproduce": after["reproduce"]}
    summary.update(tasks_before=before["tasks"], tasks_after=after["tasks"])


def _calibration(recipe: Recipe, calib, nsamples, seqlen, seed, batch_size) -> tuple:
    """Each calibration setting from the arguments, else the recipe's ``calibration:``, else the default;
    an argument that contradicts the recipe is an error (one source of truth)."""
    pinned = recipe.calibration or Calibration()
    out = []
    for name, given, default in (("calib", calib, "stdlib"), ("nsamples", nsamples, None), ("seqlen", seqlen, None),
                                 ("seed", seed, 0), ("batch-size", batch_size, 8)):
        fixed = getattr(pinned, {"calib": "source", "batch-size": "batch_size"}.get(name, name))
        if given is not None and fixed is not None and given != fixed:
            raise InputError(f"--{name} {given!r} contradicts the recipe's calibration ({fixed!r})",
                             "change the recipe's calibration section, or leave the option out")
        out.append(given if given is not None else fixed if fixed is not None else default)
    return tuple(out)


def versions() -> dict:
    """The library versions a result depends on."""
    import platform
    import transformers
    from .version import __version__
    return {"sparselm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_files(manifest: dict, recipe: Recipe | None, name: str) -> dict[str, str]:
    """The files written beside the model: ``recipe.yaml`` (every default explicit), ``report.html`` and the
    model card ``README.md``. A report that fails to render is logged and left out (``sparselm report DIR``
    rebuilds it); it never costs the compressed model."""
    import yaml
    from . import card, report
    files = {} if recipe is None else {
        "recipe.yaml": "# sparselm recipe that produced this directory: sparselm compress MODEL --recipe recipe.yaml\n"
                       + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)}
    for fname, render in (("report.html", lambda: report.render(manifest)),
                          ("README.md", lambda: card.render(manifest, name))):
        try:
            files[fname] = render()
        except Exception as e:  # noqa: BLE001 - a report bug must not lose an hour of compression
            log.warning("could not write %s (%s: %s); run `sparselm report` on the directory", fname,
                        type(e).__name__, e)
    return files


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
                   device: str | None = None, batch_size: int = 8, trust_remote_code: bool = False,
                   tasks: str | list[str] | None = None, num_fewshot: int | None = None, limit: float | None = None,
                   include_path: str | None = None, fidelity: bool = False, record: bool = False) -> dict:
    """Perplexity of a dense model (dir or hub id) or of a sparselm output directory; with ``tasks``, also
    lm-eval task scores (in process); with ``fidelity``, agreement with the manifest's dense base model;
    with ``record``, the result is added to the directory's manifest and its report and model card rebuilt."""
    check_count("--seqlen", seqlen, 2)
    check_count("--max-windows", max_windows, 1)
    check_count("--batch-size", batch_size, 1)
    check_count("--num-fewshot", num_fewshot, 0)
    task_list = harness.requested(tasks)
    dev = devices.pick(device)
    net, tok, manifest = _load_any(path, trust_remote_code, need_manifest=fidelity or record)
    causal = adapter._is_causal(net.config)
    if not causal and not fidelity:
        raise InputError(f"{path!r} is an encoder: perplexity needs a causal LM", "evaluate a causal LM")
    seqlen = _clamp_seqlen(seqlen, getattr(net.config, "max_position_embeddings", None) or seqlen, "--seqlen")
    windows = data.evaluation_windows(tok, dataset, seqlen, max_windows)
    result = {"model": path or "bundled", "dataset": dataset}
    if causal:
        result.update(perplexity(net.to(dev), windows, batch_size))
    if fidelity:
        if not manifest.get("base_model"):
            raise InputError(f"--fidelity: {io.MANIFEST} of {path!r} names no base_model to compare with",
                             "compress with `sparselm compress` (it records the base model), or pass a "
                             "directory whose manifest has base_model")
        reference = adapter.load_hf(manifest["base_model"], dtype=getattr(net, "dtype", torch.float32),
                                    trust_remote_code=trust_remote_code).model  # the compressed model's dtype
        result["fidelity"] = fidelity_mod.compare(reference.to(dev), net.to(dev), windows, batch_size)
        result["fidelity"]["base_model"] = manifest.get("base_model")
        reference.to("cpu")
    if task_list is not None:
        result["lm_eval"] = harness.run_tasks(net.to(dev), tok, task_list, num_fewshot, limit, batch_size, str(dev),
                                              include_path=include_path)
    result["versions"] = versions()
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

