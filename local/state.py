"""Durable state of local pipeline executions: one folder per execution, JSON files written atomically.

    executions/<id>/execution.json     status, parameters, times, failure reason, runner pid
    executions/<id>/definition.json    the definition the execution runs
    executions/<id>/steps/<step>.json  one record per step that started (or was cached)
    executions/<id>/jobs/<job>/        job folders (log.txt, the re-rooted container layout)

Statuses use SageMaker's words. An execution is Executing, Stopping, Stopped, Failed or Succeeded;
a step is Starting, Executing, Stopping, Stopped, Failed or Succeeded. The JSON field names are
those of DescribePipelineExecution / ListPipelineExecutionSteps (PascalCase).

A runner killed with SIGKILL cannot record its end. Loading notices a live status whose runner
process is gone and reports the execution (and its unfinished steps) as Stopped, with
`interrupted` set; a job still running without its runner is named in `orphan_jobs` and in its
step's failure reason. Nothing on disk is changed until the execution is resumed.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from local.files import read_json, write_json_atomic
from local.home import executions_root

EXECUTING, STOPPING, STOPPED, FAILED, SUCCEEDED = "Executing", "Stopping", "Stopped", "Failed", "Succeeded"
STARTING = "Starting"
EXECUTION_STATUSES = (EXECUTING, STOPPING, STOPPED, FAILED, SUCCEEDED)
STEP_STATUSES = (STARTING, EXECUTING, STOPPING, STOPPED, FAILED, SUCCEEDED)
LIVE_STATUSES = (STARTING, EXECUTING, STOPPING)
# Execution variables that name the job of one step type, and nothing in other steps.
JOB_NAME_VARIABLES = {"Training": "TrainingJobName", "Processing": "ProcessingJobName"}
ACCOUNT = "000000000000"
REGION = "local"


class StateError(LookupError):
    """An execution that does not exist or cannot be read."""


def now() -> str:
    """The current time, ISO 8601 in UTC (what the records hold)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class ProcessRef:
    """A child process the runner started, identified robustly (pids are reused).

    Every process the runner tracks is started in a session of its own, so it leads a process
    group whose id is its pid: that group holds the job and whatever the job started.
    """

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return cls(pid, 0.0)

    def alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return (
                abs(process.create_time() - self.create_time) < 0.01
                and process.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.Error:
            return False

    def running_group(self) -> list[psutil.Process]:
        """The live members of the process group this process leads: itself, and what it started
        (still there after it died itself, e.g. when the kernel killed it). Empty when the pid
        now belongs to another process, whose group is not ours."""
        try:
            if abs(psutil.Process(self.pid).create_time() - self.create_time) >= 0.01:
                return []
        except psutil.NoSuchProcess:
            pass  # the leader is gone; members it left keep its pid as their group id
        except psutil.Error:
            return []
        members = []
        for process in psutil.process_iter():
            try:
                if (
                    os.getpgid(process.pid) == self.pid
                    and process.create_time() >= self.create_time - 0.01
                    and process.status() != psutil.STATUS_ZOMBIE
                ):
                    members.append(process)
            except (psutil.Error, OSError):
                continue
        return members

    def to_json(self) -> dict:
        return {"Pid": self.pid, "CreateTime": self.create_time}

    @classmethod
    def from_json(cls, data: dict) -> ProcessRef:
        return cls(int(data["Pid"]), float(data["CreateTime"]))


@dataclass
class StepRecord:
    """What ListPipelineExecutionSteps would say about one step, plus the local details."""

    name: str
    type: str
    status: str = STARTING
    start_time: str | None = None
    end_time: str | None = None
    failure_reason: str | None = None
    attempt_count: int = 0
    properties: dict[str, Any] = field(default_factory=dict)
    job_name: str | None = None
    job_dir: str | None = None
    log_path: str | None = None
    cache_hit: dict[str, Any] | None = None  # {"SourcePipelineExecutionArn": ...}
    attempts: list[dict[str, Any]] = field(default_factory=list)
    processes: list[ProcessRef] = field(default_factory=list)  # children that may outlive a killed runner
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "StepName": self.name,
            "StepType": self.type,
            "StepStatus": self.status,
            "StartTime": self.start_time,
            "EndTime": self.end_time,
            "FailureReason": self.failure_reason,
            "AttemptCount": self.attempt_count,
            "JobName": self.job_name,
            "JobDir": self.job_dir,
            "LogPath": self.log_path,
            "CacheHitResult": self.cache_hit,
            "Metadata": self.metadata,
            "Attempts": self.attempts,
            "ChildProcesses": [process.to_json() for process in self.processes],
            "Properties": self.properties,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepRecord:
        return cls(
            name=data["StepName"],
            type=data.get("StepType", ""),
            status=data.get("StepStatus", STARTING),
            start_time=data.get("StartTime"),
            end_time=data.get("EndTime"),
            failure_reason=data.get("FailureReason"),
            attempt_count=int(data.get("AttemptCount") or 0),
            properties=data.get("Properties") or {},
            job_name=data.get("JobName"),
            job_dir=data.get("JobDir"),
            log_path=data.get("LogPath"),
            cache_hit=data.get("CacheHitResult"),
            attempts=data.get("Attempts") or [],
            processes=[ProcessRef.from_json(item) for item in data.get("ChildProcesses") or []],
            metadata=data.get("Metadata") or {},
        )


@dataclass
class Execution:
    """One pipeline execution as stored on disk (and as `kennel status` shows it)."""

    execution_id: str
    pipeline_name: str
    status: str
    parameters: dict[str, Any]
    creation_time: str
    last_modified_time: str
    end_time: str | None = None
    failure_reason: str | None = None
    runner: ProcessRef | None = None
    resume_count: int = 0
    skipped_steps: list[str] = field(default_factory=list)
    steps: dict[str, StepRecord] = field(default_factory=dict)
    folder: Path | None = None
    interrupted: bool = False  # derived on load: the runner died without recording an end
    # Derived on load, after a runner died: step -> pids of its job still running with no runner.
    orphan_jobs: dict[str, list[int]] = field(default_factory=dict)

    @property
    def arn(self) -> str:
        return execution_arn(self.pipeline_name, self.execution_id)

    @property
    def pipeline_arn(self) -> str:
        return pipeline_arn(self.pipeline_name)

    def to_json(self) -> dict[str, Any]:
        return {
            "PipelineExecutionId": self.execution_id,
            "PipelineExecutionArn": self.arn,
            "PipelineName": self.pipeline_name,
            "PipelineArn": self.pipeline_arn,
            "PipelineExecutionStatus": self.status,
            "PipelineParameters": [{"Name": name, "Value": value} for name, value in self.parameters.items()],
            "CreationTime": self.creation_time,
            "LastModifiedTime": self.last_modified_time,
            "EndTime": self.end_time,
            "FailureReason": self.failure_reason,
            "Runner": self.runner.to_json() if self.runner else None,
            "ResumeCount": self.resume_count,
            "SkippedSteps": self.skipped_steps,
        }

    def to_summary(self) -> dict[str, Any]:
        """The execution and its steps as one JSON document (for `kennel status --json`)."""
        summary = self.to_json()
        summary["Interrupted"] = self.interrupted
        summary["OrphanJobs"] = self.orphan_jobs
        summary["Folder"] = str(self.folder) if self.folder else None
        summary["Steps"] = [
            {
                key: value
                for key, value in record.to_json().items()
                if key not in ("Properties", "ChildProcesses")
            }
            for record in self.ordered_steps()
        ]
        return summary

    def variables(
        self, job_name: str | None = None, current_time: str | None = None, step_type: str | None = None
    ) -> dict[str, str]:
        """The execution variables a definition can Get (`Execution.<Name>`) in a step.

        As on SageMaker, TrainingJobName is the job a Training step launches and ProcessingJobName
        the job a Processing step launches; a step of another type (a Tuning step, whose trials the
        tuner names) has neither. Without `step_type` (a caller that does not know the step) both
        name `job_name`.
        """
        variables = {
            "PipelineExecutionId": self.execution_id,
            "PipelineExecutionArn": self.arn,
            "PipelineName": self.pipeline_name,
            "PipelineArn": self.pipeline_arn,
            "StartDateTime": self.creation_time,
            "CurrentDateTime": current_time or now(),
        }
        if job_name is not None:
            for kind, name in JOB_NAME_VARIABLES.items():
                if step_type in (None, kind):
                    variables[name] = job_name
        return variables

    def ordered_steps(self) -> list[StepRecord]:
        return sorted(self.steps.values(), key=lambda record: (record.start_time or "~", record.name))

    @classmethod
    def from_json(cls, data: dict[str, Any], folder: Path | None = None) -> Execution:
        runner = data.get("Runner")
        return cls(
            execution_id=data["PipelineExecutionId"],
            pipeline_name=data["PipelineName"],
            status=data["PipelineExecutionStatus"],
            parameters={item["Name"]: item["Value"] for item in data.get("PipelineParameters") or []},
            creation_time=data["CreationTime"],
            last_modified_time=data.get("LastModifiedTime") or data["CreationTime"],
            end_time=data.get("EndTime"),
            failure_reason=data.get("FailureReason"),
            runner=ProcessRef.from_json(runner) if runner else None,
            resume_count=int(data.get("ResumeCount") or 0),
            skipped_steps=list(data.get("SkippedSteps") or []),
            folder=folder,
        )


def execution_arn(pipeline_name: str, execution_id: str) -> str:
    return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{pipeline_name.lower()}/execution/{execution_id}"


def pipeline_arn(pipeline_name: str) -> str:
    return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/{pipeline_name.lower()}"


def new_execution_id() -> str:
    """A sortable, S3- and job-name-safe id: UTC time plus randomness (e.g. 20261122t030501-3fa9c1)."""
    return time.strftime("%Y%m%dt%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ExecutionStore:
    """Reads and writes the executions under one home folder."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.root = executions_root(self.home)

    def folder(self, execution_id: str) -> Path:
        if not _SAFE_NAME.match(execution_id or ""):
            raise StateError(f"{execution_id!r} is not an execution id")
        return self.root / execution_id

    def create(self, definition: dict, pipeline_name: str, parameters: dict[str, Any]) -> Execution:
        execution_id = new_execution_id()
        while self.folder(execution_id).exists():
            execution_id = new_execution_id()
        folder = self.folder(execution_id)
        (folder / "steps").mkdir(parents=True)
        write_json_atomic(folder / "definition.json", definition)
        stamp = now()
        execution = Execution(
            execution_id, pipeline_name, EXECUTING, dict(parameters), stamp, stamp, folder=folder
        )
        self.save(execution)
        return execution

    def save(self, execution: Execution) -> None:
        execution.last_modified_time = now()
        write_json_atomic(self.folder(execution.execution_id) / "execution.json", execution.to_json())

    def save_step(self, execution_id: str, record: StepRecord) -> None:
        if not _SAFE_NAME.match(record.name):
            raise StateError(f"step name {record.name!r} cannot be stored (use letters, digits, '-', '_')")
        write_json_atomic(self.folder(execution_id) / "steps" / f"{record.name}.json", record.to_json())

    def definition(self, execution_id: str) -> dict:
        path = self.folder(execution_id) / "definition.json"
        if not path.is_file():
            raise StateError(f"execution {execution_id} has no definition.json in {path.parent}")
        return read_json(path)

    def load(self, execution_id: str) -> Execution:
        folder = self.folder(execution_id)
        path = folder / "execution.json"
        if not path.is_file():
            known = ", ".join(item.execution_id for item in self.list()[:5]) or "none yet"
            raise StateError(f"no execution {execution_id!r} in {self.root} (recent: {known})")
        try:
            execution = Execution.from_json(read_json(path), folder)
            for step_file in sorted((folder / "steps").glob("*.json")):
                record = StepRecord.from_json(read_json(step_file))
                execution.steps[record.name] = record
        except (ValueError, KeyError) as error:
            raise StateError(f"execution {execution_id}: unreadable state in {folder}: {error}") from None
        return _with_liveness(execution)

    def list(self) -> list[Execution]:
        """Every readable execution, newest first."""
        if not self.root.is_dir():
            return []
        executions = []
        for folder in self.root.iterdir():
            if (folder / "execution.json").is_file():
                try:
                    executions.append(self.load(folder.name))
                except StateError:
                    continue
        return sorted(executions, key=lambda item: (item.creation_time, item.execution_id), reverse=True)


def _with_liveness(execution: Execution) -> Execution:
    """Report an execution whose runner died (SIGKILL, power loss) as Stopped."""
    if execution.status not in (EXECUTING, STOPPING):
        return execution
    if execution.runner is not None and execution.runner.alive():
        return execution
    pid = execution.runner.pid if execution.runner else "?"
    resume = f"kennel run --resume {execution.execution_id}"
    reason = f"the runner (pid {pid}) ended without finishing this execution; resume it with: {resume}"
    orphans: dict[str, list[int]] = {}
    for name, record in execution.steps.items():
        if record.status not in LIVE_STATUSES:
            continue
        # A job runs in its own process group, so it can outlive its runner: say so, as it is
        # still using the machine and nothing will collect its outputs.
        running = sorted({member.pid for process in record.processes for member in process.running_group()})
        step_reason = reason
        if running:
            orphans[name] = running
            step_reason = (
                f"the runner (pid {pid}) ended, but this step's job is still running (pids "
                f"{', '.join(map(str, running))}) and nothing will collect its outputs; resume with: {resume} "
                f"(it stops the job first)"
            )
        execution.steps[name] = replace(record, status=STOPPED, failure_reason=record.failure_reason or step_reason)
    return replace(execution, status=STOPPED, failure_reason=reason, interrupted=True, orphan_jobs=orphans)


def list_executions(home: Path) -> list[Execution]:
    """All executions under `home`, newest first."""
    return ExecutionStore(home).list()


def load_execution(home: Path, execution_id: str) -> Execution:
    """One execution with its step records; raises StateError when there is none."""
    return ExecutionStore(home).load(execution_id)


def current_process() -> ProcessRef:
    return ProcessRef.of(os.getpid())
