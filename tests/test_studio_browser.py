"""The studio page in a real headless browser (Debian's chromium driven by Playwright), over the state
of a real local pipeline run: every step's status, the tuning trials, the training step's rule
statuses, plots and profiler report, approving the package from the page (the endpoint starts), a
prediction from an uploaded sample image, rejecting it (the endpoint stops), and a failed run's message.

The tests share the module's two runs and run in file order: the prediction needs the endpoint the
approval starts, and the rejection comes last because it stops that endpoint.

Screenshots of the main views go to test-artifacts/studio/. `.ci/run` installs chromium; Playwright
never downloads a browser (FACTS.md).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Locator, Page, Request, expect, sync_playwright
from serving_support import not_a_tarball, register

from local import deployment, endpoints
from local.files import read_json, write_json_atomic
from local.progress import LIVE_RULE_STATUSES
from local.registry import APPROVED, LocalRegistry
from local.state import (
    EXECUTING,
    SUCCEEDED,
    ExecutionStore,
    StepRecord,
    current_process,
    list_executions,
    load_execution,
    now,
)
from local.studio.server import StudioServer

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "studio"
SAMPLE_IMAGE = REPO_ROOT / "data" / "sample" / "test" / "bag" / "t10k-00018.png"
CLASS_NAMES = sorted(p.name for p in (REPO_ROOT / "data" / "sample" / "test").iterdir() if p.is_dir())
SMALL_RUN = ["--param", "MaxJobs=2", "--param", "Epochs=1", "--param", "ImageSize=32"]
ENDPOINT = "kennel-endpoint"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
HOSTILE_LINE = '<img src="x" id="injected" onerror="document.title=\'pwned\'">'
# What the pipeline definition configures on TrainWithDebugger (the tests read the definition too).
DEBUGGER_RULES = ["LossNotDecreasing", "VanishingGradient", "Overfit", "Overtraining",
                  "PoorWeightInitialization", "ExplodingTensor"]
PROFILER_RULES = ["ProfilerReport", "LowGPUUtilization"]
SETTLED = ("NoIssuesFound", "IssuesFound")  # a rule that ran to the end; Error means it could not
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Runs:
    home: Path
    succeeded: str
    failed: str
    url: str


def _run(home: Path, *params: str) -> str:
    environment = {**os.environ, "KENNEL_HOME": str(home)}
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--wait", *SMALL_RUN, *params],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=480)
    newest = list_executions(home)[0]
    assert newest.status in ("Succeeded", "Failed"), completed.stdout[-3000:] + completed.stderr[-3000:]
    return newest.execution_id


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """A succeeded run, then a failed one (the same steps come from the cache), served by the studio."""
    home = tmp_path_factory.mktemp("studio") / "home"
    succeeded = _run(home, "--param", "TestLossThreshold=5")
    failed = _run(home, "--param", "TestLossThreshold=0.0001")
    server = StudioServer(home, port=0).start()
    try:
        yield Runs(home, succeeded, failed, server.url)
    finally:
        server.stop()
        # Stop what the approval started, if a test left it serving (the Deploy step makes the
        # endpoint's folder even when nothing is approved).
        if any(e.name == ENDPOINT and e.status in endpoints.LIVE_STATUSES for e in endpoints.list_endpoints(home)):
            endpoints.stop(home, ENDPOINT)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: apt-get install -y chromium (.ci/run does it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    yield page
    context.close()
    assert not errors, errors  # no script error, no refused resource, no CSP violation


def shot(page: Page, name: str) -> Path:
    """A full-page screenshot as a test artifact, checked to be a real, non-empty PNG."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    path.unlink(missing_ok=True)  # a screenshot left by an earlier run must not pass for this one
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0 and len(data) > 1000, (path, width, height, len(data))
    return path


def expect_images_loaded(images: Locator, count: int) -> None:
    """`count` images, each fetched and decoded by the browser (a broken one has no natural size)."""
    expect(images).to_have_count(count)
    for image in images.all():
        image.scroll_into_view_if_needed()  # the page loads plots lazily
        # decode() waits for the image and rejects when it cannot be shown.
        width = image.evaluate("img => img.decode().then(() => img.naturalWidth)")
        assert width > 0, image.get_attribute("src")


def _off_host(request: Request) -> bool:
    """A request that leaves this machine: anything but inline data and the studio on 127.0.0.1."""
    parts = urlsplit(request.url)
    return parts.scheme != "data" and parts.hostname != "127.0.0.1"


