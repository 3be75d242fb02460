"""Tuning steps: CreateHyperParameterTuningJob emulated with local training jobs as trials.

Strategies: Random (uniform, log or reverse-log sampling per range), Bayesian (optuna's TPE
sampler, asked for one trial at a time so parallel trials are proposed as they are needed) and
Grid (every combination of the categorical ranges, in declared order; SageMaker allows only
categorical ranges with Grid). Hyperband is refused with a clear message.

Each trial is a training job (see local.jobs.training) with the static hyperparameters plus the
tuned ones; its objective is the final value of the objective metric found in its log with the
definition's MetricDefinitions regex, as SageMaker records FinalHyperParameterTuningJobObjectiveMetric.
At most MaxParallelTrainingJobs trials run at once, and never more than the machine's cores; each
trial gets its share of the cores (SM_NUM_CPUS, OMP_NUM_THREADS).

Early stopping (TrainingJobEarlyStoppingType "Auto") is SageMaker's median rule: each time a
trial reports its objective (once per epoch for Kennel's train.py), if that value is worse than
the median of the running averages of completed trials up to the same epoch, the trial is
stopped (its model is kept, as SageMaker keeps it). The rule waits until MIN_TRIALS_FOR_MEDIAN
trials have completed, so early trials are never judged against too few others.

Every trial keeps its own folder under the tuning job's folder (log.txt, metrics.json, the
re-rooted container layout); `trials.json` there summarises them all while the tuner runs.
"""

from __future__ import annotations

import itertools
import math
import random
import secrets
import statistics
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from local.expressions import to_text
from local.files import write_json_atomic
from local.handlers import CLIENT_ERROR, StepContext, StepFailure, StepResult
from local.jobs.container import log_note
from local.jobs.training import TrainingOutcome, run_training_job
from local.state import ACCOUNT, REGION, STOPPED, SUCCEEDED, now

MIN_TRIALS_FOR_MEDIAN = 3
STRATEGIES = ("Random", "Bayesian", "Grid")
# Keys of a TrainingJobDefinition that describe the tuning, not the training job.
_TUNING_ONLY_KEYS = (
    "StaticHyperParameters",
    "HyperParameterRanges",
    "TuningObjective",
    "DefinitionName",
    "HyperParameterTuningResourceConfig",
)


# --- the request --------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterRange:
    name: str
    kind: str  # Integer, Continuous or Categorical
    low: float = 0.0
    high: float = 0.0
    scaling: str = "Auto"
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class TuningConfig:
    strategy: str
    max_jobs: int
    max_parallel: int
    minimize: bool
    metric_name: str
    ranges: tuple[ParameterRange, ...]
    early_stopping: bool
    seed: int
    target_value: float | None = None


def check_supported(arguments: dict) -> None:
    """Raise StepFailure for a tuning request the local tuner cannot run (it may hold unresolved
    expressions: only literal values are judged)."""
    if arguments.get("TrainingJobDefinitions"):
        raise StepFailure(
            "tuning over several TrainingJobDefinitions is not supported locally; "
            "use one TrainingJobDefinition"
        )
    if "TrainingJobDefinition" not in arguments:
        raise StepFailure("the tuning request has no TrainingJobDefinition")
    strategy = (arguments.get("HyperParameterTuningJobConfig") or {}).get("Strategy", "Bayesian")
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        raise StepFailure(
            f"tuning strategy {strategy!r} is not supported locally; use one of {', '.join(STRATEGIES)} "
            "(strategy in [tuning] of kennel.toml; the aws target runs every strategy SageMaker has)"
        )


