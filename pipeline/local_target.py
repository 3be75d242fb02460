"""The local target: the `kennel` commands on this machine, through the runtime in `local/`.

`upsert` builds the very definition `--target aws` would upsert (offline, under moto), puts the
code bundles the SDK uploaded into the local object store and keeps the definition under the
state folder; `run` executes that stored definition, so a run uses the code as it was at upsert,
as on SageMaker. Everything lives under the state folder (`.kennel/`, or $KENNEL_HOME).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from local.files import PARTIAL_MARKER, read_json, write_json_atomic
from local.home import resolve_home, store_root
from local.progress import make_progress, step_details
from local.runner import USER_ERRORS, RunOptions, resume, run_pipeline
from local.state import SUCCEEDED, Execution, StateError, list_executions, load_execution
from local.store import ObjectStore, import_objects
from pipeline.config import REPO_ROOT, KennelConfig
from pipeline.errors import KennelError
from pipeline.targets import (
    UPLOADS_FOLDER,
    Endpoint,
    ExecutionStatus,
    ModelPackage,
    StepStatus,
    UpsertResult,
    dataset_files,
    dataset_name,
    model_package,
)

log = logging.getLogger("kennel")

SAMPLE_DATA = REPO_ROOT / "data" / "sample"
SAMPLE_FOLDER = "sample"  # the bundled sample's prefix under the configured data URI
LAUNCH_TIMEOUT_SECONDS = 60  # how long `kennel run` (no --wait) waits for the runner to record the execution


def create_target(config: KennelConfig) -> LocalTarget:
    return LocalTarget(config)


class LocalTarget:
    name = "local"

    def __init__(self, config: KennelConfig, home: Path | None = None) -> None:
        self.config = config
        self.home = resolve_home(home)
        self.store = ObjectStore(store_root(self.home))

    # --- the pipeline ----------------------------------------------------------------------
    @property
    def pipeline_folder(self) -> Path:
        return self.home / "pipelines" / self.config.pipeline_name

    def upsert(self) -> UpsertResult:
        from pipeline.definition import build_offline

        created = not (self.pipeline_folder / "definition.json").exists()
        with contextlib.redirect_stdout(sys.stderr):  # the SDK narrates its build on stdout
            build = build_offline(self.config, "local")
        import_objects(self.home, build.objects)
        self.pipeline_folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.pipeline_folder / "deploy-definition.json", build.deploy_definition)
        write_json_atomic(self.pipeline_folder / "definition.json", build.definition)
        return UpsertResult(
            pipeline_name=self.config.pipeline_name,
            pipeline_arn=f"local:{self.pipeline_folder}",
            created=created,
            messages=[f"stored the definition and {len(build.objects)} code objects under {self.home}"],
        )

    def definition(self) -> dict[str, Any]:
        """The upserted definition; upserts first when there is none yet."""
        path = self.pipeline_folder / "definition.json"
        if not path.exists():
            log.info("no local pipeline %s yet: upserting it first", self.config.pipeline_name)
            self.upsert()
        return read_json(path)

    # --- data --------------------------------------------------------------------------------
    # The bundled sample and each --data folder get prefixes of their own, so neither is ever read
    # as part of the other (an upload under the sample's prefix would become a "class"). What older
    # versions left directly under <data_uri>/ is not read any more: the sample is staged afresh.
    def stage_data(self, data: str) -> str:
        """An s3:// URI of the local store as is; a folder copied into the store by content, to
        s3://<bucket>/<prefix>/uploads/<name>-<hash>."""
        if data.startswith("s3://"):
            if not self.store.list_prefix(data.rstrip("/") + "/"):
                raise KennelError(f"--data {data}: nothing stored there in {self.home}; give a local folder")
            return data
        folder = Path(data).expanduser()
        if not folder.is_dir():
            raise KennelError(f"--data {data}: not a folder; give an ImageFolder tree "
                              "(train/valid/test/<class>/ or <class>/ folders)")
        files = dataset_files(folder)
        if not files:
            raise KennelError(f"--data {data}: the folder holds no files")
        uri = f"s3://{self.config.bucket}/{self.config.prefix}/{UPLOADS_FOLDER}/{dataset_name(folder, files)}"
        if self._put_once(folder, files, uri):
            log.info("staged %s as %s", folder, uri)
        return uri

    def _default_data(self) -> str:
        """InputDataUri when the run names none: the configured input_data_uri as is, otherwise the
        bundled sample, staged the first time."""
        if self.config.input_data_uri:
            uri = self.config.input_data_uri
            if not self.store.list_prefix(uri.rstrip("/") + "/"):
                raise KennelError(f"input_data_uri {uri}: nothing stored there in {self.home}; run with "
                                  "--data FOLDER, or unset input_data_uri to run on the bundled sample")
            return uri
        uri = f"{self.config.data_uri}/{SAMPLE_FOLDER}"
        if self._put_once(SAMPLE_DATA, dataset_files(SAMPLE_DATA), uri):
            log.info("staged the bundled sample (%s) as %s", SAMPLE_DATA, uri)
        return uri

    def _put_once(self, folder: Path, files: list[Path], uri: str) -> bool:
        """Copy `files` of `folder` under `uri` unless something is there already; True if copied.

        The copy is made in a hidden sibling folder that store listings skip, then renamed into
        place, so a run killed while staging never leaves half a dataset that later runs would take
        for the whole one.
        """
        if self.store.list_prefix(uri + "/"):
            return False
        final = self.store.path_for(uri)
        staging = final.with_name(f".{final.name}{PARTIAL_MARKER}{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for path in files:
                target = staging / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            # Whatever is at `final` holds no object (the listing was empty): partial files at most.
            shutil.rmtree(final, ignore_errors=True)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True

    # --- executions --------------------------------------------------------------------------
    def start(self, parameters: Mapping[str, str], wait: bool) -> ExecutionStatus:
        definition = self.definition()
        parameters = dict(parameters)
        parameters.setdefault("InputDataUri", self._default_data())
        if not wait:
            return self._start_in_background(parameters)
        progress = make_progress(sys.stdout)
        with local_errors():
            execution = run_pipeline(definition, parameters, self.home, pipeline_name=self.config.pipeline_name,
                                     options=RunOptions(), progress=progress)
        return dataclasses.replace(self.to_status(execution), steps_shown=True)

    def resume(self, execution_id: str) -> ExecutionStatus:
        with local_errors():
            execution = resume(execution_id, self.home, progress=make_progress(sys.stdout))
        return dataclasses.replace(self.to_status(execution), steps_shown=True)

    def _start_in_background(self, parameters: Mapping[str, str]) -> ExecutionStatus:
        """A detached `python -m local run` on the stored definition; returns once it is recorded."""
        logs = self.home / "runner-logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
        command = [sys.executable, "-m", "local", "--home", str(self.home), "run",
                   str(self.pipeline_folder / "definition.json"), "--pipeline-name", self.config.pipeline_name,
                   *[arg for name, value in parameters.items() for arg in ("--param", f"{name}={value}")]]
        with open(log_path, "ab") as output:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                     cwd=REPO_ROOT, start_new_session=True)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            for execution in list_executions(self.home):
                if execution.runner and execution.runner.pid == child.pid:
                    status = self.to_status(execution)
                    status.notes.append(f"running in the background (pid {child.pid}, log {log_path}); "
                                        f"follow it with `kennel status {execution.execution_id}`")
                    return status
            if child.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise KennelError(f"the local runner stopped before starting the execution: {tail[0]}")
            time.sleep(0.2)
        raise KennelError(f"the local runner (pid {child.pid}) did not record an execution within "
                          f"{LAUNCH_TIMEOUT_SECONDS}s; see {log_path}")

    def status(self, execution: str | None) -> ExecutionStatus:
        if execution is None:
            executions = self._executions()
            if not executions:
                raise KennelError(f"no local executions in {self.home} yet; start one with `kennel run`")
            return self.to_status(executions[0])
        with local_errors():
            return self.to_status(load_execution(self.home, execution.rsplit("/", 1)[-1]))

    def executions(self) -> list[ExecutionStatus]:
        return [self.to_status(execution, with_steps=False) for execution in self._executions()]

    def _executions(self) -> list[Execution]:
        return [e for e in list_executions(self.home) if e.pipeline_name == self.config.pipeline_name]

    def to_status(self, execution: Execution, with_steps: bool = True) -> ExecutionStatus:
        steps = [
            StepStatus(
                name=record.name, status=record.status, started=record.start_time or "",
                ended=record.end_time or "", failure_reason=record.failure_reason or "",
                log_path=record.log_path or "", cached=bool(record.cache_hit), details=step_details(record),
            )
            for record in execution.ordered_steps()
        ] if with_steps else []
        status = ExecutionStatus(
            execution_arn=execution.arn, pipeline_name=execution.pipeline_name, status=execution.status,
            started=execution.creation_time, failure_reason=execution.failure_reason or "",
            parameters={name: str(value) for name, value in execution.parameters.items()}, steps=steps,
        )
        if with_steps:
            status.notes.extend(self._next_steps(execution))
        return status

    def _next_steps(self, execution: Execution) -> list[str]:
        notes = [f"skipped (branch not taken): {name}" for name in execution.skipped_steps]
        if execution.interrupted:
            notes.append("the runner stopped without recording an end (killed?)")
        for step, pids in execution.orphan_jobs.items():
            notes.append(f"{step}: its job is still running with no runner (pids {', '.join(map(str, pids))}); "
                         f"`kennel run --resume {execution.execution_id}` stops it and runs the step again")
        evaluate = execution.steps.get("Evaluate")
        if evaluate and evaluate.status == SUCCEEDED:
            outputs = evaluate.properties.get("ProcessingOutputConfig", {}).get("Outputs", [])
            uri = next((o["S3Output"]["S3Uri"] for o in outputs if o.get("OutputName") == "evaluation"), None)
            if uri:
                notes.append(f"evaluation: {self.store.path_for(uri.rstrip('/') + '/evaluation.json')}")
        if execution.status == SUCCEEDED:
            notes.append("next: `kennel models` to see the registered package, `kennel approve --latest` "
                         "to approve and deploy it")
        elif execution.status in ("Failed", "Stopped") and not any(
                record.type == "Fail" for record in execution.steps.values()):
            notes.append(f"resume with: kennel run --resume {execution.execution_id}")
        return notes

    # --- registry and endpoints ----------------------------------------------------------------
    def models(self) -> list[ModelPackage]:
        from local.registry import LocalRegistry

        registry = LocalRegistry(self.home)
        group = self.config.model_package_group
        if not any(g["ModelPackageGroupName"] == group for g in registry.list_model_package_groups()):
            return []
        packages = registry.list_model_packages(group)
        return sorted((_package(registry, p) for p in packages), key=lambda p: p.version, reverse=True)

    def approve(self, version: int | None, reason: str | None) -> ModelPackage:
        from local import deployment

        with local_errors():
            result = deployment.approve(self.home, self.config.model_package_group, version or "latest",
                                        reason or "", endpoint_name=self.config.endpoint_name)
        return self._decided(result)

    def reject(self, version: int | None, reason: str | None) -> ModelPackage:
        from local import deployment

        with local_errors():
            result = deployment.reject(self.home, self.config.model_package_group, version or "latest",
                                       reason or "")
        return self._decided(result)

    def _decided(self, result: Any) -> ModelPackage:
        from local.registry import LocalRegistry

        registry = LocalRegistry(self.home)
        package = _package(registry, registry.describe_model_package(result.model_package_arn))
        # The CLI states the new status itself; the message adds what it did to the endpoint.
        lines = [f"(it was already {result.status})"] if result.previous_status == result.status else []
        lines += [deployment.message for deployment in result.deployments]
        return dataclasses.replace(package, message="\n".join(lines))

    def endpoints(self) -> list[Endpoint]:
        from local.endpoints import list_endpoints

        return [_endpoint(endpoint) for endpoint in list_endpoints(self.home)]

    def stop_endpoint(self, name: str) -> Endpoint:
        from local.endpoints import stop

        with local_errors():
            return _endpoint(stop(self.home, name))

    def predict(self, body: bytes, content_type: str, endpoint: str) -> dict[str, Any]:
        from local.endpoints import describe_endpoint, invoke_endpoint

        with local_errors():
            described = describe_endpoint(self.home, endpoint)
            if not described.in_service:
                raise KennelError(f"endpoint {endpoint} is {described.status}, not InService; approve a model "
                                  f"(kennel approve --latest) or see `kennel endpoints`")
            answer = invoke_endpoint(self.home, endpoint, body, content_type)
        if answer.status != 200:
            raise KennelError(f"endpoint {endpoint} answered {answer.status}: {answer.body.decode(errors='replace')}")
        return answer.json()


def _package(registry: Any, described: Mapping[str, Any]) -> ModelPackage:
    """The registry's package with its evaluation (kept by the registry) and status history."""
    history = [
        {"from_status": change.from_status, "to_status": change.to_status, "reason": change.reason,
         "time": change.time.isoformat(timespec="seconds")}
        for change in registry.history(described["ModelPackageArn"])
    ]
    return model_package(described, described.get("Evaluation"), history)


def _endpoint(endpoint: Any) -> Endpoint:
    detail = endpoint.failure_reason or f"log {endpoint.log_path}"
    return Endpoint(name=endpoint.name, status=endpoint.status, url=endpoint.url or "",
                    model_package_arn=endpoint.model_package_arn or "",
                    model_package_version=endpoint.model_package_version, detail=detail)


@contextlib.contextmanager
def local_errors():
    """The runtime's user errors as KennelError: one line, no traceback."""
    try:
        yield
    except (*USER_ERRORS, StateError) as error:
        raise KennelError(str(error)) from None
    except Exception as error:
        from local import deployment

        if isinstance(error, deployment.USER_ERRORS):
            raise KennelError(str(error)) from None
        raise
