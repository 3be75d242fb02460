"""The local runner on hand-written definitions whose Processing steps run tiny Python scripts.

Real subprocesses, real files in a temporary KENNEL home; no torch. The step JSON has the shape
the SageMaker SDK writes (see test_local_support).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from test_local_support import (
    BUCKET,
    definition,
    get,
    output_uri,
    processing_step,
    store_for,
)

from local.parameters import ParameterError
from local.progress import format_execution
from local.runner import RunOptions, run_pipeline
from local.state import list_executions, load_execution

FAST = RunOptions(stop_grace_seconds=1.0)

# Writes the first line of its input to an output, plus what it saw, to show data flowing.
COPY = """
    import json, os, pathlib, sys
    source, target = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[4])
    text = "".join(p.read_text() for p in sorted(source.rglob("*.txt")))
    target.mkdir(parents=True, exist_ok=True)
    (target / "copy.txt").write_text(text + "+" + os.environ["STEP_TAG"])
    seen = {"argv": sys.argv[1:], "base": os.environ["SAGEMAKER_BASE_DIR"], "cwd": os.getcwd(),
            "job": os.environ["PROCESSING_JOB_NAME"]}
    (target / "seen.json").write_text(json.dumps(seen))
    print("copied", len(text), "characters")
"""


def exec_output(name: str) -> dict:
    return {"Std:Join": {"On": "/", "Values": [BUCKET, get("Execution.PipelineExecutionId"), name]}}


def copy_step(home: Path, name: str, source: object, tag: str, **extra: object) -> dict:
    return processing_step(
        home,
        name,
        COPY,
        inputs=[("in", source, "/opt/ml/processing/input/data")],
        outputs=[("out", "/opt/ml/processing/output", exec_output(name.lower()))],
        arguments=["--in", "/opt/ml/processing/input/data", "--out", "/opt/ml/processing/output"],
        environment={"STEP_TAG": tag},
        **extra,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "kennel"
    store_for(home).put_bytes(f"{BUCKET}/raw/one.txt", b"hello")
    return home


def test_outputs_flow_between_steps_through_the_store(home: Path) -> None:
    first = copy_step(home, "First", get("Parameters.Input"), "a")
    second = copy_step(home, "Second", output_uri("First", "out"), "b")
    pipeline = definition(second, first, parameters=[{"Name": "Input", "Type": "String"}])

    execution = run_pipeline(pipeline, {"Input": f"{BUCKET}/raw"}, home, pipeline_name="Flow", options=FAST)

    assert execution.status == "Succeeded", execution.failure_reason
    assert [record.name for record in execution.ordered_steps()] == ["First", "Second"]
    store = store_for(home)
    out = f"{BUCKET}/{execution.execution_id}/second/copy.txt"
    assert store.read_bytes(out) == b"hello+a+b"
    first_record = execution.steps["First"]
    assert first_record.properties["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"] == (
        f"{BUCKET}/{execution.execution_id}/first"
    )
    assert first_record.properties["ProcessingJobStatus"] == "Completed"
    # The container layout is re-rooted in the job folder: arguments and SAGEMAKER_BASE_DIR point there.
    job_dir = Path(first_record.job_dir)
    seen = json.loads(store.read_bytes(f"{BUCKET}/{execution.execution_id}/first/seen.json"))
    assert seen["base"] == str(job_dir / "opt_ml")
    assert seen["argv"] == [
        "--in",
        f"{job_dir}/opt_ml/processing/input/data",
        "--out",
        f"{job_dir}/opt_ml/processing/output",
    ]
    assert seen["cwd"] == str(job_dir / "opt_ml" / "processing" / "input" / "code")
    assert seen["job"] == first_record.job_name == first_record.properties["ProcessingJobName"]
    config = json.loads((job_dir / "opt_ml" / "config" / "processingjobconfig.json").read_text())
    assert config["ProcessingJobName"] == first_record.job_name
    assert config["ProcessingInputs"][0]["S3Input"]["S3Uri"] == f"{BUCKET}/raw"
    log = Path(first_record.log_path).read_text()
    assert "copied 5 characters" in log and "is not pulled" in log


def test_a_failing_script_fails_the_step_with_its_message(home: Path) -> None:
    broken = processing_step(
        home,
        "Broken",
        """
        import os, pathlib, sys
        message = pathlib.Path(os.environ["SAGEMAKER_BASE_DIR"]) / "output" / "message"
        message.write_text("the input folder is empty: give --data a folder of images")
        print("about to fail")
        sys.exit(3)
        """,
    )
    after = copy_step(home, "After", output_uri("Broken", "x"), "b")
    execution = run_pipeline(definition(broken, after), {}, home, options=FAST)

    assert execution.status == "Failed"
    record = execution.steps["Broken"]
    assert record.status == "Failed" and record.attempt_count == 1
    assert "exit code 3: the input folder is empty: give --data a folder of images" in record.failure_reason
    assert record.properties["ExitMessage"] == "the input folder is empty: give --data a folder of images"
    assert execution.failure_reason.startswith("step Broken failed: AlgorithmError: exit code 3")
    assert "After" not in execution.steps  # never started, as on SageMaker
    assert "about to fail" in Path(record.log_path).read_text()


def test_fail_step_and_condition_branches(home: Path) -> None:
    evaluate = processing_step(
        home,
        "Evaluate",
        """
        import json, os, pathlib
        out = pathlib.Path(os.environ["SAGEMAKER_BASE_DIR"]) / "processing" / "evaluation"
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps({"metrics": {"loss": {"value": 0.75}}}))
        """,
        outputs=[("evaluation", "/opt/ml/processing/evaluation", exec_output("evaluation"))],
        PropertyFiles=[
            {"PropertyFileName": "Evaluation", "OutputName": "evaluation", "FilePath": "evaluation.json"}
        ],
    )
    loss = {
        "Std:JsonGet": {
            "PropertyFile": get("Steps.Evaluate.PropertyFiles.Evaluation"),
            "Path": "metrics.loss.value",
        }
    }
    register = copy_step(home, "Register", output_uri("Evaluate", "evaluation"), "registered")
    publish = copy_step(home, "Publish", output_uri("Register", "out"), "published")
    fail = {
        "Name": "TooHigh",
        "Type": "Fail",
        "Arguments": {
            "ErrorMessage": {
                "Std:Join": {
                    "On": " ",
                    "Values": ["test loss", loss, "is above the threshold", get("Parameters.Threshold")],
                }
            }
        },
    }
    check = {
        "Name": "Check",
        "Type": "Condition",
        "Arguments": {
            "Conditions": [
                {"Type": "LessThanOrEqualTo", "LeftValue": loss, "RightValue": get("Parameters.Threshold")}
            ],
            "IfSteps": [register, publish],
            "ElseSteps": [fail],
        },
    }
    pipeline = definition(
        evaluate, check, parameters=[{"Name": "Threshold", "Type": "Float", "DefaultValue": 1.0}]
    )

    passed = run_pipeline(pipeline, {}, home, options=FAST)
    assert passed.status == "Succeeded", passed.failure_reason
    assert passed.steps["Check"].properties == {"Outcome": "True"}
    assert {"Register", "Publish"} <= set(passed.steps) and "TooHigh" not in passed.steps
    assert passed.skipped_steps == ["TooHigh"]
    assert (
        passed.steps["Evaluate"].properties["PropertyFiles"]["Evaluation"]["metrics"]["loss"]["value"] == 0.75
    )

    failed = run_pipeline(pipeline, {"Threshold": "0.5"}, home, options=FAST)
    assert failed.status == "Failed"
    assert failed.steps["Check"].properties == {"Outcome": "False"}
    assert failed.steps["TooHigh"].status == "Failed"
    assert failed.failure_reason == "test loss 0.75 is above the threshold 0.5"
    assert failed.steps["TooHigh"].failure_reason == failed.failure_reason
    assert "Register" not in failed.steps and failed.skipped_steps == ["Register", "Publish"]
    summary = format_execution(failed)
    assert "Fail step ended it" in summary and "--resume" not in summary


def test_a_condition_that_cannot_be_evaluated_fails_its_step(home: Path) -> None:
    evaluate = processing_step(
        home,
        "Evaluate",
        """
        import os, pathlib
        out = pathlib.Path(os.environ["SAGEMAKER_BASE_DIR"]) / "processing" / "evaluation"
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text('{"metrics": {}}')
        """,
        outputs=[("evaluation", "/opt/ml/processing/evaluation", exec_output("evaluation"))],
        PropertyFiles=[
            {"PropertyFileName": "Evaluation", "OutputName": "evaluation", "FilePath": "evaluation.json"}
        ],
    )
    loss = {
        "Std:JsonGet": {
            "PropertyFile": get("Steps.Evaluate.PropertyFiles.Evaluation"),
            "Path": "metrics.loss.value",
        }
    }
    check = {
        "Name": "Check",
        "Type": "Condition",
        "Arguments": {
            "Conditions": [{"Type": "LessThan", "LeftValue": loss, "RightValue": 1}],
            "IfSteps": [],
            "ElseSteps": [],
        },
    }
    execution = run_pipeline(definition(evaluate, check), {}, home, options=FAST)
    assert execution.status == "Failed"
    assert "Std:JsonGet 'metrics.loss.value'" in execution.steps["Check"].failure_reason
    assert "nothing at metrics.loss" in execution.failure_reason


def test_a_missing_property_file_fails_the_step_clearly(home: Path) -> None:
    step = processing_step(
        home,
        "Evaluate",
        "print('forgot to write evaluation.json')",
        outputs=[("evaluation", "/opt/ml/processing/evaluation", exec_output("evaluation"))],
        PropertyFiles=[
            {"PropertyFileName": "Evaluation", "OutputName": "evaluation", "FilePath": "evaluation.json"}
        ],
    )
    execution = run_pipeline(definition(step), {}, home, options=FAST)
    assert execution.status == "Failed"
    assert "PropertyFile 'Evaluation': the job did not write evaluation.json in output 'evaluation'" in (
        execution.steps["Evaluate"].failure_reason
    )


FLAKY = """
    import os, pathlib, signal, sys
    counter = pathlib.Path(os.environ["PROBE"]) / "attempts"
    attempts = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempts))
    print("attempt", attempts)
    if attempts < int(os.environ["SUCCEED_ON"]):
        if os.environ["HOW"] == "signal":
            os.kill(os.getpid(), signal.SIGTERM)  # the host lost the job: an internal error
        if os.environ["HOW"] == "oom":
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does: the job's fault
        sys.exit(1)  # the script's own failure: an AlgorithmError
