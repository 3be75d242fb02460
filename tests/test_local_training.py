"""Training steps as local jobs: the container contract re-rooted, artifacts, metrics, checkpoints."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from test_local_support import BUCKET, definition, get, processing_step, store_for, training_step

from local.runner import RunOptions, run_pipeline

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
