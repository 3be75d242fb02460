"""Tuning steps: Random, Bayesian and Grid search over a tiny fake training script (no torch)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from datetime import datetime
from pathlib import Path

import pytest
from test_local_support import (
    BUCKET,
    definition,
    get,
    processing_step,
    store_for,
    training_step,
    tuning_step,
)

from local.graph import GraphError
from local.handlers import StepFailure
from local.jobs.tuning import (
    MedianStopper,
    ParameterRange,
    RandomStrategy,
    make_strategy,
    parse_config,
    trial_request,
)
from local.runner import RunOptions, run_pipeline
from local.state import list_executions

FAST = RunOptions(stop_grace_seconds=1.0, cores=2)

# A "training" whose validation loss is a known function of its hyperparameters, per epoch.
FAKE_TRAINER = """
    import argparse, json, os, pathlib, time
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pretrained", default="True")
    args = parser.parse_args()
    penalty = {"sgd": 0.5, "adam": 0.0, "good": 0.0, "bad": 5.0}[args.optimizer.split("-")[0]]
    final = abs(args.lr - 0.03) * 10 + args.batch_size / 100 + penalty
    for epoch in range(1, args.epochs + 1):
        if penalty >= 5.0:
            time.sleep(0.5)  # slow and bad: early stopping should catch it
        print(f"epoch={epoch} valid_loss={final + (args.epochs - epoch):.6f} valid_accuracy=0.5")
    model = pathlib.Path(os.environ["SM_MODEL_DIR"])
    (model / "params.json").write_text(json.dumps(vars(args)))
    print("argv", os.environ["SM_HPS"])
