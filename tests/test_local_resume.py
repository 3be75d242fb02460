"""Durable executions: a runner killed with SIGKILL leaves readable state, and resume finishes the job.

The runner runs as a real subprocess (`python -m local run`), is killed with SIGKILL while a step
executes, and the execution is then resumed: steps that succeeded are reused, the job the dead
runner left behind is killed, the interrupted step runs again.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kennel_support import repo_config
from test_local_support import BUCKET, definition, output_uri, processing_step, store_for

from local.progress import PlainProgress
from local.runner import ResumeError, RunOptions, resume, run_pipeline
from local.state import load_execution
from pipeline.local_target import LocalTarget

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = RunOptions(stop_grace_seconds=1.0)

COUNT_AND_WRITE = """
    import os, pathlib
    probe = pathlib.Path(os.environ["PROBE"])
    counter = probe / (os.environ["NAME"] + ".runs")
    runs = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(runs))
    out = pathlib.Path(os.environ["SAGEMAKER_BASE_DIR"]) / "processing" / "output"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.txt").write_text(os.environ["NAME"] + " run " + str(runs))
"""

# Hangs on its first run (until killed); later runs finish at once, and say what they read.
HANG_FIRST_TIME = (
    COUNT_AND_WRITE
    + """
    (probe / (os.environ["NAME"] + ".pid")).write_text(str(os.getpid()))
    if runs == 1:
        import time
        time.sleep(120)
    upstream = pathlib.Path(os.environ["SAGEMAKER_BASE_DIR"]) / "processing" / "input" / "up" / "data.txt"
    (out / "data.txt").write_text(upstream.read_text() + " -> " + os.environ["NAME"] + " run " + str(runs))
"""
)


# Starts a helper that outlives it (a worker, say), then hangs on its first run like HANG_FIRST_TIME.
SPAWN_THEN_HANG = (
    COUNT_AND_WRITE
    + """
    import subprocess, sys, time
    (probe / (os.environ["NAME"] + ".pid")).write_text(str(os.getpid()))
    if runs == 1:
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        (probe / "helper.pid").write_text(str(helper.pid))
        time.sleep(120)
    upstream = pathlib.Path(os.environ["SAGEMAKER_BASE_DIR"]) / "processing" / "input" / "up" / "data.txt"
    (out / "data.txt").write_text(upstream.read_text() + " -> " + os.environ["NAME"] + " run " + str(runs))