def parse_config(arguments: dict) -> TuningConfig:
    """The tuning settings of a CreateHyperParameterTuningJob request, validated."""
    check_supported(arguments)
    config = arguments.get("HyperParameterTuningJobConfig") or {}
    strategy = str(config.get("Strategy", "Bayesian"))
    objective = config.get("HyperParameterTuningJobObjective") or {}
    if not objective.get("MetricName"):
        raise StepFailure("HyperParameterTuningJobObjective.MetricName is required")
    ranges = parse_ranges(config.get("ParameterRanges") or {})
    if strategy == "Grid" and any(item.kind != "Categorical" for item in ranges):
        raise StepFailure(
            "the Grid strategy takes categorical ranges only (as on SageMaker); "
            "make the ranges categorical or use Random/Bayesian"
        )
    limits = config.get("ResourceLimits") or {}
    grid_size = math.prod(len(item.values) for item in ranges) if strategy == "Grid" else None
    max_jobs = _positive_int(
        limits.get("MaxNumberOfTrainingJobs", grid_size), "ResourceLimits.MaxNumberOfTrainingJobs"
    )
    if grid_size is not None:
        max_jobs = min(max_jobs, grid_size)
    seed = config.get("RandomSeed")
    criteria = (config.get("TuningJobCompletionCriteria") or {}).get("TargetObjectiveMetricValue")
    return TuningConfig(
        strategy=strategy,
        max_jobs=max_jobs,
        max_parallel=_positive_int(
            limits.get("MaxParallelTrainingJobs", 1), "ResourceLimits.MaxParallelTrainingJobs"
        ),
        minimize=str(objective.get("Type", "Maximize")) == "Minimize",
        metric_name=str(objective["MetricName"]),
        ranges=ranges,
        early_stopping=str(config.get("TrainingJobEarlyStoppingType", "Off")) == "Auto",
        seed=int(seed) if seed is not None else secrets.randbelow(2**31),
        target_value=float(criteria) if criteria is not None else None,
    )


