"""Structured pruning's flow, the structured half of `pipeline` (it knows blocks, methods and swaps too).

`compress_structured`: find every block's prunable parts (`model.block_parts`: the attention as KV-head groups,
the MLP as channels; a part is pruned only if all its linears are targeted), one pass over the *dense* model
records the statistics of each part's output linear (o_proj / down_proj; FLAP collects them this way, and so
does DarwinLM's ZipLM database), the method scores the units and the global byte budget decides how many each
part keeps (`methods.structured`), then every linear of a part is replaced by a plain, narrower ``nn.Linear``
(marked `modules.Narrowed`, which the manifest records). The budget: the fraction ``--ratio`` of the parts'
dense bytes is removed, a bias the method adds counted as stored bytes.
"""
from __future__ import annotations

import fnmatch
import time

import torch
from torch import nn

from . import formats
from . import model as adapter
from .blocks import CompressReport, walk
from .plan import Plan
from .config import FlapSpec, Recipe, Structure, StructuredSpec, ZipLMSpec
from .errors import InputError
from .methods import structured as st
from .modules import Narrowed, mark_narrowed


def parts_of(model: nn.Module, recipe: Recipe) -> list[list[adapter.Part]]:
    """Each block's prunable parts whose linears all match the recipe's targets and none its ignore patterns."""
    prefix, blocks = adapter.find_blocks(model)

    def targeted(name: str) -> bool:
        return (any(fnmatch.fnmatch(name, t) for t in recipe.targets)
                and not any(fnmatch.fnmatch(name, i) for i in recipe.ignore))

    out = [[p for p in adapter.block_parts(model, b, adapter.block_prefix(prefix, i))
            if all(targeted(n) for n in (*p.inputs, p.output))] for i, b in enumerate(blocks)]
    if not any(out):
        raise InputError(f"{type(model).__name__}: no attention heads or MLP channels to prune structurally among "
                         f"targets={list(recipe.targets)} ignore={list(recipe.ignore)}",
                         "structured pruning needs separate q/k/v/o and MLP nn.Linear projections (not GPT-2's fused "
                         "Conv1D); check the targets, or use an unstructured method")
    return out


def part_cost(model: nn.Module, part: adapter.Part, dtype: torch.dtype, adds_bias: bool) -> st.PartCost:
    """Bytes per kept unit of ``part`` over all its linears, and the bias the method adds to its output."""
    b = formats.dtype_bytes(dtype)
    out = adapter.get_module(model, part.output)
    unit = out.out_features * part.cols.shape[1] * b
    unit += sum(rows.shape[1] * adapter.get_module(model, n).in_features * b for n, rows in part.rows.items())
    fixed = out.out_features * b if adds_bias and out.bias is None else 0
    return st.PartCost(part.units, unit, fixed)


def dense_bytes(model: nn.Module, parts: list[adapter.Part], dtype: torch.dtype) -> int:
    layers = [adapter.get_module(model, n) for p in parts for n in (*p.inputs, p.output)]
    return sum(formats.dense_bytes(m.out_features, m.in_features, dtype) for m in layers)


@torch.no_grad()
def compress_structured(model: nn.Module, calib: torch.Tensor, recipe: Recipe, device: torch.device,
                        dtype: torch.dtype, batch_size: int = 8, progress=None):
    """Prune ``model`` in place with the recipe's structured spec; a `blocks.CompressReport` (no per-layer
    compressed modules: the narrowed layers carry their `Narrowed` records)."""
    t0 = time.perf_counter()
    spec = recipe.methods[0]
    assert isinstance(spec, StructuredSpec)
    by_block = parts_of(model, recipe)
    parts = [p for ps in by_block for p in ps]
    costs = [part_cost(model, p, dtype, isinstance(spec, FlapSpec)) for p in parts]
    budget = (1 - spec.target.value) * dense_bytes(model, parts, dtype)
    measured = {}
    for win in walk(model, calib, [[p.output for p in ps] for ps in by_block], device, batch_size):
        for p in (p for p in parts if p.output in win.stats):
            measured[p.output] = _measure(spec, adapter.get_module(model, p.output), win.stats[p.output], p, device)
        if progress:
            progress(win.end, len(by_block))
    keep = _choose(spec, parts, costs, measured, budget)
    for p, k in zip(parts, keep):
        _shrink(model, spec, p, k, measured[p.output], device)
    return CompressReport([], time.perf_counter() - t0, Plan({}, [], None))