def test_a_running_execution_updates_without_reload(page: Page, tmp_path: Path) -> None:
    """The page polls while a run is live: step records changing on disk recolour the DAG in place."""
    definition = {"Version": "2020-12-01", "Parameters": [], "Steps": [
        {"Name": "Prepare", "Type": "Processing", "Arguments": {}},
        {"Name": "Train", "Type": "Training", "Arguments": {}, "DependsOn": ["Prepare"]}]}
    store = ExecutionStore(tmp_path / "home")
    execution = store.create(definition, "demo", {})
    execution.runner = current_process()  # a live runner, so the state is not read as interrupted
    store.save(execution)
    store.save_step(execution.execution_id, StepRecord("Prepare", "Processing", EXECUTING, start_time=now()))
    with StudioServer(tmp_path / "home", port=0) as server:
        page.goto(f"{server.url}#/executions/{execution.execution_id}")
        prepare, train = (page.locator(f".dag .node[data-step='{name}']") for name in ("Prepare", "Train"))
        expect(prepare).to_have_attribute("data-status", EXECUTING)
        expect(train).to_have_attribute("data-status", "NotStarted")
        page.evaluate("window.notReloaded = true")
        store.save_step(execution.execution_id,
                        StepRecord("Prepare", "Processing", SUCCEEDED, start_time=now(), end_time=now()))
        store.save_step(execution.execution_id, StepRecord("Train", "Training", EXECUTING, start_time=now()))
        expect(prepare).to_have_attribute("data-status", SUCCEEDED, timeout=10_000)
        expect(train).to_have_attribute("data-status", EXECUTING)
        execution.status = SUCCEEDED
        store.save(execution)
        expect(page.locator("h1 .badge")).to_have_text(SUCCEEDED, timeout=10_000)
        assert page.evaluate("window.notReloaded") is True


def test_a_running_training_step_shows_its_live_rule_statuses(page: Page, tmp_path: Path) -> None:
    """While the training job runs, the step shows the statuses the rule evaluator keeps rewriting
    in the job folder (InProgress at first), and follows them without a reload."""
    definition = {"Version": "2020-12-01", "Parameters": [], "Steps": [
        {"Name": "TrainWithDebugger", "Type": "Training", "Arguments": {}}]}
    store = ExecutionStore(tmp_path / "home")
    execution = store.create(definition, "demo", {})
    execution.runner = current_process()  # a live runner, so the state is not read as interrupted
    store.save(execution)
    job_dir = execution.folder / "jobs" / "TrainWithDebugger-1"
    status_file = job_dir / LIVE_RULE_STATUSES["DebugRuleEvaluationStatuses"]
    statuses = [{"RuleConfigurationName": name, "RuleEvaluationStatus": "InProgress", "StatusDetails": ""}
                for name in DEBUGGER_RULES]
    write_json_atomic(status_file, {"Finished": False, "Statuses": statuses})
    store.save_step(execution.execution_id, StepRecord("TrainWithDebugger", "Training", EXECUTING,
                                                       start_time=now(), job_dir=str(job_dir)))
    with StudioServer(tmp_path / "home", port=0) as server:
        page.goto(f"{server.url}#/executions/{execution.execution_id}/TrainWithDebugger")
        for name in DEBUGGER_RULES:
            expect(page.locator(f"#debug-rules tr[data-rule='{name}'] .badge")).to_have_text("InProgress")
        shot(page, "training-live-rules")
        page.evaluate("window.notReloaded = true")
        statuses[-1].update(RuleEvaluationStatus="IssuesFound", StatusDetails="step 12: a tensor is infinite")
        write_json_atomic(status_file, {"Finished": False, "Statuses": statuses})
        row = page.locator(f"#debug-rules tr[data-rule='{DEBUGGER_RULES[-1]}']")
        expect(row.locator(".badge")).to_have_text("IssuesFound", timeout=10_000)
        expect(row).to_contain_text("a tensor is infinite")
        assert page.evaluate("window.notReloaded") is True
        execution.status = SUCCEEDED  # lets the page stop polling
        store.save(execution)


