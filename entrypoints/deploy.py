"""Serve the newest Approved model package of a group on a real-time endpoint.

Runs as the pipeline's Deploy step (a processing job), from the approval event's one-step
pipeline, or by hand. It finds the newest package whose status is Approved, creates a Model and
an EndpointConfig named after the package version (so deploying the same version twice changes
nothing), then creates the endpoint or updates it, and waits until it is InService.

When the group has no Approved package yet it says so and exits 0: the package a pipeline
execution registers usually waits for a person's approval, and that is not a failure. When none
is left because the package the endpoint serves was rejected (or set back to pending), the
endpoint is deleted and the script says so: an endpoint never keeps serving a model that is not
Approved, as on the local target, whose endpoint stops then. Its model and endpoint config stay,
so approving a package again deploys quickly.

The decisions (which package, create / update / nothing to do) are pure functions of a SageMaker
client, so any object with the same methods (boto3's client, a local registry) can be used.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import contract

log = logging.getLogger("kennel.deploy")

VARIANT_NAME = "AllTraffic"
NAME_LIMIT = 63  # SageMaker model / endpoint-config / endpoint names
# Stable: nothing is changing. UpdateRollbackFailed serves a mix of configs until the next update.
STABLE_STATES = ("InService", "Failed", "OutOfService", "UpdateRollbackFailed")
BUSY_STATES = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")

NOTHING_APPROVED = "nothing-approved"
CREATE = "create"
UPDATE = "update"
UP_TO_DATE = "up-to-date"
REPLACE = "replace"  # the endpoint is Failed: SageMaker cannot update it, only delete and create
DELETE = "delete"  # it serves a package that is no longer Approved, and no Approved one is left


class DeployError(Exception):
    """Deployment cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    """Where and how to serve."""

    model_package_group: str
    endpoint_name: str
    instance_type: str
    instance_count: int


@dataclass(frozen=True)
class Plan:
    """What `apply_plan` will do, decided from the registry and the endpoint's current state."""

    action: str
    message: str
    package_arn: str = ""
    version: int = 0
    model_name: str = ""
    endpoint_config_name: str = ""


def newest_approved_package(client: Any, group: str) -> dict[str, Any] | None:
    """The Approved package of `group` with the highest version, or None."""
    newest: dict[str, Any] | None = None
    kwargs = {"ModelPackageGroupName": group, "ModelApprovalStatus": "Approved", "MaxResults": 100}
    while True:
        page = client.list_model_packages(**kwargs)
        for package in page.get("ModelPackageSummaryList", []):
            if newest is None or package_version(package) > package_version(newest):
                newest = package
        if not page.get("NextToken"):
            return newest
        kwargs["NextToken"] = page["NextToken"]


def package_version(package: dict[str, Any]) -> int:
    if "ModelPackageVersion" in package:
        return int(package["ModelPackageVersion"])
    # Versioned package ARNs end in /<group>/<version>.
    return int(str(package["ModelPackageArn"]).rsplit("/", 1)[-1])


def resource_names(target: Target, version: int) -> tuple[str, str]:
    """Model and endpoint-config names for this package version and serving shape.

    The model depends only on the package; the endpoint config also on instance type and count
    (configs cannot change, so a new shape needs a new name).
    """
    model = _bounded(f"{target.model_package_group}-v{version}")
    shape = hashlib.sha256(f"{target.instance_type}:{target.instance_count}".encode()).hexdigest()[:8]
    config = _bounded(f"{target.endpoint_name}-v{version}", suffix=f"-{shape}")
    return model, config


def _bounded(name: str, suffix: str = "") -> str:
    return name[: NAME_LIMIT - len(suffix)].rstrip("-") + suffix


def describe_endpoint(client: Any, name: str) -> dict[str, Any] | None:
    """The endpoint's description, or None when it does not exist."""
    try:
        return client.describe_endpoint(EndpointName=name)
    except Exception as error:  # botocore ClientError; a local registry raises the same
        if _is_not_found(error):
            return None
        raise


