"""Local real-time endpoints: records in the state folder, and starting, updating and stopping the
server process (`python -m local.serving`) that serves a model package.

Layout under `<home>/endpoints/<name>/`:

    endpoint.json   written here (the parent): status, the model package it should serve, the
                    server process, URL, log path, failure reason, times
    server.json     written by the server: its port, the package it has loaded, the outcome of the
                    last reload (see local/serving.py)
    log.txt         the server's output, appended across restarts
    models/<dir>/   the unpacked model.tar.gz of the package being served
    .lock           held while an endpoint is created, updated or stopped

Statuses are SageMaker's: Creating, Updating, InService, Failed, OutOfService. A record saying
InService whose server process is gone is reported as Failed (the process died) without being
rewritten: reading never changes state.

Updating swaps the model without a restart: the new package is unpacked, endpoint.json gets the new
desired model, and the server gets SIGHUP; it loads the new model while the old one keeps answering,
then switches. An update that fails to load leaves the old model serving (InService, with the
failure reason), as a failed SageMaker UpdateEndpoint rolls back.

This module does not import torch: only the server process does.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from entrypoints.contract import MAX_PAYLOAD_BYTES
from local.files import PARTIAL_MARKER, extract_tarball, read_json, write_json_atomic
from local.home import store_root
from local.state import ProcessRef, now
from local.store import ObjectStore, StoreError

CREATING, UPDATING, IN_SERVICE, FAILED, OUT_OF_SERVICE = (
    "Creating",
    "Updating",
    "InService",
    "Failed",
    "OutOfService",
)
LIVE_STATUSES = (CREATING, UPDATING, IN_SERVICE)

ENDPOINTS_DIR = "endpoints"
RECORD_FILE = "endpoint.json"
SERVER_FILE = "server.json"
LOG_FILE = "log.txt"
LOCK_FILE = ".lock"
MODELS_DIR = "models"

DEFAULT_HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0  # importing torch and loading a model on a busy 2-core laptop
UPDATE_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
LOCK_TIMEOUT_S = 600.0  # longer than a start: the holder may be loading a model
LOG_TAIL_LINES = 20

# Server states written to server.json by local/serving.py.
SERVER_LOADING, SERVER_READY, SERVER_FAILED, SERVER_STOPPED = "Loading", "InService", "Failed", "Stopped"

_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's endpoint-name rule
_REPO_ROOT = Path(__file__).resolve().parents[1]
_held_locks = threading.local()
# Popen objects of servers this process started, kept so that Python does not warn about
# (or lose track of) a child that outlives the call that started it.
_children: dict[int, subprocess.Popen] = {}


class EndpointError(Exception):
    """An endpoint operation that cannot be done; the message names the endpoint and the fix."""


class EndpointBusy(EndpointError):
    """Another process held the endpoint's lock too long: unlike other EndpointErrors, trying
    again later may succeed."""


@dataclass(frozen=True)
class ModelRef:
    """A model package as an endpoint serves it: which package, and where it is unpacked."""

    arn: str
    version: int
    model_dir: str

    def to_json(self) -> dict[str, Any]:
        return {"ModelPackageArn": self.arn, "ModelPackageVersion": self.version, "ModelDir": self.model_dir}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ModelRef | None:
        if not data or not data.get("ModelPackageArn"):
            return None
        return cls(str(data["ModelPackageArn"]), int(data["ModelPackageVersion"]), str(data["ModelDir"]))


@dataclass(frozen=True)
class Endpoint:
    """What `kennel endpoints` shows about one endpoint (DescribeEndpoint's words where they exist)."""

    name: str
    status: str
    url: str | None
    pid: int | None
    model_package_arn: str | None
    model_package_version: int | None
    log_path: str
    failure_reason: str | None
    creation_time: str | None
    last_modified_time: str | None

    @property
    def in_service(self) -> bool:
        return self.status == IN_SERVICE

    def to_json(self) -> dict[str, Any]:
        return {
            "EndpointName": self.name,
            "EndpointStatus": self.status,
            "Url": self.url,
            "ModelPackageArn": self.model_package_arn,
            "ModelPackageVersion": self.model_package_version,
            "Pid": self.pid,
            "LogPath": self.log_path,
            "FailureReason": self.failure_reason,
            "CreationTime": self.creation_time,
            "LastModifiedTime": self.last_modified_time,
        }


@dataclass(frozen=True)
class Deployed:
    """The outcome of `start_or_update`: action is created, updated or up-to-date."""

    action: str
    endpoint: Endpoint


# --- paths and records ------------------------------------------------------------------------


def endpoints_root(home: Path) -> Path:
    return Path(home) / ENDPOINTS_DIR


def endpoint_dir(home: Path, name: str) -> Path:
    check_endpoint_name(name)
    return endpoints_root(home) / name


def check_endpoint_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise EndpointError(
            f"endpoint name {name!r} is not valid: use 1-63 letters, digits and hyphens, starting with a "
            f"letter or digit (SageMaker's rule)"
        )


def read_record(folder: Path) -> dict[str, Any] | None:
    return _read_optional(folder / RECORD_FILE)


def read_server_state(folder: Path) -> dict[str, Any] | None:
    return _read_optional(folder / SERVER_FILE)


def desired_model(folder: Path) -> ModelRef | None:
    """The model the endpoint's record says to serve (what the server loads on start and SIGHUP)."""
    record = read_record(folder) or {}
    return ModelRef.from_json(record.get("DesiredModel"))


def reload_request_id(folder: Path) -> str | None:
    return (read_record(folder) or {}).get("ReloadRequestId")


def recorded_pid(folder: Path) -> int | None:
    """The server pid the record names (a new server waits until the record names it, so that it
    never loads the model of a record its parent has not finished writing)."""
    process = (read_record(folder) or {}).get("Process") or {}
    return process.get("Pid")


def _read_optional(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise EndpointError(
            f"{path} cannot be read ({error}); stop the endpoint and start it again"
        ) from None
    return data if isinstance(data, dict) else None


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    record["LastModifiedTime"] = now()
    write_json_atomic(folder / RECORD_FILE, record)


# --- reading --------------------------------------------------------------------------------


def describe_endpoint(home: Path, name: str) -> Endpoint:
    folder = endpoint_dir(home, name)
    record = read_record(folder)
    if record is None:
        raise EndpointError(
            f"no local endpoint named {name!r} in {endpoints_root(home)}; `kennel endpoints` lists them"
        )
    return _view(folder, record)


def list_endpoints(home: Path) -> list[Endpoint]:
    root = endpoints_root(home)
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        record = read_record(folder) if folder.is_dir() else None
        if record is not None:
            found.append(_view(folder, record))
    return found


def _view(folder: Path, record: dict[str, Any]) -> Endpoint:
    """The record as it stands, with a live status whose process is gone reported as Failed."""
    status = record.get("EndpointStatus", FAILED)
    reason = record.get("FailureReason")
    process = _process(record)
    serving = ModelRef.from_json(record.get("DesiredModel"))
    if status in LIVE_STATUSES:
        if process is None or not process.alive():
            pid = process.pid if process else None
            status = FAILED
            reason = (
                f"the endpoint's server process (pid {pid}) is not running; its log: {folder / LOG_FILE}; "
                f"start it again with `kennel approve` or the Deploy step"
            )
        else:
            loaded = ModelRef.from_json((read_server_state(folder) or {}).get("Serving"))
            serving = loaded or serving
    url = record.get("Url") if status in LIVE_STATUSES else None
    return Endpoint(
        name=record.get("EndpointName", folder.name),
        status=status,
        url=url,
        pid=process.pid if process and status in LIVE_STATUSES else None,
        model_package_arn=serving.arn if serving else None,
        model_package_version=serving.version if serving else None,
        log_path=str(folder / LOG_FILE),
        failure_reason=reason,
        creation_time=record.get("CreationTime"),
        last_modified_time=record.get("LastModifiedTime"),
    )


def _process(record: dict[str, Any]) -> ProcessRef | None:
    data = record.get("Process")
    return ProcessRef.from_json(data) if data else None


# --- locking ----------------------------------------------------------------------------------


@contextmanager
def endpoint_lock(home: Path, name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the endpoint's lock (re-entrant within a thread), so that two processes never create,
    update or stop the same endpoint at once; deployment holds it across its decision too."""
    folder = endpoint_dir(home, name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    held: dict[str, int] = _held_locks.__dict__.setdefault("depth", {})
    key = str(path)
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise EndpointBusy(
                        f"endpoint {name!r} is being changed by another kennel process (lock {path} held for "
                        f"over {timeout:.0f}s); wait for it, or stop that process"
                    ) from None
                time.sleep(0.05)
        held[key] = 1
        try:
            yield
        finally:
            held.pop(key, None)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --- start, update, stop ----------------------------------------------------------------------


def start_or_update(
    home: Path,
    name: str,
    package: Mapping[str, Any],
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    timeout: float = START_TIMEOUT_S,
) -> Deployed:
    """Serve `package` (a DescribeModelPackage answer from the registry) on endpoint `name`.

    Creates the endpoint (a background server, detached from the caller) when none is running,
    swaps the model in a running one, and does nothing when it already serves that package.
    Returns once the endpoint answers with the package, or raises EndpointError with the log tail.
    host, port (0: any free one) and max_payload_bytes apply when a server starts; a swap keeps
    those of the running server.
    """
    home = Path(home)
    arn, version, model_data_url = _package_fields(package)
    with endpoint_lock(home, name):
        folder = endpoint_dir(home, name)
        record = read_record(folder)
        current = _view(folder, record) if record else None
        if current is not None and current.in_service and current.model_package_arn == arn:
            return Deployed("up-to-date", current)
        model_dir = _unpack(home, folder, name, model_data_url, version)
        target = ModelRef(arn, version, str(model_dir))
        try:
            if record is not None and current is not None and current.in_service and _server_ready(folder):
                endpoint = _update(folder, record, target, timeout)
                action = "updated"
            else:
                listen = (host, port, max_payload_bytes)
                endpoint = _create(home, folder, record, target, listen, timeout)
                action = "created"
        except BaseException:
            shutil.rmtree(model_dir, ignore_errors=True)
            raise
        _remove_other_models(folder, model_dir)
        return Deployed(action, endpoint)


def stop(home: Path, name: str, timeout: float = STOP_TIMEOUT_S) -> Endpoint:
    """Stop the endpoint's server (SIGTERM: requests in flight finish; SIGKILL after `timeout`).
    The record stays, OutOfService, with the package it served last."""
    home = Path(home)
    with endpoint_lock(home, name):
        folder = endpoint_dir(home, name)
        record = read_record(folder)
        if record is None:
            raise EndpointError(
                f"no local endpoint named {name!r} in {endpoints_root(home)}; `kennel endpoints` lists them"
            )
        process = _process(record)
        if process is not None:
            _terminate(process, timeout)
        record.update(EndpointStatus=OUT_OF_SERVICE, Process=None, Url=None, FailureReason=None)
        _write_record(folder, record)
        shutil.rmtree(folder / MODELS_DIR, ignore_errors=True)
        return _view(folder, record)


def _create(
    home: Path,
    folder: Path,
    record: dict[str, Any] | None,
    target: ModelRef,
    listen: tuple[str, int, int],
    timeout: float,
) -> Endpoint:
    old = _process(record) if record else None
    if old is not None:
        _terminate(old, STOP_TIMEOUT_S)  # a server that is up but not healthy: replace it
    (folder / SERVER_FILE).unlink(missing_ok=True)
    record = {
        "EndpointName": folder.name,
        "CreationTime": (record or {}).get("CreationTime") or now(),
        "DesiredModel": target.to_json(),
        "ReloadRequestId": None,
        "LogPath": str(folder / LOG_FILE),
        "FailureReason": None,
    }
    process = _spawn(home, folder, *listen)
    record.update(EndpointStatus=CREATING, Process=process.to_json(), Url=None)
    _write_record(folder, record)
    try:
        url = _wait_until_serving(folder, process, target, timeout)
    except EndpointError as error:
        _terminate(process, STOP_TIMEOUT_S)
        record.update(EndpointStatus=FAILED, Process=None, FailureReason=str(error))
        _write_record(folder, record)
        raise
    record.update(EndpointStatus=IN_SERVICE, Url=url)
    _write_record(folder, record)
    return _view(folder, record)


def _update(folder: Path, record: dict[str, Any], target: ModelRef, timeout: float) -> Endpoint:
    process = _process(record)
    assert process is not None  # the caller checked that the endpoint is InService
    previous = record.get("DesiredModel")
    request_id = uuid.uuid4().hex
    record.update(
        EndpointStatus=UPDATING, DesiredModel=target.to_json(), ReloadRequestId=request_id, FailureReason=None
    )
    _write_record(folder, record)
    os.kill(process.pid, signal.SIGHUP)
    try:
        _wait_for_reload(folder, process, request_id, timeout)
    except EndpointError as error:
        alive = process.alive()
        # Like a failed UpdateEndpoint: the endpoint keeps serving what it served before.
        record.update(
            EndpointStatus=IN_SERVICE if alive else FAILED,
            DesiredModel=previous,
            ReloadRequestId=None,
            FailureReason=f"update to model package version {target.version} failed: {error}",
        )
        if not alive:
            record["Process"] = None
        _write_record(folder, record)
        raise
    record.update(EndpointStatus=IN_SERVICE)
    _write_record(folder, record)
    return _view(folder, record)


def _spawn(home: Path, folder: Path, host: str, port: int, max_payload_bytes: int) -> ProcessRef:
    log_path = folder / LOG_FILE
    command = [
        sys.executable,
        "-m",
        "local.serving",
        "--name",
        folder.name,
        "--home",
        str(home),
        "--host",
        host,
        "--port",
        str(port),
        "--max-payload-bytes",
        str(max_payload_bytes),
    ]
    with log_path.open("ab") as log:
        log.write(f"--- {now()} starting: {' '.join(command)}\n".encode())
        log.flush()
        child = subprocess.Popen(
            command,
            cwd=folder,
            env=server_environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # detached: Ctrl-C in the caller's terminal does not stop it
            close_fds=True,
        )
    _children[child.pid] = child
    return ProcessRef.of(child.pid)


def server_environment() -> dict[str, str]:
    """The server's environment: Kennel importable, unbuffered logs, and OpenMP threads that sleep
    instead of spinning when idle (FACTS.md: spinning workers slowed forward passes run from an
    HTTP worker thread by 7-11 ms on 2 cores). An operator's own OMP_* settings are kept."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(_REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _wait_until_serving(folder: Path, process: ProcessRef, target: ModelRef, timeout: float) -> str:
    """The URL, once the server answers /ping with 200 while serving `target`."""
    deadline = time.monotonic() + timeout
    while True:
        state = read_server_state(folder) or {}
        if state.get("Pid") != process.pid:
            state = {}  # not yet written by this server
        port = state.get("Port")
        if state.get("State") == SERVER_FAILED:
            raise EndpointError(_failure(folder, state.get("Error") or "the server could not start"))
        if port and state.get("State") == SERVER_READY:
            url = state["Url"]
            loaded = ModelRef.from_json(state.get("Serving"))
            if loaded == target and ping(url) == 200:
                return url
        if not process.alive():
            raise EndpointError(_failure(folder, "the server process exited while starting"))
        if time.monotonic() >= deadline:
            raise EndpointError(_failure(folder, f"the server did not answer /ping within {timeout:.0f}s"))
        time.sleep(0.1)


def _wait_for_reload(folder: Path, process: ProcessRef, request_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        reload = (read_server_state(folder) or {}).get("LastReload") or {}
        if reload.get("RequestId") == request_id:
            if reload.get("Ok"):
                return
            raise EndpointError(_failure(folder, reload.get("Error") or "the new model could not be loaded"))
        if not process.alive():
            raise EndpointError(_failure(folder, "the server process exited while loading the new model"))
        if time.monotonic() >= deadline:
            raise EndpointError(
                _failure(folder, f"the server did not load the new model within {timeout:.0f}s")
            )
        time.sleep(0.05)


def _server_ready(folder: Path) -> bool:
    return (read_server_state(folder) or {}).get("State") == SERVER_READY


def _terminate(process: ProcessRef, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`; only the very process recorded (pids are reused)."""
    if not process.alive():
        _reap(process.pid)
        return
    try:
        handle = psutil.Process(process.pid)
        handle.terminate()
        try:
            handle.wait(timeout)
        except psutil.TimeoutExpired:
            handle.kill()
            handle.wait(10)
    except psutil.NoSuchProcess:
        pass
    _reap(process.pid)


def _reap(pid: int) -> None:
    child = _children.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _failure(folder: Path, what: str) -> str:
    tail = log_tail(folder / LOG_FILE)
    return f"endpoint {folder.name!r}: {what}\nLast lines of {folder / LOG_FILE}:\n{tail}"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log yet)"
    return "\n".join(text.splitlines()[-lines:])


# --- the model artifact -----------------------------------------------------------------------


def _package_fields(package: Mapping[str, Any]) -> tuple[str, int, str]:
    try:
        arn = str(package["ModelPackageArn"])
        version = int(package["ModelPackageVersion"])
    except (KeyError, TypeError, ValueError):
        raise EndpointError(
            "the package to serve needs ModelPackageArn and ModelPackageVersion: pass the registry's "
            "describe_model_package answer"
        ) from None
    containers = (package.get("InferenceSpecification") or {}).get("Containers") or [{}]
    url = package.get("ModelDataUrl") or containers[0].get("ModelDataUrl")
    if not url:
        raise EndpointError(f"model package {arn} has no ModelDataUrl: register it with its model.tar.gz")
    return arn, version, str(url)


def _unpack(home: Path, folder: Path, name: str, model_data_url: str, version: int) -> Path:
    """model.tar.gz from the local store (or a local path), unpacked into a fresh folder."""
    archive = _archive_path(home, model_data_url)
    models = folder / MODELS_DIR
    models.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".v{version}{PARTIAL_MARKER}", dir=models))
    try:
        extract_tarball(archive, staging)
    except Exception as error:  # tarfile.ReadError, a filter's refusal, OSError, EOFError
        shutil.rmtree(staging, ignore_errors=True)
        # tarfile's ReadError lists every compression it tried, over several lines: say it once.
        detail = "not a tar archive" if isinstance(error, tarfile.ReadError) else str(error)
        raise EndpointError(
            f"endpoint {name!r}: {model_data_url} is not a readable model.tar.gz ({detail}); "
            f"register a package whose model data is the training job's model.tar.gz"
        ) from None
    missing = [file for file in ("model.pth", "model_meta.json") if not (staging / file).is_file()]
    if missing:
        shutil.rmtree(staging, ignore_errors=True)
        raise EndpointError(
            f"endpoint {name!r}: {model_data_url} lacks {', '.join(missing)} at its top level; "
            f"it is not a Kennel model artifact"
        )
    final = models / f"v{version}-{uuid.uuid4().hex[:8]}"
    staging.rename(final)
    return final


def _archive_path(home: Path, model_data_url: str) -> Path:
    if model_data_url.startswith("s3://"):
        try:
            path = ObjectStore(store_root(home)).path_for(model_data_url)
        except StoreError as error:
            raise EndpointError(f"model data {model_data_url}: {error}") from None
        where = f"the local object store ({path})"
    else:
        path = Path(model_data_url.removeprefix("file://"))
        where = str(path)
    if not path.is_file():
        raise EndpointError(
            f"model data {model_data_url} is not in {where}: was the package registered by a local run "
            f"with this KENNEL_HOME?"
        )
    return path


def _remove_other_models(folder: Path, keep: Path) -> None:
    for entry in (folder / MODELS_DIR).iterdir():
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)


# --- talking to an endpoint -------------------------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never via a proxy


def ping(url: str, timeout: float = 2.0) -> int | None:
    """The status of GET <url>/ping, or None when nothing answers."""
    try:
        with _OPENER.open(f"{url}/ping", timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Invocation:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


def invoke_endpoint(
    home: Path,
    name: str,
    body: bytes,
    content_type: str,
    accept: str | None = "application/json",
    timeout: float = 60.0,
) -> Invocation:
    """POST the body to the endpoint's /invocations (what `kennel predict` sends). Any HTTP status
    is returned; an endpoint that is not in service, or does not answer, is an EndpointError."""
    endpoint = describe_endpoint(home, name)
    if not endpoint.in_service or not endpoint.url:
        detail = f": {endpoint.failure_reason}" if endpoint.failure_reason else ""
        raise EndpointError(
            f"endpoint {name!r} is {endpoint.status}{detail}; approve a package (kennel approve --latest) "
            f"to serve one"
        )
    headers = {"Content-Type": content_type}
    if accept:
        headers["Accept"] = accept
    request = urllib.request.Request(f"{endpoint.url}/invocations", data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Invocation(response.status, response.read(), response.headers.get("Content-Type", ""))
    except urllib.error.HTTPError as error:
        return Invocation(error.code, error.read(), error.headers.get("Content-Type", ""))
    except OSError as error:
        raise EndpointError(
            f"endpoint {name!r} at {endpoint.url} did not answer ({error}); its log: {endpoint.log_path}"
        ) from None
