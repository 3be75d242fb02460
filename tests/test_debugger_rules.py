"""Debugger rules, locally: real training runs crafted to trip them, synthetic trials for the rest.

Real runs use the TrainWithDebugger step of the pipeline definition itself (debugger_support),
so the hook configuration, rule parameters and code are what `kennel definition` emits; the
synthetic trials are written by smdebug's own hook and evaluated by the same code the runner's
child process runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from debugger_support import (
    FAST,
    SAMPLE_DIR,
    STEP,
    DebugRun,
    debug_training_step,
    pipeline_of,
    run_debug_pipeline,
    statuses,
    write_trial,
)

from local.debugger_rules import (
    EVAL,
    ISSUES_FOUND,
    NO_ISSUES,
    RULES,
    TRAIN,
    LossNotDecreasing,
    PassTracker,
    RuleParameterError,
    Spec,
    follow,
    parse_parameters,
)
from local.runner import run_pipeline

# smdebug's generated protobuf modules warn on import under protobuf 3.20; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated create function:DeprecationWarning")


# --- the definition asks for what its rules read -------------------------------------------------


def test_the_definition_saves_every_collection_its_rules_read(offline_builds) -> None:
    [step] = [
        item for item in offline_builds["local"].definition["Steps"] if item["Name"] == "TrainWithDebugger"
    ]
    hook = step["Arguments"]["DebugHookConfig"]
    saved = {
        item["CollectionName"]: item.get("CollectionParameters") or {}
        for item in hook["CollectionConfigurations"]
    }
    configured = step["Arguments"]["DebugRuleConfigurations"]
    assert {rule["RuleParameters"]["rule_to_invoke"] for rule in configured} <= set(RULES)
    for rule in configured:
        parameters = rule["RuleParameters"]
        needed = set(RULES[parameters["rule_to_invoke"]].COLLECTIONS)
        needed |= {name.strip() for name in parameters.get("collection_names", "").split(",") if name.strip()}
        assert needed <= set(saved), f"{rule['RuleConfigurationName']} reads {needed - set(saved)}, not saved"
        if "activation_inputs_regex" in parameters:  # some collection must save the activation inputs
            assert any(
                item.get("include_regex") == parameters["activation_inputs_regex"] for item in saved.values()
            )


# --- real training runs ---------------------------------------------------------------------------


def status_of(run: DebugRun, rule: str) -> dict[str, Any]:
    return statuses(run.train)[rule]


@pytest.mark.slow
def test_every_rule_is_quiet_on_the_healthy_sample_run(healthy_debug_run: DebugRun) -> None:
    run = healthy_debug_run
    assert run.execution.status == "Succeeded", run.execution.failure_reason
    found = statuses(run.train)
    configured = [rule["RuleConfigurationName"] for rule in run.train.properties["DebugRuleConfigurations"]]
    assert list(found) == configured and len(configured) >= 5
    for name, status in found.items():
        assert status["RuleEvaluationStatus"] == NO_ISSUES, (name, status["StatusDetails"])
        assert status["RuleEvaluationJobArn"].startswith("arn:aws:sagemaker:")
    # Quiet because it looked, not because it saw nothing: the loss rules compared epochs.
    assert re.match(r"[1-9]\d* checks", found["LossNotDecreasing"]["StatusDetails"])
    assert re.match(r"[1-9]\d* checks", found["Overfit"]["StatusDetails"])


@pytest.mark.slow
def test_every_rule_is_quiet_on_the_default_local_training_of_the_whole_sample(offline_builds, tmp_path: Path) -> None:
    # What `make pipeline-run` trains: the [local] settings of kennel.toml (the definition's parameter
    # defaults: efficientnet_lite0, last block, 96 px, 2 epochs) with a learning rate from the middle
    # of the tuned range, on all of data/sample (7 validation batches per epoch).
    build = offline_builds["local"]
    home = tmp_path / "home"
    step = debug_training_step(
        build, home, SAMPLE_DIR, fast=False, hyperparameters={"lr": "0.001", "batch-size": "32", "epochs": "2"}
    )
    execution = run_pipeline(
        pipeline_of(step, parameters=build.definition["Parameters"]), {}, home, options=FAST
    )
    train = execution.steps[STEP]
    assert execution.status == "Succeeded", execution.failure_reason
    assert train.properties["HyperParameters"]["freeze"] == "last-block"
    found = statuses(train)
    assert len(found) >= 5
    for name, status in found.items():
        assert status["RuleEvaluationStatus"] == NO_ISSUES, (name, status["StatusDetails"])
    assert re.match(r"[1-9]\d* checks", found["LossNotDecreasing"]["StatusDetails"])


@pytest.mark.slow
def test_loss_not_decreasing_fires_at_lr_zero_and_its_stop_training_action_stops_the_job(
    offline_builds, tmp_path: Path
) -> None:
    from smdebug_rulesconfig import ActionList, StopTraining

    epochs = 40
    action = ActionList(StopTraining()).serialize()  # as the SDK writes RuleParameters.action_json
    run = run_debug_pipeline(
        offline_builds["local"],
        tmp_path,
        # train.py refuses --lr 0; 1e-12 moves no weight by a representable amount.
        hyperparameters={"lr": "1e-12", "epochs": str(epochs)},
        rules={"LossNotDecreasing": {"action_json": action}},
        keep_rules=("LossNotDecreasing",),
    )
    status = status_of(run, "LossNotDecreasing")
    assert status["RuleEvaluationStatus"] == ISSUES_FOUND
    assert "RuleEvaluationConditionMet" in status["StatusDetails"] and "0.1%" in status["StatusDetails"]
    # Evaluated while training ran: the action stopped the job long before its last epoch.
    assert run.execution.status != "Succeeded"
    assert run.train.status == "Stopped" and run.train.properties["TrainingJobStatus"] == "Stopped"
    assert "StopTraining action of Debugger rule LossNotDecreasing" in run.train.failure_reason
    epochs_run = re.findall(r"^epoch=(\d+) ", Path(run.train.log_path).read_text(), re.MULTILINE)
    assert 2 <= len(epochs_run) < epochs


@pytest.mark.slow
def test_overfit_and_overtraining_fire_when_validation_diverges_from_training(
    offline_builds, tmp_path: Path
) -> None:
    # Each validation folder holds the images of the next class: what training teaches is wrong there.
    run = run_debug_pipeline(
        offline_builds["local"],
        tmp_path,
        shift=1,
        hyperparameters={"lr": "0.01"},
        rules={"Overtraining": {"patience_validation": "2"}},
        keep_rules=("Overfit", "Overtraining", "VanishingGradient"),
    )
    assert run.execution.status == "Succeeded", run.execution.failure_reason
    overfit = status_of(run, "Overfit")
    assert overfit["RuleEvaluationStatus"] == ISSUES_FOUND, overfit["StatusDetails"]
    ratio = float(re.search(r"ratio ([0-9.]+) > ratio_threshold 0.1", overfit["StatusDetails"]).group(1))
    assert ratio > 0.1
    overtraining = status_of(run, "Overtraining")
    assert overtraining["RuleEvaluationStatus"] == ISSUES_FOUND, overtraining["StatusDetails"]
    assert status_of(run, "VanishingGradient")["RuleEvaluationStatus"] == NO_ISSUES


# --- synthetic trials --------------------------------------------------------------------------------


def evaluate(tmp_path: Path, rule: str, parameters: dict[str, str], phases: list, collections: dict) -> dict:
    """Write the trial with smdebug, evaluate one rule as the runner's child does, return its status."""
    trial = write_trial(tmp_path / "trial", phases, collections)
    (tmp_path / "ended").touch()
    spec = Spec(
        trial,
        [{"RuleConfigurationName": rule, "RuleParameters": {"rule_to_invoke": rule, **parameters}}],
        tmp_path / "status.json",
        tmp_path / "losses.json",
        tmp_path / "ended",
        poll_seconds=0.05,
    )
    follow(spec)
    [status] = json.loads(spec.status_file.read_text())["Statuses"]
    return status


