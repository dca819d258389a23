"""The one block walk feeds every block exactly what the model's own forward gives it: its hidden states
and its own keyword arguments (hybrid models give sliding- and full-attention layers other masks and rotary
embeddings), on every architecture of the matrix in test_architectures."""
from __future__ import annotations

import pytest
import torch

from sparselm import model as adapter
from sparselm import blocks as blocks_mod

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
