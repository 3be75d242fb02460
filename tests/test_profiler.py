"""The local profiler: system sampling in SageMaker's file layout, profiler rules, the offline report."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from debugger_support import DebugRun

from local.profiler import (
    RULE_DEFAULTS,
    SYSTEM_FOLDER,
    ProfilerError,
    ProfilerSettings,
    SystemMetrics,
    SystemSampler,
    cpu_bottleneck,
    evaluate_report_rules,
    io_bottleneck,
    low_gpu_utilization,
    overall_system_usage,
    parse_nvidia_smi_line,
    read_system_metrics,
    scan_seconds,
    write_report,
)

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated create function:DeprecationWarning")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT_FIELDS = {
    "RuleTriggered": int,
    "Violations": int,
    "Details": dict,
    "Datapoints": int,
    "RuleParameters": str,
}


def synthetic(
    samples: int, *, cpu: float = 20.0, gpu: list[float] | None = None, iowait: float = 0.0
) -> SystemMetrics:
    """`samples` rows of two cores at `cpu` %, and one GPU cycling through `gpu` when given."""
    rows = []
    for index in range(samples):
        row = {
            "cpu0:CPUUtilization": cpu,
            "cpu1:CPUUtilization": cpu,
            "cpu_total:I/OWaitPercentage": iowait,
            "MemoryUsedPercent:Memory": 40.0,
            "disk:ReadBytesPerSecond": 1e6,
            "net:SentBytesPerSecond": 1e3,
        }
        if gpu is not None:
            row["gpu0:GPUUtilization"] = gpu[index % len(gpu)]
            row["gpu0:GPUMemoryUtilization"] = 30.0
        rows.append(row)
    return SystemMetrics([1000.0 + 0.5 * index for index in range(samples)], rows)


# --- sampling -------------------------------------------------------------------------------------


def test_sampler_writes_the_files_smdebug_reads(tmp_path: Path) -> None:
    from smdebug.profiler.system_metrics_reader import LocalSystemMetricsReader

    busy = threading.Event()

    def spin() -> None:  # some load to measure
        while not busy.is_set():
            sum(range(10_000))

    worker = threading.Thread(target=spin)
    worker.start()
    sampler = SystemSampler(tmp_path, 0.1, gpus=0)
    sampler.start()
    # Enough samples to read back, however busy the machine (the spinning thread contends for the GIL).
    deadline = time.monotonic() + 60
    while sampler.samples < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    sampler.stop()
    busy.set()
    worker.join()

    files = sorted((tmp_path / SYSTEM_FOLDER).glob("*/*"))
    assert files and all(re.fullmatch(r"\d{10}\.algo-1\.json", path.name) for path in files)
    assert all(re.fullmatch(r"\d{10}", path.parent.name) for path in files)  # YYYYMMDDHH
    events = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert {"Type", "Name", "Dimension", "Value", "NodeId", "Timestamp"} <= set(events[0])
    cores = {event["Name"] for event in events if event["Dimension"] == "CPUUtilization"}
    assert cores == {f"cpu{index}" for index in range(os.cpu_count() or 1)}
    assert {"MemoryUsedPercent", "disk", "net", "cpu_total"} <= {event["Name"] for event in events}

    metrics = read_system_metrics(tmp_path)
    assert len(metrics.rows) == sampler.samples >= 5
    assert max(metrics.cpu_total(row) or 0 for row in metrics.rows) > 0  # the spinning thread shows
    read_back = LocalSystemMetricsReader(str(tmp_path / "profiler-output")).get_events(0, 10**17)
    assert len(read_back) == len(events)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("0, 87, 20480, 81920", (0, 87.0, 25.0)),
        ("3, 0, 0, 40960\n", (3, 0.0, 0.0)),
        ("0, [N/A], 100, 200", None),  # GPUs that do not report a field
        ("NVIDIA-SMI has failed", None),
    ],
)
def test_nvidia_smi_lines(line: str, expected) -> None:
    assert parse_nvidia_smi_line(line) == expected


FAKE_NVIDIA_SMI = """#!{python}
import pathlib, re, sys, time
# Records how it was called; answers like nvidia-smi --query-gpu=... --format=csv,noheader,nounits.
pathlib.Path({argv_file!r}).write_text("\\n".join(sys.argv[1:]))
[loop] = [argument for argument in sys.argv[1:] if argument.startswith("--loop-ms=")]
while True:
    print("0, 87, 20480, 81920", flush=True)
    print("1, [N/A], 1024, 81920", flush=True)  # a GPU that does not report utilization
    time.sleep(int(loop.split("=")[1]) / 1000)