def test_an_opened_whole_log_keeps_following_a_live_step(page: Page, tmp_path: Path) -> None:
    """Opening the whole log does not stop the page's polling: the log grows in place, and the
    step's status still changes without a reload, the whole log staying open."""
    definition = {"Version": "2020-12-01", "Parameters": [], "Steps": [
        {"Name": "Prepare", "Type": "Processing", "Arguments": {}}]}
    store = ExecutionStore(tmp_path / "home")
    execution = store.create(definition, "demo", {})
    execution.runner = current_process()  # a live runner, so the state is not read as interrupted
    store.save(execution)
    log = execution.folder / "jobs" / "Prepare" / "log.txt"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(300)))  # longer than the tail the page shows
    record = StepRecord("Prepare", "Processing", EXECUTING, start_time=now(), log_path=str(log))
    store.save_step(execution.execution_id, record)
    with StudioServer(tmp_path / "home", port=0) as server:
        page.goto(f"{server.url}#/executions/{execution.execution_id}/Prepare")
        page.locator("#whole-log-button").click()
        whole = page.locator("#whole-log")
        expect(whole).to_contain_text("line 0\n")
        page.evaluate("window.notReloaded = true")
        with log.open("a") as handle:
            handle.write("line appended while live\n")
        expect(whole).to_contain_text("line appended while live", timeout=10_000)
        record.status, record.end_time = SUCCEEDED, now()
        store.save_step(execution.execution_id, record)
        execution.status = SUCCEEDED
        store.save(execution)
        expect(page.locator(".dag .node[data-step='Prepare']")).to_have_attribute("data-status", SUCCEEDED,
                                                                                  timeout=10_000)
        expect(page.locator("h1 .badge")).to_have_text(SUCCEEDED)
        expect(whole).to_contain_text("line 0\n")  # still the whole log, not the tail
        expect(whole).to_contain_text("line appended while live")
        assert page.evaluate("window.notReloaded") is True


def test_a_failed_deployment_still_shows_the_approval(browser: Browser, tmp_path: Path) -> None:
    """Approve answers 409 when the registry took the approval but the endpoint could not load
    the package: the page says why and shows the package as it now is (Approved). Packages of
    another group than the endpoint's get no Approve / Reject."""
    home = tmp_path / "home"
    register(home, not_a_tarball(tmp_path / "model.tar.gz"))
    register(home, not_a_tarball(tmp_path / "other.tar.gz"), group="other-models")
    # Its own context: the browser reports the 409 answer on the console, which the page fixture refuses.
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        with StudioServer(home, port=0) as server:
            page.goto(f"{server.url}#/models")
            row = page.locator("section[data-group='kennel-models'] tr[data-version='1']")
            expect(row.locator(".badge")).to_have_text("PendingManualApproval")
            other = page.locator("section[data-group='other-models']")
            expect(other.locator(".not-decided")).to_contain_text("kennel-models")
            expect(other.locator("button")).to_have_count(0)
            with page.expect_response(lambda r: r.url.endswith("/api/registry/approve"), timeout=60_000) as answer:
                row.locator("button.approve").click()
            assert answer.value.status == 409, answer.value.text()
            expect(page.locator("#notice.error")).to_contain_text("deploying it failed")
            expect(page.locator("section[data-group='kennel-models'] tr[data-version='1'] .badge")).to_have_text(
                APPROVED)
            assert LocalRegistry(home).describe_model_package("kennel-models/1")["ModelApprovalStatus"] == APPROVED
    finally:
        context.close()
    assert not errors, errors


def test_a_run_is_shown_step_by_step(runs: Runs, page: Page) -> None:
    page.goto(f"{runs.url}#/pipeline")
    expect(page.locator("#parameters tr[data-parameter='TestLossThreshold']")).to_be_visible()
    expect(page.locator(".dag .edge.else")).to_have_count(1)
    shot(page, "pipeline")

    page.goto(f"{runs.url}#/executions")
    expect(page.locator(f"#executions tr[data-execution='{runs.succeeded}']")).to_be_visible()
    shot(page, "executions")

    page.goto(f"{runs.url}#/executions/{runs.succeeded}")
    expect(page.locator("#execution-id")).to_have_text(runs.succeeded)
    statuses = json.loads(page.evaluate(f"fetch('/api/executions/{runs.succeeded}').then(r => r.text())"))["Steps"]
    assert set(statuses) >= {"PrepareData", "Tune", "TrainWithDebugger", "Evaluate", "CheckTestLoss", "Register"}
    for name, step in statuses.items():
        expect(page.locator(f"#steps tr[data-step='{name}'] .badge")).to_have_text(step["Status"])
        expect(page.locator(f".dag .node[data-step='{name}']")).to_have_attribute("data-status", step["Status"])
    expect(page.locator("#steps tr[data-step='Fail'] .badge")).to_have_text("NotStarted")  # branch not taken
    shot(page, "execution")

    page.locator(".dag .node[data-step='Tune']").click()
    trials = page.locator("#trials tbody tr")
    expect(trials).to_have_count(2)
    expect(page.locator("#trials tr.best")).to_have_count(1)
    expect(page.locator("#trials tr.best")).to_contain_text("best")
    shot(page, "tuning")

    page.locator("#steps tr[data-step='Evaluate']").click()
    expect(page.locator("#confusion-matrix tbody tr")).to_have_count(len(CLASS_NAMES))
    expect(page.locator("#metrics")).to_contain_text("accuracy")
    evaluate_plots = load_execution(runs.home, runs.succeeded).steps["Evaluate"].metadata.get("Plots") or []
    assert evaluate_plots, "Evaluate recorded no plot (the confusion matrix)"
    expect_images_loaded(page.locator(".plots img"), len(evaluate_plots))
    shot(page, "evaluation")


