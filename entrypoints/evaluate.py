"""Evaluate step: score the trained model on the test split and write evaluation.json.

Runs as a SageMaker processing job (or by hand):

    python evaluate.py --model DIR --test DIR --output DIR

`--model` holds the training job's model.tar.gz (or an unpacked model folder), `--test` is an
ImageFolder tree (<class>/<image>). The report follows SageMaker Model Monitor's
`multiclass_classification_metrics` layout (each metric a {"value", "standard_deviation"} object),
plus the test loss, top-5 accuracy, macro F1 and per-class scores; the pipeline's condition step
reads the loss at contract.TEST_LOSS_JSON_PATH.

Inputs a user can get wrong (no model, empty test folder, classes the model does not know, an
unsafe or unreadable archive, an unreadable image) end in one line on stderr and in
/opt/ml/output/message, exit code 2, and no evaluation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import contract
import nets
from images import ImageRejected, decode_rgb
from presets import EvalPreset

MODEL_TARBALL = "model.tar.gz"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TOP_K = 5
# Model Monitor: "standard deviation ... only when at least 200 samples are available", computed
# by sampling 80% of the data 5 times; with fewer samples it writes the string "NaN".
STD_MIN_SAMPLES = 200
STD_DRAWS = 5
STD_FRACTION = 0.8
STD_UNAVAILABLE = "NaN"
EXIT_USER_ERROR = 2


class EvaluationError(Exception):
    """An input the user controls is unusable; the message names it and says what to do."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a Kennel model on an ImageFolder test split.")
    parser.add_argument(
        "--model",
        default=contract.opt_ml("processing/input/model"),
        help="folder holding model.tar.gz (or an unpacked model folder), or the model.tar.gz itself",
    )
    parser.add_argument(
        "--test", default=contract.opt_ml("processing/input/test"), help="ImageFolder test split"
    )
    parser.add_argument(
        "--output",
        default=contract.opt_ml("processing/output", contract.EVALUATION_OUTPUT),
        help=f"folder for {contract.EVALUATION_FILE}",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, default=2, help="data loading processes (0: in the main process)"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        report = evaluate_model(Path(args.model), Path(args.test), args.batch_size, args.workers)
        write_report(Path(args.output), report)
    except EvaluationError as error:
        report_failure(str(error))
        return EXIT_USER_ERROR
    metrics = report[contract.EVALUATION_METRICS_KEY]
    print(
        contract.TEST_METRIC_LINE.format(
            test_loss=metrics["loss"]["value"], test_accuracy=metrics["accuracy"]["value"]
        ),
        flush=True,
    )
    return 0


def evaluate_model(model_path: Path, test_dir: Path, batch_size: int, workers: int) -> dict:
    if batch_size < 1 or workers < 0:
        raise EvaluationError(
            f"--batch-size {batch_size} / --workers {workers}: need batch size >= 1, workers >= 0"
        )
    images_by_class = find_test_images(test_dir)
    with tempfile.TemporaryDirectory(prefix="kennel-model-") as scratch:
        model_dir = resolve_model_dir(model_path, Path(scratch))
        model, meta = load_model(model_dir, model_path)  # weights now live in memory: scratch can go
    samples = label_by_name(images_by_class, meta.class_names, test_dir)
    dataset = EvalImages(samples, EvalPreset(meta.image_size, meta.mean, meta.std), meta.image_size)
    logits, targets = predict(model, dataset, batch_size, workers)
    if not torch.isfinite(logits).all():
        raise EvaluationError(
            f"{model_path}: the model produced NaN or infinite outputs on the test set; training diverged "
            f"(lower the learning rate or check the training log)"
        )
    return build_report(logits, targets, meta)


# --- inputs ----------------------------------------------------------------------------------


def find_test_images(test_dir: Path) -> dict[str, list[Path]]:
    """Image files per class folder (as ImageFolder finds them: recursive, hidden files skipped)."""
    if not test_dir.is_dir():
        raise EvaluationError(
            f"--test {test_dir}: no such folder; give the test split as <class>/<image> files"
        )
    found = {}
    for class_dir in sorted(path for path in test_dir.iterdir() if path.is_dir() and not _hidden(path)):
        files = sorted(
            path
            for path in class_dir.rglob("*")
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(path)
        )
        if files:
            found[class_dir.name] = files
    if not found:
        raise EvaluationError(
            f"--test {test_dir}: no images found; expected <class>/<image> files with one of "
            f"{', '.join(IMAGE_EXTENSIONS)} (is the prepare step's test output wired to this input?)"
        )
    return found


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def label_by_name(
    images_by_class: dict[str, list[Path]], class_names: list[str], test_dir: Path
) -> list[tuple[Path, int]]:
    """(image, model class index) pairs; classes are matched by folder name, never by position."""
    index = {name: position for position, name in enumerate(class_names)}
    unknown = sorted(set(images_by_class) - set(index))
    if unknown:
        raise EvaluationError(
            f"--test {test_dir}: class folder(s) {_some(unknown)} are not classes of the model "
            f"({len(class_names)} classes: {_some(class_names)}); evaluate on the test split of the "
            f"dataset the model was trained on"
        )
    missing = [name for name in class_names if name not in images_by_class]
    if missing:
        # Not an error: the report shows support 0 for them, but a silent gap would mislead.
        print(f"note: the test split has no images of {len(missing)} model class(es): {_some(missing, 10)}")
    return [(path, index[name]) for name, paths in images_by_class.items() for path in paths]


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def resolve_model_dir(model_path: Path, scratch: Path) -> Path:
    """The folder holding model_meta.json + model.pth, unpacking model.tar.gz into scratch if needed."""
    if model_path.is_file():
        tarball = model_path
    elif (model_path / MODEL_TARBALL).is_file():
        tarball = model_path / MODEL_TARBALL
    elif (model_path / contract.MODEL_META_FILE).is_file():
        return model_path
    elif model_path.is_dir():
        raise EvaluationError(
            f"--model {model_path}: holds neither {MODEL_TARBALL} nor {contract.MODEL_META_FILE}; "
            f"wire the training step's model artifact to this input"
        )
    else:
        raise EvaluationError(
            f"--model {model_path}: no such file or folder; give the training job's {MODEL_TARBALL}"
        )
    unpack_model(tarball, scratch)
    if not (scratch / contract.MODEL_META_FILE).is_file():
        raise EvaluationError(
            f"{tarball}: no {contract.MODEL_META_FILE} at the archive's root; pack the training job's "
            f"model folder (SM_MODEL_DIR) with its files at the root"
        )
    return scratch


def unpack_model(tarball: Path, destination: Path) -> None:
    """Extract a model archive, refusing any member that could land outside `destination`."""
    try:
        with tarfile.open(tarball, "r:*") as archive:
            for member in archive.getmembers():
                _check_member_name(member.name, tarball)
            # The "data" filter also refuses links pointing outside, devices and setuid bits.
            archive.extractall(destination, filter="data")
    except tarfile.FilterError as error:
        raise EvaluationError(
            f"{tarball}: unsafe archive member refused ({one_line(error)}); repack the model"
        ) from None
    except tarfile.ReadError:
        raise EvaluationError(
            f"{tarball}: not a readable tar.gz archive (wrong format or truncated); repack the model folder"
        ) from None
    except (tarfile.TarError, OSError, EOFError) as error:
        raise EvaluationError(
            f"{tarball}: cannot unpack the archive ({one_line(error)}); repack the model"
        ) from None


def _check_member_name(name: str, tarball: Path) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise EvaluationError(
            f"{tarball}: member {name!r} would be written outside the model folder (absolute path or '..'); "
            f"refusing to unpack it: repack the model with relative paths"
        )


def load_model(model_dir: Path, source: Path) -> tuple[nets.Classifier, nets.ModelMeta]:
    try:
        model, meta = nets.load_artifacts(model_dir)
    except nets.WeightsError as error:
        raise EvaluationError(str(error)) from None
    except Exception as error:
        # torch.load raises anything from UnpicklingError to IndexError on a damaged file; whatever it
        # is, the artifact is unusable, and the message carries the detail.
        detail = one_line(error)  # load_state_dict's errors list keys over many lines
        raise EvaluationError(
            f"--model {source}: cannot load the model ({detail}); re-run training"
        ) from None
    return model.to(memory_format=torch.channels_last), meta  # channels_last: ~2x faster on CPU


class EvalImages(Dataset):
    """Decoded, preset-transformed test images; an unreadable file is reported, not raised, so that
    the message survives DataLoader workers intact."""

    def __init__(self, samples: list[tuple[Path, int]], preset: EvalPreset, image_size: int):
        self.samples = samples
        self.preset = preset
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.samples[position]
        try:
            # min_size 1: which images are big enough was decided by the prepare step, not here.
            image = decode_rgb(path, min_size=1).image
        except (ImageRejected, OSError) as error:
            return torch.zeros(3, self.image_size, self.image_size), label, f"{path}: {error}"
        return self.preset(image), label, ""


def predict(
    model: torch.nn.Module, dataset: EvalImages, batch_size: int, workers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, classes) and target indices (N,) for the whole dataset, in dataset order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    all_logits, all_targets = [], []
    with torch.inference_mode():
        for images, targets, problems in loader:
            problem = next((text for text in problems if text), None)
            if problem:
                raise EvaluationError(
                    f"--test: unreadable image {problem}; remove it or re-run the prepare step"
                )
            all_logits.append(model(images.to(memory_format=torch.channels_last)).float())
            all_targets.append(targets)
    return torch.cat(all_logits), torch.cat(all_targets)


# --- metrics ---------------------------------------------------------------------------------


def build_report(logits: torch.Tensor, targets: torch.Tensor, meta: nets.ModelMeta) -> dict:
    num_classes = meta.num_classes
    top_k = min(TOP_K, num_classes)  # with fewer than 5 classes, "top 5" means all of them
    losses = F.cross_entropy(logits, targets, reduction="none").double().numpy()
    top_hits = (logits.topk(top_k, dim=1).indices == targets[:, None]).any(dim=1).numpy()
    y_true = targets.numpy().astype(np.int64)
    y_pred = logits.argmax(dim=1).numpy().astype(np.int64)

    values = scalar_metrics(y_true, y_pred, losses, top_hits, num_classes)
    spread = metric_spread(y_true, y_pred, losses, top_hits, num_classes, names=list(values))
    metrics: dict = {
        name: {"value": value, "standard_deviation": spread[name]} for name, value in values.items()
    }
    metrics["top_5_accuracy"]["k"] = top_k
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    metrics["confusion_matrix"] = {
        actual: {predicted: int(matrix[i, j]) for j, predicted in enumerate(meta.class_names)}
        for i, actual in enumerate(meta.class_names)
    }
    metrics["per_class"] = per_class_report(matrix, meta.class_names)
    return {
        contract.EVALUATION_METRICS_KEY: metrics,
        "test_samples": int(len(y_true)),
        "class_names": list(meta.class_names),
        "model": {"arch": meta.arch, "image_size": meta.image_size},
    }


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[actual, predicted]."""
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall and support; a zero denominator gives 0 (as scikit-learn does)."""
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    return {
        "precision": _safe_divide(true_positives, predicted),
        "recall": _safe_divide(true_positives, support),
        "support": support,
        "predicted": predicted,
    }


def f_beta(precision: np.ndarray, recall: np.ndarray, beta: float) -> np.ndarray:
    b2 = beta * beta
    return _safe_divide((1 + b2) * precision * recall, b2 * precision + recall)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def weighted_scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, prefix: str = "") -> dict:
    """Model Monitor's support-weighted recall, precision and F-scores (and macro F1) of predictions."""
    scores = class_scores(confusion_matrix(y_true, y_pred, num_classes))
    weights = scores["support"] / max(len(y_true), 1)
    precision, recall = scores["precision"], scores["recall"]
    result = {
        f"{prefix}weighted_recall": float(weights @ recall),
        f"{prefix}weighted_precision": float(weights @ precision),
    }
    for beta, name in ((0.5, "f0_5"), (1.0, "f1"), (2.0, "f2")):
        result[f"{prefix}weighted_{name}"] = float(weights @ f_beta(precision, recall, beta))
    return result