def train_steps(values: list[dict]) -> tuple[str, list[dict]]:
    return ("TRAIN", values)


def losses(*values: float) -> list[dict]:
    return [{"loss": value} for value in values]


LOSS = {"losses": ["loss"]}
GRADIENTS = {"gradients": ["gradient/w", "gradient/b"]}
RELU = {"relu_input": ["layer1.relu_input_0", "layer2.relu_input_0"], **GRADIENTS}
rng = np.random.default_rng(0)


def gradients(scale: float, steps: int = 3) -> list[dict]:
    return [
        {"gradient/w": rng.normal(0, scale, (8, 8)), "gradient/b": rng.normal(0, scale, 8)}
        for _ in range(steps)
    ]


def activations(first: float, second: float, steps: int = 3) -> list[dict]:
    return [
        {
            "layer1.relu_input_0": rng.normal(0, first, (4, 16)),
            "layer2.relu_input_0": rng.normal(0, second, (4, 16)),
            "gradient/w": rng.normal(0, 0.1, (8, 8)),
        }
        for _ in range(steps)
    ]


def epochs(train: list[list[float]], valid: list[float]) -> list:
    """Alternating training and validation passes, one validation step per pass."""
    phases: list = []
    for train_values, valid_value in zip(train, valid, strict=True):
        phases += [("TRAIN", losses(*train_values)), ("EVAL", losses(valid_value))]
    return phases


