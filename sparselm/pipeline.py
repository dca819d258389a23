"""compress(): capture -> plan (profile -> allocate) -> per window of blocks: record, compress, swap, propagate.

The only module that knows blocks, methods and swaps together. Every pass over the model is the one block
walk (`blocks.walk`): profiling for the knapsack, compression and resuming are the same walk; structured
pruning (`structured`) has its own flow over the same walk.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import dist, fidelity, model as adapter, structured
from .device import layer_workers, map_layers
from .blocks import BlockSource, CompressReport, LayerResult, walk
from .config import Allocate, CoSpaDiSpec, GQSASpec, MethodSpec, Ratio, Recipe, StructuredSpec
from .errors import InputError
from .metrics import window_nll
from .methods import gqsa
from .methods import Factored, Pruned, Result, SparseDict, compress_group
from .modules import MODULE_CLASSES, CompressedLinear, LowRankLinear, SparseDictLinear, SparseLinear
from .plan import Allocation, Plan, menu_label, method_errors, plan_knapsack, rescale
from .profile import profile_layer, relative_error

log = logging.getLogger(__name__)
FORMATS: dict[type, type[CompressedLinear]] = {Pruned: SparseLinear, Factored: LowRankLinear,
                                               SparseDict: SparseDictLinear}  # method result -> its format


def build_module(result: Result, bias: torch.Tensor | None, dtype: torch.dtype) -> CompressedLinear:
    """The compressed layer holding a method's result (its format builds itself from it)."""
    return FORMATS[type(result)].from_result(result, bias, dtype)


# --- planning ------------------------------------------------------------------------------------------
def targets(model: nn.Module, recipe: Recipe) -> list[list[str]]:
    """Qualified names of the targeted linears of each block (the one place that builds them)."""
    prefix, blocks = adapter.find_blocks(model)
    out = [adapter.select(list(adapter.linears(b, adapter.block_prefix(prefix, i))), recipe.targets, recipe.ignore)
           for i, b in enumerate(blocks)]
    if not any(out):
        raise InputError(f"no linear layer matches targets={list(recipe.targets)} ignore={list(recipe.ignore)}",
                         "check the recipe's targets/ignore patterns against `sparselm inspect`-style layer names")
    return out


def window_size(specs) -> int:
    """Blocks compressed together: the largest CoSpaDi ``group_size`` planned (1 otherwise)."""
    return max([s.group_size for s in specs if isinstance(s, CoSpaDiSpec)] or [1])


def share_sets(specs: dict[str, MethodSpec], names: list[list[str]], prefix: str,
               window: int) -> list[tuple[str, ...]]:
    """The layers compressed together, in order: in each window of blocks, a projection that CoSpaDi shares
    across blocks (its ``shared`` patterns, default `model.SHARED_INPUT_PROJECTIONS`) forms one set with the
    same projection of the window's other blocks *planned with the same spec*; every other layer is a set of
    its own. ``names[i]``: block ``i``'s targeted linears (layers absent from ``specs`` stay dense)."""
    sets: list[tuple[str, ...]] = []
    for first in range(0, len(names), window):
        joint: dict[tuple, list[str]] = {}
        singles = []
        for i in range(first, min(first + window, len(names))):
            for name in (n for n in names[i] if n in specs):
                spec, rel = specs[name], name[len(adapter.block_prefix(prefix, i)):]
                if _shares(spec, rel, window):
                    joint.setdefault((rel, spec), []).append(name)
                else:
                    singles.append((name,))
        sets += [tuple(v) for v in joint.values()] + singles
    return sets


def _shares(spec: MethodSpec, rel: str, window: int) -> bool:
    if not isinstance(spec, CoSpaDiSpec) or spec.group_size < 2 or window < 2:
        return False
    patterns = adapter.SHARED_INPUT_PROJECTIONS if spec.shared is None else spec.shared
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


@torch.no_grad()
def profile_options(model: nn.Module, calib: torch.Tensor, names: list[list[str]], specs: list[MethodSpec],
                    device: torch.device, dtype: torch.dtype, batch_size: int, cache: dict | None,
                    source: BlockSource | None = None, spill: str | Path | None = None):
    """Every targeted layer's knapsack options, on dense-propagated inputs; and the dense shapes."""
    options, shapes = {}, {}
    for win in walk(model, calib, names, device, batch_size, source=source, spill=spill):
        @torch.no_grad()  # grad mode is per thread (`map_layers`)
        def table(name: str, stats=win.stats) -> list:
            W = adapter.linear_weight(adapter.get_module(model, name)).detach().to(device, torch.float32)
            return profile_layer(W, stats[name], specs, dtype=dtype, cache=cache, key=name)
        shapes.update((n, _shape(model, n)) for n in win.names)
        workers, cost = _side_by_side(device, {n: [shapes[n]] for n in win.names})
        options.update(zip(win.names, map_layers(table, win.names, workers, cost)))
    return options, shapes


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    return tuple(adapter.linear_weight(adapter.get_module(model, name)).shape)


