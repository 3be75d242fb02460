"""Debugger rules, locally: real training runs crafted to trip them, synthetic trials for the rest.

Real runs use the TrainWithDebugger step of the pipeline definition itself (debugger_support),
so the hook configuration, rule parameters and code are what `kennel definition` emits; the
synthetic trials are written by smdebug's own hook and evaluated by the same code the runner's
child process runs.
"""

from __future__ import annotations

import json
import re
import threading
import time
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

import debugger
import nets
from entrypoints import contract
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
from local.progress import step_details
from local.runner import run_pipeline
from local.state import Execution, list_executions, load_execution

# smdebug's generated protobuf modules warn on import under protobuf 3.20; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated create function:DeprecationWarning")


# --- the definition asks for what its rules read -------------------------------------------------


def definition_step(offline_builds) -> dict[str, Any]:
    [step] = [item for item in offline_builds["local"].definition["Steps"] if item["Name"] == STEP]
    return step


def saved_collections(step: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        item["CollectionName"]: item.get("CollectionParameters") or {}
        for item in step["Arguments"]["DebugHookConfig"]["CollectionConfigurations"]
    }


def split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def test_the_definition_saves_every_collection_its_rules_read(offline_builds) -> None:
    step = definition_step(offline_builds)
    saved = saved_collections(step)
    configured = step["Arguments"]["DebugRuleConfigurations"]
    assert {rule["RuleParameters"]["rule_to_invoke"] for rule in configured} <= set(RULES)
    for rule in configured:
        parameters = rule["RuleParameters"]
        needed = set(RULES[parameters["rule_to_invoke"]].COLLECTIONS)
        needed |= set(split(parameters.get("collection_names", "")))
        assert needed <= set(saved), f"{rule['RuleConfigurationName']} reads {needed - set(saved)}, not saved"
        # Tensors a rule names by regex must be saved by some collection that includes them.
        for name in split(parameters.get("tensor_regex", "")):  # the loss rules name whole tensors
            assert any(
                re.search(include, name)
                for item in saved.values()
                for include in split(item.get("include_regex", ""))
            ), f"{rule['RuleConfigurationName']} reads {name}: no collection saves it"
        if "activation_inputs_regex" in parameters:  # some collection must save the activation inputs
            assert any(
                item.get("include_regex") == parameters["activation_inputs_regex"] for item in saved.values()
            )
    # And the epoch means collection saves the accuracies train.py records, which the plots draw.
    epoch_means = split(saved[contract.EPOCH_MEANS_COLLECTION]["include_regex"])
    for name in debugger.EPOCH_ACCURACY_TENSORS.values():
        assert any(re.search(include, f"{name}_output_0") for include in epoch_means), name


@pytest.mark.parametrize("arch", nets.ARCHS)
def test_the_activation_inputs_regex_catches_every_activation_of_every_arch(offline_builds, arch: str) -> None:
    """smdebug names a module's inputs "<module path>_input_<n>"; the regex must match those of every
    activation module of every architecture train.py offers (efficientnet_lite names its ReLU6 `_swish`)."""
    import torch

    step = definition_step(offline_builds)
    [rule] = [
        item
        for item in step["Arguments"]["DebugRuleConfigurations"]
        if item["RuleParameters"]["rule_to_invoke"] == "PoorWeightInitialization"
    ]
    patterns = split(rule["RuleParameters"]["activation_inputs_regex"])
    model, _ = nets.build_model(arch, 4, weights="none")
    activations = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ReLU | torch.nn.ReLU6 | torch.nn.SiLU | torch.nn.Hardswish)
    ]
    assert activations
    for name in activations:
        assert any(re.match(pattern, f"{name}_input_0") for pattern in patterns), name
    # Nothing else: a convolution's or batch norm's input is not an activation input.
    others = [name for name, module in model.named_modules() if name and name not in activations]
    assert not [name for name in others if any(re.match(pattern, f"{name}_input_0") for pattern in patterns)]


@pytest.mark.slow
def test_the_hook_saves_what_poor_weight_initialization_examines(healthy_debug_run: DebugRun) -> None:
    """Gradients and losses at every one of its first `steps` training steps, the activation inputs
    at the first (they are large); later training steps only at the hook's interval."""
    from smdebug import modes
    from smdebug.trials import create_trial

    run = healthy_debug_run
    trial = create_trial(str(run.job_dir / "opt_ml" / "output" / "tensors"))
    train_steps = trial.steps(mode=modes.TRAIN)
    assert len(train_steps) == 6  # 2 steps per epoch, 3 epochs: all within the first 10
    for collection in ("gradients", "losses"):
        for name in trial.tensor_names(collection=collection):
            assert trial.tensor(name).steps(mode=modes.TRAIN) == train_steps, name
    activations = trial.tensor_names(regex=[".*_swish_input_.*"])
    assert len(activations) == 33  # efficientnet_lite0: 17 ReLU6 modules, 16 of them called twice
    for name in activations:
        assert trial.tensor(name).steps(mode=modes.TRAIN) == [0]
        assert trial.tensor(name).steps(mode=modes.EVAL) == []


