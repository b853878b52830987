"""`uniadc`: the command line. One command per DVC stage, plus demo data, push and predict.

Commands import their stage lazily so `uniadc --help` stays instant. Bad input surfaces as an
`InputError`, caught here once: one line on stderr, exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from core.errors import InputError

PARAMS_OPTION = click.option(
    "--params", "params_path", default=None, type=click.Path(dir_okay=False),
    help="params.yaml to read the settings from (it must exist). Default: ./params.yaml when present, "
         "else the built-in defaults.",
)
MANIFEST_OPTION = click.option(
    "--manifest", "manifest_path", default="data/prepared/manifest.json", show_default=True,
    type=click.Path(dir_okay=False), help="The manifest written by `uniadc prepare`.",
)
SET_OPTION = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a param, e.g. --set synthesis.images_per_type=10 (YAML value). Repeatable.",
)


def _params(params_path: str | None, overrides: tuple[str, ...]):
    import yaml

    from pipelines.config import load_params

    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        parsed[key.strip()] = yaml.safe_load(value)
    if params_path is None and Path("params.yaml").is_file():
        params_path = "params.yaml"
    return load_params(params_path, parsed)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="uniadc")
def cli() -> None:
    """Synthesize labelled anomalies and train a unified anomaly detector + classifier (UniADC)."""


@cli.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False), default="data/demo")
@click.option("--seed", default=0, show_default=True, help="Seed of the procedural generator.")
@click.option("--size", default=256, show_default=True, help="Image side in pixels.")
def demo_data(out: str, seed: int, size: int) -> None:
    """Write the built-in procedural demo dataset (MVTec AD layout, two categories) to OUT."""
    from pipelines.config import DemoConfig, check_value
    from pipelines.demo_data import generate_demo_categories

    check_value(DemoConfig, "size", size, None, "--size")
    folders = generate_demo_categories(Path(out), seed=seed, size=size)
    click.echo(f"demo dataset written to {out}: categories {', '.join(f.name for f in folders)}")


@cli.command()
@PARAMS_OPTION
@SET_OPTION
@click.option("--out", default="data/prepared", show_default=True, type=click.Path(file_okay=False),
              help="Folder for manifest.json.")
@click.option("--category", default=None,
              help="The category to prepare (overrides data.category; dvc.yaml passes each of data.categories).")
def prepare(params_path: str, overrides: tuple[str, ...], out: str, category: str | None) -> None:
    """Pick the shots and the test set from the source data (params `data:`) into a manifest."""
    params = _params(params_path, overrides)
    from pipelines.prepare import prepare_manifest

    d = params.data
    manifest = prepare_manifest(
        d.root, layout=d.layout, category=category or d.category, anomaly_types=d.anomaly_types,
        k_normal=d.k_normal, k_anomaly=d.k_anomaly,
    )
    path = Path(out) / "manifest.json"
    manifest.save(path)
    click.echo(
        f"{path}: category {manifest.category}, types {', '.join(manifest.anomaly_types)}; "
        f"{len(manifest.normal_shots)} normal + {len(manifest.anomaly_shots)} anomalous shots, "
        f"{len(manifest.test)} test images"
    )
    _report_excluded(manifest)


def _report_excluded(manifest) -> None:
    """Every anomalous image left out of the test set, by name: a mask format misread as empty
    must show up here, not only in the manifest."""
    excluded = manifest.source.get("excluded_empty_masks", [])
    if excluded:
        click.echo(f"excluded {len(excluded)} anomalous images whose mask is empty:")
        for path in excluded:
            click.echo(f"  excluded (empty mask): {path}")


@cli.command()
@PARAMS_OPTION
@SET_OPTION
@MANIFEST_OPTION
@click.option("--out", default="data/synthetic", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the frozen dataset (Parquet shards + README.md card).")
@click.option("--overwrite", is_flag=True,
              help="Replace a dataset made with other settings in --out (only its own files are removed).")
def synthesize(params_path: str, overrides: tuple[str, ...], manifest_path: str, out: str, overwrite: bool) -> None:
    """Render the synthetic anomaly dataset (resumable; run under `accelerate launch` for many processes).

    OUT must be new, empty or made by this command; a dataset there made with the same settings is
    resumed, one made with other settings is only replaced with --overwrite.
    """
    from pipelines.synthesize import run_synthesize

    params = _params(params_path, overrides)
    run_synthesize(manifest_path, out, params.synthesis, image_size=params.image_size, global_seed=params.seed,
                   overwrite=overwrite)


@cli.command()
@click.argument("repo_id")
@click.option("--dir", "dataset_dir", default="data/synthetic", show_default=True,
              type=click.Path(file_okay=False), help="The frozen dataset to upload.")
@click.option("--private", is_flag=True, help="Create the Hub repository as private.")
def push(repo_id: str, dataset_dir: str, private: bool) -> None:
    """Upload the frozen dataset to the Hugging Face Hub as REPO_ID (token from HF_TOKEN)."""
    from pipelines.synthesize import push_dataset

    url = push_dataset(dataset_dir, repo_id, private=private)
    click.echo(f"pushed {dataset_dir} to {url}")


@cli.command()
@PARAMS_OPTION
@SET_OPTION
@click.option("--dataset", "dataset_dir", default="data/synthetic", show_default=True,
              help="The frozen dataset: a folder, or a Hub dataset id `owner/name[@revision]` "
                   "(fetched into the HF cache; HF_HUB_OFFLINE=1 uses the cached snapshot).")
@click.option("--manifest", "manifest_path", default=None, type=click.Path(dir_okay=False),
              help="Optional: take the real shots from this manifest instead of the dataset's `shots` "
                   "config (needed only for datasets that carry no shots).")
@click.option("--out", default="models/discriminator", show_default=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (config.json + model.safetensors).")
def train(params_path: str, overrides: tuple[str, ...], dataset_dir: str, manifest_path: str | None,
          out: str) -> None:
    """Train the discriminator from the frozen dataset alone (its synthetic rows and real shots)."""
    from pipelines.train import run_train

    result = run_train(_params(params_path, overrides), dataset_dir, manifest_path, out)
    cal = result.calibration
    click.echo(
        f"{out}: {result.steps} steps in {result.seconds:.0f} s ({result.images_per_second:.1f} images/s on "
        f"{result.device}), final loss {result.final_loss:.3f}; thresholds pixel {cal.pixel_threshold:.3f}, "
        f"image {cal.image_threshold:.3f}"
    )


@cli.command()
@PARAMS_OPTION
@SET_OPTION
@click.option("--model", "model_dir", default="models/discriminator", show_default=True,
              type=click.Path(file_okay=False))
@MANIFEST_OPTION
@click.option("--source", default=None, type=click.Path(file_okay=False),
              help="Instead of --manifest: the source data folder; the test set is picked from it with "
                   "params `data:` (layout, types, shot counts: the frozen dataset's card records them), "
                   "and the manifest used is written to OUT/manifest.json.")
@click.option("--category", default=None, help="With --source: the category (overrides data.category).")
@click.option("--out", default="reports", show_default=True, type=click.Path(file_okay=False),
              help="Folder for metrics.json, plots/ and the figures.")
def evaluate(params_path: str, overrides: tuple[str, ...], model_dir: str, manifest_path: str,
             source: str | None, category: str | None, out: str) -> None:
    """Score the manifest's real test set: metrics, curves, confusion matrix, overlays."""
    from click.core import ParameterSource

    from pipelines.evaluate import run_evaluate

    params = _params(params_path, overrides)
    if source is not None:
        if click.get_current_context().get_parameter_source("manifest_path") == ParameterSource.COMMANDLINE:
            raise InputError("give either --manifest or --source, not both")
        from pipelines.prepare import prepare_manifest

        d = params.data
        manifest = prepare_manifest(source, layout=d.layout, category=category or d.category,
                                    anomaly_types=d.anomaly_types, k_normal=d.k_normal, k_anomaly=d.k_anomaly)
        manifest_path = str(Path(out) / "manifest.json")
        manifest.save(manifest_path)
        click.echo(f"{manifest_path}: test set of {source} ({len(manifest.test)} images, "
                   f"{len(manifest.normal_shots)} normal + {len(manifest.anomaly_shots)} anomalous shots left out)")
        _report_excluded(manifest)
    metrics = run_evaluate(params, model_dir, manifest_path, out)
    names = ["image_auroc", "pixel_auroc", "aupro", "type_accuracy", "pixel_miou"]
    summary = ", ".join(  # an undefined metric is null in metrics.json
        f"{name} {'n/a' if metrics[name] is None else f'{100 * metrics[name]:.1f}'}" for name in names
    )
    click.echo(f"{out}/metrics.json ({metrics['test_images']} test images): {summary}")


