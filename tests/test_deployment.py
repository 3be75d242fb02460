"""local/deployment.py: approve deploys, reject rolls back, and racing approvals deploy once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from serving_support import (
    ENDPOINT,
    GROUP,
    Tarballs,
    not_a_tarball,
    register,
    sample_png,
    server_processes,
    top_label,
)

from local import deployment, endpoints
from local import registry as registry_module
from local.endpoints import IN_SERVICE, OUT_OF_SERVICE
from local.registry import APPROVED, PENDING, REJECTED, LocalRegistry, RegistryError
from local.runner import RunOptions, run_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]


def served_label(home: Path) -> str:
    answer = endpoints.invoke_endpoint(home, ENDPOINT, sample_png("pullover"), "image/png")
    assert answer.status == 200
    return top_label(answer.body)


def test_nothing_approved_is_a_successful_no_op(kennel_home: Path, tarballs: Tarballs) -> None:
    register(kennel_home, tarballs.original, PENDING)
    result = deployment.deploy_newest_approved(kennel_home, GROUP, ENDPOINT)
    assert result.action == deployment.NOTHING_APPROVED
    assert "No Approved package" in result.message and "kennel approve --latest" in result.message
    assert endpoints.list_endpoints(kennel_home) == []
    assert server_processes(kennel_home) == []


def test_approve_serves_then_reject_rolls_back_then_stops(kennel_home: Path, tarballs: Tarballs) -> None:
    registry = LocalRegistry(kennel_home)
    first = register(kennel_home, tarballs.original)  # PendingManualApproval, as the pipeline registers
    assert endpoints.list_endpoints(kennel_home) == []  # nothing serves a pending package

    approved = deployment.approve(kennel_home, GROUP, "latest", "test loss is fine", endpoint_name=ENDPOINT)
    assert (approved.model_package_version, approved.previous_status, approved.status) == (
        1,
        PENDING,
        APPROVED,
    )
    assert approved.deployments[0].action == "created"
    assert f"serves version 1 at {approved.deployments[0].url}" in approved.message
    first_label = served_label(kennel_home)
    assert first_label in tarballs.class_names
    pid = endpoints.describe_endpoint(kennel_home, ENDPOINT).pid

    register(kennel_home, tarballs.reversed)
    second = deployment.approve(kennel_home, GROUP, 2, "better", endpoint_name=ENDPOINT)
    assert second.deployments[0].action == "updated" and second.deployments[0].model_package_version == 2
    assert served_label(kennel_home) != first_label
    assert endpoints.describe_endpoint(kennel_home, ENDPOINT).pid == pid  # swapped, not restarted

    # Approving an older version changes nothing: the newest Approved one keeps serving.
    again = deployment.approve(kennel_home, GROUP, "1", "", endpoint_name=ENDPOINT)
    assert again.deployments[0].action == "up-to-date" and again.previous_status == APPROVED
    assert "already serves version 2" in again.message

    rolled = deployment.reject(kennel_home, GROUP, 2, "mislabels pullovers")
    assert rolled.deployments[0].action == "updated"
    assert "rolled back from version 2 to version 1" in rolled.message
    endpoint = endpoints.describe_endpoint(kennel_home, ENDPOINT)
    assert (endpoint.status, endpoint.model_package_version) == (IN_SERVICE, 1)
    assert served_label(kennel_home) == first_label

    # Rejecting a version that does not serve leaves the endpoint alone.
    register(kennel_home, tarballs.reversed)
    assert deployment.reject(kennel_home, GROUP, 3, "never mind").deployments == []

    stopped = deployment.reject(kennel_home, GROUP, 1, "all wrong")
    assert stopped.deployments[0].action == deployment.STOPPED
    assert "no Approved package is left" in stopped.message
    assert endpoints.describe_endpoint(kennel_home, ENDPOINT).status == OUT_OF_SERVICE
    assert server_processes(kennel_home) == []

    history = registry.history(first["ModelPackageArn"])
    assert [(change.from_status, change.to_status) for change in history] == [
        (None, PENDING),
        (PENDING, APPROVED),
        (APPROVED, REJECTED),
    ]
    assert history[-1].reason == "all wrong"


def test_the_deploy_step_stops_an_endpoint_left_serving_a_package_no_longer_approved(
    kennel_home: Path, tarballs: Tarballs
) -> None:
    register(kennel_home, tarballs.original, APPROVED)
    assert deployment.deploy_newest_approved(kennel_home, GROUP, ENDPOINT).action == "created"
    # The status changes behind the endpoint's back (the registry alone, as SageMaker's console would):
    # the next deploy must not leave a rejected model serving, as entrypoints/deploy.py deletes it on AWS.
    LocalRegistry(kennel_home).update_model_package(f"{GROUP}/1", REJECTED, "wrong labels")
    result = deployment.deploy_newest_approved(kennel_home, GROUP, ENDPOINT)
    assert result.action == deployment.STOPPED and "no Approved package is left" in result.message
    assert endpoints.describe_endpoint(kennel_home, ENDPOINT).status == OUT_OF_SERVICE
    assert server_processes(kennel_home) == []
    assert deployment.deploy_newest_approved(kennel_home, GROUP, ENDPOINT).action == deployment.NOTHING_APPROVED


def test_unknown_versions_are_clear_errors(kennel_home: Path, tarballs: Tarballs) -> None:
    with pytest.raises(RegistryError, match="no model package group"):
        deployment.approve(kennel_home, GROUP, "latest", endpoint_name=ENDPOINT)
    register(kennel_home, tarballs.original)
    with pytest.raises(RegistryError, match=f"no model package '{GROUP}/5'"):
        deployment.reject(kennel_home, GROUP, 5)
    with pytest.raises(RegistryError, match="give a version number"):
        deployment.approve(kennel_home, GROUP, "newest", endpoint_name=ENDPOINT)
    assert endpoints.list_endpoints(kennel_home) == []


def test_a_failed_deployment_keeps_the_approval_and_says_how_to_retry(
    kennel_home: Path, tarballs: Tarballs, tmp_path: Path
) -> None:
    broken = tmp_path / "model.tar.gz"
    broken.write_bytes(b"not a tarball")
    register(kennel_home, broken)
    with pytest.raises(deployment.DeploymentError) as raised:
        deployment.approve(kennel_home, GROUP, 1, "", endpoint_name=ENDPOINT)
    assert "version 1 is Approved, but deploying it failed" in str(raised.value)
    assert "kennel approve --version 1" in str(raised.value)
    assert LocalRegistry(kennel_home).describe_model_package(f"{GROUP}/1")["ModelApprovalStatus"] == APPROVED


def test_two_processes_approving_at_once_deploy_the_newest_once(
    kennel_home: Path, tarballs: Tarballs
) -> None:
    register(kennel_home, tarballs.original)
    register(kennel_home, tarballs.reversed)
    go = kennel_home.parent / "go"
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from local import deployment
        while not Path(sys.argv[1]).exists():
            time.sleep(0.005)
        result = deployment.approve(sys.argv[2], sys.argv[3], int(sys.argv[4]), "race", endpoint_name=sys.argv[5])
        print(result.deployments[0].action)
        """
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(go), str(kennel_home), GROUP, str(version), ENDPOINT],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for version in (1, 2)
    ]
    go.touch()
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs

    actions = sorted(out.strip() for out, _ in outputs)
    # One process created the endpoint; the other either found it serving the newest already or
    # swapped in the newest: never a second server.
    assert actions.count("created") == 1, actions
    endpoint = endpoints.describe_endpoint(kennel_home, ENDPOINT)
    assert endpoint.status == IN_SERVICE and endpoint.model_package_version == 2
    assert [process.pid for process in server_processes(kennel_home)] == [endpoint.pid]
    registry = LocalRegistry(kennel_home)
    assert [p["ModelPackageVersion"] for p in registry.list_model_packages(GROUP, APPROVED)] == [1, 2]