"""
)


def pipeline(home: Path, probe: Path, train_source: str = HANG_FIRST_TIME) -> dict:
    def exec_output(name: str) -> dict:
        return {"Std:Join": {"On": "/", "Values": [BUCKET, {"Get": "Execution.PipelineExecutionId"}, name]}}

    first = processing_step(
        home,
        "Prepare",
        COUNT_AND_WRITE,
        environment={"PROBE": str(probe), "NAME": "Prepare"},
        outputs=[("out", "/opt/ml/processing/output", exec_output("prepare"))],
    )
    second = processing_step(
        home,
        "Train",
        train_source,
        environment={"PROBE": str(probe), "NAME": "Train"},
        inputs=[("up", output_uri("Prepare", "out"), "/opt/ml/processing/input/up")],
        outputs=[("out", "/opt/ml/processing/output", exec_output("train"))],
    )
    return definition(first, second)


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def _step_status(home: Path, execution_id: str, step: str) -> str | None:
    path = home / "executions" / execution_id / "steps" / f"{step}.json"
    try:
        return json.loads(path.read_text())["StepStatus"]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def run_and_sigkill_the_runner(tmp_path: Path, train_source: str, ready: str = "Train.pid") -> tuple[Path, Path, str]:
    """Start `python -m local run`, SIGKILL it while Train executes; returns (home, probe, execution id)."""
    home, probe = tmp_path / "kennel", tmp_path / "probe"
    probe.mkdir()
    definition_file = tmp_path / "definition.json"
    definition_file.write_text(json.dumps(pipeline(home, probe, train_source)))
    runner = subprocess.Popen(
        [sys.executable, "-m", "local", "--home", str(home), "run", str(definition_file), "--quiet"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: (home / "executions").is_dir() and any((home / "executions").iterdir()))
        execution_id = next((home / "executions").iterdir()).name
        _wait_for(
            lambda: (
                (probe / ready).exists() and _step_status(home, execution_id, "Train") == "Executing"
            )
        )
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
    finally:
        if runner.poll() is None:
            runner.kill()
    return home, probe, execution_id


def test_sigkill_mid_run_then_resume_finishes(tmp_path: Path) -> None:
    home, probe, execution_id = run_and_sigkill_the_runner(tmp_path, HANG_FIRST_TIME)
    orphan = int((probe / "Train.pid").read_text())
    assert _alive(orphan), "the job should outlive a SIGKILLed runner (it has its own process group)"

    # The state the dead runner left is readable, and says what happened: the job still runs.
    interrupted = load_execution(home, execution_id)
    assert interrupted.status == "Stopped" and interrupted.interrupted
    assert interrupted.steps["Prepare"].status == "Succeeded"
    assert interrupted.steps["Train"].status == "Stopped"
    assert f"kennel run --resume {execution_id}" in interrupted.failure_reason
    assert orphan in interrupted.orphan_jobs["Train"] and list(interrupted.orphan_jobs) == ["Train"]
    assert "this step's job is still running" in interrupted.steps["Train"].failure_reason
    notes = LocalTarget(repo_config().for_target("local"), home=home).to_status(interrupted).notes
    assert any(note.startswith("Train: its job is still running with no runner") for note in notes), notes

    shown = io.StringIO()
    finished = resume(execution_id, home, options=FAST, progress=PlainProgress(shown))

    assert finished.status == "Succeeded", finished.failure_reason
    assert finished.resume_count == 1
    assert not _alive(orphan), "resume must stop the job the dead runner left running"
    said = f"Train: its job was still running, left by the earlier runner (pids {orphan})"
    assert said in shown.getvalue()
    first_log = Path(interrupted.steps["Train"].log_path).read_text()
    assert said in first_log  # the killed attempt's log says how it ended
    assert finished.orphan_jobs == {}
    assert (probe / "Prepare.runs").read_text() == "1"  # reused, not rerun
    assert (probe / "Train.runs").read_text() == "2"
    assert finished.steps["Train"].attempt_count == 2
    assert finished.steps["Prepare"].job_name == interrupted.steps["Prepare"].job_name
    output = store_for(home).read_bytes(f"{BUCKET}/{execution_id}/train/data.txt").decode()
    assert output == "Prepare run 1 -> Train run 2"
    with pytest.raises(ResumeError, match="already succeeded"):
        resume(execution_id, home)


def test_what_a_dead_job_left_running_is_found_by_its_process_group_and_stopped(tmp_path: Path) -> None:
    home, probe, execution_id = run_and_sigkill_the_runner(tmp_path, SPAWN_THEN_HANG, ready="helper.pid")
    job, helper = int((probe / "Train.pid").read_text()), int((probe / "helper.pid").read_text())
    os.kill(job, signal.SIGKILL)  # the job itself dies too (say, the OOM killer): its helper lives on
    _wait_for(lambda: not _alive(job))
    assert _alive(helper)

    interrupted = load_execution(home, execution_id)
    assert interrupted.orphan_jobs == {"Train": [helper]}

    finished = resume(execution_id, home, options=FAST)
    assert finished.status == "Succeeded", finished.failure_reason
    assert not _alive(helper), "resume must stop what the dead job left in its process group"
    assert (probe / "Train.runs").read_text() == "2"


def test_resume_after_a_failure_reuses_what_succeeded(tmp_path: Path) -> None:
    home, probe = tmp_path / "kennel", tmp_path / "probe"
    probe.mkdir()
    first = processing_step(
        home,
        "Prepare",
        COUNT_AND_WRITE,
        environment={"PROBE": str(probe), "NAME": "Prepare"},
        outputs=[("out", "/opt/ml/processing/output", f"{BUCKET}/prepare")],
    )
    second = processing_step(
        home,
        "Fragile",
        """
        import os, pathlib, sys
        if not (pathlib.Path(os.environ["PROBE"]) / "fixed").exists():
            sys.exit("the data is not ready")
        """,
        environment={"PROBE": str(probe)},
        inputs=[("up", output_uri("Prepare", "out"), "/opt/ml/processing/input/up")],
    )
    failed = run_pipeline(definition(first, second), {}, home, options=FAST)
    assert failed.status == "Failed"
    assert "the data is not ready" in failed.steps["Fragile"].failure_reason

    (probe / "fixed").touch()
    finished = resume(failed.execution_id, home, options=FAST)
    assert finished.status == "Succeeded" and finished.failure_reason is None
    assert (probe / "Prepare.runs").read_text() == "1"
    assert finished.steps["Fragile"].attempt_count == 2
    assert [item["Status"] for item in finished.steps["Fragile"].attempts] == ["Failed", "Succeeded"]


def test_resume_cli_and_status(tmp_path: Path) -> None:
    home, probe = tmp_path / "kennel", tmp_path / "probe"
    probe.mkdir()
    step = processing_step(
        home,
        "Once",
        """
        import os, pathlib, sys
        flag = pathlib.Path(os.environ["PROBE"]) / "seen"
        if not flag.exists():
            flag.touch()
            sys.exit(1)
        """,
        environment={"PROBE": str(probe)},
    )
    definition_file = tmp_path / "definition.json"
    definition_file.write_text(json.dumps(definition(step)))
    command = [sys.executable, "-m", "local", "--home", str(home)]
    run = subprocess.run(
        [*command, "run", str(definition_file)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    execution_id = json.loads(
        subprocess.run(
            [*command, "status", "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        ).stdout
    )[0]["PipelineExecutionId"]
    assert f"resume with: kennel run --resume {execution_id}" in run.stdout
    again = subprocess.run(
        [*command, "resume", execution_id], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stdout + again.stderr
    status = subprocess.run(
        [*command, "status", execution_id, "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    summary = json.loads(status.stdout)
    assert summary["PipelineExecutionStatus"] == "Succeeded" and summary["ResumeCount"] == 1
    assert summary["Steps"][0]["StepStatus"] == "Succeeded" and summary["Steps"][0]["AttemptCount"] == 2
    bad = subprocess.run(
        [*command, "run", str(definition_file), "--param", "Nope=1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown parameter 'Nope'; this pipeline takes: (none)"
