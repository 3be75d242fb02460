"""Deploy: entrypoints/deploy.py on a small processing job.

Why a processing job and not EndpointConfig/Endpoint steps: the endpoint must serve the newest
*Approved* package of the group (the package this execution registered is usually still
PendingManualApproval), it must create or update, wait for InService, and end cleanly with a
message when nothing is approved yet. The same script is what the approval event runs, so a
manual approval redeploys through the very same code.
"""

from __future__ import annotations

from sagemaker.mlops.workflow.steps import ProcessingStep, Step

from steps.common import StepContext, framework_processor, job_retry_policies, run_processor

NAME = "Deploy"
# The local runner serves this step from its own registry and endpoints instead of running
# deploy.py against the SageMaker API; this marker in the job's environment is how it knows.
LOCAL_STEP_ROLE = {"KENNEL_STEP_ROLE": "deploy"}


def deploy_arguments(ctx: StepContext) -> list:
    config, params = ctx.config, ctx.params
    return [
        "--model-package-group", config.model_package_group,
        "--endpoint-name", params["EndpointName"],
        "--instance-type", params["EndpointInstanceType"],
        "--instance-count", params["EndpointInstanceCount"].to_string(),
        "--execution-role-arn", config.role_arn,
        "--region", config.region,
        "--wait",
    ]


def deploy_step(ctx: StepContext, depends_on: list[Step] | None = None) -> ProcessingStep:
    """Not cached: whether anything is approved changes outside the pipeline."""
    processor = framework_processor(ctx, f"{ctx.config.pipeline_name}-deploy",
                                    ctx.config.deploy_instance_type, 1, env=LOCAL_STEP_ROLE)
    step_args = run_processor(ctx, processor, "deploy.py", arguments=deploy_arguments(ctx))
    return ProcessingStep(
        name=NAME,
        step_args=step_args,
        description="Serve the newest Approved package of the group on the endpoint (create or update)",
        depends_on=depends_on,
        retry_policies=job_retry_policies(),
    )