# --- real training runs ---------------------------------------------------------------------------


def status_of(run: DebugRun, rule: str) -> dict[str, Any]:
    return statuses(run.train)[rule]


# What each rule's StatusDetails says when it looked at something and found nothing to report.
EXAMINED = {
    "LossNotDecreasing": [r"^[1-9]\d* checks"],
    "VanishingGradient": [r"^[1-9]\d* checks"],
    "Overfit": [r"^[1-9]\d* checks"],
    "Overtraining": [r"^[1-9]\d* checks"],
    "PoorWeightInitialization": [
        r"activation-input variances at [1-9]",
        r"gradient distributions at [1-9]",
        r"the loss against 5 steps before at [1-9]",
    ],
    "ExplodingTensor": [r"^[1-9]\d* checks"],
}


def assert_quiet_because_it_looked(found: dict[str, dict[str, Any]]) -> None:
    assert set(found) == set(EXAMINED)
    for name, status in found.items():
        assert status["RuleEvaluationStatus"] == NO_ISSUES, (name, status["StatusDetails"])
        for pattern in EXAMINED[name]:
            assert re.search(pattern, status["StatusDetails"]), (name, status["StatusDetails"])


@pytest.mark.slow
def test_every_rule_is_quiet_on_the_healthy_sample_run(healthy_debug_run: DebugRun) -> None:
    run = healthy_debug_run
    assert run.execution.status == "Succeeded", run.execution.failure_reason
    found = statuses(run.train)
    configured = [rule["RuleConfigurationName"] for rule in run.train.properties["DebugRuleConfigurations"]]
    assert list(found) == configured and len(configured) >= 5
    for status in found.values():
        assert status["RuleEvaluationJobArn"].startswith("arn:aws:sagemaker:")
    # Quiet because it looked, not because it saw nothing.
    assert_quiet_because_it_looked(found)


@pytest.mark.slow
def test_the_default_local_training_shows_its_rules_in_progress_then_quiet(offline_builds, tmp_path: Path) -> None:
    """What `make pipeline-run` trains: the [local] settings of kennel.toml (the definition's parameter
    defaults: efficientnet_lite0, last block, 96 px, 2 epochs) with a learning rate from the middle of
    the tuned range, on all of data/sample (7 validation batches per epoch). While it runs, what
    `kennel status` shows (local.progress.step_details over the stored step record): the Debugger
    rules and the profiler rules InProgress, the profiler rules already evaluated on the samples so
    far; once the job has ended, their final statuses, and every Debugger rule quiet because it looked."""
    build = offline_builds["local"]
    home = tmp_path / "home"
    step = debug_training_step(
        build, home, SAMPLE_DIR, fast=False, hyperparameters={"lr": "0.001", "batch-size": "32", "epochs": "2"}
    )
    # A profiler rule container scans every scan_interval_us (AWS's default: 60 s); every second here.
    for rule in step["Arguments"]["ProfilerRuleConfigurations"]:
        key = "scan_interval_us" if rule["RuleConfigurationName"] != "ProfilerReport" else "CPUBottleneck_scan_interval_us"
        rule["RuleParameters"][key] = "1000000"
    finished: list[Execution] = []
    runner = threading.Thread(target=lambda: finished.append(
        run_pipeline(pipeline_of(step, parameters=build.definition["Parameters"]), {}, home, options=FAST)))
    runner.start()
    while_running: list[tuple[list[str], bool]] = []  # (status lines, a profiler rule JSON existed)
    while runner.is_alive():
        for execution in list_executions(home):
            record = execution.steps.get(STEP)
            if record is not None and record.status == "Executing":
                reports = Path(record.job_dir or "") / "profiler" / "rule-output" / "ProfilerReport"
                while_running.append((step_details(record), any(reports.rglob("CPUBottleneck.json"))))
        time.sleep(0.5)
    runner.join()
    [execution] = finished
    train = execution.steps[STEP]
    assert execution.status == "Succeeded", execution.failure_reason
    assert train.properties["HyperParameters"]["freeze"] == "last-block"

    configured = [rule["RuleConfigurationName"] for rule in step["Arguments"]["DebugRuleConfigurations"]]
    in_progress = [
        lines
        for lines, _ in while_running
        if all(f"Debugger rule {name}: InProgress" in lines for name in configured)
    ]
    assert in_progress, while_running[-1:]
    evaluated = [
        (lines, written)
        for lines, written in while_running
        if any(re.match(r"profiler rule ProfilerReport: InProgress - [1-9]\d* samples evaluated", line) for line in lines)
    ]
    assert evaluated and all(written for _, written in evaluated), while_running[-1:]

    settled = step_details(load_execution(home, execution.execution_id).steps[STEP])
    for name in configured:
        assert any(re.match(rf"Debugger rule {name}: (NoIssuesFound|IssuesFound) - ", line) for line in settled)
    assert any(line.startswith(f"profiler rule ProfilerReport: {NO_ISSUES} - no rule triggered") for line in settled)
    assert not any("InProgress" in line for line in settled), settled
    assert_quiet_because_it_looked(statuses(train))


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


