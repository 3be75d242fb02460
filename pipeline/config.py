"""Kennel's configuration: one frozen dataclass, loaded once at the entry point.

Values come from, lowest priority first: the defaults below, `kennel.toml` (or the file named by
$KENNEL_CONFIG), then environment variables. Every field can be set from the environment as
`KENNEL_<FIELD>` (for example KENNEL_BUCKET, KENNEL_TRAINING_INSTANCE_TYPE); the region also
falls back to AWS_REGION / AWS_DEFAULT_REGION, as the AWS tools do.

In the TOML file each field lives in a section ([aws], [pipeline], [instances], [images],
[training], [tuning], [debugger]) under its own name, so a name means the same thing in the
file, in the environment and in the code. A [local] section may repeat any of those names: its
values apply to the local target only (small, CPU-sized settings), below the environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import KennelError

CONFIG_ENV = "KENNEL_CONFIG"
CONFIG_FILE = "kennel.toml"
LOCAL_SECTION = "local"
REPO_ROOT = Path(__file__).resolve().parents[1]

TARGETS = ("local", "aws")
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_lite0")
FREEZE_MODES = ("head", "last-block", "none")
OPTIMIZERS = ("adamw", "sgd")
TUNING_STRATEGIES = ("Bayesian", "Random", "Hyperband")
APPROVAL_STATUSES = ("PendingManualApproval", "Approved", "Rejected")

# Stand-ins used where the local target needs an AWS-shaped value that no account provides:
# the definition stays exactly what SageMaker would accept.
LOCAL_BUCKET = "kennel-local"
LOCAL_ROLE_ARN = "arn:aws:iam::000000000000:role/kennel-local"
# Used only by `kennel definition --target aws` when no bucket/role is configured yet, so the
# definition can still be inspected offline; upsert refuses to run with them.
PLACEHOLDER_BUCKET = "kennel-bucket-not-configured"
PLACEHOLDER_ROLE_ARN = "arn:aws:iam::000000000000:role/kennel-role-not-configured"

_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
_INSTANCE = re.compile(r"^ml\.[a-z0-9]+\.[a-z0-9]+$")
_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker resource names
_DURATION = re.compile(r"^P(?=\d|T\d)(\d+Y)?(\d+M)?(\d+W)?(\d+D)?(T(\d+H)?(\d+M)?(\d+S)?)?$")


class ConfigError(KennelError):
    """The configuration (file or environment) holds a value Kennel cannot use."""


def _f(section: str, default: Any, help: str) -> Any:
    return field(default=default, metadata={"section": section, "help": help})


@dataclass(frozen=True)
class KennelConfig:
    """Everything Kennel needs to build the pipeline and talk to a target."""

    target: str = _f("", "local", "default target of every command: local | aws")
    # [aws]
    region: str = _f("aws", "us-east-1", "AWS region of the pipeline, jobs, registry and endpoint")
    role_arn: str = _f("aws", "", "IAM execution role for the pipeline and its jobs (aws target)")
    bucket: str = _f("aws", "", "S3 bucket for code bundles, data and artifacts (aws target)")
    prefix: str = _f("aws", "kennel", "S3 key prefix under the bucket")
    # [pipeline]
    pipeline_name: str = _f("pipeline", "kennel", "name of the SageMaker pipeline")
    model_package_group: str = _f("pipeline", "kennel-models", "model package group in the registry")
    endpoint_name: str = _f("pipeline", "kennel-endpoint", "endpoint the deploy step creates or updates")
    input_data_uri: str = _f("pipeline", "", "ImageFolder data in S3 (default s3://BUCKET/PREFIX/data)")
    cache_expire_after: str = _f("pipeline", "P30D", "how long a cached step result is reused (ISO 8601)")
    approval_rule: bool = _f("pipeline", True, "on upsert, redeploy when a package is approved")
    # [instances]
    processing_instance_type: str = _f("instances", "ml.m5.xlarge", "prepare and evaluate jobs")
    processing_instance_count: int = _f("instances", 1, "instances per processing job")
    training_instance_type: str = _f("instances", "ml.g4dn.xlarge", "tuning trials and the final training")
    training_instance_count: int = _f("instances", 1, "instances per training job")
    endpoint_instance_type: str = _f("instances", "ml.m5.large", "real-time endpoint instances")
    endpoint_instance_count: int = _f("instances", 1, "real-time endpoint instance count")
    deploy_instance_type: str = _f("instances", "ml.t3.medium", "the small job that runs deploy.py")
    # [images]
    pytorch_version: str = _f("images", "2.6", "PyTorch version of the AWS deep learning containers")
    python_version: str = _f("images", "py312", "Python version of those containers")
    training_image_uri: str = _f("images", "", "override the training image")
    processing_image_uri: str = _f("images", "", "override the processing image")
    inference_image_uri: str = _f("images", "", "override the serving image")
    # [training]
    architecture: str = _f("training", "resnet18", "backbone: " + " | ".join(ARCHITECTURES))
    weights: str = _f("training", "auto", "auto | none | a weights file inside the code bundle")
    freeze: str = _f("training", "head", "what is trained: " + " | ".join(FREEZE_MODES))
    image_size: int = _f("training", 224, "input size in pixels")
    epochs: int = _f("training", 5, "most epochs a tuning trial may use")
    optimizer: str = _f("training", "adamw", "adamw | sgd")
    weight_decay: float = _f("training", 1e-4, "optimizer weight decay")
    label_smoothing: float = _f("training", 0.0, "cross-entropy label smoothing")
    seed: int = _f("training", 0, "seed for splits and training")
    workers: int = _f("training", 4, "data loader workers per training job")
    max_runtime_seconds: int = _f("training", 4 * 3600, "stop a training job after this long")
    test_loss_threshold: float = _f("training", 1.0, "register only when test loss <= this")
    valid_fraction: float = _f("training", 0.1, "share of images held out for validation")
    test_fraction: float = _f("training", 0.1, "share of images held out for the test")
    min_image_size: int = _f("training", 16, "prepare rejects images smaller than this")
    # [tuning]
    max_jobs: int = _f("tuning", 4, "tuning trials in total")
    max_parallel_jobs: int = _f("tuning", 2, "tuning trials at once")
    strategy: str = _f("tuning", "Bayesian", "search strategy: " + " | ".join(TUNING_STRATEGIES))
    lr_min: float = _f("tuning", 1e-5, "lower bound of the learning-rate range (log scale)")
    lr_max: float = _f("tuning", 1e-2, "upper bound of the learning-rate range")
    batch_sizes: tuple[int, ...] = _f("tuning", (32, 64), "batch sizes the tuner picks from")
    min_epochs: int = _f("tuning", 1, "fewest epochs a tuning trial may use")
    # [debugger]
    debug_save_interval: int = _f("debugger", 10, "save tensors every N steps")
    # [local]: (name, value) pairs that for_target("local") applies; see load_config.
    local_overrides: tuple[tuple[str, Any], ...] = field(default=(), metadata={"section": None, "help": ""})

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def data_uri(self) -> str:
        """Where the pipeline reads the ImageFolder tree by default."""
        return self.input_data_uri or f"s3://{self.bucket}/{self.prefix}/data"

    def for_target(self, target: str) -> KennelConfig:
        """This configuration with the stand-ins a target needs when a value is not set.

        The local target never talks to AWS, so an unset bucket or role gets a fixed local
        stand-in. The aws target gets visible placeholders (see PLACEHOLDER_*), which only
        `kennel definition` accepts; `require_aws` rejects them.
        """
        _check_choice("target", target, TARGETS)
        if target == "local":
            bucket, role = LOCAL_BUCKET, LOCAL_ROLE_ARN
            local = dict(self.local_overrides)
        else:
            bucket, role = PLACEHOLDER_BUCKET, PLACEHOLDER_ROLE_ARN
            local = {}
        return dataclasses.replace(
            self, **local, local_overrides=(), target=target,
            bucket=self.bucket or bucket, role_arn=self.role_arn or role,
        )

    def require_aws(self) -> None:
        """Fail with one message naming every missing AWS setting and how to set it."""
        missing = []
        if not self.role_arn or self.role_arn == PLACEHOLDER_ROLE_ARN:
            missing.append("the execution role (role_arn in [aws] of kennel.toml, or KENNEL_ROLE_ARN)")
        if not self.bucket or self.bucket == PLACEHOLDER_BUCKET:
            missing.append("the S3 bucket (bucket in [aws] of kennel.toml, or KENNEL_BUCKET)")
        if missing:
            raise ConfigError("the aws target needs " + " and ".join(missing))


def config_fields() -> list[dataclasses.Field]:
    """The settings a file or the environment can set (not the derived local_overrides)."""
    return [f for f in dataclasses.fields(KennelConfig) if f.metadata.get("section") is not None]


def env_name(field_name: str) -> str:
    return "KENNEL_" + field_name.upper()


def find_config_file(environ: Mapping[str, str]) -> Path | None:
    """$KENNEL_CONFIG if set (it must exist), else ./kennel.toml, else the repository's."""
    named = environ.get(CONFIG_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV}={named}: no such file; point it at a kennel.toml or unset it")
        return path
    for candidate in (Path.cwd() / CONFIG_FILE, REPO_ROOT / CONFIG_FILE):
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> KennelConfig:
    """Defaults, then the TOML file, then the environment; validated as a whole."""
    environ = os.environ if environ is None else environ
    path = path if path is not None else find_config_file(environ)
    values: dict[str, Any] = {}
    local: dict[str, Any] = {}
    if path is not None:
        values, local = _read_toml(path)
    environment = _read_environment(environ)
    values.update(environment)
    # The environment outranks the file, its [local] section included.
    values["local_overrides"] = tuple((k, v) for k, v in local.items() if k not in environment)
    try:
        config = KennelConfig(**values)
        config.for_target("local")  # validate the local settings now, not at the first local command
        return config
    except ConfigError as error:
        source = f" (from {path} and the environment)" if path else " (from the environment)"
        raise ConfigError(f"{error}{source}") from None