DECREASING = [[2.0 - 0.15 * epoch, 1.95 - 0.15 * epoch] for epoch in range(12)]

CASES = [
    # rule, parameters, phases, collections, expected, what the details must say
    ("VanishingGradient", {}, [train_steps(gradients(1e-9))], GRADIENTS, ISSUES_FOUND, "< threshold 1e-07"),
    ("VanishingGradient", {}, [train_steps(gradients(1e-2))], GRADIENTS, NO_ISSUES, "checks"),
    (
        "VanishingGradient",
        {"threshold": "0.5"},
        [train_steps(gradients(1e-2))],
        GRADIENTS,
        ISSUES_FOUND,
        "0.5",
    ),
    (
        "ExplodingTensor",
        {},
        [train_steps([{"gradient/w": [1.0, float("nan")]}])],
        GRADIENTS,
        ISSUES_FOUND,
        "1 non-finite",
    ),
    (
        "ExplodingTensor",
        {},
        [train_steps([{"gradient/w": [1.0, float("inf")]}])],
        GRADIENTS,
        ISSUES_FOUND,
        "non-finite",
    ),
    (
        "ExplodingTensor",
        {"only_nan": "True"},
        [train_steps([{"gradient/w": [1.0, float("inf")]}])],
        GRADIENTS,
        NO_ISSUES,
        "checks",
    ),
    (
        "ExplodingTensor",
        {"collection_names": "losses"},
        [train_steps([{"gradient/w": [float("nan")], "loss": 1.0}])],
        {**GRADIENTS, **LOSS},
        NO_ISSUES,
        "checks",
    ),
    ("PoorWeightInitialization", {}, [train_steps(activations(1.0, 100.0))], RELU, ISSUES_FOUND, "ratio"),
    ("PoorWeightInitialization", {}, [train_steps(activations(1.0, 1.5))], RELU, NO_ISSUES, "checks"),
    (
        "PoorWeightInitialization",
        {},
        [train_steps(gradients(1e-5))],
        GRADIENTS,
        ISSUES_FOUND,
        "distribution_range",
    ),
    (
        "PoorWeightInitialization",
        {},
        [train_steps(losses(2.0, 2.1, 2.2, 2.1, 2.3, 2.2, 2.4))],
        LOSS,
        ISSUES_FOUND,
        "no new low in 5",
    ),
    (
        "PoorWeightInitialization",
        {},
        [train_steps(losses(2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4))],
        LOSS,
        NO_ISSUES,
        "activation check was skipped",
    ),
    # Validation flat while training keeps improving: overtraining; both improving: not.
    ("Overtraining", {}, epochs(DECREASING, [1.5] * 12), LOSS, ISSUES_FOUND, "for 10 EVAL steps"),
    (
        "Overtraining",
        {},
        epochs(DECREASING, [1.9 - 0.15 * epoch for epoch in range(12)]),
        LOSS,
        NO_ISSUES,
        "checks",
    ),
    ("Overfit", {}, epochs([[1.0, 1.0]], [1.2]), LOSS, ISSUES_FOUND, "ratio 0.2 > ratio_threshold 0.1"),
    ("Overfit", {}, epochs([[1.0, 1.0]], [1.05]), LOSS, NO_ISSUES, "1 checks"),
    # patience counts consecutive comparisons: 1 then 0 then 1 is never 2 in a row.
    ("Overfit", {"patience": "2"}, epochs([[1.0]] * 3, [1.5, 1.0, 1.5]), LOSS, NO_ISSUES, "3 checks"),
    ("Overfit", {"patience": "2"}, epochs([[1.0]] * 3, [1.0, 1.5, 1.5]), LOSS, ISSUES_FOUND, "2 comparison"),
    ("Overfit", {"start_step": "100"}, epochs([[1.0]], [9.0]), LOSS, NO_ISSUES, "nothing to compare"),
    (
        "LossNotDecreasing",
        {"num_steps": "2"},
        [train_steps(losses(3.0, 2.5, 2.0, 2.0, 2.0))],
        LOSS,
        ISSUES_FOUND,
        "TRAIN step 4 vs 2",
    ),
    (
        "LossNotDecreasing",
        {"num_steps": "2"},
        [train_steps(losses(3.0, 2.5, 2.0, 1.5, 1.0))],
        LOSS,
        NO_ISSUES,
        "2 checks",
    ),
    # One saved loss in all (say, a one-epoch run of the per-epoch series): quiet, and says why.
    ("LossNotDecreasing", {"num_steps": "2"}, [train_steps(losses(3.0))], LOSS, NO_ISSUES, "nothing to compare"),
    # The loss rose by more than increase_threshold_percent over its lowest value.
    (
        "LossNotDecreasing",
        {"num_steps": "1", "diff_percent": "0", "increase_threshold_percent": "5"},
        [train_steps(losses(3.0, 1.0, 0.9, 0.95))],
        LOSS,
        ISSUES_FOUND,
        "more than 5% above its lowest value 0.9",
    ),
]