"""


def test_gpu_metrics_come_from_nvidia_smi_looping_at_the_sampling_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    bin_dir, argv_file = tmp_path / "bin", tmp_path / "argv.txt"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI.format(python=sys.executable, argv_file=str(argv_file)))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sampler = SystemSampler(tmp_path / "out", 0.2, gpus=1)
    sampler.start()
    time.sleep(1.5)
    sampler.stop()
    # The documented long form of -lms (nvidia-smi --help: "-lms, --loop-ms=").
    assert argv_file.read_text().splitlines() == [
        "--query-gpu=index,utilization.gpu,memory.used,memory.total",
        "--format=csv,noheader,nounits",
        "--loop-ms=200",
    ]
    assert sampler.gpu is not None and sampler.gpu.process is not None
    assert sampler.gpu.process.poll() is not None  # stopped with the sampler
    metrics = read_system_metrics(tmp_path / "out")
    assert metrics.gpus() == ["gpu0"]
    assert set(metrics.series("gpu0:GPUUtilization")) == {87.0}
    assert set(metrics.series("gpu0:GPUMemoryUtilization")) == {25.0}


@pytest.mark.parametrize(
    ("parameters", "seconds"),
    [
        ({}, 60.0),  # AWS's default scan_interval_us
        ({"scan_interval_us": "2000000"}, 2.0),
        ({"CPUBottleneck_scan_interval_us": "5000000", "IOBottleneck_scan_interval_us": "3000000"}, 3.0),
        ({"scan_interval_us": "1"}, 0.5),  # not a busy loop
        ({"scan_interval_us": "soon"}, 60.0),
    ],
)
def test_profiler_rules_are_scanned_at_their_scan_interval(parameters: dict, seconds: float) -> None:
    assert scan_seconds({"RuleConfigurationName": "R", "RuleParameters": parameters}) == seconds


def test_profiler_settings_follow_the_request() -> None:
    request = {
        "ProfilerConfig": {"S3OutputPath": "s3://b/p/", "ProfilingIntervalInMilliseconds": 200},
        "ProfilerRuleConfigurations": [{"RuleConfigurationName": "ProfilerReport"}],
    }
    settings = ProfilerSettings.from_request(request)
    assert settings is not None and settings.interval_seconds == 0.2 and settings.s3_output_path == "s3://b/p"
    assert ProfilerSettings.from_request({"ProfilerConfig": {"DisableProfiler": True}}) is None
    assert ProfilerSettings.from_request({}) is None


# --- rules ---------------------------------------------------------------------------------------------


def parameters(rule: str, **changes: float) -> dict[str, float]:
    return {**RULE_DEFAULTS[rule], **changes}


@pytest.mark.parametrize(
    ("evaluate", "rule", "metrics", "triggered"),
    [
        (low_gpu_utilization, "LowGPUUtilization", synthetic(1200, gpu=[20.0]), 1),  # underused
        (low_gpu_utilization, "LowGPUUtilization", synthetic(1200, gpu=[0.0, 100.0]), 1),  # fluctuating
        (low_gpu_utilization, "LowGPUUtilization", synthetic(1200, gpu=[95.0]), 0),
        (cpu_bottleneck, "CPUBottleneck", synthetic(1200, cpu=95.0, gpu=[5.0]), 1),
        (cpu_bottleneck, "CPUBottleneck", synthetic(1200, cpu=95.0, gpu=[80.0]), 0),
        (cpu_bottleneck, "CPUBottleneck", synthetic(1200, cpu=40.0, gpu=[5.0]), 0),
        (io_bottleneck, "IOBottleneck", synthetic(1200, iowait=60.0, gpu=[5.0]), 1),
        (io_bottleneck, "IOBottleneck", synthetic(1200, iowait=10.0, gpu=[5.0]), 0),
    ],
    ids=[
        "gpu-underused",
        "gpu-fluctuating",
        "gpu-busy",
        "cpu-bottleneck",
        "cpu-busy-gpu-busy",
        "cpu-idle",
        "io-bottleneck",
        "io-fine",
    ],
)
def test_profiler_rules_with_aws_defaults(evaluate, rule, metrics, triggered) -> None:
    report = evaluate(metrics, parameters(rule))
    assert report.triggered == triggered, report.details
    assert report.datapoints == 200  # the first `patience` (1000) samples are skipped, as on AWS
    assert (report.violations > 0) == bool(triggered)


def test_without_a_gpu_the_gpu_rules_cannot_trigger_and_say_why() -> None:
    metrics = synthetic(50, cpu=99.0, iowait=90.0)
    for evaluate, rule in (
        (low_gpu_utilization, "LowGPUUtilization"),
        (cpu_bottleneck, "CPUBottleneck"),
        (io_bottleneck, "IOBottleneck"),
    ):
        report = evaluate(metrics, parameters(rule))
        assert report.triggered == 0 and "no GPU" in report.details["reason"]
    assert cpu_bottleneck(metrics, parameters("CPUBottleneck")).details["samples_above_cpu_threshold"] == 50


def test_fewer_samples_than_patience_are_not_evaluated() -> None:
    report = cpu_bottleneck(synthetic(30, cpu=99.0, gpu=[0.0]), parameters("CPUBottleneck"))
    assert report.triggered == 0 and report.datapoints == 0 and "patience" in report.details["reason"]
    early = cpu_bottleneck(synthetic(30, cpu=99.0, gpu=[0.0]), parameters("CPUBottleneck", patience=0))
    assert early.triggered == 1 and early.violations == 30


def test_overall_system_usage_percentiles() -> None:
    metrics = SystemMetrics(list(range(101)), [{"cpu0:CPUUtilization": float(value)} for value in range(101)])
    usage = overall_system_usage(metrics, {}).details["algo-1"]["cpu0:CPUUtilization"]
    assert usage == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "min": 0.0, "max": 100.0}


def test_profiler_report_parameters_override_its_rules() -> None:
    metrics = synthetic(40, cpu=60.0, gpu=[5.0])
    given = {
        "rule_to_invoke": "ProfilerReport",
        "CPUBottleneck_cpu_threshold": "50",
        "cpubottleneck_patience": "0",
        "StepOutlier_stddev": "5",
    }  # StepOutlier: AWS-only, accepted
    reports = {report.rule: report for report in evaluate_report_rules(metrics, given)}
    assert set(reports) == {"LowGPUUtilization", "CPUBottleneck", "IOBottleneck", "OverallSystemUsage"}
    assert reports["CPUBottleneck"].triggered == 1
    assert "cpu_threshold:50\npatience:0" in reports["CPUBottleneck"].to_json()["RuleParameters"]
    with pytest.raises(ProfilerError, match="Unknown_x"):
        evaluate_report_rules(metrics, {"Unknown_x": "1"})
    with pytest.raises(ProfilerError, match="CPUBottleneck has no parameter 'windw'"):
        evaluate_report_rules(metrics, {"CPUBottleneck_windw": "1"})


# --- the report --------------------------------------------------------------------------------------


class Resources(HTMLParser):
    """Every URL-bearing attribute of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "action", "data") and value:
                (self.images if tag == "img" else self.urls).append(value)


