"""The local model registry: SageMaker's Model Registry kept in `<home>/registry.db` (SQLite).

SageMaker's model, and its words: a model package *group* holds numbered *packages* (versions
1, 2, ...). A package records its model data (model.tar.gz), inference specification, model metrics
(the evaluation.json URI and, when the local store holds it, its content), creation time, the
pipeline execution that produced it, and an approval status (PendingManualApproval, Approved,
Rejected) with a description. Every status change is kept in a history table (from, to, reason,
time), registration included (from None).

The API follows boto3's: `create_model_package(request)` takes a CreateModelPackage request (the
register step's Arguments once the runner resolved them), `describe_model_package` and
`list_model_packages` answer with DescribeModelPackage's keys (times as datetimes, as boto3 gives
them) plus two of Kennel's: `ModelDataUrl` (the first container's) and `Evaluation` (the
evaluation.json content, or None); `update_model_package` changes the approval status.

Every write runs in one `BEGIN IMMEDIATE` transaction, so two processes registering or approving
at once are serialized by SQLite: versions are never reused and no change is lost or half-done.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from local.home import store_root
from local.state import ACCOUNT, REGION
from local.store import ObjectStore, StoreError

PENDING, APPROVED, REJECTED = "PendingManualApproval", "Approved", "Rejected"
APPROVAL_STATUSES = (PENDING, APPROVED, REJECTED)
REGISTRY_FILE = "registry.db"
# How long a writer waits for another process's transaction before giving up.
LOCK_TIMEOUT_S = 30.0
# SageMaker's pattern for entity names (model package groups).
_GROUP_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
# Pipeline expressions the runner must have resolved before registering.
_EXPRESSION_KEYS = {"Get", "Std:Join", "Std:JsonGet"}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS model_package_groups (
    name TEXT PRIMARY KEY,
    arn TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    creation_time TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS model_packages (
    arn TEXT PRIMARY KEY,
    group_name TEXT NOT NULL REFERENCES model_package_groups(name),
    version INTEGER NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    model_data_url TEXT NOT NULL,
    inference_specification TEXT NOT NULL,
    model_metrics TEXT,
    evaluation TEXT,
    approval_status TEXT NOT NULL CHECK (approval_status IN {APPROVAL_STATUSES!r}),
    approval_description TEXT,
    execution_arn TEXT,
    request TEXT NOT NULL,
    creation_time TEXT NOT NULL,
    last_modified_time TEXT NOT NULL,
    UNIQUE (group_name, version)
);
CREATE TABLE IF NOT EXISTS status_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    package_arn TEXT NOT NULL REFERENCES model_packages(arn),
    from_status TEXT,
    to_status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    time TEXT NOT NULL
);
"""


class RegistryError(Exception):
    """A request the registry refuses; the message names the input and the fix."""


class RegistryBusy(RegistryError):
    """Another process's transaction kept the registry locked: trying again may succeed."""


class PackageNotFound(RegistryError):
    """No package (or group) by that name."""


@dataclass(frozen=True)
class StatusChange:
    """One row of a package's history; `from_status` is None for the registration itself."""

    from_status: str | None
    to_status: str
    reason: str
    time: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "FromStatus": self.from_status,
            "ToStatus": self.to_status,
            "Reason": self.reason,
            "Time": self.time.isoformat(timespec="milliseconds"),
        }


def registry_path(home: Path) -> Path:
    return Path(home) / REGISTRY_FILE


def package_arn(group: str, version: int, region: str = REGION) -> str:
    # SageMaker lower-cases the group in ARNs.
    return f"arn:aws:sagemaker:{region}:{ACCOUNT}:model-package/{group.lower()}/{version}"


def group_arn(group: str, region: str = REGION) -> str:
    return f"arn:aws:sagemaker:{region}:{ACCOUNT}:model-package-group/{group.lower()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


