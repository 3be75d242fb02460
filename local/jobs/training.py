"""Training steps (and tuning trials) as local jobs: CreateTrainingJob emulated in a job folder.

The job folder holds the container layout re-rooted under `<job>/opt_ml`:

    input/data/<channel>/      each InputDataConfig channel, copied from the store
    input/config/              hyperparameters.json, inputdataconfig.json, resourceconfig.json,
                               debughookconfig.json (when the request has a DebugHookConfig)
    model/                     SM_MODEL_DIR: tarred to <S3OutputPath>/<job>/output/model.tar.gz
    output/data/               SM_OUTPUT_DATA_DIR: tarred to .../output/output.tar.gz
    output/failure             its text becomes the FailureReason
    checkpoints/               KENNEL_CHECKPOINT_DIR; synced to CheckpointConfig.S3Uri while the
                               job runs and fetched from it when a job starts (spot-style resume)

How the script is started, by what the request says (the SDK's scripts hard-code /opt/ml, so the
runner starts the user's script itself with this project's interpreter):
  * v3 ModelTrainer (`sm_train.sh` from the `sm_drivers` channel): the entry script named in
    sm_drivers/sourcecode.json runs in the `code` channel, hyperparameters passed the way the
    SDK's basic script driver passes them (request order, JSON values);
  * the training toolkit's script mode (`sagemaker_program` + `sagemaker_submit_directory`, which
    the v3 tuner emits): the bundle is unpacked and the program run with `--name value` pairs in
    sorted order, JSON-decoded and written with str() (`true` arrives as `True`);
  * a Python ContainerEntrypoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from local.expressions import to_text
from local.files import extract_tarball, read_json, tar_folder, walk_files, write_json_atomic
from local.handlers import (
    ALGORITHM_ERROR,
    SERVICE_FAULT,
    StepContext,
    StepFailure,
    StepResult,
)
from local.jobs.container import (
    ChildOutcome,
    ChildSpec,
    MetricReader,
    base_environment,
    container_root,
    decode_hyperparameter,
    driver_arguments,
    hyperparameter_environment,
    is_python,
    log_note,
    remap,
    remap_argument,
    run_child,
    runtime_limit,
    tail,
    toolkit_arguments,
)
from local.state import ACCOUNT, FAILED, REGION, STOPPED, SUCCEEDED, now
from local.store import StoreError

HOST = "algo-1"
DEFAULT_TENSORS_PATH = "/opt/ml/output/tensors"
DEFAULT_CHECKPOINT_PATH = "/opt/ml/checkpoints"
CHECKPOINT_VARIABLE = "KENNEL_CHECKPOINT_DIR"
CHECKPOINT_SYNC_SECONDS = 2.0
RULES_NOT_EVALUATED = "Debugger rules are not evaluated by the local runner yet"

# (request, job folder, properties so far, context) -> DebugRuleEvaluationStatuses entries.
RuleEvaluator = Callable[[dict, Path, dict, StepContext], list[dict]]


class JobMonitor(Protocol):
    """Watches one training job while it runs (Debugger rules, the profiler, plots) and reports at its end."""

    def stop_reason(self) -> str | None:
        """Why the job must stop now (a rule's StopTraining action), or None; polled while the job runs."""
        ...

    def finish(self, properties: dict[str, Any], metadata: dict[str, Any]) -> None:
        """The job has ended: complete the work and add to its properties and step metadata."""
        ...


# (request, job name, prepared job folder, context) -> a started monitor, or None when the request
# does not ask for what it watches.
MonitorFactory = Callable[[dict, str, "PreparedJob", StepContext], JobMonitor | None]


@dataclass
class TrainingOutcome:
    status: str  # Succeeded, Failed or Stopped (the TrainingStep's words)
    properties: dict[str, Any]
    metrics: MetricReader
    failure_reason: str | None = None
    failure_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)  # for the step record (plots, reports)

    def to_step_result(self) -> StepResult:
        if self.status == SUCCEEDED:
            result = StepResult.succeeded(self.properties)
        elif self.status == STOPPED and not self.extra.get("max_runtime_exceeded"):
            result = StepResult.stopped(self.failure_reason or "stopped", self.properties)
        else:
            result = StepResult.failed(
                self.failure_reason or "failed", self.failure_type or ALGORITHM_ERROR, self.properties
            )
        result.metadata.update(self.metadata)
        return result


