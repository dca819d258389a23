"""Fidelity without labels: how closely a compressed model reproduces its dense base model.

For any model (encoders included): the relative error ``‖H_c − H_d‖_F / ‖H_d‖_F`` of each block's output and
of the final hidden state, over the same held-out token windows. Causal LMs also: next-token top-1 agreement
(the fraction of positions where both models' most likely next token is the same) and the mean KL divergence
``KL(p_dense ‖ p_compressed)`` per token, in nats. Encoders also: cosine similarity of mean-pooled window
embeddings and nearest-neighbour agreement (the fraction of windows whose most similar other window is the
same under both models). A no-op compression gives errors 0, agreements 1, KL 0.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import model as adapter


@contextlib.contextmanager
def _block_outputs(model: nn.Module, sink: list):
    """Append each block's output hidden states (``(b, t, h)``) to ``sink`` in block order; hooks always removed."""
    _, blocks = adapter.find_blocks(model)

    def grab(module, args, output):
        sink.append((output[0] if isinstance(output, (tuple, list)) else output).detach().float())
    handles = [b.register_forward_hook(grab) for b in blocks]
    try:
        yield len(blocks)
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, ids: torch.Tensor):
    """(block outputs, final hidden state, logits or None) of one batch."""
    blocks: list[torch.Tensor] = []
    lm = model.get_output_embeddings() is not None  # an LM head: logits to compare (no cache either)
    with _block_outputs(model, blocks):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                    **({"use_cache": False} if lm else {}))
    final = out.hidden_states[-1].float()  # (b, t, h)
    logits = out.logits.float() if getattr(out, "logits", None) is not None else None  # (b, t, vocab)
    return blocks, final, logits


class _Sums:
    """Running squared-error / squared-norm sums for one relative error."""

    def __init__(self):
        self.err, self.ref = 0.0, 0.0

    def add(self, ref: torch.Tensor, got: torch.Tensor) -> None:
        self.err += float((got - ref).double().pow(2).sum())
        self.ref += float(ref.double().pow(2).sum())

    def value(self) -> float:
        return (self.err / self.ref) ** 0.5 if self.ref > 0 else 0.0


@torch.no_grad()
def compare(reference: nn.Module, compressed: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Fidelity of ``compressed`` to ``reference`` on token ``windows`` ``(n, seqlen)`` (both on one device)."""
    device = next(compressed.parameters()).device
    causal = compressed.get_output_embeddings() is not None
    blocks: list[_Sums] = []
    final, agree, kl, positions = _Sums(), 0, 0.0, 0
    pooled_ref, pooled_got = [], []
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(device)  # (b, seqlen)
        ref_blocks, ref_final, ref_logits = _forward(reference, ids)
        got_blocks, got_final, got_logits = _forward(compressed, ids)
        blocks = blocks or [_Sums() for _ in ref_blocks]
        for sums, r, g in zip(blocks, ref_blocks, got_blocks):
            sums.add(r, g)
        final.add(ref_final, got_final)
        if causal:
            agree += int((ref_logits.argmax(-1) == got_logits.argmax(-1)).sum())
            logp, logq = F.log_softmax(ref_logits, -1), F.log_softmax(got_logits, -1)  # (b, t, vocab)
            kl += float((logp.exp() * (logp - logq)).sum())
            positions += ids.numel()
        else:
            pooled_ref.append(F.normalize(ref_final.mean(1), dim=-1))  # (b, h)
            pooled_got.append(F.normalize(got_final.mean(1), dim=-1))
    result = {"windows": len(windows), "seqlen": int(windows.shape[1]), "final_rel_error": final.value(),
              "block_rel_error": [b.value() for b in blocks]}
    if causal:
        result.update(top1_agreement=agree / positions, kl_nats_per_token=max(kl / positions, 0.0))
    else:
        result.update(embedding_agreement(torch.cat(pooled_ref), torch.cat(pooled_got)))
    return result


def embedding_agreement(reference: torch.Tensor, compressed: torch.Tensor) -> dict:
    """Mean cosine of matching rows and nearest-neighbour agreement of two ``(n, h)`` L2-normalized sets."""
    cosine = float(F.cosine_similarity(reference, compressed, dim=-1).mean())
    if len(reference) < 2:
        return {"embedding_cosine": cosine, "nn_agreement": None}
    eye = torch.eye(len(reference), dtype=torch.bool, device=reference.device)
    nn_ref = (reference @ reference.T).masked_fill(eye, -2).argmax(1)  # (n,)
    nn_got = (compressed @ compressed.T).masked_fill(eye, -2).argmax(1)
    return {"embedding_cosine": cosine, "nn_agreement": float((nn_ref == nn_got).float().mean())}


@torch.no_grad()
def pooled_cosines(reference: nn.Module, compressed: nn.Module, windows: torch.Tensor,
                   batch_size: int = 8) -> torch.Tensor:
    """Per window ``(n,)``: the cosine between both models' mean-pooled final hidden states (an encoder's
    window embeddings; their mean is `compare`'s ``embedding_cosine``)."""
    device = next(compressed.parameters()).device
    out = []
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(device)  # (b, seqlen)
        ref, got = (_forward(m, ids)[1].mean(1) for m in (reference, compressed))  # (b, h)
        out.append(F.cosine_similarity(ref, got, dim=-1).double().cpu())
    return torch.cat(out)
