"""SageMaker Debugger's system profiler for local training jobs: sampling, profiler rules, the report.

With a ProfilerConfig (and DisableProfiler false) SageMaker samples the instance every
ProfilingIntervalInMilliseconds while the job runs and writes the samples as JSON lines under
`<S3OutputPath>/<job>/profiler-output/system/incremental/<YYYYMMDDHH>/<minute>.algo-1.json`
(one event per metric: Type, Name, Dimension, Value, NodeId, Timestamp; smdebug's
SystemMetricsReader reads them). The ProfilerReport rule then writes
`<S3OutputPath>/<job>/rule-output/ProfilerReport/profiler-output/profiler-report.html` and one JSON
per rule in `.../profiler-output/profiler-reports/<Rule>.json` (RuleTriggered, Violations,
Details, Datapoints, RuleParameters). This module does the same on this machine:

  * `SystemSampler` runs in the runner (psutil; no torch) at the configured interval: CPU per
    core, I/O wait, memory, disk and network throughput, and GPU utilization and memory from
    `nvidia-smi` in a child process where an NVIDIA GPU exists;
  * the profiler rules, as pure functions of the samples, with AWS's documented parameters:
    LowGPUUtilization, CPUBottleneck, IOBottleneck, OverallSystemUsage (the others ProfilerReport
    runs on AWS need framework metrics, deprecated for PyTorch >= 2, and are listed as such);
  * the report: self-contained HTML (plots inline as base64 PNG, no external resources);
  * `profiler_monitor`, the training-job monitor that ties them to a job and puts the output in
    the store where SageMaker puts it. As SageMaker's rule containers do, each profiler rule is
    evaluated every scan_interval_us while the job runs (InProgress, its rule JSON files
    rewritten; `<job>/profiler_rule_statuses.json` holds the live statuses for `kennel status`)
    and once more on all the samples when the job ends (final status, the HTML report).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from local.files import write_bytes_atomic, write_json_atomic
from local.handlers import StepContext
from local.jobs.training import HOST, PreparedJob, gpu_count
from local.state import ACCOUNT, REGION, now
from local.store import StoreError

DEFAULT_INTERVAL_MS = 500
# How often a profiler rule container scans the samples: its scan_interval_us, 60 s by default
# (smdebug_rulesconfig.profiler_rules.rules).
DEFAULT_SCAN_SECONDS = 60.0
MIN_SCAN_SECONDS = 0.5
IN_PROGRESS, NO_ISSUES, ISSUES_FOUND, ERROR = "InProgress", "NoIssuesFound", "IssuesFound", "Error"
LIVE_STATUS_FILE = "profiler_rule_statuses.json"  # in the job folder; read by local.progress
REPORT_RULE = "ProfilerReport"
SYSTEM_FOLDER = "profiler-output/system/incremental"
REPORT_FILE = "profiler-report.html"
RULE_REPORTS_FOLDER = "profiler-reports"
CPU_UTILIZATION, GPU_UTILIZATION = "CPUUtilization", "GPUUtilization"
GPU_MEMORY_UTILIZATION, IO_WAIT = "GPUMemoryUtilization", "I/OWaitPercentage"
MEMORY_NAME = "MemoryUsedPercent"
MB = 1024 * 1024

# AWS's defaults (smdebug_rulesconfig.profiler_rules.rules); requests override them as strings.
RULE_DEFAULTS: dict[str, dict[str, float]] = {
    "LowGPUUtilization": {"threshold_p95": 70, "threshold_p5": 10, "window": 500, "patience": 1000},
    "CPUBottleneck": {"threshold": 50, "gpu_threshold": 10, "cpu_threshold": 90, "patience": 1000},
    "IOBottleneck": {"threshold": 50, "gpu_threshold": 10, "io_threshold": 50, "patience": 1000},
    "OverallSystemUsage": {},
}
# Parameters that tune how the rule container scans, not what a rule decides.
SCAN_PARAMETERS = ("scan_interval_us", "rule_to_invoke", "opt_out_telemetry")
# Rules ProfilerReport runs on AWS that are not evaluated here, and why.
NOT_EVALUATED = {
    "BatchSize": "needs GPU utilization and memory; evaluated on AWS",
    "GPUMemoryIncrease": "needs GPU memory; evaluated on AWS",
    "LoadBalancing": "needs several GPUs; evaluated on AWS",
    "Dataloader": "needs framework metrics (deprecated for PyTorch >= 2.0)",
    "MaxInitializationTime": "needs framework metrics (deprecated for PyTorch >= 2.0)",
    "StepOutlier": "needs framework metrics (deprecated for PyTorch >= 2.0)",
}
DESCRIPTIONS = {
    "LowGPUUtilization": "GPU utilization low (95th percentile under threshold_p95) or fluctuating "
    "(95th percentile above it, 5th under threshold_p5) in a window of samples.",
    "CPUBottleneck": "CPU utilization above cpu_threshold while the GPU is under gpu_threshold, for "
    "more than threshold percent of the samples: the GPU waits for the CPU.",
    "IOBottleneck": "I/O wait above io_threshold while the GPU is under gpu_threshold, for more than "
    "threshold percent of the samples: the GPU waits for data.",
    "OverallSystemUsage": "Percentiles of every system metric; informational, never triggers.",
}
RECOMMENDATIONS = {
    "LowGPUUtilization": "Increase the batch size, or use a smaller instance; check data loading.",
    "CPUBottleneck": "Use more data-loading workers, pre-process data offline, or a larger instance.",
    "IOBottleneck": "Pre-fetch or cache the data, use Pipe or FastFile input mode, or faster storage.",
    "OverallSystemUsage": "",
}


class ProfilerError(ValueError):
    """A profiler rule configuration that cannot be evaluated; the message says why."""


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfilerSettings:
    interval_seconds: float
    s3_output_path: str
    rules: list[dict]  # ProfilerRuleConfigurations

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> ProfilerSettings | None:
        """None when the request has no ProfilerConfig or disables the profiler."""
        config = request.get("ProfilerConfig")
        if not config or str(config.get("DisableProfiler", False)).lower() == "true":
            return None
        interval = int(config.get("ProfilingIntervalInMilliseconds") or DEFAULT_INTERVAL_MS)
        output = config.get("S3OutputPath") or (request.get("OutputDataConfig") or {}).get("S3OutputPath")
        return cls(
            max(interval, 100) / 1000,
            str(output or "").rstrip("/"),
            list(request.get("ProfilerRuleConfigurations") or []),
        )


# --- sampling --------------------------------------------------------------------------------------


def parse_nvidia_smi_line(line: str) -> tuple[int, float, float] | None:
    """`index, utilization.gpu, memory.used, memory.total` (csv, noheader, nounits) ->
    (index, utilization %, memory used %); None for a line that is not one."""
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != 4:
        return None
    try:
        index, utilization, used, total = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
    except ValueError:
        return None  # "[N/A]" on GPUs that do not report a field
    return index, utilization, (100.0 * used / total if total > 0 else 0.0)


class GpuReader:
    """Latest GPU readings from one long-running `nvidia-smi --loop-ms` child (no torch in the runner)."""

    def __init__(self, interval_seconds: float) -> None:
        self.latest: dict[int, tuple[float, float]] = {}
        self.process: subprocess.Popen | None = None
        self.problem = ""
        executable = shutil.which("nvidia-smi")
        if executable is None:
            self.problem = "an NVIDIA GPU is present but nvidia-smi is not on PATH: GPU metrics not collected"
            return
        command = [
            executable,
            "--query-gpu=index,utilization.gpu,memory.used,memory.total",
            "--format=csv,noheader,nounits",
            f"--loop-ms={max(int(interval_seconds * 1000), 100)}",
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            parsed = parse_nvidia_smi_line(line)
            if parsed is not None:
                self.latest[parsed[0]] = parsed[1:]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()


def event(kind: str, name: str, dimension: str, value: float, stamp: float) -> dict[str, Any]:
    """One system metric event as SageMaker writes it."""
    return {
        "Type": kind,
        "Name": name,
        "Dimension": dimension,
        "Value": round(float(value), 3),
        "NodeId": HOST,
        "Timestamp": round(stamp, 3),
    }


class SystemSampler:
    """Samples the machine every `interval` seconds into SageMaker's system-metric files under `root`."""

    def __init__(self, root: Path, interval_seconds: float, gpus: int) -> None:
        self.root = root
        self.interval = interval_seconds
        self.gpu = GpuReader(interval_seconds) if gpus > 0 else None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.previous: tuple[float, Any, Any] | None = None
        self.handle: Any = None
        self.handle_minute = -1
        self.samples = 0

    def start(self) -> None:
        psutil.cpu_percent(percpu=True)  # the first reading only sets the reference point
        psutil.cpu_times_percent()
        self.previous = (time.time(), psutil.disk_io_counters(), psutil.net_io_counters())
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)
        if self.gpu is not None:
            self.gpu.stop()
        if self.handle is not None:
            self.handle.close()

    def _loop(self) -> None:
        while not self.done.wait(self.interval):
            self.write(self.sample())

    def sample(self) -> list[dict[str, Any]]:
        stamp = time.time()
        events = [
            event("cpu", f"cpu{index}", CPU_UTILIZATION, value, stamp)
            for index, value in enumerate(psutil.cpu_percent(percpu=True))
        ]
        events.append(
            event("cpu", "cpu_total", IO_WAIT, getattr(psutil.cpu_times_percent(), "iowait", 0.0), stamp)
        )
        events.append(event("memory", MEMORY_NAME, "Memory", psutil.virtual_memory().percent, stamp))
        disk, net = psutil.disk_io_counters(), psutil.net_io_counters()
        assert self.previous is not None
        before, disk_before, net_before = self.previous
        elapsed = max(stamp - before, 1e-6)
        if disk is not None and disk_before is not None:
            events.append(
                event(
                    "io",
                    "disk",
                    "ReadBytesPerSecond",
                    (disk.read_bytes - disk_before.read_bytes) / elapsed,
                    stamp,
                )
            )
            events.append(
                event(
                    "io",
                    "disk",
                    "WriteBytesPerSecond",
                    (disk.write_bytes - disk_before.write_bytes) / elapsed,
                    stamp,
                )
            )
        if net is not None and net_before is not None:
            events.append(
                event(
                    "network",
                    "net",
                    "ReceivedBytesPerSecond",
                    (net.bytes_recv - net_before.bytes_recv) / elapsed,
                    stamp,
                )
            )
            events.append(
                event(
                    "network",
                    "net",
                    "SentBytesPerSecond",
                    (net.bytes_sent - net_before.bytes_sent) / elapsed,
                    stamp,
                )
            )
        self.previous = (stamp, disk, net)
        for index, (utilization, memory) in sorted((self.gpu.latest if self.gpu else {}).items()):
            events.append(event("gpu", f"gpu{index}", GPU_UTILIZATION, utilization, stamp))
            events.append(event("gpu", f"gpu{index}", GPU_MEMORY_UTILIZATION, memory, stamp))
        return events

    def write(self, events: list[dict[str, Any]]) -> None:
        """Append to the file of the current minute; a reader skips a torn last line, as smdebug's does."""
        stamp = events[0]["Timestamp"]
        minute = int(stamp // 60 * 60)
        if minute != self.handle_minute:
            if self.handle is not None:
                self.handle.close()
            hour = datetime.fromtimestamp(minute, UTC).strftime("%Y%m%d%H")
            path = self.root / SYSTEM_FOLDER / hour / f"{minute}.{HOST}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle, self.handle_minute = path.open("a", encoding="utf-8"), minute
        self.handle.write("".join(json.dumps(item) + "\n" for item in events))
        self.handle.flush()
        self.samples += 1


# --- reading samples back --------------------------------------------------------------------------


@dataclass
class SystemMetrics:
    """Samples by time: `rows[i]` maps "Name:Dimension" to a value at `timestamps[i]`."""

    timestamps: list[float] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.rows if key in row]

    def keys(self) -> list[str]:
        return sorted({key for row in self.rows for key in row})

    def cores(self) -> list[str]:
        return [key for key in self.keys() if key.endswith(":" + CPU_UTILIZATION)]

    def gpus(self) -> list[str]:
        return sorted({key.split(":")[0] for key in self.keys() if key.endswith(":" + GPU_UTILIZATION)})

    def cpu_total(self, row: Mapping[str, float]) -> float | None:
        values = [value for key, value in row.items() if key.endswith(":" + CPU_UTILIZATION)]
        return sum(values) / len(values) if values else None

    def gpu_total(self, row: Mapping[str, float]) -> float | None:
        values = [value for key, value in row.items() if key.endswith(":" + GPU_UTILIZATION)]
        return sum(values) / len(values) if values else None


