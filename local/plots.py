"""Plots of a local run that a person would rather look at than read: training curves, confusion matrix.

  * Training steps: the loss per step and the training and validation loss and accuracy per
    epoch, from the tensors the Debugger hook saved (the series that local.debugger_rules
    extracts into `<job>/debugger/losses.json` and `epoch_means.json`). Without them (a job with
    no hook), the epochs come from train.py's per-epoch history (`contract.EPOCH_METRICS_FILE` in
    the job's output data folder) or, failing that, from the job's MetricDefinitions.
    `training_curves.png`.
  * Processing steps that write `evaluation.json` (the Evaluate step): its confusion matrix as
    `confusion_matrix.png`.

Each PNG is written with a JSON file of exactly the numbers it draws (`<name>.json`), lives in
`<job>/plots/`, is put in the store among the step's outputs (training: `<S3OutputPath>/<job>/
output/plots/`; processing: next to evaluation.json), and is listed in the step record's
Metadata["Plots"] for `kennel status`. matplotlib is used through its object API only (no
pyplot state), since steps run on several threads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoints.contract import (
    EPOCH_METRICS_FILE,
    EPOCH_TRAINING_ACCURACY_TENSOR,
    EPOCH_TRAINING_TENSOR,
    EPOCH_VALIDATION_ACCURACY_TENSOR,
    EPOCH_VALIDATION_TENSOR,
    EVALUATION_FILE,
    EVALUATION_METRICS_KEY,
)
from local.files import read_json, write_bytes_atomic, write_json_atomic
from local.handlers import StepContext, StepFailure, StepHandler, StepResult
from local.jobs.container import container_root, log_note, remap
from local.jobs.training import PreparedJob
from local.state import SUCCEEDED
from local.store import StoreError

PLOTS_FOLDER = "plots"
TRAINING_CURVES = "training_curves"
CONFUSION_MATRIX = "confusion_matrix"
LOSSES_FILE = Path("debugger") / "losses.json"  # written by local.debugger_rules
EPOCH_MEANS_FILE = Path("debugger") / "epoch_means.json"  # written by local.debugger_rules
# The tensor and mode of each per-epoch number the hook saves.
EPOCH_TENSORS = {
    "train_loss": (f"{EPOCH_TRAINING_TENSOR}_output_0", "TRAIN"),
    "valid_loss": (f"{EPOCH_VALIDATION_TENSOR}_output_0", "EVAL"),
    "train_accuracy": (f"{EPOCH_TRAINING_ACCURACY_TENSOR}_output_0", "TRAIN"),
    "valid_accuracy": (f"{EPOCH_VALIDATION_ACCURACY_TENSOR}_output_0", "EVAL"),
}
EPOCH_KEYS = ("epoch", *EPOCH_TENSORS)
EPOCH_PANELS = (
    (("train_loss", "valid_loss"), "Loss by epoch"),
    (("train_accuracy", "valid_accuracy"), "Accuracy by epoch"),
)


@dataclass(frozen=True)
class Plot:
    name: str
    png: Path
    data: Path  # the numbers drawn
    uri: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"Name": self.name, "Path": str(self.png), "Data": str(self.data), "Uri": self.uri}


# --- the numbers -------------------------------------------------------------------------------------


def epoch_history(job_dir: Path) -> list[dict[str, float]]:
    """Per-epoch metrics: train.py's history file, else the job's metric lines (by position)."""
    history_file = container_root(job_dir) / "output" / "data" / EPOCH_METRICS_FILE
    if history_file.is_file():
        try:
            rows = read_json(history_file)
            return [row for row in rows if isinstance(row, dict) and "epoch" in row]
        except (OSError, ValueError):
            pass
    metrics_file = job_dir / "metrics.json"  # MetricReader.history, by metric name
    if not metrics_file.is_file():
        return []
    history = read_json(metrics_file)
    names = {"train_loss": "train:loss", "valid_loss": "valid:loss", "valid_accuracy": "valid:accuracy"}
    length = max((len(history.get(metric, [])) for metric in names.values()), default=0)
    rows = []
    for index in range(length):
        row: dict[str, float] = {"epoch": index + 1}
        for key, metric in names.items():
            points = history.get(metric, [])
            if index < len(points):
                row[key] = points[index]["Value"]
        rows.append(row)
    return rows


def tensor_epochs(job_dir: Path, history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per-epoch losses and accuracies from the saved tensors: the k-th value saved of each is the
    k-th epoch this job trained. A resumed job trained only the last epochs of its `history`."""
    path = job_dir / EPOCH_MEANS_FILE
    if not path.is_file():
        return []
    series = read_json(path)
    columns = {
        key: [row[2] for row in (series.get(tensor) or {}).get(mode) or []]
        for key, (tensor, mode) in EPOCH_TENSORS.items()
    }
    count = max(len(values) for values in columns.values())
    first = int(history[-count]["epoch"]) if count and len(history) >= count else 1
    return [
        {
            "epoch": first + index,
            **{key: values[index] for key, values in columns.items() if index < len(values)},
        }
        for index in range(count)
    ]


