"""CoSpaDi: compression via sparse dictionary learning (arXiv 2509.22075; methods.md §2).

Objective: min ``‖X(W − Ŵ)ᵀ‖_F²`` over ``Ŵᵀ = D S``, ``D`` ``(in, k)`` dense and ``S`` ``(k, out)`` with
exactly ``s`` nonzeros per column. Whitening (``LᵀL = XᵀX``) turns it into plain dictionary learning on
``Y = L Wᵀ``: min ``‖Y − D_L S‖_F²``, solved by alternating sparse coding (``spec.coder``: exact batched OMP,
`omp`, the paper's; or hard-thresholding pursuit from dense products, `htp`; ``auto`` picks per layer,
`choose_coder`) and a dictionary update (``spec.dict_update``: K-SVD with power iterations, the paper's, or
MOD; `ksvd`) for ``spec.iters`` iterations, stopping early when the relative improvement falls below
``spec.tol``; the best pair seen is kept. Then ``D = L⁻¹ D_L`` (triangular solve).

Sizing (``ρ = k/s``): the largest ``k`` whose *stored bytes* fit ``(1 − ratio)·in·out·bytes(dtype)``:
``D`` in ``spec.dict_storage`` (the model dtype by default) + ``s·out`` coefficient values in ``spec.storage`` (+ fp16 scales per output
channel or per ``quant_group`` atoms for int8/int4, + int4 zero points) + the ``k·out`` bitmask, with ``s = round(k/ρ)``: `formats.group_dict_bytes`, the formula
`SparseDictLinear` counts itself by.
`paper_sizes` is the paper's Eq. 11 (``k = (1−γ)·d1·d2/(d1 + d2/ρ)``, ``s = k/ρ``); for bf16 with 14-bit
coefficients and ρ = 2 the two agree. The paper stores coefficients at 14 bits; sparselm's default is the model
dtype (the one storage rule of every format; ``storage: bf16-14bit`` is the paper's).

Coefficients are rounded to their storage format once, at the end (no refit after rounding); the reported
``rel_error`` is measured after rounding, with ``D`` as stored. ``D`` is stored in the model dtype unless
``spec.dict_storage`` says otherwise (the same choices as ``storage``; ``Dᵀ`` rows quantized along the inputs,
round to nearest, its bytes in the budget); then the coefficient values are first refit on their support to the
rounded ``D`` (`ksvd.refit_coefficients`, in the whitened space).

Grouped (cross-layer) sharing, §2.6: layers with the same ``in`` share one dictionary learned on
``[W_1ᵀ … W_mᵀ]`` whitened by the averaged Gram; each layer keeps its own slice of ``S``. The budget counts
``D`` once for the group. Every result holds the *same* ``D`` tensor; the pipeline records the group on its
layers, which share one ``D`` buffer, stored once.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch

from .. import formats
from ..capture import LinearStats
from ..config import CoefStorage, CoSpaDiSpec, DictUpdateRule, Init, SparseCoder, Storage
from ..device import low_precision
from ..errors import InputError
from ..packing import QParams, groups_per_row, masked_groups, round_grouped
from . import SparseDict, register, round_dense
from .htp import ALTERNATION_CG_STEPS, ALTERNATION_ROUNDS, htp_dense
from .ksvd import ksvd_update, mod_update, refit_coefficients
from .omp import omp
from .whiten import Whitening, whiten


# --- sizing ------------------------------------------------------------------------------------------
def paper_sizes(ratio: float, d_in: int, d_out: int, rho: float) -> tuple[int, int]:
    """CoSpaDi Eq. 11: ``k = ⌊(1−γ)·d1·d2/(d1 + d2/ρ)⌋``, ``s = ⌊k/ρ⌋`` (methods.md §2.4)."""
    k = max(1, int((1 - ratio) * d_in * d_out / (d_in + d_out / rho)))
    return k, max(1, int(k / rho))


def s_for(k: int, rho: float) -> int:
    return min(k, max(1, int(k / rho + 0.5)))


def sizes_for_ratio(ratio: float, d_in: int, d_outs: int | Sequence[int], rho: float, dtype: torch.dtype,
                    store: Storage, dict_store: Storage = formats.MODEL_DTYPE) -> tuple[int, int]:
    """Largest ``(k, s = round(k/ρ))`` whose stored bytes fit ``(1 − ratio)`` of the dense layers."""
    d_outs = [d_outs] if isinstance(d_outs, int) else list(d_outs)
    budget = (1 - ratio) * formats.dense_bytes(sum(d_outs), d_in, dtype)

    def fits(k: int) -> bool:
        nnz = [s_for(k, rho) * out for out in d_outs]
        return formats.group_dict_bytes(d_in, d_outs, k, nnz, store, dtype, dict_store) <= budget

    k = formats.largest(fits, int(budget // formats.dictionary_bytes(d_in, 1, dtype, dict_store)))
    if k < 1:
        raise InputError(f"cospadi ratio {ratio} leaves no room for even one atom ({d_in}x{sum(d_outs)})",
                         "use a smaller --ratio")
    return k, s_for(k, rho)


# --- dictionary learning -----------------------------------------------------------------------------
def init_dictionary(Y: torch.Tensor, k: int, init: Init, seed: int) -> torch.Tensor:
    """Unit-norm initial dictionary ``(n, k)``: random columns of ``Y`` or its top left singular vectors,
    padded (and zero columns replaced) with random Gaussian atoms. Random draws on the CPU (``seed``)."""
    n, cols = Y.shape
    gen = torch.Generator().manual_seed(seed)
    if init is Init.SVD:
        U, sig, _ = torch.linalg.svd(Y, full_matrices=False)  # (n, m), (m,)
        rank = int((sig > sig[0] * 1e-6).sum()) if sig.numel() and sig[0] > 0 else 0
        D = U[:, : min(k, rank)]  # (n, ≤k)
    else:
        perm = torch.randperm(cols, generator=gen)[:k]
        D = Y[:, perm.to(Y.device)]  # (n, ≤k)
    pad = torch.randn(n, k - D.shape[1], generator=gen).to(Y)
    D = torch.cat([D, pad], 1)  # (n, k)
    norms = D.norm(dim=0)
    dead = norms <= 1e-12 * max(float(norms.max()), 1e-30)
    if dead.any():
        D[:, dead] = torch.randn(n, int(dead.sum()), generator=gen).to(Y)
        norms = D.norm(dim=0)
    return D / norms


@dataclass
class Learned:
    """Best ``D`` ``(n, k)``, ``S`` ``(k, cols)``, support ``mask``; relative errors ``‖Y−DS‖²/‖Y‖²``."""
    D: torch.Tensor
    S: torch.Tensor
    mask: torch.Tensor
    history: list[float]  # after the first sparse coding, after each iteration, after a final refit if any
    iterations: int

    @property
    def rel_error(self) -> float:
        return min(self.history) ** 0.5


Coder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # D -> (S, mask)
# (D, S, mask) -> (D, S, ‖Y − DS‖² or None): an update that measured its objective exactly saves a product
Updater = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, float | None]]
Finisher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (D, S, mask) -> S


def alternate(Y: torch.Tensor, D: torch.Tensor, iters: int, tol: float | None, code: Coder,
              update: Updater, finish: Finisher | None = None, patience: int = 1) -> Learned:
    """Sparse coding then dictionary update, ``iters`` times; keeps the best pair; stops when the relative
    improvement over the best so far has been below ``tol`` for ``patience`` iterations in a row (``None``:
    never early; a coder that may raise the error for an iteration, as HTP's cold restarts, needs patience).
    ``finish`` may improve the best pair's values at the end (kept only if the error does not grow)."""
    y2 = float(Y.double().square().sum()) or 1.0

    def rel(D, S):
        return float((Y - D @ S).double().square().sum()) / y2

    S, mask = code(D)
    history = [rel(D, S)]
    best = (D, S, mask)
    ran = stale = 0
    for it in range(iters):
        prev = min(history)
        D, S, obj = update(D, S, mask)
        history.append(rel(D, S) if obj is None else obj / y2)
        ran += 1
        if history[-1] < prev:
            best = (D, S, mask)
        stale = stale + 1 if tol is not None and prev - history[-1] < tol * prev else 0
        if stale >= patience:
            break
        if it + 1 < iters:
            S, mask = code(D)
    D, S, mask = best
    if finish is not None:
        S_fin = finish(D, S, mask)
        history.append(rel(D, S_fin))
        S = S_fin if history[-1] <= min(history[:-1]) else S
    return Learned(D, S, mask, history, ran)


def learn_dictionary(Y: torch.Tensor, D: torch.Tensor, s: int, iters: int, power_iters: int,
                     tol: float | None, block_size: int | None = None, coder: SparseCoder = SparseCoder.OMP,
                     dict_update: DictUpdateRule = DictUpdateRule.KSVD, warm_start: bool = False) -> Learned:
    """Fast engines: a sparse coder (batched exact OMP, `omp`, or hard-thresholding pursuit, `htp`), a dictionary
    update (block K-SVD, `ksvd_update`, or MOD, `mod_update`), and a final exact refit of the values. ``coder``
    AUTO asks `choose_coder`. HTP starts every iteration cold, from thresholded least squares; ``warm_start``
    also offers it the last update's support and values (better per pass, measured worse over the whole run:
    it keeps the supports where they were; docs/methods.md, Speed)."""
    k = D.shape[1]
    if coder is SparseCoder.AUTO:
        coder = choose_coder(Y.shape[0], k, s, Y.shape[1], Y.device)
    state: dict = {"warm": None}

    def code(D):
        if coder is SparseCoder.HTP:  # no float32 polish: the final exact refit (finish) sets the values
            return htp_dense(D, Y, s, ALTERNATION_ROUNDS, ALTERNATION_CG_STEPS, state["warm"], polish=0)
        codes = omp(D, Y, s)
        return codes.dense(k).to(Y.dtype), codes.mask(k)

    def update(D, S, mask):
        if dict_update is DictUpdateRule.MOD:  # MOD measures ‖Y − DS‖² after its step directly
            u = mod_update(Y, D, S, mask)
            obj = u.objective_after
        else:  # K-SVD tracks it from the accepted steps' changes: measured again here
            u, obj = ksvd_update(Y, D, S, mask, power_iters, block_size), None
        state["warm"] = (u.S, mask) if warm_start else None
        return u.D, u.S, obj

    def finish(D, S, mask):
        return refit_coefficients(Y, D, S, mask)

    return alternate(Y, D, iters, tol, code, update, finish, HTP_PATIENCE if coder is SparseCoder.HTP else 1)


HTP_PATIENCE = 3  # iterations without progress before HTP's alternation stops (measured: docs/methods.md, Speed)


# Cost model of one sparse-coding pass inside the alternation, in seconds per multiply-add, measured on this
# project's CPU (one core; docs/methods.md, Speed): exact OMP streams ``cols·k·s²/2`` multiply-adds at memory
# speed (4 G/s compiled at k = 460, less once a column's factor leaves L2); HTP's float32 products (``DᵀD``,
# ``DᵀY``, the start, ``G x`` before and after each of ``ROUNDS + 1`` refits) at matrix-multiply speed
# (15–35 G/s), its CG steps' products in bf16 (`htp.CG_DTYPE`; 100–230 G/s on this CPU's AVX-512 BF16). On
# GPUs the gap only widens (batched GEMM against batched GEMV).
OMP_SECONDS_PER_MAC = 1 / 4e9
GEMM_SECONDS_PER_MAC = 1 / 25e9
LOW_GEMM_SECONDS_PER_MAC = 1 / 150e9
HTP_SECONDS_PER_PASS = 3e-3  # its ~70 tensor operations' fixed cost (measured 4 ms at k = 32, 100 columns)


def coder_macs(n: int, k: int, s: int, cols: int, rounds: int = ALTERNATION_ROUNDS,
               cg_steps: int = ALTERNATION_CG_STEPS) -> dict[str, float]:
    """Multiply-adds of one coding pass: ``omp`` (Batch-OMP's reads of its factor, and ``DᵀY``); HTP's float32
    products ``htp`` and its CG steps' low-precision products ``htp_low`` (`htp.htp_rows`, no polish)."""
    refits = rounds + 1
    return {"omp": cols * k * (s * s / 2 + n),
            "htp": k * k * n + n * k * cols + k ** 3 + k * k * cols * (1 + 2 * refits),
            "htp_low": k * k * cols * cg_steps * refits}


def coder_cost(n: int, k: int, s: int, cols: int, device: torch.device | None = None) -> dict[SparseCoder, float]:
    """Estimated seconds of one coding pass by each coder (`coder_macs` at the rates above; the CG steps at the
    float32 rate where ``device`` has no native bf16, `device.low_precision`)."""
    m = coder_macs(n, k, s, cols)
    low = LOW_GEMM_SECONDS_PER_MAC if low_precision(device or torch.device("cpu")) else GEMM_SECONDS_PER_MAC
    return {SparseCoder.OMP: m["omp"] * OMP_SECONDS_PER_MAC,
            SparseCoder.HTP: HTP_SECONDS_PER_PASS + m["htp"] * GEMM_SECONDS_PER_MAC + m["htp_low"] * low}


def choose_coder(n: int, k: int, s: int, cols: int, device: torch.device | None = None,
                 shifted: bool = False) -> SparseCoder:
    """The coder ``coder: auto`` runs for a layer: exact OMP when the whitening needed a diagonal shift
    (rank-deficient calibration: a near-singular ``L`` makes the dictionary too coherent for HTP's CG refits;
    measured up to 1.8× OMP's error there), else the cheaper of `coder_cost` on ``device``."""
    if shifted:
        return SparseCoder.OMP
    cost = coder_cost(n, k, s, cols, device)
    return SparseCoder.HTP if cost[SparseCoder.HTP] < cost[SparseCoder.OMP] else SparseCoder.OMP


# --- the method --------------------------------------------------------------------------------------
def round_coefficients(S: torch.Tensor, mask: torch.Tensor, store: Storage, dtype: torch.dtype,
                       chunk: int = 1 << 22) -> tuple[torch.Tensor, QParams | None]:
    """``S`` ``(k, out)`` as it reads back from `SparseDictLinear` (values of ``Sᵀ`` by output channel, grouped
    along ``k``), and the int8/int4 parameters used (None for float storages). Chunks of whole rows of ``Sᵀ``."""
    St, Mt = S.T.contiguous(), mask.T  # (out, k)
    out = torch.zeros_like(St)
    per_group = groups_per_row(Mt.shape[1], store.group)
    per_row = max(1, chunk // max(1, int(Mt[0].sum()) if Mt.numel() else 1))
    scales, zeros = [], []
    for a in range(0, St.shape[0], per_row):
        m = Mt[a : a + per_row]
        groups, n = masked_groups(m, store.group)
        vals, params = round_grouped(St[a : a + per_row][m], groups, n, store.kind, dtype)
        out[a : a + per_row][m] = vals.to(St)
        if params is not None:
            scales.append(params.scale)
            zeros.append(params.zero)
    assert not scales or sum(s.numel() for s in scales) == St.shape[0] * per_group
    if not scales:
        return out.T, None
    return out.T, QParams(torch.cat(scales), None if zeros[0] is None else torch.cat(zeros))


def stored_dictionary(D: torch.Tensor, dict_store: Storage, dtype: torch.dtype) -> torch.Tensor:
    """``D`` ``(in, k)`` as `SparseDictLinear` reads it back: in the model dtype, or ``Dᵀ`` rows rounded to
    ``dict_store`` (round to nearest, one scale per atom or per group of its inputs)."""
    if dict_store.kind is CoefStorage.DTYPE:
        return D.to(dtype).float()
    return round_dense(D.T, dict_store).T.float()


def _whitening(stats: list[LinearStats | None], d_in: int, device: torch.device) -> Whitening:
    if any(s is None for s in stats):
        if not all(s is None for s in stats):
            raise InputError("cospadi got statistics for only some layers of a group", "capture all or none")
        return Whitening(torch.eye(d_in, dtype=torch.float64, device=device), 0.0)  # CoSpaDi† (data-free)
    avg = stats[0] if len(stats) == 1 else LinearStats.average(stats)
    wh = whiten(avg)
    return Whitening(wh.L.to(device), wh.shift)


def factorize_group(weights: list[torch.Tensor], stats: list[LinearStats | None], spec: CoSpaDiSpec,
                    dtype: torch.dtype, learner: Callable[..., Learned] | None = None) -> list[SparseDict]:
    """CoSpaDi on one layer or a group sharing ``in``: one dictionary, per-layer coefficients."""
    d_in = weights[0].shape[1]
    if any(W.shape[1] != d_in for W in weights):
        raise InputError(f"cospadi group mixes in_features {[W.shape[1] for W in weights]}",
                         "share dictionaries only between projections of the same input size")
    device = weights[0].device
    outs = [W.shape[0] for W in weights]
    k, s = sizes_for_ratio(spec.target.value, d_in, outs, spec.rho, dtype, spec.store, spec.dict_store)
    wh = _whitening(stats, d_in, device)
    Y64 = wh.apply(torch.cat([W.T for W in weights], 1))  # (in, Σout) float64
    Y = Y64.float()
    D0 = init_dictionary(Y, k, spec.init, spec.seed)
    coder = spec.coder
    if learner is None:
        if coder is SparseCoder.AUTO:
            coder = choose_coder(d_in, k, s, Y.shape[1], device, shifted=wh.shift > 0)
        learner = partial(learn_dictionary, coder=coder, dict_update=spec.dict_update)
    learned = learner(Y, D0, s, spec.iters, spec.power_iters, spec.tol)
    D = wh.unapply(learned.D).float()  # (in, k)
    D_read = stored_dictionary(D, spec.dict_store, dtype)  # (in, k): D as it reads back
    D_stored = (wh.L @ D_read.double()).float()  # (in, k): L·D as stored, for the reported error
    S_all = learned.S
    if spec.dict_store.kind is not CoefStorage.DTYPE:  # the values refit on their support to the rounded D
        S_all = refit_coefficients(Y, D_stored, learned.S, learned.mask)
    results, start = [], 0
    common = {"whitening_shift": wh.shift, "data_free": stats[0] is None, "k": k, "s": s, "rho": spec.rho,
              "iterations": learned.iterations, "group_rel_error": learned.rel_error, "group_size": len(weights),
              "shared_dictionary": len(weights) > 1, "init": spec.init.value,
              "coder": coder.value, "dict_update": spec.dict_update.value,
              "error_history": [round(h ** 0.5, 6) for h in learned.history], "dict_storage": str(spec.dict_store)}
    for out in outs:
        S_l, M_l = S_all[:, start : start + out], learned.mask[:, start : start + out]  # (k, out)
        S_l, params = round_coefficients(S_l, M_l, spec.store, dtype)
        Y_l = Y64[:, start : start + out]  # (in, out)
        err = float((Y_l - D_stored.double() @ S_l.double()).norm() / Y_l.norm().clamp_min(1e-300))
        results.append(SparseDict(D, S_l, M_l.clone(), spec.store, {**common, "rel_error": err}, params,
                                  spec.dict_store))
        start += out
    return results


@register(CoSpaDiSpec, grouped=True)
def cospadi(weights: list[torch.Tensor], stats: list[LinearStats | None], spec: CoSpaDiSpec,
            dtype: torch.dtype) -> list[SparseDict]:
    """Registered entry point (a list of one weight is per-layer CoSpaDi)."""
    return factorize_group(weights, stats, spec, dtype)
