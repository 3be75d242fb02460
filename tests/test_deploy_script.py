"""entrypoints/deploy.py: the newest Approved package on the endpoint, create or update, idempotent.

moto plays SageMaker where it can (registry, models, endpoint configs, create_endpoint); it has
no update_endpoint, so the update and replace paths run against botocore's Stubber, which
checks every request against the API's shape just the same.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from kennel_support import ACCOUNT, REGION, ROLE_ARN, aws_environment
from moto import mock_aws

import deploy

ENTRYPOINTS = Path(deploy.__file__).resolve().parent
GROUP, ENDPOINT = "dogs", "dogs-endpoint"
TARGET = deploy.Target(GROUP, ENDPOINT, "ml.m5.large", 1)
SPEC = {
    "Containers": [{"Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-cpu-py312",
                    "ModelDataUrl": "s3://bucket/model.tar.gz"}],
    "SupportedContentTypes": ["image/png"],
    "SupportedResponseMIMETypes": ["application/json"],
}


def no_sleep(seconds: float) -> None:
    return None


@pytest.fixture
def sagemaker(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("sagemaker", region_name=REGION)
        client.create_model_package_group(ModelPackageGroupName=GROUP)
        yield client


def register(client, *statuses: str) -> list[str]:
    return [client.create_model_package(ModelPackageGroupName=GROUP, InferenceSpecification=SPEC,
                                        ModelApprovalStatus=status)["ModelPackageArn"] for status in statuses]


def test_nothing_approved_is_a_clean_no_op_that_says_so(sagemaker, caplog):
    register(sagemaker, "PendingManualApproval", "Rejected")
    with caplog.at_level("INFO", logger="kennel.deploy"):
        plan = deploy.deploy(sagemaker, TARGET, ROLE_ARN, wait=True, sleep=no_sleep)
    assert plan.action == deploy.NOTHING_APPROVED
    assert f"No Approved package in model package group {GROUP!r}" in caplog.text
    assert sagemaker.list_endpoints()["Endpoints"] == []
    assert sagemaker.list_models()["Models"] == []


def test_creates_the_endpoint_with_the_newest_approved_package(sagemaker):
    arns = register(sagemaker, "Approved", "PendingManualApproval", "Approved", "Rejected")
    plan = deploy.deploy(sagemaker, TARGET, ROLE_ARN, wait=True, poll=0, sleep=no_sleep)
    assert (plan.action, plan.version, plan.package_arn) == (deploy.CREATE, 3, arns[2])
    endpoint = sagemaker.describe_endpoint(EndpointName=ENDPOINT)
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["EndpointConfigName"] == plan.endpoint_config_name
    config = sagemaker.describe_endpoint_config(EndpointConfigName=plan.endpoint_config_name)
    (variant,) = config["ProductionVariants"]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == (
        f"{GROUP}-v3", "ml.m5.large", 1)
    model = sagemaker.describe_model(ModelName=f"{GROUP}-v3")
    assert model["ExecutionRoleArn"] == ROLE_ARN
    assert model["Containers"][0]["ModelPackageName"] == arns[2]


def test_deploying_the_same_version_again_changes_nothing(sagemaker):
    register(sagemaker, "Approved")
    first = deploy.deploy(sagemaker, TARGET, ROLE_ARN, wait=True, sleep=no_sleep)
    before = (sagemaker.list_models()["Models"], sagemaker.list_endpoint_configs()["EndpointConfigs"])
    second = deploy.deploy(sagemaker, TARGET, ROLE_ARN, wait=True, sleep=no_sleep)
    assert (first.action, second.action) == (deploy.CREATE, deploy.UP_TO_DATE)
    assert second.endpoint_config_name == first.endpoint_config_name
    after = (sagemaker.list_models()["Models"], sagemaker.list_endpoint_configs()["EndpointConfigs"])
    assert [len(items) for items in after] == [len(items) for items in before] == [1, 1]


def test_rejecting_the_only_approved_package_that_serves_deletes_the_endpoint(sagemaker, caplog):
    (arn,) = register(sagemaker, "Approved")
    assert deploy.deploy(sagemaker, TARGET, ROLE_ARN, wait=True, sleep=no_sleep).action == deploy.CREATE
    sagemaker.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Rejected",
                                   ApprovalDescription="mislabels sneakers")
    with caplog.at_level("INFO", logger="kennel.deploy"):
        plan = deploy.deploy(sagemaker, TARGET, ROLE_ARN, wait=True, poll=0, sleep=no_sleep)
    assert (plan.action, plan.version, plan.package_arn) == (deploy.DELETE, 1, arn)
    assert f"Endpoint {ENDPOINT!r} serves version 1, which is Rejected now" in caplog.text
    assert "deleting the endpoint" in caplog.text and f"Endpoint {ENDPOINT} deleted" in caplog.text
    assert sagemaker.list_endpoints()["Endpoints"] == []
    # The model and its config stay: approving again only creates the endpoint.
    assert [m["ModelName"] for m in sagemaker.list_models()["Models"]] == [f"{GROUP}-v1"]
    again = deploy.deploy(sagemaker, TARGET, ROLE_ARN, wait=True, sleep=no_sleep)
    assert again.action == deploy.NOTHING_APPROVED  # nothing serves now, so there is nothing to delete


def test_an_endpoint_serving_something_else_is_left_alone(sagemaker):
    register(sagemaker, "Rejected")
    sagemaker.create_model(ModelName="hand-made", ExecutionRoleArn=ROLE_ARN,
                           PrimaryContainer={"Image": SPEC["Containers"][0]["Image"],
                                             "ModelDataUrl": "s3://bucket/model.tar.gz"})
    sagemaker.create_endpoint_config(EndpointConfigName="hand-made", ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": "hand-made", "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName=ENDPOINT, EndpointConfigName="hand-made")
    plan = deploy.deploy(sagemaker, TARGET, ROLE_ARN, wait=True, sleep=no_sleep)
    assert plan.action == deploy.NOTHING_APPROVED
    assert sagemaker.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"] == "hand-made"


def test_names_follow_the_version_and_the_serving_shape():
    model, config = deploy.resource_names(TARGET, 7)
    assert deploy.resource_names(TARGET, 7) == (model, config)
    bigger = deploy.Target(GROUP, ENDPOINT, "ml.c5.xlarge", 2)
    assert deploy.resource_names(bigger, 7)[0] == model
    assert deploy.resource_names(bigger, 7)[1] != config
    assert deploy.resource_names(TARGET, 8) != (model, config)
    long = deploy.Target("g" * 63, "e" * 63, "ml.m5.large", 1)
    assert all(len(name) <= 63 for name in deploy.resource_names(long, 12345))


def test_creating_a_model_without_a_role_is_refused_clearly(sagemaker):
    register(sagemaker, "Approved")
    with pytest.raises(deploy.DeployError, match="--execution-role-arn"):
        deploy.deploy(sagemaker, TARGET, "", wait=False)


# --- update and replace, against Stubber ----------------------------------------------------------
def not_found(stubber: Stubber, method: str, what: str) -> None:
    stubber.add_client_error(method, "ValidationException", f'Could not find {what} "arn:aws:sagemaker:x".')


def endpoint_response(status: str, config_name: str, reason: str = "") -> dict:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    response = {"EndpointName": ENDPOINT, "EndpointArn": f"arn:aws:sagemaker:{REGION}:123456789012:endpoint/x",
                "EndpointConfigName": config_name, "EndpointStatus": status, "CreationTime": now,
                "LastModifiedTime": now}
    if reason:
        response["FailureReason"] = reason
    return response


def approved_pages(stubber: Stubber, versions: list[list[int]]) -> None:
    """list_model_packages answered in pages, one page per list of versions."""
    for index, page in enumerate(versions):
        response = {"ModelPackageSummaryList": [{
            "ModelPackageGroupName": GROUP, "ModelPackageVersion": v,
            "ModelPackageArn": f"arn:aws:sagemaker:{REGION}:123456789012:model-package/{GROUP}/{v}",
            "CreationTime": datetime.datetime(2026, 1, v, tzinfo=datetime.UTC),
            "ModelPackageStatus": "Completed", "ModelApprovalStatus": "Approved"} for v in page]}
        expected = {"ModelPackageGroupName": GROUP, "ModelApprovalStatus": "Approved", "MaxResults": 100}
        if index:
            expected["NextToken"] = f"page-{index}"
        if index < len(versions) - 1:
            response["NextToken"] = f"page-{index + 1}"
        stubber.add_response("list_model_packages", response, expected)


def expect_new_model_and_config(stubber: Stubber, version: int) -> tuple[str, str]:
    model, config = deploy.resource_names(TARGET, version)
    not_found(stubber, "describe_model", "model")
    stubber.add_response("create_model", {"ModelArn": f"arn:aws:sagemaker:{REGION}:123456789012:model/{model}"}, {
        "ModelName": model, "ExecutionRoleArn": ROLE_ARN,
        "Containers": [{"ModelPackageName": f"arn:aws:sagemaker:{REGION}:123456789012:model-package/{GROUP}/{version}"}]})
    not_found(stubber, "describe_endpoint_config", "endpoint configuration")
    stubber.add_response("create_endpoint_config", {"EndpointConfigArn": f"arn:aws:sagemaker:{REGION}:1:x/{config}"}, {
        "EndpointConfigName": config, "ProductionVariants": [{
            "VariantName": "AllTraffic", "ModelName": model, "InstanceType": "ml.m5.large",
            "InitialInstanceCount": 1, "InitialVariantWeight": 1.0}]})
    return model, config


@pytest.fixture
def stubbed():
    client = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="y")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def update_scenario(client, stubber: Stubber) -> deploy.Plan:
    """Version 2 serves; version 4 (on the second page of the listing) is the newest Approved."""
    old_config = deploy.resource_names(TARGET, 2)[1]
    stubber.add_response("describe_endpoint", endpoint_response("InService", old_config))  # not busy
    approved_pages(stubber, [[1, 2], [4, 3]])  # the newest is on the second page
    stubber.add_response("describe_endpoint", endpoint_response("InService", old_config), {"EndpointName": ENDPOINT})
    _, config = expect_new_model_and_config(stubber, 4)
    stubber.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/x"},
                         {"EndpointName": ENDPOINT, "EndpointConfigName": config})
    stubber.add_response("describe_endpoint", endpoint_response("Updating", config))
    stubber.add_response("describe_endpoint", endpoint_response("InService", config))
    return deploy.deploy(client, TARGET, ROLE_ARN, wait=True, poll=0, sleep=no_sleep)


def replace_scenario(client, stubber: Stubber) -> deploy.Plan:
    """The endpoint is Failed: SageMaker cannot update it, so it is deleted and created."""
    stubber.add_response("describe_endpoint", endpoint_response("Failed", "older", "capacity"))  # not busy
    approved_pages(stubber, [[1]])
    stubber.add_response("describe_endpoint", endpoint_response("Failed", "older", "capacity"))
    _, config = expect_new_model_and_config(stubber, 1)
    stubber.add_response("delete_endpoint", {}, {"EndpointName": ENDPOINT})
    not_found(stubber, "describe_endpoint", "endpoint")
    stubber.add_response("create_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/x"},
                         {"EndpointName": ENDPOINT, "EndpointConfigName": config})
    stubber.add_response("describe_endpoint", endpoint_response("InService", config))
    return deploy.deploy(client, TARGET, ROLE_ARN, wait=True, poll=0, sleep=no_sleep)


def rollback_scenario(client, stubber: Stubber) -> deploy.Plan:
    """Version 4 serves and was rejected: the newest Approved is now version 2, whose model and
    endpoint config exist from when it served, so the endpoint is updated back to that config."""
    serving = deploy.resource_names(TARGET, 4)[1]
    model, older = deploy.resource_names(TARGET, 2)
    stubber.add_response("describe_endpoint", endpoint_response("InService", serving))  # not busy
    approved_pages(stubber, [[1, 2]])  # 4 is Rejected: no longer listed as Approved
    stubber.add_response("describe_endpoint", endpoint_response("InService", serving), {"EndpointName": ENDPOINT})
    stubber.add_response("describe_model", {
        "ModelName": model, "ExecutionRoleArn": ROLE_ARN, "CreationTime": datetime.datetime(2026, 1, 2),
        "ModelArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model/{model}"}, {"ModelName": model})
    stubber.add_response("describe_endpoint_config", {
        "EndpointConfigName": older, "EndpointConfigArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint-config/{older}",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": model}],
        "CreationTime": datetime.datetime(2026, 1, 2)}, {"EndpointConfigName": older})
    stubber.add_response("update_endpoint", {"EndpointArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/x"},
                         {"EndpointName": ENDPOINT, "EndpointConfigName": older})
    stubber.add_response("describe_endpoint", endpoint_response("Updating", older))
    stubber.add_response("describe_endpoint", endpoint_response("InService", older))
    return deploy.deploy(client, TARGET, ROLE_ARN, wait=True, poll=0, sleep=no_sleep)


def test_rejecting_the_version_that_serves_rolls_the_endpoint_back_to_the_previous_approved(stubbed):
    """No new model or config is created: the endpoint moves back to version 2's existing config."""
    plan = rollback_scenario(*stubbed)
    assert (plan.action, plan.version) == (deploy.UPDATE, 2)
    assert plan.endpoint_config_name == deploy.resource_names(TARGET, 2)[1]
    assert plan.package_arn.endswith(f"/{GROUP}/2")


