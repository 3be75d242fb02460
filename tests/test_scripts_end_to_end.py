"""The four step scripts chained as the pipeline chains them, each a real subprocess.

prepare -> train -> evaluate -> inference on the bundled sample, with every container layout
re-rooted in tmp_path. The settings come from the project's configuration for the local target
(kennel.toml with its [local] section), so this is also the check that the default local settings
reach 0.70 test accuracy on the sample, and a change to those defaults is checked here too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import contract
from pipeline.config import KennelConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = REPO_ROOT / "entrypoints"
SAMPLE = REPO_ROOT / "data" / "sample"


def local_defaults() -> KennelConfig:
    """The shipped kennel.toml for the local target; a developer's KENNEL_* variables left out."""
    return load_config(REPO_ROOT / "kennel.toml", environ={}).for_target("local")


def training_arguments(config: KennelConfig) -> list[str]:
    """train.py's arguments as the pipeline's training job gets them (steps/tune.py), with the
    tuned ones at a point the local tuner may pick: the geometric middle of its log-scaled
    learning-rate range, the smallest batch size and the most epochs."""
    lr = math.sqrt(config.lr_min * config.lr_max)
    return [
        "--arch", config.architecture, "--weights", config.weights, "--freeze", config.freeze,
        "--image-size", str(config.image_size), "--optimizer", config.optimizer,
        "--weight-decay", str(config.weight_decay), "--label-smoothing", str(config.label_smoothing),
        "--seed", str(config.seed), "--workers", str(config.workers),
        "--lr", f"{lr:.6g}", "--batch-size", str(min(config.batch_sizes)), "--epochs", str(config.epochs),
    ]


def run_script(script: str, base: Path, *args: str | Path, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_", "KENNEL_"))}
    result = subprocess.run(
        [sys.executable, str(ENTRYPOINTS / script), *map(str, args)],
        env={**clean, contract.BASE_DIR_VARIABLE: str(base), **(env or {})},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.slow
def test_prepare_train_evaluate_infer_on_the_sample(tmp_path: Path) -> None:
    # PrepareData: a processing job reading /opt/ml/processing/input/data.
    config = local_defaults()
    processing = tmp_path / "prepare"
    (processing / "processing" / "input").mkdir(parents=True)
    (processing / "processing" / "input" / "data").symlink_to(SAMPLE)
    run_script("prepare.py", processing, "--min-size", str(config.min_image_size), "--workers", "2")
    prepared = processing / "processing" / "output"
    manifest = json.loads((prepared / "report" / contract.MANIFEST_FILE).read_text())
    assert manifest["totals"]["all"] == 1400

    # Training job: channels from prepare's outputs, SM_* variables as the toolkit sets them.
    training = tmp_path / "train"
    model_dir = training / "model"
    stdout = run_script(
        "train.py", training, *training_arguments(config),
        env={
            "SM_CHANNEL_TRAIN": str(prepared / "train"),
            "SM_CHANNEL_VALID": str(prepared / "valid"),
            "SM_MODEL_DIR": str(model_dir),
            "SM_OUTPUT_DATA_DIR": str(training / "output" / "data"),
        },
    )
    epochs = [contract.parse_metric_line(line) for line in stdout.splitlines() if line.startswith("epoch=")]
    assert len(epochs) == config.epochs and all("valid:loss" in metrics for metrics in epochs)

    # SageMaker tars SM_MODEL_DIR into model.tar.gz; the evaluate job gets it as an input.
    evaluation_job = tmp_path / "evaluate"
    model_input = evaluation_job / "processing" / "input" / "model"
    model_input.mkdir(parents=True)
    with tarfile.open(model_input / "model.tar.gz", "w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    (evaluation_job / "processing" / "input" / "test").symlink_to(prepared / "test")
    run_script("evaluate.py", evaluation_job, "--workers", "0")
    evaluation = json.loads(
        (evaluation_job / "processing" / "output" / "evaluation" / contract.EVALUATION_FILE).read_text()
    )
    metrics = evaluation[contract.EVALUATION_METRICS_KEY]
    assert metrics["accuracy"]["value"] >= 0.70, metrics["accuracy"]
    assert 0 < metrics["loss"]["value"] < 2.0

    # Inference handlers from the packaged code/ folder alone, as the serving container loads them.
    image = next((prepared / "test" / "bag").iterdir())
    serve = (
        "import sys, inference;"
        "model = inference.model_fn(sys.argv[1]);"
        "status, body, _ = inference.handle(model, open(sys.argv[2], 'rb').read(), 'image/png', 'application/json');"
        "print(status); print(body.decode())"
    )
    result = subprocess.run(
        [sys.executable, "-c", serve, str(model_dir), str(image)],
        cwd=model_dir / "code", env={**os.environ, "PYTHONPATH": str(model_dir / "code")},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    status, body = result.stdout.splitlines()[-2:]
    assert status == "200"
    top = json.loads(body)["predictions"][0]
    assert top["label"] in manifest["classes"]