def step_losses(job_dir: Path) -> dict[str, list[list[float]]]:
    """{"train": [[train step, loss]], "validation": [[train step it follows, mean loss]]} from the tensors.

    Validation steps are numbered apart from training steps. A validation pass is drawn as one
    point, the mean of its batches (single batches differ with the classes they hold), at the
    number of training steps done before it: its global step less the validation steps before it.
    """
    path = job_dir / LOSSES_FILE
    if not path.is_file():
        return {}
    series: dict[str, dict[str, list[list[float]]]] = read_json(path)
    train: list[list[float]] = []
    passes: dict[float, list[float]] = {}
    for by_mode in series.values():
        train_rows = by_mode.get("TRAIN") or by_mode.get("GLOBAL") or []
        train.extend([row[0], row[2]] for row in train_rows)
        for mode_step, global_step, value in by_mode.get("EVAL") or []:
            passes.setdefault(global_step - mode_step, []).append(value)
    validation = [[position, sum(values) / len(values)] for position, values in passes.items()]
    return {"train": sorted(train), "validation": sorted(validation)}


def confusion_data(evaluation: Mapping[str, Any]) -> dict[str, Any] | None:
    """{"class_names", "matrix"[actual][predicted]} from an evaluation.json, or None without one."""
    counts = (evaluation.get(EVALUATION_METRICS_KEY) or {}).get("confusion_matrix")
    if not isinstance(counts, dict) or not counts:
        return None
    names = [str(name) for name in evaluation.get("class_names") or counts]
    matrix = [[int((counts.get(actual) or {}).get(predicted, 0)) for predicted in names] for actual in names]
    return {"class_names": names, "matrix": matrix}


# --- drawing ----------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Any, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    write_bytes_atomic(path, buffer.getvalue())


def draw_training_curves(
    losses: dict[str, list[list[float]]], epochs: list[dict[str, float]], path: Path, source: str = "tensors"
) -> dict:
    """Loss per step (from the tensors), then loss and accuracy per epoch, where known.

    Returns the numbers drawn, and where the epochs' numbers came from (`source`)."""
    by_epoch: dict[str, Any] = {key: [row.get(key) for row in epochs] for key in EPOCH_KEYS}
    panels: list[Callable[[Any], None]] = []
    if losses.get("train") or losses.get("validation"):
        panels.append(lambda axes: step_panel(axes, losses))
    for keys, title in EPOCH_PANELS:
        if any(value is not None for key in keys for value in by_epoch[key]):
            panels.append(lambda axes, keys=keys, title=title: epoch_panel(axes, by_epoch, keys, title))
    figure = new_figure(5.0 * len(panels), 3.6)
    for index, draw in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        draw(axes)
        axes.grid(alpha=0.3)
    save_png(figure, path)
    return {"loss_by_step": losses, "by_epoch": {**by_epoch, "source": source}}


def step_panel(axes: Any, losses: dict[str, list[list[float]]]) -> None:
    for key, label, style in (("train", "training (per step)", "-"), ("validation", "validation", "o-")):
        if losses.get(key):
            axes.plot(*zip(*losses[key], strict=True), style, label=label, linewidth=1, markersize=4)
    axes.set(title="Loss by training step (saved tensors)", xlabel="training step", ylabel="loss")
    axes.legend()


EPOCH_LABELS = {
    "train_loss": "training",
    "valid_loss": "validation",
    "train_accuracy": "training",
    "valid_accuracy": "validation",
}


