"""Packed storage formats: exact round trips, real byte savings, reference forwards."""
from __future__ import annotations

import pytest
import torch

from sparselm import formats
from sparselm.config import CoefStorage, Pattern, Storage
from sparselm.modules import LowRankLinear, SparseDictLinear, SparseLinear, reference_forwards
from sparselm.packing import pack_bits, round_values, unpack_bits


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 14])
def test_bit_packing_round_trip(nbits):
    v = torch.randint(0, 2 ** nbits, (101,))
    packed = pack_bits(v, nbits)
    assert packed.numel() == -(-101 * nbits // 8)
    assert torch.equal(unpack_bits(packed, nbits, 101), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_unstructured_exact_and_small(dtype):
    W = torch.randn(64, 128)
    mask = torch.rand(64, 128) < 0.5
    m = SparseLinear(W, mask, torch.randn(64), None, dtype)
    assert torch.equal(m.dense_weight(), (W * mask).to(dtype))
    x = torch.randn(5, 128)
    ref = torch.nn.functional.linear(x, (W * mask).to(dtype).float(), m.bias.float())
    torch.testing.assert_close(m(x), ref)
    weight_bytes = m.stored_bytes() - m.bias.numel() * m.bias.element_size()
    assert weight_bytes / (W.numel() * torch.finfo(dtype).bits / 8) <= 0.6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_sparse_linear_nm_exact_and_small(dtype, n, m):
    W = torch.randn(32, 64)
    idx = torch.rand(32, 64 // m, m).argsort(-1)[..., :n]
    mask = torch.zeros(32, 64 // m, m, dtype=torch.bool).scatter_(2, idx, True).view(32, 64)
    mod = SparseLinear(W, mask, None, Pattern(n, m), dtype)
    assert torch.equal(mod.dense_weight(), (W * mask).to(dtype))
    assert mod.stored_bytes() / (W.numel() * torch.finfo(dtype).bits / 8) <= 0.65


def test_sparse_linear_rejects_a_mask_that_breaks_the_pattern():
    with pytest.raises(ValueError, match="exactly 2:4"):
        SparseLinear(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool), None, Pattern(2, 4))


def test_low_rank_forward_is_two_products():
    U, V, b = torch.randn(16, 4), torch.randn(4, 8), torch.randn(8)
    m = LowRankLinear(U, V, b)
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), x @ U @ V + b)
    torch.testing.assert_close(m.dense_weight(), (U @ V).T)
    assert formats.rank_for_ratio(0.5, 16, 8) == int(0.5 * 128 / 24)


@pytest.mark.parametrize("storage", list(CoefStorage))
def test_sparse_dict_forward_matches_rounded_coefficients(storage):
    D, S = torch.randn(16, 6), torch.randn(6, 8)
    mask = torch.rand(6, 8) < 0.5
    m = SparseDictLinear(D, S * mask, mask, None, storage)
    rows = mask.T.nonzero()[:, 0]
    values = round_values(S.T[mask.T], storage, torch.float32, rows)
    St = torch.zeros(8, 6)
    St[mask.T] = values
    torch.testing.assert_close(m.coefficients().float(), St.T)
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), x @ D @ St.T, rtol=1e-5, atol=1e-5)


def test_int8_dictionary_forward_reads_d_as_stored_and_keeps_no_dense_copy():
    """``dict_storage: int8``: ``Dᵀ`` rows absmax-quantized, one fp16 scale per atom; the forward (kernels and
    reference) equals ``x D̂ S`` with ``D̂`` the rounded dictionary, and the resident bytes stay within 1.15× the
    stored ones (no dequantized ``D`` is kept; the runtime forms add 8 bytes of offsets per row)."""
    g = torch.Generator().manual_seed(0)
    D, S = torch.randn(256, 24, generator=g), torch.randn(24, 40, generator=g)
    mask = torch.rand(24, 40, generator=g) < 0.5
    m = SparseDictLinear(D, S * mask, mask, None, dict_store=Storage(CoefStorage.INT8))
    scale = (D.abs().amax(0) / 127).half().float()  # (k,): one per atom
    D_hat = (D / scale).round().clamp(-127, 127) * scale
    torch.testing.assert_close(m.dictionary(), D_hat)
    assert m.Dt_int8.dtype == torch.int8 and m.Dt_scale.shape == (24,) and getattr(m, "D", None) is None
    x = torch.randn(5, 256, generator=g)
    want = x @ D_hat @ (S * mask)
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4)
    with reference_forwards(m):
        torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4)
    assert m.resident_bytes() <= 1.15 * m.stored_bytes()


def test_fourteen_bit_values_lose_two_mantissa_bits_only():
    v = torch.randn(10000)
    r = round_values(v, CoefStorage.BF16_14BIT, torch.float32)
    assert ((r - v).abs() / v.abs()).max() <= 2 ** -5


def test_shared_dictionary_is_charged_once_across_its_users():
    from sparselm.metrics import layer_accounting
    D, S = torch.randn(32, 12), torch.randn(12, 20)
    mask = torch.zeros(12, 20, dtype=torch.bool)
    mask[:6] = True  # 6 of 12 atoms per column
    m = SparseDictLinear(D, S * mask, mask, None, CoefStorage.BF16, torch.bfloat16)
    alone, shared = layer_accounting(m, torch.bfloat16), layer_accounting(m, torch.bfloat16, users=4)
    assert alone["params"] == 32 * 12 + 6 * 20
    assert alone["stored_bytes"] - shared["stored_bytes"] == 32 * 12 * 2 * 3 // 4  # three quarters of D's bytes
    assert alone["params"] - shared["params"] == 32 * 12 * 3 / 4
    assert shared["ratio_paper"] == 1 - shared["params"] / (32 * 20)


def test_a_layer_saved_before_the_storage_rule_still_loads():
    """Manifests written before the one storage rule have ``coef_storage`` and no ``count`` in a layer's meta."""
    from sparselm.config import Storage
    D, S = torch.randn(16, 6), torch.randn(6, 8)
    mask = torch.rand(6, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    m = SparseDictLinear(D, S * mask, mask, None, CoefStorage.BF16_14BIT, torch.bfloat16)
    meta = {k: v for k, v in m.meta().items() if k not in ("storage", "quant_group", "count")}
    meta["coef_storage"] = "bf16-14bit"
    shapes = {b: (list(t.shape), str(t.dtype).removeprefix("torch.")) for b, t in m.named_buffers()}
    old = SparseDictLinear.empty(meta, shapes)
    old.load_state_dict(m.state_dict())
    assert old.store == Storage(CoefStorage.BF16_14BIT) and old.nnz == m.nnz == int(mask.sum())
    assert torch.equal(old.dense_weight(), m.dense_weight()) and old.weight_bytes() == m.weight_bytes()
    assert old.dict_store == Storage()  # no dict_storage in the meta: D in the model dtype, as then