def scalar_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, losses: np.ndarray, top_hits: np.ndarray, num_classes: int
) -> dict[str, float]:
    values = {
        "loss": float(losses.mean()),
        "accuracy": float((y_true == y_pred).mean()),
        "top_5_accuracy": float(top_hits.mean()),
        **weighted_scores(y_true, y_pred, num_classes),
    }
    scores = class_scores(confusion_matrix(y_true, y_pred, num_classes))
    # Macro F1 over the classes that occur (in truth or in predictions), as scikit-learn averages.
    present = (scores["support"] > 0) | (scores["predicted"] > 0)
    values["macro_f1"] = float(f_beta(scores["precision"], scores["recall"], 1.0)[present].mean())
    # Model Monitor's baseline: always predicting the most frequent true class.
    constant = np.full_like(y_true, np.bincount(y_true, minlength=num_classes).argmax())
    values["accuracy_best_constant_classifier"] = float((y_true == constant).mean())
    best_constant = weighted_scores(y_true, constant, num_classes)
    values.update({f"{name}_best_constant_classifier": value for name, value in best_constant.items()})
    return values


def metric_spread(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    losses: np.ndarray,
    top_hits: np.ndarray,
    num_classes: int,
    names: list[str],
) -> dict[str, float | str]:
    """Standard deviation of each named metric over 5 random 80% subsets (Model Monitor's method)."""
    if len(y_true) < STD_MIN_SAMPLES:
        return {name: STD_UNAVAILABLE for name in names}
    rng = np.random.default_rng(0)  # seeded: the same model and data give the same report
    size = int(len(y_true) * STD_FRACTION)
    draws = []
    for _ in range(STD_DRAWS):
        pick = rng.choice(len(y_true), size=size, replace=False)
        draws.append(scalar_metrics(y_true[pick], y_pred[pick], losses[pick], top_hits[pick], num_classes))
    return {name: float(np.std([draw[name] for draw in draws])) for name in names}