def epoch_panel(axes: Any, by_epoch: dict[str, list], keys: tuple[str, ...], title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for key in keys:
        points = [
            (epoch, value)
            for epoch, value in zip(by_epoch["epoch"], by_epoch[key], strict=True)
            if value is not None
        ]
        if points:
            axes.plot(*zip(*points, strict=True), "o-", label=EPOCH_LABELS[key])
    accuracy = all(key.endswith("_accuracy") for key in keys)
    axes.set(title=title, xlabel="epoch", ylabel="accuracy" if accuracy else "loss")
    if accuracy:
        axes.set_ylim(0, 1)
    axes.legend()
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def draw_confusion_matrix(data: dict[str, Any], path: Path) -> None:
    names, matrix = data["class_names"], data["matrix"]
    size = max(4.0, 0.55 * len(names) + 2.5)
    figure = new_figure(size, size)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set(title="Confusion matrix (test set)", xlabel="predicted", ylabel="actual")
    peak = max((value for row in matrix for value in row), default=0)
    for row, counts in enumerate(matrix):
        for column, value in enumerate(counts):
            if value:
                axes.text(
                    column,
                    row,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if value > peak / 2 else "black",
                )
    save_png(figure, path)


def plot_training(job_dir: Path) -> list[Plot]:
    """training_curves.png (+ .json) in `<job>/plots/` from what the job left; [] with nothing to draw."""
    history = epoch_history(job_dir)
    losses, epochs = step_losses(job_dir), tensor_epochs(job_dir, history)
    source = "tensors" if epochs else "metrics"
    epochs = epochs or history
    if not losses.get("train") and not losses.get("validation") and not epochs:
        return []
    folder = job_dir / PLOTS_FOLDER
    png, data = folder / f"{TRAINING_CURVES}.png", folder / f"{TRAINING_CURVES}.json"
    write_json_atomic(data, draw_training_curves(losses, epochs, png, source))
    return [Plot(TRAINING_CURVES, png, data)]


def plot_confusion_matrix(evaluation_file: Path, folder: Path) -> Plot | None:
    try:
        data = confusion_data(read_json(evaluation_file))
    except (OSError, ValueError):
        return None
    if data is None:
        return None
    png, data_file = folder / f"{CONFUSION_MATRIX}.png", folder / f"{CONFUSION_MATRIX}.json"
    draw_confusion_matrix(data, png)
    write_json_atomic(data_file, data)
    return Plot(CONFUSION_MATRIX, png, data_file)


def store_plots(plots: list[Plot], prefix: str, context: StepContext) -> list[Plot]:
    """Put each PNG and its data under `prefix` in the store; the plots with their URIs."""
    stored = []
    for plot in plots:
        uri = f"{prefix.rstrip('/')}/{plot.png.name}"
        try:
            context.store.put_file(plot.png, uri)
            context.store.put_file(plot.data, f"{prefix.rstrip('/')}/{plot.data.name}")
        except (StoreError, OSError) as error:
            log_note(context.log_path, f"plot {plot.name} not stored: {error}")
            uri = None
        stored.append(Plot(plot.name, plot.png, plot.data, uri))
    return stored


# --- wiring into steps -----------------------------------------------------------------------------


def plots_monitor(request: dict, job_name: str, job: PreparedJob, context: StepContext) -> PlotsMonitor:
    """A training-job monitor (MonitorFactory) that draws the curves when the job ends."""
    output = str((request.get("OutputDataConfig") or {}).get("S3OutputPath") or "").rstrip("/")
    return PlotsMonitor(f"{output}/{job_name}/output/{PLOTS_FOLDER}" if output else "", context)


class PlotsMonitor:
    def __init__(self, prefix: str, context: StepContext) -> None:
        self.prefix = prefix
        self.context = context

    def stop_reason(self) -> str | None:
        return None

    def finish(self, properties: dict[str, Any], metadata: dict[str, Any]) -> None:
        # Runs after the Debugger monitor, whose child wrote the loss series.
        plots = plot_training(self.context.job_dir)
        if plots and self.prefix:
            plots = store_plots(plots, self.prefix, self.context)
        if plots:
            metadata["Plots"] = [plot.to_json() for plot in plots]


class ConfusionMatrixPlots:
    """Wraps the Processing handler: a step that wrote evaluation.json gets its confusion matrix."""

    def __init__(self, inner: StepHandler) -> None:
        self.inner = inner

    def run(self, step: dict, arguments: dict, context: StepContext) -> StepResult:
        result = self.inner.run(step, arguments, context)
        if result.status != SUCCEEDED:
            return result
        plots = []
        for output in (arguments.get("ProcessingOutputConfig") or {}).get("Outputs") or []:
            s3 = output.get("S3Output") or {}
            try:
                folder = remap(str(s3.get("LocalPath") or ""), context.job_dir, what="LocalPath")
            except StepFailure:  # outside /opt/ml: the job refused it already
                continue
            if not (folder / EVALUATION_FILE).is_file():
                continue
            try:
                plot = plot_confusion_matrix(folder / EVALUATION_FILE, context.job_dir / PLOTS_FOLDER)
            except (OSError, ValueError) as error:
                log_note(context.log_path, f"confusion matrix not drawn: {error}")
                continue
            if plot is not None:
                plots += (
                    store_plots([plot], str(s3.get("S3Uri") or ""), context) if s3.get("S3Uri") else [plot]
                )
        if plots:
            result.metadata["Plots"] = [plot.to_json() for plot in plots]
        return result


def describe_plots(metadata: Mapping[str, Any]) -> list[str]:
    """Lines for a status display: each plot's file (and where it is in the store)."""
    return [
        f"{item['Name']}: {item['Path']}" + (f" ({item['Uri']})" if item.get("Uri") else "")
        for item in metadata.get("Plots") or []
    ]