def trial_of(run: DebugRun) -> Any:
    from smdebug.trials import create_trial

    return create_trial(str(run.job_dir / "opt_ml" / "output" / "tensors"))


@pytest.mark.slow
def test_vanishing_gradient_and_poor_weight_initialization_fire_on_an_untrained_frozen_backbone(
    offline_builds, tmp_path: Path
) -> None:
    # No pretrained weights and a frozen backbone: its batch norm keeps its untrained statistics
    # (mean 0, variance 1), so nothing rescales the signal and it vanishes layer by layer; the head
    # then trains on features near zero, and its weight gradient vanishes with them.
    run = run_debug_pipeline(
        offline_builds["local"],
        tmp_path,
        hyperparameters={"weights": "none", "freeze": "head"},
        keep_rules=("VanishingGradient", "PoorWeightInitialization", "ExplodingTensor"),
    )
    assert run.execution.status == "Succeeded", run.execution.failure_reason
    trial = trial_of(run)

    vanishing = status_of(run, "VanishingGradient")
    assert vanishing["RuleEvaluationStatus"] == ISSUES_FOUND, vanishing["StatusDetails"]
    found = re.search(r"(gradient/\S+): mean \|gradient\| (\S+) < threshold 1e-07", vanishing["StatusDetails"])
    assert found and found.group(1).endswith("head.1.weight")
    step = int(re.search(r"at step (\d+)", vanishing["StatusDetails"]).group(1))
    magnitude = float(np.mean(np.abs(trial.tensor(found.group(1)).value(step))))
    assert magnitude == pytest.approx(float(found.group(2)), rel=1e-2) and magnitude < 1e-7

    poor = status_of(run, "PoorWeightInitialization")
    assert poor["RuleEvaluationStatus"] == ISSUES_FOUND, poor["StatusDetails"]
    assert "step 0: activation-input variance" in poor["StatusDetails"]
    # The ratio it reports is the one the saved activation inputs of step 0 give.
    variances = [
        float(np.var(trial.tensor(name).value(0), dtype=np.float64))
        for name in trial.tensor_names(regex=[".*relu_input", ".*_swish_input"])
    ]
    ratio = float(re.search(r"ratio (\S+) > threshold 100", poor["StatusDetails"]).group(1))
    assert ratio == pytest.approx(max(variances) / min(variances), rel=1e-2) and ratio > 1e6

    # A vanishing signal is not an exploding one.
    assert status_of(run, "ExplodingTensor")["RuleEvaluationStatus"] == NO_ISSUES


@pytest.mark.slow
def test_exploding_tensor_fires_when_the_learning_rate_diverges(offline_builds, tmp_path: Path) -> None:
    # SGD at a learning rate ten orders of magnitude too large, every layer training: the weights
    # overflow within a few steps and the gradients turn to inf and NaN.
    run = run_debug_pipeline(
        offline_builds["local"],
        tmp_path,
        hyperparameters={"optimizer": "sgd", "lr": "1e10", "freeze": "none"},
        keep_rules=("ExplodingTensor",),
    )
    status = status_of(run, "ExplodingTensor")
    assert status["RuleEvaluationStatus"] == ISSUES_FOUND, status["StatusDetails"]
    found = re.search(r"at step (\d+) .*: (gradient/\S+) has (\d+) non-finite", status["StatusDetails"])
    assert found, status["StatusDetails"]
    value = trial_of(run).tensor(found.group(2)).value(int(found.group(1)))
    assert int((~np.isfinite(value)).sum()) == int(found.group(3)) > 0
    printed = [line for line in Path(run.train.log_path).read_text().splitlines() if line.startswith("epoch=")]
    assert any("nan" in line for line in printed)  # the run's own losses went the same way


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
