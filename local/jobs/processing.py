"""Processing steps as local jobs (CreateProcessingJob emulated in a job folder).

Inputs are copied from the store to their LocalPath (re-rooted), the command runs as a child
process, and on exit code 0 every output folder is put back at its S3Uri and the step's property
files are read. `/opt/ml/output/message` becomes the job's ExitMessage; a non-zero exit fails
the step with that message (or the end of the log) as its reason.

Commands the runner understands:
  * the SageMaker SDK's FrameworkProcessor wrapper, `/bin/bash .../runproc.sh <arguments>`: the
    script unpacks `sourcedir.tar.gz` in the code folder and runs `python <script> "$@"`; the
    runner does the same with this project's interpreter (requirements.txt is not installed:
    jobs use the project's virtual environment, with no network);
  * `python[3] <script> <arguments>` (ScriptProcessor and hand-written requests).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from local.files import extract_tarball, read_json, write_json_atomic
from local.handlers import (
    ALGORITHM_ERROR,
    CLIENT_ERROR,
    SERVICE_FAULT,
    STEP_ROLE_VARIABLE,
    StepContext,
    StepFailure,
    StepHandler,
    StepResult,
)
from local.jobs.container import (
    ChildOutcome,
    ChildSpec,
    base_environment,
    container_root,
    is_python,
    remap,
    remap_argument,
    run_child,
    runtime_limit,
    tail,
)
from local.state import ACCOUNT, REGION, now
from local.store import StoreError

SOURCE_BUNDLE = "sourcedir.tar.gz"
_RUNPROC_CD = re.compile(r"^\s*cd\s+(\S+?)/?\s*$", re.MULTILINE)
_RUNPROC_RUN = re.compile(r"^\s*(?:python3?|\$\{?\w+\}?)\s+(\S+)\s+\"\$@\"\s*$", re.MULTILINE)


class ProcessingHandler:
    def __init__(self, services: dict[str, StepHandler] | None = None) -> None:
        # KENNEL_STEP_ROLE value -> the handler that serves such a step instead of a job.
        self.services = services or {}

    def run(self, step: dict, arguments: dict, context: StepContext) -> StepResult:
        role = str((arguments.get("Environment") or {}).get(STEP_ROLE_VARIABLE, "")).lower()
        if role:
            if role not in self.services:
                return StepResult.failed(f"{STEP_ROLE_VARIABLE}={role}: no local service for this step role "
                                         f"(known: {', '.join(sorted(self.services)) or 'none'})", CLIENT_ERROR)
            return self.services[role].run(step, arguments, context)
        started = now()
        properties = describe(arguments, context, status="InProgress", started=started)
        _write_config(arguments, context)
        _fetch_inputs(arguments, context)
        command, cwd, notes = _command(arguments, context)
        context.mark_executing()
        outcome = run_child(
            ChildSpec(
                argv=command,
                cwd=cwd,
                environment=_environment(arguments, context),
                log_path=context.log_path,
                timeout_seconds=runtime_limit(
                    arguments.get("StoppingCondition"),
                    context.settings.default_job_runtime_seconds,
                    context.settings.max_job_runtime_seconds,
                ),
                stop_grace_seconds=context.settings.stop_grace_seconds,
                on_line=lambda line: context.progress.step_line(context.step_name, line),
                should_stop=context.stop_event.is_set,
                track_process=context.track_process,
                notes=notes,
            )
        )
        message = _exit_message(context)
        properties.update(ExitMessage=message, ProcessingEndTime=now())
        if not outcome.succeeded:
            return _failure(outcome, message, properties, arguments, context)
        _put_outputs(arguments, context)
        properties["ProcessingJobStatus"] = "Completed"
        properties["PropertyFiles"] = read_property_files(step, arguments, context)
        return StepResult.succeeded(properties)


def describe(arguments: dict, context: StepContext, *, status: str, started: str) -> dict[str, Any]:
    """DescribeProcessingJob as far as a definition can Get it: the request plus the job fields."""
    properties = dict(arguments)
    properties.update(
        ProcessingJobName=context.job_name,
        ProcessingJobArn=f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:processing-job/{context.job_name}",
        ProcessingJobStatus=status,
        CreationTime=started,
        ProcessingStartTime=started,
    )
    return properties


def _write_config(arguments: dict, context: StepContext) -> None:
    root = container_root(context.job_dir)
    request = dict(arguments, ProcessingJobName=context.job_name)
    write_json_atomic(root / "config" / "processingjobconfig.json", request)
    write_json_atomic(
        root / "config" / "resourceconfig.json", {"current_host": "algo-1", "hosts": ["algo-1"]}
    )
    (root / "output").mkdir(parents=True, exist_ok=True)


def _fetch_inputs(arguments: dict, context: StepContext) -> None:
    for item in arguments.get("ProcessingInputs") or []:
        name = item.get("InputName", "?")
        s3_input = item.get("S3Input")
        if not s3_input:
            raise StepFailure(f"ProcessingInput {name!r}: only S3Input is supported locally")
        if s3_input.get("S3DataType", "S3Prefix") != "S3Prefix":
            raise StepFailure(f"ProcessingInput {name!r}: only S3DataType S3Prefix is supported locally")
        local = remap(
            str(s3_input.get("LocalPath", "")), context.job_dir, what=f"ProcessingInput {name!r} LocalPath"
        )
        try:
            context.store.get(str(s3_input["S3Uri"]), local)
        except StoreError as error:
            raise StepFailure(f"ProcessingInput {name!r}: {error}") from None
        except OSError as error:
            raise StepFailure(f"ProcessingInput {name!r}: copying failed: {error}", SERVICE_FAULT) from None
    for item in (arguments.get("ProcessingOutputConfig") or {}).get("Outputs") or []:
        s3_output = item.get("S3Output") or {}
        if s3_output.get("LocalPath"):
            remap(str(s3_output["LocalPath"]), context.job_dir, what="ProcessingOutput LocalPath").mkdir(
                parents=True, exist_ok=True
            )


def _command(arguments: dict, context: StepContext) -> tuple[list[str], Path, list[str]]:
    """The argv to run, its working folder and notes for the log."""
    app = arguments.get("AppSpecification") or {}
    entrypoint = [str(part) for part in app.get("ContainerEntrypoint") or []]
    container_arguments = [
        remap_argument(str(part), context.job_dir) for part in app.get("ContainerArguments") or []
    ]
    notes = [f"image {app.get('ImageUri', '?')} is not pulled: the job runs with {context.settings.python}"]
    if len(entrypoint) >= 2 and Path(entrypoint[0]).name in ("bash", "sh") and entrypoint[1].endswith(".sh"):
        script, cwd, more = _runproc(
            remap(entrypoint[1], context.job_dir, what="ContainerEntrypoint"), context
        )
        return [context.settings.python, script, *entrypoint[2:], *container_arguments], cwd, notes + more
    if entrypoint and is_python(entrypoint[0]):
        rest = [remap_argument(part, context.job_dir) for part in entrypoint[1:]]
        return [context.settings.python, *rest, *container_arguments], container_root(context.job_dir), notes
    raise StepFailure(
        f"ContainerEntrypoint {entrypoint or '(image default)'} is not runnable locally: the local runner "
        "runs Python scripts (FrameworkProcessor's runproc.sh, or python <script>)"
    )


def _runproc(path: Path, context: StepContext) -> tuple[str, Path, list[str]]:
    """Understand the SDK's generated runproc.sh: where it cds, what it unpacks, what it runs."""
    if not path.is_file():
        raise StepFailure(f"entrypoint script {path.name} was not among the job's inputs")
    text = path.read_text(encoding="utf-8", errors="replace")
    cd, run = _RUNPROC_CD.search(text), _RUNPROC_RUN.search(text)
    if not cd or not run:
        raise StepFailure(
            f"{path.name} is not the SageMaker SDK's runproc.sh "
            "(no 'cd <dir>' and 'python <script> \"$@\"' lines); "
            "the local runner cannot run arbitrary shell scripts"
        )
    code_dir = remap(cd.group(1), context.job_dir, what=f"{path.name} working folder")
    notes = []
    bundle = code_dir / SOURCE_BUNDLE
    if bundle.is_file():
        extract_tarball(bundle, code_dir)
    if (code_dir / "requirements.txt").is_file():
        notes.append("requirements.txt is not installed locally: jobs use the project's virtual environment")
    script = shlex.split(run.group(1))[0]
    if not (code_dir / script).is_file():
        raise StepFailure(f"{path.name} runs {script}, which is not in the code bundle ({code_dir})")
    return script, code_dir, notes


