"""What a run shows while it goes: a live block of steps on a terminal, plain lines otherwise.

The runner and the job handlers report events (a step's status, a log line, a metric, a tuning
trial); a Progress turns them into output. LiveProgress redraws a block with one line per step
(spinner, elapsed time, epoch and latest metrics, tuning trials) under the scrolling job logs;
PlainProgress writes one timestamped line per event, which suits CI logs and pipes; QuietProgress
shows nothing (library use, tests). `make_progress` picks by whether the stream is a terminal.

`format_execution` renders a stored execution for `kennel status` and for the end of a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

from local.state import FAILED, STOPPED, SUCCEEDED, Execution, StepRecord

_EPOCH = re.compile(r"\bepoch[\s=:]+(\d+)", re.IGNORECASE)


class Progress(Protocol):
    def execution_started(self, execution: Execution, steps: list[str]) -> None: ...

    def step_status(self, step: str, status: str, detail: str = "") -> None: ...

    def step_line(self, step: str, line: str, source: str | None = None) -> None: ...

    def step_metric(self, step: str, metrics: dict[str, float], source: str | None = None) -> None: ...

    def trial_update(self, step: str, trial: str, status: str, detail: str = "") -> None: ...

    def note(self, text: str) -> None: ...

    def execution_finished(self, execution: Execution) -> None: ...


class QuietProgress:
    """Shows nothing."""

    def execution_started(self, execution: Execution, steps: list[str]) -> None:
        return None

    def step_status(self, step: str, status: str, detail: str = "") -> None:
        return None

    def step_line(self, step: str, line: str, source: str | None = None) -> None:
        return None

    def step_metric(self, step: str, metrics: dict[str, float], source: str | None = None) -> None:
        return None

    def trial_update(self, step: str, trial: str, status: str, detail: str = "") -> None:
        return None

    def note(self, text: str) -> None:
        return None

    def execution_finished(self, execution: Execution) -> None:
        return None


class PlainProgress(QuietProgress):
    """One line per event: `12:01:02 Train | epoch=1 ...`."""

    def __init__(self, stream: TextIO, show_logs: bool = True) -> None:
        self.stream = stream
        self.show_logs = show_logs
        self.lock = threading.Lock()

    def _write(self, text: str) -> None:
        with self.lock:
            self.stream.write(f"{time.strftime('%H:%M:%S')} {text}\n")
            self.stream.flush()

    def execution_started(self, execution: Execution, steps: list[str]) -> None:
        self._write(
            f"execution {execution.execution_id} of {execution.pipeline_name}: "
            f"{len(steps)} steps ({', '.join(steps)})"
        )

    def step_status(self, step: str, status: str, detail: str = "") -> None:
        self._write(f"{step}: {status}" + (f" - {detail}" if detail else ""))

    def step_line(self, step: str, line: str, source: str | None = None) -> None:
        if self.show_logs:
            self._write(f"{step}{'/' + source if source else ''} | {line}")

    def trial_update(self, step: str, trial: str, status: str, detail: str = "") -> None:
        self._write(f"{step}: trial {trial} {status}" + (f" - {detail}" if detail else ""))

    def note(self, text: str) -> None:
        self._write(text)

    def execution_finished(self, execution: Execution) -> None:
        with self.lock:
            self.stream.write(format_execution(execution) + "\n")
            self.stream.flush()


@dataclass
class _StepView:
    name: str
    status: str = "Pending"
    detail: str = ""
    started: float | None = None
    ended: float | None = None
    epoch: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    trials: dict[str, str] = field(default_factory=dict)
    best: str = ""


_SYMBOLS = {SUCCEEDED: "✓", FAILED: "✗", STOPPED: "■", "Pending": "·", "Skipped": "-", "Cached": "✓"}
_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class LiveProgress(PlainProgress):
    """A live block of step lines under the scrolling logs (for terminals)."""

    def __init__(self, stream: TextIO, show_logs: bool = True, refresh_seconds: float = 0.25) -> None:
        super().__init__(stream, show_logs)
        self.views: dict[str, _StepView] = {}
        self.block_lines = 0
        self.tick = 0
        self.closed = threading.Event()
        self.refresh_seconds = refresh_seconds
        self.thread: threading.Thread | None = None

    def execution_started(self, execution: Execution, steps: list[str]) -> None:
        with self.lock:
            self.views = {name: _StepView(name) for name in steps}
            self.stream.write(f"execution {execution.execution_id} of {execution.pipeline_name}\n")
            for name, record in execution.steps.items():
                if name in self.views and record.status == SUCCEEDED:
                    self.views[name].status = SUCCEEDED
                    self.views[name].detail = "from an earlier run"
            self._draw()
        if self.thread is None or not self.thread.is_alive():
            self.closed.clear()
            self.thread = threading.Thread(target=self._refresh_loop, daemon=True)
            self.thread.start()

    def step_status(self, step: str, status: str, detail: str = "") -> None:
        with self.lock:
            view = self.views.setdefault(step, _StepView(step))
            if status in ("Starting", "Executing") and view.started is None:
                view.started = time.monotonic()
            if status in (SUCCEEDED, FAILED, STOPPED, "Skipped", "Cached"):
                view.ended = time.monotonic()
            view.status, view.detail = status, detail
            self._draw()

    def step_line(self, step: str, line: str, source: str | None = None) -> None:
        with self.lock:
            view = self.views.setdefault(step, _StepView(step))
            match = _EPOCH.search(line)
            if match and source is None:
                view.epoch = match.group(1)
            if self.show_logs:
                self._print_above(f"{step}{'/' + source if source else ''} | {line}")

    def step_metric(self, step: str, metrics: dict[str, float], source: str | None = None) -> None:
        if source is not None:
            return  # trial metrics are summarised by trial_update
        with self.lock:
            self.views.setdefault(step, _StepView(step)).metrics.update(metrics)

    def trial_update(self, step: str, trial: str, status: str, detail: str = "") -> None:
        with self.lock:
            view = self.views.setdefault(step, _StepView(step))
            view.trials[trial] = status
            if status != "InProgress":
                self._print_above(f"{step}: trial {trial} {status} - {detail}")
            self._draw()

    def note(self, text: str) -> None:
        with self.lock:
            self._print_above(text)

    def execution_finished(self, execution: Execution) -> None:
        self.closed.set()
        if self.thread is not None:
            self.thread.join(timeout=2)
        with self.lock:
            self._draw()
            self.block_lines = 0
            self.stream.write(format_execution(execution) + "\n")
            self.stream.flush()

    # --- drawing (callers hold the lock) ---------------------------------------------------
    def _refresh_loop(self) -> None:
        while not self.closed.wait(self.refresh_seconds):
            with self.lock:
                self.tick += 1
                self._draw()

    def _print_above(self, text: str) -> None:
        self._clear()
        self.stream.write(_fit(text, _width()) + "\n")
        self._draw()

    def _clear(self) -> None:
        if self.block_lines:
            self.stream.write(f"\x1b[{self.block_lines}F\x1b[J")
            self.block_lines = 0

    def _draw(self) -> None:
        self._clear()
        width = _width()
        lines = [_fit(self._render(view), width) for view in self.views.values()]
        for line in lines:
            self.stream.write(line + "\n")
        self.block_lines = len(lines)
        self.stream.flush()

    def _render(self, view: _StepView) -> str:
        running = view.status in ("Starting", "Executing", "Stopping", "Retrying")
        symbol = _SPINNER[self.tick % len(_SPINNER)] if running else _SYMBOLS.get(view.status, "?")
        parts = [f" {symbol} {view.name:<24} {view.status:<10}"]
        if view.started is not None:
            parts.append(_duration((view.ended or time.monotonic()) - view.started))
        if view.epoch:
            parts.append(f"epoch {view.epoch}")
        if view.metrics:
            parts.append(" ".join(f"{name}={value:.4g}" for name, value in list(view.metrics.items())[-3:]))
        if view.trials:
            done = sum(1 for status in view.trials.values() if status != "InProgress")
            parts.append(f"trials {done}/{len(view.trials)} done")
        if view.detail:
            parts.append(view.detail)
        return "  ".join(parts)


def _width() -> int:
    return max(40, shutil.get_terminal_size((100, 20)).columns - 1)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def make_progress(stream: TextIO | None = None, *, show_logs: bool = True, quiet: bool = False) -> Progress:
    """LiveProgress on a terminal, PlainProgress otherwise (or QuietProgress when asked)."""
    if quiet:
        return QuietProgress()
    stream = stream or sys.stdout
    is_terminal = hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM", "") != "dumb"
    return LiveProgress(stream, show_logs) if is_terminal else PlainProgress(stream, show_logs)


# --- status text ------------------------------------------------------------------------------


# Rewritten in a training job's folder while it runs by the Debugger rule evaluator
# (local.debugger_monitor) and the profiler (local.profiler): {"Finished": ..., "Statuses": [...]}.
LIVE_RULE_STATUSES = {
    "DebugRuleEvaluationStatuses": Path("debugger") / "rule_statuses.json",
    "ProfilerRuleEvaluationStatuses": Path("profiler_rule_statuses.json"),
}


def rule_statuses(record: StepRecord, key: str) -> list[dict[str, Any]] | None:
    """The step's settled rule statuses (`key` of its properties), or while the job runs (and for a
    job that died before settling them) the live ones from its folder."""
    statuses = record.properties.get(key)
    live = Path(record.job_dir or "") / LIVE_RULE_STATUSES[key]
    if statuses is None and record.job_dir and live.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            statuses = json.loads(live.read_text()).get("Statuses")
    return statuses


def step_details(record: StepRecord) -> list[str]:
    """What a step produced beyond its status: Debugger and profiler rule statuses (live from the
    job folder while a training job runs), the profiler report, plots and the condition's decision."""
    lines = []
    for kind, statuses in (("Debugger rule", rule_statuses(record, "DebugRuleEvaluationStatuses")),
                           ("profiler rule", rule_statuses(record, "ProfilerRuleEvaluationStatuses"))):
        for status in statuses or []:
            detail = str(status.get("StatusDetails") or "").splitlines()[0:1]
            lines.append(f"{kind} {status.get('RuleConfigurationName')}: {status.get('RuleEvaluationStatus')}"
                         + (f" - {detail[0][:200]}" if detail and detail[0] else ""))
    report = (record.metadata.get("Profiler") or {}).get("Report")
    if report:
        lines.append(f"profiler report: {report}")
    for plot in record.metadata.get("Plots") or []:
        lines.append(f"plot {plot.get('Name')}: {plot.get('Path')}")
    for condition in record.metadata.get("EvaluatedConditions") or []:
        if "LeftValue" in condition:
            lines.append(f"condition {condition['Type']}: {condition['LeftValue']} vs {condition['RightValue']}"
                         f" -> {condition['Outcome']}")
    return lines


