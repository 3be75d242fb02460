"""The scheduling loop: run a pipeline definition's steps on this machine, durably.

    run_pipeline(definition, parameters, home, pipeline_name=...) -> Execution
    resume(execution_id, home) -> Execution

Ready = not yet done, not on an untaken condition branch, and every dependency Succeeded. Ready
job steps go to a thread pool (at most `max_parallel` at once; each job is a child process);
Condition and Fail steps are evaluated on the loop's thread. A failed step stops new steps from
starting, lets running ones finish, and fails the execution; a Fail step fails it with the
step's message. Retries follow each step's RetryPolicies, caching its CacheConfig.

Every change is written to the execution's folder before the loop moves on, so a killed runner
leaves a readable execution; `resume` starts the steps that did not succeed, reusing the
properties of those that did (and kills any job an earlier runner left running).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from local.cache import CacheConfigError, StepCache, cache_key, cache_settings
from local.expressions import (
    ExpressionError,
    Scope,
    evaluate_conditions,
    explain_conditions,
    resolve,
    to_text,
)
from local.graph import GraphError, StepNode, build_graph, topological_order
from local.handlers import (
    SERVICE_FAULT,
    RunSettings,
    StepContext,
    StepFailure,
    StepHandler,
    StepResult,
    default_handlers,
)
from local.home import resolve_home, store_root
from local.jobs.container import kill_leftover, log_note
from local.parameters import ParameterError, resolve_parameters
from local.progress import Progress, QuietProgress
from local.retry import parse_policies, retry_delay
from local.state import (
    EXECUTING,
    FAILED,
    JOB_NAME_VARIABLES,
    STARTING,
    STOPPED,
    STOPPING,
    SUCCEEDED,
    Execution,
    ExecutionStore,
    ProcessRef,
    StateError,
    StepRecord,
    current_process,
    now,
)
from local.store import ObjectStore

DEFAULT_PIPELINE_NAME = "kennel-local"
INLINE_TYPES = ("Condition", "Fail")


class ResumeError(StateError):
    """An execution that cannot be resumed (it succeeded, or another runner holds it)."""


# Errors a user can cause before any step runs; each has a one-line message naming the input.
USER_ERRORS = (ParameterError, GraphError, CacheConfigError, StateError, ExpressionError)


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what): read once at the entry point and passed down."""

    max_parallel: int | None = None  # steps at once; default: the machine's cores
    use_cache: bool = True  # honour the steps' CacheConfig
    python: str = sys.executable  # the interpreter jobs run with (the project's venv)
    stop_grace_seconds: float = 10.0  # SIGTERM -> SIGKILL delay when a job is stopped
    cores: int = field(default_factory=available_cores)

    def settings(self) -> RunSettings:
        return RunSettings(python=self.python, cores=self.cores, stop_grace_seconds=self.stop_grace_seconds)


def run_pipeline(
    definition: Mapping[str, Any],
    parameters: Mapping[str, Any] | None = None,
    home: Path | str | None = None,
    *,
    pipeline_name: str = DEFAULT_PIPELINE_NAME,
    options: RunOptions | None = None,
    handlers: Mapping[str, StepHandler] | None = None,
    progress: Progress | None = None,
    stop_event: threading.Event | None = None,
) -> Execution:
    """Start a new execution of `definition` and run it to the end; returns the stored execution.

    Raises one of USER_ERRORS (before anything runs) for an invalid definition or parameters.
    """
    runner = Runner(home, options=options, handlers=handlers, progress=progress, stop_event=stop_event)
    return runner.start(dict(definition), parameters or {}, pipeline_name)


def resume(
    execution_id: str,
    home: Path | str | None = None,
    *,
    options: RunOptions | None = None,
    handlers: Mapping[str, StepHandler] | None = None,
    progress: Progress | None = None,
    stop_event: threading.Event | None = None,
) -> Execution:
    """Continue a Failed, Stopped or interrupted execution from the steps that did not succeed."""
    runner = Runner(home, options=options, handlers=handlers, progress=progress, stop_event=stop_event)
    return runner.resume(execution_id)


