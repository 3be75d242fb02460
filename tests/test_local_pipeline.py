"""The local target end to end through the `kennel` CLI, on the bundled sample, small settings.

One state folder for the module, in the order a user lives it:
  1. `kennel run` in the background, SIGKILL the runner mid-training, `kennel run --resume`;
  2. the finished execution: step statuses, tuned hyperparameters reaching training, the
     condition deciding on evaluation.json's loss, the package registered PendingManualApproval
     and no endpoint serving it;
  3. approve: the endpoint serves it; `kennel predict` and boto3's sagemaker-runtime agree;
  4. a second run reuses the cached steps and registers version 2; approving it swaps the
     endpoint; rejecting it rolls the endpoint back to version 1;
  5. an impossible threshold ends in the Fail step with the loss and threshold in its message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "sample"
CLASSES = sorted(folder.name for folder in (SAMPLE / "test").iterdir())
# Small enough for CI on 2 cores, real enough to exercise tuning (2 trials at once) and training.
# One epoch at 64 px is a weak model, so the gate is set above chance level (ln 10 = 2.3):
# this file tests the mechanics; test_scripts_end_to_end tests the quality of the defaults.
THRESHOLD = 3.0
SMALL = ["MaxJobs=2", "MaxParallelJobs=2", "Epochs=1", "ImageSize=64", f"TestLossThreshold={THRESHOLD}"]

pytestmark = pytest.mark.slow


def kennel_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KENNEL_", "SAGEMAKER_", "SM_"))}
    return {**env, "KENNEL_HOME": str(home), "HOME": str(home.parent)}


def kennel(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, env=kennel_env(home),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def params(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--param", pair)]


def status_json(home: Path, execution: str) -> dict:
    result = kennel(home, "status", execution, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def step_statuses(home: Path, execution: str) -> dict[str, str]:
    return {step["name"]: step["status"] for step in status_json(home, execution)["steps"]}


def step_record(home: Path, execution: str, step: str) -> dict:
    return json.loads((home / "executions" / execution / "steps" / f"{step}.json").read_text())


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("kennel") / ".kennel"
    yield home
    kennel(home, "endpoint", "stop", "kennel-endpoint", timeout=60)  # never leave a server behind


@pytest.fixture(scope="module")
def first_execution(home: Path) -> str:
    """A run killed with SIGKILL while a job runs, then resumed to the end."""
    started = kennel(home, "run", *params(*SMALL), "--json")
    assert started.returncode == 0, started.stderr
    execution = json.loads(started.stdout)["execution_id"]
    record = home / "executions" / execution / "execution.json"
    runner_pid = json.loads(record.read_text())["Runner"]["Pid"]

    def training_is_running() -> bool:
        return step_statuses(home, execution).get("TrainWithDebugger") == "Executing"

    wait_for(training_is_running, 420, "the training step to start")
    time.sleep(3)  # let the job get going: the resume must cope with work in flight
    os.kill(runner_pid, signal.SIGKILL)
    wait_for(lambda: status_json(home, execution)["status"] != "Executing", 30, "the execution to read as ended")
    interrupted = status_json(home, execution)
    assert any("resume with: kennel run --resume" in note for note in interrupted["notes"]), interrupted
    killed_in = {step["name"]: step["status"] for step in interrupted["steps"]}
    assert killed_in["Tune"] == "Succeeded" and killed_in["TrainWithDebugger"] != "Succeeded", killed_in
    tuned_before = step_record(home, execution, "Tune")

    resumed = kennel(home, "run", "--resume", execution)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert step_record(home, execution, "Tune") == tuned_before, "the resume reuses what succeeded"
    return execution


def test_a_killed_run_resumes_and_finishes(home: Path, first_execution: str) -> None:
    statuses = step_statuses(home, first_execution)
    assert statuses == {name: "Succeeded" for name in (
        "PrepareData", "Tune", "TrainWithDebugger", "Evaluate", "CheckTestLoss", "Register", "Deploy")}
    assert json.loads((home / "executions" / first_execution / "execution.json").read_text())["ResumeCount"] == 1


def test_tuned_hyperparameters_reach_training_and_the_condition_reads_the_evaluation(
    home: Path, first_execution: str
) -> None:
    tune = step_record(home, first_execution, "Tune")["Properties"]
    train = step_record(home, first_execution, "TrainWithDebugger")["Properties"]
    tuned = tune["BestTrainingJob"]["TunedHyperParameters"]
    assert set(tuned) == {"lr", "batch-size", "epochs"}
    assert {name: train["HyperParameters"][name] for name in tuned} == tuned
    assert len(tune["TrainingJobSummaries"]) == 2
    # The final job has its own metric definitions, so its last epoch is in FinalMetricDataList.
    final = {item["MetricName"]: item["Value"] for item in train["FinalMetricDataList"]}
    assert set(final) == {"train:loss", "valid:loss", "valid:accuracy"} and 0 < final["valid:accuracy"] <= 1

    evaluate = step_record(home, first_execution, "Evaluate")["Properties"]
    uri = next(o["S3Output"]["S3Uri"] for o in evaluate["ProcessingOutputConfig"]["Outputs"]
               if o["OutputName"] == "evaluation")
    bucket_and_key = uri.removeprefix("s3://").rstrip("/")
    evaluation = json.loads((home / "s3" / bucket_and_key / "evaluation.json").read_text())
    loss = evaluation["multiclass_classification_metrics"]["loss"]["value"]
    (condition,) = step_record(home, first_execution, "CheckTestLoss")["Metadata"]["EvaluatedConditions"]
    assert condition["Type"] == "LessThanOrEqualTo"
    assert float(condition["LeftValue"]) == pytest.approx(loss)
    assert float(condition["RightValue"]) == THRESHOLD and condition["Outcome"] is True


def test_the_package_waits_for_approval_and_nothing_serves_it(home: Path, first_execution: str) -> None:
    models = json.loads(kennel(home, "models", "--json").stdout)
    assert [(m["version"], m["approval_status"]) for m in models] == [(1, "PendingManualApproval")]
    deploy = step_record(home, first_execution, "Deploy")["Properties"]
    assert deploy["Deployment"]["Action"] == "nothing-approved"
    assert json.loads(kennel(home, "endpoints", "--json").stdout) == []


def predict(home: Path, image: Path) -> list[dict]:
    result = kennel(home, "predict", str(image), "--top-k", "3", "--json")
    assert result.returncode == 0, result.stderr
    (answer,) = json.loads(result.stdout)
    return answer["predictions"]


def test_approving_serves_the_model_and_boto3_gets_the_same_answer(home: Path, first_execution: str) -> None:
    approved = kennel(home, "approve", "--latest", "--reason", "reviewed the metrics")
    assert approved.returncode == 0, approved.stderr
    assert "is now Approved" in approved.stdout and "serves version 1" in approved.stdout
    (endpoint,) = json.loads(kennel(home, "endpoints", "--json").stdout)
    assert endpoint["status"] == "InService" and endpoint["model_package_version"] == 1
    (model,) = json.loads(kennel(home, "models", "--json").stdout)
    assert model["approval_description"] == "reviewed the metrics" and model["execution_arn"].endswith(first_execution)
    assert set(model["metrics"]) == {"test_loss", "test_accuracy"} and model["metrics"]["test_loss"] <= THRESHOLD
    assert [(c["to_status"], c["reason"]) for c in model["history"]] == [
        ("PendingManualApproval", "registered"), ("Approved", "reviewed the metrics")]

    image = sorted((SAMPLE / "test" / "sneaker").iterdir())[0]
    predictions = predict(home, image)
    assert len(predictions) == 3 and predictions[0]["label"] in CLASSES

    import boto3

    runtime = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=endpoint["url"],
                           aws_access_key_id="local", aws_secret_access_key="local")
    answer = runtime.invoke_endpoint(EndpointName="kennel-endpoint", ContentType="image/png", Body=image.read_bytes())
    via_boto3 = json.loads(answer["Body"].read())["predictions"]
    assert via_boto3[0]["label"] == predictions[0]["label"]
    assert via_boto3[0]["probability"] == pytest.approx(predictions[0]["probability"], abs=1e-6)


def test_a_second_run_hits_the_cache_and_rejecting_rolls_back(home: Path, first_execution: str) -> None:
    second = kennel(home, "run", "--wait", *params(*SMALL), "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    execution = json.loads(second.stdout)["execution_id"]
    steps = {step["name"]: step for step in status_json(home, execution)["steps"]}
    assert all(steps[name]["cached"] for name in ("PrepareData", "Tune", "TrainWithDebugger", "Evaluate"))
    assert not steps["Register"]["cached"]
    # The cached steps still show the report and plots their original jobs drew.
    shown = kennel(home, "status", execution).stdout
    for line in ("TrainWithDebugger: profiler report: ", "TrainWithDebugger: plot training_curves: ",
                 "Evaluate: plot confusion_matrix: "):
        assert line in shown, shown

    assert kennel(home, "approve", "--version", "2").returncode == 0
    (endpoint,) = json.loads(kennel(home, "endpoints", "--json").stdout)
    assert endpoint["model_package_version"] == 2

    rejected = kennel(home, "reject", "--version", "2", "--reason", "regression on sneakers")
    assert rejected.returncode == 0, rejected.stderr
    (endpoint,) = json.loads(kennel(home, "endpoints", "--json").stdout)
    assert endpoint["status"] == "InService" and endpoint["model_package_version"] == 1
    models = {m["version"]: m["approval_status"] for m in json.loads(kennel(home, "models", "--json").stdout)}
    assert models == {1: "Approved", 2: "Rejected"}


def test_an_impossible_threshold_ends_in_the_fail_step(home: Path, first_execution: str) -> None:
    result = kennel(home, "run", "--wait", *params(*SMALL[:-1], "TestLossThreshold=0.0001"))
    assert result.returncode == 1
    assert "is above TestLossThreshold 0.0001" in result.stdout, result.stdout[-2000:]
    execution = json.loads(kennel(home, "status", "--json").stdout)["newest"]
    assert execution["status"] == "Failed"
    fail = next(step for step in execution["steps"] if step["name"] == "Fail")
    assert "0.0001" in fail["failure_reason"]
    assert not any(step["name"] == "Register" for step in execution["steps"])


def test_unknown_parameters_and_wrong_types_are_one_clear_error(home: Path) -> None:
    unknown = kennel(home, "run", "--param", "Epoch=3")
    assert unknown.returncode != 0 and "no such pipeline parameter" in unknown.stderr
    assert "Traceback" not in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1
    wrong = kennel(home, "run", "--param", "Epochs=many")
    assert wrong.returncode != 0 and "Epochs must be an integer" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_status_shows_the_debugger_and_profiler_rules_the_report_and_the_plots(
    home: Path, first_execution: str
) -> None:
    text = kennel(home, "status", first_execution).stdout
    for rule in ("LossNotDecreasing", "VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization"):
        assert f"TrainWithDebugger: Debugger rule {rule}: " in text, text
    assert "TrainWithDebugger: profiler rule ProfilerReport: " in text
    report = next(line.split("profiler report: ", 1)[1] for line in text.splitlines() if "profiler report: " in line)
    assert report.endswith(".html") and Path(report).is_file()
    plots = [line.split(": ", 2)[2] for line in text.splitlines() if ": plot " in line]
    assert plots and all(Path(plot).is_file() and plot.endswith(".png") for plot in plots)
    assert any("confusion" in plot for plot in plots) and any("training" in plot for plot in plots)
    assert "CheckTestLoss: condition LessThanOrEqualTo:" in text


def prepared(home: Path, execution: str) -> tuple[str, list[str]]:
    """What PrepareData read (its data input) and the classes its manifest.json lists."""
    prepare = step_record(home, execution, "PrepareData")
    # Its properties (DescribeProcessingJob's answer), whether the job ran or came from the cache.
    inputs = prepare["Properties"]["ProcessingInputs"]
    data = next(item["S3Input"]["S3Uri"] for item in inputs if item["InputName"] == "data")
    report = next(o["S3Output"]["S3Uri"] for o in prepare["Properties"]["ProcessingOutputConfig"]["Outputs"]
                  if o["OutputName"] == "report")
    manifest = json.loads((home / "s3" / report.removeprefix("s3://").rstrip("/") / "manifest.json").read_text())
    return data, manifest["classes"]


MY_CLASSES = ["bag", "sandal", "trouser"]
TINY = ["MaxJobs=1", "MaxParallelJobs=1", "Epochs=1", "ImageSize=32", "TestLossThreshold=100"]


def my_photos(root: Path) -> Path:
    """A small ImageFolder tree, one folder per class (prepare splits it)."""
    for label in MY_CLASSES:
        (root / label).mkdir(parents=True)
        for image in sorted((SAMPLE / "train" / label).iterdir())[:12]:
            (root / label / image.name).write_bytes(image.read_bytes())
    return root


def test_a_run_on_your_own_folder_stays_apart_from_the_sample(home: Path, first_execution: str, tmp_path: Path) -> None:
    tree = my_photos(tmp_path / "my-photos")
    own = kennel(home, "run", "--wait", "--data", str(tree), *params(*TINY), "--json")
    assert own.returncode == 0, own.stderr[-3000:]
    data, classes = prepared(home, json.loads(own.stdout)["execution_id"])
    assert data.startswith("s3://kennel-local/kennel/uploads/my-photos-") and classes == MY_CLASSES

    # The upload lives apart from the sample: the sample's prefix holds the bundled sample alone
    # (an upload inside it would become a "class", or mix split folders with class folders)...
    def files(root: Path) -> set[str]:
        return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}

    assert files(home / "s3" / "kennel-local" / "kennel" / "data" / "sample") == files(SAMPLE)
    assert files(home / "s3" / data.removeprefix("s3://").rstrip("/")) == files(tree)
    # ...and a plain run after it still reads the sample, and only the sample.
    plain = kennel(home, "run", "--wait", *params(*SMALL), "--json")
    assert plain.returncode == 0, plain.stderr[-3000:]
    data, classes = prepared(home, json.loads(plain.stdout)["execution_id"])
    assert data == "s3://kennel-local/kennel/data/sample" and classes == CLASSES


def cache_keys(target, definition: dict, execution, steps: tuple[str, ...]) -> dict[str, str]:
    """The runner's cache keys for `steps` of `definition`, resolved against what `execution`'s
    steps produced (so upstream results are the same whatever the definition)."""
    from local.cache import cache_key
    from local.expressions import Scope, resolve
    from local.graph import build_graph

    nodes = build_graph(definition)
    scope = Scope(parameters=execution.parameters, execution=execution.variables(),
                  steps={name: record.properties for name, record in execution.steps.items()
                         if record.status == "Succeeded"},
                  read_json=lambda uri: json.loads(target.store.read_bytes(uri)))
    return {name: cache_key(execution.pipeline_name, nodes[name].step, resolve(nodes[name].step["Arguments"], scope),
                            target.store) for name in steps}


def test_an_unchanged_upsert_hits_the_cache_and_a_changed_script_misses_it(
    home: Path, first_execution: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job steps key on their code's content (the code and sm_drivers channels, the tuner's
    sagemaker_submit_directory), not on the time-stamped keys each upsert uploads to: re-upserting
    the same code keeps every key of the first execution, a changed script changes the keys of the
    steps that run it. (Keys are the runner's own, computed against the first execution's results.)"""
    import shutil

    from kennel_support import repo_config

    from local.cache import StepCache
    from local.state import load_execution
    from pipeline.definition import offline_environment
    from pipeline.local_target import LocalTarget

    for name in [name for name in os.environ if name.startswith("KENNEL_")]:
        monkeypatch.delenv(name)
    with offline_environment(repo_config().for_target("local")):  # the SDK wants a region to import
        from steps import common
    code = tmp_path / "entrypoints"  # what gets upserted: a copy, so the test may change it
    shutil.copytree(REPO_ROOT / "entrypoints", code, ignore=shutil.ignore_patterns("__pycache__"))
    stage = common.stage_source_dir
    target = LocalTarget(repo_config().for_target("local"), home=home)
    first = load_execution(home, first_execution)
    jobs = ("PrepareData", "Tune", "TrainWithDebugger", "Evaluate")
    cache = StepCache(home)
    stored = cache_keys(target, target.definition(), first, jobs)
    assert all(cache.lookup(first.pipeline_name, name, key, None) for name, key in stored.items())

    monkeypatch.setattr(common, "stage_source_dir", lambda destination: stage(destination, source=code))
    try:
        target.upsert()  # the same code, uploaded afresh under new keys
        assert cache_keys(target, target.definition(), first, jobs) == stored

        with (code / "train.py").open("a") as script:
            script.write("# a comment changes no behaviour, but it is other code\n")
        target.upsert()
        changed = cache_keys(target, target.definition(), first, jobs)
        for name in ("Tune", "TrainWithDebugger"):  # the same upstream results: only the code differs
            assert changed[name] != stored[name]
            assert cache.lookup(first.pipeline_name, name, changed[name], None) is None
    finally:
        monkeypatch.setattr(common, "stage_source_dir", stage)
        target.upsert()  # leave the home with the repository's code, as the other tests found it
