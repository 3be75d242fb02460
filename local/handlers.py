"""The interface between the runner and the code that runs one kind of step.

A handler has one method, `run(step, arguments, context) -> StepResult` (and may have a second,
`check(step)`, which the runner calls on every step before the run starts and which raises
StepFailure for what the handler can never run): `step` is the step's
JSON from the definition, `arguments` its Arguments with every expression resolved, `context`
what the handler may use (store, job folder, log, stop signal). The runner keeps a dict
{step type: handler}; later issues plug in RegisterModel / Endpoint / Debugger handlers by
replacing entries of `default_handlers(home)`.

Failures carry a SageMaker exception type so that the step's RetryPolicies can match them:

    AlgorithmError                the job's own code failed (non-zero exit): never retried,
                                  as on SageMaker
    SageMaker.JOB_INTERNAL_ERROR  the job process died from a signal the runner did not send,
                                  other than SIGKILL: the closest local analogue of an
                                  InternalServerError of the job's host (SIGKILL, the kernel's
                                  out-of-memory killer, is the job's own AlgorithmError, as the
                                  exit code 137 it gives is on SageMaker)
    Step.SERVICE_FAULT            the local runtime failed around the job (copying inputs or
                                  outputs, an I/O error)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from local.state import FAILED, STOPPED, SUCCEEDED, ProcessRef
from local.store import ObjectStore

ALGORITHM_ERROR = "AlgorithmError"
JOB_INTERNAL_ERROR = "SageMaker.JOB_INTERNAL_ERROR"
SERVICE_FAULT = "Step.SERVICE_FAULT"
CLIENT_ERROR = "ClientError"  # the request itself is wrong: never retried
NOT_SUPPORTED = "NotSupportedLocally"


class StepFailure(Exception):
    """Raised by a handler for an expected failure; `failure_type` drives retries."""

    def __init__(self, reason: str, failure_type: str = CLIENT_ERROR, properties: dict | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure_type = failure_type
        self.properties = properties or {}


@dataclass
class StepResult:
    status: str  # Succeeded, Failed or Stopped
    properties: dict[str, Any] = field(default_factory=dict)
    failure_reason: str | None = None
    failure_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def succeeded(cls, properties: dict[str, Any], **metadata: Any) -> StepResult:
        return cls(SUCCEEDED, properties, metadata=dict(metadata))

    @classmethod
    def failed(cls, reason: str, failure_type: str, properties: dict | None = None) -> StepResult:
        return cls(FAILED, properties or {}, reason, failure_type)

    @classmethod
    def stopped(cls, reason: str, properties: dict | None = None) -> StepResult:
        return cls(STOPPED, properties or {}, reason)


class ProgressSink(Protocol):
    """The part of the progress display a handler talks to (see local.progress)."""

    def step_line(self, step: str, line: str, source: str | None = None) -> None: ...

    def step_metric(self, step: str, metrics: dict[str, float], source: str | None = None) -> None: ...

    def trial_update(self, step: str, trial: str, status: str, detail: str = "") -> None: ...


@dataclass
class RunSettings:
    """Settings fixed for a whole run (read once at the entry point, passed down)."""

    python: str
    cores: int
    stop_grace_seconds: float = 10.0
    max_job_runtime_seconds: int = 5 * 24 * 3600  # SageMaker's ceiling when none is given
    default_job_runtime_seconds: int = 24 * 3600  # SageMaker's default MaxRuntimeInSeconds


@dataclass
class StepContext:
    """What a handler may use while it runs one attempt of one step."""

    execution_id: str
    pipeline_name: str
    step_name: str
    attempt: int
    job_name: str
    job_dir: Path
    store: ObjectStore
    settings: RunSettings
    progress: ProgressSink
    stop_event: threading.Event
    # Called with each child process the handler starts / ends, so a resumed execution can
    # clean up jobs that outlived a killed runner.
    track_process: Callable[[ProcessRef, bool], None] = lambda process, started: None
    # Called when the step goes from preparing its inputs to running its code.
    mark_executing: Callable[[], None] = lambda: None

    @property
    def log_path(self) -> Path:
        return self.job_dir / "log.txt"


class StepHandler(Protocol):
    def run(self, step: dict, arguments: dict, context: StepContext) -> StepResult: ...


class NotYetSupported:
    """Stops a step the local runner cannot run yet, with a message that says so and why."""

    def __init__(self, what: str, when: str) -> None:
        self.what = what
        self.when = when

    def run(self, step: dict, arguments: dict, context: StepContext) -> StepResult:
        return StepResult.failed(
            f"{self.what} (step {step.get('Name')!r}, type {step.get('Type')}) is not yet supported locally; "
            f"{self.when}. Run on the aws target, or end the local pipeline before this step.",
            NOT_SUPPORTED,
        )


# Kennel's definition deploys through a processing step (entrypoints/deploy.py picks the newest
# Approved package at run time); SageMaker's Model/EndpointConfig/Endpoint steps deploy a fixed
# model, which the local endpoints do not model.
ENDPOINT_STEPS = "use a deploy step (see steps/deploy.py), which the local runner serves from its registry"

# A Processing step whose Environment sets this variable to one of these roles is not run as a
# job: the step talks to SageMaker's control plane (deploy an endpoint) and is served by the
# local equivalent of that service (local.jobs.services) instead.
STEP_ROLE_VARIABLE = "KENNEL_STEP_ROLE"


def default_handlers(home: Path) -> dict[str, StepHandler]:
    """Step type -> handler for everything the local runner knows (Condition and Fail are
    evaluated by the runner itself)."""
    from local.debugger_monitor import debugger_monitor
    from local.jobs.processing import ProcessingHandler
    from local.jobs.services import DeployHandler, RegisterModelHandler
    from local.jobs.training import TrainingHandler
    from local.jobs.tuning import TuningHandler
    from local.plots import ConfusionMatrixPlots, plots_monitor
    from local.profiler import profiler_monitor

    return {
        "Processing": ConfusionMatrixPlots(ProcessingHandler(services={"deploy": DeployHandler(home)})),
        # Plots last: they draw the loss series the Debugger monitor's child wrote.
        "Training": TrainingHandler(monitors=(debugger_monitor, profiler_monitor, plots_monitor)),
        "Tuning": TuningHandler(),
        "RegisterModel": RegisterModelHandler(home),
        "Model": NotYetSupported("Creating a model", ENDPOINT_STEPS),
        "EndpointConfig": NotYetSupported("An endpoint configuration", ENDPOINT_STEPS),
        "Endpoint": NotYetSupported("An endpoint", ENDPOINT_STEPS),
    }
