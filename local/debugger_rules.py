"""SageMaker Debugger's built-in rules as smdebug `Rule`s, evaluated over a trial while it grows.

AWS runs its built-in rules in rule containers that are not on PyPI (FACTS.md), so Kennel
implements the ones its definition configures, with AWS's documented parameters and defaults
(docs: "List of Debugger built-in rules"):

    LossNotDecreasing          the loss did not decrease by diff_percent over num_steps (per mode)
    VanishingGradient          the mean absolute value of a gradient fell below threshold
    Overfit                    (mean validation loss - mean training loss) / mean training loss
                               stayed above ratio_threshold for patience comparisons
    Overtraining               the training loss still improves but the validation loss has not
                               improved by delta for patience_validation steps
    PoorWeightInitialization   in the first `steps` steps: activation-input variances differ across
                               layers by more than `threshold` x, a gradient distribution is narrower
                               than distribution_range (5th-95th percentile), or the loss does not
                               decrease for `patience` steps
    ExplodingTensor            a tensor holds NaN (or infinity, unless only_nan)

Where the documentation leaves a choice open, the choice is written in the rule's docstring.
Overfit and Overtraining compare whole phases: the mean loss of a training pass (the TRAIN steps
between two validations) with the mean loss of the validation pass after it.

This module imports smdebug, and smdebug imports torch, which the runner keeps out of its own
process: the runner starts `python -m local.debugger_rules SPEC.json` next to the training job
(local.debugger_monitor does). The child follows the trial as the hook writes it, invokes every
rule on every new step, and rewrites the status file after each pass; it ends when the job has
ended and every step is evaluated, and then writes the series the plots are drawn from (the
losses, and each epoch's mean losses and accuracies).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from smdebug.core.modes import ModeKeys
from smdebug.exceptions import (
    RuleEvaluationConditionMet,
    StepUnavailable,
    TensorUnavailable,
    TensorUnavailableForStep,
)
from smdebug.rules.rule import Rule
from smdebug.trials import create_trial

from entrypoints.contract import EPOCH_MEANS_COLLECTION
from local.files import write_json_atomic

IN_PROGRESS, NO_ISSUES, ISSUES_FOUND, ERROR = "InProgress", "NoIssuesFound", "IssuesFound", "Error"
# RuleParameters that configure the rule container, not the rule.
CONTAINER_PARAMETERS = ("rule_to_invoke", "action_json")
UNAVAILABLE = (TensorUnavailableForStep, TensorUnavailable, StepUnavailable)
TRAIN, EVAL, GLOBAL = ModeKeys.TRAIN, ModeKeys.EVAL, ModeKeys.GLOBAL
DEFAULT_POLL_SECONDS = 1.0


class RuleParameterError(ValueError):
    """A RuleParameters value the rule cannot use; the message names it and what is expected."""


# --- parameters ------------------------------------------------------------------------------


def boolean(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError("expected True or False")


def names(text: str) -> list[str]:
    """A list of strings given as a comma-separated string (AWS's form for lists)."""
    return [item.strip() for item in str(text).split(",") if item.strip()]


def mode_name(text: str) -> ModeKeys:
    try:
        return ModeKeys[str(text).strip().upper()]
    except KeyError:
        raise ValueError("expected EVAL, TRAIN or GLOBAL") from None


Parser = Callable[[str], Any]


def parse_parameters(
    rule: str, declared: Mapping[str, tuple[Parser, Any]], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Typed parameter values: the declared defaults overridden by `given` (strings, as in the request)."""
    values = {name: default for name, (_, default) in declared.items()}
    for name, raw in given.items():
        if name in CONTAINER_PARAMETERS:
            continue
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise RuleParameterError(f"{rule} has no parameter {name!r} (its parameters: {known})")
        parser = declared[name][0]
        try:
            values[name] = parser(raw)
        except (TypeError, ValueError) as error:
            raise RuleParameterError(f"{rule} parameter {name}={raw!r}: {error}") from None
    return values


# --- reading the trial -------------------------------------------------------------------------


def value_at(trial: Any, name: str, step: int, mode: ModeKeys = GLOBAL) -> np.ndarray | None:
    try:
        return np.asarray(trial.tensor(name).value(step, mode=mode))
    except UNAVAILABLE:
        return None


def collection_tensors(trial: Any, collection: str) -> set[str]:
    if collection not in trial.collections():
        return set()
    return set(trial.tensor_names(collection=collection))


def regex_tensors(trial: Any, patterns: Iterable[str]) -> set[str]:
    found: set[str] = set()
    for pattern in patterns:
        compiled = re.compile(pattern)
        found.update(name for name in trial.tensor_names() if compiled.match(name))
    return found


def mean_of(values: Iterable[float]) -> float:
    items = list(values)
    return float(sum(items) / len(items)) if items else float("nan")


@dataclass
class Pass:
    """Consecutive saved steps of one mode: a training pass or a validation pass."""

    mode: ModeKeys
    values: list[float] = field(default_factory=list)
    mode_steps: list[int] = field(default_factory=list)
    global_steps: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return mean_of(self.values)


class PassTracker:
    """Groups the loss values of successive steps into passes (a training pass, a validation pass).

    A pass's steps have the same global step less mode step (the steps of other modes before
    them), so a pass ends where another mode ran, whether or not that mode's steps were saved.
    """

    def __init__(self) -> None:
        self.current: Pass | None = None

    def feed(self, mode: ModeKeys, mode_step: int, global_step: int, value: float) -> Pass | None:
        closed = None
        current = self.current
        if current is not None and (
            current.mode != mode or current.global_steps[0] - current.mode_steps[0] != global_step - mode_step
        ):
            closed, self.current = self.current, None
        if self.current is None:
            self.current = Pass(mode)
        self.current.values.append(value)
        self.current.mode_steps.append(mode_step)
        self.current.global_steps.append(global_step)
        return closed

    def close(self) -> Pass | None:
        closed, self.current = self.current, None
        return closed


# --- the rules ----------------------------------------------------------------------------------


class BuiltInRule(Rule):
    """What Kennel's built-in rules share: typed parameters, a finding in words, an end-of-trial check.

    Actions (StopTraining, email, SMS) are the runner's business: smdebug's own would call AWS.
    """

    PARAMETERS: ClassVar[dict[str, tuple[Parser, Any]]] = {}
    COLLECTIONS: ClassVar[tuple[str, ...]] = ()  # what the hook must save for the rule to see anything

    def __init__(self, base_trial: Any, parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(base_trial, action_str="")
        self.options = parse_parameters(type(self).__name__, self.PARAMETERS, parameters or {})
        self.finding = ""  # why the rule fired, for StatusDetails
        self.checks = 0  # how many times the condition was evaluated

    def fire(self, finding: str) -> bool:
        self.finding = finding
        return True

    def end_of_trial(self) -> bool:
        """Called once every step is evaluated: settle what only the end can (e.g. the last pass)."""
        return False

    def unusable(self) -> str | None:
        """At the end: why the rule could not look at anything (an Error), or None."""
        return None

    def summary(self) -> str:
        """At the end, when it did not fire: what was checked, for StatusDetails."""
        return f"{self.checks} checks, none met the condition"


class LossTensorsMixin:
    """Loss tensors chosen the way AWS's loss rules choose them."""

    base_trial: Any
    options: dict[str, Any]

    def loss_names(self) -> set[str]:
        selected = set()
        for collection in self.options.get("collection_names") or []:
            selected |= collection_tensors(self.base_trial, collection)
        selected |= regex_tensors(self.base_trial, self.options.get("tensor_regex") or [])
        # Rules without use_losses_collection read the losses collection unless a regex narrows them.
        if self.options.get("use_losses_collection", not self.options.get("tensor_regex")):
            selected |= collection_tensors(self.base_trial, "losses")
        return selected

    def loss_at(self, step: int) -> float | None:
        """The mean of the loss tensors saved at global step `step` (None when none was)."""
        values = [value_at(self.base_trial, name, step) for name in sorted(self.loss_names())]
        scalars = [float(np.mean(value)) for value in values if value is not None]
        return mean_of(scalars) if scalars else None

    def no_losses(self) -> str | None:
        if self.loss_names():
            return None
        return (
            "no loss tensors were saved: add the 'losses' collection to DebugHookConfig."
            "CollectionConfigurations and register the loss with the hook"
        )


class LossNotDecreasing(LossTensorsMixin, BuiltInRule):
    """Every num_steps (of the chosen mode) the loss must have decreased by diff_percent since a
    step at least num_steps behind, and must not rise more than increase_threshold_percent above
    the lowest loss seen. Without `mode`, the rule uses EVAL steps when there are any, else TRAIN,
    else GLOBAL (AWS's order), deciding at each check from what has been saved so far."""

    COLLECTIONS = ("losses",)
    PARAMETERS: ClassVar[dict[str, tuple[Parser, Any]]] = {
        "collection_names": (names, []),
        "tensor_regex": (names, []),
        "use_losses_collection": (boolean, True),
        "num_steps": (int, 10),
        # A percentage. AWS's current page says 0.1; the old smdebug rule documentation said 0.0.
        "diff_percent": (float, 0.1),
        "increase_threshold_percent": (float, 5.0),
        # None: the ordered lookup AWS's parameter text describes ("if not passed, checks EVAL,
        # then TRAIN, then GLOBAL"). The same page's "Default value: GLOBAL" cannot be meant
        # literally: GLOBAL steps mix training and validation batches, so with it the rule would
        # compare a validation loss with a training loss.
        "mode": (mode_name, None),
    }

    def __init__(self, base_trial: Any, parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(base_trial, parameters)
        if self.options["num_steps"] < 1:
            raise RuleParameterError("LossNotDecreasing parameter num_steps must be 1 or more")
        self.next_check: dict[tuple[str, ModeKeys], int] = {}
        self.lowest: dict[tuple[str, ModeKeys], float] = {}
        self.compared: list[tuple[int, int]] = []  # (step, the earlier step it was compared with)

    def chosen_mode(self, losses: set[str]) -> ModeKeys:
        if self.options["mode"] is not None:
            return self.options["mode"]
        for mode in (EVAL, TRAIN):
            if any(self.base_trial.tensor(name).steps(mode=mode) for name in losses):
                return mode
        return GLOBAL

    def invoke_at_step(self, step: int) -> bool:
        losses = self.loss_names()
        if not losses:
            return False
        mode = self.chosen_mode(losses)
        step_mode, mode_step = self.base_trial.mode_modestep(step)
        if mode != GLOBAL and step_mode != mode:
            return False
        current_step = mode_step if mode != GLOBAL else step
        for name in sorted(losses):
            finding = self.check(name, mode, current_step)
            if finding:
                return self.fire(finding)
        return False

    def check(self, name: str, mode: ModeKeys, step: int) -> str | None:
        key, num_steps = (name, mode), self.options["num_steps"]
        current = value_at(self.base_trial, name, step, mode)
        if current is None or step < self.next_check.get(key, num_steps):
            return None
        earlier = [
            saved for saved in self.base_trial.tensor(name).steps(mode=mode) if saved <= step - num_steps
        ]
        if not earlier:
            return None
        previous_value = float(np.mean(value_at(self.base_trial, name, max(earlier), mode)))
        value = float(np.mean(current))
        self.checks += 1
        self.compared.append((step, max(earlier)))
        self.next_check[key] = step + num_steps
        lowest = min(self.lowest.get(key, previous_value), previous_value)
        self.lowest[key] = min(lowest, value)
        where = f"{name} ({mode.name} step {step} vs {max(earlier)})"
        increase = self.options["increase_threshold_percent"]
        if lowest > 0 and value > lowest * (1 + increase / 100):
            return f"{where}: loss {value:.6g} is more than {increase:g}% above its lowest value {lowest:.6g}"
        decrease = (previous_value - value) / abs(previous_value) * 100 if previous_value else 0.0
        wanted = self.options["diff_percent"]
        if (decrease < wanted) if wanted > 0 else (value >= previous_value):
            return (
                f"{where}: loss went from {previous_value:.6g} to {value:.6g} "
                f"({decrease:+.3g}% decrease; wanted more than {wanted:g}%)"
            )
        return None

    def unusable(self) -> str | None:
        return self.no_losses()

    def summary(self) -> str:
        if not self.checks:
            return (
                f"nothing to compare: no saved loss had another at least num_steps "
                f"({self.options['num_steps']}) steps before it (a single epoch?)"
            )
        return super().summary()


class VanishingGradient(BuiltInRule):
    """A gradient whose mean absolute value is below `threshold` at a saved step."""

    COLLECTIONS = ("gradients",)
    PARAMETERS: ClassVar[dict[str, tuple[Parser, Any]]] = {"threshold": (float, 1e-7)}

    def invoke_at_step(self, step: int) -> bool:
        for name in sorted(collection_tensors(self.base_trial, "gradients")):
            value = value_at(self.base_trial, name, step)
            if value is None or value.size == 0:
                continue
            self.checks += 1
            magnitude = float(np.mean(np.abs(value)))
            if magnitude < self.options["threshold"]:
                return self.fire(
                    f"{name}: mean |gradient| {magnitude:.3g} < threshold {self.options['threshold']:g}"
                )
        return False

    def unusable(self) -> str | None:
        if collection_tensors(self.base_trial, "gradients"):
            return None
        return (
            "no gradients were saved: add the 'gradients' collection to "
            "DebugHookConfig.CollectionConfigurations"
        )


class Overfit(LossTensorsMixin, BuiltInRule):
    """(mean validation loss - mean training loss) / mean training loss > ratio_threshold for
    `patience` consecutive comparisons; one comparison per validation pass (against the training
    pass before it), from global step start_step on."""

    COLLECTIONS = ("losses",)
    PARAMETERS: ClassVar[dict[str, tuple[Parser, Any]]] = {
        "tensor_regex": (names, []),
        "start_step": (int, 0),
        "patience": (int, 1),
        "ratio_threshold": (float, 0.1),
    }

    def __init__(self, base_trial: Any, parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(base_trial, parameters)
        self.passes = PassTracker()
        self.last_train: Pass | None = None
        self.exceeded = 0

    def invoke_at_step(self, step: int) -> bool:
        loss = self.loss_at(step)
        mode, mode_step = self.base_trial.mode_modestep(step)
        if loss is None or mode not in (TRAIN, EVAL):
            return False
        closed = self.passes.feed(mode, mode_step, step, loss)
        return closed is not None and self.compare(closed)

    def end_of_trial(self) -> bool:
        closed = self.passes.close()
        return closed is not None and self.compare(closed)

    def compare(self, closed: Pass) -> bool:
        if closed.mode == TRAIN:
            self.last_train = closed
            return False
        train = self.last_train
        if train is None or closed.global_steps[0] < self.options["start_step"] or train.mean <= 0:
            return False
        self.checks += 1
        ratio = (closed.mean - train.mean) / train.mean
        self.exceeded = self.exceeded + 1 if ratio > self.options["ratio_threshold"] else 0
        if self.exceeded >= self.options["patience"]:
            return self.fire(
                f"validation loss {closed.mean:.6g} "
                f"(EVAL steps {closed.mode_steps[0]}-{closed.mode_steps[-1]}) vs "
                f"training loss {train.mean:.6g}: ratio {ratio:.3g} > ratio_threshold "
                f"{self.options['ratio_threshold']:g} for {self.exceeded} comparison(s)"
            )
        return False

    def unusable(self) -> str | None:
        return self.no_losses()

    def summary(self) -> str:
        if not self.checks:
            return "no validation pass followed a training pass: nothing to compare (are EVAL losses saved?)"
        return super().summary()


class Overtraining(LossTensorsMixin, BuiltInRule):
    """The training loss is still improving (a new optimum, better by more than `delta`, within
    the last patience_train TRAIN steps) while the validation loss has not improved for
    patience_validation EVAL steps. Each pass counts by its mean loss."""

    COLLECTIONS = ("losses",)
    PARAMETERS: ClassVar[dict[str, tuple[Parser, Any]]] = {
        "patience_train": (int, 5),
        "patience_validation": (int, 10),
        "delta": (float, 0.01),
    }

    def __init__(self, base_trial: Any, parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(base_trial, parameters)
        self.passes = PassTracker()
        self.best: dict[ModeKeys, float] = {}
        self.improved_at: dict[ModeKeys, int] = {}  # mode step that ended the best pass
        self.last_step: dict[ModeKeys, int] = {}

    def invoke_at_step(self, step: int) -> bool:
        loss = self.loss_at(step)
        mode, mode_step = self.base_trial.mode_modestep(step)
        if loss is None or mode not in (TRAIN, EVAL):
            return False
        closed = self.passes.feed(mode, mode_step, step, loss)
        return closed is not None and self.observe(closed)

    def end_of_trial(self) -> bool:
        closed = self.passes.close()
        return closed is not None and self.observe(closed)

    def observe(self, closed: Pass) -> bool:
        mode, end = closed.mode, closed.mode_steps[-1]
        if mode not in self.best or closed.mean < self.best[mode] - self.options["delta"]:
            self.best[mode], self.improved_at[mode] = closed.mean, end
        self.last_step[mode] = end
        if mode != EVAL or TRAIN not in self.best:
            return False
        self.checks += 1
        stale_validation = end - self.improved_at[EVAL]
        stale_train = self.last_step[TRAIN] - self.improved_at[TRAIN]
        if (
            stale_validation >= self.options["patience_validation"]
            and stale_train < self.options["patience_train"]
        ):
            return self.fire(
                f"validation loss has not improved by more than delta {self.options['delta']:g} for "
                f"{stale_validation} EVAL steps "
                f"(best {self.best[EVAL]:.6g} at EVAL step {self.improved_at[EVAL]}) "
                f"while the training loss still improves ({self.best[TRAIN]:.6g})"
            )
        return False

    def unusable(self) -> str | None:
        return self.no_losses()


class PoorWeightInitialization(LossTensorsMixin, BuiltInRule):
    """Over the first `steps` TRAIN steps: the variances of the activation inputs (tensors
    matching activation_inputs_regex) differ across layers by more than `threshold` times; or the
    narrowest gradient distribution (5th to 95th percentile of a gradient with more than one
    value) is narrower than distribution_range; or the training loss makes no new low for
    `patience` saved steps. Each check runs at the steps where its tensors were saved; one whose
    tensors were never saved is skipped, and the summary says so."""

    COLLECTIONS = ("gradients", "losses")  # and one that saves the activation inputs (by regex)
    PARAMETERS: ClassVar[dict[str, tuple[Parser, Any]]] = {
        "activation_inputs_regex": (names, [".*relu_input"]),
        "threshold": (float, 10.0),
        "distribution_range": (float, 0.001),
        "patience": (int, 5),
        "steps": (int, 10),
    }

    def __init__(self, base_trial: Any, parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(base_trial, parameters)
        self.losses: list[float] = []
        # Steps at which each check had tensors to look at (the loss: had `patience` losses before).
        self.activation_checks = self.gradient_checks = self.loss_checks = 0

    def invoke_at_step(self, step: int) -> bool:
        mode, mode_step = self.base_trial.mode_modestep(step)
        if mode not in (TRAIN, GLOBAL) or mode_step >= self.options["steps"]:
            return False
        self.checks += 1
        finding = self.activations(step) or self.gradients(step) or self.loss(step)
        return self.fire(f"step {mode_step}: {finding}") if finding else False

    def activations(self, step: int) -> str | None:
        variances = {}
        for name in regex_tensors(self.base_trial, self.options["activation_inputs_regex"]):
            value = value_at(self.base_trial, name, step)
            if value is not None and value.size > 1:
                variances[name] = float(np.var(value, dtype=np.float64))
        if len(variances) < 2:
            return None
        self.activation_checks += 1
        low, high = min(variances, key=variances.get), max(variances, key=variances.get)
        ratio = variances[high] / variances[low] if variances[low] > 0 else float("inf")
        if ratio > self.options["threshold"]:
            return (
                f"activation-input variance ranges from {variances[low]:.3g} ({low}) "
                f"to {variances[high]:.3g} "
                f"({high}): ratio {ratio:.3g} > threshold {self.options['threshold']:g}"
            )
        return None

    def gradients(self, step: int) -> str | None:
        spreads = {}
        for name in collection_tensors(self.base_trial, "gradients"):
            value = value_at(self.base_trial, name, step)
            if value is not None and value.size > 1:
                low, high = np.percentile(value, [5, 95])
                spreads[name] = float(high - low)
        if not spreads:
            return None
        self.gradient_checks += 1
        narrowest = min(spreads, key=spreads.get)
        if spreads[narrowest] < self.options["distribution_range"]:
            return (
                f"gradient {narrowest} spans only {spreads[narrowest]:.3g} "
                "between its 5th and 95th percentiles "
                f"(< distribution_range {self.options['distribution_range']:g})"
            )
        return None

    def loss(self, step: int) -> str | None:
        value = self.loss_at(step)
        if value is None:
            return None
        self.losses.append(value)
        patience = self.options["patience"]
        if len(self.losses) <= patience:
            return None
        self.loss_checks += 1
        before, recent = self.losses[:-patience], self.losses[-patience:]
        if min(recent) >= min(before):
            return (
                f"the loss made no new low in {patience} saved steps "
                f"({min(before):.6g} before, {min(recent):.6g} since)"
            )
        return None

    def summary(self) -> str:
        text = (
            f"{self.checks} checks of the first {self.options['steps']} TRAIN steps: "
            f"activation-input variances at {self.activation_checks}, "
            f"gradient distributions at {self.gradient_checks}, "
            f"the loss against {self.options['patience']} steps before at {self.loss_checks}"
            ", none met the condition"
        )
        if not self.activation_checks:
            pattern = ",".join(self.options["activation_inputs_regex"])
            text += f"; fewer than two tensors match {pattern}: the activation check was skipped"
        if not self.loss_checks:
            text += (
                f"; no more than patience ({self.options['patience']}) losses were saved in those "
                "steps: the loss check was skipped"
            )
        return text


class ExplodingTensor(BuiltInRule):
    """A tensor (of collection_names and tensor_regex; all tensors when neither is given) holds
    NaN, or infinity unless only_nan."""

    PARAMETERS: ClassVar[dict[str, tuple[Parser, Any]]] = {
        "collection_names": (names, []),
        "tensor_regex": (names, []),
        "only_nan": (boolean, False),
    }

    def watched(self) -> set[str]:
        if not self.options["collection_names"] and not self.options["tensor_regex"]:
            return set(self.base_trial.tensor_names())
        selected = regex_tensors(self.base_trial, self.options["tensor_regex"])
        for collection in self.options["collection_names"]:
            selected |= collection_tensors(self.base_trial, collection)
        return selected

    def invoke_at_step(self, step: int) -> bool:
        for name in sorted(self.watched()):
            value = value_at(self.base_trial, name, step)
            if value is None or not np.issubdtype(value.dtype, np.floating):
                continue
            self.checks += 1
            bad = np.isnan(value) if self.options["only_nan"] else ~np.isfinite(value)
            if bad.any():
                return self.fire(f"{name} has {int(bad.sum())} non-finite value(s) of {value.size}")
        return False


RULES: dict[str, type[BuiltInRule]] = {
    rule.__name__: rule
    for rule in (
        LossNotDecreasing,
        VanishingGradient,
        Overfit,
        Overtraining,
        PoorWeightInitialization,
        ExplodingTensor,
    )
}


# --- following a trial ---------------------------------------------------------------------------


@dataclass
class RuleState:
    """One configured rule as it is being evaluated, and its status in DescribeTrainingJob's words."""

    name: str  # RuleConfigurationName
    rule: BuiltInRule | None
    status: str = IN_PROGRESS
    details: str = ""
    modified: float = field(default_factory=time.time)

    def set(self, status: str, details: str) -> None:
        self.status, self.details, self.modified = status, details, time.time()

    def to_json(self) -> dict[str, Any]:
        return {
            "RuleConfigurationName": self.name,
            "RuleEvaluationStatus": self.status,
            "StatusDetails": self.details,
            "LastModifiedTime": datetime.fromtimestamp(self.modified, UTC).isoformat(timespec="milliseconds"),
        }


def build_rule(configuration: Mapping[str, Any], trial: Any) -> BuiltInRule:
    """The rule a DebugRuleConfiguration asks for; RuleParameterError when it cannot be built."""
    parameters = dict(configuration.get("RuleParameters") or {})
    wanted = str(parameters.get("rule_to_invoke") or configuration.get("RuleConfigurationName") or "")
    if wanted not in RULES:
        raise RuleParameterError(
            f"rule {wanted!r} is not evaluated by the local runner (it evaluates {', '.join(RULES)}); "
            "remove it from the local pipeline or run on the aws target"
        )
    return RULES[wanted](trial, parameters)


class TrialFollower:
    """Invokes every rule on every step the trial has completed, in order, until the job ends."""

    def __init__(self, trial_dir: Path, configurations: list[Mapping[str, Any]]) -> None:
        self.trial_dir = trial_dir
        self.configurations = configurations
        self.trial: Any = None
        self.states: list[RuleState] = [
            RuleState(str(item.get("RuleConfigurationName")), None) for item in configurations
        ]
        self.next_step = 0

    def has_data(self) -> bool:
        return any((self.trial_dir / "collections").glob("*/*.json"))

    def open(self) -> None:
        """Create the trial and the rules once the hook has written its collections."""
        self.trial = create_trial(str(self.trial_dir))
        for state, configuration in zip(self.states, self.configurations, strict=True):
            try:
                state.rule = build_rule(configuration, self.trial)
            except RuleParameterError as error:
                state.set(ERROR, str(error))

    def active(self) -> list[RuleState]:
        return [state for state in self.states if state.status == IN_PROGRESS and state.rule is not None]

    def evaluate_new_steps(self) -> None:
        steps = [step for step in self.trial.steps() if step >= self.next_step]
        for step in steps:
            for state in self.active():
                self.invoke(state, lambda rule, step=step: rule.invoke(step), step)
            self.next_step = step + 1

    def invoke(self, state: RuleState, call: Callable[[BuiltInRule], Any], step: int | str) -> None:
        assert state.rule is not None
        try:
            if call(state.rule):  # end_of_trial returns True instead of raising
                raise RuleEvaluationConditionMet(type(state.rule).__name__, step)
        except RuleEvaluationConditionMet as met:
            state.set(ISSUES_FOUND, f"RuleEvaluationConditionMet: {met}: {state.rule.finding}")
        except UNAVAILABLE:
            pass  # a tensor not saved at this step: nothing to evaluate, as smdebug's invoke_rule does
        except Exception as error:  # a rule that breaks must report it, not take the other rules down
            state.set(ERROR, f"RuleEvaluationError: rule {state.name} failed at step {step}: {error!r}")

    def finish(self) -> None:
        """Every step is evaluated: end-of-trial checks, then a final status for each rule."""
        if self.trial is None:
            for state in self.states:
                if state.status == IN_PROGRESS:
                    state.set(ERROR, no_tensors_message(self.trial_dir))
            return
        for state in self.active():
            self.invoke(state, lambda rule: rule.end_of_trial(), "end")
        for state in self.active():
            assert state.rule is not None
            problem = state.rule.unusable()
            if problem:
                state.set(ERROR, f"ClientError: {problem}")
            else:
                state.set(NO_ISSUES, state.rule.summary())

    def statuses(self) -> list[dict[str, Any]]:
        return [state.to_json() for state in self.states]


def no_tensors_message(trial_dir: Path) -> str:
    return (
        f"ClientError: the training job saved no Debugger tensors in {trial_dir}: the training script must "
        "create smdebug's hook from the DebugHookConfig (entrypoints/debugger.py does)"
    )


def scalar_series(trial: Any, collection: str) -> dict[str, dict[str, list[list[float]]]]:
    """Every scalar tensor of `collection` per mode as [mode step, global step, value] rows (what
    the plots draw: the losses, and the epoch means of contract.EPOCH_MEANS_COLLECTION)."""
    series: dict[str, dict[str, list[list[float]]]] = {}
    for name in sorted(collection_tensors(trial, collection)):
        tensor = trial.tensor(name)
        for mode in (TRAIN, EVAL, GLOBAL):
            rows = []
            for mode_step in tensor.steps(mode=mode):
                value = value_at(trial, name, mode_step, mode)
                if value is not None and value.size == 1:
                    rows.append([int(mode_step), int(trial.global_step(mode, mode_step)), float(value)])
            if rows and (mode != GLOBAL or not series.get(name)):
                series.setdefault(name, {})[mode.name] = rows
    return series


# --- the child process -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What the runner asks of the child (written by local.debugger_monitor)."""

    trial_dir: Path
    rules: list[dict[str, Any]]
    status_file: Path
    losses_file: Path
    ended_file: Path  # appears when the training job has ended
    poll_seconds: float = DEFAULT_POLL_SECONDS
    epoch_means_file: Path | None = None  # the series of contract.EPOCH_MEANS_COLLECTION

    @classmethod
    def read(cls, path: Path) -> Spec:
        data = json.loads(path.read_text())
        return cls(
            Path(data["trial_dir"]),
            list(data["rules"]),
            Path(data["status_file"]),
            Path(data["losses_file"]),
            Path(data["ended_file"]),
            float(data.get("poll_seconds", DEFAULT_POLL_SECONDS)),
            Path(data["epoch_means_file"]) if data.get("epoch_means_file") else None,
        )


def follow(spec: Spec) -> TrialFollower:
    """Evaluate the rules while the job runs and after it ends; the status file is kept current."""
    follower = TrialFollower(spec.trial_dir, spec.rules)
    parent = os.getppid()
    write_json_atomic(spec.status_file, {"Finished": False, "Statuses": follower.statuses()})
    while True:
        ended = spec.ended_file.exists()  # read first: every step written before it is then visible
        if follower.trial is None and follower.has_data():
            follower.open()
        if follower.trial is not None:
            follower.evaluate_new_steps()
        write_json_atomic(spec.status_file, {"Finished": False, "Statuses": follower.statuses()})
        # Rules that are done still wait for the end: the loss series for the plots needs every step.
        if ended or os.getppid() != parent:
            break
        time.sleep(spec.poll_seconds)
    follower.finish()
    if follower.trial is not None:
        write_json_atomic(spec.losses_file, scalar_series(follower.trial, "losses"))
        if spec.epoch_means_file is not None:
            write_json_atomic(spec.epoch_means_file, scalar_series(follower.trial, EPOCH_MEANS_COLLECTION))
    write_json_atomic(spec.status_file, {"Finished": True, "Statuses": follower.statuses()})
    return follower


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1:
        print("usage: python -m local.debugger_rules SPEC.json", file=sys.stderr)
        return 2
    follow(Spec.read(Path(arguments[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