class TrainingHandler:
    """The Training step type. `rule_evaluator` and `monitors` are where local Debugger rules,
    the profiler and plots plug in."""

    def __init__(
        self, rule_evaluator: RuleEvaluator | None = None, monitors: Sequence[MonitorFactory] = ()
    ) -> None:
        self.rule_evaluator = rule_evaluator
        self.monitors = tuple(monitors)

    def run(self, step: dict, arguments: dict, context: StepContext) -> StepResult:
        outcome = run_training_job(
            arguments,
            job_name=context.job_name,
            job_dir=context.job_dir,
            context=context,
            rule_evaluator=self.rule_evaluator,
            mark_executing=context.mark_executing,
            monitors=self.monitors,
        )
        return outcome.to_step_result()


def run_training_job(
    request: dict,
    *,
    job_name: str,
    job_dir: Path,
    context: StepContext,
    source: str | None = None,
    cores: int | None = None,
    on_metrics: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    rule_evaluator: RuleEvaluator | None = None,
    mark_executing: Callable[[], None] = lambda: None,
    monitors: Sequence[MonitorFactory] = (),
) -> TrainingOutcome:
    """Run one training job described by a CreateTrainingJob request; never raises StepFailure."""
    started = now()
    properties = _describe(request, job_name, started)
    metrics = MetricReader((request.get("AlgorithmSpecification") or {}).get("MetricDefinitions"))
    log_path = job_dir / "log.txt"
    try:
        job = _prepare(request, job_name, job_dir, context, cores)
    except StepFailure as failure:
        return _failed(properties, metrics, failure.reason, failure.failure_type, log_path)
    early_stopped = threading.Event()
    watching = _start_monitors(monitors, request, job_name, job, context)
    stopped_by: list[str] = []

    def on_line(line: str) -> None:
        context.progress.step_line(context.step_name, line, source)
        found = metrics.feed(line)
        if found:
            context.progress.step_metric(context.step_name, found, source)
            if on_metrics is not None:
                on_metrics(found)

    def stop_requested() -> bool:
        if context.stop_event.is_set():
            return True
        if should_stop is not None and should_stop():
            early_stopped.set()
            return True
        reason = next((text for text in (monitor.stop_reason() for monitor in watching) if text), None)
        if reason:
            stopped_by.append(reason)
            return True
        return False

    mark_executing()
    sync = CheckpointSync(job.checkpoint_dir, job.checkpoint_uri, context)
    sync.start()
    try:
        outcome = run_child(
            ChildSpec(
                argv=job.argv,
                cwd=job.cwd,
                environment=job.environment,
                log_path=log_path,
                timeout_seconds=runtime_limit(
                    request.get("StoppingCondition"),
                    context.settings.default_job_runtime_seconds,
                    context.settings.max_job_runtime_seconds,
                ),
                stop_grace_seconds=context.settings.stop_grace_seconds,
                on_line=on_line,
                should_stop=stop_requested,
                track_process=context.track_process,
                notes=job.notes,
            )
        )
    except StepFailure as failure:
        sync.stop()
        return _failed_after_start(watching, properties, metrics, failure, log_path)
    sync.stop()
    write_json_atomic(job_dir / "metrics.json", metrics.history)
    properties.update(
        TrainingEndTime=now(),
        TrainingTimeInSeconds=int(outcome.seconds),
        BillableTimeInSeconds=int(outcome.seconds),
        FinalMetricDataList=metrics.final_metric_data_list(),
    )
    # Like SageMaker, a job stopped by a rule's StopTraining action keeps what it had written.
    keep_artifacts = (
        outcome.succeeded or outcome.ended_by == "timeout" or early_stopped.is_set() or bool(stopped_by)
    )
    try:
        if keep_artifacts:
            _put_artifacts(request, job_name, job, context, properties)
        _put_debug_output(request, job_name, job, context)
    except StepFailure as failure:
        return _failed_after_start(watching, properties, metrics, failure, log_path)
    _evaluate_rules(request, job_dir, properties, context, rule_evaluator)
    metadata: dict[str, Any] = {}
    _finish_monitors(watching, properties, metadata, log_path)
    ended = _ending(
        request, job, outcome, properties, metrics, log_path, early_stopped.is_set(), stopped_by, context
    )
    ended.metadata.update(metadata)
    return ended