def per_class_report(matrix: np.ndarray, class_names: list[str]) -> dict[str, dict]:
    scores = class_scores(matrix)
    f1 = f_beta(scores["precision"], scores["recall"], 1.0)
    return {
        name: {
            "precision": float(scores["precision"][i]),
            "recall": float(scores["recall"][i]),
            "f1": float(f1[i]),
            "support": int(scores["support"][i]),
        }
        for i, name in enumerate(class_names)
    }


# --- outputs ---------------------------------------------------------------------------------


def write_report(output_dir: Path, report: dict) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=2, allow_nan=False) + "\n"
        nets.atomic_write(output_dir / contract.EVALUATION_FILE, lambda f: f.write(text.encode()))
    except OSError as error:
        raise EvaluationError(
            f"--output {output_dir}: cannot write {contract.EVALUATION_FILE} ({error})"
        ) from None


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report_failure(message: str) -> None:
    """One line on stderr, and the same line as the processing job's exit message."""
    message = " ".join(message.splitlines())
    print(f"evaluate: error: {message}", file=sys.stderr, flush=True)
    message_file = Path(contract.opt_ml("output", "message"))
    try:
        message_file.parent.mkdir(parents=True, exist_ok=True)
        nets.atomic_write(message_file, lambda f: f.write(message.encode()))
    except OSError:
        pass  # run by hand outside a container: /opt/ml may not be writable; stderr already has it


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
