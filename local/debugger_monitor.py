"""Debugger rules for a local training job: evaluated while it trains, reported as SageMaker reports them.

SageMaker starts one rule container per DebugRuleConfiguration next to the training job; each
follows the tensors the hook writes and ends NoIssuesFound, IssuesFound or Error. Locally one
child process (`python -m local.debugger_rules`, see that module) evaluates all of a job's rules:
smdebug imports torch, which the runner keeps out of its own process. This module is the runner's
side of it, as a training-job monitor (local.jobs.training.JobMonitor):

  * the child starts with the job and rewrites `<job>/debugger/rule_statuses.json` as steps
    arrive, so `kennel status` can show InProgress / IssuesFound while the job runs;
  * a rule that fires with a StopTraining action (RuleParameters.action_json, as the SDK writes
    it) stops the job, as the action would on SageMaker;
  * when the job ends the child evaluates the last steps, settles every rule and writes the
    series that local.plots draws (`<job>/debugger/losses.json`: the losses per step;
    `epoch_means.json`: each epoch's mean losses and accuracies); the statuses become the step's
    DebugRuleEvaluationStatuses.

A job with a DebugHookConfig but no rules still gets the child, for the loss series.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local.files import read_json, write_json_atomic
from local.handlers import StepContext
from local.jobs.container import log_note
from local.jobs.training import PreparedJob
from local.state import ACCOUNT, REGION, ProcessRef, now

IN_PROGRESS, ISSUES_FOUND, ERROR = "InProgress", "IssuesFound", "Error"
RULES_MODULE = "local.debugger_rules"
FOLDER = "debugger"
STATUS_FILE = "rule_statuses.json"
LOSSES_FILE = "losses.json"
EPOCH_MEANS_FILE = "epoch_means.json"
END_OF_TRAINING_FILE = "training_job_end.ts"  # smdebug's END_OF_JOB_FILENAME
# The child finishes within seconds of the job's end on a small trial; a large one may need minutes.
FINISH_TIMEOUT_SECONDS = 600.0
STATUS_READ_SECONDS = 0.5
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StopAction:
    """A rule's StopTraining action; `applies` is False when its job prefix names other jobs."""

    rule: str
    applies: bool
    prefix: str | None


def stop_action(rule: dict, job_name: str) -> StopAction | None:
    """The rule's StopTraining action, read from RuleParameters.action_json; ValueError if unreadable.

    The SDK writes action_json as a JSON list of {"name": ..., "training_job_prefix": ...} with its
    quotes backslash-escaped, and fills in the job name as the prefix when none is given.
    """
    name = str(rule.get("RuleConfigurationName"))
    text = str((rule.get("RuleParameters") or {}).get("action_json") or "").strip()
    if not text:
        return None
    try:
        parsed = json.loads(text.replace('\\"', '"').lower())
    except ValueError:
        raise ValueError(f"rule {name}: RuleParameters.action_json is not JSON: {text[:200]}") from None
    for action in parsed if isinstance(parsed, list) else [parsed]:
        if isinstance(action, dict) and action.get("name") == "stoptraining":
            prefix = action.get("training_job_prefix")
            return StopAction(name, not prefix or job_name.lower().startswith(str(prefix)), prefix)
    return None


def debugger_monitor(
    request: dict, job_name: str, job: PreparedJob, context: StepContext
) -> DebuggerMonitor | None:
    """The monitor for a job with a DebugHookConfig (MonitorFactory); None without one."""
    if job.tensors_dir is None:
        return None
    monitor = DebuggerMonitor(request, job_name, job, context)
    monitor.start()
    return monitor