class LocalRegistry:
    """The registry under one state folder. Cheap to create: each call opens its own connection,
    so instances may be used from several threads and processes at once."""

    def __init__(self, home: Path | str, region: str = REGION) -> None:
        self.home = Path(home)
        self.path = registry_path(self.home)
        self.region = region
        self._schema_ready = False

    # --- model package groups ---------------------------------------------------------------
    def create_model_package_group(self, name: str, description: str = "") -> dict[str, str]:
        check_group_name(name)
        with self._write() as db:
            if _group_row(db, name) is not None:
                raise RegistryError(f"model package group {name!r} already exists in {self.path}")
            self._insert_group(db, name, description)
        return {"ModelPackageGroupArn": group_arn(name, self.region)}

    def list_model_package_groups(self) -> list[dict[str, Any]]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM model_package_groups ORDER BY creation_time, name").fetchall()
        return [
            {
                "ModelPackageGroupName": row["name"],
                "ModelPackageGroupArn": row["arn"],
                "ModelPackageGroupDescription": row["description"],
                "CreationTime": _time(row["creation_time"]),
            }
            for row in rows
        ]

    # --- packages ---------------------------------------------------------------------------
    def create_model_package(
        self, request: Mapping[str, Any], execution_arn: str | None = None
    ) -> dict[str, str]:
        """Register a new version in the request's group (created on first use, as a pipeline's
        register step does). `execution_arn` is the pipeline execution that produced the model."""
        fields = _package_fields(request)
        evaluation = self._evaluation_content(fields["model_metrics"])
        with self._write() as db:
            group = fields["group"]
            if _group_row(db, group) is None:
                self._insert_group(db, group, "")
            version = db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM model_packages WHERE group_name = ?", (group,)
            ).fetchone()[0]
            arn = package_arn(group, version, self.region)
            now = _now()
            db.execute(
                "INSERT INTO model_packages (arn, group_name, version, description, model_data_url, "
                "inference_specification, model_metrics, evaluation, approval_status, approval_description, "
                "execution_arn, request, creation_time, last_modified_time) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                (
                    arn,
                    group,
                    version,
                    fields["description"],
                    fields["model_data_url"],
                    json.dumps(fields["inference_specification"]),
                    json.dumps(fields["model_metrics"]) if fields["model_metrics"] else None,
                    json.dumps(evaluation) if evaluation is not None else None,
                    fields["status"],
                    execution_arn,
                    json.dumps(dict(request), default=str),
                    now,
                    now,
                ),
            )
            _record(db, arn, None, fields["status"], "registered", now)
        return {"ModelPackageArn": arn}

    def describe_model_package(self, name: str) -> dict[str, Any]:
        """`name` is a package ARN or 'group/version'."""
        with self._read() as db:
            return _describe(self._package_row(db, name))

    def list_model_packages(self, group: str, status: str | None = None) -> list[dict[str, Any]]:
        """The group's packages, oldest version first, each as DescribeModelPackage answers
        (a superset of boto3's ModelPackageSummary). An unknown group is an error."""
        if status is not None:
            check_status(status)
        with self._read() as db:
            if _group_row(db, group) is None:
                raise PackageNotFound(
                    f"no model package group {group!r} in the local registry ({self.path}); "
                    f"groups: {', '.join(self._group_names(db)) or 'none yet (run the pipeline first)'}"
                )
            query = "SELECT * FROM model_packages WHERE group_name = ?"
            arguments: tuple[Any, ...] = (group,)
            if status is not None:
                query += " AND approval_status = ?"
                arguments += (status,)
            rows = db.execute(query + " ORDER BY version", arguments).fetchall()
        return [_describe(row) for row in rows]

    def update_model_package(self, name: str, status: str, description: str | None = None) -> dict[str, Any]:
        """Set the approval status (and description). Returns the ARN, the new status and the
        status it replaced; a change is added to the history (setting the same status again
        only updates the description)."""
        check_status(status)
        with self._write() as db:
            row = self._package_row(db, name)
            previous = row["approval_status"]
            now = _now()
            db.execute(
                "UPDATE model_packages SET approval_status = ?, approval_description = ?, "
                "last_modified_time = ? WHERE arn = ?",
                (
                    status,
                    description if description is not None else row["approval_description"],
                    now,
                    row["arn"],
                ),
            )
            if previous != status:
                _record(db, row["arn"], previous, status, description or "", now)
        return {
            "ModelPackageArn": row["arn"],
            "ModelApprovalStatus": status,
            "PreviousApprovalStatus": previous,
        }

    def history(self, name: str) -> list[StatusChange]:
        """Every status change of the package, oldest first, registration included."""
        with self._read() as db:
            arn = self._package_row(db, name)["arn"]
            rows = db.execute(
                "SELECT from_status, to_status, reason, time FROM status_history WHERE package_arn = ? "
                "ORDER BY id",
                (arn,),
            ).fetchall()
        return [StatusChange(row[0], row[1], row[2], _time(row[3])) for row in rows]

    # --- conveniences for approval and deployment -------------------------------------------
    def latest_version(self, group: str) -> int:
        """The highest version registered in the group."""
        packages = self.list_model_packages(group)
        if not packages:
            raise PackageNotFound(
                f"model package group {group!r} has no packages yet: run the pipeline first"
            )
        return packages[-1]["ModelPackageVersion"]

    def newest_approved(self, group: str) -> dict[str, Any] | None:
        """The Approved package with the highest version, or None (also for an unknown group)."""
        try:
            approved = self.list_model_packages(group, APPROVED)
        except PackageNotFound:
            return None
        return approved[-1] if approved else None

    # --- internals --------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE itself.
        db = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys = ON")
        if not self._schema_ready:
            self._begin(db)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("COMMIT")
            self._schema_ready = True
        return db

    def _begin(self, db: sqlite3.Connection) -> None:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            db.close()
            raise RegistryBusy(
                f"the local registry {self.path} stayed locked for {LOCK_TIMEOUT_S:.0f}s ({error}); "
                f"another kennel process is writing to it: try again"
            ) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction that holds SQLite's write lock from its first statement, so a
        read-then-write (next version number, current status) cannot interleave with another."""
        db = self._connect()
        self._begin(db)
        try:
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            yield db
        finally:
            db.close()

    def _insert_group(self, db: sqlite3.Connection, name: str, description: str) -> None:
        try:
            db.execute(
                "INSERT INTO model_package_groups (name, arn, description, creation_time) VALUES (?, ?, ?, ?)",
                (name, group_arn(name, self.region), description, _now()),
            )
        except sqlite3.IntegrityError:
            raise RegistryError(
                f"model package group {name!r} clashes with an existing group that differs only in letter case "
                f"(SageMaker's ARNs are lower case): use that group's exact name"
            ) from None

    def _package_row(self, db: sqlite3.Connection, name: str) -> sqlite3.Row:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"model package {name!r}: give a package ARN or 'group/version'")
        if name.startswith("arn:"):
            row = db.execute("SELECT * FROM model_packages WHERE arn = ?", (name,)).fetchone()
        else:
            group, _, version = name.rpartition("/")
            if not group or not version.isdigit():
                raise RegistryError(
                    f"model package {name!r}: give a package ARN or 'group/version' (e.g. kennel-models/3)"
                )
            row = db.execute(
                "SELECT * FROM model_packages WHERE group_name = ? AND version = ?", (group, int(version))
            ).fetchone()
        if row is None:
            raise PackageNotFound(
                f"no model package {name!r} in the local registry ({self.path}); "
                f"`kennel models` lists the registered packages"
            )
        return row

    @staticmethod
    def _group_names(db: sqlite3.Connection) -> list[str]:
        return [row[0] for row in db.execute("SELECT name FROM model_package_groups ORDER BY name")]

    def _evaluation_content(self, model_metrics: dict[str, Any] | None) -> Any:
        """evaluation.json as the local store holds it; None when it is elsewhere or missing (a
        package keeps its metrics URI either way, as SageMaker does)."""
        uri = (((model_metrics or {}).get("ModelQuality") or {}).get("Statistics") or {}).get("S3Uri")
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            return None
        try:
            return json.loads(ObjectStore(store_root(self.home)).read_bytes(uri))
        except (StoreError, ValueError):
            return None


# --- pure helpers -----------------------------------------------------------------------------


def check_status(status: object) -> None:
    if status not in APPROVAL_STATUSES:
        raise RegistryError(f"approval status {status!r} is not one of {', '.join(APPROVAL_STATUSES)}")


def check_group_name(name: object) -> None:
    if not isinstance(name, str) or not _GROUP_NAME.match(name):
        raise RegistryError(
            f"model package group name {name!r} is not valid: use 1-63 letters, digits and hyphens, "
            f"starting with a letter or digit (SageMaker's rule)"
        )


def _package_fields(request: Mapping[str, Any]) -> dict[str, Any]:
    """The CreateModelPackage request's fields the registry keeps, checked."""
    if not isinstance(request, Mapping):
        raise RegistryError(f"a CreateModelPackage request must be a dict, got {type(request).__name__}")
    unresolved = _unresolved_path(request, "")
    if unresolved:
        raise RegistryError(
            f"the CreateModelPackage request still holds a pipeline expression at {unresolved}: "
            f"resolve the step's Arguments before registering"
        )
    group = request.get("ModelPackageGroupName")
    if not group:
        raise RegistryError("the CreateModelPackage request has no ModelPackageGroupName: name the group")
    check_group_name(group)
    specification = request.get("InferenceSpecification")
    containers = specification.get("Containers") if isinstance(specification, Mapping) else None
    if not containers or not isinstance(containers, list) or not isinstance(containers[0], Mapping):
        raise RegistryError(
            "the CreateModelPackage request has no InferenceSpecification.Containers: give at least one "
            "container with its ModelDataUrl"
        )
    model_data_url = containers[0].get("ModelDataUrl")
    if not isinstance(model_data_url, str) or not model_data_url:
        raise RegistryError(
            "InferenceSpecification.Containers[0].ModelDataUrl is missing: give the model.tar.gz URI"
        )
    status = request.get("ModelApprovalStatus") or PENDING
    check_status(status)
    metrics = request.get("ModelMetrics")
    return {
        "group": group,
        "description": str(request.get("ModelPackageDescription") or ""),
        "model_data_url": model_data_url,
        "inference_specification": dict(specification),
        "model_metrics": _without_empty(metrics) if isinstance(metrics, Mapping) else None,
        "status": status,
    }


