"""Honest measurement: perplexity (pinned protocol), embedding fidelity for encoders, and accounting.

Perplexity protocol (DESIGN.md): token-level perplexity over non-overlapping windows of ``seqlen`` tokens
of held-out text, the first ``max_windows`` windows, none skipped; a non-finite loss is an error. This is
*not* lm-eval's ``wikitext`` word perplexity, which is a different quantity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .errors import InputError
from .modules import CompressedLinear


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Token-level perplexity of a causal LM on ``windows`` ``(n, seqlen)``."""
    nll = window_nll(model, windows, batch_size)  # (n,)
    count = windows[:, 1:].numel()
    return {"perplexity": math.exp(float(nll.sum()) / count), "tokens": count, "windows": len(windows),
            "seqlen": windows.shape[1], "metric": "token-level perplexity"}


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Each window's summed next-token negative log-likelihood in nats, ``(n,)`` float64 (`perplexity`'s loss)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(device)  # (b, seqlen)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (b, seqlen, vocab)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none").view(len(ids), -1).double().sum(1)  # (b,)
        if not torch.isfinite(loss).all():
            raise InputError(f"non-finite loss in evaluation windows {i}..{i + len(ids) - 1}",
                             "the model produces inf/nan: evaluate in float32 or compress less")
        out.append(loss.cpu())
    return torch.cat(out)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states of an encoder, L2-normalized, ``(len(texts), hidden)``."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()  # (b, t, hidden)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (b, t, 1)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1))
    return torch.cat(out)


def embedding_fidelity(reference: torch.Tensor, compressed: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of two embedding matrices."""
    return float(F.cosine_similarity(reference.float(), compressed.float(), dim=-1).mean())


# --- accounting --------------------------------------------------------------------------------------
def layer_accounting(module: CompressedLinear, dtype: torch.dtype, users: int = 1) -> dict:
    """Bytes and parameter counts of one compressed layer against the dense weight in ``dtype``.

    Every number is the layer's own (its format's `weight_bytes`, `params`, `paper_params`); ``users``: how
    many layers share its dictionary (grouped CoSpaDi), each charged its share, so the group's ``D`` counts
    once in every convention. ``stored``: bytes actually written (bias excluded); ``params``: nonzeros +
    dense factor entries, indices free (ROCKET); ``paper``: CoSpaDi's accounting.
    """
    d_in, d_out = module.in_features, module.out_features
    dense_params = d_in * d_out
    stored, params = module.weight_bytes(users), module.params(users)
    dense_bytes = formats.dense_bytes(d_out, d_in, dtype)
    return {"shape": [d_out, d_in], "dense_bytes": dense_bytes, "stored_bytes": stored, "params": params,
            "dense_params": dense_params, "ratio_stored": 1 - stored / dense_bytes,
            "ratio_params": 1 - params / dense_params, "ratio_paper": 1 - module.paper_params(users) / dense_params}


def dense_accounting(out_features: int, in_features: int, dtype: torch.dtype) -> dict:
    """A targeted layer the allocator kept dense: it counts in the totals at full size."""
    dense_bytes = formats.dense_bytes(out_features, in_features, dtype)
    return {"shape": [out_features, in_features], "dense_bytes": dense_bytes, "stored_bytes": dense_bytes,
            "params": out_features * in_features, "dense_params": out_features * in_features,
            "ratio_stored": 0.0, "ratio_params": 0.0, "ratio_paper": 0.0}


def narrow_accounting(shape: tuple[int, int], dense_shape: tuple[int, int], bias_added: bool,
                      dtype: torch.dtype) -> dict:
    """A structurally pruned plain layer ``shape`` = (out', in') against its dense ``dense_shape``; a bias the
    method added counts (stored bytes and parameters: it is what the method spends to compensate)."""
    (out_f, in_f), (d_out, d_in) = shape, dense_shape
    dense_b, dense_p = formats.dense_bytes(d_out, d_in, dtype), d_out * d_in
    stored, params = formats.narrow_bytes(out_f, in_f, dtype, bias_added), out_f * in_f + (out_f if bias_added else 0)
    return {"shape": [d_out, d_in], "kept_shape": [out_f, in_f], "dense_bytes": dense_b, "stored_bytes": stored,
            "params": params, "dense_params": dense_p, "ratio_stored": 1 - stored / dense_b,
            "ratio_params": 1 - params / dense_p, "ratio_paper": 1 - params / dense_p}


def totals(rows: list[dict]) -> dict:
    """The three ratios over all compressed layers (byte- and parameter-weighted)."""
    dense_b = sum(r["dense_bytes"] for r in rows)
    dense_p = sum(r["dense_params"] for r in rows)
    paper_kept = sum((1 - r["ratio_paper"]) * r["dense_params"] for r in rows)
    return {"layers": len(rows), "dense_bytes": dense_b, "stored_bytes": sum(r["stored_bytes"] for r in rows),
            "ratio_stored": 1 - sum(r["stored_bytes"] for r in rows) / dense_b,
            "ratio_params": 1 - sum(r["params"] for r in rows) / dense_p, "ratio_paper": 1 - paper_kept / dense_p}
