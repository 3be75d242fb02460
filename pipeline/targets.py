"""The targets a pipeline runs on, behind one interface the CLI talks to.

A target is an object with the methods of `Target`; `get_target` finds it by name. The aws target
lives in `pipeline.aws`. The local target is expected in `pipeline.local_target` (an adapter over
`local/`, which must not import `pipeline/`): a module exposing `create_target(config)` that
returns an object with these methods. Until that module exists, every command but `definition`
answers on the local target that the local runner is not installed yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import KennelConfig
from pipeline.errors import TargetUnavailable

TARGET_MODULES = {"aws": "pipeline.aws", "local": "pipeline.local_target"}
TERMINAL_STATUSES = ("Succeeded", "Failed", "Stopped")
# `kennel run --data FOLDER` copies the folder to s3://<bucket>/<prefix>/uploads/<name>-<hash>,
# outside the default data prefix, so an upload never mixes with the data a plain run reads.
UPLOADS_FOLDER = "uploads"


@dataclass(frozen=True)
class StepStatus:
    name: str
    status: str
    started: str = ""
    ended: str = ""
    failure_reason: str = ""
    log_path: str = ""  # local target: the step's job log
    cached: bool = False  # the step reused a cached result
    details: list[str] = field(default_factory=list)  # rule statuses, reports, plots, decisions


@dataclass(frozen=True)
class ExecutionStatus:
    execution_arn: str
    pipeline_name: str
    status: str
    started: str = ""
    failure_reason: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    steps: list[StepStatus] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. why the steps could not be listed
    steps_shown: bool = False  # the target already printed each step live (local --wait)

    @property
    def execution_id(self) -> str:
        return self.execution_arn.rsplit("/", 1)[-1]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "execution_id": self.execution_id}


@dataclass(frozen=True)
class ModelPackage:
    version: int
    approval_status: str
    arn: str
    created: str = ""
    approval_description: str = ""
    message: str = ""  # what the decision did, e.g. the endpoint it deployed or rolled back
    metrics: dict[str, float] = field(default_factory=dict)  # test_loss, test_accuracy (evaluation.json)
    metrics_uri: str = ""  # the evaluation.json named by the package's ModelMetrics
    execution_arn: str = ""  # the pipeline execution that registered it (MetadataProperties.GeneratedBy)
    # Every status change, oldest first: {from_status, to_status, reason, time}. Local target only:
    # SageMaker's API keeps the current status and LastModifiedTime, not a history.
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_package(described: Mapping[str, Any], evaluation: Mapping[str, Any] | None = None,
                  history: list[dict[str, Any]] | None = None) -> ModelPackage:
    """A ModelPackage from a DescribeModelPackage answer (both targets' registries give one) or a
    ListModelPackages summary (which has no metrics nor execution), and the evaluation.json its
    metrics name when that was read."""
    arn = described["ModelPackageArn"]
    quality = ((described.get("ModelMetrics") or {}).get("ModelQuality") or {}).get("Statistics") or {}
    return ModelPackage(
        version=int(described.get("ModelPackageVersion") or arn.rsplit("/", 1)[-1]),
        approval_status=described.get("ModelApprovalStatus", ""),
        arn=arn,
        created=iso_time(described.get("CreationTime")),
        approval_description=described.get("ApprovalDescription") or "",
        metrics=evaluation_metrics(evaluation),
        metrics_uri=quality.get("S3Uri") or "",
        execution_arn=(described.get("MetadataProperties") or {}).get("GeneratedBy") or "",
        history=list(history or []),
    )


def evaluation_metrics(evaluation: Mapping[str, Any] | None) -> dict[str, float]:
    """test_loss and test_accuracy from an evaluation.json in SageMaker's model-quality layout."""
    from entrypoints.contract import EVALUATION_METRICS_KEY

    metrics = (evaluation or {}).get(EVALUATION_METRICS_KEY) or {}
    found = {}
    for name in ("loss", "accuracy"):
        value = (metrics.get(name) or {}).get("value")
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[f"test_{name}"] = float(value)
    return found


def iso_time(value: Any) -> str:
    return value.isoformat(timespec="seconds") if isinstance(value, datetime) else str(value or "")


@dataclass(frozen=True)
class Endpoint:
    name: str
    status: str  # InService, Creating, Updating, Failed, OutOfService, ...
    url: str = ""
    model_package_arn: str = ""
    model_package_version: int | None = None
    detail: str = ""  # failure reason, log path, instance type

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class UpsertResult:
    pipeline_name: str
    pipeline_arn: str
    created: bool  # False: an existing pipeline was updated
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Target(Protocol):
    """What every target does. Methods raise KennelError with a one-line message on user errors."""

    name: str

    def upsert(self) -> UpsertResult: ...

    def stage_data(self, data: str) -> str:
        """Make a dataset reachable by the pipeline; return the value for InputDataUri."""
        ...

    def start(self, parameters: Mapping[str, str], wait: bool) -> ExecutionStatus: ...

    def resume(self, execution_id: str) -> ExecutionStatus:
        """Continue a failed or stopped execution from the steps that did not succeed."""
        ...

    def executions(self) -> list[ExecutionStatus]:
        """The pipeline's executions, newest first (without their steps)."""
        ...

    def status(self, execution: str | None) -> ExecutionStatus: ...

    def models(self) -> list[ModelPackage]: ...

    def approve(self, version: int | None, reason: str | None) -> ModelPackage: ...

    def reject(self, version: int | None, reason: str | None) -> ModelPackage: ...

    def endpoints(self) -> list[Endpoint]: ...

    def stop_endpoint(self, name: str) -> Endpoint: ...

    def predict(self, body: bytes, content_type: str, endpoint: str) -> dict[str, Any]:
        """The endpoint's JSON answer to one request."""
        ...


def dataset_files(folder: Path) -> list[Path]:
    """The files of a local ImageFolder tree that make up the dataset, sorted (hidden files such
    as .DS_Store, and caches, are not part of it)."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and not _hidden(path.relative_to(folder)))


def dataset_name(folder: Path, files: list[Path]) -> str:
    """`<folder name>-<content hash>`: the same tree always gets the same name and a changed tree a
    new one, so a cached step reruns exactly when the data changed and old data is never overwritten."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in folder.resolve().name).strip("-")
    return f"{cleaned or 'data'}-{digest.hexdigest()[:12]}"


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts)


def get_target(name: str, config: KennelConfig) -> Target:
    """The target called `name`, configured with `config` (its stand-ins filled for that target)."""
    module_name = TARGET_MODULES.get(name)
    if module_name is None:
        raise TargetUnavailable(f"unknown target {name!r}; choose one of {', '.join(TARGET_MODULES)}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise TargetUnavailable(
            f"the {name} runner is not installed yet: only `kennel definition --target {name}` works "
            f"for now; use --target aws for the other commands"
        ) from None
    return module.create_target(config.for_target(name))