"""

RETRY_INTERNAL = [
    {
        "ExceptionType": ["SageMaker.JOB_INTERNAL_ERROR"],
        "IntervalSeconds": 1,
        "BackoffRate": 1.0,
        "MaxAttempts": 2,
    }
]


@pytest.mark.parametrize(
    ("how", "succeed_on", "status", "attempts"),
    [
        ("signal", 2, "Succeeded", 2),  # retried once, then fine
        ("signal", 9, "Failed", 3),  # MaxAttempts (retries) exhausted: 1 + 2 attempts
        ("exit", 2, "Failed", 1),  # an AlgorithmError is never retried, as on SageMaker
        ("oom", 2, "Failed", 1),  # SIGKILL (exit code 137 on SageMaker) would only strike again
    ],
)
def test_retry_policies(
    home: Path, tmp_path: Path, how: str, succeed_on: int, status: str, attempts: int
) -> None:
    step = processing_step(
        home,
        "Flaky",
        FLAKY,
        environment={"PROBE": str(tmp_path), "SUCCEED_ON": str(succeed_on), "HOW": how},
        RetryPolicies=RETRY_INTERNAL,
    )
    execution = run_pipeline(definition(step), {}, home, options=FAST)
    record = execution.steps["Flaky"]
    assert (execution.status, record.status, record.attempt_count) == (status, status, attempts)
    assert (tmp_path / "attempts").read_text() == str(attempts)
    assert [item["Attempt"] for item in record.attempts] == list(range(1, attempts + 1))
    assert len({item["JobName"] for item in record.attempts}) == attempts  # a new job per attempt
    if status == "Failed":
        expected = "SageMaker.JOB_INTERNAL_ERROR" if how == "signal" else "AlgorithmError"
        assert record.metadata["FailureType"] == expected
    if how == "oom":
        assert "SIGKILL" in record.failure_reason and "out-of-memory" in record.failure_reason


SLEEPER = """
    import json, os, pathlib, time
    start = time.time()
    time.sleep(float(os.environ["SECONDS"]))
    probe = pathlib.Path(os.environ["PROBE"]) / (os.environ["NAME"] + ".json")
    probe.write_text(json.dumps({"start": start, "end": time.time()}))