def _measure(spec: StructuredSpec, layer: nn.Linear, stats, part: adapter.Part, device) -> dict:
    """What the selection and the shrinking need of one part: FLAP's unit scores and input mean; ZipLM's
    damped Hessian and, for the knapsack, its nested levels."""
    W = layer.weight.detach().to(device, torch.float32)  # (out, in)
    cols = part.cols.to(device)
    if isinstance(spec, FlapSpec):
        return {"scores": st.unit_scores(st.fluctuation(W, stats), cols).cpu(), "mean": stats.mean.to(device)}
    H = st.damped_hessian(stats, spec.percdamp, device)
    if spec.structure is Structure.UNIFORM:
        return {"H": H.cpu()}
    levels, order = st.ziplm_levels(W, H, cols)
    return {"H": H.cpu(), "levels": levels, "order": order}


def _choose(spec: StructuredSpec, parts, costs, measured, budget: float) -> list:
    """Per part: a bool keep-mask over its units (FLAP) or the number of units to keep (ZipLM)."""
    if spec.structure is Structure.UNIFORM:
        counts = st.uniform_counts(costs, [p.kind for p in parts], budget)
        if isinstance(spec, ZipLMSpec):
            return [counts[p.kind] for p in parts]
        return [_topk(measured[p.output]["scores"], counts[p.kind]) for p in parts]
    if isinstance(spec, ZipLMSpec):
        return st.knapsack_keep([measured[p.output]["levels"] for p in parts], costs, budget)
    return st.adaptive_keep([measured[p.output]["scores"] for p in parts], costs, budget)


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.topk(k).indices] = True
    return keep


def _shrink(model: nn.Module, spec: StructuredSpec, part: adapter.Part, keep, measured: dict, device) -> None:
    """Replace the part's linears by narrower ones keeping the units in ``keep`` (a mask, or a count for ZipLM,
    whose OBS run then decides which and updates the output weight)."""
    out = adapter.get_module(model, part.output)
    W = out.weight.detach().to(device, torch.float32)  # (out, in)
    info = {"kind": part.kind, "units": part.units}
    bias = None if out.bias is None else out.bias.detach().to(device, torch.float32)
    if isinstance(spec, ZipLMSpec):
        H, n_remove = measured["H"].to(device), part.units - keep
        order = measured["order"] if "order" in measured else st.obs_remove(W, H, part.cols.to(device), n_remove)[1]
        keep = torch.ones(part.units, dtype=torch.bool)
        keep[order[:n_remove]] = False
        W = st.obs_update(W, H, part.cols[~keep].reshape(-1).to(device))  # the greedy's weights, in one solve
    else:
        removed = part.cols[~keep].reshape(-1).to(device)
        comp = st.flap_bias(W, measured["mean"], removed)  # (out,)
        bias = comp if bias is None else bias + comp
    info["kept_units"] = int(keep.sum())
    for name, rows in part.rows.items():
        layer = adapter.get_module(model, name)
        kept_rows = rows[keep].reshape(-1)
        new = adapter.narrow_linear(layer, rows=kept_rows.to(layer.weight.device))
        adapter.swap(model, name, mark_narrowed(new, Narrowed((layer.out_features, layer.in_features),
                                                              kept_rows.tolist(), None, False, spec, dict(info))))
    cols = part.cols[keep].reshape(-1)
    new = adapter.narrow_linear(out, cols=cols.to(out.weight.device), weight=W.to(out.weight.device),
                                bias=None if bias is None else bias.to(out.weight.device))
    record = Narrowed((out.out_features, out.in_features), None, cols.tolist(), out.bias is None and bias is not None,
                      spec, info)
    adapter.swap(model, part.output, mark_narrowed(new, record))
