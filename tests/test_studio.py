"""The studio's JSON API over real HTTP on 127.0.0.1, on a state folder written with local.state.

Safety first (cross-origin POST, wrong methods, path traversal, HTML in logs), then what the views
make of the state, then `kennel studio` itself as a process.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from serving_support import not_a_tarball, register

from local import endpoints
from local.files import write_json_atomic
from local.progress import LIVE_RULE_STATUSES
from local.registry import APPROVED, PENDING, LocalRegistry
from local.state import EXECUTING, FAILED, SUCCEEDED, ExecutionStore, StepRecord, current_process, now
from local.studio.server import DEFAULT_GROUP, StudioServer, interface_addresses

REPO_ROOT = Path(__file__).resolve().parents[1]
HOSTILE_LINE = '<script>alert("pwned")</script><img src=x onerror="alert(1)"> & done'

# A small definition with every edge kind: data (Get), DependsOn, and a condition's branches.
DEFINITION: dict[str, Any] = {
    "Version": "2020-12-01",
    "Parameters": [
        {"Name": "Threshold", "Type": "Float", "DefaultValue": 1.5},
        {"Name": "Epochs", "Type": "Integer", "DefaultValue": 2},
    ],
    "Steps": [
        {"Name": "Prepare", "Type": "Processing", "Arguments": {"Epochs": {"Get": "Parameters.Epochs"}}},
        {
            "Name": "Train",
            "Type": "Training",
            "Arguments": {"Data": {"Get": "Steps.Prepare.ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri"}},
        },
        {
            "Name": "Check",
            "Type": "Condition",
            "DependsOn": ["Train"],
            "Arguments": {
                "Conditions": [
                    {"Type": "LessThanOrEqualTo", "LeftValue": 1.0, "RightValue": {"Get": "Parameters.Threshold"}}
                ],
                "IfSteps": [{"Name": "Register", "Type": "RegisterModel", "Arguments": {}}],
                "ElseSteps": [{"Name": "Fail", "Type": "Fail", "Arguments": {"ErrorMessage": "too bad"}}],
            },
        },
    ],
}


class Studio:
    def __init__(self, home: Path, server: StudioServer) -> None:
        self.home, self.server = home, server
        self.port = server.httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def get_json(self, path: str) -> Any:
        status, _, body = self.request("GET", path)
        assert status == 200, body
        return json.loads(body)

    def decide(self, verb: str, group: str, version: int) -> tuple[int, dict[str, Any]]:
        """What the page sends for Approve / Reject."""
        body = json.dumps({"Group": group, "Version": version, "Reason": "test"}).encode()
        status, _, answer = self.request("POST", f"/api/registry/{verb}", body,
                                         {"Content-Type": "application/json", "Origin": self.origin})
        return status, json.loads(answer)


def _write_state(home: Path) -> str:
    """One finished execution: Prepare (log with HTML in it), Train, Check, Fail (failed)."""
    store = ExecutionStore(home)
    execution = store.create(DEFINITION, "demo", {"Threshold": 0.5})
    jobs = execution.folder / "jobs"
    for name in ("Prepare", "Train", "Check", "Fail"):
        record = StepRecord(name=name, type=name, status=SUCCEEDED, start_time=execution.creation_time,
                            end_time=execution.creation_time)
        if name in ("Prepare", "Train"):
            log = jobs / name / "log.txt"
            log.parent.mkdir(parents=True)
            lines = [f"line {i}" for i in range(300)] + [HOSTILE_LINE]
            log.write_text("\n".join(lines) + "\n")
            record.log_path, record.job_name = str(log), f"job-{name}"
        if name == "Prepare":
            record.properties = {
                "ProcessingOutputConfig": {"Outputs": {"train": {"S3Output": {"S3Uri": "s3://bucket/train"}}}}
            }
        if name == "Check":
            record.metadata = {"EvaluatedConditions": [
                {"Type": "LessThanOrEqualTo", "LeftValue": 1.0, "RightValue": 0.5, "Outcome": False}]}
        if name == "Fail":
            record.status, record.failure_reason = FAILED, "too bad"
        store.save_step(execution.execution_id, record)
    execution.status, execution.failure_reason = FAILED, "too bad"
    store.save(execution)
    (home / "pipelines" / "demo").mkdir(parents=True)
    (home / "pipelines" / "demo" / "definition.json").write_text(json.dumps(DEFINITION))
    return execution.execution_id


@pytest.fixture
def studio(tmp_path: Path) -> Iterator[tuple[Studio, str]]:
    home = tmp_path / "home"
    execution_id = _write_state(home)
    server = StudioServer(home, port=0).start()
    try:
        yield Studio(home.resolve(), server), execution_id
    finally:
        server.stop()


# --- safety ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Origin", "Referer"])
def test_cross_origin_post_is_refused(studio: tuple[Studio, str], header: str) -> None:
    client, _ = studio
    body = json.dumps({"Group": "g", "Version": 1}).encode()
    status, _, answer = client.request("POST", "/api/registry/approve", body, {
        "Content-Type": "application/json", header: "http://evil.example/page"})
    assert status == 403
    assert "cross-origin" in json.loads(answer)["Error"]


def test_same_origin_post_reaches_the_registry_and_form_posts_are_refused(studio: tuple[Studio, str]) -> None:
    client, _ = studio
    origin = client.origin
    status, answer = client.decide("reject", DEFAULT_GROUP, 7)
    assert status == 404 and DEFAULT_GROUP in answer["Error"]
    # What a plain HTML form can send: refused before anything is read or changed.
    status, _, _ = client.request("POST", "/api/registry/approve", b"Group=g&Version=1",
                                  {"Content-Type": "application/x-www-form-urlencoded", "Origin": origin})
    assert status == 415


def test_wrong_methods_are_refused(studio: tuple[Studio, str]) -> None:
    client, execution_id = studio
    status, headers, _ = client.request("GET", "/api/registry/approve")
    assert (status, headers["allow"]) == (405, "POST")
    status, headers, _ = client.request("POST", f"/api/executions/{execution_id}", b"{}",
                                        {"Content-Type": "application/json"})
    assert (status, headers["allow"]) == (405, "GET")
    status, _, _ = client.request("OPTIONS", "/api/registry/approve")  # no CORS preflight is granted
    assert status == 405


def test_a_foreign_host_name_is_refused(studio: tuple[Studio, str]) -> None:
    client, _ = studio
    status, _, _ = client.request("GET", "/api/executions", headers={"Host": f"rebind.example:{client.port}"})
    assert status == 403


def test_it_binds_loopback_by_default(studio: tuple[Studio, str]) -> None:
    """The socket itself, not the printed URL: nothing but this machine can connect."""
    client, _ = studio
    assert client.server.httpd.socket.getsockname()[0] == "127.0.0.1"
    assert client.server.httpd.server_address[0] == "127.0.0.1"
    assert client.server.url == f"http://127.0.0.1:{client.port}/"


def test_a_wildcard_bind_warns_and_still_refuses_a_rebinding_host(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Bound to every interface, a DNS-rebinding page (its own name as Host, and as Origin) is
    refused; this machine's own names and addresses on the served port are answered."""
    home = tmp_path / "home"
    _write_state(home)
    register(home, not_a_tarball(tmp_path / "model.tar.gz"))
    with caplog.at_level(logging.WARNING, logger="kennel.studio"):
        server = StudioServer(home, host="0.0.0.0", port=0)
    with server:
        client = Studio(home.resolve(), server)
        port = client.port
        assert server.httpd.server_address[0] == "0.0.0.0"
        assert server.url == f"http://127.0.0.1:{port}/"  # opens the page from here; it answers there
        [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        assert "every network interface" in warning and "approve" in warning and "127.0.0.1" in warning

        evil = f"evil.example:{port}"
        body = json.dumps({"Group": DEFAULT_GROUP, "Version": 1}).encode()
        status, _, answer = client.request("POST", "/api/registry/approve", body, {
            "Host": evil, "Origin": f"http://{evil}", "Content-Type": "application/json"})
        assert status == 403 and "is not this server" in json.loads(answer)["Error"]
        assert LocalRegistry(home).describe_model_package(f"{DEFAULT_GROUP}/1")["ModelApprovalStatus"] == PENDING
        for host in (evil, f"127.0.0.1:{port + 1 if port < 65535 else port - 1}", "", "127.0.0.1.evil.example"):
            assert client.request("GET", "/api/executions", headers={"Host": host})[0] == 403, host

        own = ["127.0.0.1", "localhost", socket.gethostname()]
        own += [address for address in interface_addresses() if not address.startswith("[fe80")][:3]
        for name in own:
            assert client.request("GET", "/api/executions", headers={"Host": f"{name}:{port}"})[0] == 200, name
        # A same-origin POST under this machine's name still reaches the registry.
        mine = f"{socket.gethostname()}:{port}"
        status, _, answer = client.request("POST", "/api/registry/reject", body, {
            "Host": mine, "Origin": f"http://{mine}", "Content-Type": "application/json"})
        assert status == 200, answer


def test_a_loopback_bind_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kennel.studio"):
        StudioServer(tmp_path, port=0).httpd.server_close()
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


# --- decisions: one model package group -------------------------------------------------------------


def test_decisions_are_refused_for_another_group_than_the_endpoints(tmp_path: Path) -> None:
    """Approving deploys the package's own group to the studio's one endpoint; a package of
    another group would replace what that endpoint serves. `kennel approve` only ever uses
    model_package_group, and so does the page: nothing is changed, nothing is deployed."""
    home = tmp_path / "home"
    home.mkdir()
    register(home, not_a_tarball(tmp_path / "ours.tar.gz"), group="kennel-models")
    register(home, not_a_tarball(tmp_path / "theirs.tar.gz"), group="other-models")
    with StudioServer(home, port=0, model_package_group="kennel-models") as server:
        client = Studio(home.resolve(), server)
        assert client.get_json("/api/overview")["ModelPackageGroup"] == "kennel-models"
        for verb in ("approve", "reject"):
            status, answer = client.decide(verb, "other-models", 1)
            assert status == 403, answer
            assert "'kennel-models' only" in answer["Error"] and "'other-models'" in answer["Error"]
        registry = LocalRegistry(home)
        assert registry.describe_model_package("other-models/1")["ModelApprovalStatus"] == PENDING
        assert endpoints.list_endpoints(home) == []
        # The configured group goes through (its broken model fails to deploy: 409, yet Approved).
        status, answer = client.decide("approve", "kennel-models", 1)
        assert status == 409 and "deploying it failed" in answer["Error"]
        assert registry.describe_model_package("kennel-models/1")["ModelApprovalStatus"] == APPROVED


def test_log_path_traversal_is_refused(studio: tuple[Studio, str], tmp_path: Path) -> None:
    client, execution_id = studio
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    for path in (
        f"/api/executions/{execution_id}/steps/..%2F..%2F..%2Fsecret.txt/log",
        f"/api/executions/{execution_id}/steps/../../../secret.txt/log",
        f"/api/executions/..%2F{execution_id}/steps/Prepare/log",
        "/api/executions/../../secret.txt",
    ):
        status, _, body = client.request("GET", path)
        assert status == 404, path
        assert b"top secret" not in body
    # A record edited to point outside the state folder, directly or through a symlink inside it.
    store = ExecutionStore(client.home)
    record = store.load(execution_id).steps["Train"]
    link = client.home / "executions" / execution_id / "jobs" / "Train" / "link.txt"
    link.symlink_to(secret)
    for target in (secret, link):
        record.log_path = str(target)
        store.save_step(execution_id, record)
        for path in (f"/api/executions/{execution_id}/steps/Train/log",
                     f"/api/executions/{execution_id}/steps/Train/files/log/0"):
            status, _, body = client.request("GET", path)
            assert status == 403, (target, path)
            assert b"top secret" not in body
        assert client.get_json(f"/api/executions/{execution_id}/steps/Train")["Log"] is None


def test_html_in_a_log_line_comes_back_inert(studio: tuple[Studio, str]) -> None:
    client, execution_id = studio
    for path in (f"/api/executions/{execution_id}/steps/Prepare",
                 f"/api/executions/{execution_id}/steps/Prepare/log?whole=1"):
        status, headers, body = client.request("GET", path)
        assert status == 200
        assert headers["content-type"].startswith("application/json")
        assert headers["x-content-type-options"] == "nosniff"
        assert b"<" not in body and b">" not in body  # no markup anywhere in the bytes
        document = json.loads(body)
        text = (document.get("Log") or document)["Text"]
        assert text.splitlines()[-1] == HOSTILE_LINE  # the same text, intact once parsed


def test_pages_carry_a_strict_content_security_policy(studio: tuple[Studio, str]) -> None:
    client, _ = studio
    status, headers, body = client.request("GET", "/")
    assert status == 200 and b"/static/app.js" in body
    policy = headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    for name in ("app.js", "app.css"):
        assert client.request("GET", f"/static/{name}")[0] == 200
    assert client.request("GET", "/static/../server.py")[0] == 404


# --- what the views make of the state -----------------------------------------------------------------


def test_pipeline_view_has_typed_edges_and_parameters(studio: tuple[Studio, str]) -> None:
    client, _ = studio
    assert client.get_json("/api/overview")["Pipelines"] == [{"Name": "demo"}]
    pipeline = client.get_json("/api/pipelines/demo")
    edges = {(e["From"], e["To"]): e["Kind"] for e in pipeline["Edges"]}
    assert edges == {("Prepare", "Train"): "data", ("Train", "Check"): "depends",
                     ("Check", "Register"): "if", ("Check", "Fail"): "else"}
    layers = {node["Name"]: node["Layer"] for node in pipeline["Nodes"]}
    assert layers["Prepare"] < layers["Train"] < layers["Check"] < layers["Register"] == layers["Fail"]
    assert {p["Name"]: p["DefaultValue"] for p in pipeline["Parameters"]} == {"Threshold": 1.5, "Epochs": 2}
    assert client.request("GET", "/api/pipelines/nope")[0] == 404


def test_execution_and_step_views(studio: tuple[Studio, str]) -> None:
    client, execution_id = studio
    [summary] = client.get_json("/api/executions")
    assert summary["ExecutionId"] == execution_id and summary["Status"] == FAILED
    execution = client.get_json(f"/api/executions/{execution_id}")
    assert {name: step["Status"] for name, step in execution["Steps"].items()} == {
        "Prepare": SUCCEEDED, "Train": SUCCEEDED, "Check": SUCCEEDED, "Fail": FAILED}
    fail = client.get_json(f"/api/executions/{execution_id}/steps/Fail")
    assert fail["FailureReason"] == "too bad"
    check = client.get_json(f"/api/executions/{execution_id}/steps/Check")
    assert check["Conditions"][0]["Outcome"] is False
    # Arguments come back resolved: the execution's parameter and Prepare's recorded output.
    assert check["Arguments"]["Conditions"][0]["RightValue"] == 0.5
    train = client.get_json(f"/api/executions/{execution_id}/steps/Train")
    assert train["ArgumentsResolved"] and train["Arguments"] == {"Data": "s3://bucket/train"}
    tail = train["Log"]
    assert tail["Truncated"] and len(tail["Text"].splitlines()) == 200
    whole = client.get_json(train["LogUrl"] + "?whole=1")
    assert len(whole["Text"].splitlines()) == 301 and not whole["Truncated"]
    assert client.request("GET", f"/api/executions/{execution_id}/steps/Register")[0] == 404  # never started


def test_a_running_training_step_shows_the_live_rule_statuses(tmp_path: Path) -> None:
    """While the job runs, its rule statuses come from the files the rule evaluator and the profiler
    rewrite (as in `kennel status`); once the job has ended, from the step's properties."""
    home = tmp_path / "home"
    store = ExecutionStore(home)
    definition = {"Version": "2020-12-01", "Parameters": [],
                  "Steps": [{"Name": "TrainWithDebugger", "Type": "Training", "Arguments": {}}]}
    execution = store.create(definition, "demo", {})
    execution.runner = current_process()  # a live runner: the state is not read as interrupted
    store.save(execution)
    job_dir = execution.folder / "jobs" / "TrainWithDebugger-1"
    live = {"Finished": False, "Statuses": [
        {"RuleConfigurationName": "LossNotDecreasing", "RuleEvaluationStatus": "InProgress", "StatusDetails": ""},
        {"RuleConfigurationName": "ExplodingTensor", "RuleEvaluationStatus": "IssuesFound",
         "StatusDetails": "step 3: " + HOSTILE_LINE}]}
    profiler_live = {"Finished": False, "Statuses": [
        {"RuleConfigurationName": "LowGPUUtilization", "RuleEvaluationStatus": "InProgress", "StatusDetails": ""}]}
    write_json_atomic(job_dir / LIVE_RULE_STATUSES["DebugRuleEvaluationStatuses"], live)
    write_json_atomic(job_dir / LIVE_RULE_STATUSES["ProfilerRuleEvaluationStatuses"], profiler_live)
    record = StepRecord("TrainWithDebugger", "Training", EXECUTING, start_time=now(), job_dir=str(job_dir))
    store.save_step(execution.execution_id, record)
    path = f"/api/executions/{execution.execution_id}/steps/TrainWithDebugger"
    with StudioServer(home, port=0) as server:
        client = Studio(home.resolve(), server)

        def shown(key: str = "DebugRules") -> dict[str, str]:
            rules = client.get_json(path)[key]
            return {rule["RuleConfigurationName"]: rule["RuleEvaluationStatus"] for rule in rules}

        assert shown() == {"LossNotDecreasing": "InProgress", "ExplodingTensor": "IssuesFound"}
        assert shown("ProfilerRules") == {"LowGPUUtilization": "InProgress"}
        assert b"<" not in client.request("GET", path)[2]  # a rule's details stay inert too

        # The job ended: the settled statuses win over the file's last state.
        record.status = SUCCEEDED
        record.properties = {
            "DebugRuleEvaluationStatuses": [
                {"RuleConfigurationName": "LossNotDecreasing", "RuleEvaluationStatus": "NoIssuesFound"}],
            "ProfilerRuleEvaluationStatuses": [
                {"RuleConfigurationName": "LowGPUUtilization", "RuleEvaluationStatus": "NoIssuesFound"}],
        }
        store.save_step(execution.execution_id, record)
        assert shown() == {"LossNotDecreasing": "NoIssuesFound"}
        assert shown("ProfilerRules") == {"LowGPUUtilization": "NoIssuesFound"}

        # A job folder edited to lie outside the state folder is not read.
        outside = tmp_path / "elsewhere"
        write_json_atomic(outside / LIVE_RULE_STATUSES["DebugRuleEvaluationStatuses"], live)
        record.status, record.properties, record.job_dir = EXECUTING, {}, str(outside)
        store.save_step(execution.execution_id, record)
        assert shown() == {}


# --- the command --------------------------------------------------------------------------------------


def _kennel(*args: str, home: Path) -> subprocess.Popen:
    environment = {**os.environ, "KENNEL_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _listening(pid: int) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


def test_kennel_studio_serves_until_interrupted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    execution_id = _write_state(home)
    process = _kennel("studio", "--port", "0", "--no-open", home=home)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line
        assert _listening(process.pid) == [("127.0.0.1", int(match.group(1)))]  # the socket, not the words
        connection = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)
        connection.request("GET", "/api/executions")
        assert json.loads(connection.getresponse().read())[0]["ExecutionId"] == execution_id
        connection.close()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_kennel_studio_on_every_interface_says_so(tmp_path: Path) -> None:
    process = _kennel("studio", "--host", "0.0.0.0", "--port", "0", "--no-open", home=tmp_path / "home")
    try:
        assert process.stdout is not None and process.stderr is not None
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", process.stdout.readline())
        assert match
        port = int(match.group(1))
        assert _listening(process.pid) == [("0.0.0.0", port)]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/overview", headers={"Host": f"rebind.example:{port}"})
        assert connection.getresponse().status == 403
        connection.close()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "listens on every network interface" in stderr and "approve" in stderr, stderr
    assert "Traceback" not in stderr


def test_kennel_studio_is_for_the_local_target(tmp_path: Path) -> None:
    process = _kennel("studio", "--target", "aws", "--no-open", home=tmp_path)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "SageMaker Studio" in stderr and "Traceback" not in stderr