"""


@pytest.mark.parametrize(("parallel", "overlap"), [(2, True), (1, False)])
def test_independent_steps_run_in_parallel_up_to_the_limit(
    home: Path, tmp_path: Path, parallel: int, overlap: bool
) -> None:
    steps = [
        processing_step(
            home, name, SLEEPER, environment={"PROBE": str(tmp_path), "NAME": name, "SECONDS": "1.5"}
        )
        for name in ("Left", "Right")
    ]
    execution = run_pipeline(definition(*steps), {}, home, options=RunOptions(max_parallel=parallel))
    assert execution.status == "Succeeded"
    left, right = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("Left", "Right"))
    overlapped = left["start"] < right["end"] and right["start"] < left["end"]
    assert overlapped is overlap


def test_max_runtime_stops_the_job_and_its_children(home: Path, tmp_path: Path) -> None:
    step = processing_step(
        home,
        "Slow",
        """
        import os, pathlib, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        (pathlib.Path(os.environ["PROBE"]) / "child.pid").write_text(str(child.pid))
        print("working...")
        time.sleep(60)
        """,
        environment={"PROBE": str(tmp_path)},
        timeout=1,
    )
    started = time.monotonic()
    execution = run_pipeline(definition(step), {}, home, options=FAST)
    assert time.monotonic() - started < 15
    record = execution.steps["Slow"]
    assert record.status == "Failed"
    assert "ran past StoppingCondition.MaxRuntimeInSeconds (1 s)" in record.failure_reason
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the job's child process outlived the job"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its new parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


COUNTED = """
    import os, pathlib
    counter = pathlib.Path(os.environ["PROBE"]) / "runs"
    counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
    out = pathlib.Path(os.environ["SAGEMAKER_BASE_DIR"]) / "processing" / "output"
    out.mkdir(parents=True, exist_ok=True)
    (out / "version.txt").write_text(os.environ.get("VERSION", "v1"))
