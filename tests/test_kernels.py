"""Fast forwards (sparselm.kernels) against their reference twins: every path, odd shapes, dtypes, storages."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparselm import kernels
from sparselm.config import CoefStorage, Pattern, Storage
from sparselm.kernels import _build, masked
from sparselm.modules import LowRankLinear, SparseDictLinear, SparseLinear, reference_forwards

needs_ext = pytest.mark.skipif(not kernels.extension_available(),
                               reason="the C++ kernels could not be built here (no compiler or ninja)")
PATHS = [pytest.param("gemv", marks=needs_ext), pytest.param("panel", marks=needs_ext), "torch"]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _check(module, x, path, dtype):
    module.kernel_path = path
    got = module(x)
    module.kernel_path = "reference"
    ref = module(x)
    assert got.dtype == ref.dtype == x.dtype and got.shape == ref.shape
    scale = ref.float().abs().max().item() + 1e-6
    torch.testing.assert_close(got.float() / scale, ref.float() / scale, rtol=0, atol=TOL[dtype])


def _inputs(in_f, dtype, tokens):
    return torch.randn(*tokens, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [(1,), (2, 3), (1, 37)])
@pytest.mark.parametrize("shape, bias", [((45, 70), True), ((64, 96), False)])
def test_unstructured_paths_match_reference(path, dtype, tokens, shape, bias):
    torch.manual_seed(0)
    W, mask = torch.randn(*shape), torch.rand(*shape) < 0.5
    m = SparseLinear(W, mask, torch.randn(shape[0]) if bias else None, None, dtype)
    _check(m, _inputs(shape[1], dtype, tokens), path, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("tokens", [(1,), (19,)])
@pytest.mark.parametrize("store", [Storage(), Storage(CoefStorage.BF16_14BIT), Storage(CoefStorage.INT8),
                                   Storage(CoefStorage.INT4, 32)], ids=str)
def test_nm_paths_match_reference(path, n, m, tokens, store):
    torch.manual_seed(0)
    W = torch.randn(33, 64)
    idx = torch.rand(33, 64 // m, m).argsort(-1)[..., :n]
    mask = torch.zeros(33, 64 // m, m, dtype=torch.bool).scatter_(2, idx, True).view(33, 64)
    mod = SparseLinear(W, mask, torch.randn(33), Pattern(n, m), torch.bfloat16, store)
    _check(mod, _inputs(64, torch.bfloat16, tokens), path, torch.bfloat16)
    rt = mod.runtime()  # the N:M positions became the unstructured bitmask, the values read as stored
    assert torch.equal(masked.panel_torch(rt, 0, 33, torch.float32), mod.dense_weight().float())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("storage", list(CoefStorage))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [(1,), (3,), (2, 20)])
def test_sparse_dict_paths_match_reference(path, storage, dtype, tokens):
    torch.manual_seed(0)
    D, S = torch.randn(40, 96), torch.randn(96, 37)  # in 40, k 96, out 37
    mask = torch.rand(96, 37) < 0.4
    mod = SparseDictLinear(D, S * mask, mask, torch.randn(37), storage, dtype)
    _check(mod, _inputs(40, dtype, tokens), path, dtype)


QUANT = [Storage(CoefStorage.INT4), Storage(CoefStorage.INT4, 32), Storage(CoefStorage.INT4, 64),
         Storage(CoefStorage.INT4, 16), Storage(CoefStorage.INT8, 32), Storage(CoefStorage.INT8, 24)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("store", QUANT, ids=str)
@pytest.mark.parametrize("tokens", [(1,), (2, 20)])
def test_quantized_values_run_the_kernels_and_match_reference(path, store, tokens):
    """int4 and grouped int8 values are decoded in the kernels ((code - zero)·scale per group; groups that
    are not a multiple of 32 columns take the scalar loop); odd widths leave a partial last group."""
    torch.manual_seed(0)
    W, mask = torch.randn(45, 150), torch.rand(45, 150) < 0.5
    m = SparseLinear(W, mask, torch.randn(45), None, torch.bfloat16, store)
    assert m.runtime() is not None
    _check(m, _inputs(150, torch.bfloat16, tokens), path, torch.bfloat16)
    D, S, smask = torch.randn(40, 96), torch.randn(96, 37), torch.rand(96, 37) < 0.4
    d = SparseDictLinear(D, S * smask, smask, None, store, torch.float32)
    _check(d, _inputs(40, torch.float32, tokens), path, torch.float32)


@needs_ext
@pytest.mark.parametrize("store", QUANT, ids=str)
def test_quantized_unpack_is_the_stored_weight(store):
    """The C++ unpack of a quantized bitmask matrix gives exactly the reference's dense weight (fp32)."""
    torch.manual_seed(0)
    W, mask = torch.randn(19, 130), torch.rand(19, 130) < 0.5
    m = SparseLinear(W, mask, None, None, torch.float32, store)
    rt = m.runtime()
    for level in range(len(_build.LEVELS)):  # a cap above this CPU's best runs its best
        out = torch.empty(19, 130)
        _build.loaded().masked_unpack(rt.mask, rt.offsets, rt.values, rt.kind, rt.scale, rt.zero, rt.group,
                                      rt.rows, rt.cols, 0, 19, out, level, rt.block)
        torch.testing.assert_close(out, m.dense_weight(), rtol=1e-6, atol=1e-6)
    assert torch.equal(masked.panel_torch(rt, 0, 19, torch.float32), m.dense_weight().float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_fast_forwards_return_contiguous_outputs(dtype, tokens):
    """Every compressed layer's fast forward gives a row-major (contiguous) output at decode and prefill token
    counts: a transposed one sends the attention's q/k/v to PyTorch's SDPA math path (a 50 % copy of the bundled
    model's forward at 1016 tokens took 3.4x the dense time) and every elementwise op after the layer to strided memory."""
    torch.manual_seed(0)
    W, mask = torch.randn(48, 64), torch.rand(48, 64) < 0.5
    D, S, smask = torch.randn(64, 40), torch.randn(40, 48), torch.rand(40, 48) < 0.4
    layers = [SparseLinear(W, mask, torch.randn(48), None, dtype),
              SparseLinear(W, mask, None, None, dtype, Storage(CoefStorage.INT4, 32)),
              LowRankLinear(torch.randn(64, 7), torch.randn(7, 48), torch.randn(48), dtype),
              SparseDictLinear(D, S * smask, smask, None, dtype=dtype)]
    x = _inputs(64, dtype, (1, tokens))
    with torch.no_grad():
        for m in layers:
            y = m(x)
            assert y.shape == (1, tokens, 48) and y.is_contiguous(), type(m).__name__


@needs_ext
@pytest.mark.parametrize("store", [Storage(CoefStorage.INT4), Storage(CoefStorage.INT4, 16), Storage(CoefStorage.INT4, 32),
                                   Storage(CoefStorage.INT4, 128)], ids=str)
def test_masked_int4_gemv_against_bf16_input_is_the_stored_weights_product(store):
    """Masked int4 GEMV over bf16 x equals the stored weight's product at 1..8 tokens, on rows whose codes start at
    odd nibbles, a last partial group and chunk (262 columns), an empty row and a full one; and agrees with the
    fp32-input path. Its weights are the reference forward's: the decoded weight rounded to bf16 (each (code − z)·s
    of the codes' bf16 table), so every output is that product to within its own bf16 rounding."""
    torch.manual_seed(0)
    W, mask = torch.randn(21, 262), torch.rand(21, 262) < 0.45
    mask[4], mask[7] = False, True
    m = SparseLinear(W, mask, None, None, torch.float32, store)
    rt, dense = m.runtime(), m.dense_weight().float()
    rounded = dense.bfloat16().float()  # what reference_forward multiplies bf16 x with
    avx512 = min(_build.isa(), _build.LEVELS.index(_build.cpu_level())) == 2
    assert rt.offsets[1:].remainder(2).any()  # some rows start at an odd nibble
    for tokens in range(1, 9):
        x = torch.randn(tokens, 262).bfloat16()
        got = masked.matmul_gemv(x, rt).float()
        want = x.float() @ dense.T
        fp32_input = masked.matmul_gemv(x.float(), rt).bfloat16().float()  # fp32 FMA on the unrounded weights
        for other in (want, fp32_input):  # the output's bf16 rounding and the weights' (AVX-512: bf16 table)
            assert (got - other).abs().max() <= 2 ** -7 * want.abs().max() + 1e-6
        if avx512:  # VDPBF16PS on the table's weights (the AVX2 and scalar loops FMA unrounded fp32 weights)
            exact = x.float() @ rounded.T
            assert ((got - exact).abs() <= 2 ** -8 * exact.abs() + 1e-5).all()  # each output's own bf16 rounding
        else:
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # the output's bf16 rounding


@needs_ext
@pytest.mark.parametrize("store", [Storage(CoefStorage.INT8), Storage(CoefStorage.INT8, 32)], ids=str)
def test_masked_int8_gemv_rounds_to_bf16_only_in_large_token_blocks(store):
    """Masked int8 values against bf16 x: token blocks of `DECODED_DP_MIN_TOKENS` (7) or more round the decoded
    weights to bf16 for VDPBF16PS (per 32 inputs: code·scale, the reference forward's weights, so each output is that
    product to its own bf16 rounding; per row: the codes themselves, exact in bf16, the row's scale applied after, so
    the fp32 weights' product), smaller blocks FMA the fp32 weights against x widened to fp32; 13 tokens are a block
    of 8 and one of 5, so both run in one call."""
    torch.manual_seed(0)
    W, mask = torch.randn(37, 200), torch.rand(37, 200) < 0.5
    m = SparseLinear(W, mask, None, None, torch.float32, store)
    rt, dense = m.runtime(), m.dense_weight().float()
    avx512 = min(_build.isa(), _build.LEVELS.index(_build.cpu_level())) == 2
    for tokens in (1, 6, 7, 8, 13, 16):
        x = torch.randn(tokens, 200).bfloat16()
        got = masked.matmul_gemv(x, rt).float()
        want = x.float() @ dense.T
        assert (got - want).abs().max() <= 2 ** -7 * want.abs().max() + 1e-6
        fp32_path = masked.matmul_gemv(x.float(), rt).bfloat16().float()
        exact = x.float() @ (dense.bfloat16().float() if store.group else dense).T
        rounded = ((got - exact).abs() <= 2 ** -8 * exact.abs() + 1e-5).all(1)  # per token
        if avx512:
            big = tokens - tokens % 8 + (tokens % 8 if tokens % 8 >= 7 else 0)  # tokens in blocks of >= 7
            assert rounded[:big].all()
            torch.testing.assert_close(got[big:], fp32_path[big:], rtol=0, atol=0)  # the fp32 FMAs, as for fp32 x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [(1,), (7,)])
def test_low_rank_fast_forward_matches_reference_and_keeps_bytes(dtype, tokens):
    U, V = torch.randn(48, 5), torch.randn(5, 31)
    m = LowRankLinear(U, V, torch.randn(31), dtype)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _check(m, _inputs(48, dtype, tokens), None, dtype)
    assert m.U.t().is_contiguous()  # re-laid out column-major: Uᵀ is the row-major matrix the GEMV streams
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]) and v.numel() * v.element_size() == before[k].numel() * v.element_size()


