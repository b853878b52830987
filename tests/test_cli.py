"""The CLI: help for every command, and bad input as one line + exit code 2 (no traceback)."""

import subprocess
import sys

import pytest

COMMANDS = ["demo-data", "prepare", "synthesize", "push", "train", "evaluate", "predict"]


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def run_main(args, cwd, monkeypatch, capsys) -> tuple[int, str, str]:
    """In-process `uniadc ARGS` run from `cwd` (fast: no interpreter start): (exit code, stderr, stdout)."""
    from pipelines.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["uniadc", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err, captured.out


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


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--params", "nope.yaml"], "error: nope.yaml: params file not found"),
        (["demo-data", "out", "--size", "0"], "error: `--size` must be >= 32, got 0"),
        (["train", "--params", "p.yaml", "--set", "train.steps=-5"],
         "error: p.yaml: `train.steps` must be >= 1, got -5"),
        (["evaluate", "--params", "p.yaml", "--set", "image_size=-1"],
         "error: p.yaml: `image_size` must be >= 32, got -1"),
        (["train", "--params", "p.yaml", "--set", "train.device=gpu0"],
         "error: p.yaml: `train.device` must be a device name (auto, cpu, cuda, cuda:N, mps or xpu), got 'gpu0'"),
    ],
    ids=["missing-params", "demo-size", "steps", "image-size", "device"],
)
def test_bad_settings_are_one_line_errors(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "p.yaml").write_text("seed: 0\n")
    code, stderr, _ = run_main(args, tmp_path, monkeypatch, capsys)
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()


def test_evaluate_from_a_source_folder_builds_the_test_set_as_prepare_does(tmp_path, monkeypatch, capsys):
    """`evaluate --source DIR` (no manifest at hand, e.g. after training from a Hub dataset) picks
    the same test set as `prepare` with the same params, and records it beside the report."""
    import json

    import pipelines.evaluate
    from pipelines.prepare import prepare_manifest
    from tests.helpers.data import make_mvtec

    source = make_mvtec(tmp_path / "mvtec", "widget")
    (tmp_path / "params.yaml").write_text("data:\n  layout: mvtec\n  k_normal: 2\n")
    seen = {}

    def fake_run_evaluate(params, model_dir, manifest_path, out):
        seen["manifest"] = json.loads(open(manifest_path).read())
        return {name: 0.5 for name in ("image_auroc", "pixel_auroc", "aupro", "type_accuracy", "pixel_miou")} | {
            "test_images": len(seen["manifest"]["test"])}

    monkeypatch.setattr(pipelines.evaluate, "run_evaluate", fake_run_evaluate)
    from click.testing import CliRunner

    from pipelines.cli import cli

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["evaluate", "--model", "m", "--source", str(source), "--out", "rep"])
    assert result.exit_code == 0, result.output
    out = result.output
    expected = prepare_manifest(source, layout="mvtec", k_normal=2)
    assert [s["path"] for s in seen["manifest"]["test"]] == [str(s.path) for s in expected.test]
    assert (tmp_path / "rep/manifest.json").is_file() and "test set of" in out

    code, err, _ = run_main(["evaluate", "--model", "m", "--source", str(source), "--manifest", "x.json"],
                            tmp_path, monkeypatch, capsys)
    assert code == 2 and "either --manifest or --source" in err
