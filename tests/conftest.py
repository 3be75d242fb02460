"""Shared test set-up.

The scripts in entrypoints/ import their siblings flat (`import contract`), as they do inside a
SageMaker container, so the tests put that folder on sys.path to import them the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = REPO_ROOT / "entrypoints"
if str(ENTRYPOINTS) not in sys.path:
    sys.path.insert(0, str(ENTRYPOINTS))


# --- a small trained model (used by the evaluate and inference tests) --------------------------

SAMPLE_DIR = REPO_ROOT / "data" / "sample"
TINY_MODEL_IMAGES_PER_CLASS = 30


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real efficientnet_lite0 model folder (model.pth, model_meta.json), briefly fitted on the sample.

    ImageNet backbone from the offline package, 32 px inputs, and a head trained on backbone features
    computed once, so it takes seconds yet predicts far above chance. class_names are stored in a
    non-alphabetical order, so code that maps classes by position instead of by name gets caught.
    """
    import torch
    from torch.nn import functional as F

    import nets
    from images import decode_rgb
    from presets import EvalPreset

    train_dir = SAMPLE_DIR / "train"
    alphabetical = sorted(path.name for path in train_dir.iterdir() if path.is_dir())
    class_names = alphabetical[1::2] + alphabetical[0::2]
    mean, std = nets.normalization("efficientnet_lite0")
    meta = nets.ModelMeta("efficientnet_lite0", class_names, image_size=32, mean=mean, std=std)
    torch.manual_seed(0)
    model, _ = nets.build_model("efficientnet_lite0", len(class_names), weights="auto")
    preset = EvalPreset(meta.image_size, mean, std)
    images, labels = [], []
    for index, name in enumerate(class_names):
        for path in sorted((train_dir / name).glob("*.png"))[:TINY_MODEL_IMAGES_PER_CLASS]:
            images.append(preset(decode_rgb(path).image))
            labels.append(index)
    model.eval()
    with torch.no_grad():
        features = model.backbone(torch.stack(images))
    targets = torch.tensor(labels)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=0.01)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model.head(features), targets).backward()
        optimizer.step()
    model_dir = tmp_path_factory.mktemp("trained-model")
    nets.save_artifacts(model_dir, model.eval(), meta)
    return model_dir


# --- training jobs (used by the train and debugger tests) ---------------------------------------

MINI_SAMPLE_SIZES = {"train": 12, "valid": 4}  # images per class


@pytest.fixture(scope="session")
def mini_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and valid/ ImageFolder trees with a few sample images per class, for runs of seconds."""
    import shutil

    root = tmp_path_factory.mktemp("mini-sample")
    for split, count in MINI_SAMPLE_SIZES.items():
        for class_dir in sorted(p for p in (SAMPLE_DIR / split).iterdir() if p.is_dir()):
            (root / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.glob("*.png"))[:count]:
                shutil.copy(image, root / split / class_dir.name / image.name)
    return root


class TrainJob:
    """entrypoints/train.py as a SageMaker training job would run it, with /opt/ml re-rooted at `root`.

    Channels come from SM_CHANNEL_*, the model and output dirs from SM_* variables, everything else
    (checkpoints, failure file, hook config, tensors) from the re-rooted defaults.
    """

    def __init__(self, root: Path, train: Path, valid: Path):
        self.root, self.train, self.valid = root, train, valid
        self.model_dir = root / "model"
        self.output_data_dir = root / "output" / "data"
        self.checkpoint = root / "checkpoints" / "checkpoint.pth"
        self.failure = root / "output" / "failure"
        self.hook_config = root / "input" / "config" / "debughookconfig.json"

    def env(self) -> dict[str, str]:
        import os

        inherited = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("SM_", "SAGEMAKER_", "KENNEL_", "SMDEBUG_"))
        }
        return {
            **inherited,
            "SAGEMAKER_BASE_DIR": str(self.root),
            "SM_CHANNEL_TRAIN": str(self.train),
            "SM_CHANNEL_VALID": str(self.valid),
            "SM_MODEL_DIR": str(self.model_dir),
            "SM_OUTPUT_DATA_DIR": str(self.output_data_dir),
        }

    def run(self, *args: str, launcher: tuple[str, ...] = (), extra_env: dict[str, str] | None = None):
        import subprocess

        command = [sys.executable, *launcher, str(ENTRYPOINTS / "train.py"), *args]
        return subprocess.run(
            command, env={**self.env(), **(extra_env or {})}, capture_output=True, text=True, timeout=300
        )


@pytest.fixture
def train_job(tmp_path: Path, mini_sample: Path) -> TrainJob:
    """A fresh job folder training on the mini sample."""
    return TrainJob(tmp_path / "job", mini_sample / "train", mini_sample / "valid")


# --- fixtures shared across test files: pipeline builds and a moto server (kennel_support), model
# packages and endpoint servers (serving_support), a hooked training run (debugger_support) --------
from debugger_support import healthy_debug_run  # noqa: E402, F401
from kennel_support import aws_env, moto_server, offline_builds  # noqa: E402, F401
from serving_support import kennel_home, tarballs  # noqa: E402, F401