@cli.command()
@PARAMS_OPTION
@SET_OPTION
@click.option("--root", default=None, type=click.Path(file_okay=False), help="Source data (default: data.root).")
@click.option("--layout", default=None, help="Its layout (default: data.layout).")
def categories(params_path: str, overrides: tuple[str, ...], root: str | None, layout: str | None) -> None:
    """Print every category the layout finds, as a YAML list for data.categories (`-S data.categories=...`)."""
    from pipelines.sources import list_categories

    params = _params(params_path, overrides)
    click.echo("[" + ", ".join(list_categories(root or params.data.root, layout or params.data.layout)) + "]")


@cli.command()
@PARAMS_OPTION
@SET_OPTION
@click.option("--reports", "reports_dir", default="reports/categories", show_default=True,
              type=click.Path(file_okay=False), help="Folder holding one `uniadc evaluate` report per category.")
@click.option("--out", default="reports", show_default=True, type=click.Path(file_okay=False),
              help="Folder for metrics.json (per-category and mean) and summary.md.")
def aggregate(params_path: str, overrides: tuple[str, ...], reports_dir: str, out: str) -> None:
    """Per-category and mean metrics over data.categories, and a Markdown table (summary.md)."""
    from pipelines.aggregate import COLUMNS, run_aggregate

    params = _params(params_path, overrides)
    names = params.data.categories
    if names is None:  # no list in params: every category that has a report
        names = sorted(p.parent.name for p in Path(reports_dir).glob("*/metrics.json"))
    result = run_aggregate(reports_dir, names, out)
    mean = ", ".join(f"{title} {100 * result['mean'][k]:.1f}" for k, title in COLUMNS if k in result["mean"])
    click.echo(f"{out}/summary.md: {len(names)} categories; mean {mean}")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="Checkpoint folder, or its export: an .onnx file or an OpenVINO folder / .xml.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Folder for overlay PNGs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
