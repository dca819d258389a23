"""The one block walk feeds every block exactly what the model's own forward gives it: its hidden states
and its own keyword arguments (hybrid models give sliding- and full-attention layers other masks and rotary
embeddings), on every architecture of the matrix in test_architectures."""
from __future__ import annotations

import pytest
import torch

from sparselm import model as adapter
from sparselm import blocks as blocks_mod
from sparselm.capture import LinearStats

from .conftest import VOCAB
from .test_architectures import ARCHS, tiny

CPU = torch.device("cpu")
HYBRID = ("gemma2", "gemma3_text")  # sliding-window and full-attention layers: other arguments per block


def _calls(blocks):
    """Record (hidden, kwargs) of every real call of every block, per block."""
    seen = [[] for _ in blocks]
    handles = [b.register_forward_pre_hook(lambda m, a, kw, i=i: seen[i].append(adapter.block_call(a, kw)),
                                           with_kwargs=True) for i, b in enumerate(blocks)]
    return seen, handles


def _same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=where)
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, sorted(a), sorted(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_walk_gives_every_block_its_own_inputs(arch):
    model = tiny(arch)
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))
    _, blocks = adapter.find_blocks(model)
    seen, handles = _calls(blocks)
    try:
        with torch.no_grad():
            for b in range(0, 4, 2):  # the walk's batches
                model(input_ids=ids[b:b + 2], attention_mask=torch.ones_like(ids[b:b + 2]), use_cache=False)
        want = [list(calls) for calls in seen]
        for calls in seen:
            calls.clear()
        for _ in blocks_mod.walk(model, ids, [[] for _ in blocks], CPU, batch_size=2):
            pass  # a no-op compression: nothing swapped
    finally:
        for h in handles:
            h.remove()
    assert [len(c) for c in seen] == [len(w) for w in want] == [2] * len(blocks)
    for i, (got, ref) in enumerate(zip(seen, want)):
        _same(ref, got, f"{arch} block {i}")
    if arch in HYBRID:  # the check has teeth: block 0's arguments replayed for block 1 would fail it
        with pytest.raises(AssertionError):
            _same(want[0][0][1], want[1][0][1], "block 0 vs block 1 arguments")


def test_capture_holds_back_block_hooks_and_restores_forward():
    model = tiny("gemma2")
    _, blocks = adapter.find_blocks(model)
    calls = []
    blocks[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    inputs = blocks_mod.capture_inputs(model, blocks, torch.randint(0, VOCAB, (2, 16)), 2, CPU)
    assert not calls and "forward" not in blocks[0].__dict__ and len(inputs.kwargs) == 2
    assert inputs.kwargs[0][0]["attention_mask"] is not inputs.kwargs[1][0]["attention_mask"]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_recording_pass_that_keeps_no_outputs_stops_short_with_the_same_statistics(arch):
    """``rerun=True`` (the compress walk): every batch but the first stops once the block's last linear has its
    input, the window runs again for the next one's inputs, and the statistics are those of whole runs (the last
    window never keeps its outputs, rerun or not). Routed experts (mixtral: modules left out of the first call)
    run whole."""
    model = tiny(arch)
    batches = 3
    ids = torch.randint(0, VOCAB, (2 * batches, 24), generator=torch.Generator().manual_seed(5))
    prefix, blocks = adapter.find_blocks(model)
    names = [list(adapter.linears(b, adapter.block_prefix(prefix, i))) for i, b in enumerate(blocks)]
    got, calls = {}, {}
    for rerun in (False, True):
        calls[rerun] = count = {}
        handles = [adapter.get_module(model, n).register_forward_hook(
            lambda m, a, o, n=n: count.__setitem__(n, count.get(n, 0) + 1)) for ns in names for n in ns]
        try:
            got[rerun] = {n: s for win in blocks_mod.walk(model, ids, names, CPU, batch_size=2, rerun=rerun)
                          for n, s in win.stats.items()}
        finally:
            for h in handles:
                h.remove()
    assert got[False].keys() == got[True].keys()
    for n in got[False]:
        torch.testing.assert_close(got[True][n].gram, got[False][n].gram, rtol=0, atol=0)
        assert got[True][n].count == got[False][n].count
    for i, ns in enumerate(names):
        last = i == len(blocks) - 1
        fewest = min(calls[True].get(n, 0) for n in ns)
        # the block's last linear: the first batch only, then the rerun's batches (mixtral's experts are fused
        # modules here, not linears: its blocks stop after o_proj)
        assert fewest == 1 + (0 if last else batches), (i, calls[True])
        assert max(calls[True][n] for n in ns) == (1 if last else 2) * batches


class _Toy(torch.nn.Module):
    """Two linears; ``twice``: the second is called twice per call; ``skip``: calls whose input sums below 0 skip it."""
    def __init__(self, twice=False, skip=False):
        super().__init__()
        self.a, self.b, self.twice, self.skip = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), twice, skip

    def forward(self, x):
        h = self.a(x)
        if self.skip and float(x.sum()) < 0:
            return h
        h = self.b(h)
        return self.b(h) if self.twice else h