class DebuggerMonitor:
    def __init__(self, request: dict, job_name: str, job: PreparedJob, context: StepContext) -> None:
        assert job.tensors_dir is not None
        self.rules: list[dict] = list(request.get("DebugRuleConfigurations") or [])
        self.job_name = job_name
        self.context = context
        self.folder = context.job_dir / FOLDER
        self.tensors_dir = job.tensors_dir
        self.log_path = self.folder / "log.txt"
        self.process: subprocess.Popen | None = None
        self.reference: ProcessRef | None = None
        self.broken: dict[str, str] = {}  # rules refused before evaluation: name -> reason
        self.actions: dict[str, StopAction] = {}
        self.seen: dict[str, str] = {}  # name -> last status announced
        self.last_read = 0.0
        self.statuses: list[dict] = []

    # --- while the job runs ---------------------------------------------------------------

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for rule in self.rules:
            name = str(rule.get("RuleConfigurationName"))
            try:
                action = stop_action(rule, self.job_name)
            except ValueError as error:
                self.broken[name] = f"ClientError: {error}"
                continue
            if action is not None:
                self.actions[name] = action
        spec = {
            "trial_dir": str(self.tensors_dir),
            "rules": [
                rule for rule in self.rules if str(rule.get("RuleConfigurationName")) not in self.broken
            ],
            "status_file": str(self.folder / STATUS_FILE),
            "losses_file": str(self.folder / LOSSES_FILE),
            "epoch_means_file": str(self.folder / EPOCH_MEANS_FILE),
            "ended_file": str(self.folder / "job-ended"),
        }
        write_json_atomic(self.folder / "spec.json", spec)
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [environment.get("PYTHONPATH")])]
        )
        environment.setdefault("SMDEBUG_LOG_LEVEL", "error")  # smdebug warns on every step otherwise
        try:
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [self.context.settings.python, "-m", RULES_MODULE, str(self.folder / "spec.json")],
                    cwd=PROJECT_ROOT,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as error:
            reason = f"InternalServerError: the rule evaluator could not start: {error}"
            self.broken = {str(rule.get("RuleConfigurationName")): reason for rule in self.rules}
            return
        self.reference = ProcessRef.of(self.process.pid)
        self.context.track_process(self.reference, True)

    def stop_reason(self) -> str | None:
        """Checked a few times a second while the job runs: a fired rule with a StopTraining action."""
        if time.monotonic() - self.last_read < STATUS_READ_SECONDS:
            return None
        self.last_read = time.monotonic()
        self.refresh()
        for status in self.statuses:
            action = self.actions.get(status["RuleConfigurationName"])
            if status["RuleEvaluationStatus"] == ISSUES_FOUND and action is not None and action.applies:
                return (
                    f"stopped by the StopTraining action of Debugger rule {action.rule}: "
                    f"{status.get('StatusDetails', '')}"
                )
        return None

    def refresh(self) -> None:
        """Read the child's status file and announce what changed in the step's output."""
        path = self.folder / STATUS_FILE
        try:
            statuses = read_json(path).get("Statuses", [])
        except (OSError, ValueError):
            return
        self.statuses = statuses
        for status in statuses:
            name, value = status["RuleConfigurationName"], status["RuleEvaluationStatus"]
            if self.seen.get(name) != value and value != IN_PROGRESS:
                line = f"Debugger rule {name}: {value}" + (
                    f" - {status['StatusDetails']}" if status.get("StatusDetails") else ""
                )
                self.context.progress.step_line(self.context.step_name, f"[kennel] {line}")
                log_note(self.context.log_path, line)
            self.seen[name] = value

    # --- when the job has ended ---------------------------------------------------------------

    def finish(self, properties: dict[str, Any], metadata: dict[str, Any]) -> None:
        # SageMaker tells its rule containers that training ended; smdebug's hook does not write its
        # end-of-training file under SageMaker (TRAINING_JOB_NAME is set), so the runner does, as the
        # trial's readers expect, then tells the child.
        if self.tensors_dir.is_dir():
            (self.tensors_dir / END_OF_TRAINING_FILE).touch()
        (self.folder / "job-ended").touch()
        finished = self.wait()
        self.refresh()
        if self.rules:
            properties["DebugRuleEvaluationStatuses"] = self.final_statuses(finished)
        metadata["Debugger"] = {
            "RuleStatuses": str(self.folder / STATUS_FILE),
            "LossSeries": str(self.folder / LOSSES_FILE),
            "EpochSeries": str(self.folder / EPOCH_MEANS_FILE),
            "RulesLog": str(self.log_path),
        }

    def wait(self) -> bool:
        """Wait for the child to settle the rules; kill it when it takes too long. True if it finished."""
        if self.process is None or self.reference is None:
            return False
        try:
            self.process.wait(timeout=FINISH_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        finally:
            self.context.track_process(self.reference, False)
        return self.process.returncode == 0

    def final_statuses(self, finished: bool) -> list[dict[str, Any]]:
        """DebugRuleEvaluationStatuses in DescribeTrainingJob's shape, one per configured rule."""
        by_name = {status["RuleConfigurationName"]: status for status in self.statuses}
        entries = []
        for rule in self.rules:
            name = str(rule.get("RuleConfigurationName"))
            status = dict(by_name.get(name) or {})
            if name in self.broken:
                status.update(
                    RuleEvaluationStatus=ERROR, StatusDetails=self.broken[name], LastModifiedTime=now()
                )
            elif status.get("RuleEvaluationStatus", IN_PROGRESS) == IN_PROGRESS:
                why = "it ended" if finished else f"it did not finish within {FINISH_TIMEOUT_SECONDS:g} s"
                status.update(
                    RuleEvaluationStatus=ERROR,
                    StatusDetails=f"InternalServerError: rule evaluation stopped before settling ({why}); "
                    f"see {self.log_path}",
                    LastModifiedTime=now(),
                )
            action = self.actions.get(name)
            if action is not None and not action.applies and status["RuleEvaluationStatus"] == ISSUES_FOUND:
                status["StatusDetails"] += (
                    f" (StopTraining: training_job_prefix {action.prefix!r} "
                    f"does not match job {self.job_name!r}; "
                    "the job was not stopped)"
                )
            entries.append(
                {
                    "RuleConfigurationName": name,
                    "RuleEvaluationJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:processing-job/"
                    f"{self.job_name[:40]}-{name[:20]}".lower(),
                    "RuleEvaluationStatus": status["RuleEvaluationStatus"],
                    "StatusDetails": str(status.get("StatusDetails", ""))[:1024],
                    "LastModifiedTime": status.get("LastModifiedTime") or now(),
                }
            )
        return entries
