"""Shared by the registry, endpoint, serving and deployment tests: real model packages in a
state folder, and cleanup of every endpoint server a test starts."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from local import endpoints
from local.files import tar_folder
from local.home import store_root
from local.registry import PENDING, LocalRegistry
from local.store import ObjectStore

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TEST = REPO_ROOT / "data" / "sample" / "test"
GROUP = "kennel-models"
BUCKET = "kennel-local"
ENDPOINT = "kennel-endpoint"
EXECUTION_ARN = "arn:aws:sagemaker:local:000000000000:pipeline/kennel/execution/20261122t030501-3fa9c1"


@dataclass(frozen=True)
class Tarballs:
    """model.tar.gz files of one trained model: as trained, and with its class names reversed (the
    same network answering with other labels, so a test can tell which package answered)."""

    original: Path
    reversed: Path
    broken: Path  # valid metadata, weights that cannot be loaded
    class_names: list[str]


@pytest.fixture(scope="session")
def tarballs(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tarballs:
    root = tmp_path_factory.mktemp("tarballs")
    meta = json.loads((trained_model_dir / "model_meta.json").read_text())
    original = root / "original" / "model.tar.gz"
    tar_folder(trained_model_dir, original)
    flipped_dir = root / "flipped-model"
    flipped_dir.mkdir()
    (flipped_dir / "model.pth").write_bytes((trained_model_dir / "model.pth").read_bytes())
    (flipped_dir / "model_meta.json").write_text(
        json.dumps({**meta, "class_names": meta["class_names"][::-1]})
    )
    flipped = root / "reversed" / "model.tar.gz"
    tar_folder(flipped_dir, flipped)
    broken_dir = root / "broken-model"
    broken_dir.mkdir()
    (broken_dir / "model.pth").write_bytes(b"these are not weights")
    (broken_dir / "model_meta.json").write_text(json.dumps(meta))
    broken = root / "broken" / "model.tar.gz"
    tar_folder(broken_dir, broken)
    return Tarballs(original, flipped, broken, list(meta["class_names"]))


def evaluation(loss: float = 0.42, accuracy: float = 0.87) -> dict[str, Any]:
    return {"multiclass_classification_metrics": {"loss": {"value": loss}, "accuracy": {"value": accuracy}}}


def register_request(
    model_data_url: str, evaluation_uri: str, status: str | None = PENDING, group: str = GROUP
) -> dict[str, Any]:
    """A CreateModelPackage request as the pipeline's Register step has it once resolved."""
    request: dict[str, Any] = {
        "ModelPackageGroupName": group,
        "ModelMetrics": {
            "ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": evaluation_uri}},
            "Bias": {},
            "Explainability": {},
        },
        "Domain": "COMPUTER_VISION",
        "Task": "IMAGE_CLASSIFICATION",
        "InferenceSpecification": {
            "Containers": [
                {
                    "Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-cpu-py312",
                    "Environment": {
                        "SAGEMAKER_PROGRAM": "inference.py",
                        "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                    },
                    "ModelDataUrl": model_data_url,
                }
            ],
            "SupportedContentTypes": [
                "image/jpeg",
                "image/png",
                "application/x-image",
                "application/json",
                "application/x-npy",
            ],
            "SupportedResponseMIMETypes": ["application/json"],
            "SupportedRealtimeInferenceInstanceTypes": ["ml.m5.large"],
            "SupportedTransformInstanceTypes": ["ml.m5.large"],
        },
        "SkipModelValidation": "None",
    }
    if status is not None:
        request["ModelApprovalStatus"] = status
    return request


def register(
    home: Path,
    tarball: Path,
    status: str = PENDING,
    group: str = GROUP,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Put the model and its evaluation into the local store, register them, return the package."""
    store = ObjectStore(store_root(home))
    prefix = f"s3://{BUCKET}/kennel/{uuid.uuid4().hex[:8]}"
    store.put_file(tarball, f"{prefix}/model/model.tar.gz")
    store.put_bytes(f"{prefix}/evaluation/evaluation.json", json.dumps(metrics or evaluation()).encode())
    request = register_request(
        f"{prefix}/model/model.tar.gz", f"{prefix}/evaluation/evaluation.json", status, group
    )
    registry = LocalRegistry(home)
    arn = registry.create_model_package(request, execution_arn=EXECUTION_ARN)["ModelPackageArn"]
    return registry.describe_model_package(arn)


def server_processes(home: Path) -> list[psutil.Process]:
    """Endpoint server processes serving from this state folder (found by their command line)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if "local.serving" in cmdline and str(home) in cmdline:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except psutil.Error:
                pass
    return found


def stop_all_servers(home: Path) -> None:
    for endpoint in endpoints.list_endpoints(home):
        try:
            endpoints.stop(home, endpoint.name, timeout=10)
        except endpoints.EndpointError:
            pass
    for process in server_processes(home):  # anything a failed test left behind
        process.kill()
        process.wait(10)


@pytest.fixture
def kennel_home(tmp_path: Path) -> Iterator[Path]:
    """A fresh state folder; every endpoint server started in it is stopped at the end."""
    home = tmp_path / "kennel-home"
    home.mkdir()
    yield home
    stop_all_servers(home)


def sample_png(class_name: str, index: int = 0) -> bytes:
    return sorted((SAMPLE_TEST / class_name).glob("*.png"))[index].read_bytes()


def sample_class_names() -> list[str]:
    return sorted(path.name for path in SAMPLE_TEST.iterdir() if path.is_dir())


def not_a_tarball(path: Path) -> Path:
    path.write_bytes(b"plain bytes, not gzip")
    return path


def tarball_without_weights(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        data = b"{}"
        info = tarfile.TarInfo("model_meta.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return path


def top_label(body: bytes) -> str:
    return json.loads(body)["predictions"][0]["label"]