def _is_not_found(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    details = response.get("Error", {})
    return details.get("Code") in ("ValidationException", "ResourceNotFound") and (
        "could not find" in str(details.get("Message", "")).lower()
    )


def served_package(client: Any, endpoint: dict[str, Any]) -> dict[str, Any] | None:
    """DescribeModelPackage of the package the endpoint serves (through its endpoint config and
    model), or None when it serves no model package or those resources are gone."""
    try:
        config = client.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
        variants = config.get("ProductionVariants") or []
        if not variants:
            return None
        model = client.describe_model(ModelName=variants[0]["ModelName"])
        containers = model.get("Containers") or [model.get("PrimaryContainer") or {}]
        arn = next((c["ModelPackageName"] for c in containers if c.get("ModelPackageName")), None)
        return client.describe_model_package(ModelPackageName=arn) if arn else None
    except Exception as error:  # botocore ClientError
        if _is_not_found(error):
            return None
        raise


def plan_deployment(client: Any, target: Target) -> Plan:
    """Decide: nothing approved, delete an endpoint left serving a package that is no longer
    Approved, create, update, replace a failed endpoint, or already serving it."""
    package = newest_approved_package(client, target.model_package_group)
    if package is None:
        return _plan_without_approved(client, target)
    version = package_version(package)
    model, config = resource_names(target, version)
    found = dict(package_arn=package["ModelPackageArn"], version=version, model_name=model,
                 endpoint_config_name=config)
    endpoint = describe_endpoint(client, target.endpoint_name)
    if endpoint is None:
        return Plan(CREATE, f"Creating endpoint {target.endpoint_name!r} with package version {version}", **found)
    status = endpoint.get("EndpointStatus", "")
    if status == "Failed":
        return Plan(REPLACE, f"Endpoint {target.endpoint_name!r} is Failed; recreating it with version {version}",
                    **found)
    if endpoint.get("EndpointConfigName") == config:
        return Plan(UP_TO_DATE, f"Endpoint {target.endpoint_name!r} already serves version {version}", **found)
    return Plan(UPDATE, f"Updating endpoint {target.endpoint_name!r} to package version {version}", **found)


def _plan_without_approved(client: Any, target: Target) -> Plan:
    group, name = target.model_package_group, target.endpoint_name
    endpoint = describe_endpoint(client, name)
    served = served_package(client, endpoint) if endpoint is not None else None
    no_longer_approved = (served is not None and served.get("ModelPackageGroupName") == group
                          and served.get("ModelApprovalStatus") != "Approved")
    if no_longer_approved:
        version = package_version(served)
        return Plan(DELETE, (
            f"Endpoint {name!r} serves version {version}, which is {served.get('ModelApprovalStatus')} now, and no "
            f"Approved package is left in model package group {group!r} to roll back to: deleting the endpoint. "
            f"Approve a package (kennel approve --version N) to serve again."
        ), package_arn=served["ModelPackageArn"], version=version)
    return Plan(NOTHING_APPROVED, (
        f"No Approved package in model package group {group!r} yet: nothing deployed. Approve one "
        f"(kennel approve --latest) and it is deployed to {name!r}."
    ))


def ensure_model(client: Any, plan: Plan, role_arn: str) -> None:
    if _exists(client.describe_model, ModelName=plan.model_name):
        return
    if not role_arn:
        raise DeployError("creating a model needs the execution role: pass --execution-role-arn or set "
                          "KENNEL_ROLE_ARN")
    client.create_model(
        ModelName=plan.model_name,
        ExecutionRoleArn=role_arn,
        Containers=[{"ModelPackageName": plan.package_arn}],
    )


def ensure_endpoint_config(client: Any, plan: Plan, target: Target) -> None:
    if _exists(client.describe_endpoint_config, EndpointConfigName=plan.endpoint_config_name):
        return
    client.create_endpoint_config(
        EndpointConfigName=plan.endpoint_config_name,
        ProductionVariants=[{
            "VariantName": VARIANT_NAME,
            "ModelName": plan.model_name,
            "InstanceType": target.instance_type,
            "InitialInstanceCount": target.instance_count,
            "InitialVariantWeight": 1.0,
        }],
    )


def _exists(describe: Callable[..., Any], **kwargs: Any) -> bool:
    try:
        describe(**kwargs)
    except Exception as error:
        if _is_not_found(error):
            return False
        raise
    return True


def apply_plan(client: Any, plan: Plan, target: Target, role_arn: str,
               sleep: Callable[[float], None] = time.sleep) -> None:
    """Carry out `plan`: create what is missing, then create, update or replace the endpoint."""
    if plan.action in (NOTHING_APPROVED, UP_TO_DATE):
        return
    if plan.action == DELETE:
        client.delete_endpoint(EndpointName=target.endpoint_name)
        return
    ensure_model(client, plan, role_arn)
    ensure_endpoint_config(client, plan, target)
    if plan.action == UPDATE:
        client.update_endpoint(EndpointName=target.endpoint_name, EndpointConfigName=plan.endpoint_config_name)
        return
    if plan.action == REPLACE:
        client.delete_endpoint(EndpointName=target.endpoint_name)
        wait_deleted(client, target.endpoint_name, sleep=sleep)
    client.create_endpoint(EndpointName=target.endpoint_name, EndpointConfigName=plan.endpoint_config_name)


def wait_until_stable(client: Any, name: str, timeout: float, poll: float,
                      sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll until the endpoint leaves its busy states; only InService is success."""
    deadline = time.monotonic() + timeout
    while True:
        endpoint = describe_endpoint(client, name)
        if endpoint is None:
            raise DeployError(f"endpoint {name!r} disappeared while waiting for it")
        status = endpoint.get("EndpointStatus", "")
        if status == "InService":
            return endpoint
        if status in STABLE_STATES:
            reason = endpoint.get("FailureReason", "no reason given")
            raise DeployError(f"endpoint {name!r} is {status}: {reason}")
        if time.monotonic() >= deadline:
            raise DeployError(f"endpoint {name!r} still {status} after {timeout:.0f}s; check the SageMaker console")
        log.info("Endpoint %s is %s; waiting", name, status)
        sleep(poll)


def wait_while_busy(client: Any, name: str, timeout: float, poll: float,
                    sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once the endpoint is absent or in a state that can be changed (or judged)."""
    deadline = time.monotonic() + timeout
    while (endpoint := describe_endpoint(client, name)) is not None:
        status = endpoint.get("EndpointStatus", "")
        if status not in BUSY_STATES:
            return
        if time.monotonic() >= deadline:
            raise DeployError(f"endpoint {name!r} is still {status} after {timeout:.0f}s; try again later")
        log.info("Endpoint %s is %s; waiting before deploying", name, status)
        sleep(poll)


def wait_deleted(client: Any, name: str, timeout: float = 1800, poll: float = 15,
                 sleep: Callable[[float], None] = time.sleep) -> None:
    deadline = time.monotonic() + timeout
    while describe_endpoint(client, name) is not None:
        if time.monotonic() >= deadline:
            raise DeployError(f"endpoint {name!r} was not deleted within {timeout:.0f}s")
        sleep(poll)


def deploy(client: Any, target: Target, role_arn: str, wait: bool, timeout: float = 3600,
           poll: float = 30, sleep: Callable[[float], None] = time.sleep) -> Plan:
    """Plan, apply, and (when asked) wait for InService. Returns the plan that was carried out.

    An endpoint already being changed (say, by the approval event's deploy racing the pipeline's)
    is waited for first, so the plan is made against where that change ends.
    """
    wait_while_busy(client, target.endpoint_name, timeout, poll, sleep)
    plan = plan_deployment(client, target)
    log.info("%s", plan.message)
    apply_plan(client, plan, target, role_arn, sleep)
    if plan.action == NOTHING_APPROVED:
        return plan
    if plan.action == DELETE:
        if wait:
            wait_deleted(client, target.endpoint_name, timeout, poll, sleep)
        log.info("Endpoint %s %s", target.endpoint_name, "deleted" if wait else "is being deleted")
        return plan
    if wait:
        # Also for UP_TO_DATE: the endpoint may still be updating to this very config.
        wait_until_stable(client, target.endpoint_name, timeout, poll, sleep)
        log.info("Endpoint %s serves package version %d and is InService", target.endpoint_name, plan.version)
    else:
        log.info("Endpoint %s: %s requested; not waiting for InService", target.endpoint_name, plan.action)
    return plan


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-package-group", required=True)
    parser.add_argument("--endpoint-name", required=True)
    parser.add_argument("--instance-type", default="ml.m5.large")
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument("--execution-role-arn", default=os.environ.get("KENNEL_ROLE_ARN", ""),
                        help="role the endpoint's model runs with (default: $KENNEL_ROLE_ARN)")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="wait until the endpoint is InService (default: wait)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default: %(default)s)")
    parser.add_argument("--poll", type=float, default=30, help="seconds between checks (default: %(default)s)")
    return parser


def write_exit_message(message: str) -> None:
    """SageMaker shows /opt/ml/output/message as the job's failure reason (when that folder exists)."""
    path = Path(contract.opt_ml("output", "message"))
    if path.parent.is_dir():
        path.write_text(message + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = get_args_parser().parse_args(argv)
    if args.instance_count < 1:
        return _fail(f"--instance-count must be at least 1, got {args.instance_count}")
    if not args.region:
        return _fail("no AWS region: pass --region or set AWS_REGION")
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    target = Target(args.model_package_group, args.endpoint_name, args.instance_type, args.instance_count)
    try:
        client = boto3.client("sagemaker", region_name=args.region)
        deploy(client, target, args.execution_role_arn, args.wait, args.timeout, args.poll)
    except DeployError as error:
        return _fail(str(error))
    except (BotoCoreError, ClientError) as error:
        return _fail(f"AWS refused the deployment: {error}")
    return 0


def _fail(message: str) -> int:
    log.error("deploy: %s", message)
    write_exit_message(message)
    return 1


if __name__ == "__main__":
    sys.exit(main())