class Runner:
    def __init__(
        self,
        home: Path | str | None,
        *,
        options: RunOptions | None = None,
        handlers: Mapping[str, StepHandler] | None = None,
        progress: Progress | None = None,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.home = resolve_home(home)
        self.options = options or RunOptions()
        self.handlers = dict(handlers) if handlers is not None else default_handlers(self.home)
        self.progress: Progress = progress or QuietProgress()
        self.stop_event = stop_event or threading.Event()
        self.store = ObjectStore(store_root(self.home))
        self.executions = ExecutionStore(self.home)
        self.cache = StepCache(self.home)

    # --- entry points ------------------------------------------------------------------------
    def start(self, definition: dict, parameters: Mapping[str, Any], pipeline_name: str) -> Execution:
        plan = Plan.build(definition, self.handlers)
        values = resolve_parameters(definition, parameters)
        execution = self.executions.create(definition, pipeline_name, values)
        with _ExecutionLock(execution.folder):
            execution.runner = current_process()
            self.executions.save(execution)
            return _Run(self, execution, plan).drive()

    def resume(self, execution_id: str) -> Execution:
        execution = self.executions.load(execution_id)
        if execution.status == SUCCEEDED:
            raise ResumeError(f"execution {execution_id} already succeeded; start a new run instead")
        definition = self.executions.definition(execution_id)
        plan = Plan.build(definition, self.handlers)
        with _ExecutionLock(execution.folder, execution_id):
            execution = self.executions.load(execution_id)  # re-read under the lock
            for record in execution.steps.values():
                if record.status == SUCCEEDED:
                    continue
                for process in record.processes:
                    stopped = kill_leftover(process)
                    if stopped:
                        message = (
                            f"{record.name}: its job was still running, left by the earlier runner (pids "
                            f"{', '.join(map(str, stopped))}); stopped it before running the step again"
                        )
                        self.progress.note(message)
                        if record.log_path:
                            log_note(Path(record.log_path), message)
                if record.end_time is None:  # it was running when the earlier runner died
                    record.status, record.end_time, record.processes = STOPPED, now(), []
                    self.executions.save_step(execution_id, record)
            execution.status, execution.failure_reason, execution.end_time = EXECUTING, None, None
            execution.interrupted = False
            execution.resume_count += 1
            execution.runner = current_process()
            self.executions.save(execution)
            return _Run(self, execution, plan).drive()


@dataclass(frozen=True)
class Plan:
    nodes: dict[str, StepNode]
    order: list[str]

    @classmethod
    def build(cls, definition: Mapping[str, Any], handlers: Mapping[str, StepHandler] | None = None) -> Plan:
        """The steps in order, checked before anything runs: names, CacheConfig, and what each
        step's handler can tell from the step alone (`check`), so that a run does not fail an
        hour in on something that was wrong from the start."""
        nodes = build_graph(definition)
        order = topological_order(nodes)
        for node in nodes.values():
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$", node.name):
                raise GraphError(
                    f"step name {node.name!r} must use letters, digits, '-' and '_' (as SageMaker requires)"
                )
            try:
                cache_settings(node.step)
            except CacheConfigError as error:
                raise CacheConfigError(f"step {node.name!r}: {error}") from None
            check = getattr((handlers or {}).get(node.type), "check", None)
            if check is not None:
                try:
                    check(node.step)
                except StepFailure as failure:
                    raise GraphError(f"step {node.name!r}: {failure.reason}") from None
        return cls(nodes, order)


class _ExecutionLock:
    """Holds `<execution>/runner.lock` for the run: two runners never drive one execution."""

    def __init__(self, folder: Path | None, execution_id: str | None = None) -> None:
        assert folder is not None
        self.path = folder / "runner.lock"
        self.execution_id = execution_id
        self.handle: TextIO | None = None

    def __enter__(self) -> _ExecutionLock:
        self.handle = self.path.open("a")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise ResumeError(
                f"execution {self.execution_id} is being run by another runner right now"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()


class _Run:
    """One drive of one execution (a start or a resume)."""

    def __init__(self, runner: Runner, execution: Execution, plan: Plan) -> None:
        self.runner = runner
        self.execution = execution
        self.plan = plan
        self.lock = threading.RLock()
        self.state: dict[str, str] = {}  # step -> pending | running | Succeeded | Failed | Stopped
        for name in plan.order:
            record = execution.steps.get(name)
            self.state[name] = SUCCEEDED if record is not None and record.status == SUCCEEDED else "pending"
        self.first_failure: tuple[str, str] | None = None

    @property
    def progress(self) -> Progress:
        return self.runner.progress

    # --- the loop -----------------------------------------------------------------------------
    def drive(self) -> Execution:
        self.progress.execution_started(self.execution, self.plan.order)
        parallel = max(1, self.runner.options.max_parallel or self.runner.options.cores)
        running: dict[Future, str] = {}
        try:
            with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="step") as pool:
                try:
                    self._loop(pool, running, parallel)
                except KeyboardInterrupt:
                    # Ctrl-C: jobs see the stop event, get SIGTERM, and their steps end Stopped.
                    self.runner.stop_event.set()
                    with self.lock:
                        self.execution.status = STOPPING
                        self.runner.executions.save(self.execution)
                    self.progress.note(
                        "stopping: the running jobs get SIGTERM, then the execution ends Stopped"
                    )
                    wait(list(running))
        finally:
            self._finish()
        return self.runner.executions.load(self.execution.execution_id)

    def _loop(self, pool: ThreadPoolExecutor, running: dict[Future, str], parallel: int) -> None:
        while True:
            launched = self._launch_ready(pool, running, parallel)
            if not running:
                if launched:
                    continue
                return
            done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                running.pop(future)
                future.result()  # _run_job_step records its own outcome; this surfaces runner bugs

    def _launch_ready(self, pool: ThreadPoolExecutor, running: dict[Future, str], parallel: int) -> bool:
        """Start what can start; True when something finished inline (so look again)."""
        if self.first_failure is not None or self.runner.stop_event.is_set():
            return False
        skipped = self._skipped()
        for name in self.plan.order:
            if self.state[name] != "pending" or name in skipped:
                continue
            node = self.plan.nodes[name]
            if not all(self.state[dependency] == SUCCEEDED for dependency in node.depends_on):
                continue
            if node.type in INLINE_TYPES:
                # A condition's outcome changes which steps are skipped: look again from the top.
                self._run_inline(node)
                return True
            if len(running) >= parallel:
                continue
            self.state[name] = "running"
            running[pool.submit(self._run_job_step, node)] = name
        return False

    def _skipped(self) -> set[str]:
        """Steps that will not run: on a branch their condition did not take, or after one."""
        skipped: set[str] = set()
        for name in self.plan.order:
            node = self.plan.nodes[name]
            branch = node.branch
            if branch is not None and self.state[branch.condition] == SUCCEEDED:
                outcome = self.execution.steps[branch.condition].properties.get("Outcome") == "True"
                if outcome != branch.when:
                    skipped.add(name)
                    continue
            if any(dependency in skipped for dependency in node.depends_on):
                skipped.add(name)
        return skipped

    def _finish(self) -> None:
        execution = self.execution
        with self.lock:
            for name, status in self.state.items():
                if status == "running":  # only after an interrupt: the worker could not record its end
                    record = execution.steps.get(name)
                    if record is not None and record.status not in (SUCCEEDED, FAILED, STOPPED):
                        record.status, record.end_time = STOPPED, now()
                        self._save(record)
            execution.skipped_steps = sorted(self._skipped(), key=self.plan.order.index)
            execution.end_time = now()
            if self.runner.stop_event.is_set() and self.first_failure is None:
                execution.status = STOPPED
                execution.failure_reason = "the execution was stopped before it finished"
            elif self.first_failure is not None:
                execution.status = FAILED
                execution.failure_reason = self.first_failure[1]
            elif any(
                status in ("pending", FAILED, STOPPED)
                for name, status in self.state.items()
                if name not in execution.skipped_steps
            ):
                execution.status = FAILED
                execution.failure_reason = (
                    "some steps could not run because a step they depend on did not succeed"
                )
            else:
                execution.status = SUCCEEDED
            self.runner.executions.save(execution)
        self.progress.execution_finished(self.runner.executions.load(execution.execution_id))

    # --- steps evaluated by the runner ----------------------------------------------------------
    def _run_inline(self, node: StepNode) -> None:
        record = self._new_record(node)
        record.attempt_count = 1
        self._set_status(record, EXECUTING)
        try:
            arguments = node.step.get("Arguments") or {}
            if node.type == "Condition":
                conditions = arguments.get("Conditions") or []
                outcome = evaluate_conditions(conditions, self._scope(None))
                result = StepResult.succeeded({"Outcome": "True" if outcome else "False"},
                                              EvaluatedConditions=explain_conditions(conditions, self._scope(None)))
            else:
                message = to_text(resolve(arguments.get("ErrorMessage", ""), self._scope(None)))
                result = StepResult.failed(message or f"Fail step {node.name} was reached", "FailStep")
        except ExpressionError as error:
            result = StepResult.failed(str(error), "ClientError")
        self._complete(node, record, result)

    # --- job steps (in a pool thread) -------------------------------------------------------
    def _run_job_step(self, node: StepNode) -> None:
        try:
            self._attempt_loop(node)
        except Exception as error:  # a bug in a handler must still end the step, with its traceback
            record = self.execution.steps.get(node.name) or self._new_record(node)
            detail = "".join(traceback.format_exception(error))
            if record.log_path:
                log_note(Path(record.log_path), "internal error in the local runner:\n" + detail)
            self._complete(
                node,
                record,
                StepResult.failed(f"internal error in the local runner: {error!r}", SERVICE_FAULT),
            )

    def _attempt_loop(self, node: StepNode) -> None:
        record = self._new_record(node)
        policies = parse_policies(node.step)
        first_start = time.monotonic()
        retries = 0
        while True:
            record.attempt_count += 1
            result, key = self._attempt(node, record)
            if result is None:  # served from the cache
                return
            record.attempts.append(
                {
                    "Attempt": record.attempt_count,
                    "JobName": record.job_name,
                    "Status": result.status,
                    "FailureReason": result.failure_reason,
                    "FailureType": result.failure_type,
                    "StartTime": record.start_time,
                    "EndTime": now(),
                    "LogPath": record.log_path,
                }
            )
            delay = None
            if result.status == FAILED and not self.runner.stop_event.is_set():
                delay = retry_delay(policies, result.failure_type, retries, time.monotonic() - first_start)
            if delay is None:
                if result.status == SUCCEEDED and key is not None:
                    self.runner.cache.store(
                        self.execution.pipeline_name,
                        node.name,
                        key,
                        self.execution.execution_id,
                        self.execution.arn,
                        result.properties,
                        result.metadata,
                    )
                self._complete(node, record, result)
                return
            retries += 1
            self.progress.step_status(
                node.name,
                "Retrying",
                f"{result.failure_type}; attempt {record.attempt_count + 1} in {delay:g}s",
            )
            if self.runner.stop_event.wait(delay):
                self._complete(node, record, StepResult.stopped("stopped while waiting to retry"))
                return

    def _attempt(self, node: StepNode, record: StepRecord) -> tuple[StepResult | None, str | None]:
        job_name = make_job_name(self.execution.execution_id, node.name, node.type, record.attempt_count)
        job_dir = self.execution.folder / "jobs" / job_name  # type: ignore[operator]
        job_dir.mkdir(parents=True, exist_ok=True)
        record.job_name, record.job_dir, record.log_path = job_name, str(job_dir), str(job_dir / "log.txt")
        record.start_time = record.start_time or now()
        record.failure_reason, record.end_time = None, None
        self._set_status(record, STARTING)
        try:
            arguments = resolve(node.step.get("Arguments") or {}, self._scope(job_name, node.type))
        except ExpressionError as error:
            return StepResult.failed(_explain_expression_error(error, node.type), "ClientError"), None
        key = self._cache_key(node, arguments)
        if key is not None and self._serve_from_cache(node, record, key):
            return None, None
        handler = self.runner.handlers.get(node.type)
        if handler is None:
            return StepResult.failed(
                f"step type {node.type!r} is not supported by the local runner", "NotSupportedLocally"
            ), None
        context = StepContext(
            execution_id=self.execution.execution_id,
            pipeline_name=self.execution.pipeline_name,
            step_name=node.name,
            attempt=record.attempt_count,
            job_name=job_name,
            job_dir=job_dir,
            store=self.runner.store,
            settings=self.runner.options.settings(),
            progress=self.progress,
            stop_event=self.runner.stop_event,
            track_process=lambda process, started: self._track(record, process, started),
            mark_executing=lambda: self._set_status(record, EXECUTING),
        )
        try:
            return handler.run(dict(node.step), arguments, context), key
        except StepFailure as failure:
            log_note(context.log_path, f"step failed: {failure.reason}")
            return StepResult.failed(failure.reason, failure.failure_type, failure.properties), key
        except OSError as error:
            log_note(context.log_path, "I/O error:\n" + "".join(traceback.format_exception(error)))
            return StepResult.failed(f"I/O error in the local runner: {error}", SERVICE_FAULT), key

    def _cache_key(self, node: StepNode, arguments: dict) -> str | None:
        enabled, _ = cache_settings(node.step)
        if not enabled or not self.runner.options.use_cache:
            return None
        return cache_key(self.execution.pipeline_name, dict(node.step), arguments, self.runner.store)

    def _serve_from_cache(self, node: StepNode, record: StepRecord, key: str) -> bool:
        _, expire_after = cache_settings(node.step)
        entry = self.runner.cache.lookup(self.execution.pipeline_name, node.name, key, expire_after)
        if entry is None or entry.get("PipelineExecutionId") == self.execution.execution_id:
            return False
        record.cache_hit = {"SourcePipelineExecutionArn": entry["SourcePipelineExecutionArn"]}
        cached = entry["Properties"]
        record.job_name = (
            cached.get("ProcessingJobName")
            or cached.get("TrainingJobName")
            or cached.get("HyperParameterTuningJobName")
            or record.job_name
        )
        log_note(
            Path(record.log_path or "."),
            f"cache hit: reusing {record.job_name} from execution {entry['PipelineExecutionId']}",
        )
        # The plots and reports the original job wrote stay in its execution's folder: show them.
        self._complete(node, record, StepResult.succeeded(cached, **(entry.get("Metadata") or {})))
        return True

    # --- records ----------------------------------------------------------------------------------
    def _new_record(self, node: StepNode) -> StepRecord:
        previous = self.execution.steps.get(node.name)
        record = StepRecord(node.name, node.type, status=STARTING, start_time=now())
        if previous is not None:  # a resumed step keeps its history and attempt count
            record.attempts = list(previous.attempts)
            record.attempt_count = previous.attempt_count
        with self.lock:
            self.execution.steps[node.name] = record
        return record

    def _set_status(self, record: StepRecord, status: str, detail: str = "") -> None:
        with self.lock:
            record.status = status
            self._save(record)
        self.progress.step_status(record.name, status, detail)

    def _track(self, record: StepRecord, process: ProcessRef, started: bool) -> None:
        with self.lock:
            if started:
                record.processes.append(process)
            else:
                record.processes = [item for item in record.processes if item.pid != process.pid]
            self._save(record)

    def _complete(self, node: StepNode, record: StepRecord, result: StepResult) -> None:
        with self.lock:
            record.status = result.status
            record.end_time = now()
            record.failure_reason = result.failure_reason
            record.properties = result.properties
            record.metadata.update(result.metadata)
            if result.failure_type:
                record.metadata["FailureType"] = result.failure_type
            record.processes = []
            self._save(record)
            self.state[node.name] = result.status
            if result.status == FAILED and self.first_failure is None:
                reason = (result.failure_reason or "failed").strip()
                if node.type != "Fail":
                    reason = f"step {node.name} failed: {reason.splitlines()[0]}"
                self.first_failure = (node.name, reason)
        detail = (
            "cached"
            if record.cache_hit
            else (result.failure_reason or "").splitlines()[0]
            if result.failure_reason
            else ""
        )
        self.progress.step_status(node.name, result.status, detail)

    def _save(self, record: StepRecord) -> None:
        self.runner.executions.save_step(self.execution.execution_id, record)

    def _scope(self, job_name: str | None, step_type: str | None = None) -> Scope:
        execution = self.execution
        with self.lock:
            steps = {
                name: record.properties
                for name, record in execution.steps.items()
                if record.status == SUCCEEDED
            }
        return Scope(
            parameters=execution.parameters, execution=execution.variables(job_name, step_type=step_type), steps=steps,
            read_json=self._read_json,
        )

    def _read_json(self, uri: str) -> Any:
        return json.loads(self.runner.store.read_bytes(uri))


def _explain_expression_error(error: ExpressionError, step_type: str) -> str:
    """The error, and why when it is a job-name variable used outside the step that defines it."""
    message = str(error)
    for kind, name in JOB_NAME_VARIABLES.items():
        if f"Execution.{name}" in message and step_type != kind:
            return (
                f"{message}: SageMaker defines Execution.{name} only in {kind} steps (the job that step "
                f"launches); this is a {step_type} step"
                + (", whose training jobs the tuner names itself" if step_type == "Tuning" else "")
            )
    return message


_UNSAFE = re.compile(r"[^A-Za-z0-9]+")


def make_job_name(execution_id: str, step_name: str, step_type: str, attempt: int) -> str:
    """A SageMaker-valid job name, unique per execution, step and attempt.

    Tuning job names are limited to 32 characters, other jobs to 63.
    """
    digest = hashlib.sha256(f"{execution_id}/{step_name}/{attempt}".encode()).hexdigest()
    step = _UNSAFE.sub("-", step_name).strip("-") or "step"
    if step_type == "Tuning":
        return f"{step[:20].strip('-')}-{digest[:10]}"
    name = f"pipelines-{execution_id}-{step}-{attempt}"
    if len(name) > 63:
        name = f"pipelines-{digest[:12]}-{step[:36].strip('-')}-{attempt}"
    return _UNSAFE.sub("-", name)[:63].strip("-")
