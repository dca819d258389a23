"""One size formula per format: what a method's result promises, what the built layer counts, and what its
buffers really hold (what `io.save` writes) are the same number, for every format and value storage."""
from __future__ import annotations

import pytest
import torch

from sparselm import formats
from sparselm.config import CoefStorage, Pattern, Storage
from sparselm.methods import Factored, Pruned, SparseDict
from sparselm.modules import LowRankLinear, SparseDictLinear, SparseLinear
from sparselm.pipeline import build_module


def written(module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers() if b is not module.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", [None, Pattern(2, 4), Pattern(3, 8)])
def test_sparse_linear_counts_its_buffers(dtype, pattern):
    W = torch.randn(12, 40)
    if pattern is None:
        mask = torch.rand(12, 40) < 0.37
    else:
        idx = torch.rand(12, 40 // pattern.m, pattern.m).argsort(-1)[..., :pattern.n]
        mask = torch.zeros(12, 40 // pattern.m, pattern.m, dtype=torch.bool).scatter_(2, idx, True).view(12, 40)
    res = Pruned(W * mask, mask, pattern)
    module = build_module(res, torch.randn(12), dtype)
    assert isinstance(module, SparseLinear) and module.nnz == int(mask.sum())
    assert written(module) == module.weight_bytes() == res.stored_bytes(dtype)
    assert module.stored_bytes() == written(module) + 12 * torch.finfo(dtype).bits // 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_counts_its_buffers(dtype):
    res = Factored(torch.randn(20, 5), torch.randn(5, 9))
    module = build_module(res, None, dtype)
    assert isinstance(module, LowRankLinear)
    assert written(module) == module.weight_bytes() == res.stored_bytes(dtype) == formats.lowrank_bytes(20, 9, 5, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", list(CoefStorage))
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_sparse_dict_counts_its_buffers_without_unpacking(dtype, storage, density):
    D, S = torch.randn(16, 7), torch.randn(7, 11)
    mask = torch.rand(7, 11) < density
    mask[:, -1] = False  # the last output channel has no coefficient: int8 still stores its scale
    res = SparseDict(D, S * mask, mask, storage)
    module = build_module(res, None, dtype)
    assert isinstance(module, SparseDictLinear) and module.nnz == int(mask.sum())
    assert written(module) == module.weight_bytes() == res.stored_bytes(dtype)
    if storage is CoefStorage.INT8:
        assert module.scale.shape == (11,)  # one scale per output channel, as documented


def test_dictionary_bytes_by_hand():
    """``D`` (16, 5): ``Dᵀ`` has 5 rows (atoms) of 16 inputs; int8/int4 add an fp16 scale (+ a 4-bit zero) per
    atom, or per group of an atom's inputs."""
    assert formats.dictionary_bytes(16, 5, torch.float32) == 16 * 5 * 4
    assert formats.dictionary_bytes(16, 5, torch.float32, Storage(CoefStorage.BF16)) == 16 * 5 * 2
    assert formats.dictionary_bytes(16, 5, torch.float32, Storage(CoefStorage.BF16_14BIT)) == 16 * 5 * 14 // 8
    assert formats.dictionary_bytes(16, 5, torch.float32, Storage(CoefStorage.INT8)) == 80 + 5 * 2
    assert formats.dictionary_bytes(16, 5, torch.float32, Storage(CoefStorage.INT8, 8)) == 80 + 10 * 2
    assert formats.dictionary_bytes(16, 5, torch.float32, Storage(CoefStorage.INT4)) == 40 + 5 * 2 + 3  # 5 zeros: 20 bits
    assert (formats.dict_bytes(16, 9, 5, 18, Storage(), torch.float32, Storage(CoefStorage.INT8))
            == 90 + formats.coefficient_bytes(9, 5, 18, Storage(), torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dict_store", [Storage(k) for k in CoefStorage] + [Storage(CoefStorage.INT4, 8)])
def test_sparse_dict_with_a_stored_dictionary_counts_its_buffers(dtype, dict_store):
    D, S = torch.randn(16, 7), torch.randn(7, 11)
    mask = torch.rand(7, 11) < 0.4
    res = SparseDict(D, S * mask, mask, Storage(CoefStorage.INT8), dict_store=dict_store)
    module = build_module(res, None, dtype)
    assert written(module) == module.weight_bytes() == res.stored_bytes(dtype)
    assert module.weight_bytes() - formats.coefficient_bytes(11, 7, int(mask.sum()), Storage(CoefStorage.INT8), dtype) \
        == formats.dictionary_bytes(16, 7, dtype, dict_store)
    if dict_store.kind is not CoefStorage.DTYPE:  # the method sees D as it is stored (model dtype: as given)
        torch.testing.assert_close(module.dense_weight(), res.reconstruct())


def test_shared_dictionary_group_counts_d_once():
    outs, k = [9, 13, 6], 5
    nnz = [2 * o for o in outs]
    alone = [formats.dict_bytes(16, o, k, n, CoefStorage.BF16, torch.bfloat16) for o, n in zip(outs, nnz)]
    group = formats.group_dict_bytes(16, outs, k, nnz, CoefStorage.BF16, torch.bfloat16)
    assert sum(alone) - group == 2 * formats.dictionary_bytes(16, k, torch.bfloat16)


def test_kept_count_and_rank_invert_their_formulas():
    for ratio in (0.1, 0.5, 0.9):
        budget = (1 - ratio) * 64 * 64 * 2
        for store in (Storage(), Storage(CoefStorage.INT4, 16)):
            n = formats.most_kept(ratio, 64, 64, torch.float16, store)
            if n is None:  # int4 at 0.9: the mask (512 B) + 256 scales and zeros (640 B) exceed 819 B
                assert formats.sparse_bytes(64, 64, 0, torch.float16, None, store) > budget
                continue
            assert formats.sparse_bytes(64, 64, n, torch.float16, None, store) <= budget
            assert n == 64 * 64 or formats.sparse_bytes(64, 64, n + 1, torch.float16, None, store) > budget
            per_row = formats.most_kept(ratio, 64, 64, torch.float16, store, per_row=True)
            assert formats.sparse_bytes(64, 64, 64 * per_row, torch.float16, None, store) <= budget
            assert per_row == 64 or formats.sparse_bytes(64, 64, 64 * (per_row + 1), torch.float16, None, store) > budget
        r = formats.rank_for_ratio(ratio, 64, 32)
        assert formats.lowrank_bytes(64, 32, r, torch.float16) <= (1 - ratio) * 64 * 32 * 2
        assert formats.lowrank_bytes(64, 32, r + 1, torch.float16) > (1 - ratio) * 64 * 32 * 2
    # 0.95 of fp16 bytes is 0.8 bit per weight: not even the 1-bit mask fits; rank 1 needs 96 > 0.05*4096 bytes
    assert formats.most_kept(0.95, 64, 64, torch.float16) is None
    assert formats.rank_for_ratio(0.99, 64, 32) == 0
    assert formats.largest(lambda k: k * 3 <= 10, 100) == 3 and formats.largest(lambda k: False, 5) == 0
