"""local/registry.py: SageMaker's model registry in SQLite: versions, approval, history, transactions."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from serving_support import EXECUTION_ARN, GROUP, evaluation, register_request

from local.home import store_root
from local.registry import (
    APPROVED,
    PENDING,
    REJECTED,
    LocalRegistry,
    PackageNotFound,
    RegistryError,
    package_arn,
    registry_path,
)
from local.store import ObjectStore

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_URL = "s3://kennel-local/kennel/job-1/output/model.tar.gz"
EVALUATION_URL = "s3://kennel-local/kennel/eval-1/evaluation.json"


def request(status: str | None = PENDING, group: str = GROUP, url: str = MODEL_URL) -> dict:
    return register_request(url, EVALUATION_URL, status, group)


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "home")


def test_packages_are_numbered_per_group_with_sagemaker_arns(registry: LocalRegistry) -> None:
    first = registry.create_model_package(request())["ModelPackageArn"]
    second = registry.create_model_package(request(url="s3://kennel-local/kennel/job-2/model.tar.gz"))
    other = registry.create_model_package(request(group="other-group"))

    assert first == f"arn:aws:sagemaker:local:000000000000:model-package/{GROUP}/1"
    assert second["ModelPackageArn"].endswith(f"model-package/{GROUP}/2")
    assert other["ModelPackageArn"].endswith("model-package/other-group/1")
    versions = [package["ModelPackageVersion"] for package in registry.list_model_packages(GROUP)]
    assert versions == [1, 2]
    groups = [group["ModelPackageGroupName"] for group in registry.list_model_package_groups()]
    assert sorted(groups) == [GROUP, "other-group"]


def test_a_package_keeps_what_sagemaker_keeps(registry: LocalRegistry) -> None:
    ObjectStore(store_root(registry.home)).put_bytes(EVALUATION_URL, json.dumps(evaluation(0.31)).encode())
    before = datetime.now(UTC)
    arn = registry.create_model_package(request(), execution_arn=EXECUTION_ARN)["ModelPackageArn"]

    by_arn = registry.describe_model_package(arn)
    assert registry.describe_model_package(f"{GROUP}/1") == by_arn
    assert by_arn["ModelPackageGroupName"] == GROUP and by_arn["ModelPackageVersion"] == 1
    assert by_arn["InferenceSpecification"]["Containers"][0]["ModelDataUrl"] == MODEL_URL
    assert by_arn["ModelDataUrl"] == MODEL_URL
    assert by_arn["ModelMetrics"] == {
        "ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": EVALUATION_URL}}
    }
    assert by_arn["Evaluation"]["multiclass_classification_metrics"]["loss"]["value"] == 0.31
    assert by_arn["MetadataProperties"] == {"GeneratedBy": EXECUTION_ARN}
    assert by_arn["ModelApprovalStatus"] == PENDING
    assert before <= by_arn["CreationTime"] <= datetime.now(UTC)
    assert by_arn["Task"] == "IMAGE_CLASSIFICATION"


def test_evaluation_outside_the_store_keeps_only_its_uri(registry: LocalRegistry) -> None:
    arn = registry.create_model_package(request())["ModelPackageArn"]
    described = registry.describe_model_package(arn)
    assert described["Evaluation"] is None
    assert described["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"] == EVALUATION_URL


def test_approval_changes_are_recorded_in_order(registry: LocalRegistry) -> None:
    arn = registry.create_model_package(request())["ModelPackageArn"]
    answer = registry.update_model_package(arn, APPROVED, "test loss 0.31 is fine")
    registry.update_model_package(arn, REJECTED, "mislabels sandals")
    registry.update_model_package(arn, REJECTED, "still wrong")  # no change of status: no history row

    assert answer == {
        "ModelPackageArn": arn,
        "ModelApprovalStatus": APPROVED,
        "PreviousApprovalStatus": PENDING,
    }
    history = registry.history(arn)
    assert [(change.from_status, change.to_status, change.reason) for change in history] == [
        (None, PENDING, "registered"),
        (PENDING, APPROVED, "test loss 0.31 is fine"),
        (APPROVED, REJECTED, "mislabels sandals"),
    ]
    assert [change.time for change in history] == sorted(change.time for change in history)
    described = registry.describe_model_package(arn)
    assert described["ModelApprovalStatus"] == REJECTED
    assert described["ApprovalDescription"] == "still wrong"


def test_listing_filters_by_status_and_finds_the_newest_approved(registry: LocalRegistry) -> None:
    for status in (APPROVED, PENDING, APPROVED, REJECTED):
        registry.create_model_package(request(status))
    assert [p["ModelPackageVersion"] for p in registry.list_model_packages(GROUP, APPROVED)] == [1, 3]
    assert [p["ModelPackageVersion"] for p in registry.list_model_packages(GROUP, REJECTED)] == [4]
    assert registry.newest_approved(GROUP)["ModelPackageVersion"] == 3
    assert registry.latest_version(GROUP) == 4
    assert registry.newest_approved("no-such-group") is None


def test_status_defaults_to_pending_manual_approval(registry: LocalRegistry) -> None:
    arn = registry.create_model_package(request(status=None))["ModelPackageArn"]
    assert registry.describe_model_package(arn)["ModelApprovalStatus"] == PENDING


def test_the_registry_is_a_file_that_outlives_the_object(registry: LocalRegistry) -> None:
    arn = registry.create_model_package(request())["ModelPackageArn"]
    registry.update_model_package(arn, APPROVED, "ok")
    reopened = LocalRegistry(registry.home)
    assert registry_path(registry.home).is_file()
    assert reopened.describe_model_package(arn)["ModelApprovalStatus"] == APPROVED
    assert len(reopened.history(arn)) == 2


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda r: r.update_model_package(f"{GROUP}/1", "approved"), "'approved' is not one of"),
        (lambda r: r.update_model_package(f"{GROUP}/7", APPROVED), f"no model package '{GROUP}/7'"),
        (lambda r: r.describe_model_package(package_arn(GROUP, 9)), "model-package/kennel-models/9"),
        (lambda r: r.describe_model_package("kennel-models"), "'group/version'"),
        (lambda r: r.history("other/1"), "no model package 'other/1'"),
        (lambda r: r.list_model_packages("nope"), "no model package group 'nope'"),
        (lambda r: r.list_model_packages(GROUP, "Pending"), "'Pending' is not one of"),
        (lambda r: r.create_model_package(request(group="bad_name!")), "'bad_name!' is not valid"),
        (lambda r: r.create_model_package(request(status="Maybe")), "'Maybe' is not one of"),
        (
            lambda r: r.create_model_package({**request(), "ModelApprovalStatus": {"Get": "Parameters.X"}}),
            "pipeline expression at ModelApprovalStatus",
        ),
        (
            lambda r: r.create_model_package({**request(), "InferenceSpecification": {"Containers": []}}),
            "no InferenceSpecification.Containers",
        ),
        (
            lambda r: r.create_model_package({**request(), "ModelPackageGroupName": ""}),
            "no ModelPackageGroupName",
        ),
        (lambda r: r.create_model_package(request(url="")), "ModelDataUrl is missing"),
        (lambda r: r.create_model_package_group(GROUP), "already exists"),
    ],
)
def test_bad_requests_end_in_one_clear_error(registry: LocalRegistry, call, expected: str) -> None:
    registry.create_model_package(request())
    with pytest.raises(RegistryError) as raised:
        call(registry)
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)


def test_unknown_packages_are_a_distinct_error(registry: LocalRegistry) -> None:
    registry.create_model_package(request())
    with pytest.raises(PackageNotFound):
        registry.update_model_package(f"{GROUP}/2", APPROVED)


def test_a_refused_write_leaves_nothing_behind(registry: LocalRegistry) -> None:
    registry.create_model_package(request())
    # Same ARN as the existing group once lower-cased: refused inside the transaction.
    with pytest.raises(RegistryError, match="differs only in letter case"):
        registry.create_model_package(request(group="Kennel-Models"))
    assert [g["ModelPackageGroupName"] for g in registry.list_model_package_groups()] == [GROUP]
    with pytest.raises(PackageNotFound):
        registry.list_model_packages("Kennel-Models")


# --- two processes at once ---------------------------------------------------------------------


def run_in_processes(
    home: Path, body: str, count: int = 2, **values: object
) -> list[subprocess.CompletedProcess]:
    """Start `count` Python processes that wait for a common start signal (a file), then run body."""
    go = home.parent / "go"
    script = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from local.registry import LocalRegistry
        go = Path(sys.argv[1])
        while not go.exists():
            time.sleep(0.005)
        registry = LocalRegistry(sys.argv[2])
        worker = int(sys.argv[3])
        """
    ) + textwrap.dedent(body).format(**values)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(go), str(home), str(worker)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker in range(count)
    ]
    go.touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def test_two_processes_registering_at_once_never_share_a_version(registry: LocalRegistry) -> None:
    registry.create_model_package(request())  # the schema exists; the race is about versions
    body = """
    for index in range({per_process}):
        registry.create_model_package({request!r})
    """
    results = run_in_processes(registry.home, body, per_process=40, request=request())
    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]

    packages = registry.list_model_packages(GROUP)
    assert [package["ModelPackageVersion"] for package in packages] == list(range(1, 82))
    assert len({package["ModelPackageArn"] for package in packages}) == 81
    assert all(len(registry.history(package["ModelPackageArn"])) == 1 for package in packages)


def test_two_processes_approving_and_rejecting_at_once_keep_a_consistent_history(
    registry: LocalRegistry,
) -> None:
    arn = registry.create_model_package(request())["ModelPackageArn"]
    # Each process flips the status 100 times; every flip reads the current status and writes a new one.
    body = """
    for index in range(100):
        status = ("Approved", "Rejected")[(index + worker) % 2]
        registry.update_model_package({arn!r}, status, f"worker {{worker}} step {{index}}")
    """
    results = run_in_processes(registry.home, body, arn=arn)
    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]

    history = registry.history(arn)
    # An unbroken chain: each change starts from the status the previous one left. A lost update
    # (two writers reading the same old status) would break it.
    for before, after in zip(history, history[1:], strict=False):
        assert after.from_status == before.to_status
        assert after.from_status != after.to_status
    assert registry.describe_model_package(arn)["ModelApprovalStatus"] == history[-1].to_status