def _side_by_side(device: torch.device, shapes: dict) -> tuple[int, Callable]:
    """``shapes``: each task's layer shapes ``(out, in)``. How many tasks run side by side (`device.layer_workers`)
    and each one's cost for `device.map_layers` (``out·in·min(out, in)`` per layer, a whitened factorization's
    multiply-adds). A task's working memory, bounded from the peaks measured beside the statistics on SmolLM2's
    down_proj (1536 inputs) / gate_proj (576): ``56·in² + 80·in·out`` bytes per layer (SparseGPT's float64 Hessian
    factors 147 / 4 MB, ROCKET's tables 90 / 43 MB, SVD-LLM 50 / 25 MB) + 1 GiB (K-SVD's chunks: CoSpaDi 204 / 888 MB)."""
    need = max((sum(56 * i * i + 80 * i * o for o, i in s) + (1 << 30) for s in shapes.values()), default=0)
    return layer_workers(device, len(shapes), need), lambda task: sum(o * i * min(o, i) for o, i in shapes[task])


def _check_shapes(model: nn.Module, names: list[list[str]], specs) -> None:
    """Shape constraints of the methods, checked on every targeted layer before any calibration pass (the
    skeleton's shapes suffice: a lazily loaded model is checked too)."""
    for spec in (s for s in specs if isinstance(s, GQSASpec)):
        for name in (n for block in names for n in block):
            gqsa.check_width(adapter.linear_weight(adapter.get_module(model, name)).shape[1], spec.quant_group,
                             f"{spec.name} on {name}")


def make_plan(model: nn.Module, calib: torch.Tensor, recipe: Recipe, device: torch.device, dtype: torch.dtype,
              batch_size: int = 8, cache: dict | None = None, source: BlockSource | None = None,
              spill: str | Path | None = None) -> Plan:
    """Uniform: every targeted layer gets the recipe's spec. Knapsack: profile every targeted layer
    (`profile.profile_layer`; ``cache``, see `compress`) and let `plan.plan_knapsack` choose; with several
    entries in the menu (`plan.menu_label`: one method with two storages is two entries), `select_plan` then
    keeps the best of that plan and the others it scores end to end (the model in memory only). Structured pruning
    specs in a menu are not profiled per layer: they enter `select_plan` as whole-model candidates. (With a
    ``source`` the blocks' weights are checked as the walk reads them.)"""
    names = targets(model, recipe)
    _check_shapes(model, names, recipe.methods)
    if source is None:
        adapter.check_finite(model, [n for block in names for n in block])
    if recipe.allocate is Allocate.KNAPSACK:
        target = recipe.methods[0].target
        if not isinstance(target, Ratio) or any(s.target != target for s in recipe.methods):
            raise InputError("knapsack allocation needs one --ratio budget shared by all methods",
                             "pass --ratio R (not --sparsity/--pattern) with --allocate knapsack")
        grid = [s.with_target(target) for s in recipe.methods]
        layered = [s for s in grid if not isinstance(s, StructuredSpec)]
        options, shapes = profile_options(model, calib, names, layered, device, dtype, batch_size, cache, source,
                                          spill)
        dense = sum(o.size for opts in options.values() for o in opts if o.payload is None)
        budget = (1 - target.value) * dense
        plan = _plan(model, names, rows=plan_knapsack(options, shapes, target.value, budget))
        if len({menu_label(s) for s in grid}) > 1 and source is not None:
            log.warning("mixed menu on a lazily loaded model: its candidate plans need the whole model in memory and "
                        "are not scored; the knapsack plan is used as it is (load the model in memory to compare)")
        elif len({menu_label(s) for s in grid}) > 1:  # a mixed menu: never worse than the best of its methods alone
            plan = select_plan(model, calib, names, recipe, grid, plan, options, shapes, budget, device, dtype,
                               batch_size, spill, cache)
        return plan
    return _plan(model, names, specs={n: recipe.methods[0] for block in names for n in block})


