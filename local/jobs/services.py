"""Steps that call SageMaker's control plane instead of running a job: register and deploy.

Locally their service is Kennel's own: the registry (`local.registry`) and the endpoints
(`local.deployment`), the same code `kennel approve` uses, so a package registered by a run and
approved from the CLI behaves as it would on SageMaker.

- RegisterModel (CreateModelPackage): the resolved request goes into the local registry.
- Deploy: a Processing step marked `KENNEL_STEP_ROLE=deploy` whose script (entrypoints/deploy.py)
  deploys the newest Approved package of a group with boto3; here the same decision is made
  against the local registry and the local endpoint is started or updated instead.
"""

from __future__ import annotations

from pathlib import Path

from local.handlers import CLIENT_ERROR, SERVICE_FAULT, StepContext, StepResult
from local.state import execution_arn


class RegisterModelHandler:
    def __init__(self, home: Path) -> None:
        self.home = Path(home)

    def run(self, step: dict, arguments: dict, context: StepContext) -> StepResult:
        from local.registry import LocalRegistry, RegistryError

        registry = LocalRegistry(self.home)
        try:
            created = registry.create_model_package(
                arguments, execution_arn=execution_arn(context.pipeline_name, context.execution_id)
            )
            package = registry.describe_model_package(created["ModelPackageArn"])
        except RegistryError as error:
            return StepResult.failed(f"registering the model: {error}", failure_type(error))
        status = package["ModelApprovalStatus"]
        context.progress.step_line(
            step["Name"], f"registered {package['ModelPackageGroupName']} version "
            f"{package['ModelPackageVersion']} as {status}"
        )
        properties = {
            "ModelPackageArn": package["ModelPackageArn"],
            "ModelPackageGroupName": package["ModelPackageGroupName"],
            "ModelPackageVersion": package["ModelPackageVersion"],
            "ModelApprovalStatus": status,
            "ModelPackageStatus": "Completed",
        }
        return StepResult.succeeded(properties)


class DeployHandler:
    """The Deploy step, read from deploy.py's own arguments (--model-package-group, --endpoint-name)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)

    def run(self, step: dict, arguments: dict, context: StepContext) -> StepResult:
        from local.deployment import USER_ERRORS, deploy_newest_approved

        options = _options(arguments.get("AppSpecification", {}).get("ContainerArguments") or [])
        missing = [flag for flag in ("--model-package-group", "--endpoint-name") if flag not in options]
        if missing:
            return StepResult.failed(f"the deploy step's arguments lack {', '.join(missing)}", CLIENT_ERROR)
        try:
            result = deploy_newest_approved(self.home, options["--model-package-group"], options["--endpoint-name"])
        except USER_ERRORS as error:
            return StepResult.failed(f"deploying: {error}", failure_type(error))
        context.progress.step_line(step["Name"], result.message)
        properties = {"ProcessingJobName": context.job_name, "ProcessingJobStatus": "Completed",
                      "ExitMessage": result.message, "Deployment": result.to_json()}
        return StepResult.succeeded(properties)


def failure_type(error: Exception) -> str:
    """How a registry or endpoint error is retried under the step's RetryPolicies.

    A bad artifact, a model that does not load or a bad request fails the same way on every
    attempt: a client error, never retried (retrying Step.SERVICE_FAULT would start the model
    server again and again, for minutes). Only another process holding the endpoint or the
    registry is transient, a service fault worth another attempt.
    """
    from local.endpoints import EndpointBusy
    from local.registry import RegistryBusy

    return SERVICE_FAULT if isinstance(error, (EndpointBusy, RegistryBusy)) else CLIENT_ERROR


def _options(argv: list) -> dict[str, str]:
    """`--name value` pairs of a container's arguments (flags without a value map to "")."""
    options: dict[str, str] = {}
    items = [str(item) for item in argv]
    for index, item in enumerate(items):
        if item.startswith("--"):
            following = items[index + 1] if index + 1 < len(items) else ""
            options[item] = "" if following.startswith("--") else following
    return options
