"""Per-layer option tables for the knapsack: ROCKET's profiling step (arXiv 2602.11008 §3; methods.md §4.4).

Objective: for one layer ``W`` ``(out, in)`` and each method spec × ratio on a grid, an `Option` with the
REAL stored bytes of the module the option would produce (bias excluded: it is the same for every option)
and its error, for `sparselm.budget.allocate`. A "no compression" option (dense bytes, error 0,
``payload=None``: keep the layer dense) is included unless ``dense=False``.

Error and normalization. The knapsack adds errors over layers, so they must share a unit:

    error_ℓ = w_ℓ · ‖X(W − Ŵ)ᵀ‖²_F / ‖XWᵀ‖²_F          (= w_ℓ · tr(ΔW G ΔWᵀ) / tr(W G Wᵀ))

The relative functional error is scale-free, so layers whose activations differ by orders of magnitude
(q_proj vs down_proj, early vs late blocks) are comparable — raw ``‖XΔWᵀ‖²`` is not. ``w_ℓ`` (``importance``)
says how much the layer's output matters; ``w = 1`` (the default) is ROCKET's choice (unweighted relative
error, though ROCKET measures it in weight space). `output_importance` gives ``w_ℓ = ‖X_ℓW_ℓᵀ‖² / R_ℓ``, which
turns the error into the *absolute* functional error in units of a reference energy ``R_ℓ`` (default: the
mean output energy over the layers profiled together; better: the energy of the residual stream the layer
writes into). Then a layer that contributes little output gets a small weight and is compressed more
(tests/test_profile.py checks both behaviours).

Fast paths (each with a twin test against `compress_weight`): SVD-LLM and ROCKET reuse ONE whitened SVD
per layer — SVD-LLM's error at rank r is the tail sum of σ², ROCKET runs `rocket.factorize` over the ks
grid of every ratio (a walk to the lowest error, `_Table.rocket`) and keeps the best ks per ratio (skipping ks
whose k would exceed min(in, out), as the ROCKET profiler does, unless none is left); magnitude and Wanda rank the scores once and cut the ranking per ratio.
GPTQ (quantization alone) is compressed once, at the grid's smallest ratio: its size is set by its storage, the
ratio is only a floor. Every other method, and every spec whose values are rounded to a storage the fast path does not model (pruning and
SVD-LLM: any storage but the model dtype; ROCKET: int8/int4), goes through `compress_weight` + the result's
`stored_bytes` (its format's formula) and error after rounding; the knapsack chooses among storages by listing a
method once per storage (e.g. ``rocket`` and ``rocket`` with ``storage: int8``) like any other option. CoSpaDi runs
there with ``COSPADI_PROBE_ITERS`` iterations on a grid thinned by ``COSPADI_GRID_STRIDE`` — every grid point is a
whole dictionary learning, so this keeps CoSpaDi's profiling near 1.5 full runs instead of 6 (its error only
falls with more iterations, so the profiled error is an
upper bound of the final one, and the ranking across ratios is what the knapsack needs). Whitened-path
errors are in the metric ``G + shift·I`` of `whiten` (shift 0 unless the Gram was singular; then tiny).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Mapping, Sequence

import torch

from . import formats
from .budget import Option
from .capture import LinearStats
from .config import CoefStorage, CoSpaDiSpec, GPTQSpec, MagnitudeSpec, MethodSpec, Ratio, RocketSpec, SVDLLMSpec, WandaSpec
from .errors import InputError
from .methods import compress_weight
from .methods.masks import kept_count
from .methods.rocket import factorize, keep_counts, rocket_size, whitened_svd
from .methods.wanda import wanda_score

log = logging.getLogger(__name__)
DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 15))  # 0.05 .. 0.70
DEFAULT_KS = (1.0, 1.5, 2.0, 2.5, 3.0)
COSPADI_PROBE_ITERS = 4  # CoSpaDi options are profiled with this many K-SVD iterations (error upper bound) ...
COSPADI_GRID_STRIDE = 2  # ... on every second ratio of a grid longer than 8 (0.1, 0.2, ..., 0.7 by default)
ROCKET_PRUNE_MARGIN = 1e-4  # of the layer's energy: slack of the rank bound against float32 rounding (`_Table.rocket`)
ROCKET_EXHAUSTIVE = False  # True: factorize every ks of a ratio instead of `_Table.rocket`'s unimodal search


def functional_error(dW: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(ΔW G ΔWᵀ) = ‖XΔWᵀ‖²_F`` for ``ΔW`` ``(out, in)`` and ``G`` ``(in, in)``, in float64."""
    d = dW.to(device=gram.device, dtype=torch.float64)
    return float(((d @ gram) * d).sum())


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, stats: LinearStats) -> float:
    """``‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖²``: the measured counterpart of a profiled option's error (importance 1)."""
    return functional_error(W - W_hat.to(W.dtype), stats.gram) / max(output_energy(W, stats), 1e-300)


