"""Training steps as local jobs: the container contract re-rooted, artifacts, metrics, checkpoints."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path

import pytest
from debugger_support import run_debug_pipeline
from test_local_support import BUCKET, definition, get, processing_step, store_for, training_step

from entrypoints import contract
from local.jobs.training import gpu_count
from local.progress import step_details
from local.runner import RunOptions, run_pipeline
from local.state import load_execution

FAST = RunOptions(stop_grace_seconds=1.0, cores=2)

# Records everything it was given, trains "two epochs", saves a model and some output data.
RECORDING_TRAINER = """
    import json, os, pathlib, sys
    from helper import VALUE  # a sibling module of the code channel, imported flat
    model = pathlib.Path(os.environ["SM_MODEL_DIR"])
    seen = {
        "argv": sys.argv[1:],
        "env": {key: value for key, value in os.environ.items()
                if key.startswith(("SM_", "TRAINING_", "SAGEMAKER_", "KENNEL_", "SMDEBUG_"))},
        "train_files": sorted(p.name for p in pathlib.Path(os.environ["SM_CHANNEL_TRAIN"]).iterdir()),
        "value": VALUE,
    }
    for epoch in (1, 2):
        print(f"epoch={epoch} train_loss={1.0 / epoch:.3f} valid_loss={0.8 / epoch:.3f} "
              f"valid_accuracy={0.5 * epoch:.3f}")
    (model / "model.pth").write_text("weights")
    (model / "seen.json").write_text(json.dumps(seen))
    out = pathlib.Path(os.environ["SM_OUTPUT_DATA_DIR"])
    (out / "report.txt").write_text("report")
"""

METRICS = [
    {"Name": "train:loss", "Regex": r"train_loss=([0-9\\.]+)"},
    {"Name": "valid:loss", "Regex": r"valid_loss=([0-9\\.]+)"},
]


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return {
            member.name: archive.extractfile(member).read()
            for member in archive.getmembers()
            if member.isfile()
        }


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "kennel"
    store = store_for(home)
    store.put_bytes(f"{BUCKET}/data/train/a.png", b"a")
    store.put_bytes(f"{BUCKET}/data/train/b.png", b"b")
    return home


def test_model_trainer_job_honours_the_container_contract(home: Path) -> None:
    train = training_step(
        home,
        "Train",
        RECORDING_TRAINER,
        channels={"train": f"{BUCKET}/data/train"},
        hyperparameters={
            "epochs": get("Parameters.Epochs"),
            "lr": "0.1",
            "use-amp": "true",
            "arch": "resnet18",
        },
        metric_definitions=METRICS,
    )
    pipeline = definition(train, parameters=[{"Name": "Epochs", "Type": "Integer", "DefaultValue": 2}])
    execution = run_pipeline(pipeline, {}, home, options=FAST)

    assert execution.status == "Succeeded", execution.failure_reason
    record = execution.steps["Train"]
    job_name = record.properties["TrainingJobName"]
    artifact = f"{BUCKET}/models/{job_name}/output/model.tar.gz"
    assert record.properties["ModelArtifacts"] == {"S3ModelArtifacts": artifact}
    assert record.properties["TrainingJobStatus"] == "Completed"
    assert record.properties["HyperParameters"] == {
        "epochs": "2",
        "lr": "0.1",
        "use-amp": "true",
        "arch": "resnet18",
    }
    final = {item["MetricName"]: item["Value"] for item in record.properties["FinalMetricDataList"]}
    assert final == {"train:loss": 0.5, "valid:loss": 0.4}

    store = store_for(home)
    model = _members(store.read_bytes(artifact))
    assert set(model) == {"model.pth", "seen.json"}  # the files of /opt/ml/model at the top level
    assert _members(store.read_bytes(f"{BUCKET}/models/{job_name}/output/output.tar.gz")) == {
        "report.txt": b"report"
    }

    seen = json.loads(model["seen.json"])
    # The v3 driver passes hyperparameters in request order, JSON values as JSON.
    assert seen["argv"] == ["--epochs", "2", "--lr", "0.1", "--use-amp", "true", "--arch", "resnet18"]
    assert seen["train_files"] == ["a.png", "b.png"] and seen["value"] == 41
    root = Path(record.job_dir) / "opt_ml"
    env = seen["env"]
    assert env["SAGEMAKER_BASE_DIR"] == str(root)
    assert env["SM_MODEL_DIR"] == str(root / "model")
    assert env["SM_CHANNEL_TRAIN"] == str(root / "input" / "data" / "train")
    assert json.loads(env["SM_CHANNELS"]) == ["code", "sm_drivers", "train"]
    assert json.loads(env["SM_HPS"]) == {"epochs": 2, "lr": 0.1, "use-amp": True, "arch": "resnet18"}
    assert env["SM_HP_USE-AMP"] == "true" and env["SM_HP_ARCH"] == "resnet18"
    assert env["SM_OUTPUT_DATA_DIR"] == str(root / "output" / "data")
    assert env["SM_INPUT_CONFIG_DIR"] == str(root / "input" / "config")
    assert json.loads(env["SM_HOSTS"]) == ["algo-1"] and env["SM_CURRENT_HOST"] == "algo-1"
    assert env["SM_NUM_CPUS"] == "2" and env["SM_NUM_GPUS"].isdigit()
    assert env["TRAINING_JOB_NAME"] == job_name
    assert env["KENNEL_CHECKPOINT_DIR"] == str(root / "checkpoints")
    config = root / "input" / "config"
    assert json.loads((config / "hyperparameters.json").read_text())["epochs"] == "2"
    assert set(json.loads((config / "inputdataconfig.json").read_text())) == {"train", "code", "sm_drivers"}
    assert json.loads((config / "resourceconfig.json").read_text())["current_host"] == "algo-1"
    assert "epoch=2" in Path(record.log_path).read_text()


def test_failure_file_becomes_the_failure_reason(home: Path) -> None:
    train = training_step(
        home,
        "Train",
        """
        import os, pathlib, sys
        failure = pathlib.Path(os.environ["SM_OUTPUT_DIR"]) / "failure"
        failure.write_text("ValueError: --lr must be positive, got -1")
        sys.exit(2)
        """,
        channels={"train": f"{BUCKET}/data/train"},
        hyperparameters={"lr": "-1"},
    )
    execution = run_pipeline(definition(train), {}, home, options=FAST)
    record = execution.steps["Train"]
    assert record.status == "Failed"
    assert record.failure_reason.startswith(
        "AlgorithmError: ValueError: --lr must be positive, got -1, exit code: 2"
    )
    assert record.properties["FailureReason"].startswith("AlgorithmError: ValueError")
    assert "ModelArtifacts" not in record.properties


CHECKPOINTING = """
    import os, pathlib, sys
    checkpoints = pathlib.Path(os.environ["KENNEL_CHECKPOINT_DIR"])
    previous = checkpoints / "checkpoint.txt"
    start = int(previous.read_text()) + 1 if previous.exists() else 1
    print("starting at epoch", start)
    for epoch in range(start, 4):
        temp = checkpoints / "checkpoint.txt.tmp"
        temp.write_text(str(epoch))
        temp.replace(previous)
        if epoch == 2 and start == 1:
            sys.exit("interrupted after epoch 2")
    (pathlib.Path(os.environ["SM_MODEL_DIR"]) / "model.txt").write_text("trained from epoch " + str(start))