@pytest.mark.parametrize(
    ("rule", "parameters", "phases", "collections", "expected", "detail"),
    CASES,
    ids=[f"{case[0]}-{case[4]}-{index}" for index, case in enumerate(CASES)],
)
def test_rule_on_a_synthetic_trial(
    tmp_path: Path, rule, parameters, phases, collections, expected, detail
) -> None:
    status = evaluate(tmp_path, rule, parameters, phases, collections)
    assert status["RuleEvaluationStatus"] == expected, status["StatusDetails"]
    assert detail in status["StatusDetails"]


def test_loss_not_decreasing_compares_steps_num_steps_apart_as_documented(tmp_path: Path) -> None:
    """AWS: with the loss saved every 3 steps and num_steps 10, a step is compared with the latest
    saved step at least 10 behind, and the next check is the first saved step 10 or more later."""
    from smdebug.trials import create_trial

    values = [{"loss": 10.0 - 0.1 * step} if step % 3 == 0 else {} for step in range(40)]
    trial = create_trial(str(write_trial(tmp_path / "trial", [("TRAIN", values)], LOSS)))
    rule = LossNotDecreasing(trial, {"num_steps": "10"})
    for step in trial.steps():
        rule.invoke(step)
    assert rule.compared == [(12, 0), (24, 12), (36, 24)]