def read_system_metrics(root: Path) -> SystemMetrics:
    """Every sample under `<root>/profiler-output/system/incremental`, in time order."""
    by_time: dict[float, dict[str, float]] = {}
    for path in sorted((root / SYSTEM_FOLDER).glob(f"*/*.{HOST}.json")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
                by_time.setdefault(float(item["Timestamp"]), {})[f"{item['Name']}:{item['Dimension']}"] = (
                    float(item["Value"])
                )
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a killed writer
    stamps = sorted(by_time)
    return SystemMetrics(stamps, [by_time[stamp] for stamp in stamps])


# --- profiler rules ---------------------------------------------------------------------------------


@dataclass
class RuleReport:
    """One rule's result, as SageMaker writes it to profiler-reports/<Rule>.json."""

    rule: str
    triggered: int
    violations: int
    details: dict[str, Any]
    datapoints: int
    parameters: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "RuleTriggered": self.triggered,
            "Violations": self.violations,
            "Details": strict_json(self.details),
            "Datapoints": self.datapoints,
            "RuleParameters": "\n".join(f"{name}:{value:g}" for name, value in self.parameters.items()),
        }


def strict_json(value: Any) -> Any:
    """`value` with NaN and infinities as None: the files must parse with any JSON reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def percentile(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def no_gpu(
    rule: str, metrics: SystemMetrics, parameters: dict[str, float], extra: dict | None = None
) -> RuleReport:
    details = {"reason": "no GPU utilization was measured (no GPU on this host): the rule cannot trigger"}
    return RuleReport(rule, 0, 0, {**details, **(extra or {})}, len(metrics.rows), parameters)


def low_gpu_utilization(metrics: SystemMetrics, parameters: dict[str, float]) -> RuleReport:
    """Per GPU, after `patience` samples, per window of `window` samples: 95th percentile under
    threshold_p95 (underused), or over it with the 5th under threshold_p5 (fluctuating)."""
    gpus = metrics.gpus()
    if not gpus:
        return no_gpu("LowGPUUtilization", metrics, parameters)
    window, patience = max(int(parameters["window"]), 1), int(parameters["patience"])
    details: dict[str, Any] = {}
    violations = datapoints = 0
    for gpu in gpus:
        values = metrics.series(f"{gpu}:{GPU_UTILIZATION}")[patience:]
        datapoints += len(values)
        low = fluctuating = 0
        for start in range(0, len(values), window):
            chunk = values[start : start + window]
            p95, p5 = percentile(chunk, 95), percentile(chunk, 5)
            if p95 < parameters["threshold_p95"]:
                low += 1
            elif p5 < parameters["threshold_p5"]:
                fluctuating += 1
        violations += low + fluctuating
        details[gpu] = {
            "p95": percentile(values, 95) if values else None,
            "p5": percentile(values, 5) if values else None,
            "underutilized_windows": low,
            "fluctuating_windows": fluctuating,
        }
    if not datapoints:
        details["reason"] = f"fewer than patience ({patience}) samples: not evaluated"
    return RuleReport("LowGPUUtilization", int(violations > 0), violations, details, datapoints, parameters)


def bottleneck(
    rule: str,
    metrics: SystemMetrics,
    parameters: dict[str, float],
    busy: Callable[[dict[str, float]], float | None],
    busy_threshold: str,
) -> RuleReport:
    """Samples after `patience` where `busy(row)` exceeds parameters[busy_threshold] while the GPU
    is under gpu_threshold; triggers when they exceed `threshold` percent of the samples."""
    if not metrics.gpus():  # still say how busy the host was: patience exists for GPU warm-up only
        busy_count = sum(1 for row in metrics.rows if (busy(row) or 0.0) > parameters[busy_threshold])
        return no_gpu(rule, metrics, parameters, {f"samples_above_{busy_threshold}": busy_count})
    rows = metrics.rows[int(parameters["patience"]) :]
    busy_rows = [row for row in rows if (busy(row) or 0.0) > parameters[busy_threshold]]
    stalls = [row for row in busy_rows if (metrics.gpu_total(row) or 0.0) < parameters["gpu_threshold"]]
    share = 100.0 * len(stalls) / len(rows) if rows else 0.0
    details = {
        "bottleneck_percent": round(share, 2),
        "bottlenecks": len(stalls),
        "samples_evaluated": len(rows),
    }
    if not rows:
        details["reason"] = f"fewer than patience ({int(parameters['patience'])}) samples: not evaluated"
    return RuleReport(rule, int(share > parameters["threshold"]), len(stalls), details, len(rows), parameters)


def cpu_bottleneck(metrics: SystemMetrics, parameters: dict[str, float]) -> RuleReport:
    return bottleneck("CPUBottleneck", metrics, parameters, metrics.cpu_total, "cpu_threshold")


def io_bottleneck(metrics: SystemMetrics, parameters: dict[str, float]) -> RuleReport:
    return bottleneck(
        "IOBottleneck", metrics, parameters, lambda row: row.get(f"cpu_total:{IO_WAIT}"), "io_threshold"
    )


def overall_system_usage(metrics: SystemMetrics, parameters: dict[str, float]) -> RuleReport:
    """Percentiles of every metric on this node; never triggers (as on AWS)."""
    summary = {}
    for key in metrics.keys():
        values = metrics.series(key)
        summary[key] = {
            "p50": percentile(values, 50),
            "p95": percentile(values, 95),
            "p99": percentile(values, 99),
            "min": min(values),
            "max": max(values),
        }
    totals = [total for total in (metrics.cpu_total(row) for row in metrics.rows) if total is not None]
    if totals:
        summary["cpu_total:CPUUtilization"] = {
            "p50": percentile(totals, 50),
            "p95": percentile(totals, 95),
            "p99": percentile(totals, 99),
            "min": min(totals),
            "max": max(totals),
        }
    return RuleReport("OverallSystemUsage", 0, 0, {HOST: summary}, len(metrics.rows), parameters)


EVALUATORS: dict[str, Callable[[SystemMetrics, dict[str, float]], RuleReport]] = {
    "LowGPUUtilization": low_gpu_utilization,
    "CPUBottleneck": cpu_bottleneck,
    "IOBottleneck": io_bottleneck,
    "OverallSystemUsage": overall_system_usage,
}


def rule_parameters(rule: str, given: Mapping[str, Any]) -> dict[str, float]:
    """AWS's defaults for `rule` with `given` (strings) applied; ProfilerError for a bad one."""
    values = dict(RULE_DEFAULTS[rule])
    for name, raw in given.items():
        if name in SCAN_PARAMETERS:
            continue
        if name not in values:
            known = ", ".join(values) or "none"
            raise ProfilerError(f"{rule} has no parameter {name!r} (its parameters: {known})")
        try:
            values[name] = float(raw)
        except (TypeError, ValueError):
            raise ProfilerError(f"{rule} parameter {name}={raw!r}: expected a number") from None
    return values