"""

RANGES = {
    "ContinuousParameterRanges": [
        {"Name": "lr", "MinValue": "0.0001", "MaxValue": "0.1", "ScalingType": "Logarithmic"}
    ],
    "IntegerParameterRanges": [
        {"Name": "batch-size", "MinValue": "8", "MaxValue": "32", "ScalingType": "Auto"}
    ],
    "CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["sgd", "adam"]}],
}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "kennel"
    store_for(home).put_bytes(f"{BUCKET}/data/train/a.png", b"a")
    return home


def expected_loss(hyperparameters: dict[str, str]) -> float:
    penalty = {"sgd": 0.5, "adam": 0.0}[hyperparameters["optimizer"]]
    return abs(float(hyperparameters["lr"]) - 0.03) * 10 + int(hyperparameters["batch-size"]) / 100 + penalty


def _model(store_bytes: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(store_bytes), mode="r:gz") as archive:
        return json.loads(archive.extractfile("params.json").read())


@pytest.mark.parametrize(("strategy", "jobs", "parallel"), [("Random", 4, 2), ("Bayesian", 5, 2)])
def test_random_and_bayesian_search(home: Path, strategy: str, jobs: int, parallel: int) -> None:
    tune = tuning_step(
        home,
        "Tune",
        FAKE_TRAINER,
        strategy=strategy,
        ranges=RANGES,
        channels={"train": f"{BUCKET}/data/train"},
        static={
            "epochs": {"Std:Join": {"On": "", "Values": [get("Parameters.Epochs")]}},
            "pretrained": "True",
        },
        max_jobs=jobs,
        max_parallel=parallel,
    )
    # The best model, found the way TuningStep.get_top_model_s3_uri writes it into a definition.
    best_model = {
        "Std:Join": {
            "On": "/",
            "Values": [
                "s3:/",
                BUCKET[len("s3://") :],
                "tuning",
                get("Steps.Tune.TrainingJobSummaries[0].TrainingJobName"),
                "output/model.tar.gz",
            ],
        }
    }
    reader = processing_step(
        home,
        "UseBest",
        "import sys; print('lr for training:', sys.argv[2])",
        inputs=[("best", best_model, "/opt/ml/processing/best")],
        arguments=["--lr", get("Steps.Tune.BestTrainingJob.TunedHyperParameters['lr']")],
    )
    pipeline = definition(tune, reader, parameters=[{"Name": "Epochs", "Type": "Integer", "DefaultValue": 2}])
    execution = run_pipeline(pipeline, {}, home, options=FAST)

    assert execution.status == "Succeeded", execution.failure_reason
    properties = execution.steps["Tune"].properties
    summaries = properties["TrainingJobSummaries"]
    assert len(summaries) == jobs
    assert properties["TrainingJobStatusCounters"]["Completed"] == jobs
    assert properties["ObjectiveStatusCounters"] == {"Succeeded": jobs, "Pending": 0, "Failed": 0}
    values = [item["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] for item in summaries]
    assert values == sorted(values)  # best first, as the pipeline properties list them
    for item in summaries:
        tuned = item["TunedHyperParameters"]
        assert 0.0001 <= float(tuned["lr"]) <= 0.1
        assert 8 <= int(tuned["batch-size"]) <= 32 and tuned["batch-size"] == str(int(tuned["batch-size"]))
        assert tuned["optimizer"] in ("sgd", "adam")
        # The objective is the final value of the metric in the trial's log (epoch 2 of 2).
        assert item["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] == pytest.approx(
            expected_loss(tuned), abs=1e-5
        )
        assert Path(item["LogPath"]).is_file()
    best = properties["BestTrainingJob"]
    assert best["TrainingJobName"] == summaries[0]["TrainingJobName"]
    assert best["FinalHyperParameterTuningJobObjectiveMetric"]["MetricName"] == "valid:loss"
    # The best trial's model is in the store where get_top_model_s3_uri points, and it was trained
    # with the static and tuned hyperparameters (toolkit style: sorted --name value, True as True).
    store = store_for(home)
    params = _model(store.read_bytes(f"{BUCKET}/tuning/{best['TrainingJobName']}/output/model.tar.gz"))
    assert params["epochs"] == 2 and params["pretrained"] == "True"
    assert params["lr"] == pytest.approx(float(best["TunedHyperParameters"]["lr"]))
    log = Path(execution.steps["UseBest"].log_path).read_text()
    assert f"lr for training: {best['TunedHyperParameters']['lr']}" in log
    trials = json.loads((Path(execution.steps["Tune"].job_dir) / "trials.json").read_text())
    assert trials["Strategy"] == strategy and len(trials["ObjectiveSeries"]) == jobs


def test_grid_search_covers_every_combination(home: Path) -> None:
    ranges = {
        "CategoricalParameterRanges": [
            {"Name": "optimizer", "Values": ["sgd", "adam"]},
            {"Name": "batch-size", "Values": ["8", "16"]},
        ]
    }
    tune = tuning_step(
        home,
        "Tune",
        FAKE_TRAINER,
        strategy="Grid",
        ranges=ranges,
        channels={"train": f"{BUCKET}/data/train"},
        static={"epochs": "1"},
        max_jobs=None,
        max_parallel=2,
    )
    execution = run_pipeline(definition(tune), {}, home, options=FAST)
    assert execution.status == "Succeeded", execution.failure_reason
    summaries = execution.steps["Tune"].properties["TrainingJobSummaries"]
    combinations = {
        (item["TunedHyperParameters"]["optimizer"], item["TunedHyperParameters"]["batch-size"])
        for item in summaries
    }
    assert combinations == {("sgd", "8"), ("sgd", "16"), ("adam", "8"), ("adam", "16")}
    assert execution.steps["Tune"].properties["BestTrainingJob"]["TunedHyperParameters"] == {
        "optimizer": "adam",
        "batch-size": "8",
    }


def test_early_stopping_stops_a_trial_worse_than_the_median(home: Path) -> None:
    # Grid keeps the order: three good trials complete, then the bad one is judged against them.
    ranges = {
        "CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["good-1", "good-2", "good-3", "bad"]}]
    }
    tune = tuning_step(
        home,
        "Tune",
        FAKE_TRAINER,
        strategy="Grid",
        ranges=ranges,
        channels={"train": f"{BUCKET}/data/train"},
        static={"epochs": "6"},
        max_jobs=None,
        max_parallel=1,
        early_stopping="Auto",
    )
    execution = run_pipeline(definition(tune), {}, home, options=FAST)
    assert execution.status == "Succeeded", execution.failure_reason
    summaries = {
        item["TunedHyperParameters"]["optimizer"]: item
        for item in execution.steps["Tune"].properties["TrainingJobSummaries"]
    }
    assert [summaries[f"good-{n}"]["TrainingJobStatus"] for n in (1, 2, 3)] == ["Completed"] * 3
    bad = summaries["bad"]
    assert bad["TrainingJobStatus"] == "Stopped"
    assert bad["ObjectiveStatus"] == "Succeeded"  # its last reported value still counts, as on SageMaker
    log = Path(bad["LogPath"]).read_text()
    assert "epoch=1 " in log and "epoch=6 " not in log
    assert execution.steps["Tune"].properties["TrainingJobStatusCounters"]["Stopped"] == 1


def test_no_objective_in_the_logs_fails_the_tuning_step(home: Path) -> None:
    tune = tuning_step(
        home,
        "Tune",
        "print('no metrics here')",
        strategy="Random",
        ranges=RANGES,
        channels={"train": f"{BUCKET}/data/train"},
        static={},
        max_jobs=2,
    )
    execution = run_pipeline(definition(tune), {}, home, options=FAST)
    record = execution.steps["Tune"]
    assert record.status == "Failed"
    assert "no training job reported the objective metric 'valid:loss'" in record.failure_reason
    assert record.properties["ObjectiveStatusCounters"]["Failed"] == 2


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"Strategy": "Hyperband"}, "tuning strategy 'Hyperband' is not supported locally"),
        ({"Strategy": "Grid"}, "the Grid strategy takes categorical ranges only"),
        (
            {"ResourceLimits": {"MaxParallelTrainingJobs": 1}},
            "MaxNumberOfTrainingJobs must be a positive integer",
        ),
        (
            {
                "ParameterRanges": {
                    "ContinuousParameterRanges": [
                        {"Name": "lr", "MinValue": "0", "MaxValue": "1", "ScalingType": "Logarithmic"}
                    ]
                }
            },
            "needs MinValue > 0",
        ),
    ],
)
def test_tuning_config_errors(change: dict, words: str) -> None:
    config = {
        "Strategy": "Random",
        "ResourceLimits": {"MaxNumberOfTrainingJobs": 2, "MaxParallelTrainingJobs": 1},
        "HyperParameterTuningJobObjective": {"Type": "Minimize", "MetricName": "valid:loss"},
        "ParameterRanges": RANGES,
    }
    config.update(change)
    with pytest.raises(StepFailure) as raised:
        parse_config({"HyperParameterTuningJobConfig": config, "TrainingJobDefinition": {}})
    assert words in raised.value.reason


def test_a_strategy_the_local_tuner_lacks_is_refused_before_any_step_runs(home: Path, tmp_path: Path) -> None:
    first = processing_step(home, "First", f"open({str(tmp_path / 'ran')!r}, 'w').close()")
    tune = tuning_step(home, "Tune", "print('never')", strategy="Hyperband", ranges=RANGES,
                       channels={"train": f"{BUCKET}/data/train"}, static={}, max_jobs=2)
    with pytest.raises(GraphError) as raised:
        run_pipeline(definition(first, dict(tune, DependsOn=["First"])), {}, home, options=FAST)
    assert str(raised.value).startswith("step 'Tune': tuning strategy 'Hyperband' is not supported locally")
    assert not (tmp_path / "ran").exists() and list_executions(home) == []


def test_a_missing_metric_definition_fails_clearly(home: Path) -> None:
    tune = tuning_step(
        home,
        "Tune",
        FAKE_TRAINER,
        strategy="Random",
        ranges=RANGES,
        channels={"train": f"{BUCKET}/data/train"},
        static={},
        max_jobs=1,
        objective=("Maximize", "test:accuracy"),
    )
    execution = run_pipeline(definition(tune), {}, home, options=FAST)
    assert (
        "objective metric 'test:accuracy' has no MetricDefinitions entry"
        in execution.steps["Tune"].failure_reason
    )


def test_random_sampling_is_seeded_and_respects_scaling() -> None:
    ranges = (
        ParameterRange("lr", "Continuous", 1e-5, 1e-1, "Logarithmic"),
        ParameterRange("momentum", "Continuous", 0.9, 0.999, "ReverseLogarithmic"),
        ParameterRange("layers", "Integer", 1, 4, "Linear"),
        ParameterRange("width", "Integer", 16, 1024, "Logarithmic"),
        ParameterRange("act", "Categorical", values=("relu", "gelu")),
    )

    def proposals(seed: int) -> list[dict[str, str]]:
        strategy = RandomStrategy(ranges, seed)
        return [strategy.suggest()[1] for _ in range(5)]

    assert proposals(3) == proposals(3)  # same seed, same proposals
    assert proposals(3) != proposals(4)
    strategy = RandomStrategy(ranges, 11)
    drawn = [strategy.suggest()[1] for _ in range(400)]
    lrs = [float(item["lr"]) for item in drawn]
    assert all(1e-5 <= value <= 1e-1 for value in lrs)
    # Log scaling: about half the samples fall below the geometric midpoint (1e-3);
    # linear sampling would put 1% there.
    assert 0.35 < sum(value < 1e-3 for value in lrs) / len(lrs) < 0.65
    momenta = [float(item["momentum"]) for item in drawn]
    assert all(0.9 <= value <= 0.999 for value in momenta)
    assert 0.35 < sum(value > 1 - math.sqrt(0.1 * 0.001) for value in momenta) / len(momenta) < 0.65
    assert {item["layers"] for item in drawn} == {"1", "2", "3", "4"}
    assert all(16 <= int(item["width"]) <= 1024 for item in drawn)
    assert {item["act"] for item in drawn} == {"relu", "gelu"}


def test_bayesian_proposals_stay_in_range() -> None:
    config = parse_config(
        {
            "HyperParameterTuningJobConfig": {
                "Strategy": "Bayesian",
                "ResourceLimits": {"MaxNumberOfTrainingJobs": 12, "MaxParallelTrainingJobs": 1},
                "HyperParameterTuningJobObjective": {"Type": "Minimize", "MetricName": "loss"},
                "ParameterRanges": RANGES,
                "RandomSeed": 5,
            },
            "TrainingJobDefinition": {},
        }
    )
    strategy = make_strategy(config)
    seen = []
    for _ in range(12):
        key, values = strategy.suggest()
        strategy.tell(key, expected_loss(values))
        seen.append(values)
    assert all(0.0001 <= float(values["lr"]) <= 0.1 for values in seen)
    assert all(values["optimizer"] in ("sgd", "adam") for values in seen)
    # After its random start-up trials, TPE leans towards the better optimizer.
    assert sum(values["optimizer"] == "adam" for values in seen[6:]) >= 3


@pytest.mark.parametrize(
    ("completed", "series", "stop"),
    [
        ([[5, 4, 3], [6, 5, 4], [4, 3, 2]], [9], True),  # epoch 1: 9 is worse than the median 5
        ([[5, 4, 3], [6, 5, 4], [4, 3, 2]], [5], False),  # equal to the median: keep going
        ([[5, 4, 3], [6, 5, 4], [4, 3, 2]], [5, 3.9], False),  # running averages 4.5, 5.5, 3.5: median 4.5
        ([[5, 4, 3], [6, 5, 4], [4, 3, 2]], [5, 4.6], True),
        ([[5, 4, 3], [6, 5, 4]], [9], False),  # too few completed trials to judge
        ([[5], [6], [4]], [9, 9], False),  # nobody reached epoch 2
    ],
)
def test_median_stopping_rule(completed: list, series: list, stop: bool) -> None:
    stopper = MedianStopper(minimize=True)
    for done in completed:
        stopper.record(done)
    assert stopper.should_stop(series) is stop
    maximizing = MedianStopper(minimize=False)
    for done in completed:
        maximizing.record([-value for value in done])
    assert maximizing.should_stop([-value for value in series]) is stop


def test_trial_request_merges_static_and_tuned_hyperparameters() -> None:
    request = trial_request(
        {
            "StaticHyperParameters": {"epochs": 3, "sagemaker_program": "train.py"},
            "RoleArn": "r",
            "AlgorithmSpecification": {"MetricDefinitions": []},
        },
        {"lr": "0.1"},
    )
    assert request["HyperParameters"] == {"epochs": "3", "sagemaker_program": "train.py", "lr": "0.1"}
    assert "StaticHyperParameters" not in request and request["RoleArn"] == "r"


SLOW_TRAINER = """
    import time
    time.sleep(1.0)
    print("epoch=1 valid_loss=0.5 valid_accuracy=0.5")
