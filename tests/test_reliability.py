"""Nothing lost, nothing run that was not asked for, bad input refused (exit 2, a message naming what and the
fix) before any work, no leftovers. One table of bad inputs over every command and the Python API."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sparselm import api, io, outdir, pipeline
from sparselm.cli import app
from sparselm.config import MagnitudeSpec, Recipe, Sparsity
from sparselm.errors import InputError

runner = CliRunner()
THESIS = "chapter one: nothing here may ever be deleted"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _compressed(src: Path, out: Path) -> Path:
    r = run("compress", src, "--method", "magnitude", "--sparsity", "0.3", "--nsamples", "2", "--seqlen", "32",
            "--out", out, "--json")
    assert r.exit_code == 0, r.output
    return out


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


_DROP = object()


@pytest.fixture(scope="module")
def ws(tiny_llama_dir, tmp_path_factory):
    """A workspace of good and broken inputs, built once."""
    root = tmp_path_factory.mktemp("ws")
    w = {"model": tiny_llama_dir, "root": root, "model_sub": tiny_llama_dir / "sub"}
    w["comp"] = _compressed(tiny_llama_dir, root / "comp")
    r = run("export", w["comp"], "--out", root / "exported")
    assert r.exit_code == 0, r.output
    w["exported"] = root / "exported"
    thesis = root / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text(THESIS)
    w["thesis"] = thesis
    (root / "afile").write_text("not a directory")
    w["afile"] = root / "afile"

    def model_copy(name, edit=None):
        d = root / name
        shutil.copytree(tiny_llama_dir, d)
        if edit:
            edit(d)
        return d

    def comp_copy(name, edit):
        d = root / name
        shutil.copytree(w["comp"], d)
        edit(d)
        return d

    w["automap"] = model_copy("automap", lambda d: _edit_json(d / "config.json", auto_map={
        "AutoConfig": "evil.EvilConfig"}))
    w["tok_automap"] = model_copy("tok_automap", lambda d: _edit_json(d / "tokenizer_config.json", auto_map={
        "AutoTokenizer": ["evil.EvilTok", None]}))

    def drop_tensor(d):
        state = load_file(d / "model.safetensors")
        state.pop(next(k for k in state if k.endswith("mlp.up_proj.weight")))
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    w["missing_tensor"] = model_copy("missing_tensor", drop_tensor)

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    w["truncated"] = model_copy("truncated", truncate)
    w["noconfig"] = model_copy("noconfig", lambda d: (d / "config.json").unlink())
    w["badconfig"] = model_copy("badconfig", lambda d: (d / "config.json").write_text("{not json"))

    def only_bin(d):
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    w["binonly"] = model_copy("binonly", only_bin)
    t5 = root / "t5"
    t5.mkdir()
    tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2).save_pretrained(t5)
    w["t5"] = t5
    bert = root / "bert"
    tf.BertModel(tf.BertConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2)).save_pretrained(bert)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, bert / f.name)
    w["bert"] = bert

    man = "sparselm.json"
    w["c_automap"] = comp_copy("c_automap", lambda d: _edit_json(d / "config.json", auto_map={
        "AutoConfig": "evil.EvilConfig"}))
    w["c_badjson"] = comp_copy("c_badjson", lambda d: (d / man).write_text("{"))
    w["c_version"] = comp_copy("c_version", lambda d: _edit_json(d / man, format_version=99))
    w["c_nolayers"] = comp_copy("c_nolayers", lambda d: _edit_json(d / man, layers=[1, 2]))
    w["c_tied"] = comp_copy("c_tied", lambda d: _edit_json(d / man, tied={"no.such": "tensor"}))
    w["c_dtype"] = comp_copy("c_dtype", lambda d: _edit_json(d / man, storage_dtype="float99"))

    def layer_edit(fn):
        def edit(d):
            data = json.loads((d / man).read_text())
            fn(next(iter(data["layers"].values())))
            (d / man).write_text(json.dumps(data))
        return edit
    w["c_shape"] = comp_copy("c_shape", layer_edit(lambda e: e["buffers"].update(values=[["x"], "float32"])))
    w["c_class"] = comp_copy("c_class", layer_edit(lambda e: e.update({"class": "os.system"})))
    w["c_nospec"] = comp_copy("c_nospec", layer_edit(lambda e: e.pop("spec")))
    w["c_noweights"] = comp_copy("c_noweights", lambda d: (d / "model.safetensors").unlink())
    w["c_truncated"] = comp_copy("c_truncated", truncate)
    w["bracket"] = root / "[red]x[/red]"

    files = {"empty.txt": b"", "data.csv": b"a,b\n", "bad.jsonl": b"{not json}\n", "notext.jsonl": b'{"a": 1}\n',
             "latin1.jsonl": '{"text": "caf\xe9"}\n'.encode("latin-1"), "notes.txt": b"hello world " * 400}
    for name, content in files.items():
        (root / name).write_bytes(content)
    recipes = {"unknown_key.yaml": "methods:\n  - {method: wanda, target: {ratio: 0.3}, bogus: 1}\n",
               "tag.yaml": "methods:\n  - !!python/object/apply:os.system [\"echo owned\"]\n",
               "badyaml.yaml": "methods: [\n",
               "cospadi.yaml": "methods:\n  - {method: cospadi, target: {ratio: 0.3}, iters: 2}\n"}
    for name, content in recipes.items():
        (root / name).write_text(content)
    return w


def _sub(ws, args):
    return [str(ws[a[1:]]) if isinstance(a, str) and a.startswith("@") else
            str(ws["root"] / a[1:]) if isinstance(a, str) and a.startswith("%") else a for a in args]


# (id, command args: "@key" = workspace path, "%name" = a file in the workspace root; message fragment)
COMPRESS = "compress"
CASES = [
    ("method-unknown", [COMPRESS, "@model", "--method", "nope"], "unknown method"),
    ("ratio-above-1", [COMPRESS, "@model", "--method", "wanda", "--ratio", "1.5"], "outside (0, 1)"),
    ("ratio-zero", [COMPRESS, "@model", "--method", "wanda", "--ratio", "0"], "outside (0, 1)"),
    ("ratio-negative", [COMPRESS, "@model", "--method", "wanda", "--ratio", "-0.1"], "outside (0, 1)"),
    ("sparsity-one", [COMPRESS, "@model", "--method", "wanda", "--sparsity", "1"], "outside (0, 1)"),
    ("pattern-not-dividing", [COMPRESS, "@model", "--method", "wanda", "--pattern", "3:7"], "divisible"),
    ("pattern-garbage", [COMPRESS, "@model", "--method", "wanda", "--pattern", "abc"], "not of the form N:M"),
    ("pattern-n-over-m", [COMPRESS, "@model", "--method", "wanda", "--pattern", "4:2"], "is invalid"),
    ("sparsity-for-lowrank", [COMPRESS, "@model", "--method", "svd-llm", "--sparsity", "0.5"],
     "does not take a sparsity"),
    ("two-knobs", [COMPRESS, "@model", "--method", "wanda", "--ratio", "0.3", "--sparsity", "0.5"], "more than one"),
    ("allocate-unknown", [COMPRESS, "@model", "--method", "wanda", "--allocate", "greedy"], "is not valid"),
    ("knapsack-with-sparsity", [COMPRESS, "@model", "--method", "wanda", "--sparsity", "0.5", "--allocate",
                                "knapsack"], "needs one --ratio"),
    ("device-unknown", [COMPRESS, "@model", "--device", "tpu9"], "not a device name"),
    ("seqlen-zero", [COMPRESS, "@model", "--seqlen", "0"], "--seqlen must be an integer >= 2"),
    ("seqlen-one", [COMPRESS, "@model", "--seqlen", "1"], "--seqlen must be an integer >= 2"),
    ("nsamples-zero", [COMPRESS, "@model", "--nsamples", "0"], "--nsamples must be an integer >= 1"),
    ("nsamples-negative", [COMPRESS, "@model", "--nsamples", "-3"], "--nsamples must be an integer >= 1"),
    ("batch-size-zero", [COMPRESS, "@model", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ("calib-missing", [COMPRESS, "@model", "--calib", "%missing.txt"], "no such file"),
    ("calib-empty", [COMPRESS, "@model", "--calib", "%empty.txt"], "fewer than one window"),
    ("calib-csv", [COMPRESS, "@model", "--calib", "%data.csv"], "unsupported file type"),
    ("calib-bad-jsonl", [COMPRESS, "@model", "--calib", "%bad.jsonl"], "not valid JSON"),
    ("calib-jsonl-no-text", [COMPRESS, "@model", "--calib", "%notext.jsonl"], "'text' field"),
    ("calib-jsonl-not-utf8", [COMPRESS, "@model", "--calib", "%latin1.jsonl"], "is not UTF-8"),
    ("recipe-missing", [COMPRESS, "@model", "--recipe", "%none.yaml"], "not found"),
    ("recipe-unknown-key", [COMPRESS, "@model", "--recipe", "%unknown_key.yaml"], "unknown key"),
    ("recipe-yaml-tag", [COMPRESS, "@model", "--recipe", "%tag.yaml"], "not valid YAML"),
    ("recipe-bad-yaml", [COMPRESS, "@model", "--recipe", "%badyaml.yaml"], "not valid YAML"),
    ("recipe-with-method", [COMPRESS, "@model", "--recipe", "%unknown_key.yaml", "--method", "wanda"],
     "together with"),
    ("model-nowhere", [COMPRESS, "%nowhere"], "does not exist"),
    ("model-no-config", [COMPRESS, "@noconfig"], "has no config.json"),
    ("model-bad-config", [COMPRESS, "@badconfig"], "is not valid JSON"),
    ("model-pickle-only", [COMPRESS, "@binonly"], "pickled .bin"),
    ("model-auto-map", [COMPRESS, "@automap"], "auto_map"),
    ("model-tokenizer-auto-map", [COMPRESS, "@tok_automap"], "auto_map"),
    ("model-missing-tensor", [COMPRESS, "@missing_tensor"], "missing"),
    ("model-truncated", [COMPRESS, "@truncated"], "could not load model"),
    ("model-is-sparselm-output", [COMPRESS, "@comp"], "is a sparselm output"),
    ("model-encoder-decoder", [COMPRESS, "@t5"], "encoder-decoder"),
    ("encoder-with-eval", [COMPRESS, "@bert", "--eval"], "needs a causal LM"),
    ("out-exists", [COMPRESS, "@model", "--out", "@comp"], "already exists"),
    ("out-not-ours", [COMPRESS, "@model", "--out", "@thesis", "--overwrite"], "not a sparselm compress output"),
    ("out-is-export", [COMPRESS, "@model", "--out", "@exported", "--overwrite"], "not a sparselm compress output"),
    ("out-is-file", [COMPRESS, "@model", "--out", "@afile"], "is an existing file"),
    ("out-under-file", [COMPRESS, "@model", "--out", "%afile/sub"], "which is a file"),
    ("out-inside-input", [COMPRESS, "@model", "--out", "@model_sub"], "lies inside the input"),
    ("eval-nowhere", ["eval", "%nowhere"], "does not exist"),
    ("eval-seqlen-zero", ["eval", "@comp", "--seqlen", "0"], "--seqlen must be an integer >= 2"),
    ("eval-max-windows-negative", ["eval", "@comp", "--max-windows", "-1"], "--max-windows must be an integer"),
    ("eval-batch-size-zero", ["eval", "@comp", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ("eval-dataset-missing", ["eval", "@comp", "--dataset", "%missing.txt"], "no such file"),
    ("eval-auto-map", ["eval", "@c_automap"], "auto_map"),
    ("eval-plain-auto-map", ["eval", "@automap"], "auto_map"),
    ("eval-manifest-not-json", ["eval", "@c_badjson"], "is not valid JSON"),
    ("eval-manifest-version", ["eval", "@c_version"], "format version"),
    ("eval-manifest-no-layers", ["eval", "@c_nolayers"], "'layers' is not a table"),
    ("eval-manifest-tied", ["eval", "@c_tied"], "'tied' names"),
    ("eval-manifest-dtype", ["eval", "@c_dtype"], "not a torch dtype"),
    ("eval-manifest-shape", ["eval", "@c_shape"], "buffer 'values'"),
    ("eval-manifest-class", ["eval", "@c_class"], "unknown class"),
    ("eval-no-weights", ["eval", "@c_noweights"], "has no model.safetensors"),
    ("eval-truncated-weights", ["eval", "@c_truncated"], "could not read"),
    ("eval-encoder", ["eval", "@bert"], "encoder"),
    ("inspect-nowhere", ["inspect", "%nowhere"], "not a sparselm output"),
    ("inspect-plain-model", ["inspect", "@model"], "not a sparselm output"),
    ("inspect-no-layers", ["inspect", "@c_nolayers"], "'layers' is not a table"),
    ("inspect-no-spec", ["inspect", "@c_nospec"], "lacks or garbles"),
    ("inspect-bad-shape", ["inspect", "@c_shape"], "buffer 'values'"),
    ("inspect-bracket-path", ["inspect", "@bracket"], "[red]x[/red]"),
    ("export-nowhere", ["export", "%nowhere", "--out", "%e1"], "not a sparselm output"),
    ("export-out-exists", ["export", "@comp", "--out", "@exported"], "already exists"),
    ("export-over-thesis", ["export", "@comp", "--out", "@thesis", "--overwrite"], "not a sparselm export output"),
    ("export-over-itself", ["export", "@comp", "--out", "@comp", "--overwrite"], "not a sparselm export output"),
    ("export-into-itself", ["export", "@comp", "--out", "%comp/dense"], "lies inside the input"),
    ("export-over-model", ["export", "@comp", "--out", "@model", "--overwrite"], "not a sparselm export output"),
    ("export-out-is-file", ["export", "@comp", "--out", "@afile"], "is an existing file"),
    ("export-auto-map", ["export", "@c_automap", "--out", "%e2"], "auto_map"),
    ("export-broken-manifest", ["export", "@c_shape", "--out", "%e3"], "buffer 'values'"),
    ("bench-nowhere", ["bench", "%nowhere"], "does not exist"),
    ("bench-auto-map", ["bench", "@c_automap"], "auto_map"),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_a_message_and_touches_nothing(ws, case, args, message):
    args = _sub(ws, args)
    if args[0] == COMPRESS:
        defaults = {"--out": str(ws["root"] / "never"), "--nsamples": "2", "--seqlen": "32"}
        args += [x for k, v in defaults.items() if k not in args for x in (k, v)]
    before = _snapshot(ws["root"]) | _snapshot(ws["model"])
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output
    assert "fix:" in r.output and "Traceback" not in r.output
    after = _snapshot(ws["root"]) | _snapshot(ws["model"])
    assert after == before  # nothing created, changed or deleted (no output, no leftovers)


def test_api_refuses_the_same_inputs(ws, tmp_path):
    with pytest.raises(InputError, match="auto_map"):
        io.load(ws["c_automap"])
    with pytest.raises(InputError, match="not a sparselm export output"):
        io.export(ws["comp"], ws["thesis"], overwrite=True)
    with pytest.raises(InputError, match="--nsamples must be"):
        api.compress_model(str(ws["model"]), nsamples=0, out=str(tmp_path / "o"))
    assert (ws["thesis"] / "thesis.tex").read_text() == THESIS


@pytest.mark.parametrize("command", [[COMPRESS, "@model", "--out", "%never", "--nsamples", "2", "--seqlen", "32"],
                                     ["eval", "@comp"], ["bench", "@comp"]], ids=lambda c: c[0])
@pytest.mark.parametrize("variable, value", [("SPARSELM_KERNELS", "fastest"), ("SPARSELM_ISA", "sse4")])
def test_a_bad_kernel_variable_is_refused_before_any_work(ws, command, variable, value, monkeypatch):
    """The kernel variables are read by the first fast forward, which in a compression comes after every block:
    every command checks them first (exit 2, nothing written)."""
    monkeypatch.setenv(variable, value)
    before = _snapshot(ws["root"])
    r = run(*_sub(ws, command))
    assert r.exit_code == 2 and variable in r.output and "fix:" in r.output, r.output
    assert "compressing block" not in r.output and _snapshot(ws["root"]) == before
    with pytest.raises(InputError, match=variable):
        api.compress_model(str(ws["model"]), nsamples=2, seqlen=32, out=str(ws["root"] / "never2"))


def test_export_overwrite_replaces_only_an_earlier_export(ws, tmp_path):
    out = tmp_path / "dense"
    assert run("export", ws["comp"], "--out", out).exit_code == 0
    (out / "stale").write_text("from the first export")
    r = run("export", ws["comp"], "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "stale").exists() and (out / outdir.MARKERS["export"]).is_file()
    assert not list(tmp_path.glob(".dense*"))
    model = tf.AutoModelForCausalLM.from_pretrained(out)  # still a plain HF directory
    assert model.config.num_hidden_layers == 2


def test_remote_code_is_never_run_without_the_flag(ws, tmp_path):
    canary = tmp_path / "ran"
    d = tmp_path / "evil"
    shutil.copytree(ws["comp"], d)
    (d / "evil.py").write_text(f"open({str(canary)!r}, 'w').write('owned')\n"
                               "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    pass\n")
    _edit_json(d / "config.json", auto_map={"AutoConfig": "evil.EvilConfig"})
    for args in (["eval", d], ["bench", d], ["export", d, "--out", tmp_path / "x"]):
        r = run(*args)
        assert r.exit_code == 2 and "--trust-remote-code" in r.output, r.output
    assert not canary.exists()


def test_seqlen_beyond_the_model_is_clamped_with_a_warning(ws, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        s = api.compress_model(str(ws["model"]), api.build_recipe("magnitude", None, 0.3, None), nsamples=2,
                               seqlen=4096, out=str(tmp_path / "o"), evaluate_ppl=False)
    assert "max_position_embeddings" in caplog.text
    assert json.loads((Path(s["out"]) / "sparselm.json").read_text())["calibration"]["seqlen"] == 256


@pytest.mark.parametrize("content, reason", [(b"a" * 60000, "distinct tokens"),
                                             (bytes(range(256)) * 200, "U+FFFD")])
def test_degenerate_calibration_warns_with_the_measured_reason(ws, tmp_path, caplog, content, reason):
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    with caplog.at_level("WARNING"):
        api.compress_model(str(ws["model"]), api.build_recipe("magnitude", None, 0.3, None), calib=str(f),
                           nsamples=2, seqlen=32, out=str(tmp_path / "o"), evaluate_ppl=False)
    assert reason in caplog.text


def test_a_second_run_on_the_same_output_is_refused_and_a_dead_owner_releases_it(ws, tmp_path):
    out = tmp_path / "shared"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from sparselm import outdir\nwith outdir.locked(Path(sys.argv[1])):\n"
                               "    print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["compress", ws["model"], "--method", "magnitude", "--sparsity", "0.3", "--nsamples", "2",
                "--seqlen", "32", "--out", out]
        r = run(*args)
        assert r.exit_code == 2 and f"pid {holder.pid}" in r.output, r.output
        holder.send_signal(signal.SIGKILL)  # killed: its lock is stale, the next run takes it over
        holder.wait()
        r = run(*args)
        assert r.exit_code == 0, r.output
    finally:
        holder.kill()
    assert not list(tmp_path.glob(".shared*"))


def test_leftovers_of_killed_runs_are_removed(ws, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    for leftover in (f".o.partial-{dead.pid}", f".o.old-{dead.pid}", f"..o.resume.partial-{dead.pid}"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / f".o.partial-{os.getpid()}x"  # not a pid: not ours to judge, kept
    mine.mkdir()
    _compressed(ws["model"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", mine.name])


def test_a_stale_checkpoint_is_discarded_without_resume_and_a_corrupt_one_is_refused_with_it(ws, tmp_path):
    out = tmp_path / "o"
    ckpt = outdir.checkpoint_dir(out)
    ckpt.mkdir()
    (ckpt / "progress.json").write_text("{broken")
    args = ["compress", ws["model"], "--method", "magnitude", "--sparsity", "0.3", "--nsamples", "2", "--seqlen",
            "32", "--out", out]
    r = run(*args, "--resume")
    assert r.exit_code == 2 and "is corrupt" in r.output and "without --resume" in r.output, r.output
    assert not out.exists()
    assert run(*args).exit_code == 0
    assert not ckpt.exists()


def test_an_unwritable_output_place_is_refused_before_work(ws, tmp_path, monkeypatch):
    monkeypatch.setattr(outdir.os, "access", lambda path, mode: False)  # as a non-root user on a read-only dir
    r = run("compress", ws["model"], "--method", "magnitude", "--out", tmp_path / "ro" / "o")
    assert r.exit_code == 2 and "is not writable" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_disk_errors_while_saving_exit_2_and_leave_nothing(ws, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(io, "save_file", full)
    r = run("compress", ws["model"], "--method", "magnitude", "--sparsity", "0.3", "--nsamples", "2", "--seqlen",
            "32", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "No space left on device" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_a_compressed_layer_that_overflows_the_storage_dtype_is_an_error(calib_ids):
    from tests.conftest import tiny_model
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e6)  # finite in float32, inf in float16
    recipe = Recipe(methods=(MagnitudeSpec(target=Sparsity(0.5)),))
    with pytest.raises(InputError, match=r"layers\.0\.mlp\.up_proj.*not finite"):
        pipeline.compress(model, calib_ids, recipe, torch.device("cpu"), torch.float16)


def test_load_keeps_weights_of_modules_with_non_persistent_buffers(calib_ids, tmp_path):
    """Gemma 3 keeps its embedding scale in a non-persistent buffer of the embedding module: rebuilding that
    buffer must not re-initialize the loaded embedding."""
    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=128, sliding_window=16)
    model = tf.Gemma3ForCausalLM(cfg).eval()
    recipe = Recipe(methods=(MagnitudeSpec(target=Sparsity(0.1)),))
    pipeline.compress(model, calib_ids, recipe, torch.device("cpu"), torch.float32)
    io.save(model, None, tmp_path / "g", {}, torch.float32)
    loaded = io.load(tmp_path / "g")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=calib_ids).logits, model(input_ids=calib_ids).logits)


def test_failed_run_leaves_no_directory_and_interrupt_keeps_the_checkpoint(ws, tmp_path):
    def interrupt(done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        api.compress_model(str(ws["model"]), api.build_recipe("magnitude", None, 0.3, None), nsamples=2, seqlen=32,
                           out=str(tmp_path / "o"), evaluate_ppl=False, progress=interrupt)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".o.resume"], names  # only the checkpoint --resume continues from; no lock, no partial


KILL_AFTER_FIRST_CHECKPOINT = """
import os, signal, sparselm.pipeline as p
orig = p.compress
def killing(*a, checkpoint=None, **k):
    def ck(*args):  # (blocks done, layers, plan)
        checkpoint(*args)
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(*a, checkpoint=ck, **k)
p.compress = killing
"""
KILL_WHILE_SAVING = """
import os, signal, sparselm.io as io
orig = io.save_file
def killing(*a, **k):
    orig(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
io.save_file = killing
"""
@pytest.fixture(scope="module")
def clean_runs() -> dict[str, Path]:
    """Uninterrupted runs, one per setting, shared by the kill variants."""
    return {}


CLI = "import sys\nfrom sparselm.cli import app\nsys.argv = ['sparselm'] + sys.argv[1:]\napp()\n"


KNOBS = {"sparsegpt": ["--method", "sparsegpt", "--sparsity", "0.5"],
         "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
         "svd-llm": ["--method", "svd-llm", "--ratio", "0.3"],
         "rocket": ["--method", "rocket", "--ratio", "0.3", "--allocate", "uniform"],
         "rocket-knapsack": [],  # the default run: ROCKET + knapsack at 0.2
         "cospadi": ["--recipe", "%cospadi.yaml"]}
KILLS = {"in-compress": KILL_AFTER_FIRST_CHECKPOINT, "in-save": KILL_WHILE_SAVING}
SIGKILL_CASES = [(k, kill) for k in KNOBS for kill in KILLS if kill == "in-compress" or k in list(KNOBS)[:4]]


@pytest.mark.parametrize("knobs, kill", [(KNOBS[k], KILLS[kill]) for k, kill in SIGKILL_CASES],
                         ids=[f"{k}-{kill}" for k, kill in SIGKILL_CASES])
def test_sigkill_then_resume_gives_the_same_tensors(ws, tmp_path, knobs, kill, clean_runs):
    """A run killed (SIGKILL: no cleanup code runs) during compress or while saving, then resumed, writes the
    same tensors as a clean run, and leaves nothing else behind."""
    args = ["compress", str(ws["model"]), *_sub(ws, knobs), "--nsamples", "4", "--seqlen", "64"]

    def sparselm(*extra, prelude=""):
        return subprocess.run([sys.executable, "-c", prelude + CLI, *args, *map(str, extra)],
                              cwd=Path(__file__).parents[1], capture_output=True, text=True)
    key = " ".join(knobs)
    if key not in clean_runs:
        clean_runs[key] = ws["root"] / f"clean-{len(clean_runs)}"
        clean = sparselm("--out", clean_runs[key])
        assert clean.returncode == 0, clean.stderr
    killed = sparselm("--out", tmp_path / "cut", prelude=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "cut").exists()
    resumed = sparselm("--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = (clean_runs[key] / "model.safetensors").read_bytes()
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == a  # byte-identical, not only close
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut"]