def _unresolved_path(value: Any, where: str) -> str | None:
    if isinstance(value, Mapping):
        if len(value) == 1 and next(iter(value)) in _EXPRESSION_KEYS:
            return where or "the top level"
        for key, item in value.items():
            found = _unresolved_path(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unresolved_path(item, f"{where}[{index}]")
            if found:
                return found
    return None


def _without_empty(metrics: Mapping[str, Any]) -> dict[str, Any]:
    # The SDK writes "Bias": {}, "Explainability": {}; SageMaker's describe leaves them out.
    return {key: value for key, value in metrics.items() if value not in ({}, None)}


def _group_row(db: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    return db.execute("SELECT * FROM model_package_groups WHERE name = ?", (name,)).fetchone()


def _record(
    db: sqlite3.Connection, arn: str, from_status: str | None, to_status: str, reason: str, time: str
) -> None:
    db.execute(
        "INSERT INTO status_history (package_arn, from_status, to_status, reason, time) VALUES (?, ?, ?, ?, ?)",
        (arn, from_status, to_status, reason, time),
    )


def _describe(row: sqlite3.Row) -> dict[str, Any]:
    """DescribeModelPackage's answer for a versioned package, plus `Evaluation` (Kennel's:
    the evaluation.json content, or None)."""
    request = json.loads(row["request"])
    described: dict[str, Any] = {
        "ModelPackageName": row["group_name"],  # SageMaker names versioned packages after their group
        "ModelPackageGroupName": row["group_name"],
        "ModelPackageVersion": row["version"],
        "ModelPackageArn": row["arn"],
        "ModelPackageDescription": row["description"],
        "CreationTime": _time(row["creation_time"]),
        "LastModifiedTime": _time(row["last_modified_time"]),
        "InferenceSpecification": json.loads(row["inference_specification"]),
        "ModelPackageStatus": "Completed",
        "ModelApprovalStatus": row["approval_status"],
        "ModelDataUrl": row["model_data_url"],
        "Evaluation": json.loads(row["evaluation"]) if row["evaluation"] else None,
    }
    if row["model_metrics"]:
        described["ModelMetrics"] = json.loads(row["model_metrics"])
    if row["approval_description"] is not None:
        described["ApprovalDescription"] = row["approval_description"]
    if row["execution_arn"]:
        described["MetadataProperties"] = {"GeneratedBy": row["execution_arn"]}
    for key in ("Domain", "Task", "SamplePayloadUrl", "CustomerMetadataProperties"):
        if request.get(key):
            described[key] = request[key]
    return described
