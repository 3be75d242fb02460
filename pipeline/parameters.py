"""The pipeline parameters, declared once.

`SPECS` is the single declaration: name, type, default (taken from the configuration) and what
the parameter does. `declare` turns it into SageMaker SDK parameter objects for the definition;
`parse_overrides` checks `kennel run --param Name=Value` against it before anything is sent, and
README.md ("The pipeline parameters") describes the same table. Importing this module does not import the SDK.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.config import APPROVAL_STATUSES, ARCHITECTURES, FREEZE_MODES, KennelConfig
from pipeline.errors import KennelError

Value = str | int | float


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    kind: str  # SageMaker's parameter type: String, Integer or Float
    default: Callable[[KennelConfig], Value]
    help: str
    choices: tuple[str, ...] = ()


SPECS: tuple[ParameterSpec, ...] = (
    ParameterSpec("InputDataUri", "String", lambda c: c.data_uri,
                  "S3 prefix of the ImageFolder tree (class folders, optionally under train/valid/test)"),
    ParameterSpec("ProcessingInstanceType", "String", lambda c: c.processing_instance_type,
                  "instance type of the prepare and evaluate jobs"),
    ParameterSpec("ProcessingInstanceCount", "Integer", lambda c: c.processing_instance_count,
                  "instances per prepare/evaluate job"),
    ParameterSpec("TrainingInstanceType", "String", lambda c: c.training_instance_type,
                  "instance type of every tuning trial and of the final training job"),
    ParameterSpec("TrainingInstanceCount", "Integer", lambda c: c.training_instance_count,
                  "instances of the final training job (torchrun across them); tuning trials use one each"),
    ParameterSpec("MaxJobs", "Integer", lambda c: c.max_jobs,
                  "tuning trials in total (the tuning job's MaxNumberOfTrainingJobs)"),
    ParameterSpec("MaxParallelJobs", "Integer", lambda c: c.max_parallel_jobs,
                  "tuning trials running at once (MaxParallelTrainingJobs)"),
    ParameterSpec("Architecture", "String", lambda c: c.architecture,
                  "pretrained backbone to fine-tune", ARCHITECTURES),
    ParameterSpec("Freeze", "String", lambda c: c.freeze,
                  "which layers train: head only, the last block too, or none frozen", FREEZE_MODES),
    ParameterSpec("ImageSize", "Integer", lambda c: c.image_size,
                  "square input size in pixels for training, evaluation and serving"),
    ParameterSpec("Epochs", "Integer", lambda c: c.epochs,
                  "most epochs a tuning trial may use; the final training uses the best trial's epochs"),
    ParameterSpec("Seed", "Integer", lambda c: c.seed,
                  "seed for the data split and for training"),
    ParameterSpec("TestLossThreshold", "Float", lambda c: c.test_loss_threshold,
                  "the model is registered and deployed only if its test loss is at most this"),
    ParameterSpec("ModelApprovalStatus", "String", lambda c: "PendingManualApproval",
                  "status of the registered model package; only Approved packages are deployed",
                  APPROVAL_STATUSES),
    ParameterSpec("EndpointName", "String", lambda c: c.endpoint_name,
                  "endpoint the deploy step creates or updates"),
    ParameterSpec("EndpointInstanceType", "String", lambda c: c.endpoint_instance_type,
                  "instance type of the endpoint (also listed in the model package)"),
    ParameterSpec("EndpointInstanceCount", "Integer", lambda c: c.endpoint_instance_count,
                  "endpoint instances"),
)

SPECS_BY_NAME = {spec.name: spec for spec in SPECS}


class Parameters:
    """The SDK parameter objects of one definition, looked up by name."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self._objects = objects

    def __getitem__(self, name: str) -> Any:
        return self._objects[name]

    def all(self) -> list[Any]:
        return list(self._objects.values())


def declare(config: KennelConfig) -> Parameters:
    """SDK parameter objects for every spec, with defaults from the configuration."""
    from sagemaker.core.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString

    objects: dict[str, Any] = {}
    for spec in SPECS:
        default = spec.default(config)
        if spec.kind == "String":
            objects[spec.name] = ParameterString(
                name=spec.name, default_value=str(default), enum_values=list(spec.choices) or None
            )
        elif spec.kind == "Integer":
            objects[spec.name] = ParameterInteger(name=spec.name, default_value=int(default))
        else:
            objects[spec.name] = ParameterFloat(name=spec.name, default_value=float(default))
    return Parameters(objects)


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """`Name=Value` pairs checked against the declared parameters, as the strings AWS expects."""
    overrides: dict[str, str] = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not separator or not name:
            raise KennelError(f"--param {pair!r}: write it as Name=Value, e.g. --param Epochs=3")
        spec = SPECS_BY_NAME.get(name)
        if spec is None:
            known = ", ".join(SPECS_BY_NAME)
            raise KennelError(f"--param {name}: no such pipeline parameter; known: {known}")
        overrides[name] = _check_value(spec, value)
    return overrides


def _check_value(spec: ParameterSpec, value: str) -> str:
    try:
        if spec.kind == "Integer":
            return str(int(value))
        if spec.kind == "Float":
            return repr(float(value))
    except ValueError:
        kind = "an integer" if spec.kind == "Integer" else "a number"
        raise KennelError(f"--param {spec.name}={value}: {spec.name} must be {kind}") from None
    if spec.choices and value not in spec.choices:
        raise KennelError(f"--param {spec.name}={value}: choose one of {', '.join(spec.choices)}")
    if not value:
        raise KennelError(f"--param {spec.name}: the value is empty")
    return value