"""


def test_cache_hits_until_the_code_changes(home: Path, tmp_path: Path) -> None:
    def pipeline(code: str, code_key: str) -> dict:
        cached = processing_step(
            home,
            "Cached",
            code,
            environment={"PROBE": str(tmp_path)},
            outputs=[("out", "/opt/ml/processing/output", exec_output("cached"))],
            CacheConfig={"Enabled": True, "ExpireAfter": "PT1H"},
            code_key=code_key,
        )
        reader = copy_step(home, "Reader", output_uri("Cached", "out"), "read")
        return definition(cached, reader)

    def runs() -> int:
        return int((tmp_path / "runs").read_text())

    first = run_pipeline(pipeline(COUNTED, "upload-1"), {}, home, options=FAST)
    assert first.status == "Succeeded" and runs() == 1 and first.steps["Cached"].cache_hit is None

    # Same code uploaded again under a new key (as a rebuilt definition does): a hit.
    second = run_pipeline(pipeline(COUNTED, "upload-2"), {}, home, options=FAST)
    assert second.status == "Succeeded" and runs() == 1
    hit = second.steps["Cached"]
    assert hit.cache_hit == {"SourcePipelineExecutionArn": first.arn}
    assert hit.properties["ProcessingJobName"] == first.steps["Cached"].properties["ProcessingJobName"]
    # Downstream steps read the cached step's outputs, where the first execution put them.
    reader_copy = f"{BUCKET}/{second.execution_id}/reader/copy.txt"
    assert store_for(home).read_bytes(reader_copy).startswith(b"v1")

    # Changed code: a miss, and the new outputs reach the next step.
    third = run_pipeline(pipeline(COUNTED.replace('"v1"', '"v2"'), "upload-3"), {}, home, options=FAST)
    assert third.status == "Succeeded" and runs() == 2 and third.steps["Cached"].cache_hit is None
    assert store_for(home).read_bytes(f"{BUCKET}/{third.execution_id}/reader/copy.txt").startswith(b"v2")

    # Caching off for the run: the step runs even though it would hit.
    fourth = run_pipeline(pipeline(COUNTED, "upload-1"), {}, home, options=RunOptions(use_cache=False))
    assert fourth.status == "Succeeded" and runs() == 3


EVALUATING = """
    import json, os, pathlib
    counter = pathlib.Path(os.environ["PROBE"]) / "runs"
    counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
    out = pathlib.Path(os.environ["SAGEMAKER_BASE_DIR"]) / "processing" / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    matrix = {"cat": {"cat": 3, "dog": 1}, "dog": {"cat": 0, "dog": 4}}
    (out / "evaluation.json").write_text(json.dumps({KEY: {"confusion_matrix": matrix}}))