def _plan(model: nn.Module, names: list[list[str]], specs: dict[str, MethodSpec] | None = None,
          rows: list[Allocation] | None = None) -> Plan:
    """The plan of ``specs`` (uniform) or of a knapsack's ``rows`` (layers kept dense are left out)."""
    if rows is not None:
        specs = {a.layer: a.spec for a in rows if not a.kept_dense}
    prefix, _ = adapter.find_blocks(model)
    return Plan(specs, share_sets(specs, names, prefix, window_size(specs.values())), rows)


# --- mixed menus: candidate plans scored end to end ---------------------------------------------------
SELECT_HELD_OUT = 4  # 1/4 of the calibration sequences (at most SELECT_SEQUENCES) score the candidate plans ...
SELECT_SEQUENCES = 32  # ... which are compressed on the rest: scored out of sample


ENCODER_PIECE = 32  # an encoder's candidates are scored on sentence-length pieces of the held-out windows


@torch.no_grad()
def window_scores(reference: nn.Module, compressed: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """How good ``compressed`` is end to end, per held-out token window ``(n,)`` (lower is better): a causal LM's
    next-token loss in nats per token (their mean is the log of `metrics.perplexity`, what its users measure);
    an encoder's 1 − cosine to ``reference``'s mean-pooled embedding of each `ENCODER_PIECE`-token piece of the
    windows (`encoder_pieces`, `fidelity.pooled_cosines`): sentence embeddings are what encoder users compare.
    Measured on MiniLM at ratios 0.4 and 0.5 (docs/methods.md): the pieces rank the candidate plans as the
    sentence-embedding evaluation does; whole 128-token windows, the final hidden states' relative error and the
    per-token cosine do not."""
    if compressed.get_output_embeddings() is not None:
        return window_nll(compressed, windows, batch_size=4) / (windows.shape[1] - 1)
    return 1.0 - fidelity.pooled_cosines(reference, compressed, encoder_pieces(windows), batch_size=16)


def plan_score(reference: nn.Module, compressed: nn.Module, windows: torch.Tensor) -> float:
    """The mean of `window_scores`: one candidate plan's score."""
    return float(window_scores(reference, compressed, windows).mean())


def encoder_pieces(windows: torch.Tensor, length: int = ENCODER_PIECE) -> torch.Tensor:
    """``(n, t)`` token windows cut into ``(n·⌊t/length⌋, length)`` pieces (a window's tail shorter than
    ``length`` is dropped); windows of at most ``length`` tokens are returned as they are."""
    n, t = windows.shape
    if t <= length:
        return windows
    return windows[:, :t // length * length].reshape(-1, length)


def select_plan(model: nn.Module, calib: torch.Tensor, names: list[list[str]], recipe: Recipe,
                grid: list[MethodSpec], knapsack: Plan, options, shapes, budget: float, device: torch.device,
                dtype: torch.dtype, batch_size: int, spill: str | Path | None = None,
                cache: dict | None = None) -> Plan:
    """The best of several plans for a mixed menu, each applied to a copy of the model and scored end to end
    (`window_scores` against the dense model on the last quarter of the calibration sequences, at most
    `SELECT_SEQUENCES`; the candidates are compressed on the other sequences, so the score is out of sample:
    on the sequences it was fitted to, a method that fits its calibration data closely looks better than it is):

    * the knapsack over every per-layer entry's options (per-layer errors on dense-propagated inputs);
    * every entry of the menu alone (`plan.menu_label`): a per-layer method uniform at the target ratio, a
      structured pruning spec (``flap``, ``ziplm``) pruning the whole model at the target ratio with its own
      widths — so the result is never scored worse than the best single entry: the per-layer errors do not see
      what a method recovers downstream (SparseGPT's sequential compensation, the averaging of pruning errors),
      and can rank a factorization ahead of pruning where the whole model says the opposite;
    * the knapsack again with each entry's errors multiplied by (its uniform plan's score) / (its uniform
      plan's summed per-layer errors): per-layer errors converted to each entry's measured end-to-end effect.

    `choose` keeps the best scored single entry unless a mixed plan beats it by more than the score's noise.
    Costs one compression per candidate before the chosen plan is compressed for good. ``cache`` (`compress`'s
    ``profile_cache``: same weights and calibration) keeps the single-entry candidates' scores, which do not
    depend on the rest of the menu. The plan returned records every candidate's score."""
    target = grid[0].target.value
    held = min(SELECT_SEQUENCES, len(calib) // SELECT_HELD_OUT)
    if held < 1:
        raise InputError(f"a mixed menu needs at least {SELECT_HELD_OUT} calibration sequences (got {len(calib)})",
                         "pass more calibration samples (--nsamples)")
    layered = [s for s in grid if not isinstance(s, StructuredSpec)]
    trial = _Trial(model, calib[:-held], calib[-held:], recipe, layered[0] if layered else None, device, dtype,
                   batch_size, spill, None if cache is None else cache.setdefault("select_plan", {}))
    candidates = {"knapsack": trial.score(knapsack)}
    for s in grid:
        if isinstance(s, StructuredSpec):
            candidates[f"{menu_label(s)} alone"] = trial.score(Plan({}, [], structured=s), s)
        else:
            candidates[f"uniform {menu_label(s)}"] = trial.score(
                _plan(model, names, specs={n: s for block in names for n in block}), s)
        log.info("mixed menu: %s scored %.6f", list(candidates)[-1], float(candidates[list(candidates)[-1]][1].mean()))
    alone = {menu_label(s): float(candidates[f"uniform {menu_label(s)}"][1].mean()) for s in layered}
    candidates["knapsack, calibrated"] = trial.score(_plan(model, names, rows=calibrated_rows(
        options, shapes, target, budget, alone)))
    singles = [label for label in candidates if label not in ("knapsack", "knapsack, calibrated")]
    best, margins = choose(candidates, singles)
    log.info("mixed menu: candidate scores %s; chosen: %s",
             {label: round(float(w.mean()), 6) for label, (_, w) in candidates.items()}, best)
    return dataclasses.replace(candidates[best][0], selection=[
        {"candidate": label, "score": float(w.mean()), "chosen": label == best,
         **({"vs_best_single": margins[label]} if label in margins else {})}
        for label, (_, w) in candidates.items()])


def calibrated_rows(options, shapes, target: float, budget: float, alone: dict[str, float]) -> list[Allocation]:
    """The knapsack with each entry's per-layer errors multiplied by (its uniform plan's score ``alone``) /
    (its summed per-layer errors at the target): per-layer errors in units of each entry's end-to-end effect.
    The rows keep the knapsack's unit in ``predicted_error``."""
    predicted = method_errors(options, target)
    scale = {label: score / predicted[label] if 0 < predicted.get(label, 0) and math.isfinite(score) else 1.0
             for label, score in alone.items()}
    rows = plan_knapsack(rescale(options, scale), shapes, target, budget)
    return [dataclasses.replace(a, predicted_error=a.predicted_error / scale[menu_label(a.spec)]) if a.spec else a
            for a in rows]


@dataclasses.dataclass
class _Trial:
    """Candidate plans of `select_plan`, each applied to a copy of ``model`` compressed on ``calib`` and scored on
    the held-out ``windows``. ``memo`` keeps the single-entry candidates' scores (``None``: nothing kept)."""
    model: nn.Module
    calib: torch.Tensor
    windows: torch.Tensor
    recipe: Recipe
    layered: MethodSpec | None  # a per-layer spec of the menu: the recipe a per-layer plan is compressed under
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    spill: str | Path | None
    memo: dict | None

    def score(self, plan: Plan, single: MethodSpec | None = None) -> tuple[Plan, torch.Tensor]:
        """``plan`` applied and scored per window; a uniform plan gets allocation rows from what was compressed
        (real bytes, measured errors). inf when a method cannot compress some layer. ``single``: the menu entry
        the plan applies alone (its score is memoized)."""
        key = (single, len(self.windows))
        if self.memo is not None and single is not None and key in self.memo:
            return self.memo[key]
        trial = copy.deepcopy(self.model)
        try:
            if plan.structured is not None:
                structured.compress_structured(trial, self.calib, dataclasses.replace(
                    self.recipe, methods=(plan.structured,), allocate=Allocate.UNIFORM), self.device, self.dtype,
                    self.batch_size)
            else:
                report = compress(trial, self.calib, Recipe(methods=(self.layered,)), self.device, self.dtype,
                                  self.batch_size, plan=plan, spill=self.spill)
        except InputError as e:
            log.info("mixed menu: a candidate plan does not apply (%s)", e)
            return plan, torch.full((1,), math.inf, dtype=torch.float64)
        if plan.allocation is None and plan.structured is None:
            plan = Plan(plan.specs, plan.sets, [
                Allocation(la.name, la.spec, float(la.module.weight_bytes(max(len(la.group), 1))), la.rel_error,
                           la.dense_shape, None) for la in report.layers])
        found = plan, window_scores(self.model, trial, self.windows)
        if self.memo is not None and single is not None:
            self.memo[key] = found
        return found


def choose(candidates: dict[str, tuple[Plan, torch.Tensor]], singles: list[str]) -> tuple[str, dict]:
    """The candidate kept: the best scored single entry (ties: the earlier), unless a mixed plan beats it by more
    than the noise of the score — its mean per-window difference to that single entry plus one standard error of
    that difference (paired over the same windows) is below 0; of several such plans the best scored (ties: the
    earlier). So a mixed plan replaces the best method alone only on evidence, and otherwise the result is that
    method's own compression. Also returns, per mixed plan, ``[mean difference, standard error]``."""
    means = {label: float(w.mean()) for label, (_, w) in candidates.items()}
    best = min(singles, key=lambda label: means[label]) if singles else min(means, key=means.get)
    margins, chosen = {}, best
    for label in (c for c in candidates if c not in singles):
        if not math.isfinite(means[label]) or not math.isfinite(means[best]):
            if means[label] < means[chosen]:
                chosen = label
            continue
        d = candidates[label][1] - candidates[best][1]  # (n,) paired over the held-out windows
        stderr = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.inf
        margins[label] = [float(d.mean()), stderr]
        if float(d.mean()) + stderr < 0 and means[label] < means[chosen]:
            chosen = label
    return chosen, margins


# --- compression ---------------------------------------------------------------------------------------
def tie_group(modules: list[CompressedLinear]) -> None:
    """The layers of one shared set (``module.group``) hold the very same ``D``: it is stored once."""
    for m in modules[1:]:
        m.share_dictionary(modules[0])


@torch.no_grad()
def _build_set(model, names: tuple[str, ...], plan: Plan, stats, device, dtype) -> list[tuple[str, CompressedLinear,
                                                                                           float]]:
    """One layer set's compressed modules and measured errors; the model is only read."""
    spec = plan.specs[names[0]]
    layers = [adapter.get_module(model, n) for n in names]
    weights = [adapter.linear_weight(m).detach().to(device, torch.float32) for m in layers]
    results = compress_group(spec, weights, [stats[n] for n in names], dtype)
    modules = []
    for layer, res in zip(layers, results):
        module = build_module(res, layer.bias, dtype).to(device)
        module.original, module.spec, module.info = adapter.original_kind(layer), spec, dict(res.info)
        module.group = names if len(names) > 1 else ()
        modules.append(module)
    if len(names) > 1:
        tie_group(modules)
    out = []
    for name, W, module in zip(names, weights, modules):
        err = relative_error(W, module.dense_weight(), stats[name])
        _check_finite(name, module, err, dtype)
        out.append((name, module, err))
    return out


def _install(model, built: list[tuple[str, CompressedLinear, float]], plan: Plan) -> list[LayerResult]:
    for name, module, _ in built:
        adapter.swap(model, name, module)
    return [LayerResult(name, module, err, plan.predicted.get(name)) for name, module, err in built]


def _compress_set(model, names: tuple[str, ...], plan: Plan, stats, device, dtype) -> list[LayerResult]:
    return _install(model, _build_set(model, names, plan, stats, device, dtype), plan)


def _compress_window(model, sets: list[tuple[str, ...]], plan: Plan, stats, device, dtype) -> list[LayerResult]:
    """Compress a window's layer sets, swapped in in order. One process: sets side by side on a CPU's threads
    (`device.map_layers`). Several: set ``j`` by rank ``j mod N``, then sent to the others (`_shared`), so that
    every process holds the whole compressed window."""
    if not dist.active():
        workers, cost = _side_by_side(device, {names: [_shape(model, n) for n in names] for names in sets})
        built = map_layers(lambda names: _build_set(model, names, plan, stats, device, dtype), sets, workers, cost)
        return [la for one in built for la in _install(model, one, plan)]
    own = {j: _compress_set(model, names, plan, stats, device, dtype) for j, names in enumerate(sets)
           if j % dist.size() == dist.rank()}
    return [la for j, names in enumerate(sets) for la in _shared(model, own.get(j), j % dist.size(), device)]


def _shared(model, layers: list[LayerResult] | None, owner: int, device) -> list[LayerResult]:
    """The layers rank ``owner`` compressed, on every rank: its modules rebuilt from their buffers and swapped in
    (a shared dictionary tied again)."""
    sent = dist.broadcast(None if layers is None else [
        (la.name, type(la.module).__name__, la.module.meta(), {b: t.cpu() for b, t in la.module.state_dict().items()},
         la.module.original, la.module.spec, la.module.info, la.module.group, la.rel_error, la.predicted_error)
        for la in layers], owner)
    if layers is not None:
        return layers
    out = []
    for name, cls, meta, state, original, spec, info, group, err, predicted in sent:
        module = MODULE_CLASSES[cls].empty(meta, {b: [list(t.shape), str(t.dtype).removeprefix("torch.")]
                                                  for b, t in state.items()})
        module.load_state_dict(state)
        module = module.to(device)
        module.original, module.spec, module.info, module.group = original, spec, info, group
        adapter.swap(model, name, module)
        out.append(LayerResult(name, module, err, predicted))
    if len(out) > 1 and out[0].group:
        tie_group([la.module for la in out])
    return out


def _check_finite(name: str, module: CompressedLinear, err: float, dtype: torch.dtype) -> None:
    """A compressed layer with inf/NaN (e.g. coefficients beyond float16's range) is an error, never saved."""
    bad = [b for b, t in module.named_buffers() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad or not math.isfinite(err):
        raise InputError(f"layer {name}: the compressed layer is not finite ({', '.join(bad) or 'its error'} has "
                         f"inf/NaN; values beyond the range of {str(dtype).removeprefix('torch.')}?)",
                         "store values as bf16 (recipe storage: bf16, --storage bf16) or float32, compress a bf16/float32 "
                         "copy of the checkpoint, or exclude the layer with an ignore pattern")


Progress = Callable[[int, int], None]
Checkpoint = Callable[[int, list[LayerResult], Plan], None]


def compress(model: nn.Module, calib: torch.Tensor, recipe: Recipe, device: torch.device, dtype: torch.dtype,
             batch_size: int = 8, progress: Progress | None = None, done: list[LayerResult] | None = None,
             start_block: int = 0, checkpoint: Checkpoint | None = None, profile_cache: dict | None = None,
             plan: Plan | None = None, source: BlockSource | None = None,
             spill: str | Path | None = None) -> CompressReport:
    """Compress ``model`` in place, block by block; ``dtype`` is the dense storage dtype budgets refer to.

    ``profile_cache``: a dict that keeps the knapsack's per-layer option tables between calls on the SAME
    weights and calibration data (they do not depend on the budget), e.g. one model at several ratios.

    Resuming: the first ``start_block`` blocks are already compressed (their modules swapped in, their
    records in ``done``) by a run that followed ``plan``; they are only run to rebuild the next block's
    inputs. ``source``: the blocks' weights are read block by block (`BlockSource`; a lazily loaded model).
    ``spill``: a folder that holds the calibration activations between blocks (`capture.Spilled`).
    ``checkpoint(blocks_done, window_layers, plan)`` is called after every window but the last, with the
    layers compressed in that window.
    """
    if isinstance(recipe.methods[0], StructuredSpec) and len(recipe.methods) == 1:  # heads and channels: own flow
        if source is not None:
            raise InputError("structured pruning chooses every block's widths after seeing them all",
                             "load the model in memory (no lazy loading) for flap / ziplm")
        return structured.compress_structured(model, calib, recipe, device, dtype, batch_size, progress)
    t0 = time.perf_counter()
    plan = plan or make_plan(model, calib, recipe, device, dtype, batch_size, profile_cache, source, spill)
    if plan.structured is not None:  # a mixed menu kept structured pruning over every per-layer plan
        pruned = structured.compress_structured(model, calib, dataclasses.replace(
            recipe, methods=(plan.structured,), allocate=Allocate.UNIFORM), device, dtype, batch_size, progress)
        return dataclasses.replace(pruned, seconds=time.perf_counter() - t0, plan=plan)
    prefix, blocks = adapter.find_blocks(model)
    names = [[n for n in plan.specs if n.startswith(adapter.block_prefix(prefix, i))] for i in range(len(blocks))]
    layers: list[LayerResult] = list(done or [])
    for win in walk(model, calib, names, device, batch_size, window_size(plan.specs.values()), start_block, source,
                    finished=True, spill=spill, rerun=True):
        new = _compress_window(model, [s for s in plan.sets if s[0] in win.stats], plan, win.stats, device, dtype)
        win.changed = win.changed or bool(new)
        layers += new
        if checkpoint and win.end < len(blocks):
            checkpoint(win.end, new, plan)
        if progress:
            progress(win.end, len(blocks))
    return CompressReport(layers, time.perf_counter() - t0, plan)