def _read_toml(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, [local] settings) from the file, each coerced to its field's type."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it ({error}); fix the file or set {CONFIG_ENV}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error}); fix the syntax") from None
    by_section = {(f.metadata["section"], f.name): f for f in config_fields()}
    by_name = {f.name: f for f in config_fields()}
    values: dict[str, Any] = {}
    local: dict[str, Any] = {}
    for key, value in document.items():
        if key == LOCAL_SECTION and isinstance(value, dict):
            for name, item in value.items():
                if name not in by_name or name == "target":
                    raise ConfigError(f"{path}: unknown setting [local] {name}; [local] takes the names "
                                      f"of the other sections' settings")
                local[name] = item
        elif isinstance(value, dict):
            for name, item in value.items():
                values[_toml_field(path, by_section, key, name).name] = item
        else:
            values[_toml_field(path, by_section, "", key).name] = value
    return _coerce_all(values, f"{path}"), _coerce_all(local, f"{path} [local]")


def _coerce_all(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    return {name: _coerce(name, value, source) for name, value in values.items()}


def _toml_field(path: Path, by_section: dict, section: str, name: str) -> dataclasses.Field:
    found = by_section.get((section, name))
    if found is None:
        where = f"[{section}] {name}" if section else name
        home = next((f"[{s}]" if s else "the top level" for s, n in by_section if n == name), None)
        hint = f"it belongs in {home}" if home else "check the spelling against kennel.toml's comments"
        raise ConfigError(f"{path}: unknown setting {where}; {hint}")
    return found


def _read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region:
        values["region"] = region
    for f in config_fields():
        raw = environ.get(env_name(f.name))
        if raw is not None and raw != "":
            values[f.name] = _coerce(f.name, raw, env_name(f.name), from_text=True)
    return values


def _coerce(name: str, value: Any, source: str, from_text: bool = False) -> Any:
    """Convert a file or environment value to the field's type, or say what was expected."""
    expected = {f.name: f.type for f in config_fields()}[name]
    try:
        if expected == "bool":
            return _to_bool(value, from_text)
        if expected == "int" and not isinstance(value, bool):
            return int(value) if from_text or isinstance(value, int) else _fail()
        if expected == "float" and not isinstance(value, bool):
            return float(value) if from_text or isinstance(value, (int, float)) else _fail()
        if expected == "str" and isinstance(value, str):
            return value.strip()
        if expected == "tuple[int, ...]":
            items = value.split(",") if from_text else value
            if isinstance(items, list) and items and not any(isinstance(i, bool) for i in items):
                return tuple(int(i) for i in items)
    except (TypeError, ValueError):
        pass
    shown = {"tuple[int, ...]": "a list of integers", "str": "a string", "int": "an integer",
             "float": "a number", "bool": "true or false"}[expected]
    raise ConfigError(f"{source}: {name} must be {shown}, got {value!r}")


def _to_bool(value: Any, from_text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_text and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return str(value).lower() in ("1", "true", "yes", "on")
    return _fail()


def _fail() -> Any:
    raise ValueError


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate(config: KennelConfig) -> None:
    _check_choice("target", config.target, TARGETS)
    _check_choice("architecture", config.architecture, ARCHITECTURES)
    _check_choice("freeze", config.freeze, FREEZE_MODES)
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("strategy", config.strategy, TUNING_STRATEGIES)
    _check(bool(_REGION.match(config.region)), f"region {config.region!r} is not an AWS region name")
    _check(not config.role_arn or bool(_ROLE_ARN.match(config.role_arn)),
           f"role_arn {config.role_arn!r} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
    _check(not config.bucket or bool(_BUCKET.match(config.bucket)),
           f"bucket {config.bucket!r} is not an S3 bucket name (no s3:// and no slashes)")
    _check(config.prefix == config.prefix.strip("/"), f"prefix {config.prefix!r} must not start or end with /")
    _check(not config.input_data_uri or config.input_data_uri.startswith("s3://"),
           f"input_data_uri {config.input_data_uri!r} must be an s3:// URI")
    _check(bool(_DURATION.match(config.cache_expire_after)),
           f"cache_expire_after {config.cache_expire_after!r} must be an ISO 8601 duration such as P30D")
    for name in ("pipeline_name", "model_package_group", "endpoint_name"):
        value = getattr(config, name)
        _check(bool(_NAME.match(value)), f"{name} {value!r} must be 1-63 letters, digits and hyphens")
    for name in ("processing_instance_type", "training_instance_type", "endpoint_instance_type",
                 "deploy_instance_type"):
        value = getattr(config, name)
        _check(bool(_INSTANCE.match(value)), f"{name} {value!r} is not a SageMaker instance type (ml.*)")
    _validate_numbers(config)


def _validate_numbers(config: KennelConfig) -> None:
    for name in ("processing_instance_count", "training_instance_count", "endpoint_instance_count",
                 "epochs", "min_epochs", "max_jobs", "max_parallel_jobs", "debug_save_interval",
                 "max_runtime_seconds", "min_image_size"):
        _check(getattr(config, name) >= 1, f"{name} must be at least 1, got {getattr(config, name)}")
    _check(config.workers >= 0, f"workers must be 0 or more, got {config.workers}")
    _check(32 <= config.image_size <= 1024, f"image_size must be between 32 and 1024, got {config.image_size}")
    _check(config.min_epochs <= config.epochs, "min_epochs must not exceed epochs")
    _check(config.max_parallel_jobs <= config.max_jobs, "max_parallel_jobs must not exceed max_jobs")
    _check(0 < config.lr_min < config.lr_max, "learning-rate range needs 0 < lr_min < lr_max")
    _check(bool(config.batch_sizes) and min(config.batch_sizes) >= 1, "batch_sizes needs positive integers")
    _check(config.test_loss_threshold > 0, "test_loss_threshold must be positive")
    _check(config.weight_decay >= 0 and 0 <= config.label_smoothing < 1,
           "weight_decay must be >= 0 and label_smoothing in [0, 1)")
    for name in ("valid_fraction", "test_fraction"):
        # prepare.py needs images in every split: a fraction of 0 would leave one empty.
        _check(0 < getattr(config, name) < 1, f"{name} must be between 0 and 1, got {getattr(config, name)}")
    _check(config.valid_fraction + config.test_fraction < 1, "valid_fraction + test_fraction must be < 1")
