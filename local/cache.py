"""Step caching (CacheConfig): reuse a step's earlier success when nothing that matters changed.

The key follows SageMaker's documented cache-key attributes per step type (for Processing:
AppSpecification, Environment, ProcessingInputs; for Training: AlgorithmSpecification,
CheckpointConfig, DebugHookConfig, DebugRuleConfigurations, Environment, HyperParameters,
InputDataConfig; for Tuning: HyperParameterTuningJobConfig and the training job definition's
AlgorithmSpecification, HyperParameterRanges, InputDataConfig, StaticHyperParameters,
TuningObjective), resolved, with one local refinement: the S3 URI of each code bundle is
replaced by a hash of its content in the store. The SDK uploads code under time-stamped keys,
so the same code rebuilt later still hits, and a changed script always misses. (The build
machine's staging path that sm_drivers/sourcecode.json records is left out of that hash.)

Entries live in `<home>/cache/<pipeline>/<step>/<key>.json`; a hit is only taken within the
step's ExpireAfter (ISO 8601 duration; no ExpireAfter means no expiry).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from local.files import read_json, sha256_file, write_json_atomic
from local.home import cache_root
from local.state import now
from local.store import ObjectStore, S3Uri, StoreError

KEY_FIELDS = {
    "Processing": ("AppSpecification", "Environment", "ProcessingInputs"),
    "Training": (
        "AlgorithmSpecification",
        "CheckpointConfig",
        "DebugHookConfig",
        "DebugRuleConfigurations",
        "Environment",
        "HyperParameters",
        "InputDataConfig",
    ),
    "Tuning": ("HyperParameterTuningJobConfig", "TrainingJobDefinition", "TrainingJobDefinitions"),
}
TUNING_DEFINITION_FIELDS = (
    "AlgorithmSpecification",
    "HyperParameterRanges",
    "InputDataConfig",
    "StaticHyperParameters",
    "TuningObjective",
)
CODE_INPUT_NAMES = ("code", "entrypoint")
CODE_CHANNELS = ("code", "sm_drivers")
CODE_HYPERPARAMETER = "sagemaker_submit_directory"
SOURCE_CODE_FILE = "sourcecode.json"  # the sm_drivers channel's description of the code channel
_CODE_LOCAL_PATHS = ("/opt/ml/processing/input/code", "/opt/ml/processing/input/entrypoint")
_DERIVED_FILES = re.compile(r"(^|/)__pycache__/|\.pyc$")


class CacheConfigError(ValueError):
    """A CacheConfig the runner cannot honour (e.g. an ExpireAfter that is not a duration)."""


_DURATION = re.compile(
    r"^P?(?:(?P<years>\d+)Y)?(?:(?P<months>\d+)M)?(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?$",
    re.IGNORECASE,
)


def parse_duration(text: str) -> timedelta:
    """An ISO 8601 duration (P30D, PT1H, P1Y2M, also SageMaker's shorthand 30d, T16m)."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not match or not any(match.groupdict().values()) or text.strip().upper().endswith("T"):
        raise CacheConfigError(f"ExpireAfter {text!r} is not an ISO 8601 duration (e.g. P30D, PT12H)")
    parts = {name: int(value) for name, value in match.groupdict().items() if value}
    days = (
        parts.get("years", 0) * 365
        + parts.get("months", 0) * 30
        + parts.get("weeks", 0) * 7
        + parts.get("days", 0)
    )
    return timedelta(
        days=days,
        hours=parts.get("hours", 0),
        minutes=parts.get("minutes", 0),
        seconds=parts.get("seconds", 0),
    )


def cache_settings(step: Mapping[str, Any]) -> tuple[bool, timedelta | None]:
    """(enabled, expiry) from a step's CacheConfig; raises CacheConfigError when malformed."""
    config = step.get("CacheConfig") or {}
    if not config.get("Enabled"):
        return False, None
    expire = config.get("ExpireAfter")
    return True, (parse_duration(expire) if expire else None)


def cache_key(
    pipeline_name: str, step: Mapping[str, Any], arguments: Mapping[str, Any], store: ObjectStore
) -> str:
    step_type = str(step.get("Type"))
    fields = {name: arguments.get(name) for name in KEY_FIELDS.get(step_type, tuple(arguments))}
    if step_type == "Processing":
        fields["ProcessingInputs"] = [
            _processing_input(item, store) for item in fields.get("ProcessingInputs") or []
        ]
    elif step_type == "Training":
        fields["InputDataConfig"] = [_channel(item, store) for item in fields.get("InputDataConfig") or []]
        fields["HyperParameters"] = _hyperparameters(fields.get("HyperParameters"), store)
    elif step_type == "Tuning":
        fields["TrainingJobDefinition"] = _tuning_definition(fields.get("TrainingJobDefinition"), store)
    document = {"Pipeline": pipeline_name, "Step": step.get("Name"), "Type": step_type, "Fields": fields}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _code_digest(uri: Any, store: ObjectStore) -> str:
    """A hash of the code under `uri`: file names and contents, archives by their members.

    The SDK re-creates its tarballs at every build; gzip headers and member times then differ
    while the code does not, so archives are hashed by member name and content only.
    """
    try:
        prefix = S3Uri.parse(str(uri))
        digest = hashlib.sha256()
        for stored in store.list_prefix(prefix):
            relative = stored.uri.key[len(prefix.key) :]
            if _DERIVED_FILES.search(relative):
                continue
            digest.update(relative.encode("utf-8") + b"\0" + _file_digest(stored.path))
        return "content:" + digest.hexdigest()
    except (StoreError, OSError):
        return f"unreadable:{uri}"


def _file_digest(path: Path) -> bytes:
    if path.name == SOURCE_CODE_FILE:
        try:
            settings = json.loads(path.read_bytes())
        except ValueError:
            settings = None
        if isinstance(settings, dict):
            # The ModelTrainer writes the folder it staged the code from on the machine that built
            # the definition (a fresh temporary folder at each upsert); the job reads only the
            # entry script from this file, so that path is not code and must not change the key.
            settings.pop("source_dir", None)
            return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).digest()
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            digest = hashlib.sha256()
            with tarfile.open(path, "r:*") as archive:
                members = sorted(
                    (member for member in archive.getmembers() if member.isfile()), key=lambda m: m.name
                )
                for member in members:
                    if _DERIVED_FILES.search(member.name):
                        continue
                    data = archive.extractfile(member).read()  # type: ignore[union-attr]
                    digest.update(member.name.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())
            return digest.digest()
        except (tarfile.TarError, EOFError):
            pass  # not a readable archive after all: hash its bytes
    return bytes.fromhex(sha256_file(path))


