"""What every local job shares: the /opt/ml layout re-rooted in a job folder, the child process
(its own process group, log file, streamed lines, timeout), metric regexes and hyperparameters.

SageMaker's containers keep everything under /opt/ml. A local job gets `<job>/opt_ml` instead:
paths in the request (LocalPath, container arguments) are mapped into it and SAGEMAKER_BASE_DIR
points at it, which Kennel's scripts and the SageMaker training toolkit both honour.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local.handlers import ALGORITHM_ERROR, JOB_INTERNAL_ERROR, StepFailure
from local.state import ProcessRef

CONTAINER_ROOT = "/opt/ml"
BASE_DIR_VARIABLE = "SAGEMAKER_BASE_DIR"
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")


# --- the re-rooted layout -------------------------------------------------------------------


def container_root(job_dir: Path) -> Path:
    return job_dir / "opt_ml"


def remap(container_path: str, job_dir: Path, *, what: str) -> Path:
    """`/opt/ml/<rest>` -> `<job>/opt_ml/<rest>`; other paths are refused (the job would escape)."""
    normalized = os.path.normpath(container_path)
    if normalized != CONTAINER_ROOT and not normalized.startswith(CONTAINER_ROOT + "/"):
        raise StepFailure(
            f"{what}: {container_path!r} is outside {CONTAINER_ROOT}; "
            f"the local runner maps only {CONTAINER_ROOT}/..."
        )
    relative = os.path.relpath(normalized, CONTAINER_ROOT)
    root = container_root(job_dir)
    return root if relative == "." else root / relative


def remap_argument(argument: str, job_dir: Path) -> str:
    """Map an /opt/ml path inside a command-line argument (`/opt/ml/x` or `--flag=/opt/ml/x`)."""
    name, equals, value = argument.partition("=")
    candidate = value if equals else argument
    if candidate == CONTAINER_ROOT or candidate.startswith(CONTAINER_ROOT + "/"):
        mapped = str(remap(candidate, job_dir, what="argument"))
        if candidate.endswith("/"):
            mapped += "/"
        return f"{name}={mapped}" if equals else mapped
    return argument


def is_python(command: str) -> bool:
    return bool(_PYTHON.match(os.path.basename(command)))


def base_environment(job_dir: Path, request_environment: Mapping[str, Any] | None) -> dict[str, str]:
    """The child's environment: ours, the request's Environment, and the re-rooted base dir."""
    environment = dict(os.environ)
    environment.update({str(key): str(value) for key, value in (request_environment or {}).items()})
    environment[BASE_DIR_VARIABLE] = str(container_root(job_dir))
    # Lines must reach the log (and the display) as they are printed, not when a buffer fills.
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def runtime_limit(stopping_condition: Mapping[str, Any] | None, default: int, ceiling: int) -> int:
    seconds = (stopping_condition or {}).get("MaxRuntimeInSeconds")
    try:
        value = int(seconds) if seconds is not None else default
    except (TypeError, ValueError):
        raise StepFailure(
            f"StoppingCondition.MaxRuntimeInSeconds must be an integer, got {seconds!r}"
        ) from None
    return max(1, min(value, ceiling))


# --- the child process -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChildOutcome:
    exit_code: int
    ended_by: str | None  # None (it exited), "timeout", "stop"
    seconds: float

    @property
    def signal(self) -> int | None:
        return -self.exit_code if self.exit_code < 0 else None

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.ended_by is None

    def signal_failure(self) -> tuple[str, str]:
        """(reason, failure type) of a job whose process died from a signal the runner did not send.

        SIGKILL is what the kernel's out-of-memory killer sends: SageMaker reports that as the
        algorithm's failure (exit code 137), and retrying would only run out of memory again. Any
        other signal came from outside the job, the nearest local analogue of a lost host.
        """
        number = self.signal
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGKILL:
            return (
                f"AlgorithmError: the job's process was killed by {name} (exit code 137); the kernel's "
                "out-of-memory killer ends processes this way: try a smaller batch size or image size",
                ALGORITHM_ERROR,
            )
        return f"InternalServerError: the job's process was killed by {name}", JOB_INTERNAL_ERROR


@dataclass
class ChildSpec:
    argv: list[str]
    cwd: Path
    environment: dict[str, str]
    log_path: Path
    timeout_seconds: float
    stop_grace_seconds: float = 10.0
    on_line: Callable[[str], None] = lambda line: None
    # Checked a few times a second: the runner's stop signal, early stopping of a trial.
    should_stop: Callable[[], bool] = lambda: False
    track_process: Callable[[ProcessRef, bool], None] = lambda process, started: None
    notes: list[str] = field(default_factory=list)


def log_note(log_path: Path, text: str) -> None:
    """Append a line of the runner's own to a job log (marked so it is not mistaken for output)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as handle:
        handle.write(f"[kennel] {text}\n")


