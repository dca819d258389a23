"""The documentation's examples run: every ```python block of docs/api.md in order in one namespace, then its
```bash block through the CLI, in a temporary directory (so the examples cannot drift from the code)."""
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparselm.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_api_page_covers_the_flow_in_order():
    code = "\n".join(_blocks("python"))
    calls = ["load_model(", "calibration_data(", "compress(", "save(", "load(", "evaluate("]
    positions = [code.index(f"sparselm.{c}") for c in calls]
    assert positions == sorted(positions)


@pytest.mark.slow
def test_api_examples_run_and_the_saved_directory_serves_every_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _blocks("python"):
        exec(compile(block, str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "(16, 128)" in printed.replace("torch.Size([16, 128])", "(16, 128)")
    assert namespace["scores"]["perplexity"] > 1 and 0 < namespace["scores"]["fidelity"]["top1_agreement"] <= 1
    assert (tmp_path / "pruned" / "sparselm.json").is_file()
    runner = CliRunner()
    for line in _blocks("bash")[0].strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "sparselm"
        result = runner.invoke(app, argv[1:])
        assert result.exit_code == 0, (line, result.output)
    assert (tmp_path / "pruned-dense" / "config.json").is_file()
