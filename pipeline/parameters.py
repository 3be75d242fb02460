"""The pipeline parameters, declared once.

`SPECS` is the single declaration: name, type, default (taken from the configuration) and what
the parameter does. `declare` turns it into SageMaker SDK parameter objects for the definition;
`parse_overrides` checks `kennel run --param Name=Value` against it before anything is sent (its
type, then the checks of the configuration setting it stands for), and
README.md ("The pipeline parameters") describes the same table. Importing this module does not import the SDK.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.config import APPROVAL_STATUSES, ARCHITECTURES, FREEZE_MODES, ConfigError, KennelConfig
from pipeline.errors import KennelError

Value = str | int | float


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    kind: str  # SageMaker's parameter type: String, Integer or Float
    setting: str | None  # the configuration field it stands for: its default, and its checks
    help: str
    choices: tuple[str, ...] = ()
    default_of: Callable[[KennelConfig], Value] | None = None  # when not simply the setting's value

    def default(self, config: KennelConfig) -> Value:
        if self.default_of is not None:
            return self.default_of(config)
        return getattr(config, str(self.setting))


SPECS: tuple[ParameterSpec, ...] = (
    ParameterSpec("InputDataUri", "String", "input_data_uri",
                  "S3 prefix of the ImageFolder tree (class folders, optionally under train/valid/test)",
                  default_of=lambda c: c.data_uri),
    ParameterSpec("ProcessingInstanceType", "String", "processing_instance_type",
                  "instance type of the prepare and evaluate jobs"),
    ParameterSpec("ProcessingInstanceCount", "Integer", "processing_instance_count",
                  "instances per prepare/evaluate job"),
    ParameterSpec("TrainingInstanceType", "String", "training_instance_type",
                  "instance type of every tuning trial and of the final training job"),
    ParameterSpec("TrainingInstanceCount", "Integer", "training_instance_count",
                  "instances of the final training job (torchrun across them); tuning trials use one each"),
    ParameterSpec("MaxJobs", "Integer", "max_jobs",
                  "tuning trials in total (the tuning job's MaxNumberOfTrainingJobs)"),
    ParameterSpec("MaxParallelJobs", "Integer", "max_parallel_jobs",
                  "tuning trials running at once (MaxParallelTrainingJobs)"),
    ParameterSpec("Architecture", "String", "architecture",
                  "pretrained backbone to fine-tune", ARCHITECTURES),
    ParameterSpec("Freeze", "String", "freeze",
                  "which layers train: head only, the last block too, or none frozen", FREEZE_MODES),
    ParameterSpec("ImageSize", "Integer", "image_size",
                  "square input size in pixels for training, evaluation and serving"),
    ParameterSpec("Epochs", "Integer", "epochs",
                  "most epochs a tuning trial may use; the final training uses the best trial's epochs"),
    ParameterSpec("Seed", "Integer", "seed",
                  "seed for the data split and for training"),
    ParameterSpec("TestLossThreshold", "Float", "test_loss_threshold",
                  "the model is registered and deployed only if its test loss is at most this"),
    ParameterSpec("ModelApprovalStatus", "String", None,
                  "status of the registered model package; only Approved packages are deployed",
                  APPROVAL_STATUSES, default_of=lambda c: "PendingManualApproval"),
    ParameterSpec("EndpointName", "String", "endpoint_name",
                  "endpoint the deploy step creates or updates"),
    ParameterSpec("EndpointInstanceType", "String", "endpoint_instance_type",
                  "instance type of the endpoint (also listed in the model package)"),
    ParameterSpec("EndpointInstanceCount", "Integer", "endpoint_instance_count",
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


def parse_overrides(pairs: Iterable[str], config: KennelConfig | None = None) -> dict[str, str]:
    """`Name=Value` pairs checked against the declared parameters, as the strings AWS expects.

    With `config` (the target's configuration), the values must also pass the checks of the
    configuration settings they stand for (Epochs=0, an S3 URI without s3://, ... are refused here,
    not minutes into a run); the error names the one override at fault, or all of them when only
    their combination is wrong.
    """
    overrides: dict[str, str] = {}
    given: dict[str, str] = {}  # as typed, for the messages
    for pair in pairs:
        name, separator, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not separator or not name:
            raise KennelError(f"--param {pair!r}: write it as Name=Value, e.g. --param Epochs=3")
        spec = SPECS_BY_NAME.get(name)
        if spec is None:
            known = ", ".join(SPECS_BY_NAME)
            raise KennelError(f"--param {name}: no such pipeline parameter; known: {known}")
        overrides[name], given[name] = _check_value(spec, value), value
    if config is not None:
        _check_against_settings(config, overrides, given)
    return overrides


def _check_against_settings(config: KennelConfig, overrides: dict[str, str], given: dict[str, str]) -> None:
    settings = {
        name: (spec.setting, _typed(spec, value))
        for name, value in overrides.items()
        if (spec := SPECS_BY_NAME[name]).setting is not None
    }
    error = _settings_error(config, dict(settings.values()))
    if error is None:
        return
    for name, (setting, value) in settings.items():
        alone = _settings_error(config, {setting: value})
        if alone is not None:
            raise KennelError(f"--param {name}={given[name]}: {alone}")
    together = " ".join(f"{name}={given[name]}" for name in settings)
    raise KennelError(f"--param {together}: {error}")


def _typed(spec: ParameterSpec, text: str) -> Value:
    return int(text) if spec.kind == "Integer" else float(text) if spec.kind == "Float" else text


def _settings_error(config: KennelConfig, settings: dict[str, Value]) -> ConfigError | None:
    try:
        dataclasses.replace(config, **settings)  # runs the configuration's own checks
    except ConfigError as error:
        return error
    return None


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
