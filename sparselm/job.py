"""A compression run: its arguments checked before anything is read (`check_job` -> `CompressJob`), then
`run_job`: lock the output, load (whole or block by block), calibrate, evaluate before, compress
(`pipeline.compress`, resumable), evaluate after, save with the run files (recipe, report, model card).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data, device as devices, dist, harness, io, kernels, lazy, outdir, pipeline
from . import model as adapter
from . import resume as resume_mod
from .config import (DEFAULT_METHOD, SPECS, Allocate, Calibration, CoefStorage, Pattern, PruneSpec, Ratio, Recipe,
                     Refine, Sparsity, StructuredSpec)
from .errors import InputError, check_count
from .recipes import coerce, load_recipe, recipe_to_dict, spec_to_dict
from .metrics import perplexity
from .plan import Plan, menu_label
from .streamed import StreamedSave

log = logging.getLogger(__name__)
BUNDLED_CALIB = {"nsamples": 64, "seqlen": 256}
LARGE_CALIB = {"nsamples": 128, "seqlen": 2048}


def build_recipe(method: str | None, ratio: float | None, sparsity: float | None, pattern: str | None,
                 allocate: str | None = None, recipe_file: str | None = None, refine: str | None = None,
                 storage: str | None = None, quant_group: int | None = None) -> Recipe:
    """A recipe from command-line knobs (exactly one of ratio / sparsity / pattern, or the defaults).

    No method: the default, ROCKET; each method's default budget is its spec's (ROCKET: ratio 0.2) and its
    default allocation `Allocate.default_for` it (ROCKET: knapsack; every other method: uniform), so
    ``--method rocket`` alone is the default run.
    """
    if recipe_file:
        if any(v is not None for v in (method, ratio, sparsity, pattern, refine, storage, quant_group)):
            raise InputError("--recipe was given together with --method/--ratio/--sparsity/--pattern/--refine/"
                             "--storage/--quant-group",
                             "put everything in the recipe file (refine, storage, quant_group), or drop --recipe")
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
    extra = {}
    if refine is not None:
        if not issubclass(SPECS[name], PruneSpec):
            raise InputError(f"--refine {refine} refines pruning masks; method {name!r} does not prune weights",
                             "use --refine with magnitude, wanda or sparsegpt, or drop it")
        try:
            extra["refine"] = Refine(refine)
        except ValueError:
            raise InputError(f"--refine {refine!r} is not valid", f"use one of {[r.value for r in Refine]}") from None
    if storage is not None:
        extra["storage"] = coerce("--storage", storage, CoefStorage)
    if quant_group is not None:
        extra["quant_group"] = quant_group
    return Recipe(methods=(SPECS[name](target=target, **extra),), allocate=alloc)


def clamp_seqlen(seqlen: int, max_pos: int, name: str) -> int:
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


@dataclass(frozen=True)
class CompressJob:
    """A compression run whose arguments are checked (`check_job`): what `run_job` does, nothing read yet."""
    model: str | None
    recipe: Recipe
    out: Path
    calib: str
    nsamples: int | None
    seqlen: int | None
    seed: int
    batch_size: int
    overwrite: bool = False
    device: str | None = None
    evaluate_ppl: bool = False
    eval_dataset: str = "stdlib"
    eval_seqlen: int | None = None
    max_windows: int = 64
    tasks: list[str] | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    trust_remote_code: bool = False
    resume: bool = False
    lazy: bool = False  # read the model block by block and write it window by window (`lazy`, `streamed.StreamedSave`)
    spill: str | None = None  # a folder for the calibration activations between blocks (`capture.Spilled`)


def check_job(model: str | None = None, recipe: Recipe | None = None, calib: str | None = None,
              nsamples: int | None = None, seqlen: int | None = None, out: str | None = None,
              overwrite: bool = False, device: str | None = None, evaluate_ppl: bool | None = None,
              eval_dataset: str = "stdlib", eval_seqlen: int | None = None, max_windows: int = 64,
              batch_size: int | None = None, seed: int | None = None, trust_remote_code: bool = False,
              resume: bool = False, tasks: str | list[str] | None = None, num_fewshot: int | None = None,
              limit: float | None = None, lazy_load: bool | None = None,
              offload_activations: str | None = None) -> CompressJob:
    """Everything that depends only on the arguments (counts, the output path, an earlier run's leftovers,
    whether the model can be streamed), checked before the model is read. See `compress_model`."""
    recipe = recipe or build_recipe(None, None, None, None)
    calib, nsamples, seqlen, seed, batch_size = _calibration(recipe, calib, nsamples, seqlen, seed, batch_size)
    task_list = harness.requested(tasks)
    kernels.check_environment()
    out_dir = Path(out) if out else _default_out(model, recipe)
    for name, value, least in (("--nsamples", nsamples, 1), ("--seqlen", seqlen, 2), ("--batch-size", batch_size, 1),
                               ("--max-windows", max_windows, 1), ("eval seqlen", eval_seqlen, 2)):
        check_count(name, value, least)
    outdir.check_out(out_dir, "compress", overwrite, sources=(model,))
    evaluate_ppl = (model is None) if evaluate_ppl is None else evaluate_ppl
    return CompressJob(model, recipe, out_dir, calib, nsamples, seqlen, seed, batch_size, overwrite, device,
                       evaluate_ppl, eval_dataset, eval_seqlen, max_windows, task_list, num_fewshot, limit,
                       trust_remote_code, resume, _streams(model, evaluate_ppl, task_list, lazy_load, recipe),
                       offload_activations)


def _streams(model: str | None, evaluate_ppl: bool, task_list, lazy_load: bool | None, recipe: Recipe) -> bool:
    """Whether the model is read block by block and written window by window: by default for a local directory
    when nothing needs the whole model in memory (no perplexity, no lm-eval tasks, no mixed knapsack menu, whose
    candidate plans are compressed on copies of the model: `pipeline.select_plan`, no structured pruning, which
    chooses every block's widths after seeing them all); ``lazy_load`` forces it."""
    mixed = recipe.allocate is Allocate.KNAPSACK and len({menu_label(m) for m in recipe.methods}) > 1
    structured = isinstance(recipe.methods[0], StructuredSpec) and not mixed
    possible = model is not None and Path(model).is_dir() and not evaluate_ppl and not task_list and not structured
    if lazy_load is None and mixed:
        return False
    if lazy_load and not possible:
        raise InputError("lazy loading needs a local model directory, no evaluation in the run and a method that is "
                         "not structured pruning", "pass --no-eval and no tasks; evaluate the output afterwards "
                         "with `sparselm eval`; structured pruning (flap, ziplm) holds the whole model")
    return possible if lazy_load is None else lazy_load


def run_job(job: CompressJob, progress=None) -> dict:
    """Run a checked `CompressJob` under the output's lock; the summary (what ``--json`` prints)."""
    dev = dist.init_from_env(devices.pick(job.device))
    writes = dist.rank() == 0  # several processes (torchrun): rank 0 alone writes
    with outdir.locked(job.out) if writes else contextlib.nullcontext():
        t0 = time.perf_counter()
        ckpt = outdir.checkpoint_dir(job.out)
        if writes and not job.resume and ckpt.exists():
            log.warning("discarding the checkpoint of an earlier interrupted run at %s (pass --resume to continue it "
                        "instead)", ckpt)
            shutil.rmtree(ckpt)
        streamed = lazy.load_lazy(job.model, trust_remote_code=job.trust_remote_code) if job.lazy else None
        loaded = streamed[0] if streamed else adapter.load_hf(job.model, trust_remote_code=job.trust_remote_code)
        windows, eval_windows = _windows(job, loaded)
        summary: dict = {"out": str(job.out), "model": loaded.source, "device": str(dev)}
        before = _measure(loaded, eval_windows, dev, job)
        if "perplexity" in before:
            summary["perplexity_before"] = before["perplexity"]["perplexity"]
        key = {"model": loaded.source, "recipe": recipe_to_dict(job.recipe), "calib": job.calib,
               "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "seed": job.seed}
        start, done, plan = _restore(loaded.model, ckpt, key) if job.resume else (0, [], None)
        writer = StreamedSave(job.out, loaded.storage_dtype, job.overwrite) if streamed and writes else None
        with writer or contextlib.nullcontext():
            if writer:
                streamed[1].write = lambda blocks: writer.add(loaded.model, blocks)
            report = pipeline.compress(loaded.model, windows, job.recipe, dev, loaded.storage_dtype, job.batch_size,
                                       progress, done, start, checkpoint=lambda n, layers, p: writes and _checkpoint(
                                           ckpt, key, n, layers, p), plan=plan,
                                       source=streamed[1] if streamed else None, spill=job.spill)
            if not streamed:
                loaded.model.to("cpu")
            run = run_manifest(loaded, report, job.recipe, job.calib, windows, job.seed)
            summary.update(_summary(job, run["totals"], report.seconds))
            _record_after(run, summary, job, before, _measure(loaded, eval_windows, dev, job))
            run["versions"] = versions()
            used = dataclasses.replace(job.recipe, calibration=Calibration(job.calib, *windows.shape, job.seed,
                                                                           job.batch_size))
            extras = lambda full: run_files(full, used, job.out.name)  # noqa: E731
            if writer:
                writer.finish(loaded.model, loaded.tokenizer, run, extras)
            elif writes:
                io.save(loaded.model, loaded.tokenizer, job.out, run, loaded.storage_dtype, job.overwrite,
                        extras=extras)
        if writes:
            shutil.rmtree(ckpt, ignore_errors=True)
        dist.barrier()  # the others end once the output is in place
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        return summary


def _windows(job: CompressJob, loaded) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(calibration windows, evaluation windows or None) for the loaded model, lengths clamped to its context."""
    net, tok = loaded.model, loaded.tokenizer
    if job.evaluate_ppl and not adapter.is_causal(net.config):
        raise InputError("perplexity evaluation needs a causal LM; this model is an encoder", "pass --no-eval")
    defaults = BUNDLED_CALIB if job.model is None else LARGE_CALIB
    max_pos = getattr(net.config, "max_position_embeddings", None) or 2048
    seqlen = clamp_seqlen(job.seqlen or defaults["seqlen"], max_pos, "--seqlen")
    windows = data.calibration_data(tok, job.calib, job.nsamples or defaults["nsamples"], seqlen, job.seed)
    eval_windows = None
    if job.evaluate_ppl:
        eval_windows = data.evaluation_windows(tok, job.eval_dataset, clamp_seqlen(
            job.eval_seqlen or seqlen, max_pos, "eval seqlen"), job.max_windows)
    return windows, eval_windows


def _measure(loaded, eval_windows, dev, job: CompressJob) -> dict:
    """Perplexity on ``eval_windows`` (if any) and lm-eval scores (if asked for) of the model; left on the CPU."""
    net = loaded.model
    scores = {}
    if eval_windows is not None:
        scores["perplexity"] = perplexity(net.to(dev), eval_windows, job.batch_size)
    if job.tasks:
        scores["lm_eval"] = harness.run_tasks(net.to(dev), loaded.tokenizer, job.tasks, job.num_fewshot, job.limit,
                                              job.batch_size, str(dev))
    if scores:
        net.to("cpu")
    return scores


def _summary(job: CompressJob, totals: dict, seconds: float) -> dict:
    return {"method": "mixed" if len(job.recipe.methods) > 1 else job.recipe.methods[0].name,
            "allocate": job.recipe.allocate.value, **{k: totals[k] for k in ("ratio_stored", "ratio_params",
                                                                              "ratio_paper")},
            "compress_seconds": round(seconds, 2), "processes": dist.size()}


def _record_after(run: dict, summary: dict, job: CompressJob, before: dict, after: dict) -> None:
    """Put the before/after measurements (`_measure`) into the manifest and the summary."""
    if "perplexity" in before:
        ppl0, ppl1 = before["perplexity"], after["perplexity"]
        summary["perplexity_after"] = ppl1["perplexity"]
        run["evaluation"] = {"dataset": job.eval_dataset, "split": "validation", **{
            k: ppl0[k] for k in ("tokens", "windows", "seqlen", "metric")},
            "perplexity_before": ppl0["perplexity"], "perplexity_after": ppl1["perplexity"]}
    if "lm_eval" in before:
        lm0, lm1 = before["lm_eval"], after["lm_eval"]
        run["lm_eval"] = {"before": lm0["tasks"], "after": lm1["tasks"], "reproduce": lm1["reproduce"]}
        summary.update(tasks_before=lm0["tasks"], tasks_after=lm1["tasks"])


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
    resume_mod.save_checkpoint(ckpt, key, blocks_done, {la.name: _record(la) for la in layers},
                       {la.name: la.module for la in layers}, plan.to_dict())


def _restore(net, ckpt: Path, key: dict) -> tuple[int, list[pipeline.LayerResult], Plan | None]:
    """Swap in the layers an interrupted run finished; (blocks done, their records, the plan it followed)."""
    found = resume_mod.load_checkpoint(ckpt, key)
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
