"""The studio page in a real headless browser (Debian's chromium driven by Playwright), over the state
of a real local pipeline run: every step's status, the tuning trials, approving the package from the
page (the endpoint starts), a prediction from an uploaded sample image, and a failed run's message.

Screenshots of the main views go to test-artifacts/studio/. `.ci/run` installs chromium; Playwright
never downloads a browser (FACTS.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from local import endpoints
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
        if (home / "endpoints" / ENDPOINT).is_dir():
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


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


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
    shot(page, "evaluation")

    page.locator("#steps tr[data-step='TrainWithDebugger']").click()
    expect(page.locator("#log")).to_be_visible()
    shot(page, "training")


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
    row.locator("button.approve").click()
    # The approval deploys before it answers (the same code as `kennel approve`): allow a model load.
    expect(page.locator("table.packages tr[data-version='1'] .badge")).to_have_text("Approved", timeout=240_000)
    expect(page.locator("table.packages tr[data-version='1']")).to_contain_text("looks good in the browser test")
    shot(page, "models")

    page.goto(f"{runs.url}#/endpoints")
    expect(page.locator(f"#endpoints tr[data-endpoint='{ENDPOINT}'] .badge")).to_have_text("InService")
    page.locator("#image").set_input_files(str(SAMPLE_IMAGE))
    page.locator("#predict-form button[type=submit]").click()
    labels = page.locator("#predictions .prediction .label")
    expect(labels).to_have_count(3, timeout=60_000)
    assert labels.first.inner_text() in CLASS_NAMES
    shot(page, "endpoints")