def _environment(arguments: dict, context: StepContext) -> dict[str, str]:
    environment = base_environment(context.job_dir, arguments.get("Environment"))
    environment["PROCESSING_JOB_NAME"] = context.job_name
    return environment


def _exit_message(context: StepContext) -> str:
    path = container_root(context.job_dir) / "output" / "message"
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()[:1024]
    except OSError:
        return ""


def _failure(
    outcome: ChildOutcome, message: str, properties: dict, arguments: dict, context: StepContext
) -> StepResult:
    properties["ProcessingJobStatus"] = "Stopped" if outcome.ended_by else "Failed"
    if outcome.ended_by == "stop":
        return StepResult.stopped("the job was stopped", properties)
    if outcome.ended_by == "timeout":
        limit = (arguments.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds", "the default")
        reason = f"the job ran past StoppingCondition.MaxRuntimeInSeconds ({limit} s) and was stopped"
        properties["FailureReason"] = reason
        return StepResult.failed(f"{reason}; log: {context.log_path}", ALGORITHM_ERROR, properties)
    if outcome.signal is not None:
        reason, failure_type = outcome.signal_failure()
        properties["FailureReason"] = reason
        return StepResult.failed(f"{reason}; log: {context.log_path}", failure_type, properties)
    detail = message or tail(context.log_path, 5) or "(no output)"
    reason = f"AlgorithmError: exit code {outcome.exit_code}: {detail}"
    properties["FailureReason"] = reason[:1024]
    return StepResult.failed(f"{reason}\nlog: {context.log_path}", ALGORITHM_ERROR, properties)


def _put_outputs(arguments: dict, context: StepContext) -> None:
    for item in (arguments.get("ProcessingOutputConfig") or {}).get("Outputs") or []:
        name = item.get("OutputName", "?")
        s3_output = item.get("S3Output")
        if not s3_output:
            raise StepFailure(f"ProcessingOutput {name!r}: only S3Output is supported locally")
        local = remap(
            str(s3_output["LocalPath"]), context.job_dir, what=f"ProcessingOutput {name!r} LocalPath"
        )
        try:
            context.store.put_tree(local, str(s3_output["S3Uri"]))
        except StoreError as error:
            raise StepFailure(f"ProcessingOutput {name!r}: {error}") from None
        except OSError as error:
            raise StepFailure(f"ProcessingOutput {name!r}: upload failed: {error}", SERVICE_FAULT) from None


def read_property_files(step: dict, arguments: dict, context: StepContext) -> dict[str, Any]:
    """The step's PropertyFiles, parsed from the outputs now in the store (JsonGet reads these)."""
    outputs = {
        item.get("OutputName"): item.get("S3Output") or {}
        for item in (arguments.get("ProcessingOutputConfig") or {}).get("Outputs") or []
    }
    files = {}
    for declared in step.get("PropertyFiles") or []:
        name, output, file_path = (
            declared.get("PropertyFileName"),
            declared.get("OutputName"),
            declared.get("FilePath"),
        )
        if output not in outputs:
            raise StepFailure(f"PropertyFile {name!r} names output {output!r}, which the step does not have")
        uri = str(outputs[output]["S3Uri"]).rstrip("/") + "/" + str(file_path).lstrip("/")
        path = context.store.path_for(uri)
        try:
            files[name] = read_json(path)
        except FileNotFoundError:
            raise StepFailure(
                f"PropertyFile {name!r}: the job did not write {file_path} in output {output!r}"
            ) from None
        except ValueError as error:
            raise StepFailure(f"PropertyFile {name!r}: {file_path} is not valid JSON: {error}") from None
    return files