def test_every_rule_reports_an_error_it_can_explain(tmp_path: Path) -> None:
    trial = write_trial(tmp_path / "trial", [train_steps(losses(2.0, 1.0))], LOSS)
    (tmp_path / "ended").touch()
    rules = [
        {"RuleConfigurationName": "NoGradients", "RuleParameters": {"rule_to_invoke": "VanishingGradient"}},
        {"RuleConfigurationName": "DeadRelu", "RuleParameters": {"rule_to_invoke": "DeadRelu"}},
        {"RuleConfigurationName": "Typo", "RuleParameters": {"rule_to_invoke": "Overfit", "patiense": "2"}},
        {
            "RuleConfigurationName": "NotANumber",
            "RuleParameters": {"rule_to_invoke": "Overfit", "patience": "two"},
        },
    ]
    follow(Spec(trial, rules, tmp_path / "s.json", tmp_path / "l.json", tmp_path / "ended", 0.05))
    found = {
        item["RuleConfigurationName"]: item
        for item in json.loads((tmp_path / "s.json").read_text())["Statuses"]
    }
    assert {item["RuleEvaluationStatus"] for item in found.values()} == {"Error"}
    assert "add the 'gradients' collection to DebugHookConfig" in found["NoGradients"]["StatusDetails"]
    assert "'DeadRelu' is not evaluated by the local runner" in found["DeadRelu"]["StatusDetails"]
    assert (
        "no parameter 'patiense'" in found["Typo"]["StatusDetails"]
        and "patience" in found["Typo"]["StatusDetails"]
    )
    assert "patience='two'" in found["NotANumber"]["StatusDetails"]


def test_passes_end_where_another_mode_ran_even_if_it_saved_nothing() -> None:
    # Training saved only at step 0 (global 0); validation at global 4-5, then, after training steps
    # that saved nothing (global 6-8), again at global 9: two validation passes, not one.
    tracker = PassTracker()
    fed = [(TRAIN, 0, 0, 2.0), (EVAL, 0, 4, 1.0), (EVAL, 1, 5, 3.0), (EVAL, 2, 9, 0.5)]
    closed = [tracker.feed(*row) for row in fed] + [tracker.close()]
    passes = [item for item in closed if item is not None]
    assert [(item.mode, item.values) for item in passes] == [(TRAIN, [2.0]), (EVAL, [1.0, 3.0]), (EVAL, [0.5])]
    assert passes[1].mean == 2.0


def test_a_job_that_wrote_no_tensors_is_an_error_not_a_pass(tmp_path: Path) -> None:
    (tmp_path / "ended").touch()
    rules = [{"RuleConfigurationName": "Overfit", "RuleParameters": {"rule_to_invoke": "Overfit"}}]
    follow(
        Spec(tmp_path / "empty", rules, tmp_path / "s.json", tmp_path / "l.json", tmp_path / "ended", 0.05)
    )
    [status] = json.loads((tmp_path / "s.json").read_text())["Statuses"]
    assert (
        status["RuleEvaluationStatus"] == "Error" and "saved no Debugger tensors" in status["StatusDetails"]
    )