def _ending(
    request: dict,
    job: PreparedJob,
    outcome: ChildOutcome,
    properties: dict,
    metrics: MetricReader,
    log_path: Path,
    early_stopped: bool,
    stopped_by: list[str],
    context: StepContext,
) -> TrainingOutcome:
    """The job's status and reason, from how its process ended."""
    if outcome.succeeded:
        properties.update(TrainingJobStatus="Completed", SecondaryStatus="Completed")
        return TrainingOutcome(SUCCEEDED, properties, metrics)
    if stopped_by and outcome.ended_by == "stop" and not context.stop_event.is_set():
        properties.update(TrainingJobStatus="Stopped", SecondaryStatus="Stopped")
        return TrainingOutcome(STOPPED, properties, metrics, stopped_by[0])
    if early_stopped:
        properties.update(TrainingJobStatus="Stopped", SecondaryStatus="Stopped")
        return TrainingOutcome(
            STOPPED, properties, metrics, "stopped early by the tuner", extra={"early_stopped": True}
        )
    if outcome.ended_by == "stop":
        properties.update(TrainingJobStatus="Stopped", SecondaryStatus="Stopped")
        return TrainingOutcome(STOPPED, properties, metrics, "the job was stopped")
    if outcome.ended_by == "timeout":
        # What DescribeTrainingJob says of a job stopped at MaxRuntimeInSeconds (no FailureReason).
        # The step still fails: the pipeline cannot go on without the job's model, and a Stopped
        # step would read as stopped on purpose.
        properties.update(TrainingJobStatus="Stopped", SecondaryStatus="MaxRuntimeExceeded")
        properties.setdefault("TrainingEndTime", now())
        limit = (request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds", "the default")
        reason = (
            f"the job ran past StoppingCondition.MaxRuntimeInSeconds ({limit} s) and was stopped "
            "(TrainingJobStatus Stopped, SecondaryStatus MaxRuntimeExceeded)"
        )
        return TrainingOutcome(
            STOPPED,
            properties,
            metrics,
            f"{reason}\nlog: {log_path}",
            ALGORITHM_ERROR,
            extra={"max_runtime_exceeded": True},
        )
    if outcome.signal is not None:
        reason, failure_type = outcome.signal_failure()
        return _failed(properties, metrics, reason, failure_type, log_path)
    detail = _failure_file(job) or tail(log_path, 5) or "(no output)"
    return _failed(
        properties,
        metrics,
        f"AlgorithmError: {detail}, exit code: {outcome.exit_code}",
        ALGORITHM_ERROR,
        log_path,
    )


def _describe(request: dict, job_name: str, started: str) -> dict[str, Any]:
    properties = dict(request)
    properties.update(
        TrainingJobName=job_name,
        TrainingJobArn=f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{job_name}",
        TrainingJobStatus="InProgress",
        SecondaryStatus="Training",
        CreationTime=started,
        TrainingStartTime=started,
        HyperParameters={
            name: to_text(value) for name, value in (request.get("HyperParameters") or {}).items()
        },
    )
    return properties


def _failed_after_start(
    monitors: list[JobMonitor], properties: dict, metrics: MetricReader, failure: StepFailure, log_path: Path
) -> TrainingOutcome:
    """A job that ran and then could not be completed: its monitors' reports (profiler report,
    plots, Debugger rule statuses) are kept, as for any other failed job."""
    metadata: dict[str, Any] = {}
    _finish_monitors(monitors, properties, metadata, log_path)
    outcome = _failed(properties, metrics, failure.reason, failure.failure_type, log_path)
    outcome.metadata.update(metadata)
    return outcome


def _failed(
    properties: dict, metrics: MetricReader, reason: str, failure_type: str, log_path: Path
) -> TrainingOutcome:
    properties.update(TrainingJobStatus="Failed", SecondaryStatus="Failed", FailureReason=reason[:1024])
    properties.setdefault("TrainingEndTime", now())
    return TrainingOutcome(FAILED, properties, metrics, f"{reason}\nlog: {log_path}", failure_type)


# --- preparing the job folder -------------------------------------------------------------


@dataclass
class PreparedJob:
    root: Path
    argv: list[str]
    cwd: Path
    environment: dict[str, str]
    checkpoint_dir: Path
    checkpoint_uri: str | None
    tensors_dir: Path | None
    notes: list[str]


def _prepare(
    request: dict, job_name: str, job_dir: Path, context: StepContext, cores: int | None
) -> PreparedJob:
    root = container_root(job_dir)
    for folder in ("model", "output/data", "input/config", "input/data"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    hyperparameters = {name: to_text(value) for name, value in (request.get("HyperParameters") or {}).items()}
    channels = _fetch_channels(request, root, context)
    _write_config(request, root, channels, hyperparameters)
    checkpoint_dir, checkpoint_uri = _prepare_checkpoints(request, job_dir, context)
    tensors_dir = _write_debug_config(request, root, job_dir)
    argv, cwd, notes = _command(request, hyperparameters, root, job_dir, context)
    notes.insert(
        0,
        f"image {(request.get('AlgorithmSpecification') or {}).get('TrainingImage', '?')} is not pulled: "
        f"the job runs with {context.settings.python}",
    )
    environment = _environment(
        request, job_name, root, job_dir, channels, hyperparameters, cores or context.settings.cores
    )
    environment[CHECKPOINT_VARIABLE] = str(checkpoint_dir)
    if tensors_dir is not None:
        environment["SMDEBUG_CONFIG_FILE_PATH"] = str(root / "input" / "config" / "debughookconfig.json")
    return PreparedJob(root, argv, cwd, environment, checkpoint_dir, checkpoint_uri, tensors_dir, notes)


def _fetch_channels(request: dict, root: Path, context: StepContext) -> list[str]:
    channels = []
    for channel in request.get("InputDataConfig") or []:
        name = str(channel.get("ChannelName", ""))
        if not name or "/" in name or name.startswith("."):
            raise StepFailure(f"InputDataConfig: invalid ChannelName {name!r}")
        s3 = (channel.get("DataSource") or {}).get("S3DataSource")
        if not s3:
            raise StepFailure(f"channel {name!r}: only S3DataSource is supported locally")
        if s3.get("S3DataType", "S3Prefix") != "S3Prefix":
            raise StepFailure(f"channel {name!r}: only S3DataType S3Prefix is supported locally")
        try:
            context.store.get(str(s3["S3Uri"]), root / "input" / "data" / name)
        except StoreError as error:
            raise StepFailure(f"channel {name!r}: {error}") from None
        except OSError as error:
            raise StepFailure(f"channel {name!r}: copying failed: {error}", SERVICE_FAULT) from None
        channels.append(name)
    return channels


def _write_config(request: dict, root: Path, channels: list[str], hyperparameters: dict[str, str]) -> None:
    config = root / "input" / "config"
    write_json_atomic(config / "hyperparameters.json", hyperparameters)
    by_name = {channel.get("ChannelName"): channel for channel in request.get("InputDataConfig") or []}
    write_json_atomic(
        config / "inputdataconfig.json",
        {
            name: {
                "TrainingInputMode": by_name[name].get("InputMode") or "File",
                "S3DistributionType": "FullyReplicated",
                "RecordWrapperType": by_name[name].get("RecordWrapperType", "None"),
                **({"ContentType": by_name[name]["ContentType"]} if by_name[name].get("ContentType") else {}),
            }
            for name in channels
        },
    )
    write_json_atomic(config / "resourceconfig.json", resource_config(request))


def resource_config(request: dict) -> dict[str, Any]:
    instance_type = (request.get("ResourceConfig") or {}).get("InstanceType", "local")
    return {
        "current_host": HOST,
        "current_instance_type": instance_type,
        "current_group_name": "homogeneousCluster",
        "hosts": [HOST],
        "instance_groups": [
            {"instance_group_name": "homogeneousCluster", "instance_type": instance_type, "hosts": [HOST]}
        ],
        "network_interface_name": "eth0",
    }


def _prepare_checkpoints(request: dict, job_dir: Path, context: StepContext) -> tuple[Path, str | None]:
    config = request.get("CheckpointConfig") or {}
    local = remap(
        str(config.get("LocalPath") or DEFAULT_CHECKPOINT_PATH), job_dir, what="CheckpointConfig.LocalPath"
    )
    local.mkdir(parents=True, exist_ok=True)
    uri = config.get("S3Uri")
    if uri and context.store.list_prefix(str(uri).rstrip("/") + "/"):
        # Like SageMaker, a new job starts with the checkpoints an earlier one left in S3.
        context.store.get(str(uri).rstrip("/") + "/", local)
    return local, (str(uri) if uri else None)


def _write_debug_config(request: dict, root: Path, job_dir: Path) -> Path | None:
    hook = request.get("DebugHookConfig")
    if not hook:
        return None
    tensors = remap(
        str(hook.get("LocalPath") or DEFAULT_TENSORS_PATH), job_dir, what="DebugHookConfig.LocalPath"
    )
    tensors.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "input" / "config" / "debughookconfig.json", dict(hook, LocalPath=str(tensors)))
    return tensors


def _command(
    request: dict, hyperparameters: dict[str, str], root: Path, job_dir: Path, context: StepContext
) -> tuple[list[str], Path, list[str]]:
    spec = request.get("AlgorithmSpecification") or {}
    entrypoint = [str(part) for part in (spec.get("ContainerEntrypoint") or [])]
    container_arguments = [str(part) for part in (spec.get("ContainerArguments") or [])]
    python = context.settings.python
    if "sm_train.sh" in " ".join(entrypoint + container_arguments):
        return _model_trainer_command(root, hyperparameters, python)
    if "sagemaker_program" in hyperparameters:
        return _toolkit_command(root, hyperparameters, python, context)
    if entrypoint and is_python(entrypoint[0]):
        argv = [python, *(remap_argument(part, job_dir) for part in entrypoint[1:] + container_arguments)]
        return argv, root, []
    raise StepFailure(
        "the local runner runs script-mode training only: a ModelTrainer with source_code, a "
        "sagemaker_program hyperparameter, or a Python ContainerEntrypoint"
    )


def _model_trainer_command(
    root: Path, hyperparameters: dict[str, str], python: str
) -> tuple[list[str], Path, list[str]]:
    data = root / "input" / "data"
    source_file = data / "sm_drivers" / "sourcecode.json"
    if not source_file.is_file():
        raise StepFailure("the request runs sm_train.sh but channel 'sm_drivers' has no sourcecode.json")
    source = read_json(source_file)
    code = data / "code"
    if not code.is_dir():
        raise StepFailure("the request runs sm_train.sh but has no 'code' channel")
    notes = []
    if (code / "requirements.txt").is_file() or source.get("requirements"):
        notes.append("requirements are not installed locally: jobs use the project's virtual environment")
    distributed = data / "sm_drivers" / "distributed.json"
    if distributed.is_file() and read_json(distributed):
        notes.append("the distributed configuration is ignored locally: one process on one host")
    if source.get("command"):
        argv = shlex.split(str(source["command"]))
        if not argv or not is_python(argv[0]):
            raise StepFailure(f"SourceCode.command {source['command']!r}: only python commands run locally")
        return [python, *argv[1:]], code, notes
    entry = str(source.get("entry_script") or "")
    if not entry.endswith(".py") or not (code / entry).is_file():
        raise StepFailure(
            f"entry script {entry!r} (from sourcecode.json) is not a Python file in the code channel"
        )
    return [python, entry, *driver_arguments(hyperparameters)], code, notes


def _toolkit_command(
    root: Path, hyperparameters: dict[str, str], python: str, context: StepContext
) -> tuple[list[str], Path, list[str]]:
    program = str(decode_hyperparameter(hyperparameters["sagemaker_program"]))
    submit = str(decode_hyperparameter(hyperparameters.get("sagemaker_submit_directory", "")))
    code = root / "code"
    if not submit.startswith("s3://"):
        raise StepFailure(f"sagemaker_submit_directory {submit!r} must be an s3:// URI of a tar.gz bundle")
    bundle_dir = root / "input" / "submit"
    try:
        for bundle in context.store.get(submit, bundle_dir):
            extract_tarball(bundle, code)
    except StoreError as error:
        raise StepFailure(f"sagemaker_submit_directory: {error}") from None
    if not (code / program).is_file():
        raise StepFailure(f"sagemaker_program {program!r} is not in the bundle {submit}")
    notes = []
    if (code / "requirements.txt").is_file():
        notes.append("requirements.txt is not installed locally: jobs use the project's virtual environment")
    return [python, program, *toolkit_arguments(hyperparameters)], code, notes


def _environment(
    request: dict,
    job_name: str,
    root: Path,
    job_dir: Path,
    channels: list[str],
    hyperparameters: dict[str, str],
    cores: int,
) -> dict[str, str]:
    environment = base_environment(job_dir, request.get("Environment"))
    data = root / "input" / "data"
    resources = resource_config(request)
    environment.update(
        SM_MODEL_DIR=str(root / "model"),
        SM_INPUT_DIR=str(root / "input"),
        SM_INPUT_DATA_DIR=str(data),
        SM_INPUT_CONFIG_DIR=str(root / "input" / "config"),
        SM_OUTPUT_DIR=str(root / "output"),
        SM_OUTPUT_FAILURE=str(root / "output" / "failure"),
        SM_OUTPUT_DATA_DIR=str(root / "output" / "data"),
        SM_CHANNELS=json.dumps(sorted(channels)),
        SM_HOSTS=json.dumps([HOST]),
        SM_CURRENT_HOST=HOST,
        SM_CURRENT_INSTANCE_TYPE=str(resources["current_instance_type"]),
        SM_HOST_COUNT="1",
        SM_CURRENT_HOST_RANK="0",
        SM_NETWORK_INTERFACE_NAME="eth0",
        SM_NUM_CPUS=str(cores),
        SM_NUM_GPUS=str(gpu_count()),
        SM_RESOURCE_CONFIG=json.dumps(resources),
        TRAINING_JOB_NAME=job_name,
        TRAINING_JOB_ARN=f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{job_name}",
    )
    for name in channels:
        environment[f"SM_CHANNEL_{name.upper()}"] = str(data / name)
    environment.update(hyperparameter_environment(hyperparameters))
    if cores < (os.cpu_count() or cores):
        # Trials that share the machine each get their slice of it, as on separate instances.
        environment.setdefault("OMP_NUM_THREADS", str(cores))
    return environment


def gpu_count(devices: Path = Path("/dev")) -> int:
    """NVIDIA devices visible to jobs (the runner must not import torch to ask).

    Only /dev/nvidia<N> are GPUs; nvidiactl, nvidia-uvm, nvidia-modeset and nvidia-caps/ are the
    driver's control devices.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([item for item in visible.split(",") if item.strip() and item.strip() != "-1"])
    try:
        return len([name for name in os.listdir(devices) if re.fullmatch(r"nvidia[0-9]+", name)])
    except OSError:
        return 0


# --- after the job --------------------------------------------------------------------------


def _put_artifacts(
    request: dict, job_name: str, job: PreparedJob, context: StepContext, properties: dict
) -> None:
    output = request.get("OutputDataConfig") or {}
    base = str(output.get("S3OutputPath") or "").rstrip("/")
    if not base:
        raise StepFailure("OutputDataConfig.S3OutputPath is required")
    prefix = f"{base}/{job_name}/output"
    try:
        if str(output.get("CompressionType", "GZIP")).upper() == "NONE":
            context.store.put_tree(job.root / "model", f"{prefix}/model")
            properties["ModelArtifacts"] = {"S3ModelArtifacts": f"{prefix}/model/"}
        else:
            archive = job.root / "output" / "model.tar.gz"
            tar_folder(job.root / "model", archive)
            context.store.put_file(archive, f"{prefix}/model.tar.gz")
            properties["ModelArtifacts"] = {"S3ModelArtifacts": f"{prefix}/model.tar.gz"}
        if any(True for _ in walk_files(job.root / "output" / "data")):
            archive = job.root / "output" / "output.tar.gz"
            tar_folder(job.root / "output" / "data", archive)
            context.store.put_file(archive, f"{prefix}/output.tar.gz")
    except StoreError as error:
        raise StepFailure(f"uploading the model: {error}") from None
    except OSError as error:
        raise StepFailure(f"uploading the model: {error}", SERVICE_FAULT) from None


def _put_debug_output(request: dict, job_name: str, job: PreparedJob, context: StepContext) -> None:
    hook = request.get("DebugHookConfig") or {}
    if job.tensors_dir is None or not hook.get("S3OutputPath"):
        return
    target = f"{str(hook['S3OutputPath']).rstrip('/')}/{job_name}/debug-output"
    try:
        context.store.put_tree(job.tensors_dir, target)
    except (StoreError, OSError) as error:
        raise StepFailure(f"uploading Debugger tensors: {error}", SERVICE_FAULT) from None


def _evaluate_rules(
    request: dict, job_dir: Path, properties: dict, context: StepContext, rule_evaluator: RuleEvaluator | None
) -> None:
    if request.get("DebugRuleConfigurations"):
        if rule_evaluator is not None:
            properties["DebugRuleEvaluationStatuses"] = rule_evaluator(request, job_dir, properties, context)
        else:
            properties["DebugRuleEvaluationStatuses"] = _not_evaluated(request["DebugRuleConfigurations"])
    if request.get("ProfilerRuleConfigurations"):
        properties["ProfilerRuleEvaluationStatuses"] = _not_evaluated(request["ProfilerRuleConfigurations"])


def _not_evaluated(rules: list[dict]) -> list[dict]:
    stamp = now()
    return [
        {
            "RuleConfigurationName": rule.get("RuleConfigurationName"),
            "RuleEvaluationStatus": "Stopped",
            "StatusDetails": RULES_NOT_EVALUATED,
            "LastModifiedTime": stamp,
        }
        for rule in rules
    ]


def _start_monitors(
    factories: Sequence[MonitorFactory], request: dict, job_name: str, job: PreparedJob, context: StepContext
) -> list[JobMonitor]:
    started = []
    for factory in factories:
        try:
            monitor = factory(request, job_name, job, context)
        except Exception as error:  # what a monitor watches is extra: the job runs without it
            log_note(context.log_path, f"{getattr(factory, '__name__', factory)} could not start: {error!r}")
            continue
        if monitor is not None:
            started.append(monitor)
    return started


def _finish_monitors(monitors: list[JobMonitor], properties: dict, metadata: dict, log_path: Path) -> None:
    for monitor in monitors:
        try:
            monitor.finish(properties, metadata)
        except Exception as error:  # a report that cannot be written must not lose the trained model
            log_note(log_path, f"{type(monitor).__name__} could not finish: {error!r}")


def _failure_file(job: PreparedJob) -> str:
    try:
        return (job.root / "output" / "failure").read_text(encoding="utf-8", errors="replace").strip()[:1024]
    except OSError:
        return ""


class CheckpointSync:
    """Copies new or changed checkpoint files to CheckpointConfig.S3Uri while the job runs."""

    def __init__(self, folder: Path, uri: str | None, context: StepContext) -> None:
        self.folder = folder
        self.uri = uri.rstrip("/") if uri else None
        self.context = context
        self.seen: dict[str, tuple[int, int]] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        if self.uri:
            self.thread.start()

    def stop(self) -> None:
        if self.uri:
            self.done.set()
            self.thread.join(timeout=30)
            self.sync(final=True)

    def _loop(self) -> None:
        while not self.done.wait(CHECKPOINT_SYNC_SECONDS):
            self.sync()

    def sync(self, final: bool = False) -> None:
        for path in walk_files(self.folder):
            relative = path.relative_to(self.folder).as_posix()
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            signature = (stat.st_mtime_ns, stat.st_size)
            if self.seen.get(relative) == signature:
                continue
            if not final and time.time() - stat.st_mtime < 0.2:
                continue  # possibly still being written; the next pass takes it
            try:
                self.context.store.put_file(path, f"{self.uri}/{relative}")
                self.seen[relative] = signature
            except (OSError, StoreError):
                continue