def test_the_training_step_shows_rules_plots_and_the_profiler_report(runs: Runs, page: Page) -> None:
    """TrainWithDebugger: every configured Debugger and profiler rule with its settled status, the
    plots as loaded images, and the profiler report, which renders offline in the browser."""
    execution = load_execution(runs.home, runs.succeeded)
    record = execution.steps["TrainWithDebugger"]
    step = next(s for s in read_json(execution.folder / "definition.json")["Steps"] if s["Name"] == "TrainWithDebugger")
    configured = {
        "debug-rules": [rule["RuleConfigurationName"] for rule in step["Arguments"]["DebugRuleConfigurations"]],
        "profiler-rules": [rule["RuleConfigurationName"] for rule in step["Arguments"]["ProfilerRuleConfigurations"]],
    }
    assert configured == {"debug-rules": DEBUGGER_RULES, "profiler-rules": PROFILER_RULES}
    recorded = {
        "debug-rules": record.properties["DebugRuleEvaluationStatuses"],
        "profiler-rules": record.properties["ProfilerRuleEvaluationStatuses"],
    }
    files = f"/api/executions/{runs.succeeded}/steps/TrainWithDebugger/files"
    off_host: list[str] = []
    page.context.on("request", lambda request: off_host.append(request.url) if _off_host(request) else None)
    report_errors: list[str] = []  # the page fixture watches the studio's tab; this, the report's
    page.context.on("page", lambda tab: tab.on(
        "console", lambda message: report_errors.append(message.text) if message.type == "error" else None))
    plot_answers: list[tuple[str, int, str]] = []
    page.context.on("response", lambda response: plot_answers.append(
        (urlsplit(response.url).path, response.status, response.headers.get("content-type", "")))
        if "/files/plot/" in response.url else None)

    page.goto(f"{runs.url}#/executions/{runs.succeeded}/TrainWithDebugger")
    expect(page.locator("#log")).to_be_visible()
    for table_id, names in configured.items():
        expect(page.locator(f"#{table_id} tbody tr")).to_have_count(len(names))
        statuses = {status["RuleConfigurationName"]: status["RuleEvaluationStatus"] for status in recorded[table_id]}
        for name in names:
            assert statuses[name] in SETTLED, (name, statuses[name])
            expect(page.locator(f"#{table_id} tr[data-rule='{name}'] .badge")).to_have_text(statuses[name])

    plots = record.metadata["Plots"]
    expect_images_loaded(page.locator(".plots img"), len(plots))
    assert set(plot_answers) == {(f"{files}/plot/{index}", 200, "image/png") for index in range(len(plots))}
    shot(page, "training")

    with page.context.expect_page() as opened:
        page.locator("#profiler-report").click()  # target=_blank: the report opens in its own tab
    report = opened.value
    report.wait_for_load_state("load")
    assert urlsplit(report.url).path == f"{files}/profiler-report/0"
    expect(report.locator("h1")).to_have_text("Profiler report")
    expect(report.locator("body")).to_contain_text(record.job_name or "")
    for name in PROFILER_RULES[1:]:  # the report is ProfilerReport's output; it lists the other rules
        expect(report.locator("table").first).to_contain_text(name)
    charts = report.locator("img")
    assert charts.count() >= 1, "the report has no inline charts"
    expect_images_loaded(charts, charts.count())
    shot(report, "profiler-report")
    assert not report_errors, report_errors
    assert not off_host, f"requests outside 127.0.0.1: {off_host}"


def test_html_in_a_log_stays_text(runs: Runs, page: Page) -> None:
    record_log = Path(load_execution(runs.home, runs.succeeded).steps["PrepareData"].log_path or "")
    with record_log.open("a") as handle:
        handle.write(HOSTILE_LINE + "\n")
    page.goto(f"{runs.url}#/executions/{runs.succeeded}/PrepareData")
    expect(page.locator("#log")).to_contain_text(HOSTILE_LINE)
    assert page.locator("#injected").count() == 0
    assert page.title() != "pwned"