"""


def test_a_cached_step_still_shows_the_plots_its_original_job_drew(home: Path, tmp_path: Path) -> None:
    from entrypoints import contract

    step = processing_step(
        home,
        "Evaluate",
        EVALUATING.replace("KEY", repr(contract.EVALUATION_METRICS_KEY)),
        environment={"PROBE": str(tmp_path)},
        outputs=[("evaluation", "/opt/ml/processing/evaluation", exec_output("evaluation"))],
        CacheConfig={"Enabled": True, "ExpireAfter": "PT1H"},
    )
    first = run_pipeline(definition(step), {}, home, options=FAST)
    second = run_pipeline(definition(step), {}, home, options=FAST)
    assert (tmp_path / "runs").read_text() == "1", "the second run should have been served from the cache"
    assert second.steps["Evaluate"].cache_hit == {"SourcePipelineExecutionArn": first.arn}

    (drawn,) = first.steps["Evaluate"].metadata["Plots"]
    assert drawn["Name"] == "confusion_matrix" and Path(drawn["Path"]).is_file()
    assert second.steps["Evaluate"].metadata.get("Plots") == [drawn]
    shown = format_execution(load_execution(home, second.execution_id))
    assert f"confusion_matrix: {drawn['Path']}" in shown


def test_invalid_input_is_one_clear_error_before_anything_runs(home: Path) -> None:
    step = copy_step(home, "Only", get("Parameters.Input"), "a")
    pipeline = definition(
        step,
        parameters=[
            {"Name": "Input", "Type": "String", "DefaultValue": f"{BUCKET}/raw"},
            {"Name": "Epochs", "Type": "Integer", "DefaultValue": 1},
        ],
    )
    with pytest.raises(ParameterError, match="unknown parameter 'Epoch'; this pipeline takes: Epochs, Input"):
        run_pipeline(pipeline, {"Epoch": 3}, home)
    with pytest.raises(ParameterError, match="parameter 'Epochs' is an Integer; 'many' is not"):
        run_pipeline(pipeline, {"Epochs": "many"}, home)
    bad_cache = dict(step, CacheConfig={"Enabled": True, "ExpireAfter": "one week"})
    with pytest.raises(ValueError, match="step 'Only': ExpireAfter 'one week' is not an ISO 8601 duration"):
        run_pipeline(definition(bad_cache), {}, home)
    assert list_executions(home) == []


@pytest.mark.parametrize(
    ("step", "words"),
    [
        (
            {"Name": "Serve", "Type": "Endpoint", "Arguments": {}},
            "An endpoint (step 'Serve', type Endpoint) is not yet supported locally",
        ),
        (
            {"Name": "Transform", "Type": "Transform", "Arguments": {}},
            "step type 'Transform' is not supported by the local runner",
        ),
    ],
)
def test_steps_not_supported_locally_stop_with_a_clear_message(home: Path, step: dict, words: str) -> None:
    execution = run_pipeline(definition(step), {}, home, options=FAST)
    assert execution.status == "Failed"
    assert words in execution.steps[step["Name"]].failure_reason


@pytest.mark.parametrize(
    ("role", "words"),
    [
        ("deploy", "the deploy step's arguments lack --model-package-group, --endpoint-name"),
        ("sing", "KENNEL_STEP_ROLE=sing: no local service for this step role (known: deploy)"),
    ],
)
def test_a_service_flagged_processing_step_is_served_not_run(
    home: Path, tmp_path: Path, role: str, words: str
) -> None:
    step = processing_step(home, "Deploy", COUNTED, environment={"PROBE": str(tmp_path), "KENNEL_STEP_ROLE": role})
    execution = run_pipeline(definition(step), {}, home, options=FAST)
    assert words in execution.steps["Deploy"].failure_reason
    assert not (tmp_path / "runs").exists()


def test_python_entrypoint_requests_run_too(home: Path) -> None:
    store = store_for(home)
    store.put_bytes(f"{BUCKET}/script/run.py", b"import sys; print('script says', sys.argv[1:])\n")
    step = {
        "Name": "Script",
        "Type": "Processing",
        "Arguments": {
            "AppSpecification": {
                "ImageUri": "img",
                "ContainerEntrypoint": ["python3", "/opt/ml/processing/input/code/run.py"],
                "ContainerArguments": ["--n", get("Parameters.N")],
            },
            "ProcessingInputs": [
                {
                    "InputName": "code",
                    "S3Input": {
                        "S3Uri": f"{BUCKET}/script/run.py",
                        "LocalPath": "/opt/ml/processing/input/code",
                    },
                }
            ],
        },
    }
    pipeline = definition(step, parameters=[{"Name": "N", "Type": "String", "DefaultValue": "7"}])
    execution = run_pipeline(pipeline, {}, home, options=FAST)
    assert execution.status == "Succeeded", execution.failure_reason
    assert "script says ['--n', '7']" in Path(execution.steps["Script"].log_path).read_text()


def test_a_missing_input_names_the_input_and_the_uri(home: Path) -> None:
    step = copy_step(home, "Reader", f"{BUCKET}/does-not-exist", "a")
    execution = run_pipeline(definition(step), {}, home, options=FAST)
    reason = execution.steps["Reader"].failure_reason
    assert f"ProcessingInput 'in': no objects under {BUCKET}/does-not-exist" in reason


def test_stopping_a_run_stops_its_jobs(home: Path, tmp_path: Path) -> None:
    slow = processing_step(
        home, "Slow", SLEEPER, environment={"PROBE": str(tmp_path), "NAME": "slow", "SECONDS": "60"}
    )
    stop = threading.Event()

    def stop_once_executing() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            '"Executing"' in path.read_text() for path in home.glob("executions/*/steps/Slow.json")
        ):
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()

    threading.Thread(target=stop_once_executing, daemon=True).start()
    started = time.monotonic()
    execution = run_pipeline(definition(slow), {}, home, options=FAST, stop_event=stop)
    assert time.monotonic() - started < 15
    assert execution.status == "Stopped"
    assert execution.steps["Slow"].status == "Stopped"
    assert load_execution(home, execution.execution_id).status == "Stopped"
