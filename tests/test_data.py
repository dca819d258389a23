"""Calibration / evaluation windows: sources, determinism, split, errors."""
from __future__ import annotations

import json
import random

import pytest

from sparselm import data
from sparselm.errors import InputError

from .conftest import _tiny_tokenizer

TOK = _tiny_tokenizer()


def test_stdlib_split_is_disjoint_and_stable():
    train, val = data.stdlib_files("train"), data.stdlib_files("validation")
    assert train and val and not set(train) & set(val)
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.2
    assert data.stdlib_files("validation") == val


def test_calibration_is_deterministic_given_seed():
    a = data.calibration_data(TOK, "stdlib", nsamples=4, seqlen=64, seed=3)
    b = data.calibration_data(TOK, "stdlib", nsamples=4, seqlen=64, seed=3)
    c = data.calibration_data(TOK, "stdlib", nsamples=4, seqlen=64, seed=4)
    assert a.shape == (4, 64) and (a == b).all() and not (a == c).all()


def test_evaluation_windows_are_in_order_and_non_overlapping():
    w = data.evaluation_windows(TOK, "stdlib", seqlen=32, max_windows=5)
    ids, _ = data._encode(TOK, data.documents("stdlib", "validation"), 5 * 32)
    assert w.shape == (5, 32) and w.flatten().tolist() == ids[:160]


def test_stdlib_calibration_reads_lazily_but_gives_the_eager_windows():
    """The lazy reader must give exactly the windows of reading every file, shuffling and joining (recipes replay)."""
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in data.stdlib_files("train")]
    random.Random(7).shuffle(docs)
    ids = []
    for d in docs:
        if d.strip() and len(ids) < 6 * 64:
            ids += TOK(d + "\n\n", add_special_tokens=False)["input_ids"]
    rng = random.Random(7)
    rng.shuffle(list(range(len(docs))))
    starts = sorted(rng.sample([i * 64 for i in range(len(ids) // 64)], 6)) if len(ids) // 64 > 6 else None
    w = data.calibration_data(TOK, "stdlib", nsamples=6, seqlen=64, seed=7)
    assert starts is not None and w.tolist() == [ids[s:s + 64] for s in starts]


def test_txt_and_jsonl_sources(tmp_path):
    text = "def f(x):\n    return x + 1\n" * 200
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": text[i:i + 500]}) for i in range(0, 5000, 500)))
    assert data.calibration_data(TOK, str(tmp_path / "a.txt"), 3, 32).shape == (3, 32)
    assert data.calibration_data(TOK, str(tmp_path / "a.jsonl"), 3, 32).shape == (3, 32)


@pytest.mark.parametrize("content, message", [
    ("", "fewer than one window"),
    ("not json\n", "not valid JSON"),
    ('{"txt": "x"}\n', "string 'text' field"),
])
def test_bad_local_sources(tmp_path, content, message):
    path = tmp_path / ("f.txt" if not content.strip() else "f.jsonl")
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        data.calibration_data(TOK, str(path), 2, 32)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(InputError, match="unsupported file type"):
        data.documents(str(tmp_path / "x.csv"), "train")


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputError, match="network access"):
        data.documents("wikitext2", "validation")
