"""Plots of a run: the training curves and the confusion matrix show the run's own numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from debugger_support import DebugRun
from PIL import Image

import debugger
from entrypoints import contract
from local.files import write_json_atomic
from local.plots import (
    confusion_data,
    describe_plots,
    epoch_history,
    plot_training,
    step_losses,
    tensor_epochs,
)
from local.state import load_execution

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated create function:DeprecationWarning")


def plots_of(metadata: dict) -> dict[str, dict]:
    return {item["Name"]: item for item in metadata.get("Plots") or []}


def check_png(path: Path, min_width: int) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= 200


@pytest.mark.slow
def test_training_curves_plot_the_runs_metrics_and_saved_losses(healthy_debug_run: DebugRun) -> None:
    from smdebug import modes
    from smdebug.trials import create_trial

    run = healthy_debug_run
    # Recorded on disk in the step record, where `kennel status` reads it.
    stored = load_execution(run.home, run.execution.execution_id).steps["TrainWithDebugger"]
    plot = plots_of(stored.metadata)["training_curves"]
    check_png(Path(plot["Path"]), 1000)
    assert run.store().read_bytes(plot["Uri"]) == Path(plot["Path"]).read_bytes()
    assert plot["Uri"].endswith(f"/{stored.properties['TrainingJobName']}/output/plots/training_curves.png")
    drawn = json.loads(Path(plot["Data"]).read_text())

    # Per epoch, drawn from the saved tensors: the values train.py printed, line by line, in the
    # job's log (the tensors are float32, the lines have six decimals).
    lines = [line for line in Path(stored.log_path).read_text().splitlines() if line.startswith("epoch=")]
    printed = [
        {
            **contract.parse_metric_line(line),
            "train:accuracy": float(re.search(r"train_accuracy=(\S+)", line)[1]),
        }
        for line in lines
    ]
    assert len(printed) == 3 and drawn["by_epoch"]["epoch"] == [1, 2, 3]
    assert drawn["by_epoch"]["source"] == "tensors"
    for key, metric in (
        ("train_loss", "train:loss"),
        ("valid_loss", "valid:loss"),
        ("train_accuracy", "train:accuracy"),
        ("valid_accuracy", "valid:accuracy"),
    ):
        assert drawn["by_epoch"][key] == pytest.approx([row[metric] for row in printed], abs=1e-5), key
    # Accuracies that say something: with 4 classes, chance is 0.25; the head learns above it.
    assert max(drawn["by_epoch"]["train_accuracy"]) > 0.25 and max(drawn["by_epoch"]["valid_accuracy"]) > 0.25

    # Per step: the loss tensors the hook saved, read back with smdebug.
    trial = create_trial(str(run.job_dir / "opt_ml" / "output" / "tensors"))
    [loss] = trial.tensor_names(collection="losses")
    saved = [
        [step, float(trial.tensor(loss).value(step, mode=modes.TRAIN))]
        for step in trial.tensor(loss).steps(mode=modes.TRAIN)
    ]
    assert [step for step, _ in saved] == [0, 1, 2, 3, 4, 5]  # each of the first 10 training steps
    assert drawn["loss_by_step"]["train"] == saved  # the same float32 values, read the same way
    validation = [
        float(trial.tensor(loss).value(step, mode=modes.EVAL))
        for step in trial.tensor(loss).steps(mode=modes.EVAL)
    ]
    assert len(validation) == 6  # two validation batches per epoch
    # Each validation pass is drawn once, as the mean of its batches, after its epoch's training steps.
    passes = [(validation[i] + validation[i + 1]) / 2 for i in (0, 2, 4)]
    assert [value for _, value in drawn["loss_by_step"]["validation"]] == pytest.approx(passes)
    assert [step for step, _ in drawn["loss_by_step"]["validation"]] == [2, 4, 6]

    # What the loss rules compare and the epoch panels draw: each epoch's means, saved at the last
    # step of each phase only.
    for tensor, mode, metric in (
        (contract.EPOCH_TRAINING_TENSOR, modes.TRAIN, "train:loss"),
        (contract.EPOCH_VALIDATION_TENSOR, modes.EVAL, "valid:loss"),
        (debugger.EPOCH_ACCURACY_TENSORS[debugger.TRAIN], modes.TRAIN, "train:accuracy"),
        (debugger.EPOCH_ACCURACY_TENSORS[debugger.EVAL], modes.EVAL, "valid:accuracy"),
    ):
        means = trial.tensor(f"{tensor}_output_0")
        assert means.steps(mode=mode) == [1, 3, 5]
        values = [float(means.value(step, mode=mode)) for step in (1, 3, 5)]
        assert values == pytest.approx([row[metric] for row in printed], abs=1e-5)
    assert describe_plots(stored.metadata) == [f"training_curves: {plot['Path']} ({plot['Uri']})"]


@pytest.mark.slow
def test_the_evaluate_step_gets_its_confusion_matrix(healthy_debug_run: DebugRun) -> None:
    run = healthy_debug_run
    assert run.execution.status == "Succeeded", run.execution.failure_reason
    record = load_execution(run.home, run.execution.execution_id).steps["Evaluate"]
    plot = plots_of(record.metadata)["confusion_matrix"]
    check_png(Path(plot["Path"]), 400)
    [output] = record.properties["ProcessingOutputConfig"]["Outputs"]
    evaluation_uri = f"{output['S3Output']['S3Uri'].rstrip('/')}/{contract.EVALUATION_FILE}"
    evaluation = json.loads(run.store().read_bytes(evaluation_uri))
    # Among the step's outputs, next to evaluation.json.
    assert plot["Uri"] == evaluation_uri.replace(contract.EVALUATION_FILE, "confusion_matrix.png")
    assert run.store().exists(plot["Uri"])
    drawn = json.loads(Path(plot["Data"]).read_text())
    counts = evaluation[contract.EVALUATION_METRICS_KEY]["confusion_matrix"]
    assert drawn["class_names"] == evaluation["class_names"]
    assert drawn["matrix"] == [
        [counts[actual][predicted] for predicted in drawn["class_names"]] for actual in drawn["class_names"]
    ]
    assert sum(map(sum, drawn["matrix"])) == evaluation["test_samples"] == 20


def test_confusion_data_keeps_the_class_order_of_the_evaluation() -> None:
    evaluation = {
        "class_names": ["b", "a"],
        contract.EVALUATION_METRICS_KEY: {"confusion_matrix": {"a": {"a": 3, "b": 1}, "b": {"a": 0, "b": 4}}},
    }
    assert confusion_data(evaluation) == {"class_names": ["b", "a"], "matrix": [[4, 0], [1, 3]]}
    assert confusion_data({contract.EVALUATION_METRICS_KEY: {}}) is None


def test_epochs_come_from_the_metric_lines_when_the_script_wrote_no_history(tmp_path: Path) -> None:
    history = {
        "train:loss": [{"Value": 2.0, "Timestamp": 1}, {"Value": 1.5, "Timestamp": 2}],
        "valid:loss": [{"Value": 1.8, "Timestamp": 1}, {"Value": 1.6, "Timestamp": 2}],
        "valid:accuracy": [{"Value": 0.4, "Timestamp": 1}, {"Value": 0.5, "Timestamp": 2}],
    }
    write_json_atomic(tmp_path / "metrics.json", history)
    assert epoch_history(tmp_path) == [
        {"epoch": 1, "train_loss": 2.0, "valid_loss": 1.8, "valid_accuracy": 0.4},
        {"epoch": 2, "train_loss": 1.5, "valid_loss": 1.6, "valid_accuracy": 0.5},
    ]
    [plot] = plot_training(tmp_path)
    drawn = json.loads(plot.data.read_text())
    assert drawn["by_epoch"]["valid_accuracy"] == [0.4, 0.5] and drawn["loss_by_step"] == {}
    assert drawn["by_epoch"]["source"] == "metrics" and drawn["by_epoch"]["train_accuracy"] == [None, None]
    check_png(plot.png, 800)


def test_a_resumed_job_saved_the_tensors_of_its_last_epochs_only(tmp_path: Path) -> None:
    # Epoch 1 came from a checkpoint: the history has three epochs, the tensors two.
    history = [{"epoch": epoch, "valid_loss": 1.0} for epoch in (1, 2, 3)]
    write_json_atomic(tmp_path / "opt_ml" / "output" / "data" / contract.EPOCH_METRICS_FILE, history)
    series = {
        f"{contract.EPOCH_TRAINING_TENSOR}_output_0": {"TRAIN": [[1, 1, 1.5], [3, 5, 1.2]]},
        f"{contract.EPOCH_VALIDATION_TENSOR}_output_0": {"EVAL": [[1, 3, 1.4], [3, 7, 1.3]]},
        f"{debugger.EPOCH_ACCURACY_TENSORS[debugger.EVAL]}_output_0": {"EVAL": [[1, 3, 0.5], [3, 7, 0.6]]},
    }
    write_json_atomic(tmp_path / "debugger" / "epoch_means.json", series)
    assert tensor_epochs(tmp_path, epoch_history(tmp_path)) == [
        {"epoch": 2, "train_loss": 1.5, "valid_loss": 1.4, "valid_accuracy": 0.5},
        {"epoch": 3, "train_loss": 1.2, "valid_loss": 1.3, "valid_accuracy": 0.6},
    ]
    [plot] = plot_training(tmp_path)
    drawn = json.loads(plot.data.read_text())["by_epoch"]
    assert (
        drawn["source"] == "tensors" and drawn["epoch"] == [2, 3] and drawn["train_accuracy"] == [None, None]
    )


def test_the_plots_name_the_tensors_train_py_saves() -> None:
    from local.plots import EPOCH_TENSORS

    assert {EPOCH_TENSORS[key][0] for key in ("train_accuracy", "valid_accuracy")} == {
        f"{name}_output_0" for name in debugger.EPOCH_ACCURACY_TENSORS.values()
    }


def test_validation_passes_are_placed_after_the_training_steps_before_them(tmp_path: Path) -> None:
    # [mode step, global step, value]: training saved every 2nd step; a validation pass of one batch
    # after training steps 0-3 and one of two batches after steps 4-7, drawn as their mean.
    series = {
        "loss": {
            "TRAIN": [[0, 0, 2.0], [2, 2, 1.8], [4, 5, 1.6], [6, 7, 1.4]],
            "EVAL": [[0, 4, 1.9], [1, 9, 1.5], [2, 10, 1.9]],
        }
    }
    write_json_atomic(tmp_path / "debugger" / "losses.json", series)
    assert step_losses(tmp_path) == {
        "train": [[0, 2.0], [2, 1.8], [4, 1.6], [6, 1.4]],
        "validation": [[4, 1.9], [8, pytest.approx(1.7)]],
    }


def test_nothing_to_plot_means_no_plot(tmp_path: Path) -> None:
    assert plot_training(tmp_path) == []
    assert not (tmp_path / "plots").exists()
