"""The command-line contract: commands, --json last line, exit codes, errors, no partial output."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparselm.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_compress_eval_inspect_export_round(tiny_llama_dir, tmp_path):
    out = tmp_path / "pruned"
    r = run("compress", tiny_llama_dir, "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "8",
            "--seqlen", "64", "--out", out, "--eval", "--json")
    assert r.exit_code == 0, r.output
    s = last_json(r)
    for key in ("out", "method", "ratio_stored", "ratio_params", "seconds", "perplexity_before", "perplexity_after"):
        assert key in s
    assert s["method"] == "sparsegpt" and s["ratio_params"] == pytest.approx(0.5, abs=0.01)
    e = last_json(run("eval", out, "--seqlen", "64", "--max-windows", "4", "--json"))
    assert {"perplexity", "tokens", "dataset", "seqlen"} <= set(e) and e["seqlen"] == 64
    i = last_json(run("inspect", out, "--json"))
    assert len(i["layers"]) == 14 and i["ratio_params"] == pytest.approx(0.5, abs=0.01)
    r = run("export", out, "--out", tmp_path / "dense", "--json")
    assert r.exit_code == 0, r.output
    d = last_json(run("eval", tmp_path / "dense", "--seqlen", "64", "--max-windows", "4", "--json"))
    assert d["perplexity"] == pytest.approx(e["perplexity"], rel=1e-4)


def test_existing_output_is_refused_without_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    args = ["compress", tiny_llama_dir, "--method", "magnitude", "--nsamples", "2", "--seqlen", "32", "--out", out]
    assert run(*args).exit_code == 0
    r = run(*args)
    assert r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output
    assert run(*args, "--overwrite").exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method"),
    (["--method", "wanda", "--ratio", "1.5"], "outside (0, 1)"),
    (["--method", "wanda", "--pattern", "3:7"], "divisible"),
    (["--method", "svd-llm", "--sparsity", "0.5"], "does not take a sparsity"),
    (["--method", "wanda", "--ratio", "0.3", "--sparsity", "0.5"], "more than one"),
    (["--calib", "missing.txt"], "no such file"),
    (["--calib", "EMPTY"], "fewer than one window"),
    (["--method", "svd-llm", "--refine", "dsnot"], "does not prune weights"),
    (["--method", "wanda", "--refine", "grow"], "is not valid"),
    (["--method", "flap", "--sparsity", "0.5"], "does not take a sparsity"),
    (["--method", "flap", "--ratio", "0.3", "--allocate", "knapsack"], "spreads its budget itself"),
])
def test_bad_input_exits_2_without_output(tiny_llama_dir, tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    out = tmp_path / "never"
    r = run("compress", tiny_llama_dir, *args, "--nsamples", "2", "--seqlen", "32", "--out", out)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists()
    assert not list(tmp_path.glob(".never*"))


def test_missing_or_corrupt_model_dir(tmp_path):
    r = run("compress", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    r = run("compress", tmp_path / "bad", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "config.json' is not valid JSON" in r.output
    r = run("inspect", tmp_path / "bad")
    assert r.exit_code == 2 and "not a sparselm output" in r.output


def test_method_rocket_alone_is_the_default_run():
    from sparselm import api
    from sparselm.config import Allocate, Ratio, RocketSpec
    default = api.build_recipe(None, None, None, None)
    assert api.build_recipe("rocket", None, None, None) == default
    assert default.methods == (RocketSpec(target=Ratio(0.2)),) and default.allocate is Allocate.KNAPSACK
    assert api.build_recipe("svd-llm", None, None, None).allocate is Allocate.UNIFORM
    assert api.build_recipe("rocket", 0.3, None, None, "uniform").allocate is Allocate.UNIFORM


def test_package_evaluate_is_the_function_and_metrics_the_module():
    import types
    import sparselm
    import sparselm.metrics
    assert callable(sparselm.evaluate) and isinstance(sparselm.metrics, types.ModuleType)
    assert sparselm.perplexity is sparselm.metrics.perplexity


def test_structured_and_refined_runs(tiny_llama_dir, tmp_path):
    """`--method flap` writes narrower layers counted in the ratio; `--refine dsnot` keeps the base method's bytes."""
    r = run("compress", tiny_llama_dir, "--method", "flap", "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32",
            "--out", tmp_path / "f", "--json")
    assert r.exit_code == 0, r.output
    assert last_json(r)["ratio_stored"] >= 0.3
    i = last_json(run("inspect", tmp_path / "f", "--json"))
    assert len(i["layers"]) == 14 and {row["class"] for row in i["layers"]} == {"Linear (narrowed)"}
    plain, refined = (last_json(run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *extra,
                                    "--nsamples", "4", "--seqlen", "32", "--out", tmp_path / name, "--json"))
                      for name, extra in (("w", ()), ("wd", ("--refine", "dsnot"))))
    assert refined["ratio_stored"] == plain["ratio_stored"]
    recipe = (tmp_path / "wd" / "recipe.yaml").read_text()
    assert "refine: dsnot" in recipe


def test_offload_activations_flag_writes_the_same_tensors_and_leaves_nothing_behind(tiny_llama_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    base = ["compress", str(tiny_llama_dir), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4",
            "--seqlen", "32", "--no-eval"]
    acts = tmp_path / "acts"
    for out, extra in (("plain", []), ("spilled", ["--offload-activations", str(acts)])):
        result = runner.invoke(app, base + ["--out", str(tmp_path / out)] + extra)
        assert result.exit_code == 0, result.output
    plain, spilled = (load_file(tmp_path / d / "model.safetensors") for d in ("plain", "spilled"))
    assert plain.keys() == spilled.keys() and all(torch.equal(plain[k], spilled[k]) for k in plain)
    assert acts.is_dir() and not any(acts.iterdir())  # the private folder under it is gone


def test_gqsa_group_that_does_not_tile_a_layer_is_refused_before_any_calibration_pass(tmp_path, monkeypatch):
    from sparselm import blocks

    def no_walk(*a, **k):
        raise AssertionError("the calibration walk started before the shape check")
    monkeypatch.setattr(blocks, "capture_inputs", no_walk)
    result = runner.invoke(app, ["compress", "--method", "gqsa", "--sparsity", "0.5", "--storage", "int4",
                                 "--quant-group", "48", "--out", str(tmp_path / "o"), "--no-eval"])
    assert result.exit_code == 2, result.output
    assert "in_features 256 is not a multiple of quant_group 48" in result.output and "fix:" in result.output
    assert not (tmp_path / "o").exists()