def format_execution(execution: Execution) -> str:
    """A readable account of one execution: its status, each step, and what to do next."""
    lines = [
        f"Execution {execution.execution_id} ({execution.pipeline_name}): {execution.status}"
        + (" - the runner was interrupted" if execution.interrupted else ""),
        f"  started {_clock(execution.creation_time)}"
        + (f", ended {_clock(execution.end_time)}" if execution.end_time else ""),
    ]
    for record in execution.ordered_steps():
        span = (
            f"{_clock(record.start_time)} - {_clock(record.end_time)}"
            if record.end_time
            else f"since {_clock(record.start_time)}"
        )
        extra = (
            " (cached)"
            if record.cache_hit
            else (f" (attempt {record.attempt_count})" if record.attempt_count > 1 else "")
        )
        lines.append(f"  {record.name:<24} {record.status:<10} {span}{extra}")
        if record.failure_reason and record.status != SUCCEEDED:
            lines.append("      " + record.failure_reason.splitlines()[0][:300])
        if record.log_path and record.status != SUCCEEDED:
            lines.append(f"      log: {record.log_path}")
        lines.extend(f"      {line}" for line in step_details(record))
    for name in execution.skipped_steps:
        lines.append(f"  {name:<24} {'-':<10} not run (its condition branch was not taken)")
    if execution.failure_reason and execution.status != SUCCEEDED:
        lines.append(f"  reason: {execution.failure_reason}")
    ended_by_fail_step = any(
        record.type == "Fail" and record.status == FAILED for record in execution.steps.values()
    )
    if ended_by_fail_step:
        lines.append(
            "  the pipeline's Fail step ended it: change the inputs or parameters and start a new run"
        )
    elif execution.status in (FAILED, STOPPED):
        lines.append(f"  resume with: kennel run --resume {execution.execution_id}")
    return "\n".join(lines)


def _clock(stamp: Any) -> str:
    if not stamp:
        return "?"
    try:
        return datetime.fromisoformat(str(stamp)).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(stamp)
