"""The block walk: every pass over a model's blocks (profiling, compression, resuming, structured pruning).

`walk` captures each block's own call arguments once (`capture_inputs`), then yields the blocks in windows with
the statistics of their targeted linears recorded on the window's inputs, and after the caller's work
propagates the window's outputs (the *compressed* outputs when the caller swapped layers in) to the next
window. A window is one block unless a method shares factors across blocks (CoSpaDi's ``group_size``). Memory
beyond the model: the inputs of the current window (one tensor per calibration batch) plus the statistics of
its linears. Also the records a compression returns (`LayerResult`, `CompressReport`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from . import dist, model as adapter
from .plan import Allocation, Plan
from .capture import LinearStats, activation_store, record
from .config import MethodSpec
from .modules import CompressedLinear, dense_cache


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
                   device: torch.device, store: Callable[[], list] = list) -> BlockInputs:
    """Block 0's hidden states and every block's own keyword arguments, per calibration batch: the model runs
    with stand-ins for its blocks (`model.stand_ins`), so only the embeddings are computed."""
    inputs = BlockInputs(store(), [[] for _ in blocks])
    memo: dict = {}

    def seen(i: int, hidden: torch.Tensor, kwargs: dict):
        if i == 0:
            inputs.hidden.append(hidden.to(device))
        inputs.kwargs[i].append(_to(kwargs, device, memo))
        if i == len(blocks) - 1:
            raise _Stop  # the final norm and head are not needed

    starts = range(0, len(calib), batch_size)
    dist.check_batches(len(starts))
    with adapter.stand_ins(blocks, seen):
        for start in (starts[b] for b in dist.mine(len(starts))):  # one process: every batch
            ids = calib[start:start + batch_size].to(_device_of(model))
            memo.clear()
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Stop:
                pass
    return inputs


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], out: list | None = None,
              keep: bool = True) -> list[torch.Tensor]:
    """The block's outputs per batch, appended to ``out`` (a new list by default; `capture.Spilled` keeps them
    on disk). Compressed layers rebuild their weight once for all batches. ``keep=False``: none are kept, and a
    call a hook ends early (`_Stop`, `_stop_when_recorded`) is no error."""
    out = [] if out is None else out
    with dense_cache(block):
        for h, kw in zip(hidden, kwargs):
            try:
                y = block(h, **kw)
            except _Stop:
                if keep:
                    raise
                continue
            if keep:
                out.append(adapter.block_output(y))
    return out


@contextlib.contextmanager
def _stop_when_recorded(block: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Inside, a call of ``block`` ends (`_Stop`) as soon as every one of ``modules`` has been called, when the
    first call showed each of them called exactly once: the rest of the block (its last linear, the residual)
    would only compute outputs nobody reads. Models whose first call leaves a module out or calls one twice
    (routed experts, shared layers) run whole. Register after `capture.record`'s hooks: they record first."""
    calls: dict[int, int] = {}
    state = {"first": True, "stops": False}

    def start(mod, args, kwargs=None):  # a new call of the block
        if state["first"] and calls:
            state["first"] = False
            state["stops"] = len(calls) == len(modules) and all(n == 1 for n in calls.values())
        calls.clear()

    def seen(mod, args):
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        if state["stops"] and len(calls) == len(modules):
            raise _Stop

    handles = [block.register_forward_pre_hook(start)] + [m.register_forward_pre_hook(seen) for m in modules.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def record_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], modules: dict[str, nn.Module],
                 stats: dict[str, LinearStats], batches: int, out: list | None = None, outputs: bool = True
                 ) -> list[torch.Tensor]:
    """`run_block` recording the inputs of ``modules`` into ``stats``. ``outputs=False``: the caller will not read
    the block's outputs (it runs the block again after swapping layers in), so none are kept and each batch but
    the first stops once the last of ``modules`` has its input (`_stop_when_recorded`). Several processes: batch
    by batch, each round's statistics merged across them in one process's batch order (`dist.merge_step`)."""
    stop = contextlib.nullcontext() if outputs or not modules else _stop_when_recorded(block, modules)
    if not dist.active():
        with record(modules, stats), stop:
            return run_block(block, hidden, kwargs, out, keep=outputs)
    outs = [] if out is None else out
    pending: dict[str, LinearStats] = {}  # this round's statistics (record's hooks fill it; emptied every round)
    with dense_cache(block), record(modules, pending), stop:  # record's hooks before the stop's: they must see the
        # last input before the stop ends the call; weights rebuilt once for all rounds (run_block's cache nests)
        for step in range(dist.steps(batches)):
            if step < len(hidden):
                run_block(block, hidden[step:step + 1], kwargs[step:step + 1], outs, keep=outputs)
            dist.merge_step(stats, pending, list(modules), step, batches)  # reads it now, keeps no reference
            pending.clear()
    return outs