def check_report(folder: Path) -> Resources:
    """The per-rule JSON files parse with SageMaker's fields; the HTML needs nothing from outside."""
    reports = folder / "profiler-output" / "profiler-reports"
    found = {path.stem: json.loads(path.read_text()) for path in reports.glob("*.json")}
    assert set(found) == {"LowGPUUtilization", "CPUBottleneck", "IOBottleneck", "OverallSystemUsage"}
    for content in found.values():
        assert {key: type(content[key]) for key in REPORT_FIELDS} == REPORT_FIELDS
    text = (folder / "profiler-output" / "profiler-report.html").read_text()
    assert not re.search(r"https?:|//[a-z]", re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text))
    parser = Resources()
    parser.feed(text)
    assert parser.urls == [] and "script" not in parser.tags and "link" not in parser.tags
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)
    for src in parser.images:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    return parser


def test_report_is_self_contained_with_a_chart_per_measured_group(tmp_path: Path) -> None:
    metrics = synthetic(1200, cpu=95.0, gpu=[5.0])
    reports = evaluate_report_rules(metrics, {})
    path = write_report(tmp_path, "job-1", metrics, reports, 0.5)
    assert path == tmp_path / "profiler-output" / "profiler-report.html"
    parser = check_report(tmp_path)
    # CPU per core, CPU distribution, GPU, GPU memory, memory, I/O wait, disk, network.
    assert len(parser.images) == 8
    text = path.read_text()
    assert "CPUBottleneck</td><td><span class='triggered'>triggered" in text
    assert (
        json.loads((tmp_path / "profiler-output/profiler-reports/CPUBottleneck.json").read_text())[
            "RuleTriggered"
        ]
        == 1
    )


