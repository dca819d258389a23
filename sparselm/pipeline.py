"""compress(): capture -> plan (profile -> allocate) -> per window of blocks: record, compress, swap, propagate.

The only module that knows blocks, methods and swaps together. Every pass over the model is the one block
walk, `walk`: it captures each block's own call arguments once (`capture_inputs`), then yields the blocks in
windows with the statistics of their targeted linears recorded on the window's inputs, and after the
caller's work propagates the window's outputs (the *compressed* outputs when the caller swapped layers in)
to the next window. Profiling for the knapsack, compression and resuming are the same walk. A window is one
block unless a method shares factors across blocks (CoSpaDi's ``group_size``). Memory beyond the model: the
inputs of the current window (one tensor per calibration batch) plus the statistics of its linears.
"""
from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import model as adapter
from .budget import Allocation, Plan, plan_knapsack
from .capture import LinearStats, record
from .config import Allocate, CoSpaDiSpec, MethodSpec, Ratio, Recipe
from .errors import InputError
from .methods import Factored, Pruned, Result, SparseDict, compress_group
from .modules import CompressedLinear, LowRankLinear, SparseDictLinear, SparseLinear, dense_cache
from .profile import profile_layer, relative_error

FORMATS: dict[type, type[CompressedLinear]] = {Pruned: SparseLinear, Factored: LowRankLinear,
                                               SparseDict: SparseDictLinear}  # method result -> its format


def build_module(result: Result, bias: torch.Tensor | None, dtype: torch.dtype) -> CompressedLinear:
    """The compressed layer holding a method's result (its format builds itself from it)."""
    return FORMATS[type(result)].from_result(result, bias, dtype)


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """What the blocks are called with, per calibration batch: block 0's hidden states, and every block's
    own keyword arguments (``kwargs[block][batch]``: hybrid models give sliding/full-attention layers other
    masks and rotary embeddings)."""
    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]


@dataclass
class LayerResult:
    """One compressed layer: the module (which carries its spec, info and group) and its measured error."""
    name: str
    module: CompressedLinear
    rel_error: float            # ‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖² on this layer's calibration inputs
    predicted_error: float | None = None

    @property
    def spec(self) -> MethodSpec:
        return self.module.spec

    @property
    def info(self) -> dict:
        return self.module.info

    @property
    def group(self) -> tuple[str, ...]:
        """The layers sharing this one's dictionary (itself included); () when it owns it alone."""
        return self.module.group

    @property
    def dense_shape(self) -> tuple[int, int]:
        return self.module.out_features, self.module.in_features


@dataclass
class CompressReport:
    layers: list[LayerResult]
    seconds: float
    plan: Plan

    @property
    def allocation(self) -> list[Allocation] | None:
        return self.plan.allocation


def _to(obj, device, memo: dict):
    """``obj`` on ``device``; a tensor seen before in this batch (``memo``, by identity) is moved once."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the source is kept so that its id stays unique
        return memo[id(obj)][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int,
                   device: torch.device) -> BlockInputs:
    """Block 0's hidden states and every block's own keyword arguments, per calibration batch: the model runs
    with stand-ins for its blocks (`model.stand_ins`), so only the embeddings are computed."""
    inputs = BlockInputs([], [[] for _ in blocks])
    memo: dict = {}

    def seen(i: int, hidden: torch.Tensor, kwargs: dict):
        if i == 0:
            inputs.hidden.append(hidden.to(device))
        inputs.kwargs[i].append(_to(kwargs, device, memo))
        if i == len(blocks) - 1:
            raise _Stop  # the final norm and head are not needed

    with adapter.stand_ins(blocks, seen):
        for start in range(0, len(calib), batch_size):
            ids = calib[start:start + batch_size].to(_device_of(model))
            memo.clear()
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Stop:
                pass
    return inputs


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The block's outputs per batch (compressed layers rebuild their weight once for all batches)."""
    with dense_cache(block):
        return [adapter.block_output(block(h, **kw)) for h, kw in zip(hidden, kwargs)]


@dataclass
class Window:
    """Consecutive blocks ``first..end-1``, the qualified names of their targeted linears, and the statistics
    of those linears on the window's inputs (block by block, each on the previous one's outputs)."""
    first: int
    end: int
    names: list[str]
    stats: dict[str, LinearStats]
    changed: bool = False  # set by the caller when it swapped layers: the outputs are then computed again


