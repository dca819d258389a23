"""ROCKET's per-factorization mask and coefficient energies as compiled loops (numba), for the knapsack's
option tables on CPU: the same sets and sums as `rocket.sparse_mask` + ``C * mask`` + `rocket.sq_norm`.

Why compiled. A table factorizes one whitened SVD some 35 times (14 ratios, about 2.5 ks each). Each
factorization's products run at the machine's float32 peak, but the work around them — the top ``keep``
atoms per column from the layer's ranking, the refill's sampled threshold, ``C_s = C ∘ mask`` and its energy —
took as long again in separate torch passes over ``(k, out)`` arrays. Here the ranking walk stops at each
column's ``keep``-th atom, one pass writes the mask and ``C_s``, and the squared norms accumulate in float64
as they are read (torch's float64 norm of float32 data is 15× slower than float32, hence `rocket.sq_norm`'s
runs). Measured one thread on SmolLM2's layers: docs/methods.md (ROCKET + knapsack profiling).

Semantics (twin tests against the torch forms): per column ``j``, the atoms ranked at or before ``p_j``, the
rank of the ``keep``-th atom below ``k`` in ``order[j]`` (`rocket.AtomRanking.top`); then the ``refill``
largest scores outside that mask (`rocket.largest`: the same set barring exact ties).
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a core dependency; this keeps exotic platforms working
    numba = None

STRIDE = 16  # the refill threshold's sample: every STRIDE-th entry, as `rocket.largest`
_DTYPES = (torch.float32, torch.int16, torch.int32)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the compiled forms can read these tensors: numba installed, CPU, float32 (or int16/int32 ranks)."""
    return numba is not None and all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors)


def masked_coefficients(order: torch.Tensor, position: torch.Tensor, coeffs: torch.Tensor, scores: torch.Tensor,
                        k: int, keep: int, refill: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(mask, C_s, ‖C_s‖²)`` for ``C = coeffs[:k]``: ``order`` ``(out, m)`` / ``position`` ``(m, out)`` the
    layer's atom ranking, ``coeffs`` ``(m, out)`` float32, ``scores`` ``(m, out)`` float32 the refill scores."""
    out_f = coeffs.shape[1]
    mask = np.empty((k, out_f), np.bool_)
    Cs = np.empty((k, out_f), np.float32)
    _masked(order.numpy(), position.numpy(), coeffs.contiguous().numpy(), scores.contiguous().numpy(), k, keep,
            refill, STRIDE, mask, Cs)
    return torch.from_numpy(mask), torch.from_numpy(Cs), float(_energy(Cs.reshape(-1)))


def sq_norm(x: torch.Tensor) -> float:
    """``‖x‖²`` of a float32 CPU tensor (contiguous, or its transpose is), squares summed in float64."""
    flat = (x if x.is_contiguous() or x.dim() < 2 else x.mT).contiguous().reshape(-1)  # a column-major x: no copy
    return float(_energy(flat.numpy()))


def _energy_loop(x):  # pragma: no cover - runs compiled
    # eight float64 lanes in a fixed order (3x faster than one running sum; numba's float() of a float32 stays
    # float32, hence np.float64). Not fastmath: its reassociated sum depends on the array's alignment.
    n = x.size - x.size % 8
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    for i in range(0, n, 8):
        v0, v1, v2, v3 = np.float64(x[i]), np.float64(x[i + 1]), np.float64(x[i + 2]), np.float64(x[i + 3])
        v4, v5, v6, v7 = np.float64(x[i + 4]), np.float64(x[i + 5]), np.float64(x[i + 6]), np.float64(x[i + 7])
        a0 += v0 * v0
        a1 += v1 * v1
        a2 += v2 * v2
        a3 += v3 * v3
        a4 += v4 * v4
        a5 += v5 * v5
        a6 += v6 * v6
        a7 += v7 * v7
    s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for i in range(n, x.size):
        v = np.float64(x[i])
        s += v * v
    return s


def _masked_loop(order, position, C, scores, k, keep, refill, stride, mask, Cs):  # pragma: no cover - compiled
    out_f, m = order.shape
    p = np.full(out_f, -1, position.dtype)  # per column: the last rank kept
    if keep > 0:
        for j in range(out_f):
            cnt = 0
            for t in range(m):
                cnt += order[j, t] < k
                if cnt == keep:
                    p[j] = t
                    break
    for i in range(k):  # the top-keep mask and C_s, one pass
        for j in range(out_f):
            kept = position[i, j] <= p[j]
            mask[i, j] = kept
            Cs[i, j] = C[i, j] if kept else 0.0
    if refill == 0:
        return
    total = k * out_f
    sample = np.empty((total + stride - 1) // stride, np.float32)  # every stride-th entry outside the mask
    n_ok = 0
    for i in range(k):
        for j in range((-i * out_f) % stride, out_f, stride):  # the flat indices that are multiples of stride
            if not mask[i, j]:
                sample[n_ok] = scores[i, j]
                n_ok += 1
    q = min(2 * refill // stride + 1, n_ok)  # about 2·refill entries pass the q-th largest of the sample
    thr = np.partition(sample[:n_ok], n_ok - q)[n_ok - q] if q > 0 else -np.inf
    cap = 4 * refill + 2 * out_f  # room for a whole row past the expected 2·refill
    cand_v, cand_i = np.empty(cap, np.float32), np.empty(cap, np.int64)
    c = 0
    for i in range(k):
        hits = 0
        for j in range(out_f):  # counted first (this loop vectorizes): most rows have none, or few
            hits += (scores[i, j] >= thr) & (position[i, j] > p[j])
        if hits == 0:
            continue
        if c + hits >= cap:  # too many to hold (the branch-free writes need one spare): every allowed entry
            c = cap + 1
            break
        for j0 in range(0, out_f, 16):  # runs of 16: skip the empty ones, write the others branch-free
            j1 = min(j0 + 16, out_f)
            run = 0
            for j in range(j0, j1):
                run += (scores[i, j] >= thr) & (position[i, j] > p[j])
            if run == 0:
                continue
            for j in range(j0, j1):
                cand_v[c] = scores[i, j]
                cand_i[c] = i * out_f + j
                c += (scores[i, j] >= thr) & (position[i, j] > p[j])  # allowed: outside the top-keep mask
    if c < refill or c > cap:  # too few passed, or too many to hold: every allowed entry
        cand_v, cand_i = np.empty(total, np.float32), np.empty(total, np.int64)
        c = 0
        for i in range(k):
            for j in range(out_f):
                cand_v[c] = scores[i, j]
                cand_i[c] = i * out_f + j
                c += not mask[i, j]
    nth = np.partition(cand_v[:c], c - refill)[c - refill]  # the refill-th largest allowed score
    need = refill
    for strict in (True, False):  # the entries above it, then ties at it until refill are set
        for t in range(c):
            v = cand_v[t]
            if need > 0 and (v > nth if strict else v == nth):
                i, j = cand_i[t] // out_f, cand_i[t] % out_f
                mask[i, j] = True
                Cs[i, j] = C[i, j]
                need -= 1


if numba is not None:
    _energy = numba.njit(nogil=True, cache=True)(_energy_loop)
    _masked = numba.njit(nogil=True, cache=True)(_masked_loop)