def _processing_input(item: Mapping[str, Any], store: ObjectStore) -> Any:
    s3_input = item.get("S3Input") or {}
    local_path = str(s3_input.get("LocalPath", "")).rstrip("/")
    if item.get("InputName") in CODE_INPUT_NAMES or local_path in _CODE_LOCAL_PATHS:
        return dict(item, S3Input=dict(s3_input, S3Uri=_code_digest(s3_input.get("S3Uri"), store)))
    return item


def _channel(item: Mapping[str, Any], store: ObjectStore) -> Any:
    if item.get("ChannelName") not in CODE_CHANNELS:
        return item
    source = (item.get("DataSource") or {}).get("S3DataSource") or {}
    return dict(
        item, DataSource={"S3DataSource": dict(source, S3Uri=_code_digest(source.get("S3Uri"), store))}
    )


def _hyperparameters(values: Any, store: ObjectStore) -> Any:
    if not isinstance(values, Mapping) or CODE_HYPERPARAMETER not in values:
        return values
    uri = str(values[CODE_HYPERPARAMETER]).strip('"')
    return dict(values, **{CODE_HYPERPARAMETER: _code_digest(uri, store)})


def _tuning_definition(definition: Any, store: ObjectStore) -> Any:
    if not isinstance(definition, Mapping):
        return definition
    kept = {name: definition.get(name) for name in TUNING_DEFINITION_FIELDS}
    kept["InputDataConfig"] = [_channel(item, store) for item in kept.get("InputDataConfig") or []]
    kept["StaticHyperParameters"] = _hyperparameters(kept.get("StaticHyperParameters"), store)
    return kept


class StepCache:
    """The cache entries under one home folder."""

    def __init__(self, home: Path) -> None:
        self.root = cache_root(Path(home))

    def _path(self, pipeline_name: str, step_name: str, key: str) -> Path:
        return self.root / _safe(pipeline_name) / _safe(step_name) / f"{key}.json"

    def lookup(
        self, pipeline_name: str, step_name: str, key: str, expire_after: timedelta | None
    ) -> dict | None:
        path = self._path(pipeline_name, step_name, key)
        try:
            entry = read_json(path)
        except (FileNotFoundError, ValueError):
            return None
        created = datetime.fromisoformat(entry["CreatedTime"])
        if expire_after is not None and datetime.now(created.tzinfo) - created > expire_after:
            return None
        return entry

    def store(
        self,
        pipeline_name: str,
        step_name: str,
        key: str,
        execution_id: str,
        execution_arn: str,
        properties: dict,
        metadata: dict | None = None,
    ) -> None:
        """Record a success; `metadata` (the step record's plots, profiler report, ...) is kept so
        that a step served from this entry still shows what the original job produced."""
        write_json_atomic(
            self._path(pipeline_name, step_name, key),
            {
                "Key": key,
                "StepName": step_name,
                "PipelineExecutionId": execution_id,
                "SourcePipelineExecutionArn": execution_arn,
                "CreatedTime": now(),
                "Properties": properties,
                "Metadata": metadata or {},
            },
        )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "_"