# AWS's "List of Debugger built-in rules" (its current page), parameter by parameter.
AWS_DEFAULTS = {
    "LossNotDecreasing": {
        "use_losses_collection": True,
        "num_steps": 10,
        "diff_percent": 0.1,
        "increase_threshold_percent": 5.0,
        "mode": None,  # "if not passed, checks EVAL, then TRAIN, then GLOBAL"
    },
    "Overtraining": {"patience_train": 5, "patience_validation": 10, "delta": 0.01},
    "Overfit": {"start_step": 0, "patience": 1, "ratio_threshold": 0.1},
    "PoorWeightInitialization": {
        "activation_inputs_regex": [".*relu_input"],
        "threshold": 10.0,
        "distribution_range": 0.001,
        "patience": 5,
        "steps": 10,
    },
    "VanishingGradient": {"threshold": 1e-7},
    "ExplodingTensor": {"only_nan": False},
}


@pytest.mark.parametrize("rule", sorted(AWS_DEFAULTS))
def test_rule_defaults_are_the_documented_ones(rule: str) -> None:
    values = parse_parameters(rule, RULES[rule].PARAMETERS, {})
    assert {name: values[name] for name in AWS_DEFAULTS[rule]} == AWS_DEFAULTS[rule]


def test_loss_not_decreasing_without_mode_reads_eval_then_train(tmp_path: Path) -> None:
    """The ordered lookup: with validation losses saved it compares those (here flat: it fires),
    not the training losses (here falling)."""
    falling_train = ("TRAIN", losses(3.0, 2.0, 1.0))
    flat_eval = ("EVAL", losses(2.0, 2.0, 2.0))
    status = evaluate(tmp_path / "both", "LossNotDecreasing", {"num_steps": "1"}, [falling_train, flat_eval], LOSS)
    assert status["RuleEvaluationStatus"] == ISSUES_FOUND and "EVAL step" in status["StatusDetails"]
    only_train = evaluate(tmp_path / "train", "LossNotDecreasing", {"num_steps": "1"}, [falling_train], LOSS)
    assert only_train["RuleEvaluationStatus"] == NO_ISSUES, only_train["StatusDetails"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {"num_steps": 10, "diff_percent": 0.1, "use_losses_collection": True, "mode": None}),
        (
            {"num_steps": "3", "use_losses_collection": "False", "rule_to_invoke": "x"},
            {"num_steps": 3, "use_losses_collection": False},
        ),
        ({"collection_names": "losses, custom", "mode": "eval"}, {"collection_names": ["losses", "custom"]}),
    ],
)
def test_parameters_arrive_as_strings_and_keep_aws_defaults(given: dict, expected: dict) -> None:
    values = parse_parameters("LossNotDecreasing", LossNotDecreasing.PARAMETERS, given)
    assert {name: values[name] for name in expected} == expected


def test_a_parameter_of_the_wrong_type_is_refused_with_its_name() -> None:
    with pytest.raises(RuleParameterError, match=r"LossNotDecreasing parameter num_steps='ten'"):
        parse_parameters("LossNotDecreasing", LossNotDecreasing.PARAMETERS, {"num_steps": "ten"})


def test_stop_training_actions_are_read_as_the_sdk_writes_them() -> None:
    from smdebug_rulesconfig import ActionList, Email, StopTraining

    from local.debugger_monitor import StopAction, stop_action

    def rule(action_json: str) -> dict:
        return {
            "RuleConfigurationName": "R",
            "RuleParameters": {"rule_to_invoke": "Overfit", "action_json": action_json},
        }

    job = "pipelines-abc-TrainWithDebugger-1"
    sdk = ActionList(StopTraining(), Email("ml@example.com")).serialize()
    assert '\\"' in sdk  # the SDK escapes the quotes
    assert stop_action(rule(sdk), job) == StopAction("R", True, None)
    prefixed = ActionList(StopTraining("other-job")).serialize()
    assert stop_action(rule(prefixed), job) == StopAction("R", False, "other-job")
    assert stop_action(rule(ActionList(Email("ml@example.com")).serialize()), job) is None
    assert stop_action({"RuleConfigurationName": "R", "RuleParameters": {}}, job) is None
    with pytest.raises(ValueError, match="rule R: RuleParameters.action_json is not JSON"):
        stop_action(rule("[{stoptraining"), job)