"""


def test_checkpoints_carry_over_to_the_next_job(home: Path) -> None:
    train = training_step(
        home,
        "Train",
        CHECKPOINTING,
        channels={"train": f"{BUCKET}/data/train"},
        hyperparameters={},
        arguments={"CheckpointConfig": {"S3Uri": f"{BUCKET}/checkpoints/train"}},
    )
    first = run_pipeline(definition(train), {}, home, options=FAST)
    assert first.status == "Failed"
    assert store_for(home).read_bytes(f"{BUCKET}/checkpoints/train/checkpoint.txt") == b"2"

    second = run_pipeline(definition(train), {}, home, options=FAST)
    assert second.status == "Succeeded", second.failure_reason
    assert "starting at epoch 3" in Path(second.steps["Train"].log_path).read_text()
    artifact = second.steps["Train"].properties["ModelArtifacts"]["S3ModelArtifacts"]
    assert _members(store_for(home).read_bytes(artifact)) == {"model.txt": b"trained from epoch 3"}


def test_debugger_hook_config_is_rerooted_and_tensors_kept(home: Path) -> None:
    train = training_step(
        home,
        "Train",
        """
        import json, os, pathlib
        config = json.loads(pathlib.Path(os.environ["SMDEBUG_CONFIG_FILE_PATH"]).read_text())
        tensors = pathlib.Path(config["LocalPath"])
        (tensors / "step_0.json").write_text(json.dumps(config["HookParameters"]))
        """,
        channels={"train": f"{BUCKET}/data/train"},
        hyperparameters={},
        arguments={
            "DebugHookConfig": {
                "S3OutputPath": f"{BUCKET}/debug",
                "HookParameters": {"save_interval": "10"},
                "CollectionConfigurations": [{"CollectionName": "losses"}],
            },
            "DebugRuleConfigurations": [
                {"RuleConfigurationName": "LossNotDecreasing", "RuleEvaluatorImage": "img"}
            ],
        },
    )
    execution = run_pipeline(definition(train), {}, home, options=FAST)
    assert execution.status == "Succeeded", execution.failure_reason
    record = execution.steps["Train"]
    root = Path(record.job_dir) / "opt_ml"
    hook = json.loads((root / "input" / "config" / "debughookconfig.json").read_text())
    assert hook["LocalPath"] == str(root / "output" / "tensors")
    job_name = record.properties["TrainingJobName"]
    saved = store_for(home).read_bytes(f"{BUCKET}/debug/{job_name}/debug-output/step_0.json")
    assert json.loads(saved) == {"save_interval": "10"}
    statuses = record.properties["DebugRuleEvaluationStatuses"]
    assert [item["RuleConfigurationName"] for item in statuses] == ["LossNotDecreasing"]


def test_a_processing_step_reads_the_trained_model(home: Path) -> None:
    train = training_step(
        home, "Train", RECORDING_TRAINER, channels={"train": f"{BUCKET}/data/train"}, hyperparameters={}
    )
    evaluate = processing_step(
        home,
        "Evaluate",
        """
        import os, pathlib, tarfile
        model = pathlib.Path(os.environ["SAGEMAKER_BASE_DIR"]) / "processing" / "model"
        with tarfile.open(model / "model.tar.gz") as archive:
            print("model holds", sorted(archive.getnames()))
        """,
        inputs=[("model", get("Steps.Train.ModelArtifacts.S3ModelArtifacts"), "/opt/ml/processing/model")],
    )
    execution = run_pipeline(definition(train, evaluate), {}, home, options=FAST)
    assert execution.status == "Succeeded", execution.failure_reason
    assert "model holds ['model.pth', 'seen.json']" in Path(execution.steps["Evaluate"].log_path).read_text()


def test_unsupported_training_requests_say_what_runs_locally(home: Path) -> None:
    step = {
        "Name": "BuiltIn",
        "Type": "Training",
        "Arguments": {
            "AlgorithmSpecification": {"TrainingImage": "xgboost:1", "TrainingInputMode": "File"},
            "HyperParameters": {"num_round": "10"},
            "OutputDataConfig": {"S3OutputPath": f"{BUCKET}/out"},
            "InputDataConfig": [],
        },
    }
    execution = run_pipeline(definition(step), {}, home, options=FAST)
    assert "the local runner runs script-mode training only" in execution.steps["BuiltIn"].failure_reason


def test_a_job_past_its_max_runtime_is_stopped_as_sagemaker_reports_it(home: Path) -> None:
    train = training_step(
        home,
        "Train",
        """
        import os, pathlib, time
        print("epoch=1 train_loss=1.000 valid_loss=0.900 valid_accuracy=0.500", flush=True)
        (pathlib.Path(os.environ["SM_MODEL_DIR"]) / "model.pth").write_text("weights of epoch 1")
        time.sleep(60)
        """,
        channels={"train": f"{BUCKET}/data/train"},
        hyperparameters={},
        metric_definitions=METRICS,
        timeout=3,
    )
    started = time.monotonic()
    execution = run_pipeline(definition(train), {}, home, options=FAST)
    assert time.monotonic() - started < 30
    record = execution.steps["Train"]
    # DescribeTrainingJob's words for a job stopped at StoppingCondition.MaxRuntimeInSeconds.
    assert record.properties["TrainingJobStatus"] == "Stopped"
    assert record.properties["SecondaryStatus"] == "MaxRuntimeExceeded"
    assert "FailureReason" not in record.properties and record.properties["TrainingEndTime"]
    # The pipeline cannot go on without the job's model: the step fails and says why.
    assert record.status == "Failed" and execution.status == "Failed"
    assert "ran past StoppingCondition.MaxRuntimeInSeconds (3 s)" in record.failure_reason
    assert "MaxRuntimeInSeconds (3 s)" in execution.failure_reason
    # As on SageMaker, what the job saved in /opt/ml/model before it was stopped is uploaded.
    artifact = record.properties["ModelArtifacts"]["S3ModelArtifacts"]
    assert _members(store_for(home).read_bytes(artifact)) == {"model.pth": b"weights of epoch 1"}
    final = {item["MetricName"]: item["Value"] for item in record.properties["FinalMetricDataList"]}
    assert final == {"train:loss": 1.0, "valid:loss": 0.9}


def assert_reports_kept(home: Path, execution_id: str, step: str) -> list[str]:
    """The failed step's profiler report, plots and Debugger files, as stored and as `kennel status`
    lists them; returns its status lines."""
    record = load_execution(home, execution_id).steps[step]
    lines = step_details(record)
    report = record.metadata["Profiler"]["Report"]
    assert Path(report).is_file() and f"profiler report: {report}" in lines
    plots = {plot["Name"]: plot["Path"] for plot in record.metadata["Plots"]}
    assert Path(plots["training_curves"]).is_file()
    assert f"plot training_curves: {plots['training_curves']}" in lines
    assert Path(record.metadata["Debugger"]["RuleStatuses"]).is_file()
    assert [status["RuleEvaluationStatus"] for status in record.properties["ProfilerRuleEvaluationStatuses"]]
    return lines


DEBUG_AND_PROFILER = {
    "DebugHookConfig": {
        "S3OutputPath": f"{BUCKET}/debug",
        "CollectionConfigurations": [{"CollectionName": "losses"}],
    },
    "DebugRuleConfigurations": [
        {
            "RuleConfigurationName": "LossNotDecreasing",
            "RuleEvaluatorImage": "img",
            "RuleParameters": {"rule_to_invoke": "LossNotDecreasing"},
        }
    ],
    "ProfilerConfig": {"S3OutputPath": f"{BUCKET}/profiler", "ProfilingIntervalInMilliseconds": 200},
    "ProfilerRuleConfigurations": [
        {
            "RuleConfigurationName": "ProfilerReport",
            "RuleEvaluatorImage": "img",
            "RuleParameters": {"rule_to_invoke": "ProfilerReport"},
        }
    ],
}


def test_a_job_whose_upload_fails_keeps_its_reports(home: Path) -> None:
    # The job trains, then its model cannot be stored: an object sits where the output prefix should be.
    store_for(home).put_bytes(f"{BUCKET}/blocked", b"not a prefix")
    train = training_step(
        home,
        "Train",
        """
        import os, pathlib
        for epoch in (1, 2):
            print(f"epoch={epoch} train_loss={1.0 / epoch:.3f} valid_loss={0.8 / epoch:.3f} "
                  f"valid_accuracy={0.5 * epoch:.3f}")
        (pathlib.Path(os.environ["SM_MODEL_DIR"]) / "model.pth").write_text("weights")
        """,
        channels={"train": f"{BUCKET}/data/train"},
        hyperparameters={},
        metric_definitions=METRICS,
        output_path=f"{BUCKET}/blocked/models",
        arguments=DEBUG_AND_PROFILER,
    )
    execution = run_pipeline(definition(train), {}, home, options=FAST)
    record = execution.steps["Train"]
    assert record.status == "Failed" and "uploading the model" in record.failure_reason
    lines = assert_reports_kept(home, execution.execution_id, "Train")
    assert "profiler rule ProfilerReport: NoIssuesFound - no rule triggered" in " ".join(lines)
    # The script saved no tensors: the rule says so, and that reaches the step too.
    assert any(line.startswith("Debugger rule LossNotDecreasing: Error") for line in lines)


@pytest.mark.slow
def test_a_training_that_fails_after_an_epoch_keeps_its_reports(offline_builds, tmp_path: Path) -> None:
    # train.py itself fails after its first epoch: a folder stands where its checkpoint file goes.
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / contract.CHECKPOINT_FILE).mkdir(parents=True)
    run = run_debug_pipeline(offline_builds["local"], tmp_path, hyperparameters={"checkpoint-dir": str(checkpoints)})
    record = run.train
    assert record.status == "Failed" and record.failure_reason.startswith("AlgorithmError:")
    assert "I/O error on " in record.failure_reason and "Traceback" not in record.failure_reason
    log = Path(record.log_path).read_text()
    assert re.findall(r"^epoch=(\d+) ", log, re.MULTILINE) == ["1"]
    lines = assert_reports_kept(run.home, run.execution.execution_id, record.name)
    # Every rule settled on what the epoch left, and `kennel status` lists them.
    for status in record.properties["DebugRuleEvaluationStatuses"]:
        assert status["RuleEvaluationStatus"] != "InProgress"
        assert (
            f"Debugger rule {status['RuleConfigurationName']}: {status['RuleEvaluationStatus']}"
            in " ".join(lines)
        )
    # The plot shows the one epoch the job trained, from its tensors.
    [plot] = record.metadata["Plots"]
    drawn = json.loads(Path(plot["Data"]).read_text())["by_epoch"]
    assert drawn["source"] == "tensors" and drawn["epoch"] == [1]


def test_only_numbered_nvidia_devices_are_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for name in (
        "nvidia0",
        "nvidia1",
        "nvidiactl",
        "nvidia-uvm",
        "nvidia-uvm-tools",
        "nvidia-modeset",
        "null",
    ):
        (tmp_path / name).touch()
    (tmp_path / "nvidia-caps").mkdir()
    assert gpu_count(tmp_path) == 2
    assert gpu_count(tmp_path / "absent") == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert gpu_count(tmp_path) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_count(tmp_path) == 0
