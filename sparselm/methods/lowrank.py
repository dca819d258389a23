"""Low-rank factorization: truncated SVD, ASVD (Yuan et al. 2023) and SVD-LLM (Wang et al. 2024).

All three return ``Wᵀ ≈ U V`` with ``U`` ``(in, r)`` and ``V`` ``(r, out)`` (`Factored`), ``r`` sized by
`formats.rank_for_ratio` so the stored bytes of the two factors (in ``spec.storage``) are ``≤ 1 − ratio`` of
the dense weight (a ratio that leaves no room for rank 1 is refused). The factors are rounded to their storage
when stored (round to nearest; the reported errors are before rounding).
Singular values are split symmetrically (``√σ`` to each factor) so both factors are equally scaled.

* ``svd``: data-free, min ``‖W − Ŵ‖_F``: truncated SVD of ``Wᵀ``.
* ``asvd``: min ``‖(W − Ŵ) S‖_F`` with ``S = diag(m^α)``, ``m`` a per-input-channel activation magnitude.
  ASVD uses the mean ``|x|``; we only keep the Gram, so ``m`` is the RMS ``√(‖x_j‖²/tokens)`` (same role,
  a slightly larger weight on spiky channels). SVD of ``S Wᵀ``, then ``S⁻¹`` folded back into ``U``.
* ``svd-llm``: min ``‖X(W − Ŵ)ᵀ‖_F`` exactly (truncation-aware whitening): SVD of ``L Wᵀ`` with
  ``LᵀL = XᵀX``, truncate, ``U = L⁻¹ U_r √Σ_r`` by a triangular solve. The squared functional error equals
  the sum of the discarded ``σ²`` (for the shifted Gram if whitening had to shift it; the shift is recorded).
"""
from __future__ import annotations

import torch

from .. import formats
from ..capture import LinearStats
from ..config import ASVDSpec, SVDLLMSpec, SVDSpec
from ..errors import InputError
from . import Factored, register
from .whiten import Whitening, whiten

MAG_FLOOR = 1e-6  # ASVD: channel magnitudes below this fraction of the largest are raised to it


def _rank(spec, W: torch.Tensor, dtype: torch.dtype) -> int:
    out_f, in_f = W.shape
    r = formats.rank_for_ratio(spec.target.value, in_f, out_f, dtype, spec.store)
    if r < 1:
        raise InputError(f"{spec.name}: ratio {spec.target.value} leaves no room for one rank of a {out_f}x{in_f} "
                         f"layer ({formats.lowrank_bytes(in_f, out_f, 1, dtype, spec.store)} bytes in {dtype}, "
                         f"{spec.store} values)", "use a smaller --ratio, or exclude the layer (ignore pattern)")
    return r


def truncated_factors(A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A`` ``(in, out)`` ≈ ``P Q`` with ``P = U_r √Σ_r`` ``(in, r)``, ``Q = √Σ_r V_rᵀ`` ``(r, out)``;
    also returns all singular values (float64, descending)."""
    U, sig, Vh = torch.linalg.svd(A.to(torch.float64), full_matrices=False)  # (in, m), (m,), (m, out)
    root = sig[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r], sig  # (in, r), (r, out), (m,)


def _need_stats(stats: LinearStats | None, method: str) -> LinearStats:
    if stats is None:
        raise InputError(f"method {method!r} needs calibration statistics", "run it through the pipeline with --calib")
    return stats


@register(SVDSpec)
def svd(W: torch.Tensor, stats: LinearStats | None, spec: SVDSpec, dtype: torch.dtype) -> Factored:
    """Data-free truncated SVD of ``Wᵀ``: min ``‖W − Ŵ‖_F`` at rank ``r``."""
    r = _rank(spec, W, dtype)
    P, Q, sig = truncated_factors(W.T, r)
    err = float(sig[r:].square().sum().sqrt() / sig.square().sum().sqrt().clamp_min(1e-300))
    return Factored(P.float(), Q.float(), {"rank": r, "rel_error": err}, spec.store)


def channel_scale(stats: LinearStats, alpha: float) -> tuple[torch.Tensor, float]:
    """ASVD's ``diag(S)`` ``(in,)`` float64 = RMS activation per input channel to the ``alpha``, floored.

    Returns the scale and the floor applied (0.0 when no channel was raised). All-zero activations give
    ``S = I`` (plain SVD)."""
    rms = (stats.sq_norms.to(torch.float64) / max(stats.count, 1)).clamp_min(0).sqrt()  # (in,)
    top = float(rms.max()) if rms.numel() else 0.0
    if top <= 0.0:
        return torch.ones_like(rms), 1.0
    floor = MAG_FLOOR * top
    raised = bool((rms < floor).any())
    return rms.clamp_min(floor).pow(alpha), (floor if raised else 0.0)


@register(ASVDSpec)
def asvd(W: torch.Tensor, stats: LinearStats | None, spec: ASVDSpec, dtype: torch.dtype) -> Factored:
    """Activation-aware SVD: SVD of ``S Wᵀ`` (``S`` = channel scale), ``U = S⁻¹ U_r √Σ_r``."""
    stats = _need_stats(stats, "asvd")
    r = _rank(spec, W, dtype)
    scale, floor = channel_scale(stats, spec.alpha)  # (in,)
    scale = scale.to(W.device)
    P, Q, _ = truncated_factors(scale[:, None] * W.T.to(torch.float64), r)  # (in, r), (r, out)
    U = P / scale[:, None]  # (in, r)
    return Factored(U.float(), Q.float(), {"rank": r, "alpha": spec.alpha, "magnitude_floor": floor,
                                           "channel_magnitude": "rms"}, spec.store)


@register(SVDLLMSpec)
def svd_llm(W: torch.Tensor, stats: LinearStats | None, spec: SVDLLMSpec, dtype: torch.dtype) -> Factored:
    """SVD-LLM: truncated SVD of the whitened ``L Wᵀ``, mapped back by ``L⁻¹`` (triangular solve)."""
    stats = _need_stats(stats, "svd-llm")
    r = _rank(spec, W, dtype)
    wh = whiten(stats)
    wh = Whitening(wh.L.to(W.device), wh.shift)  # (the whitening may be shared: not moved in place)
    P, Q, sig = truncated_factors(wh.apply(W.T), r)  # (in, r), (r, out)
    U = wh.unapply(P)  # (in, r)
    total = float(sig.square().sum())
    discarded = float(sig[r:].square().sum())
    rel = (discarded / total) ** 0.5 if total > 0 else 0.0
    return Factored(U.float(), Q.float(), {"rank": r, "whitening_shift": wh.shift,
                                           "discarded_energy": discarded, "rel_error": rel}, spec.store)