@pytest.mark.slow
def test_a_training_job_with_a_profiler_config_gets_sagemakers_profiler_output(
    healthy_debug_run: DebugRun,
) -> None:
    run = healthy_debug_run
    record = run.train
    job = record.properties["TrainingJobName"]
    base = f"{record.properties['ProfilerConfig']['S3OutputPath'].rstrip('/')}/{job}"
    assert record.properties["ProfilingStatus"] == "Enabled"
    found = {
        item["RuleConfigurationName"]: item for item in record.properties["ProfilerRuleEvaluationStatuses"]
    }
    configured = [item["RuleConfigurationName"] for item in record.properties["ProfilerRuleConfigurations"]]
    assert list(found) == configured
    assert {item["RuleEvaluationStatus"] for item in found.values()} == {"NoIssuesFound"}  # no GPU here

    profiler = record.metadata["Profiler"]
    store = run.store()
    assert profiler["ReportUri"] == f"{base}/rule-output/ProfilerReport/profiler-output/profiler-report.html"
    assert store.exists(profiler["ReportUri"])
    rule_file = f"{base}/rule-output/ProfilerReport/profiler-output/profiler-reports/OverallSystemUsage.json"
    usage = json.loads(store.read_bytes(rule_file))
    assert usage["Datapoints"] == profiler["Samples"] > 0
    system = [str(item.uri) for item in store.list_prefix(f"{base}/profiler-output/system/incremental/")]
    assert system and all(uri.endswith(".algo-1.json") for uri in system)
    check_report(Path(profiler["Report"]).parents[1])
    # Sampled while the job ran, at the configured interval (500 ms in the definition).
    metrics = read_system_metrics(run.job_dir / "profiler")
    interval = record.properties["ProfilerConfig"]["ProfilingIntervalInMilliseconds"] / 1000
    gaps = [
        later - earlier for earlier, later in zip(metrics.timestamps, metrics.timestamps[1:], strict=False)
    ]
    assert gaps and abs(sorted(gaps)[len(gaps) // 2] - interval) < 0.1
    assert record.properties["TrainingTimeInSeconds"] - 2 <= len(metrics.rows) * interval
