"""Approval and deployment on the local target: what `kennel approve / reject` and the local Deploy
step call.

One rule, the same as on AWS (entrypoints/deploy.py): an endpoint serves the newest Approved
package of its group, and never a package that is no longer Approved.

- `deploy_newest_approved`: serve that package (start the endpoint, swap its model, or nothing when
  it already serves it); with nothing approved it is a successful no-op that says so, unless the
  endpoint still serves a package of the group that is no longer Approved: then it stops (on AWS
  the endpoint is deleted).
- `approve`: mark a package Approved, then deploy at once.
- `reject`: mark a package Rejected; every endpoint serving it rolls back to the newest package that
  is still Approved, or stops when none is left.

The registry change is its own transaction; the deployment decision (which package is newest) is
made while holding the endpoint's lock, so two processes approving at once end with the endpoint
serving the newest approved package, started once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local import endpoints
from local.endpoints import LIVE_STATUSES, EndpointError
from local.registry import APPROVED, REJECTED, LocalRegistry, RegistryError

NOTHING_APPROVED, UNCHANGED, STOPPED = "nothing-approved", "unchanged", "stopped"


class DeploymentError(Exception):
    """The registry changed but the endpoint could not follow; the message says how to retry."""


# Errors a user can cause: the CLI prints their message (one line or a log tail) and exits non-zero.
USER_ERRORS = (RegistryError, EndpointError, DeploymentError)


@dataclass(frozen=True)
class DeploymentResult:
    """What happened to one endpoint: created, updated, up-to-date, nothing-approved, stopped or
    unchanged."""

    action: str
    message: str
    endpoint_name: str
    model_package_arn: str | None = None
    model_package_version: int | None = None
    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "Action": self.action,
            "Message": self.message,
            "EndpointName": self.endpoint_name,
            "ModelPackageArn": self.model_package_arn,
            "ModelPackageVersion": self.model_package_version,
            "Url": self.url,
        }


@dataclass(frozen=True)
class ApprovalResult:
    """An approval or rejection, and what it did to the endpoints."""

    model_package_arn: str
    model_package_version: int
    previous_status: str
    status: str
    deployments: list[DeploymentResult] = field(default_factory=list)

    @property
    def message(self) -> str:
        change = (
            f"was already {self.status}"
            if self.previous_status == self.status
            else f"was {self.previous_status}"
        )
        lines = [f"Model package version {self.model_package_version} is {self.status} ({change})."]
        lines += [deployment.message for deployment in self.deployments]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "ModelPackageArn": self.model_package_arn,
            "ModelPackageVersion": self.model_package_version,
            "PreviousApprovalStatus": self.previous_status,
            "ModelApprovalStatus": self.status,
            "Deployments": [deployment.to_json() for deployment in self.deployments],
        }


def deploy_newest_approved(home: Path, group: str, endpoint_name: str) -> DeploymentResult:
    """Serve the newest Approved package of `group` on `endpoint_name` (the local Deploy step)."""
    home = Path(home)
    with endpoints.endpoint_lock(home, endpoint_name):
        registry = LocalRegistry(home)
        package = registry.newest_approved(group)
        if package is None:
            served = _served_package(home, registry, endpoint_name)
            if served is not None and served["ModelPackageGroupName"] == group:
                return _stop(home, group, endpoint_name, served)
            return DeploymentResult(
                NOTHING_APPROVED,
                (
                    f"No Approved package in model package group {group!r} yet: nothing deployed. Approve one "
                    f"(kennel approve --latest) and it is deployed to {endpoint_name!r}."
                ),
                endpoint_name,
            )
        deployed = endpoints.start_or_update(home, endpoint_name, package)
        return _result(deployed, package)


def _served_package(home: Path, registry: LocalRegistry, endpoint_name: str) -> dict[str, Any] | None:
    """The registry's package that the live endpoint serves, or None (no endpoint, not live, or a
    package the registry does not hold)."""
    try:
        endpoint = endpoints.describe_endpoint(home, endpoint_name)
    except EndpointError:
        return None
    if endpoint.status not in LIVE_STATUSES or not endpoint.model_package_arn:
        return None
    try:
        return registry.describe_model_package(endpoint.model_package_arn)
    except RegistryError:
        return None


def approve(
    home: Path, group: str, version: int | str, reason: str = "", *, endpoint_name: str
) -> ApprovalResult:
    """Approve `version` (a number, or "latest": the highest registered) of `group`, then deploy the
    newest Approved package to `endpoint_name` at once."""
    home = Path(home)
    registry = LocalRegistry(home)
    package = registry.describe_model_package(package_name(registry, group, version))
    update = registry.update_model_package(package["ModelPackageArn"], APPROVED, reason)
    try:
        deployment = deploy_newest_approved(home, group, endpoint_name)
    except EndpointError as error:
        raise DeploymentError(_retry_message(package, error)) from None
    return ApprovalResult(
        package["ModelPackageArn"],
        package["ModelPackageVersion"],
        update["PreviousApprovalStatus"],
        APPROVED,
        [deployment],
    )


def reject(home: Path, group: str, version: int | str, reason: str = "") -> ApprovalResult:
    """Reject `version` (or "latest") of `group`. Endpoints serving it roll back to the newest
    package still Approved, or stop when there is none."""
    home = Path(home)
    registry = LocalRegistry(home)
    package = registry.describe_model_package(package_name(registry, group, version))
    arn = package["ModelPackageArn"]
    update = registry.update_model_package(arn, REJECTED, reason)
    deployments = []
    for endpoint in endpoints.list_endpoints(home):
        if endpoint.model_package_arn == arn and endpoint.status in LIVE_STATUSES:
            try:
                deployments.append(_roll_back(home, group, endpoint.name, package))
            except EndpointError as error:
                raise DeploymentError(
                    f"version {package['ModelPackageVersion']} is Rejected, but rolling back endpoint "
                    f"{endpoint.name!r} failed: {error}"
                ) from None
    return ApprovalResult(
        arn, package["ModelPackageVersion"], update["PreviousApprovalStatus"], REJECTED, deployments
    )


def package_name(registry: LocalRegistry, group: str, version: int | str) -> str:
    """'group/N' for a version number (int or digits) or "latest"."""
    if version == "latest":
        return f"{group}/{registry.latest_version(group)}"
    if isinstance(version, bool) or not (
        isinstance(version, int) or (isinstance(version, str) and version.isdigit())
    ):
        raise RegistryError(f"version {version!r}: give a version number (e.g. 3) or 'latest'")
    return f"{group}/{int(version)}"


def _roll_back(home: Path, group: str, endpoint_name: str, rejected: dict[str, Any]) -> DeploymentResult:
    with endpoints.endpoint_lock(home, endpoint_name):
        # Decided under the lock: another approval may have moved the endpoint on meanwhile.
        current = endpoints.describe_endpoint(home, endpoint_name)
        if current.model_package_arn != rejected["ModelPackageArn"] or current.status not in LIVE_STATUSES:
            return DeploymentResult(
                UNCHANGED,
                f"Endpoint {endpoint_name!r} no longer serves the rejected version.",
                endpoint_name,
                current.model_package_arn,
                current.model_package_version,
                current.url,
            )
        package = LocalRegistry(home).newest_approved(group)
        if package is None:
            return _stop(home, group, endpoint_name, rejected)
        deployed = endpoints.start_or_update(home, endpoint_name, package)
        result = _result(deployed, package)
        message = (
            f"Endpoint {endpoint_name!r} rolled back from version {rejected['ModelPackageVersion']} to version "
            f"{package['ModelPackageVersion']}, the newest Approved package, at {result.url}."
        )
        return DeploymentResult(
            deployed.action,
            message,
            endpoint_name,
            result.model_package_arn,
            result.model_package_version,
            result.url,
        )


def _stop(home: Path, group: str, endpoint_name: str, served: dict[str, Any]) -> DeploymentResult:
    """Stop an endpoint that serves a package no longer Approved, when none is left to serve."""
    endpoints.stop(home, endpoint_name)
    return DeploymentResult(
        STOPPED,
        (
            f"Endpoint {endpoint_name!r} stopped: it served version {served['ModelPackageVersion']}, and no "
            f"Approved package is left in group {group!r} to roll back to. Approve one to serve again."
        ),
        endpoint_name,
    )


def _result(deployed: endpoints.Deployed, package: dict[str, Any]) -> DeploymentResult:
    endpoint = deployed.endpoint
    version = package["ModelPackageVersion"]
    if deployed.action == "up-to-date":
        message = (
            f"Endpoint {endpoint.name!r} already serves version {version}, the newest Approved package, "
            f"at {endpoint.url}."
        )
    else:
        message = f"Endpoint {endpoint.name!r} {deployed.action}: serves version {version} at {endpoint.url}."
    return DeploymentResult(
        deployed.action, message, endpoint.name, package["ModelPackageArn"], version, endpoint.url
    )


def _retry_message(package: dict[str, Any], error: Exception) -> str:
    version = package["ModelPackageVersion"]
    return (
        f"version {version} is Approved, but deploying it failed: {error}\n"
        f"Fix the cause, then run `kennel approve --version {version}` again to retry the deployment."
    )