def output_energy(W: torch.Tensor, stats: LinearStats) -> float:
    """``‖XWᵀ‖²_F = tr(W G Wᵀ)``: how much the layer writes on its calibration inputs."""
    return functional_error(W, stats.gram)


def output_importance(energy: Mapping[str, float],
                      reference: Mapping[str, float] | float | None = None) -> dict[str, float]:
    """Per-layer weights ``w_ℓ = E_ℓ / R_ℓ`` for `profile_layer` (``E`` from `output_energy`).

    ``reference`` ``R``: per layer, one number, or None for the mean of ``energy`` over all layers given.
    """
    if reference is None:
        reference = sum(energy.values()) / max(len(energy), 1)
    ref = reference if isinstance(reference, Mapping) else {n: reference for n in energy}
    return {n: e / ref[n] if ref[n] > 0 else 0.0 for n, e in energy.items()}


def profile_layer(W: torch.Tensor, stats: LinearStats | None, specs: Sequence[MethodSpec],
                  ratios: Sequence[float] = DEFAULT_RATIOS, dtype: torch.dtype = torch.float16, *,
                  importance: float = 1.0, ks_grid: Sequence[float] = DEFAULT_KS, dense: bool = True,
                  cache: dict | None = None, key: object = None) -> list[Option]:
    """Options for one layer ``W`` ``(out, in)``: every spec at every ratio, plus the dense option.

    ``cache`` keeps each spec's options under ``(key, spec without its target, dtype, grid, importance)``:
    options do not depend on the budget, so profiling the same layer (``key``: e.g. its name) with the same
    weights and statistics at another ratio reuses them. The caller guarantees that ``key`` identifies the
    weights and statistics."""
    W = W.float()
    out_f, in_f = W.shape
    opts = [Option(float(formats.dense_bytes(out_f, in_f, dtype)), 0.0, None)] if dense else []
    table = _Table(W, stats, dtype, importance)  # energy and the whitened SVD: once, on first use
    for spec in specs:
        entry = (key, spec.with_target(Ratio(0.5)), dtype, tuple(ratios), tuple(ks_grid), importance)
        if cache is not None and entry in cache:
            opts += cache[entry]
            continue
        if isinstance(spec, SVDLLMSpec) and spec.storage is CoefStorage.DTYPE:
            found = table.svdllm(spec, ratios)
        elif isinstance(spec, RocketSpec) and not spec.storage.quantized:
            found = table.rocket(spec, ratios, ks_grid)
        elif isinstance(spec, (MagnitudeSpec, WandaSpec)) and spec.storage is CoefStorage.DTYPE:
            found = table.pruning(spec, ratios)
        elif isinstance(spec, GPTQSpec):  # its size is set by its storage, not by the ratio: one option
            found = table.generic(spec, ratios[:1])
        elif isinstance(spec, CoSpaDiSpec):  # K-SVD converges slowly: profile a short run (an upper bound)
            grid = ratios[1::COSPADI_GRID_STRIDE] if len(ratios) > 8 else ratios
            found = table.generic(spec, grid, dataclasses.replace(spec, iters=min(spec.iters, COSPADI_PROBE_ITERS)))
        else:
            found = table.generic(spec, ratios)
        if cache is not None:
            cache[entry] = found
        opts += found
    return opts