def predict(images: tuple[str, ...], model_dir: str, out: str | None, device: str) -> None:
    """Score IMAGES: one JSON line per image (score, decision, type, overlay path).

    An unreadable image gets a line with its "error" and the rest are still scored; the exit code
    is then 2.
    """
    import json

    from pipelines.predict import run_predict

    failed = 0
    for record in run_predict(list(images), model_dir, out_dir=out, device=device):
        failed += "error" in record
        click.echo(json.dumps(record))
    if failed:  # every other image was scored; the exit code still tells scripts that some were not
        raise InputError(f"{failed} of {len(images)} images could not be scored (see their \"error\" lines)")


@cli.command()
@click.option("--model", "model_dir", default="models/discriminator", show_default=True,
              type=click.Path(file_okay=False), help="Checkpoint folder.")
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "openvino"]))
@click.option("--out", default=None, type=click.Path(),
              help="The .onnx file or OpenVINO folder (default: beside the checkpoint, MODEL.onnx / MODEL-openvino).")
def export(model_dir: str, fmt: str, out: str | None) -> None:
    """Export the whole inference graph (thresholds and class names included) for `uniadc predict --model`."""
    from discriminator.deploy.export import export_model

    path = export_model(model_dir, fmt, out)
    click.echo(f"{path}: {fmt} export of {model_dir}")


def main() -> None:
    if not sys.stderr.isatty():  # logs (dvc repro, CI): a progress line every 10 s, not every update
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    try:
        cli.main(standalone_mode=False)
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
