"""The CLI: help for every command, and bad input as one line + exit code 2 (no traceback)."""

import subprocess
import sys

import pytest

COMMANDS = ["demo-data", "prepare", "synthesize", "push", "train", "evaluate", "predict"]


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_bad_params_is_one_line_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  k_normall: 2\n")
    result = run_cli("prepare", "--params", str(params), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key `data.k_normall`" in lines[0]


def test_bad_set_override_is_one_line_error(tmp_path):
    result = run_cli("prepare", "--params", str(tmp_path / "p.yaml"), "--set", "nokeyvalue")
    assert result.returncode == 2
    assert "--set expects KEY=VALUE" in result.stderr