"""


def most_at_once(summaries: list[dict]) -> int:
    """The most trials whose [TrainingStartTime, TrainingEndTime] intervals overlap at one moment."""
    events = sorted(
        [(datetime.fromisoformat(item["TrainingStartTime"]), 1) for item in summaries]
        + [(datetime.fromisoformat(item["TrainingEndTime"]), -1) for item in summaries]
    )
    running = most = 0
    for _, change in events:  # at equal times an end (-1) sorts first: touching is not overlapping
        running += change
        most = max(most, running)
    return most


@pytest.mark.parametrize(("max_parallel", "expected"), [(8, 2), (1, 1)])
def test_parallel_trials_overlap_and_never_exceed_the_cores(
    home: Path, max_parallel: int, expected: int
) -> None:
    tune = tuning_step(
        home,
        "Tune",
        SLOW_TRAINER,
        strategy="Random",
        ranges=RANGES,
        channels={"train": f"{BUCKET}/data/train"},
        static={},
        max_jobs=4,
        max_parallel=max_parallel,
    )
    execution = run_pipeline(definition(tune), {}, home, options=RunOptions(stop_grace_seconds=1.0, cores=2))
    assert execution.status == "Succeeded", execution.failure_reason
    summaries = execution.steps["Tune"].properties["TrainingJobSummaries"]
    assert len(summaries) == 4
    # MaxParallelTrainingJobs=8 on 2 cores: 2 at a time, and they really run at once.
    assert most_at_once(summaries) == expected
    trials = json.loads((Path(execution.steps["Tune"].job_dir) / "trials.json").read_text())
    assert trials["MaxParallelTrainingJobs"] == expected
    log = Path(execution.steps["Tune"].log_path).read_text()
    assert f"4 trials, {expected} at a time ({2 // expected} core(s) each)" in log


def test_job_name_variables_exist_only_in_the_step_that_launches_that_job(home: Path) -> None:
    train = training_step(
        home,
        "Train",
        "print('training')",
        channels={"train": f"{BUCKET}/data/train"},
        hyperparameters={"run-name": get("Execution.TrainingJobName")},
    )
    execution = run_pipeline(definition(train), {}, home, options=FAST)
    assert execution.status == "Succeeded", execution.failure_reason
    properties = execution.steps["Train"].properties
    assert properties["HyperParameters"]["run-name"] == properties["TrainingJobName"]

    # A tuning request is resolved once, before its trials exist: SageMaker's tuner names them,
    # so Execution.TrainingJobName means nothing there (it used to read as the tuning job's name).
    tune = tuning_step(
        home,
        "Tune",
        FAKE_TRAINER,
        strategy="Random",
        ranges=RANGES,
        channels={"train": f"{BUCKET}/data/train"},
        static={"run-name": get("Execution.TrainingJobName")},
        max_jobs=1,
    )
    failed = run_pipeline(definition(tune), {}, home, options=FAST)
    record = failed.steps["Tune"]
    assert (failed.status, record.metadata["FailureType"]) == ("Failed", "ClientError")
    assert "Execution.TrainingJobName only in Training steps" in record.failure_reason
    assert "the tuner names itself" in record.failure_reason


def test_a_cached_tuning_step_names_the_tuning_job_it_reuses(home: Path) -> None:
    tune = tuning_step(
        home,
        "Tune",
        FAKE_TRAINER,
        strategy="Random",
        ranges=RANGES,
        channels={"train": f"{BUCKET}/data/train"},
        static={"epochs": "1"},
        max_jobs=1,
    )
    tune["CacheConfig"] = {"Enabled": True, "ExpireAfter": "P30D"}
    first = run_pipeline(definition(tune), {}, home, options=FAST)
    second = run_pipeline(definition(tune), {}, home, options=FAST)
    assert (first.status, second.status) == ("Succeeded", "Succeeded")
    original = first.steps["Tune"].properties["HyperParameterTuningJobName"]
    reused = second.steps["Tune"]
    assert reused.cache_hit and reused.job_name == original
    log = Path(reused.log_path).read_text()
    assert f"cache hit: reusing {original} from execution {first.execution_id}" in log
