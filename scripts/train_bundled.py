"""Rebuild the bundled tiny model: a BPE tokenizer and a small Llama trained on CPython stdlib sources.

    python scripts/train_bundled.py                  # ~48 min on 2 idle CPU cores, minutes on a GPU
    python scripts/train_bundled.py --max-minutes 5  # a quick, weaker model

The train/validation split is the one `sparselm.data.stdlib_files` uses (by file), so the bundled
model's reported perplexity is on files it never saw. Training stops when the validation loss
plateaus (no relative improvement above --plateau over --patience evaluations) or at the time limit.
Writes config, tokenizer, bf16 `model.safetensors` and `training.json` into sparselm/bundled/tiny-llama.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sparselm.data import stdlib_files

OUT = Path(__file__).resolve().parents[1] / "sparselm" / "bundled" / "tiny-llama"
EOS = "<|endoftext|>"


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in stdlib_files("train")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   model_max_length=1024)


def token_stream(tok, split: str) -> torch.Tensor:
    ids: list[int] = []
    for path in stdlib_files(split):
        ids.extend(tok(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"])
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def val_loss(model, val: torch.Tensor, seqlen: int, windows: int) -> float:
    model.eval()
    x = val[: windows * seqlen].view(windows, seqlen)
    losses = [model(input_ids=x[i:i + 8], labels=x[i:i + 8]).loss.item() for i in range(0, windows, 8)]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-minutes", type=float, default=90.0)
    ap.add_argument("--max-steps", type=int, default=2000, help="length of the cosine schedule")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--plateau", type=float, default=0.003)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    tok = train_tokenizer(args.vocab)
    train, val = token_stream(tok, "train"), token_stream(tok, "validation")
    print(f"tokenizer {time.time() - t0:.0f}s; train {len(train)} tokens, validation {len(val)} tokens", flush=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup, history, best = 100, [], float("inf")
    g = torch.Generator().manual_seed(0)
    t_train = time.time()
    step = 0
    for step in range(1, args.max_steps + 1):
        lr = args.lr * min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.max_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - args.seqlen - 1, (args.batch,), generator=g)
        x = torch.stack([train[s:s + args.seqlen] for s in starts])  # (batch, seqlen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0:
            v = val_loss(model, val, args.seqlen, 64)
            minutes = (time.time() - t_train) / 60
            history.append({"step": step, "train_loss": round(loss.item(), 4), "val_loss": round(v, 4),
                            "minutes": round(minutes, 2)})
            print(json.dumps(history[-1]), flush=True)
            improved = v < best * (1 - args.plateau)
            best = min(best, v)
            recent = [h["val_loss"] for h in history[-args.patience - 1:]]
            stalled = len(recent) > args.patience and min(recent[1:]) > recent[0] * (1 - args.plateau)
            if (stalled and not improved) or minutes > args.max_minutes:
                break
    final = val_loss(model, val, args.seqlen, min(256, len(val) // args.seqlen))
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    n_params = sum(p.numel() for p in model.parameters())
    report = {"parameters": n_params, "steps": step, "tokens_seen": step * args.batch * args.seqlen,
              "train_minutes": round((time.time() - t_train) / 60, 1), "cpu_threads": torch.get_num_threads(),
              "val_loss": round(final, 4), "val_perplexity_seqlen256_fp32": round(math.exp(final), 3),
              "train_tokens": len(train), "val_tokens": len(val), "args": {k: str(v) for k, v in vars(args).items()},
              "history": history}
    (args.out / "training.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "history"}))


if __name__ == "__main__":
    main()