def _positive_int(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise StepFailure(f"{what} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise StepFailure(f"{what} must be a positive integer, got {value!r}")
    return number


def parse_ranges(ranges: dict) -> tuple[ParameterRange, ...]:
    parsed: list[ParameterRange] = []
    for kind, key in (("Integer", "IntegerParameterRanges"), ("Continuous", "ContinuousParameterRanges")):
        for item in ranges.get(key) or []:
            name, scaling = str(item["Name"]), str(item.get("ScalingType", "Auto"))
            low, high = _number(item.get("MinValue"), name), _number(item.get("MaxValue"), name)
            if low > high:
                raise StepFailure(f"range {name!r}: MinValue {low} is above MaxValue {high}")
            if scaling == "Logarithmic" and low <= 0:
                raise StepFailure(f"range {name!r}: Logarithmic scaling needs MinValue > 0")
            if scaling == "ReverseLogarithmic" and (kind != "Continuous" or not 0 <= low < high < 1):
                raise StepFailure(
                    f"range {name!r}: ReverseLogarithmic needs a continuous range within [0, 1)"
                )
            parsed.append(ParameterRange(name, kind, low, high, scaling))
    for item in ranges.get("CategoricalParameterRanges") or []:
        values = tuple(to_text(value) for value in item.get("Values") or [])
        if not values:
            raise StepFailure(f"categorical range {item.get('Name')!r} has no Values")
        parsed.append(ParameterRange(str(item["Name"]), "Categorical", values=values))
    if not parsed:
        raise StepFailure("the tuning request has no ParameterRanges")
    return tuple(parsed)


def _number(value: Any, name: str) -> float:
    try:
        return float(to_text(value))
    except ValueError:
        raise StepFailure(f"range {name!r}: {value!r} is not a number") from None


# --- strategies -----------------------------------------------------------------------------


class Strategy(Protocol):
    def suggest(self) -> tuple[Any, dict[str, str]] | None: ...

    def tell(self, key: Any, value: float | None) -> None: ...


def format_value(parameter: ParameterRange, value: Any) -> str:
    if parameter.kind == "Integer":
        return str(int(value))
    if parameter.kind == "Continuous":
        return repr(float(value))
    return str(value)


class RandomStrategy:
    def __init__(self, ranges: tuple[ParameterRange, ...], seed: int) -> None:
        self.ranges = ranges
        self.rng = random.Random(seed)

    def suggest(self) -> tuple[Any, dict[str, str]]:
        return None, {item.name: format_value(item, self._sample(item)) for item in self.ranges}

    def tell(self, key: Any, value: float | None) -> None:
        return None

    def _sample(self, item: ParameterRange) -> Any:
        if item.kind == "Categorical":
            return self.rng.choice(item.values)
        if item.scaling == "Logarithmic":
            top = item.high + 1 if item.kind == "Integer" else item.high
            sample = math.exp(self.rng.uniform(math.log(item.low), math.log(top)))
        elif item.scaling == "ReverseLogarithmic":
            sample = 1 - math.exp(self.rng.uniform(math.log(1 - item.high), math.log(1 - item.low)))
        elif item.kind == "Integer":
            return self.rng.randint(int(item.low), int(item.high))
        else:
            sample = self.rng.uniform(item.low, item.high)
        if item.kind == "Integer":
            return min(int(item.high), max(int(item.low), math.floor(sample)))
        return min(item.high, max(item.low, sample))


class GridStrategy:
    def __init__(self, ranges: tuple[ParameterRange, ...]) -> None:
        names = [item.name for item in ranges]
        self.combinations: Iterator[tuple[str, ...]] = itertools.product(*(item.values for item in ranges))
        self.names = names

    def suggest(self) -> tuple[Any, dict[str, str]] | None:
        combination = next(self.combinations, None)
        return None if combination is None else (None, dict(zip(self.names, combination, strict=True)))

    def tell(self, key: Any, value: float | None) -> None:
        return None


class BayesianStrategy:
    """optuna's TPE sampler, driven by ask/tell; parallel asks use the constant-liar heuristic."""

    def __init__(self, ranges: tuple[ParameterRange, ...], seed: int, minimize: bool, max_jobs: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(
            seed=seed, constant_liar=True, n_startup_trials=max(2, min(10, max_jobs // 3))
        )
        self.study = optuna.create_study(direction="minimize" if minimize else "maximize", sampler=sampler)
        self.ranges = ranges
        self.optuna = optuna
        self.lock = threading.Lock()

    def suggest(self) -> tuple[Any, dict[str, str]]:
        with self.lock:
            trial = self.study.ask()
            values = {item.name: format_value(item, self._suggest(trial, item)) for item in self.ranges}
        return trial, values

    def tell(self, key: Any, value: float | None) -> None:
        with self.lock:
            if value is None or not math.isfinite(value):
                self.study.tell(key, state=self.optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(key, value)

    @staticmethod
    def _suggest(trial: Any, item: ParameterRange) -> Any:
        if item.kind == "Categorical":
            return trial.suggest_categorical(item.name, list(item.values))
        log = item.scaling == "Logarithmic"
        if item.kind == "Integer":
            return trial.suggest_int(item.name, int(item.low), int(item.high), log=log)
        if item.scaling == "ReverseLogarithmic":
            return 1 - trial.suggest_float(item.name, 1 - item.high, 1 - item.low, log=True)
        return trial.suggest_float(item.name, item.low, item.high, log=log)


def make_strategy(config: TuningConfig) -> Strategy:
    if config.strategy == "Grid":
        return GridStrategy(config.ranges)
    if config.strategy == "Random":
        return RandomStrategy(config.ranges, config.seed)
    return BayesianStrategy(config.ranges, config.seed, config.minimize, config.max_jobs)


# --- early stopping ---------------------------------------------------------------------------


class MedianStopper:
    """SageMaker's Auto early stopping: stop a trial whose objective at epoch n is worse than the
    median of the running averages, up to epoch n, of the trials completed so far."""

    def __init__(self, minimize: bool, min_trials: int = MIN_TRIALS_FOR_MEDIAN) -> None:
        self.minimize = minimize
        self.min_trials = min_trials
        self.completed: list[list[float]] = []
        self.lock = threading.Lock()

    def record(self, series: list[float]) -> None:
        if series:
            with self.lock:
                self.completed.append(list(series))

    def should_stop(self, series: list[float]) -> bool:
        if not series:
            return False
        epoch = len(series)
        with self.lock:
            averages = [statistics.fmean(done[:epoch]) for done in self.completed if len(done) >= epoch]
        if len(averages) < self.min_trials:
            return False
        median = statistics.median(averages)
        current = series[-1]
        return current > median if self.minimize else current < median


# --- trials -----------------------------------------------------------------------------------


@dataclass
class Trial:
    number: int
    job_name: str
    key: Any
    hyperparameters: dict[str, str]
    job_dir: Path
    created: str = field(default_factory=now)
    status: str = "InProgress"
    objective_series: list[float] = field(default_factory=list)
    stop_flag: threading.Event = field(default_factory=threading.Event)
    outcome: TrainingOutcome | None = None

    @property
    def objective(self) -> float | None:
        return self.objective_series[-1] if self.objective_series else None

    def summary(self, tuning_job: str, config: TuningConfig) -> dict[str, Any]:
        properties = self.outcome.properties if self.outcome else {}
        summary: dict[str, Any] = {
            "TrainingJobName": self.job_name,
            "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{self.job_name}",
            "TuningJobName": tuning_job,
            "CreationTime": self.created,
            "TrainingStartTime": properties.get("TrainingStartTime", self.created),
            "TrainingEndTime": properties.get("TrainingEndTime"),
            "TrainingJobStatus": self.status,
            "TunedHyperParameters": dict(self.hyperparameters),
            "ObjectiveStatus": "Pending"
            if self.status == "InProgress"
            else ("Succeeded" if self.objective is not None else "Failed"),
            "LogPath": str(self.job_dir / "log.txt"),
        }
        if self.objective is not None:
            summary["FinalHyperParameterTuningJobObjectiveMetric"] = {
                "Type": "Minimize" if config.minimize else "Maximize",
                "MetricName": config.metric_name,
                "Value": self.objective,
            }
        if self.outcome is not None and self.outcome.status not in (SUCCEEDED, STOPPED):
            summary["FailureReason"] = properties.get("FailureReason") or self.outcome.failure_reason
        return summary


def trial_request(definition: dict, hyperparameters: dict[str, str]) -> dict[str, Any]:
    """The CreateTrainingJob request of one trial: the definition plus static and tuned values."""
    request = {key: value for key, value in definition.items() if key not in _TUNING_ONLY_KEYS}
    static = {name: to_text(value) for name, value in (definition.get("StaticHyperParameters") or {}).items()}
    request["HyperParameters"] = {**static, **hyperparameters}
    return request


class TuningHandler:
    def check(self, step: dict) -> None:
        check_supported(step.get("Arguments") or {})

    def run(self, step: dict, arguments: dict, context: StepContext) -> StepResult:
        config = parse_config(arguments)
        definition = arguments["TrainingJobDefinition"]
        metric_names = [
            item.get("Name")
            for item in (definition.get("AlgorithmSpecification") or {}).get("MetricDefinitions") or []
        ]
        if config.metric_name not in metric_names:
            raise StepFailure(
                f"objective metric {config.metric_name!r} has no MetricDefinitions entry "
                f"(found: {', '.join(map(str, metric_names)) or 'none'}); "
                "add a regex for it to the training job definition",
                CLIENT_ERROR,
            )
        return _Tuner(config, definition, arguments, context).run()


class _Tuner:
    def __init__(self, config: TuningConfig, definition: dict, arguments: dict, context: StepContext) -> None:
        self.config = config
        self.definition = definition
        self.arguments = arguments
        self.context = context
        self.strategy = make_strategy(config)
        self.stopper = MedianStopper(config.minimize) if config.early_stopping else None
        self.trials: list[Trial] = []
        self.lock = threading.Lock()
        self.parallel = max(1, min(config.max_parallel, context.settings.cores, config.max_jobs))
        self.cores_per_trial = max(1, context.settings.cores // self.parallel)
        self.created = now()

    def run(self) -> StepResult:
        self.context.job_dir.mkdir(parents=True, exist_ok=True)
        self._note(
            f"{self.config.strategy} search: {self.config.max_jobs} trials, {self.parallel} at a time "
            f"({self.cores_per_trial} core(s) each), objective "
            f"{'minimize' if self.config.minimize else 'maximize'} {self.config.metric_name}, "
            f"early stopping {'Auto (median rule)' if self.stopper else 'Off'}, seed {self.config.seed}"
        )
        self.context.mark_executing()
        running: dict[Future, Trial] = {}
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="trial") as pool:
            while True:
                while len(running) < self.parallel and self._may_launch():
                    trial = self._next_trial()
                    if trial is None:
                        break
                    running[pool.submit(self._run_trial, trial)] = trial
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    trial = running.pop(future)
                    future.result()
                    self.strategy.tell(trial.key, trial.objective if trial.status != "Failed" else None)
                    self._save()
        return self._result()

    def _may_launch(self) -> bool:
        if self.context.stop_event.is_set() or len(self.trials) >= self.config.max_jobs:
            return False
        target, best = self.config.target_value, self._best()
        if target is not None and best is not None and best.objective is not None:
            reached = best.objective <= target if self.config.minimize else best.objective >= target
            return not reached
        return True

    def _next_trial(self) -> Trial | None:
        suggestion = self.strategy.suggest()
        if suggestion is None:
            return None
        key, hyperparameters = suggestion
        number = len(self.trials) + 1
        job_name = f"{self.context.job_name}-{number:03d}-{secrets.token_hex(4)}"
        trial = Trial(number, job_name, key, hyperparameters, self.context.job_dir / "trials" / job_name)
        with self.lock:
            self.trials.append(trial)
        self._note(f"trial {job_name} started: {_format_hyperparameters(hyperparameters)}")
        self.context.progress.trial_update(
            self.context.step_name, job_name, "InProgress", _format_hyperparameters(hyperparameters)
        )
        self._save()
        return trial

    def _run_trial(self, trial: Trial) -> None:
        def on_metrics(found: dict[str, float]) -> None:
            if self.config.metric_name not in found:
                return
            trial.objective_series.append(found[self.config.metric_name])
            if self.stopper is not None and self.stopper.should_stop(trial.objective_series):
                trial.stop_flag.set()

        outcome = run_training_job(
            trial_request(self.definition, trial.hyperparameters),
            job_name=trial.job_name,
            job_dir=trial.job_dir,
            context=self.context,
            source=f"trial {trial.number}",
            cores=self.cores_per_trial,
            on_metrics=on_metrics,
            should_stop=trial.stop_flag.is_set,
        )
        trial.outcome = outcome
        early = outcome.extra.get("early_stopped", False)
        trial.status = {SUCCEEDED: "Completed", STOPPED: "Stopped"}.get(outcome.status, "Failed")
        if self.stopper is not None and (trial.status == "Completed" or early):
            self.stopper.record(trial.objective_series)
        detail = (
            f"{self.config.metric_name}={trial.objective}"
            if trial.objective is not None
            else "no objective value"
        )
        if early:
            detail += " (stopped early: worse than the median)"
        elif trial.status == "Failed":
            detail += f"; {(outcome.failure_reason or '').splitlines()[0]}"
        self._note(f"trial {trial.job_name} {trial.status}: {detail}")
        self.context.progress.trial_update(self.context.step_name, trial.job_name, trial.status, detail)

    def _best(self) -> Trial | None:
        with self.lock:
            scored = [
                trial
                for trial in self.trials
                if trial.objective is not None and trial.status in ("Completed", "Stopped")
            ]
        if not scored:
            return None
        return min(
            scored,
            key=lambda trial: (trial.objective if self.config.minimize else -trial.objective, trial.number),
        )

    def _summaries(self) -> list[dict[str, Any]]:
        name = self.context.job_name
        with self.lock:
            trials = list(self.trials)
        scored = [
            trial
            for trial in trials
            if trial.objective is not None and trial.status in ("Completed", "Stopped")
        ]
        scored.sort(
            key=lambda trial: (trial.objective if self.config.minimize else -trial.objective, trial.number)
        )
        others = [trial for trial in trials if trial not in scored]
        return [trial.summary(name, self.config) for trial in scored + others]

    def _counters(self) -> tuple[dict[str, int], dict[str, int]]:
        with self.lock:
            statuses = [trial.status for trial in self.trials]
            objectives = [trial.objective for trial in self.trials]
        training = {
            "Completed": statuses.count("Completed"),
            "InProgress": statuses.count("InProgress"),
            "RetryableError": 0,
            "NonRetryableError": statuses.count("Failed"),
            "Stopped": statuses.count("Stopped"),
        }
        finished = [
            objective
            for objective, status in zip(objectives, statuses, strict=True)
            if status != "InProgress"
        ]
        objective = {
            "Succeeded": sum(1 for value in finished if value is not None),
            "Pending": statuses.count("InProgress"),
            "Failed": sum(1 for value in finished if value is None),
        }
        return training, objective

    def _save(self) -> None:
        training, objective = self._counters()
        write_json_atomic(
            self.context.job_dir / "trials.json",
            {
                "HyperParameterTuningJobName": self.context.job_name,
                "Strategy": self.config.strategy,
                "Seed": self.config.seed,
                "MaxNumberOfTrainingJobs": self.config.max_jobs,
                "MaxParallelTrainingJobs": self.parallel,
                "TrainingJobStatusCounters": training,
                "ObjectiveStatusCounters": objective,
                "TrainingJobSummaries": self._summaries(),
                "ObjectiveSeries": {trial.job_name: trial.objective_series for trial in list(self.trials)},
            },
        )

    def _result(self) -> StepResult:
        training, objective = self._counters()
        best = self._best()
        properties: dict[str, Any] = {
            "HyperParameterTuningJobName": self.context.job_name,
            "HyperParameterTuningJobArn": (
                f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:hyper-parameter-tuning-job/{self.context.job_name}"
            ),
            "HyperParameterTuningJobConfig": self.arguments.get("HyperParameterTuningJobConfig"),
            "TrainingJobDefinition": self.definition,
            "CreationTime": self.created,
            "HyperParameterTuningEndTime": now(),
            "TrainingJobStatusCounters": training,
            "ObjectiveStatusCounters": objective,
            "TrainingJobSummaries": self._summaries(),
        }
        if best is not None:
            properties["BestTrainingJob"] = best.summary(self.context.job_name, self.config)
        if self.context.stop_event.is_set():
            properties["HyperParameterTuningJobStatus"] = "Stopped"
            return StepResult.stopped("the tuning job was stopped", properties)
        if best is None:
            reason = self._no_best_reason()
            properties.update(HyperParameterTuningJobStatus="Failed", FailureReason=reason)
            return StepResult.failed(reason, CLIENT_ERROR, properties)
        properties["HyperParameterTuningJobStatus"] = "Completed"
        self._note(
            f"best trial {best.job_name}: {self.config.metric_name}={best.objective} "
            f"with {_format_hyperparameters(best.hyperparameters)}"
        )
        return StepResult.succeeded(properties, best_training_job=best.job_name)

    def _no_best_reason(self) -> str:
        failures = [
            trial.outcome.failure_reason
            for trial in self.trials
            if trial.outcome and trial.outcome.failure_reason and trial.status == "Failed"
        ]
        if failures:
            first = failures[0].splitlines()[0]
            return (
                f"all {len(self.trials)} training jobs failed or reported no objective; first failure: "
                f"{first} (trial logs under {self.context.job_dir / 'trials'})"
            )
        regex = next(
            (
                item.get("Regex")
                for item in (self.definition.get("AlgorithmSpecification") or {}).get("MetricDefinitions")
                or []
                if item.get("Name") == self.config.metric_name
            ),
            "?",
        )
        return (
            f"no training job reported the objective metric {self.config.metric_name!r} "
            f"(regex {regex!r} matched no log line); "
            f"see the trial logs under {self.context.job_dir / 'trials'}"
        )

    def _note(self, text: str) -> None:
        log_note(self.context.log_path, text)


def _format_hyperparameters(values: dict[str, str]) -> str:
    return " ".join(f"{name}={value}" for name, value in sorted(values.items()))
