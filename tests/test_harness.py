"""lm-eval in process: a compressed model scores as its exported dense twin does under lm-eval's own `hf` model.

Needs lm-evaluation-harness (`pip install -e ".[eval]"`); skipped without it. The task is made here: a
multiple-choice task over a local jsonl file (which of two lines of Python continues a stdlib snippet), so
nothing is downloaded.
"""
from __future__ import annotations

import json
import random
import time

import pytest

from sparselm import api, harness
from sparselm.config import MagnitudeSpec, Recipe, Sparsity
from sparselm.data import stdlib_files
from sparselm.errors import InputError

lm_eval = pytest.importorskip("lm_eval")

TASK_YAML = """task: sparselm_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def _items(n: int = 32) -> list[dict]:
    """(snippet, its true next line vs. a line from elsewhere) from held-out stdlib files, deterministic."""
    rng = random.Random(0)
    lines = [ln for f in stdlib_files("validation")[:40] for ln in f.read_text(errors="replace").splitlines()
             if len(ln.strip()) > 20]
    items = []
    for _ in range(n):
        i = rng.randrange(3, len(lines) - 1)
        wrong = lines[rng.randrange(len(lines))]
        label = rng.randrange(2)
        choices = [wrong, lines[i]] if label else [lines[i], wrong]
        items.append({"context": "\n".join(lines[i - 3:i]) + "\n", "choices": choices, "label": label})
    return items


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    (d / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in _items()))
    (d / "next_line.yaml").write_text(TASK_YAML.format(data=d / "items.jsonl"))
    return d / "next_line.yaml"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, task_yaml):
    out = tmp_path_factory.mktemp("runs") / "pruned"
    api.compress_model(None, Recipe(methods=(MagnitudeSpec(target=Sparsity(0.5)),)), nsamples=2, seqlen=32,
                       out=str(out), evaluate_ppl=False, tasks=str(task_yaml))
    return out


def test_compress_tasks_before_after_in_manifest_report_and_card(pruned):
    lm = json.loads((pruned / "sparselm.json").read_text())["lm_eval"]
    assert set(lm["before"]["sparselm_next_line"]) >= {"acc", "acc_norm"}
    assert lm["reproduce"]["tasks"]["sparselm_next_line"]["version"] == 1.0
    html = (pruned / "report.html").read_text()
    assert "sparselm_next_line" in html and f"{lm['after']['sparselm_next_line']['acc']:.5g}" in html
    assert "sparselm_next_line acc (lm-eval)" in (pruned / "README.md").read_text()


def test_compressed_in_process_equals_exported_dense_under_hf(pruned, task_yaml, tmp_path, monkeypatch):
    # the reference forwards: the same bf16 products as HF's dense layers, so the scores must agree exactly. (The
    # fast forwards agree to rounding, tests/test_kernels*.py; on a CPU without native bf16 they multiply in
    # float32, and a borderline sample's choice may then differ from bf16 HF's.)
    monkeypatch.setenv("SPARSELM_KERNELS", "reference")
    r = api.evaluate_model(str(pruned), seqlen=64, max_windows=2, tasks=str(task_yaml))
    ours = r["lm_eval"]["tasks"]["sparselm_next_line"]
    dense = tmp_path / "dense"
    api.export_dense(str(pruned), str(dense))
    from lm_eval.tasks import TaskManager
    # both in the checkpoint's dtype: sparselm.load's default and lm-eval's "auto"
    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(dense), "dtype": "auto",
                                                          "device": "cpu"}, batch_size=8,
                                  tasks=[str(task_yaml)], task_manager=TaskManager(include_defaults=False),
                                  log_samples=False, bootstrap_iters=0)
    theirs = res["results"]["sparselm_next_line"]
    assert ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"]
    assert 0.5 < ours["acc"] < 1.0  # the task discriminates: neither chance nor saturated
    rep = r["lm_eval"]["reproduce"]
    assert rep["tasks"]["sparselm_next_line"]["samples"] == 32 and rep["lm_eval_version"] == lm_eval.__version__
    assert rep["tasks"]["sparselm_next_line"]["num_fewshot"] == 0 and rep["model_dtype"] == "bfloat16"


def test_task_directory_and_limit(pruned, task_yaml):
    r = api.evaluate_model(str(pruned), seqlen=64, max_windows=1, tasks=str(task_yaml.parent), limit=8)
    assert r["lm_eval"]["reproduce"]["tasks"]["sparselm_next_line"]["samples"] == 8
    assert r["lm_eval"]["reproduce"]["limit"] == 8 and "acc" in r["lm_eval"]["tasks"]["sparselm_next_line"]


def test_unknown_task_and_uncached_dataset_are_input_errors(pruned, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="unknown lm-eval task 'no_such_task_xyz'"):
        api.evaluate_model(str(pruned), seqlen=64, max_windows=1, tasks="no_such_task_xyz")
    monkeypatch.setattr(harness, "hub_reachable", lambda timeout=3.0: False)  # offline, as on a cut-off machine
    hub_task = tmp_path / "hub_task.yaml"
    hub_task.write_text(TASK_YAML.replace("dataset_path: json", "dataset_path: sparselm-test/not-cached-xyz")
                        .replace("dataset_kwargs:\n  data_files:\n    test: {data}\n", "").replace("{{{{", "{{")
                        .replace("}}}}", "}}"))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="dataset sparselm-test/not-cached-xyz is not in the local cache"):
        api.evaluate_model(str(pruned), seqlen=64, max_windows=1, tasks=str(hub_task))
    assert time.perf_counter() - t0 < 30  # no retries against an unreachable Hub


ROLLING_YAML = """task: sparselm_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def test_word_perplexity_is_labelled_beside_the_token_level_one(pruned, tmp_path):
    docs = [f.read_text(errors="replace")[:600] for f in stdlib_files("validation")[:4]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "rolling.yaml").write_text(ROLLING_YAML.format(data=tmp_path / "docs.jsonl"))
    r = api.evaluate_model(str(pruned), seqlen=64, max_windows=2, tasks=str(tmp_path / "rolling.yaml"))
    scores = r["lm_eval"]["tasks"]["sparselm_rolling"]
    assert r["metric"] == "token-level perplexity" and r["perplexity"] > 1
    assert scores["word_perplexity"] > 1 and "not sparselm's token-level" in scores["word_perplexity_note"]


def test_parse_tasks_and_word_perplexity_label():
    assert harness.parse_tasks(" piqa, ,hellaswag") == ["piqa", "hellaswag"]
    with pytest.raises(InputError):
        harness.parse_tasks(" , ")
    scores = harness._scores({"word_perplexity,none": 30.5, "bits_per_byte,none": 1.2, "alias": "wikitext"})
    assert scores["word_perplexity"] == 30.5 and "not sparselm's token-level" in scores["word_perplexity_note"]