def test_a_failed_run_shows_the_fail_steps_message(runs: Runs, page: Page) -> None:
    page.goto(f"{runs.url}#/executions/{runs.failed}/Fail")
    expect(page.locator("#steps tr[data-step='Fail'] .badge")).to_have_text("Failed")
    expect(page.locator("#step-failure")).to_contain_text("TestLossThreshold 0.0001")
    expect(page.locator("#execution-failure")).to_be_visible()
    shot(page, "failed-run")


def test_approve_from_the_page_then_predict(runs: Runs, page: Page) -> None:
    page.goto(f"{runs.url}#/models")
    row = page.locator("table.packages tr[data-version='1']")
    expect(row.locator(".badge")).to_have_text("PendingManualApproval")
    row.locator("input.reason").fill("looks good in the browser test")
    # The approval deploys before it answers (the same code as `kennel approve`): allow a model load.
    with page.expect_response(lambda r: r.url.endswith("/api/registry/approve"), timeout=240_000) as answer:
        row.locator("button.approve").click()
    assert answer.value.status == 200, answer.value.text()
    approved = answer.value.json()["ModelPackageVersion"]
    assert approved == 1
    expect(page.locator("table.packages tr[data-version='1'] .badge")).to_have_text("Approved")
    expect(page.locator("table.packages tr[data-version='1']")).to_contain_text("looks good in the browser test")
    shot(page, "models")

    page.goto(f"{runs.url}#/endpoints")
    endpoint_row = page.locator(f"#endpoints tr[data-endpoint='{ENDPOINT}']")
    expect(endpoint_row.locator(".badge")).to_have_text("InService")
    expect(endpoint_row.locator(".package")).to_have_text(f"version {approved}")
    assert endpoints.describe_endpoint(runs.home, ENDPOINT).model_package_version == approved
    page.locator("#image").set_input_files(str(SAMPLE_IMAGE))
    page.locator("#predict-form button[type=submit]").click()
    labels = page.locator("#predictions .prediction .label")
    expect(labels).to_have_count(3, timeout=60_000)
    assert labels.first.inner_text() in CLASS_NAMES
    shot(page, "endpoints")


def test_reject_from_the_page_stops_the_endpoint(runs: Runs, page: Page) -> None:
    """After the approval above: rejecting the only Approved package from the page does what
    `kennel reject` does (local.deployment.reject): Rejected with the reason in the package's
    history, and its endpoint stopped, since no Approved package is left to roll back to."""
    serving = endpoints.describe_endpoint(runs.home, ENDPOINT)
    assert serving.status == endpoints.IN_SERVICE and serving.model_package_version == 1 and serving.url
    reason = "rejected in the browser test"
    page.goto(f"{runs.url}#/models")
    row = page.locator("table.packages tr[data-version='1']")
    expect(row.locator(".badge")).to_have_text("Approved")
    row.locator("input.reason").fill(reason)
    with page.expect_response(lambda r: r.url.endswith("/api/registry/reject"), timeout=60_000) as answer:
        row.locator("button.reject").click()
    assert answer.value.status == 200, answer.value.text()
    result = answer.value.json()
    assert (result["PreviousApprovalStatus"], result["ModelApprovalStatus"]) == ("Approved", "Rejected")
    [stopped] = result["Deployments"]
    assert (stopped["Action"], stopped["EndpointName"]) == (deployment.STOPPED, ENDPOINT)
    expect(page.locator("#notice")).to_contain_text(stopped["Message"])

    expect(page.locator("table.packages tr[data-version='1'] .badge")).to_have_text("Rejected")
    expect(page.locator("table.packages tr[data-version='1'] li").last).to_contain_text(f"Approved → Rejected ({reason})")
    change = LocalRegistry(runs.home).history(serving.model_package_arn or "")[-1]
    assert (change.from_status, change.to_status, change.reason) == ("Approved", "Rejected", reason)
    shot(page, "rejected")

    # Stopped as `kennel reject` leaves it: out of service, its server gone, the last package kept.
    after = endpoints.describe_endpoint(runs.home, ENDPOINT)
    assert (after.status, after.url, after.model_package_version) == (endpoints.OUT_OF_SERVICE, None, 1)
    old = urlsplit(serving.url)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((old.hostname, old.port), timeout=5).close()
    page.goto(f"{runs.url}#/endpoints")
    endpoint_row = page.locator(f"#endpoints tr[data-endpoint='{ENDPOINT}']")
    expect(endpoint_row.locator(".badge")).to_have_text(endpoints.OUT_OF_SERVICE)
    expect(endpoint_row.locator(".package")).to_have_text("version 1")
    shot(page, "endpoints-after-reject")
