"""`kiln serve` and `kiln bench serve` as commands: they explain themselves and refuse bad input."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kiln.cli import app
from tests.cli_docs import DOCUMENTED

runner = CliRunner()


@pytest.mark.parametrize("verb", [("serve",), ("bench", "serve")])
def test_commands_explain_themselves(verb):
    result = runner.invoke(app, [*verb, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    documented = DOCUMENTED[verb]  # the flags README.md and docs/ use with this verb
    assert documented and all(flag in result.output for flag in documented), (documented, result.output)


def test_serve_refuses_a_directory_without_a_model(tmp_path):
    result = runner.invoke(app, ["serve", "--model", str(tmp_path)])
    assert result.exit_code != 0
    assert "no config.json" in str(result.exception)


def test_bench_serve_refuses_bad_slos(tmp_path):
    result = runner.invoke(
        app, ["bench", "serve", "--slo", "ttft:fast", "--output", str(tmp_path / "x.json")]
    )
    assert result.exit_code != 0 and "NAME=MILLISECONDS" in str(result.exception)