def run_child(spec: ChildSpec) -> ChildOutcome:
    """Run a job's process in its own process group; stream its output; enforce the time limit.

    On timeout or stop the whole group gets SIGTERM (what SageMaker sends), then SIGKILL after
    the grace period. Whatever the child left behind in its group is killed when it exits, as
    SageMaker tears down the container.
    """
    for note in spec.notes:
        log_note(spec.log_path, note)
    log_note(spec.log_path, "command: " + " ".join(spec.argv))
    started = time.monotonic()
    with spec.log_path.open("ab") as log:
        try:
            process = subprocess.Popen(
                spec.argv,
                cwd=spec.cwd,
                env=spec.environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            raise StepFailure(f"could not start {spec.argv[0]}: {error}") from None
        reference = ProcessRef.of(process.pid)
        spec.track_process(reference, True)
        reader = threading.Thread(target=_pump, args=(process, log, spec.on_line), daemon=True)
        reader.start()
        try:
            ended_by = _supervise(process, spec, started)
        finally:
            _kill_group(process.pid, signal.SIGKILL)
            reader.join(timeout=10)
            spec.track_process(reference, False)
    outcome = ChildOutcome(process.returncode, ended_by, time.monotonic() - started)
    log_note(
        spec.log_path,
        f"exit code {outcome.exit_code} after {outcome.seconds:.1f}s"
        + (f" ({ended_by})" if ended_by else ""),
    )
    return outcome


def _supervise(process: subprocess.Popen, spec: ChildSpec, started: float) -> str | None:
    ended_by: str | None = None
    kill_at: float | None = None
    while True:
        try:
            process.wait(timeout=0.1)
            return ended_by
        except subprocess.TimeoutExpired:
            pass
        if ended_by is None:
            if time.monotonic() - started > spec.timeout_seconds:
                ended_by = "timeout"
            elif spec.should_stop():
                ended_by = "stop"
            if ended_by is not None:
                _kill_group(process.pid, signal.SIGTERM)
                kill_at = time.monotonic() + spec.stop_grace_seconds
        elif kill_at is not None and time.monotonic() > kill_at:
            _kill_group(process.pid, signal.SIGKILL)
            kill_at = None


def _pump(process: subprocess.Popen, log: Any, on_line: Callable[[str], None]) -> None:
    assert process.stdout is not None
    for raw in iter(process.stdout.readline, b""):
        log.write(raw)
        log.flush()
        # Progress bars redraw with '\r': the display wants the latest state only.
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1]
        try:
            on_line(text)
        except Exception as error:  # a display problem must not stall the job's pipe, nor vanish
            log.write(f"[kennel] could not report this line: {error!r}\n".encode())
    process.stdout.close()


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_leftover(process: ProcessRef, wait_seconds: float = 10.0) -> list[int]:
    """Kill the process group of a job that outlived its runner: the job and whatever it started,
    also when the job itself already died. Returns the pids it found (empty: nothing ran), once
    they are gone, so a step run again never shares the machine or its files with them."""
    members = process.running_group()
    if not members:
        return []
    _kill_group(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_seconds
    while process.running_group() and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(member.pid for member in members)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, for failure reasons and messages."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if not line.startswith("[kennel] ")]
    return "\n".join(kept[-lines:])


# --- metrics --------------------------------------------------------------------------------


class MetricReader:
    """Applies a job's MetricDefinitions to its log lines, as SageMaker does for CloudWatch."""

    def __init__(self, definitions: list[Mapping[str, Any]] | None) -> None:
        self.patterns: list[tuple[str, re.Pattern[str]]] = []
        for definition in definitions or []:
            try:
                self.patterns.append((str(definition["Name"]), re.compile(str(definition["Regex"]))))
            except (KeyError, re.error) as error:
                raise StepFailure(
                    f"MetricDefinitions entry {dict(definition)!r} is invalid: {error}"
                ) from None
        self.history: dict[str, list[dict[str, float]]] = {}

    def feed(self, line: str) -> dict[str, float]:
        found = {}
        for name, pattern in self.patterns:
            match = pattern.search(line)
            if not match:
                continue
            try:
                value = float(match.group(1) if match.groups() else match.group(0))
            except (ValueError, IndexError):
                continue
            found[name] = value
            self.history.setdefault(name, []).append({"Value": value, "Timestamp": time.time()})
        return found

    def final(self) -> dict[str, float]:
        return {name: values[-1]["Value"] for name, values in self.history.items() if values}

    def series(self, name: str) -> list[float]:
        return [point["Value"] for point in self.history.get(name, [])]

    def final_metric_data_list(self) -> list[dict[str, Any]]:
        """DescribeTrainingJob's FinalMetricDataList: the last value of each metric."""
        return [
            {"MetricName": name, "Value": values[-1]["Value"], "Timestamp": values[-1]["Timestamp"]}
            for name, values in self.history.items()
            if values
        ]


# --- hyperparameters --------------------------------------------------------------------------


def decode_hyperparameter(value: str) -> Any:
    """JSON-decode a hyperparameter string when it is JSON, else keep the string."""
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def toolkit_arguments(hyperparameters: Mapping[str, str]) -> list[str]:
    """`--name value` pairs as the SageMaker training toolkit builds them (sagemaker_program):
    sorted by name, JSON-decoded, written with str() (so `true` arrives as `True`), and the
    toolkit's own `sagemaker_*` entries left out."""
    arguments = []
    for name in sorted(hyperparameters):
        if name.startswith("sagemaker_"):
            continue
        arguments += [f"--{name}", str(decode_hyperparameter(hyperparameters[name]))]
    return arguments


def driver_arguments(hyperparameters: Mapping[str, str]) -> list[str]:
    """`--name value` pairs as the v3 ModelTrainer's basic script driver builds them: in the
    request's order, JSON-decoded then re-encoded as JSON unless a string (`true` stays `true`)."""
    arguments = []
    for name, raw in hyperparameters.items():
        value = decode_hyperparameter(raw)
        arguments += [f"--{name}", value if isinstance(value, str) else json.dumps(value)]
    return arguments


def hyperparameter_environment(hyperparameters: Mapping[str, str]) -> dict[str, str]:
    """SM_HPS and SM_HP_<NAME> (upper case, dashes kept, as the toolkit writes them)."""
    decoded = {
        name: decode_hyperparameter(value)
        for name, value in hyperparameters.items()
        if not name.startswith("sagemaker_")
    }
    environment = {"SM_HPS": json.dumps(decoded)}
    for name, value in decoded.items():
        environment[f"SM_HP_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return environment