ENCODED = [Storage(CoefStorage.BF16), Storage(CoefStorage.FP16), Storage(CoefStorage.BF16_14BIT),
           Storage(CoefStorage.INT8), Storage(CoefStorage.INT8, 32), Storage(CoefStorage.INT4), Storage(CoefStorage.INT4, 16)]


def _owned(form) -> int:  # what a mask-free form adds: the row offsets and an int8 per-row float32 scale
    return 8 * (form.rows + 1) + (4 * form.rows if form.kind == masked.INT8 else 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("store", ENCODED, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [(1,), (3,), (2, 20)])
def test_encoded_low_rank_factors_run_the_kernels_as_stored(path, store, dtype, tokens):
    """Low-rank factors stored 14-bit / int8 / int4 / in another float dtype are read by the kernels as they are
    stored (mask-free forms: no dense copy, no mask bits) and match the reference, which decodes them."""
    torch.manual_seed(0)
    m = LowRankLinear(torch.randn(70, 9), torch.randn(9, 45), torch.randn(45), dtype, store)
    _check(m, _inputs(70, dtype, tokens), path, dtype)
    Ut, Vt = m.runtime()
    assert isinstance(Ut, masked.Masked) and Ut.full and (Ut.rows, Ut.cols) == (9, 70)
    assert Vt.full and (Vt.rows, Vt.cols) == (45, 9)
    assert m.resident_bytes() == m.stored_bytes() + _owned(Ut) + _owned(Vt)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dict_store", ENCODED, ids=str)
@pytest.mark.parametrize("tokens", [(1,), (2, 20)])
def test_encoded_dictionary_runs_the_kernels_as_stored(path, dict_store, tokens):
    """A dictionary stored 14-bit / int8 / int4 (`dict_storage`) is read as stored, shared or not."""
    torch.manual_seed(0)
    D, S, smask = torch.randn(40, 96), torch.randn(96, 37), torch.rand(96, 37) < 0.4
    d = SparseDictLinear(D, S * smask, smask, torch.randn(37), Storage(CoefStorage.INT8), torch.bfloat16,
                         dict_store=dict_store)
    _check(d, _inputs(40, torch.bfloat16, tokens), path, torch.bfloat16)
    Dt, St = d.runtime()
    assert Dt.full and (Dt.rows, Dt.cols) == (96, 40) and not St.full
    assert d.resident_bytes() == d.stored_bytes() + _owned(Dt) + St.owned


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("store", [Storage(CoefStorage.INT4, 16), Storage(CoefStorage.INT4, 64),
                                   Storage(CoefStorage.INT8, 32), Storage(CoefStorage.INT8, 8)], ids=str)
@pytest.mark.parametrize("tokens", [(1,), (2, 20)])
def test_gqsa_blocks_run_the_kernels_as_stored(path, store, tokens):
    """GQSA's 1×g block format: with pruned blocks (one mask bit per block, parameters per kept block) and with
    every block kept (``gptq``: no block mask stored, a dense grouped matrix), read as stored, no element mask."""
    torch.manual_seed(0)
    W = torch.randn(45, 128)
    full = SparseLinear(W, torch.ones(45, 128, dtype=torch.bool), torch.randn(45), None, torch.bfloat16, store,
                        block=True)
    assert getattr(full, "mask", None) is None and full.runtime().full
    _check(full, _inputs(128, torch.bfloat16, tokens), path, torch.bfloat16)
    blocks = torch.rand(45, 128 // store.group) < 0.5
    blocks[3] = False  # a row without a kept block
    blocks[4] = True   # and one with all
    keep = blocks.repeat_interleave(store.group, 1)
    pruned = SparseLinear(W * keep, keep, None, None, torch.bfloat16, store, block=True)
    rt = pruned.runtime()
    assert rt.block == store.group and rt.mask is pruned.mask  # the stored block mask itself
    assert pruned.resident_bytes() == pruned.stored_bytes() + 8 * 46
    _check(pruned, _inputs(128, torch.bfloat16, tokens), path, torch.bfloat16)


def _unpack_and_gemv_match_at_every_level(rt, dense, monkeypatch):
    """The C++ unpack and GEMV of form ``rt`` at every kernel level, and the torch panels, against ``dense``."""
    h = torch.randn(3, rt.cols)
    for level, name in enumerate(_build.LEVELS):
        monkeypatch.setenv("SPARSELM_ISA", name)
        out = torch.empty(rt.rows, rt.cols)
        _build.loaded().masked_unpack(rt.mask, rt.offsets, rt.values, rt.kind, rt.scale, rt.zero, rt.group,
                                      rt.rows, rt.cols, 0, rt.rows, out, level, rt.block)
        torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(masked.matmul_gemv(h, rt), h @ dense.T, rtol=1e-4, atol=1e-4)
    assert torch.equal(masked.panel_torch(rt, 0, rt.rows, torch.float32), dense)


@needs_ext
@pytest.mark.parametrize("store", [Storage(CoefStorage.INT4, 16), Storage(CoefStorage.INT8, 32)], ids=str)
def test_gqsa_blocks_unpack_and_multiply_as_the_stored_weight_at_every_level(store, monkeypatch):
    torch.manual_seed(0)
    keep = (torch.rand(19, 160 // store.group) < 0.4).repeat_interleave(store.group, 1)
    m = SparseLinear(torch.randn(19, 160) * keep, keep, None, None, torch.float32, store, block=True)
    _unpack_and_gemv_match_at_every_level(m.runtime(), m.dense_weight().float(), monkeypatch)


@needs_ext
@pytest.mark.parametrize("store", [Storage(CoefStorage.INT4, 16), Storage(CoefStorage.INT8, 32)], ids=str)
def test_gqsa_rows_longer_than_one_mask_word_read_every_kept_block(store, monkeypatch):
    """The kept-block walk (`block_row`, `unpack_block_rows`) reads a row's block mask 64 bits at a time from any
    bit offset: rows of 65 and 33 blocks (every row starts at a new offset; the last rows read the buffer's tail),
    a row with no kept block and one with all, against the stored weight's product at 1..9 tokens."""
    torch.manual_seed(0)
    cols = 65 * store.group if store.group == 16 else 33 * store.group
    blocks = torch.rand(9, cols // store.group) < 0.5
    blocks[2], blocks[5] = False, True
    keep = blocks.repeat_interleave(store.group, 1)
    m = SparseLinear(torch.randn(9, cols) * keep, keep, None, None, torch.float32, store, block=True)
    rt, dense = m.runtime(), m.dense_weight().float()
    assert rt.block == store.group
    for tokens in (1, 3, 9):
        x = torch.randn(tokens, cols)
        torch.testing.assert_close(masked.matmul_gemv(x, rt), x @ dense.T, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(masked.matmul_gemv(x.bfloat16(), rt).float(), x.bfloat16().float() @ dense.T,
                                   rtol=2e-2, atol=2e-2 * cols ** 0.5)
    _unpack_and_gemv_match_at_every_level(rt, dense, monkeypatch)


@needs_ext
@pytest.mark.parametrize("store", ENCODED, ids=str)
def test_mask_free_forms_unpack_and_multiply_as_the_decoded_factor(store, monkeypatch):
    """At every kernel level the CPU runs, the C++ unpack and GEMV of a mask-free form on odd widths (13 rows of
    77, not word-aligned) equal the decoded factor's."""
    torch.manual_seed(0)
    m = LowRankLinear(torch.randn(77, 13), torch.randn(13, 5), None, torch.float32, store)
    _unpack_and_gemv_match_at_every_level(m.runtime()[0], m.factors()[0].T.float(), monkeypatch)


@needs_ext
@pytest.mark.parametrize("storage", [CoefStorage.BF16, CoefStorage.BF16_14BIT, CoefStorage.INT8, CoefStorage.FP16,
                                     CoefStorage.INT4, Storage(CoefStorage.INT4, 64), Storage(CoefStorage.INT8, 32)],
                         ids=str)
def test_scalar_and_simd_gemv_agree(storage, monkeypatch):
    torch.manual_seed(0)
    mask = torch.rand(53, 77) < 0.5  # Sᵀ (out 77, k 53): rows not word-aligned
    mod = SparseDictLinear(torch.randn(8, 53), torch.randn(53, 77) * mask, mask, None, storage)
    rt = mod.runtime()[1]  # (Dᵀ, Sᵀ): the coefficients
    h = torch.randn(4, 53)
    ref = h @ mod.coefficients().float()
    for level in _build.LEVELS:
        monkeypatch.setenv("SPARSELM_ISA", level)
        torch.testing.assert_close(masked.matmul_gemv(h, rt), ref, rtol=1e-4, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("storage", [CoefStorage.BF16, CoefStorage.FP16, CoefStorage.INT8, "fp32"], ids=str)
@pytest.mark.parametrize("cols", [7, 33, 45, 613])
@pytest.mark.parametrize("bias", [True, False])
def test_masked_gemv_runs_simd_on_odd_widths(storage, cols, bias, monkeypatch):
    """bf16 / fp16 / fp32 / per-row int8 values take a SIMD GEMV (AVX2 or AVX-512) on any CPU torch runs its
    AVX2 kernels on, and every level matches the stored weight's product at 1..9 tokens, widths not a multiple
    of 8 or 32."""
    torch.manual_seed(cols)
    W, mask = torch.randn(23, cols), torch.rand(23, cols) < 0.5
    dtype = torch.float32 if storage == "fp32" else torch.bfloat16
    m = SparseLinear(W, mask, torch.randn(23) if bias else None, None, dtype,
                     Storage() if storage == "fp32" else Storage(storage))
    rt = m.runtime()
    assert _build.gemv_level(rt.kind, rt.group) in _cpu_levels()
    dense = m.dense_weight().float()
    b = None if m.bias is None else m.bias.float()
    for tokens in range(1, 10):
        x = torch.randn(tokens, cols)
        ref = x @ dense.T + (0 if b is None else b)
        for level in _build.LEVELS:
            monkeypatch.setenv("SPARSELM_ISA", level)
            got = masked.matmul_gemv(x, rt, b)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("native", [True, False])
def test_bf16_products_run_in_float32_without_native_bf16(native, monkeypatch):
    """Without native bf16 (oneDNN emulates it) the prefill products run one float32 GEMM, cast back, and the
    dense GEMV takes more tokens; with it, bf16 as before. Both match the reference forwards."""
    monkeypatch.setattr(kernels.policy, "native_bf16", lambda: native)
    many, few = kernels.policy.FLOAT32_MIN_TOKENS, kernels.policy.FLOAT32_MIN_TOKENS - 1
    assert kernels.policy.gemm_dtype(torch.bfloat16, many) == (torch.bfloat16 if native else torch.float32)
    assert kernels.policy.gemm_dtype(torch.bfloat16, few) == torch.bfloat16
    assert kernels.policy.gemm_dtype(torch.float16, many) == torch.float16
    seen = []
    panels = masked.matmul_panels
    monkeypatch.setattr(masked, "matmul_panels", lambda x, *a, **k: seen.append(x.dtype) or panels(x, *a, **k))
    torch.manual_seed(0)
    W, mask = torch.randn(45, 70), torch.rand(45, 70) < 0.5
    _check(SparseLinear(W, mask, torch.randn(45), None, torch.bfloat16), _inputs(70, torch.bfloat16, (many,)),
           None, torch.bfloat16)
    assert seen == [torch.bfloat16 if native else torch.float32]
    lr = LowRankLinear(torch.randn(70, 9), torch.randn(9, 33), torch.randn(33), torch.bfloat16)
    beyond_gemv = kernels.policy.DENSE_GEMV_MAX_TOKENS_EMULATED + 1  # one float32 GEMM where not native
    _check(lr, _inputs(70, torch.bfloat16, (beyond_gemv,)), None, torch.bfloat16)
    x = _inputs(70, torch.bfloat16, (kernels.policy.DENSE_GEMV_MAX_TOKENS_EMULATED,))
    gemv = kernels.extension_available() and _build.dense_level() != "scalar"
    # where bf16 is native: the per-thread GEMMs where this CPU takes them (`policy.dense_panels`), else F.linear
    many_path = "panel" if kernels.extension_available() and kernels.policy.dense_panels() else "torch"
    assert kernels.policy.dense_path(x, lr.U.t().contiguous()) == ("gemv" if gemv and not native else
                                                                   many_path if native else "torch")


def test_runtime_follows_buffer_writes():
    W, mask = torch.randn(16, 32), torch.rand(16, 32) < 0.5
    a, b = SparseLinear(W, mask), SparseLinear(torch.randn(16, 32), mask)
    x = torch.randn(2, 32)
    a(x)
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b.reference_forward(x))


def test_shared_dictionary_stays_shared_after_relayout():
    D = torch.randn(24, 10)
    mask = torch.rand(10, 6) < 0.5
    a = SparseDictLinear(D, torch.randn(10, 6) * mask, mask)
    b = SparseDictLinear(D, torch.randn(10, 6) * mask, mask)
    b.D = a.D
    x = torch.randn(1, 24)
    a(x), b(x)
    assert a.D is b.D and a.D.t().is_contiguous()


def test_fallback_when_the_build_fails(monkeypatch):
    def broken():
        raise RuntimeError("no compiler")
    monkeypatch.setattr(_build, "_state", {})
    monkeypatch.setattr(_build, "_build", broken)
    assert not kernels.extension_available()
    assert kernels.policy.masked_path(1) == "torch" and kernels.policy.masked_path(1, "gemv") == "torch"
    torch.manual_seed(0)
    mod = SparseDictLinear(torch.randn(20, 12), torch.randn(12, 9), torch.rand(12, 9) < 0.5, None,
                           CoefStorage.BF16_14BIT, torch.bfloat16)
    _check(mod, _inputs(20, torch.bfloat16, (3,)), None, torch.bfloat16)


def test_env_override_and_bad_value(monkeypatch):
    from sparselm.errors import InputError
    monkeypatch.setenv("SPARSELM_KERNELS", "reference")
    m = SparseLinear(torch.randn(4, 8), torch.rand(4, 8) < 0.5)
    assert not kernels.usable(torch.randn(1, 8), m.kernel_path)
    monkeypatch.setenv("SPARSELM_KERNELS", "fastest")
    with pytest.raises(InputError, match="kernel path"):
        m(torch.randn(1, 8))


def test_env_change_between_forwards_takes_effect(monkeypatch):
    """The route is read from the environment at every forward (policy's bytes lookup), not once per module."""
    m = SparseLinear(torch.randn(4, 8), torch.rand(4, 8) < 0.5)
    x = torch.randn(1, 8)
    calls = []
    monkeypatch.setattr(m, "reference_forward", lambda x: calls.append(1) or torch.zeros(1, 4))
    monkeypatch.delenv("SPARSELM_KERNELS", raising=False)
    m(x)
    assert calls == []
    monkeypatch.setenv("SPARSELM_KERNELS", "reference")
    m(x)
    assert calls == [1]
    monkeypatch.setenv("SPARSELM_ISA", "sse4")
    from sparselm.errors import InputError
    with pytest.raises(InputError, match="SPARSELM_ISA"):
        kernels.policy.route(None)


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the C++ extension")
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (1, 1, 1, 2)])
def test_cpp_products_take_any_leading_shape(shape):
    """The C++ entries flatten x (..., cols) and give (..., rows), equal to the same tokens as a 2-D batch."""
    torch.manual_seed(0)
    ext, isa = _build.loaded(), _build.isa()
    mm = SparseLinear(torch.randn(24, 64), torch.rand(24, 64) < 0.5, None, None, torch.bfloat16).runtime()
    A = torch.randn(40, 64).bfloat16()
    x = torch.randn(*shape[:-1], 64).bfloat16() if len(shape) > 1 else torch.randn(64).bfloat16()
    x2 = x.reshape(-1, 64)
    B = torch.randn(24, 40).bfloat16()
    cases = {"masked_gemv": lambda v: ext.masked_gemv(v, *mm.args, None, 24, 64, isa, 0, 0),
             "dense_gemv": lambda v: ext.dense_gemv(v, A, None, 0, isa),
             "dense_dense_gemv": lambda v: ext.dense_dense_gemv(v, A, B, None, 0, isa),
             "masked_panels_mm": lambda v: ext.masked_panels_mm(v, *mm.args, 24, 64, 8, isa, 0),
             "dense_panels_mm": lambda v: ext.dense_panels_mm(v, A),
             "dense_dense_mm": lambda v: ext.dense_dense_mm(v, A, B, None, False)}
    if _build.dense_level(isa) == "scalar":
        cases = {k: f for k, f in cases.items() if "dense_" not in k or "panels" in k}
    for name, f in cases.items():
        got, flat = f(x), f(x2)
        assert got.shape == (*x.shape[:-1], flat.shape[1]), name
        assert torch.equal(got.reshape(flat.shape), flat), name


def test_reference_forwards_context_restores_paths():
    m = SparseLinear(torch.randn(4, 8), torch.rand(4, 8) < 0.5)
    m.kernel_path = "torch"
    with reference_forwards(m):
        assert m.kernel_path == "reference"
    assert m.kernel_path == "torch"


def test_gradients_take_the_reference_forward():
    m = LowRankLinear(torch.randn(8, 3), torch.randn(3, 5))
    x = torch.randn(2, 8, requires_grad=True)
    m(x).sum().backward()
    torch.testing.assert_close(x.grad, (m.U @ m.V).sum(1).expand(2, 8))


def test_relaid_factors_save_like_the_originals(tmp_path):
    from sparselm import resume
    m = LowRankLinear(torch.randn(8, 3), torch.randn(3, 5))
    m(torch.randn(1, 8))
    from sparselm.plan import Plan
    resume.save_checkpoint(tmp_path / "ck", {"k": 1}, 1, {"l": {}}, {"l": m}, Plan({}, []).to_dict())
    _, out, _ = resume.load_checkpoint(tmp_path / "ck", {"k": 1})
    for k, v in m.state_dict().items():
        assert torch.equal(out["l"][0].state_dict()[k], v)


@pytest.mark.parametrize("path", PATHS)
def test_many_small_panels_match_reference(path, monkeypatch):
    monkeypatch.setattr(kernels.policy, "PANEL_ROWS", 5)
    torch.manual_seed(0)
    mask = torch.rand(50, 23) < 0.5  # S (k 50, out 23): 5 panels of Sᵀ rows
    mod = SparseDictLinear(torch.randn(30, 50), torch.randn(50, 23) * mask, mask, torch.randn(23),
                           CoefStorage.BF16_14BIT, torch.bfloat16)
    _check(mod, _inputs(30, torch.bfloat16, (40,)), path, torch.bfloat16)
    W, m2 = torch.randn(23, 45), torch.rand(23, 45) < 0.5
    _check(SparseLinear(W, m2, None, None, torch.float32), _inputs(45, torch.float32, (40,)), path, torch.float32)


def _cpu_levels() -> set[str]:
    """The kernel levels acceptable on this CPU, from torch's own cpuid probe (not the extension's): AVX2 or
    better wherever torch runs its AVX2 kernels, so a dispatch that silently falls back to scalar fails."""
    cap = torch.backends.cpu.get_cpu_capability()
    return {"AVX2": {"avx2"}, "AVX512": {"avx2", "avx512"}}.get(cap, {"scalar"})


@pytest.mark.skipif(not (kernels.extension_available() and _build.dense_level() != "scalar"),
                    reason="needs the AVX-512 BF16 or AVX2 kernels")
@pytest.mark.parametrize("rows, cols", [(37, 45), (64, 96), (5, 613), (300, 33), (9, 7), (6, 17), (11, 31)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 6, 7, 8, 9, 11])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("serial_bytes", [0, 1 << 40])  # rows split over the threads, or one thread
def test_dense_gemv_matches_float_product(rows, cols, tokens, bias, serial_bytes):
    """Every SIMD level this CPU runs (AVX2, and AVX-512 BF16 where present)."""
    assert _build.dense_level() in _cpu_levels()
    g = torch.Generator().manual_seed(rows * cols + tokens)
    W = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    x = torch.randn(tokens, cols, generator=g).to(torch.bfloat16)
    b = torch.randn(rows, generator=g).to(torch.bfloat16) if bias else None
    ref = x.float() @ W.float().T + (0 if b is None else b.float())
    for level in range(1, _build.LEVELS.index(_build.cpu_level()) + 1):
        got = _build.loaded().dense_gemv(x, W, b, serial_bytes, level)
        assert got.dtype == torch.bfloat16 and got.shape == (tokens, rows)
        torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.skipif(not (kernels.extension_available() and _build.dense_level() != "scalar"),
                    reason="needs the AVX-512 BF16 or AVX2 kernels")
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_factor_products_at_decode_are_one_call_with_the_two_calls_results(tokens, bias, monkeypatch):
    """Low rank (U then V) and dictionaries (D then S) at decode: one call into the extension
    (`dense_dense_gemv`, `dense_masked_gemv`), bit for bit what the two products give one after the other."""
    g = torch.Generator().manual_seed(tokens)
    b = torch.randn(37, generator=g) if bias else None
    lr = LowRankLinear(torch.randn(70, 9, generator=g), torch.randn(9, 37, generator=g), b, torch.bfloat16)
    keep = torch.rand(23, 37, generator=g) < 0.4
    sd = SparseDictLinear(torch.randn(70, 23, generator=g), torch.randn(23, 37, generator=g) * keep, keep, b,
                          dtype=torch.bfloat16)
    x = _inputs(70, torch.bfloat16, (tokens,))
    ext, calls = _build.loaded(), []
    for name in ("dense_dense_gemv", "dense_masked_gemv"):
        monkeypatch.setattr(ext, name, (lambda f: lambda *a: calls.append(f.__name__) or f(*a))(getattr(ext, name)))
    got_lr, got_sd = lr(x), sd(x)
    assert calls == ["dense_dense_gemv", "dense_masked_gemv"]
    Ut, Vt = lr.runtime()
    bb = None if b is None else b.to(torch.bfloat16)
    assert torch.equal(got_lr, ext.dense_gemv(ext.dense_gemv(x, Ut, None, 0, _build.isa()), Vt, bb, 0, _build.isa()))
    Dt, S = sd.runtime()
    h = ext.dense_gemv(x, Dt, None, 0, _build.isa())
    assert torch.equal(got_sd, masked.matmul_gemv(h, S, bb))
    _check(lr, x, None, torch.bfloat16)
    _check(sd, x, None, torch.bfloat16)


@pytest.mark.parametrize("mv_tokens", [0, 2])
@pytest.mark.parametrize("path", [None, "torch"])
def test_low_rank_dense_paths_match_reference(mv_tokens, path, monkeypatch):
    """The C++ GEMV (auto, bf16, few tokens), torch.mv per token and F.linear all agree with the reference."""
    monkeypatch.setattr(kernels.policy, "MV_MAX_TOKENS", mv_tokens)
    U, V = torch.randn(70, 9), torch.randn(9, 33)
    m = LowRankLinear(U, V, torch.randn(33), torch.bfloat16)
    for tokens in [(1,), (2,), (3, 5)]:
        _check(m, _inputs(70, torch.bfloat16, tokens), path, torch.bfloat16)
    x = _inputs(70, torch.bfloat16, (2,))
    expect = "gemv" if path is None and _build.dense_level() != "scalar" else "torch"
    assert kernels.policy.dense_path(x, m.U.t().contiguous(), path) == expect


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the built C++ extension")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 15, 16, 33, 70])
def test_dense_panels_split_the_rows_and_equal_one_gemm(threads, rows):
    """Y = X Wᵀ in one single-threaded GEMM per thread over W's row ranges (multiples of 16, the last the rest),
    each writing its columns of a row-major Y: every output computed once, equal to one GEMM over all of W, from a
    contiguous or a transposed X."""
    ext = _build.loaded()
    W = torch.randn(rows, 40, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x = _inputs(40, torch.bfloat16, (23,))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, got_t = ext.dense_panels_mm(x, W), ext.dense_panels_mm(x.t().contiguous().t(), W)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (23, rows) and got.is_contiguous()
    ref = x.float() @ W.float().t()
    for y in (got, got_t):
        torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.skipif(not kernels.extension_available() or not kernels.policy.native_bf16(),
                    reason="needs the built C++ extension and native bf16 products")
@pytest.mark.parametrize("amx", [True, False])
def test_factors_at_prefill_take_the_path_measured_faster_on_the_cpu(amx, monkeypatch):
    """Beyond the GEMV's tokens, bf16 low-rank and dictionary factors run `dense_panels_mm` on an AMX CPU (the
    second factor reading the first's output) and one F.linear on a CPU with native bf16 but no AMX (measured
    faster on each: `policy.DENSE_PANELS`, `DENSE_PANELS_NO_AMX`); both match the reference, and flipping the
    CPU's setting flips the path."""
    ext, calls = _build.loaded(), []
    for name in ("dense_panels_mm", "masked_panels_mm"):
        monkeypatch.setattr(ext, name, (lambda f: lambda *a: calls.append(f.__name__) or f(*a))(getattr(ext, name)))
    pair = ext.dense_dense_mm  # both low-rank factors in one call: "panels" or "linear" (at::linear) each
    monkeypatch.setattr(ext, "dense_dense_mm", lambda *a: calls.append("panels" if a[-1] else "linear") or pair(*a))
    monkeypatch.setattr(kernels.policy, "amx", lambda: amx)
    lr = LowRankLinear(torch.randn(70, 9), torch.randn(9, 33), torch.randn(33), torch.bfloat16)
    keep = torch.rand(12, 33, generator=torch.Generator().manual_seed(3)) < 0.4
    sd = SparseDictLinear(torch.randn(70, 12), torch.randn(12, 33) * keep, keep, None, dtype=torch.bfloat16)
    x = _inputs(70, torch.bfloat16, (2, 11))
    _check(lr, x, None, torch.bfloat16)
    assert calls == (["panels"] if amx else ["linear"])
    calls.clear()
    _check(sd, x, None, torch.bfloat16)
    assert calls == (["dense_panels_mm", "masked_panels_mm"] if amx else ["masked_panels_mm"])
    calls.clear()
    monkeypatch.setattr(kernels.policy, "DENSE_PANELS" if amx else "DENSE_PANELS_NO_AMX", not amx)
    _check(lr, x, None, torch.bfloat16)
    assert calls == (["linear"] if amx else ["panels"])


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the built C++ extension")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_factors_beyond_decode_are_one_call_with_the_two_products_results(dtype, bias, monkeypatch):
    """Beyond the GEMV's tokens both low-rank factors run in one call (`dense_dense_mm`): without panels bit for
    bit two F.linear (the path it replaced), with panels two `dense_panels_mm` and the bias after; a request for
    the pure-torch path (no C++) still gets two F.linear of its own."""
    g = torch.Generator().manual_seed(5)
    b = torch.randn(37, generator=g) if bias else None
    lr = LowRankLinear(torch.randn(70, 9, generator=g), torch.randn(9, 37, generator=g), b, dtype)
    x = _inputs(70, dtype, (2, 13))
    ext, calls = _build.loaded(), []
    pair = ext.dense_dense_mm
    monkeypatch.setattr(ext, "dense_dense_mm", lambda *a: calls.append(a[-1]) or pair(*a))
    monkeypatch.setattr(kernels.policy, "amx", lambda: False)
    Ut, Vt = lr.runtime()
    bb = None if b is None else b.to(dtype)
    got = lr(x)
    assert calls == [False] and torch.equal(got, F.linear(F.linear(x, Ut), Vt, bb))
    lr.kernel_path = "torch"
    assert torch.equal(lr(x), got) and calls == [False]
    if dtype == torch.bfloat16:
        panels = ext.dense_panels_mm(ext.dense_panels_mm(x, Ut), Vt)
        assert torch.equal(pair(x, Ut, Vt, b, True), panels if b is None else panels + bb)
    _check(lr, x, None, dtype)


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the built C++ extension")
def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_one():
    """torch's FileBaton `lock` file outlives a process killed mid-build; the next build must not wait on it.
    The leftover is planted in this session's own build directory (under the builds' flock, as a build would
    hold it), so the next process finds everything up to date: no recompile, only the stale lock."""
    import fcntl
    import subprocess
    import sys
    built = _build.build_dir()  # built by this session already (the extension is loaded)
    with open(built / ".sparselm-build.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (built / "lock").write_text("")  # what a SIGKILLed build leaves behind
    code = "from sparselm.kernels import _build; assert _build._build() is not None"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert not (built / "lock").exists()


def test_checkouts_of_the_same_source_share_one_build_command(tmp_path, monkeypatch):
    """ninja rebuilds when the command changes: two checkouts (worktrees) of one source must hand torch the
    same source path, the copy inside the content-addressed build directory."""
    from torch.utils import cpp_extension
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "ext")
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    for checkout in ("a", "b"):
        src = tmp_path / checkout / "masked.cpp"
        src.parent.mkdir()
        src.write_bytes(_build._SOURCE.read_bytes())
        monkeypatch.setattr(_build, "_SOURCE", src)
        assert _build._build() == "ext"
    assert calls[0] == calls[1]
    (source,) = calls[0]["sources"]
    assert source.startswith(calls[0]["build_directory"]) and open(source, "rb").read() == src.read_bytes()


# --- instruction-set levels (SPARSELM_ISA) ---------------------------------------------------------------
@pytest.fixture(params=_build.LEVELS)
def isa(request, monkeypatch):
    """Each kernel level this CPU runs, chosen through ``SPARSELM_ISA`` (one build serves every level)."""
    if not kernels.extension_available():
        pytest.skip("the C++ kernels could not be built here")
    if _build.LEVELS.index(request.param) > _build.LEVELS.index(_build.cpu_level()):
        pytest.skip(f"this CPU does not run the {request.param} kernels")
    monkeypatch.setenv("SPARSELM_ISA", request.param)
    return request.param


def _expected(isa: str, kind: int, group: int) -> str:
    """The level a masked product must take under the cap ``isa``: the cap, stepped down while a step of its
    columns (16 for AVX-512: half a 32-column chunk; 8 for AVX2) would straddle two quantization groups of a
    grouped kind."""
    chunk = {"avx512": 16, "avx2": 8}
    while isa != "scalar" and kind in (masked.INT8G, masked.INT4) and group % chunk[isa]:
        isa = _build.LEVELS[_build.LEVELS.index(isa) - 1]
    return isa


# every value kind, groups that fit each level's chunk and groups that do not
LEVEL_STORES = [(Storage(), torch.float32), (Storage(CoefStorage.BF16), torch.bfloat16),
                (Storage(CoefStorage.FP16), torch.bfloat16), (Storage(CoefStorage.INT8), torch.bfloat16),
                (Storage(CoefStorage.BF16_14BIT), torch.bfloat16), (Storage(CoefStorage.INT8, 32), torch.bfloat16),
                (Storage(CoefStorage.INT8, 24), torch.float32), (Storage(CoefStorage.INT8, 12), torch.bfloat16),
                (Storage(CoefStorage.INT4), torch.bfloat16), (Storage(CoefStorage.INT4, 16), torch.float32),
                (Storage(CoefStorage.INT4, 64), torch.bfloat16)]


def test_isa_cap_sets_the_reported_levels(isa):
    assert _build.cpu_level() in _cpu_levels()
    assert _build.dense_level() == isa
    expect = {(masked.KIND[torch.bfloat16], 0): isa, (masked.P14, 0): isa, (masked.INT8, 0): isa,
              (masked.INT8G, 64): isa, (masked.INT4, 0): isa, (masked.INT8G, 12): "scalar",
              (masked.INT4, 24): "scalar" if isa == "scalar" else "avx2"}  # 24 columns: no 16-column step
    assert {k: _build.gemv_level(*k) for k in expect} == expect


@needs_ext
def test_no_cap_runs_the_best_the_cpu_has_and_a_bad_cap_is_refused(monkeypatch):
    from sparselm.errors import InputError
    monkeypatch.delenv("SPARSELM_ISA", raising=False)
    assert _build.dense_level() == _build.cpu_level() == _build.gemv_level(masked.KIND[torch.float32])
    monkeypatch.setenv("SPARSELM_ISA", "AVX2")  # any case
    assert _build.isa() == 1
    monkeypatch.setenv("SPARSELM_ISA", "sse4")
    m = SparseLinear(torch.randn(4, 8), torch.rand(4, 8) < 0.5)
    with pytest.raises(InputError, match=r"SPARSELM_ISA='sse4'.*avx512, avx2, scalar"):
        m(torch.randn(1, 8))


@pytest.mark.parametrize("store, dtype", LEVEL_STORES, ids=[str(s) for s, _ in LEVEL_STORES])
@pytest.mark.parametrize("tokens", [(1,), (3,), (2, 20)])  # the GEMV (batch 1, a few tokens) and the panels
def test_every_level_matches_reference(isa, store, dtype, tokens):
    """Each level under the cap, for every value kind, on a layer whose width is no multiple of 8 or 32."""
    torch.manual_seed(0)
    W, mask = torch.randn(45, 150), torch.rand(45, 150) < 0.5
    m = SparseLinear(W, mask, torch.randn(45), None, dtype, store)
    rt = m.runtime()
    assert _build.gemv_level(rt.kind, rt.group) == _expected(isa, rt.kind, rt.group)
    for path in ("gemv", "panel"):
        _check(m, _inputs(150, dtype, tokens), path, dtype)
    lr = LowRankLinear(torch.randn(70, 9), torch.randn(9, 33), torch.randn(33), torch.bfloat16)
    x = _inputs(70, torch.bfloat16, tokens)
    _check(lr, x, None, torch.bfloat16)
    if tokens != (2, 20):
        assert kernels.policy.dense_path(x, lr.U.t().contiguous()) == ("torch" if isa == "scalar" else "gemv")


@needs_ext
def test_the_cap_reaches_the_gemv(monkeypatch):
    """The scalar level sums each row in column order, one float32 rounding per product and per sum (checked
    against that sum written out); the SIMD levels sum in their own orders, so every level's bits differ."""
    torch.manual_seed(0)
    W, mask = torch.randn(45, 150), torch.rand(45, 150) < 0.5
    rt = SparseLinear(W, mask, None, None, torch.float32).runtime()
    x = torch.randn(1, 150)
    Wm = W * mask
    acc = torch.zeros(45)
    for c in range(150):
        acc = acc + Wm[:, c] * x[0, c]
    got = {}
    for level in _build.LEVELS[:_build.LEVELS.index(_build.cpu_level()) + 1]:
        monkeypatch.setenv("SPARSELM_ISA", level)
        got[level] = masked.matmul_gemv(x, rt)[0]
    assert torch.equal(got["scalar"], acc)
    for a in got:
        for b in got:
            assert a == b or not torch.equal(got[a], got[b]), (a, b)


UNPACK_STORES = [Storage(), Storage(CoefStorage.BF16), Storage(CoefStorage.FP16), Storage(CoefStorage.INT8),
                 Storage(CoefStorage.BF16_14BIT), Storage(CoefStorage.INT8, 32), Storage(CoefStorage.INT8, 24),
                 Storage(CoefStorage.INT4), Storage(CoefStorage.INT4, 16), Storage(CoefStorage.INT4, 12)]


@needs_ext
@pytest.mark.parametrize("store", UNPACK_STORES, ids=str)
@pytest.mark.parametrize("cols", [7, 45, 130])
def test_unpack_gives_the_same_bits_on_every_level(store, cols):
    """The prefill panels' unpack: AVX-512, AVX2 and scalar write the same bits into fp32, bf16 and fp16 panels
    (rows 3..16 of 19, a full row and an empty one among them, widths no multiple of 8)."""
    torch.manual_seed(cols)
    W, mask = torch.randn(19, cols), torch.rand(19, cols) < 0.5
    mask[4], mask[5] = True, False
    dtype = torch.float32 if store == Storage() else torch.bfloat16
    rt = SparseLinear(W, mask, None, None, dtype, store).runtime()
    levels = range(_build.LEVELS.index(_build.cpu_level()) + 1)
    for out_dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16), (torch.float16, torch.int16)):
        outs = []
        for level in levels:
            out = torch.full((13, cols), float("nan"), dtype=out_dtype)
            _build.loaded().masked_unpack(rt.mask, rt.offsets, rt.values, rt.kind, rt.scale, rt.zero, rt.group,
                                          rt.rows, rt.cols, 3, 16, out, level, rt.block)
            outs.append(out.view(bits))
        assert all(torch.equal(o, outs[0]) for o in outs), out_dtype
        assert torch.equal(outs[0].view(out_dtype), masked.panel_torch(rt, 3, 16, out_dtype)), out_dtype


@needs_ext
@pytest.mark.parametrize("amx", [False, True])
def test_the_gemv_hands_over_to_panels_earlier_on_amx_cpus(amx, monkeypatch):
    """With AMX tiles oneDNN's GEMM makes unpack + GEMM win from fewer tokens (`policy.GEMV_MAX_TOKENS_AMX`)."""
    monkeypatch.setattr(kernels.policy, "amx", lambda: amx)
    limit = kernels.policy.GEMV_MAX_TOKENS_AMX if amx else kernels.policy.GEMV_MAX_TOKENS
    assert kernels.policy.GEMV_MAX_TOKENS_AMX < kernels.policy.GEMV_MAX_TOKENS
    assert [kernels.policy.masked_path(t) for t in (1, limit, limit + 1)] == ["gemv", "gemv", "panel"]


@needs_ext
@pytest.mark.parametrize("amx", [False, True])
def test_dense_factors_leave_the_gemv_at_the_cpus_limit(amx, monkeypatch):
    """bf16 dense factors: the C++ GEMV up to 8 tokens on a native-bf16 CPU without AMX, up to 4 with AMX
    (`policy.dense_gemv_max_tokens`); beyond, the per-thread GEMMs with AMX, one F.linear without."""
    monkeypatch.setattr(kernels.policy, "amx", lambda: amx)
    monkeypatch.setattr(kernels.policy, "native_bf16", lambda: True)
    limit = kernels.policy.dense_gemv_max_tokens()
    assert limit == (kernels.policy.DENSE_GEMV_MAX_TOKENS if amx else kernels.policy.DENSE_GEMV_MAX_TOKENS_NO_AMX)
    W = torch.randn(24, 40).to(torch.bfloat16)
    paths = [kernels.policy.dense_path(torch.randn(t, 40).to(torch.bfloat16), W) for t in (1, limit, limit + 1)]
    assert paths == ["gemv", "gemv", "panel" if amx else "torch"]


@needs_ext
@pytest.mark.parametrize("store", [Storage(CoefStorage.INT4), Storage(CoefStorage.INT4, 64), Storage(CoefStorage.INT4, 128),
                                   Storage(CoefStorage.INT8), Storage(CoefStorage.INT8, 64), Storage(CoefStorage.INT8, 128)],
                         ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 11])
def test_mask_free_int4_and_int8_read_their_codes_directly(store, tokens):
    """Mask-free int4 / int8 with groups of a multiple of 64 columns (or one scale per row) take the direct AVX-512
    paths (int4 against bf16 x: codes to bf16 by table, VDPBF16PS, zero points through Σx per group; int8: codes
    sign-extended and FMA'd, each group scaled once): the dense product of the stored weight, to the output's
    rounding, for whole-row groups, several groups, and token blocks of 8 and a remainder alike."""
    if _build.cpu_level() != "avx512":
        pytest.skip("the direct paths are AVX-512 only")
    torch.manual_seed(0)
    m = LowRankLinear(torch.randn(256, 64), torch.randn(64, 96), None, torch.bfloat16, store)
    Ut, _ = m.runtime()  # (64, 256): every row several 64-column chunks
    x = torch.randn(tokens, 256).to(torch.bfloat16)
    dense = x.float() @ masked.panel_torch(Ut, 0, Ut.rows, torch.float32).T
    got = masked.matmul_gemv(x, Ut)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), dense, rtol=8e-3, atol=1e-3 * float(dense.abs().max()))
    torch.testing.assert_close(masked.matmul_gemv(x.float(), Ut), dense, rtol=1e-5, atol=1e-4)  # fp32 x


def test_cpu_name_reads_cpuinfo_and_falls_back_without_it(monkeypatch, tmp_path):
    from sparselm import device
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    assert device.cpu_name() == "Test CPU 9000 x2"
    info.write_text("processor\t: 0\n")  # no model name (some ARM kernels)
    monkeypatch.setattr("platform.processor", lambda: "")
    assert device.cpu_name() == "unknown"