@dataclass
class Window:
    """Consecutive blocks ``first..end-1``, the qualified names of their targeted linears, and the statistics
    of those linears on the window's inputs (block by block, each on the previous one's outputs)."""
    first: int
    end: int
    names: list[str]
    stats: dict[str, LinearStats]
    changed: bool = False  # set by the caller when it swapped layers: the outputs are then computed again


class BlockSource(Protocol):
    """Where the blocks' weights come from when they are not all in memory (`lazy.LazyBlocks`)."""
    def load(self, index: int) -> None: ...
    def release(self, indices: list[int], finished: bool) -> None: ...


def walk(model: nn.Module, calib: torch.Tensor, names: list[list[str]], device: torch.device, batch_size: int,
         window: int = 1, start: int = 0, source: BlockSource | None = None, finished: bool = False,
         spill: str | Path | None = None, rerun: bool = False) -> Iterator[Window]:
    """The one block walk: windows of ``window`` blocks from block ``start`` on (the blocks before it are only
    run, to rebuild the inputs: a resumed run); ``names[i]``: the targeted linears of block ``i``.

    ``source``: the blocks' weights are read when their window starts and released when it ends (``finished``:
    the blocks are final, as in the compress walk: the source writes them before dropping them). ``spill``: a
    folder where the calibration activations are kept between blocks instead of memory (`capture.Spilled`).
    ``rerun``: the caller swaps layers into every window that has targeted linears (the compress walk), so such a
    window's recording pass keeps no outputs of its last block and stops short (`record_block`); the window runs
    again to give the next one its inputs. The last window's outputs are never kept."""
    _, blocks = adapter.find_blocks(model)
    store = activation_store(spill)
    inputs = capture_inputs(model, blocks, calib, batch_size, device, store)
    batches = -(-len(calib) // batch_size)
    hidden = inputs.hidden

    def run(idx: list[int], x: list[torch.Tensor]) -> list[torch.Tensor]:
        for i in idx:
            x = run_block(blocks[i], x, inputs.kwargs[i], store())
        return x

    for first in range(0, len(blocks), window):
        idx = list(range(first, min(first + window, len(blocks))))
        for i in idx if source else ():
            source.load(i)
            if first >= start:  # to be compressed now (a resumed run's earlier blocks are compressed already)
                adapter.check_finite(model, names[i])
        homes = [_device_of(blocks[i]) for i in idx]
        for i in idx:
            blocks[i].to(device)
        if first < start:  # compressed already (a resumed run): only rebuild the next window's inputs
            hidden = run(idx, hidden)
        else:
            win, x = Window(first, idx[-1] + 1, [n for i in idx for n in names[i]], {}), hidden
            kept = win.end < len(blocks) and not (rerun and win.names)  # the last block's outputs are read
            for i in idx:
                keep = kept or i != idx[-1]
                x = record_block(blocks[i], x, inputs.kwargs[i], {n: adapter.get_module(model, n) for n in names[i]},
                                 win.stats, batches, store() if keep else None, outputs=keep)
            yield win
            hidden = run(idx, hidden) if (win.changed or not kept) and win.end < len(blocks) else x
        for i, home in zip(idx, homes):
            blocks[i].to(home)
        if source:
            source.release(idx, finished)