def walk_down(n: int, start: int, error, bounded) -> None:
    """Evaluate ``error(pos)`` of grid positions ``0..n-1`` from ``start`` towards lower values, stopping at the
    first rise (or where ``bounded(pos)`` says it cannot be lower): the minimum of a unimodal sequence. Every
    position with ``ROCKET_EXHAUSTIVE``."""
    if ROCKET_EXHAUSTIVE:
        for pos in range(n):
            error(pos)
        return
    error(start)
    for step in (1, -1):  # unimodal: if one side falls, the other cannot
        pos = start
        while 0 <= pos + step < n and not bounded(pos + step) and error(pos + step) < error(pos):
            pos += step
        if pos != start:
            return


class _Table:
    """One layer's shared work (energy, the whitened SVD) and the per-method option builders."""

    def __init__(self, W: torch.Tensor, stats: LinearStats | None, dtype: torch.dtype, importance: float):
        self.W, self.raw_stats, self.dtype, self.importance = W, stats, dtype, importance
        # data-free (stats None): the error is measured in weight space (G = I)
        eye = torch.eye(W.shape[1], dtype=torch.float64, device=W.device)
        self.stats = stats if stats is not None else LinearStats(eye, 1)
        self._svd = None

    @functools.cached_property
    def energy(self) -> float:  # ‖XWᵀ‖², computed only when an option is built (not on cache hits)
        return output_energy(self.W, self.stats)

    def _error(self, err: float, energy: float | None = None) -> float:
        energy = self.energy if energy is None else energy
        return self.importance * err / energy if energy > 0 else 0.0

    def svd(self):
        if self.raw_stats is None:
            raise InputError("svd-llm and rocket got no calibration statistics for this layer",
                             "profile them with calibration data (--calib)")
        if self._svd is None:
            self._svd = whitened_svd(self.W, self.stats)
        return self._svd

    def svdllm(self, spec: SVDLLMSpec, ratios: Sequence[float]) -> list[Option]:
        """Rank ``formats.rank_for_ratio(r)``; error = Σ_{i≥rank} σ_i² of the whitened weight."""
        svd = self.svd()
        out_f, in_f = self.W.shape
        sq = svd.sigma ** 2  # (m,)
        tail = sq.flip(0).cumsum(0).flip(0)  # (m,) tail[i] = Σ_{j≥i} σ_j²
        energy = float(sq.sum())
        opts = []
        for r in ratios:
            rank = min(formats.rank_for_ratio(r, in_f, out_f, self.dtype), sq.numel())
            if rank < 1:
                continue
            err = float(tail[rank]) if rank < sq.numel() else 0.0
            opts.append(Option(float(formats.lowrank_bytes(in_f, out_f, rank, self.dtype)), self._error(err, energy),
                               spec.with_target(Ratio(r))))
        return opts

    def rocket(self, spec: RocketSpec, ratios: Sequence[float], ks_grid: Sequence[float]) -> list[Option]:
        """Best ks per ratio (lowest error) among ``ks_grid``, from `rocket.factorize` on the shared SVD.

        Search: at a fixed ratio the error is unimodal in ks (more atoms, fewer coefficients per atom: it falls,
        then rises; 392 of 392 (layer, ratio) pairs on four SmolLM2 blocks, every layer of the bundled model and
        MiniLM, `docs/methods.md`), and the best ks moves little from one ratio to the next. So each ratio starts
        at the previous ratio's best ks and walks towards lower errors, stopping at the first rise: about 3
        factorizations per ratio instead of one per ks. A step is also stopped without factorizing by the rank
        bound: whatever its mask and refit, an option with ``k`` atoms has error ≥ ``Σ_{i≥k} σ_i²`` (its
        ``D C`` has rank ≤ k: Eckart–Young), so a ks whose bound exceeds the best error found (by more than
        ``ROCKET_PRUNE_MARGIN`` of the energy, the float32 rounding of the closed-form errors) cannot be lower.
        ``ROCKET_EXHAUSTIVE`` factorizes every ks instead (the reference the tests compare with)."""
        svd = self.svd()
        out_f, in_f = self.W.shape
        sq = svd.sigma ** 2  # (m,)
        tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])  # (m + 1,) tail[k] = Σ_{i≥k} σ_i²
        energy = float(sq.sum())
        opts, start = [], ks_grid[0]
        for r in ratios:
            sized = []  # (spec, size) of every ks that fits, in grid order
            for ks in ks_grid:
                sp = dataclasses.replace(spec, target=Ratio(r), ks=ks)
                try:
                    sized.append((sp, rocket_size(r, ks, in_f, out_f, sp.store, self.dtype)))
                except InputError:
                    continue
            if any(not size.clipped for _, size in sized):  # a clipped ks is kept only when every ks is clipped:
                sized = [(sp, size) for sp, size in sized if not size.clipped]  # do not factorize the others
            if not sized:
                continue
            errors: dict[int, float] = {}  # grid position in `sized` -> error

            def error(pos: int) -> float:
                if pos not in errors:
                    sp, size = sized[pos]
                    keep, refill = keep_counts(size, out_f, sp)
                    errors[pos] = factorize(svd, size.k, keep, refill, sp.lam).error
                return errors[pos]

            def bounded(pos: int) -> bool:  # the rank bound says ks at ``pos`` cannot beat the best found
                return float(tail[sized[pos][1].k]) > min(errors.values()) + ROCKET_PRUNE_MARGIN * energy

            walk_down(len(sized), min(range(len(sized)), key=lambda p: abs(sized[p][0].ks - start)), error, bounded)
            best = min(errors, key=lambda p: (errors[p], p))  # ties go to the earlier ks
            sp, size = sized[best]
            keep, refill = keep_counts(size, out_f, sp)
            nbytes = formats.dict_bytes(in_f, out_f, size.k, keep * out_f + refill, sp.store, self.dtype)
            opts.append(Option(float(nbytes), self._error(errors[best], energy), sp))
            start = sp.ks
        return opts

    def pruning(self, spec: MethodSpec, ratios: Sequence[float]) -> list[Option]:
        """Magnitude (layer-wide) / Wanda (per row): one ranking of the scores, cut at each ratio's count."""
        W, (out_f, in_f) = self.W, self.W.shape
        per_row = isinstance(spec, WandaSpec)
        if per_row and self.raw_stats is None:
            raise InputError("method 'wanda' got no calibration statistics for this layer",
                             "profile it with calibration data, or use magnitude")
        score = wanda_score(W, self.stats.sq_norms) if per_row else W.abs()  # (out, in)
        flat = score if per_row else score.reshape(1, -1)  # (groups, size)
        order = flat.argsort(dim=-1, descending=True, stable=True)  # (groups, size); exact ties may differ from topk
        positions = torch.arange(flat.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, positions).view(out_f, in_f)  # (out, in) rank in group
        opts = []
        for r in ratios:
            try:
                kept = kept_count(Ratio(r), out_f, in_f, self.dtype, spec.store, per_row)
            except InputError:
                continue
            dW = W * (rank >= kept)  # (out, in) the pruned part
            nbytes = formats.sparse_bytes(out_f, in_f, kept * flat.shape[0], self.dtype)
            opts.append(Option(float(nbytes), self._error(functional_error(dW, self.stats.gram)),
                               spec.with_target(Ratio(r))))
        return opts

    def generic(self, spec: MethodSpec, ratios: Sequence[float], probe: MethodSpec | None = None) -> list[Option]:
        """Any registered method: compress at each ratio, measure the module's bytes and the error.

        ``probe`` (same sizes, cheaper settings) is what actually runs; the option carries ``spec``."""
        opts = []
        for r in ratios:
            sp = spec.with_target(Ratio(r))
            try:
                res = compress_weight((probe or spec).with_target(Ratio(r)), self.W, self.raw_stats, self.dtype)
            except InputError as e:
                log.debug("profile: %s at ratio %s skipped (%s)", spec.name, r, e)
                continue
            nbytes = res.stored_bytes(self.dtype)
            err = functional_error(self.W - res.reconstruct().float(), self.stats.gram)
            opts.append(Option(float(nbytes), self._error(err), sp))
        return opts
