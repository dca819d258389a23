"""GQSA-lite: group-structured sparsity + group-wise quantization, training-free (after Zeng et al., "GQSA:
Group Quantization and Sparsity for Accelerating Large Language Model Inference", arXiv 2412.17560; methods-more.md
§5, §6), and GPTQ-like quantization alone (Frantar et al. 2023) as its equal-bytes baseline.

Objective: min ``‖X(W − Ŵ)ᵀ‖_F²`` over ``Ŵ`` made of 1×g blocks (``g`` consecutive inputs of a row, ``g =
quant_group``) that are either pruned whole or kept with their values quantized to int4 (asymmetric: one fp16
scale + one 4-bit zero point per kept block) or int8, meeting the target (``Sparsity``: fraction of blocks
pruned; ``Ratio``: stored bytes, `formats.block_sparse_bytes`). One SparseGPT sweep does both jointly: at the
start of each column block the blocks with the lowest OBS saliency ``Σ_{j∈block} w_j² / [H⁻¹]_jj²`` are pruned
(the layer's count spread over column blocks as SparseGPT does) and the OBS update compensates on later columns;
each kept block's parameters are fitted on that result, then a second sweep with the same mask fixes columns left to
right, rounding kept values to their block's grid (`quantize.ColumnQuantizer`) and pushing the error of pruning *and*
rounding onto the later columns (`sparsegpt.joint_sweep`).

Same as GQSA: 1×g groups along the input dimension aligned with the quantization groups, asymmetric per-group
int4, a BSR-like format (here a 1-bit mask over blocks instead of column indices: ``1/g`` bits per weight).
Different: GQSA trains — block-wise BQPO, then end-to-end E2E-OQP of scales and zero points — neither is done
here (training-free); the group saliency is the diagonal OBS score (§6 "GQSA-lite", a proposal, not the paper's);
``g`` (GQSA's is not published) defaults to 16. The paper's accuracy numbers do not apply to this variant.

``gptq``: the same sweep with nothing pruned (every block kept; the block mask is then not stored), i.e. GPTQ with
per-group asymmetric int4 (default ``g = 128``); its ``--ratio`` is a floor the storage must meet.
"""
from __future__ import annotations

import torch

from .. import formats
from ..capture import LinearStats
from ..config import GPTQSpec, GQSASpec, Sparsity
from ..errors import InputError
from . import Pruned, register
from .masks import topk_mask
from .quantize import ColumnQuantizer
from .sparsegpt import block_prune_counts, inverse_hessian_factor, joint_sweep


def kept_blocks(spec: GQSASpec, out_f: int, in_f: int, dtype: torch.dtype) -> int:
    """How many 1×g blocks of an ``(out, in)`` weight the target keeps (GPTQ: all, if the floor is met)."""
    blocks = out_f * in_f // spec.quant_group
    if isinstance(spec, GPTQSpec):
        nbytes = formats.block_sparse_bytes(out_f, in_f, blocks, dtype, spec.store)
        if nbytes > (1 - spec.target.value) * formats.dense_bytes(out_f, in_f, dtype):
            reached = 1 - nbytes / formats.dense_bytes(out_f, in_f, dtype)
            raise InputError(f"gptq: {spec.store} storage of a {out_f}x{in_f} layer removes {reached:.3f} of its "
                             f"{dtype} bytes, below --ratio {spec.target.value}",
                             "lower --ratio, use int4 / a larger quant_group, or prune too (--method gqsa)")
        return blocks
    if isinstance(spec.target, Sparsity):
        return blocks - round(spec.target.value * blocks)
    kept = formats.most_kept_blocks(spec.target.value, out_f, in_f, dtype, spec.store)
    if kept is None:
        raise InputError(f"{spec.name}: ratio {spec.target.value} leaves no room even for the block mask of a "
                         f"{out_f}x{in_f} layer", "use a smaller --ratio")
    return kept


def check_width(in_f: int, g: int, name: str) -> None:
    """GQSA's 1×g blocks must tile every row: ``g`` divides ``in_f`` (checked before calibration too)."""
    if in_f % g:
        fits = [d for d in (8, 16, 32, 64, 128, 256) if in_f % d == 0]
        raise InputError(f"{name}: in_features {in_f} is not a multiple of quant_group {g}",
                         f"use quant_group in {fits}" if fits else "exclude this layer (ignore pattern)")


def group_sweep(W: torch.Tensor, stats: LinearStats | None, spec: GQSASpec, dtype: torch.dtype) -> Pruned:
    """The joint prune-and-quantize sweep over ``W`` ``(out, in)`` (see the module docstring)."""
    if stats is None or stats.count == 0:
        raise InputError(f"method {spec.name!r} got no calibration statistics for this layer",
                         "run it with calibration data (--calib)")
    W = W.detach().float().clone()
    out_f, in_f = W.shape
    g = spec.quant_group
    check_width(in_f, g, spec.name)
    keep = kept_blocks(spec, out_f, in_f, dtype)
    Hinv, info = inverse_hessian_factor(W, stats, spec.percdamp)  # (in, in)
    bs = max(g, spec.blocksize // g * g)  # column blocks hold whole 1×g groups
    bounds = list(range(0, in_f, bs)) + [in_f]
    counts = block_prune_counts(out_f * in_f // g - keep, [b // g for b in bounds])  # pruned blocks per column block

    def choose(b: int, W1: torch.Tensor, Hinv1: torch.Tensor) -> torch.Tensor:
        """The column block's ``counts[b]`` 1×g blocks of lowest summed OBS saliency, pruned whole."""
        score = (W1 ** 2 / Hinv1.diagonal().unsqueeze(0) ** 2).view(out_f, -1, g).sum(-1)  # (out, B/g)
        drop = ~topk_mask(score.reshape(-1), score.numel() - counts[b]).view_as(score)  # (out, B/g)
        return drop.repeat_interleave(g, dim=1)  # (out, B)

    quant = ColumnQuantizer(spec.store, dtype, out_f, in_f)
    W, pruned, loss = joint_sweep(W, Hinv, bounds, choose, None, quant)
    mask = ~pruned
    blocks = mask.view(out_f, in_f // g, g).any(-1)  # (out, in/g)
    info.update(blocksize=bs, obs_loss=loss, kept_blocks=int(blocks.sum()), blocks=blocks.numel(),
                joint_quantization=str(spec.store))
    return Pruned(W * mask, mask, None, info, spec.store, quant.params(blocks), block=True)


@register(GQSASpec)
def gqsa(W: torch.Tensor, stats: LinearStats | None, spec: GQSASpec, dtype: torch.dtype) -> Pruned:
    """GQSA-lite: 1×g block sparsity + int4/int8 kept blocks, one joint OBS sweep."""
    return group_sweep(W, stats, spec, dtype)


@register(GPTQSpec)
def gptq(W: torch.Tensor, stats: LinearStats | None, spec: GPTQSpec, dtype: torch.dtype) -> Pruned:
    """GPTQ-like group quantization (nothing pruned)."""
    return group_sweep(W, stats, spec, dtype)