@pytest.mark.parametrize("kind", ["plain", "twice", "skip"])
def test_stopping_short_only_when_the_first_call_saw_each_linear_once(kind):
    """A linear called twice, or left out of the first call (routed experts), turns the stop off: the second
    call's inputs would be missed. Statistics equal those of whole runs either way."""
    block = _Toy(twice=kind == "twice", skip=kind == "skip")
    xs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    if kind == "skip":
        xs[0] = -xs[0].abs()  # the first call leaves b out
    modules = {"a": block.a, "b": block.b}
    whole, short = {}, {}
    blocks_mod.record_block(block, xs, [{}] * 4, modules, whole, 4)
    ran = []
    block.b.register_forward_hook(lambda m, a, o: ran.append(1))
    assert blocks_mod.record_block(block, xs, [{}] * 4, modules, short, 4, outputs=False) == []
    for n in whole:
        torch.testing.assert_close(short[n].gram, whole[n].gram, rtol=0, atol=0)
    stops = kind == "plain"
    assert len(ran) == (1 if stops else sum(2 if kind == "twice" else (float(x.sum()) >= 0) for x in xs))


def test_the_multi_process_recording_pass_stops_short_too(monkeypatch):
    """With several processes (`dist.active`) the batches go round by round, each round's statistics merged
    (here a stand-in merge for one rank): ``outputs=False`` stops every batch but the first as one process does,
    with the same statistics; with outputs, every batch's output is kept."""
    block = _Toy()
    xs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    modules = {"a": block.a, "b": block.b}
    whole = {}
    blocks_mod.record_block(block, xs, [{}] * 4, modules, whole, 4)  # one process

    def merge(stats, pending, names, step, batches):
        for n in names:
            stats.setdefault(n, LinearStats.empty(4))
            stats[n].gram += pending[n].gram
            stats[n].count += pending[n].count
    monkeypatch.setattr(blocks_mod.dist, "active", lambda: True)
    monkeypatch.setattr(blocks_mod.dist, "steps", lambda batches: batches)
    monkeypatch.setattr(blocks_mod.dist, "merge_step", merge)
    ran = []
    block.b.register_forward_hook(lambda m, a, o: ran.append(1))
    short = {}
    assert blocks_mod.record_block(block, xs, [{}] * 4, modules, short, 4, outputs=False) == []
    assert len(ran) == 1
    for n in whole:
        torch.testing.assert_close(short[n].gram, whole[n].gram, rtol=0, atol=0)
        assert short[n].count == whole[n].count
    kept = blocks_mod.record_block(block, xs, [{}] * 4, modules, {}, 4)
    assert len(ran) == 5 and len(kept) == 4
    torch.testing.assert_close(kept[2], block.b(block.a(xs[2])))
