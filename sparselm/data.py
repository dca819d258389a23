"""Calibration and evaluation token windows.

Sources (`SRC` on the command line):
  * ``stdlib``   the bundled default: CPython standard-library sources of the running interpreter,
                 split by file (a stable hash of the relative path) into train / validation.
  * ``*.txt``    plain text.
  * ``*.jsonl``  one JSON object per line with a ``text`` field.
  * ``wikitext2`` / ``c4``  Hugging Face datasets (need network), following the SparseGPT protocol.

Calibration windows are drawn from the train side, evaluation windows from the held-out side; both are
deterministic given the seed. Evaluation windows are non-overlapping and taken in order (DESIGN.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .errors import InputError

log = logging.getLogger(__name__)

HF_SOURCES = ("wikitext2", "c4")
_SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test"}
VALIDATION_BUCKETS = 10  # one file in ten (by path hash) is held out


def stdlib_files(split: str) -> list[Path]:
    """Standard-library ``.py`` files of this interpreter for ``split`` ("train" or "validation"), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):  # pruned walk: rglob would list all of site-packages first
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]
        for name in names:
            if not name.endswith(".py"):
                continue
            path = Path(folder, name)
            rel = path.relative_to(root)
            held_out = hashlib.sha1(rel.as_posix().encode()).digest()[0] % VALIDATION_BUCKETS == 0
            if held_out == (split == "validation"):
                files.append(path)
    return sorted(files)