def test_a_newer_approved_version_updates_the_endpoint_and_waits_for_in_service(stubbed):
    plan = update_scenario(*stubbed)
    assert (plan.action, plan.version) == (deploy.UPDATE, 4)


def test_a_failed_endpoint_is_deleted_and_created_again(stubbed):
    assert replace_scenario(*stubbed).action == deploy.REPLACE


def test_a_deploy_already_in_progress_is_waited_for_not_fought(stubbed):
    client, stubber = stubbed
    config = deploy.resource_names(TARGET, 5)[1]
    stubber.add_response("describe_endpoint", endpoint_response("Updating", config))
    stubber.add_response("describe_endpoint", endpoint_response("InService", config))
    approved_pages(stubber, [[5]])
    stubber.add_response("describe_endpoint", endpoint_response("InService", config))
    stubber.add_response("describe_endpoint", endpoint_response("InService", config))
    plan = deploy.deploy(client, TARGET, ROLE_ARN, wait=True, poll=0, sleep=no_sleep)
    assert plan.action == deploy.UP_TO_DATE


def test_waiting_reports_why_the_endpoint_failed(stubbed):
    client, stubber = stubbed
    stubber.add_response("describe_endpoint", endpoint_response("Creating", "c"))
    stubber.add_response("describe_endpoint", endpoint_response("Failed", "c", "model did not load: no code/"))
    with pytest.raises(deploy.DeployError, match="model did not load: no code/"):
        deploy.wait_until_stable(client, ENDPOINT, timeout=60, poll=0, sleep=no_sleep)