def walk(model: nn.Module, calib: torch.Tensor, names: list[list[str]], device: torch.device, batch_size: int,
         window: int = 1, start: int = 0) -> Iterator[Window]:
    """The one block walk: windows of ``window`` blocks from block ``start`` on (the blocks before it are only
    run, to rebuild the inputs: a resumed run); ``names[i]``: the targeted linears of block ``i``."""
    _, blocks = adapter.find_blocks(model)
    inputs = capture_inputs(model, blocks, calib, batch_size, device)
    hidden = inputs.hidden

    def run(idx: list[int], x: list[torch.Tensor]) -> list[torch.Tensor]:
        for i in idx:
            x = run_block(blocks[i], x, inputs.kwargs[i])
        return x

    for first in range(0, len(blocks), window):
        idx = list(range(first, min(first + window, len(blocks))))
        homes = [_device_of(blocks[i]) for i in idx]
        for i in idx:
            blocks[i].to(device)
        if first < start:  # compressed already (a resumed run): only rebuild the next window's inputs
            hidden = run(idx, hidden)
        else:
            win, x = Window(first, idx[-1] + 1, [n for i in idx for n in names[i]], {}), hidden
            for i in idx:
                with record({n: adapter.get_module(model, n) for n in names[i]}, win.stats):
                    x = run_block(blocks[i], x, inputs.kwargs[i])
            yield win
            hidden = run(idx, hidden) if win.changed and win.end < len(blocks) else x
        for i, home in zip(idx, homes):
            blocks[i].to(home)


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
                    device: torch.device, dtype: torch.dtype, batch_size: int, cache: dict | None):
    """Every targeted layer's knapsack options, on dense-propagated inputs; and the dense shapes."""
    options, shapes = {}, {}
    for win in walk(model, calib, names, device, batch_size):
        for name in win.names:
            W = adapter.linear_weight(adapter.get_module(model, name)).detach().to(device, torch.float32)
            options[name] = profile_layer(W, win.stats[name], specs, dtype=dtype, cache=cache, key=name)
            shapes[name] = tuple(W.shape)
    return options, shapes


def make_plan(model: nn.Module, calib: torch.Tensor, recipe: Recipe, device: torch.device, dtype: torch.dtype,
              batch_size: int = 8, cache: dict | None = None) -> Plan:
    """Uniform: every targeted layer gets the recipe's spec. Knapsack: profile every targeted layer
    (`profile.profile_layer`; ``cache``, see `compress`) and let `budget.plan_knapsack` choose."""
    names = targets(model, recipe)
    adapter.check_finite(model, [n for block in names for n in block])
    rows = None
    if recipe.allocate is Allocate.KNAPSACK:
        target = recipe.methods[0].target
        if not isinstance(target, Ratio) or any(s.target != target for s in recipe.methods):
            raise InputError("knapsack allocation needs one --ratio budget shared by all methods",
                             "pass --ratio R (not --sparsity/--pattern) with --allocate knapsack")
        grid = [s.with_target(target) for s in recipe.methods]
        options, shapes = profile_options(model, calib, names, grid, device, dtype, batch_size, cache)
        dense = sum(o.size for opts in options.values() for o in opts if o.payload is None)
        rows = plan_knapsack(options, shapes, target.value, (1 - target.value) * dense)
        specs = {a.layer: a.spec for a in rows if not a.kept_dense}
    else:
        specs = {n: recipe.methods[0] for block in names for n in block}
    prefix, _ = adapter.find_blocks(model)
    return Plan(specs, share_sets(specs, names, prefix, window_size(specs.values())), rows)


# --- compression ---------------------------------------------------------------------------------------
def tie_group(modules: list[CompressedLinear]) -> None:
    """The layers of one shared set (``module.group``) hold the very same ``D``: it is stored once."""
    for m in modules[1:]:
        m.D = modules[0].D


@torch.no_grad()
def _compress_set(model, names: tuple[str, ...], plan: Plan, stats, device, dtype) -> list[LayerResult]:
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
        adapter.swap(model, name, module)
        out.append(LayerResult(name, module, err, plan.predicted.get(name)))
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
             plan: Plan | None = None) -> CompressReport:
    """Compress ``model`` in place, block by block; ``dtype`` is the dense storage dtype budgets refer to.

    ``profile_cache``: a dict that keeps the knapsack's per-layer option tables between calls on the SAME
    weights and calibration data (they do not depend on the budget), e.g. one model at several ratios.

    Resuming: the first ``start_block`` blocks are already compressed (their modules swapped in, their
    records in ``done``) by a run that followed ``plan``; they are only run to rebuild the next block's
    inputs. ``checkpoint(blocks_done, layers, plan)`` is called after every window but the last.
    """
    t0 = time.perf_counter()
    plan = plan or make_plan(model, calib, recipe, device, dtype, batch_size, profile_cache)
    prefix, blocks = adapter.find_blocks(model)
    names = [[n for n in plan.specs if n.startswith(adapter.block_prefix(prefix, i))] for i in range(len(blocks))]
    layers: list[LayerResult] = list(done or [])
    for win in walk(model, calib, names, device, batch_size, window_size(plan.specs.values()), start_block):
        for group in (s for s in plan.sets if s[0] in win.stats):
            layers += _compress_set(model, group, plan, win.stats, device, dtype)
            win.changed = True
        if checkpoint and win.end < len(blocks):
            checkpoint(win.end, layers, plan)
        if progress:
            progress(win.end, len(blocks))
    return CompressReport(layers, time.perf_counter() - t0, plan)