# --- the pipeline's Deploy step, with the definition's own retry policies ------------------------
def deploy_step_pipeline(offline_builds, retry_policies: list | None = None) -> dict:
    """The local definition cut down to its Deploy step (parameters kept, DependsOn dropped)."""
    full = offline_builds["local"].definition
    condition = next(step for step in full["Steps"] if step["Type"] == "Condition")
    step = next(step for step in condition["Arguments"]["IfSteps"] if step["Name"] == "Deploy")
    step = {key: value for key, value in step.items() if key != "DependsOn"}
    if retry_policies is not None:
        step["RetryPolicies"] = retry_policies
    return {**full, "Steps": [step]}


def test_a_deploy_that_cannot_work_fails_at_once_instead_of_being_retried(
    kennel_home: Path, offline_builds, tmp_path: Path
) -> None:
    pipeline = deploy_step_pipeline(offline_builds)
    assert any("Step.SERVICE_FAULT" in policy["ExceptionType"] for policy in pipeline["Steps"][0]["RetryPolicies"])
    register(kennel_home, not_a_tarball(tmp_path / "model.tar.gz"), APPROVED)
    started = time.monotonic()
    execution = run_pipeline(pipeline, {}, kennel_home, options=RunOptions(stop_grace_seconds=1.0))
    record = execution.steps["Deploy"]
    assert (execution.status, record.status, record.attempt_count) == ("Failed", "Failed", 1)
    assert record.metadata["FailureType"] == "ClientError"
    assert "is not a readable model.tar.gz" in record.failure_reason
    assert time.monotonic() - started < 30  # a retried SERVICE_FAULT would wait 5 + 10 + 20 + ... seconds
    assert server_processes(kennel_home) == []


def test_a_registry_held_by_another_process_is_retried(
    kennel_home: Path, offline_builds, tarballs: Tarballs, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(kennel_home, tarballs.original, PENDING)
    monkeypatch.setattr(registry_module, "LOCK_TIMEOUT_S", 0.2)
    quick = [{"ExceptionType": ["Step.SERVICE_FAULT"], "IntervalSeconds": 0.1, "BackoffRate": 1.0, "MaxAttempts": 2}]
    holder = sqlite3.connect(registry_module.registry_path(kennel_home), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing, for longer than the registry waits
    try:
        execution = run_pipeline(deploy_step_pipeline(offline_builds, quick), {}, kennel_home,
                                 options=RunOptions(stop_grace_seconds=1.0))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    record = execution.steps["Deploy"]
    assert (record.status, record.attempt_count) == ("Failed", 3)  # 1 + MaxAttempts retries
    assert {attempt["FailureType"] for attempt in record.attempts} == {"Step.SERVICE_FAULT"}
    assert "stayed locked" in record.failure_reason