def test_other_aws_errors_are_not_mistaken_for_not_found(stubbed):
    client, stubber = stubbed
    stubber.add_client_error("describe_endpoint", "AccessDeniedException", "not allowed")
    with pytest.raises(ClientError, match="not allowed"):
        deploy.describe_endpoint(client, ENDPOINT)


RESOURCE_MEMBERS = {"Endpoint": "EndpointName", "EndpointConfig": "EndpointConfigName", "Model": "ModelName"}
RESOURCE_KINDS = {"EndpointName": "endpoint", "EndpointConfigName": "endpoint-config", "ModelName": "model"}


class RecordedCalls:
    """Every SageMaker call a client makes, as (IAM action, resource ARN) the way IAM authorizes it."""

    def __init__(self, *clients):
        self.calls: set[tuple[str, str]] = set()
        for client in clients:
            client.meta.events.register("provide-client-params.sagemaker", self.record)

    def record(self, params, model, **kwargs):
        # The member naming each call's resource (None: the action takes no resource, "*").
        # A call missing here fails the test: map it before deploy.py makes it.
        member = {"ListModelPackages": None, "DescribeModelPackage": "ModelPackageName"}.get(
            model.name, RESOURCE_MEMBERS.get(model.name.removeprefix("Create").removeprefix("Describe")
                                            .removeprefix("Update").removeprefix("Delete"), "unmapped"))
        if member is None:
            self.calls.add((f"sagemaker:{model.name}", "*"))
        elif member == "ModelPackageName":
            self.calls.add((f"sagemaker:{model.name}", params[member].lower()))  # already an ARN
        else:
            assert member in RESOURCE_KINDS, f"deploy.py calls {model.name}: say which resource it acts on"
            kind, name = RESOURCE_KINDS[member], params[member].lower()  # ARNs hold names in lowercase
            self.calls.add((f"sagemaker:{model.name}", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:{kind}/{name}"))
        if model.name == "CreateModel":
            self.calls.add(("iam:PassRole", params["ExecutionRoleArn"]))

    @property
    def actions(self) -> set[str]:
        return {action.split(":", 1)[1] for action, _ in self.calls if action.startswith("sagemaker:")}


def allowed(policy: dict, action: str, resource: str) -> bool:
    """Whether an Allow statement of `policy` names `action` and `resource` (IAM wildcards * and ?)."""
    from fnmatch import fnmatchcase

    def listed(value):
        return [value] if isinstance(value, str) else value

    return any(statement["Effect"] == "Allow"
               and any(fnmatchcase(action, pattern) for pattern in listed(statement["Action"]))
               and any(fnmatchcase(resource, pattern) for pattern in listed(statement["Resource"]))
               for statement in policy["Statement"])


def rendered_policy() -> dict:
    """The policy `kennel policy` prints for a configuration serving GROUP on ENDPOINT."""
    from kennel_support import repo_config

    from pipeline.policy import render_execution_role_policy

    return render_execution_role_policy(repo_config(model_package_group=GROUP, endpoint_name=ENDPOINT,
                                                    role_arn=ROLE_ARN, region=REGION))


def test_the_execution_role_policy_allows_every_call_deploy_makes(sagemaker, stubbed):
    """Each call deploy.py makes (create, update, roll back, replace, delete), action and resource,
    is allowed by the rendered policy: also on an endpoint whose name the EndpointName parameter
    overrode for one run (ENDPOINT-blue), which the policy allows by prefix."""
    client, stubber = stubbed
    (arn,) = register(sagemaker, "Approved")  # the pipeline's Register step, not deploy.py
    recorded = RecordedCalls(sagemaker, client)
    blue = deploy.Target(GROUP, f"{ENDPOINT}-blue", "ml.m5.large", 1)
    for target in (TARGET, blue):
        assert deploy.deploy(sagemaker, target, ROLE_ARN, wait=True, sleep=no_sleep).action == deploy.CREATE
    person = boto3.client("sagemaker", region_name=REGION)  # the rejection is a person's call, not deploy's
    person.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Rejected")
    for target in (TARGET, blue):
        assert deploy.deploy(sagemaker, target, ROLE_ARN, wait=True, sleep=no_sleep).action == deploy.DELETE
    replace_scenario(client, stubber)
    update_scenario(client, stubber)
    rollback_scenario(client, stubber)
    assert {"CreateModel", "CreateEndpointConfig", "CreateEndpoint", "UpdateEndpoint", "DeleteEndpoint",
            "DescribeEndpointConfig", "DescribeModel", "DescribeModelPackage", "ListModelPackages"} <= recorded.actions
    assert ("sagemaker:CreateEndpoint", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{ENDPOINT}-blue") in recorded.calls
    policy = rendered_policy()
    assert [call for call in sorted(recorded.calls) if not allowed(policy, *call)] == []


def test_the_policy_does_not_allow_endpoints_outside_the_configured_name():
    policy = rendered_policy()
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
    assert allowed(policy, "sagemaker:UpdateEndpoint", f"{arn}:endpoint/{ENDPOINT}")
    assert not allowed(policy, "sagemaker:UpdateEndpoint", f"{arn}:endpoint/someone-elses-endpoint")
    assert not allowed(policy, "sagemaker:CreateEndpointConfig", f"{arn}:endpoint-config/other-v1-0123abcd")
    assert not allowed(policy, "sagemaker:DeleteEndpoint", f"arn:aws:sagemaker:{REGION}:999999999999:endpoint/{ENDPOINT}")


# --- the script as a process ------------------------------------------------------------------------
def run_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRYPOINTS / "deploy.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_script_deploys_and_says_when_nothing_is_approved(aws_env, tmp_path):
    env = {**os.environ, **aws_environment(aws_env)}
    arguments = ("--model-package-group", GROUP, "--endpoint-name", ENDPOINT, "--execution-role-arn", ROLE_ARN,
                 "--poll", "0")
    client = boto3.client("sagemaker", region_name=REGION)
    client.create_model_package_group(ModelPackageGroupName=GROUP)
    register(client, "PendingManualApproval")
    nothing = run_script(*arguments, env=env)
    assert nothing.returncode == 0, nothing.stderr
    assert "No Approved package" in nothing.stdout
    (approved,) = register(client, "Approved")
    done = run_script(*arguments, env=env)
    assert done.returncode == 0, done.stderr
    assert client.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"].startswith(f"{ENDPOINT}-v2-")
    client.update_model_package(ModelPackageArn=approved, ModelApprovalStatus="Rejected")
    deleted = run_script(*arguments, env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert "which is Rejected now" in deleted.stdout and "deleting the endpoint" in deleted.stdout
    assert client.list_endpoints()["Endpoints"] == []


def test_bad_arguments_end_in_one_line_and_the_job_message(tmp_path):
    (tmp_path / "output").mkdir()
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path)}
    result = run_script("--model-package-group", GROUP, "--endpoint-name", ENDPOINT, "--instance-count", "0",
                        "--region", REGION, env=env)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "--instance-count must be at least 1" in lines[0]
    assert "Traceback" not in result.stderr
    assert "--instance-count" in (tmp_path / "output" / "message").read_text()