def report_overrides(given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """ProfilerReport's `<Rule>_<parameter>` parameters, by rule (names matched case-insensitively)."""
    known = {name.lower(): name for name in [*RULE_DEFAULTS, *NOT_EVALUATED]}
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in given.items():
        if key in SCAN_PARAMETERS:
            continue
        rule, _, parameter = key.partition("_")
        if rule.lower() not in known or not parameter:
            raise ProfilerError(
                f"ProfilerReport parameter {key!r} is not <Rule>_<parameter> for a known rule"
            )
        overrides.setdefault(known[rule.lower()], {})[parameter.lower()] = value
    return overrides


def evaluate_report_rules(metrics: SystemMetrics, given: Mapping[str, Any]) -> list[RuleReport]:
    """The rules ProfilerReport runs locally, with its overrides."""
    overrides = report_overrides(given)
    return [EVALUATORS[rule](metrics, rule_parameters(rule, overrides.get(rule, {}))) for rule in EVALUATORS]


# --- the report -------------------------------------------------------------------------------------


def figure_png(draw: Callable[[Any], None], height: float = 3.0) -> str:
    """A chart drawn by `draw(axes)` as base64 PNG (matplotlib's object API: thread-safe, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, height), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    draw(axes)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    # No Software/URL metadata: the report carries no external reference at all.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def system_charts(metrics: SystemMetrics) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each group of metrics that was measured."""
    if not metrics.rows:
        return []
    start = metrics.timestamps[0]

    def timeline(keys: list[str], scale: float = 1.0, label: str = "%") -> Callable[[Any], None]:
        def draw(axes: Any) -> None:
            for key in keys:
                points = [
                    (stamp - start, row[key] / scale)
                    for stamp, row in zip(metrics.timestamps, metrics.rows, strict=True)
                    if key in row
                ]
                if points:
                    axes.plot(
                        *zip(*points, strict=True),
                        label=key.split(":")[0] if len(keys) > 1 else key,
                        linewidth=1,
                    )
            axes.set_xlabel("seconds since the job started")
            axes.set_ylabel(label)
            if len(keys) > 1:
                axes.legend(fontsize=7, ncol=min(len(keys), 8))

        return draw

    charts = [("CPU utilization per core", figure_png(timeline(metrics.cores())))]
    totals = [metrics.cpu_total(row) or 0.0 for row in metrics.rows]
    charts.append(
        (
            "Total CPU utilization, distribution",
            figure_png(
                lambda axes: (
                    axes.hist(totals, bins=20, range=(0, 100)),
                    axes.set_xlabel("% of all cores"),
                    axes.set_ylabel("samples"),
                )
            ),
        )
    )
    gpus = [f"{gpu}:{GPU_UTILIZATION}" for gpu in metrics.gpus()]
    if gpus:
        charts.append(("GPU utilization", figure_png(timeline(gpus))))
        charts.append(
            (
                "GPU memory used",
                figure_png(timeline([f"{gpu}:{GPU_MEMORY_UTILIZATION}" for gpu in metrics.gpus()])),
            )
        )
    charts.append(("Memory used", figure_png(timeline([f"{MEMORY_NAME}:Memory"]))))
    charts.append(("I/O wait", figure_png(timeline([f"cpu_total:{IO_WAIT}"]))))
    disk = [key for key in metrics.keys() if key.startswith("disk:")]
    if disk:
        charts.append(("Disk throughput", figure_png(timeline(disk, MB, "MB/s"))))
    network = [key for key in metrics.keys() if key.startswith("net:")]
    if network:
        charts.append(("Network throughput", figure_png(timeline(network, MB, "MB/s"))))
    return charts


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 62em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } .triggered { color: #b00; font-weight: bold; } .ok { color: #070; }
img { max-width: 100%; } code, pre { font-size: 0.85em; }
"""


def render_report(
    job_name: str, metrics: SystemMetrics, reports: list[RuleReport], interval_seconds: float
) -> str:
    """The ProfilerReport HTML: summary table, system charts, per-rule details; self-contained."""
    escape = html.escape
    span = metrics.timestamps[-1] - metrics.timestamps[0] if len(metrics.timestamps) > 1 else 0.0
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Profiler report: {escape(job_name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Profiler report</h1><p>Training job <b>{escape(job_name)}</b> on node {HOST}: "
        f"{len(metrics.rows)} samples every {interval_seconds:g} s over {span:.0f} s.</p>",
        "<h2>Rules</h2><table><tr><th>Rule</th><th>Result</th><th>Violations</th><th>Datapoints</th>"
        "<th>What it checks</th><th>Recommendation</th><th>Parameters</th></tr>",
    ]
    for report in reports:
        result = (
            "<span class='triggered'>triggered</span>"
            if report.triggered
            else "<span class='ok'>not triggered</span>"
        )
        parts.append(
            f"<tr><td>{report.rule}</td><td>{result}</td><td>{report.violations}</td>"
            f"<td>{report.datapoints}</td>"
            f"<td>{escape(DESCRIPTIONS[report.rule])}</td><td>{escape(RECOMMENDATIONS[report.rule])}</td>"
            f"<td><pre>{escape(report.to_json()['RuleParameters'])}</pre></td></tr>"
        )
    for rule, why in NOT_EVALUATED.items():
        parts.append(
            f"<tr><td>{rule}</td><td>not evaluated locally</td><td></td><td></td>"
            f"<td colspan='3'>{escape(why)}</td></tr>"
        )
    parts.append("</table><h2>System metrics</h2>")
    for title, png in system_charts(metrics):
        parts.append(f"<h3>{escape(title)}</h3><img alt='{escape(title)}' src='data:image/png;base64,{png}'>")
    parts.extend(usage_table(reports))
    parts.append("<h2>Details</h2>")
    for report in reports:
        parts.append(
            f"<h3>{report.rule}</h3><pre>{escape(json.dumps(report.details, indent=2, default=str))}</pre>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def usage_table(reports: list[RuleReport]) -> list[str]:
    """OverallSystemUsage's percentiles as a table (its JSON has them too)."""
    usage = next((report for report in reports if report.rule == "OverallSystemUsage"), None)
    if usage is None or not usage.details.get(HOST):
        return []
    rows = [
        "<h2>Overall system usage</h2><table><tr><th>Metric</th><th>p50</th><th>p95</th><th>p99</th>"
        "<th>min</th><th>max</th></tr>"
    ]
    for key, values in usage.details[HOST].items():
        cells = "".join(f"<td>{values[name]:.1f}</td>" for name in ("p50", "p95", "p99", "min", "max"))
        rows.append(f"<tr><td>{html.escape(key)}</td>{cells}</tr>")
    rows.append("</table>")
    return rows


def write_report(
    folder: Path,
    job_name: str,
    metrics: SystemMetrics,
    reports: list[RuleReport],
    interval_seconds: float,
    html: bool = True,
) -> Path:
    """`folder`/profiler-output/profiler-reports/<Rule>.json, and (`html`) .../profiler-report.html."""
    output = folder / "profiler-output"
    for report in reports:
        write_json_atomic(output / RULE_REPORTS_FOLDER / f"{report.rule}.json", report.to_json())
    if html:
        write_bytes_atomic(
            output / REPORT_FILE, render_report(job_name, metrics, reports, interval_seconds).encode()
        )
    return output / REPORT_FILE


def scan_seconds(configuration: Mapping[str, Any]) -> float:
    """How often to evaluate a configured rule while the job runs: its scan_interval_us; for
    ProfilerReport, the shortest of its rules' `<Rule>_scan_interval_us`; else AWS's 60 s."""
    parameters = configuration.get("RuleParameters") or {}
    given = [
        value
        for key, value in parameters.items()
        if key.lower() == "scan_interval_us" or key.lower().endswith("_scan_interval_us")
    ]
    try:
        seconds = [float(value) / 1e6 for value in given]
    except (TypeError, ValueError):
        return DEFAULT_SCAN_SECONDS  # the final evaluation reports nothing about it: scanning is ours
    return max(min(seconds), MIN_SCAN_SECONDS) if seconds else DEFAULT_SCAN_SECONDS


# --- the training-job monitor ------------------------------------------------------------------


def profiler_monitor(
    request: dict, job_name: str, job: PreparedJob, context: StepContext
) -> ProfilerMonitor | None:
    """The monitor for a job whose request enables the profiler (MonitorFactory); None otherwise."""
    settings = ProfilerSettings.from_request(request)
    if settings is None:
        return None
    monitor = ProfilerMonitor(settings, job_name, context)
    monitor.start()
    return monitor


class ProfilerMonitor:
    def __init__(self, settings: ProfilerSettings, job_name: str, context: StepContext) -> None:
        self.settings = settings
        self.job_name = job_name
        self.context = context
        self.root = context.job_dir / "profiler"  # mirrors <S3OutputPath>/<job>/
        self.live_file = context.job_dir / LIVE_STATUS_FILE
        self.sampler = SystemSampler(self.root, settings.interval_seconds, gpu_count())
        self.statuses: dict[str, dict[str, Any]] = {
            self.name_of(configuration): self.status(self.name_of(configuration), IN_PROGRESS, "")
            for configuration in settings.rules
        }
        self.done = threading.Event()
        self.scanner = threading.Thread(target=self._scan_loop, daemon=True)

    @staticmethod
    def name_of(configuration: Mapping[str, Any]) -> str:
        return str(configuration.get("RuleConfigurationName"))

    def start(self) -> None:
        self.sampler.start()
        if self.settings.rules:
            self.write_live(finished=False)
            self.scanner.start()

    def stop_reason(self) -> str | None:
        return None  # profiler rules report; they never stop a job

    def _scan_loop(self) -> None:
        """Evaluate each rule every scan_seconds on the samples so far, as its rule container would."""
        due = {self.name_of(item): time.monotonic() + scan_seconds(item) for item in self.settings.rules}
        while not self.done.wait(max(min(due.values()) - time.monotonic(), 0.0)):
            metrics = read_system_metrics(self.root)
            for configuration in self.settings.rules:
                name = self.name_of(configuration)
                if due[name] > time.monotonic() or self.statuses[name]["RuleEvaluationStatus"] == ERROR:
                    continue
                self.statuses[name] = self.evaluate(configuration, metrics, final=False)[0]
                due[name] = time.monotonic() + scan_seconds(configuration)
            self.write_live(finished=False)

    def write_live(self, finished: bool) -> None:
        write_json_atomic(self.live_file, {"Finished": finished, "Statuses": list(self.statuses.values())})

    def finish(self, properties: dict[str, Any], metadata: dict[str, Any]) -> None:
        self.done.set()
        if self.scanner.is_alive():
            self.scanner.join(timeout=60)
        self.sampler.stop()
        metrics = read_system_metrics(self.root)
        report = None
        for configuration in self.settings.rules:
            status, written = self.evaluate(configuration, metrics, final=True)
            self.statuses[self.name_of(configuration)] = status
            report = report or written
        properties["ProfilingStatus"] = "Enabled"
        if self.statuses:
            properties["ProfilerRuleEvaluationStatuses"] = list(self.statuses.values())
            self.write_live(finished=True)
        base = f"{self.settings.s3_output_path}/{self.job_name}"
        uploaded = self.upload(base)
        metadata["Profiler"] = {
            "Samples": len(metrics.rows),
            "SystemMetricsUri": f"{base}/{SYSTEM_FOLDER}/" if uploaded else None,
            "Report": str(report) if report else None,
            "ReportUri": f"{base}/{report.relative_to(self.root).as_posix()}"
            if report and uploaded
            else None,
            "RuleStatuses": str(self.live_file) if self.statuses else None,
            "GpuNote": self.sampler.gpu.problem if self.sampler.gpu else "",
        }

    def evaluate(
        self, configuration: Mapping[str, Any], metrics: SystemMetrics, final: bool
    ) -> tuple[dict[str, Any], Path | None]:
        """One ProfilerRuleEvaluationStatuses entry: InProgress until `final`, then the result.
        The rule's JSON files are rewritten each time; ProfilerReport's HTML is written when final."""
        name = self.name_of(configuration)
        parameters = dict(configuration.get("RuleParameters") or {})
        rule = str(parameters.get("rule_to_invoke") or name)
        folder = self.root / "rule-output" / name
        written = None
        try:
            if rule == REPORT_RULE:
                reports = evaluate_report_rules(metrics, parameters)
                path = write_report(
                    folder, self.job_name, metrics, reports, self.settings.interval_seconds, html=final
                )
                written = path if final else None
            elif rule in EVALUATORS:
                reports = [EVALUATORS[rule](metrics, rule_parameters(rule, parameters))]
                for report in reports:
                    write_json_atomic(
                        folder / "profiler-output" / RULE_REPORTS_FOLDER / f"{rule}.json", report.to_json()
                    )
            else:
                raise ProfilerError(
                    f"profiler rule {rule!r} is not evaluated by the local runner (it evaluates "
                    f"{', '.join([REPORT_RULE, *EVALUATORS])}); run on the aws target for it"
                )
        except ProfilerError as error:
            return self.status(name, ERROR, f"ClientError: {error}"), None
        triggered = [report.rule for report in reports if report.triggered]
        if not final:
            so_far = f"triggered so far: {', '.join(triggered)}" if triggered else "nothing triggered so far"
            return self.status(name, IN_PROGRESS, f"{len(metrics.rows)} samples evaluated; {so_far}"), None
        details = (f"triggered: {', '.join(triggered)}" if triggered else "no rule triggered") + (
            f"; report: {written}" if written else ""
        )
        return self.status(name, ISSUES_FOUND if triggered else NO_ISSUES, details), written

    def status(self, name: str, value: str, details: str) -> dict[str, Any]:
        return {
            "RuleConfigurationName": name,
            "RuleEvaluationJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:processing-job/"
            f"{self.job_name[:40]}-{name[:20]}".lower(),
            "RuleEvaluationStatus": value,
            "StatusDetails": details[:1024],
            "LastModifiedTime": now(),
        }

    def upload(self, base: str) -> bool:
        if not base.startswith("s3://") or not self.root.is_dir():
            return False
        try:
            self.context.store.put_tree(self.root, base)
        except (StoreError, OSError) as error:
            self.context.progress.step_line(
                self.context.step_name, f"[kennel] profiler output not stored: {error}"
            )
            return False
        return True