class _Files(Sequence):
    """The texts of ``paths``, each read when indexed: calibration usually needs a few dozen of ~700 files."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        return self.paths[i].read_text(encoding="utf-8", errors="replace")


def _read_local(src: str, source_path: Path) -> list[str]:
    if not source_path.is_file():
        raise InputError(f"data source {src!r}: no such file", "give 'stdlib', a .txt/.jsonl file, or 'wikitext2'/'c4'")
    if source_path.suffix == ".jsonl":
        docs = []
        try:
            text = source_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{src}: byte {e.start} is not UTF-8 ({e.reason})",
                             "save the .jsonl file as UTF-8 text") from None
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{src}:{i}: not valid JSON ({e.msg})", "write one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InputError(f"{src}:{i}: expected an object with a string 'text' field",
                                 'write lines like {"text": "..."}')
            docs.append(row["text"])
        return docs
    if source_path.suffix in (".txt", ".text", ".md", ".py"):
        return [source_path.read_text(encoding="utf-8", errors="replace")]
    raise InputError(f"data source {src!r}: unsupported file type {source_path.suffix!r}",
                     "use a .txt (plain text) or .jsonl (a 'text' field per line) file")


def _load_hf(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise InputError(f"data source {name!r} needs the 'datasets' package", "pip install datasets") from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
            return ["\n\n".join(ds["text"])]
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        ds = datasets.load_dataset("allenai/c4", data_files={"data": shard}, split="data")
        return list(ds["text"]) if split == "train" else [" ".join(ds["text"][:1100])]
    except Exception as e:  # network, hub or cache errors all mean the same thing to the user
        raise InputError(f"data source {name!r} could not be loaded ({type(e).__name__}: {str(e)[:200]})",
                         "it needs network access to the Hugging Face Hub (or a local cache); offline, use "
                         "'stdlib' or a local .txt/.jsonl file") from None


def documents(src: str, split: str) -> Sequence[str]:
    """Raw text documents of a source; ``split`` is "train" (calibration) or "validation" (evaluation).

    Local files have no split: the same file serves both (give a held-out file to ``eval``). The stdlib's
    files are read only when indexed.
    """
    if src == "stdlib":
        return _Files(stdlib_files(split))
    if src in HF_SOURCES:
        return _load_hf(src, split)
    return _read_local(src, Path(src))


def _encode(tokenizer, docs: Iterable[str], need: int | None) -> tuple[list[int], list[str]]:
    """Tokenize ``docs`` joined by blank lines, stopping once ``need`` tokens are there (None: all).

    Returns the token ids and the documents that were read.
    """
    ids: list[int] = []
    used = []
    for doc in docs:
        used.append(doc)
        if not doc.strip():
            continue
        ids.extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        if need is not None and len(ids) >= need:
            break
    return ids, used


def calibration_data(tokenizer, src: str = "stdlib", nsamples: int = 128, seqlen: int = 2048,
                     seed: int = 0) -> torch.Tensor:
    """``(nsamples, seqlen)`` token ids for calibration, deterministic given ``seed``.

    Documents are shuffled with ``seed``, joined and cut into consecutive windows; a single long text
    (a .txt file) is cut into windows of which ``nsamples`` are drawn at random.
    """
    if nsamples < 1 or seqlen < 2:
        raise InputError(f"calibration needs nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})",
                         "pass --nsamples and --seqlen with positive values")
    docs = documents(src, "train")
    rng = random.Random(seed)
    if len(docs) > 1:
        order = list(range(len(docs)))
        rng.shuffle(order)
        ids, docs = _encode(tokenizer, (docs[i] for i in order), nsamples * seqlen)
    else:
        ids, docs = _encode(tokenizer, docs, None)
    n_windows = len(ids) // seqlen
    if n_windows == 0:
        raise InputError(f"calibration text {src!r} has {len(ids)} tokens, fewer than one window of {seqlen}",
                         "give more text or a smaller --seqlen")
    starts = [i * seqlen for i in range(n_windows)]
    if n_windows > nsamples:
        starts = sorted(rng.sample(starts, nsamples))
    elif n_windows < nsamples:
        log.warning("calibration text %r gives only %d windows of %d tokens (asked for %d); using all",
                    src, n_windows, seqlen, nsamples)
    windows = torch.tensor([ids[s:s + seqlen] for s in starts], dtype=torch.long)  # (n, seqlen)
    _warn_if_degenerate(src, docs, windows, len(tokenizer))
    return windows


DISTINCT_TOKENS_MIN = 64     # fewer distinct calibration tokens than this: the statistics are degenerate
REPLACEMENT_SHARE_MAX = 0.01  # more U+FFFD than this: the "text" was binary or in another encoding


def _warn_if_degenerate(src: str, docs: list[str], windows: torch.Tensor, vocab: int) -> None:
    """Warn (with the measured reason) when the calibration text read (``docs``) cannot give useful statistics."""
    chars = sum(len(d) for d in docs)
    bad = sum(d.count("\ufffd") for d in docs)
    if chars and bad / chars > REPLACEMENT_SHARE_MAX:
        log.warning("calibration text %r: %.1f%% of its characters are U+FFFD replacement characters (binary "
                    "data or not UTF-8?); the statistics will not describe real text", src, 100 * bad / chars)
    distinct = int(windows.unique().numel())
    if distinct < min(DISTINCT_TOKENS_MIN, vocab // 2, windows.numel() // 4):
        log.warning("calibration text %r has only %d distinct tokens: every layer's input Gram matrix has rank "
                    "about %d or less, so data-aware methods see almost nothing; give varied text", src, distinct,
                    distinct)


def evaluation_windows(tokenizer, src: str = "stdlib", seqlen: int = 512,
                       max_windows: int | None = 64) -> torch.Tensor:
    """``(n, seqlen)`` non-overlapping windows of held-out text, in order, first ``max_windows``."""
    if seqlen < 2:
        raise InputError(f"evaluation seqlen must be >= 2 (got {seqlen})", "pass a larger --seqlen")
    need = None if max_windows is None else max_windows * seqlen
    ids, _ = _encode(tokenizer, documents(src, "validation"), need)
    n = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
    if n == 0:
        raise InputError(f"evaluation text {src!r} has {len(ids)} tokens, fewer than one window of {seqlen}",
                         "give more text or a smaller --seqlen")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)  # (n, seqlen)
