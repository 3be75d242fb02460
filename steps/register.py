"""Register: a model package in the group, approval status from ModelApprovalStatus.

`ModelBuilder.register()` under a PipelineSession gives a ModelStep. train.py already writes the
serving code (inference.py and its helpers) into <model-dir>/code, so model.tar.gz carries it where
the PyTorch serving container looks (/opt/ml/model/code): the package points there and the SDK's
extra "repack" training job is not needed.
"""

from __future__ import annotations

from sagemaker.core.model_metrics import MetricsSource, ModelMetrics
from sagemaker.mlops.workflow.model_step import ModelStep
from sagemaker.mlops.workflow.steps import ProcessingStep, TrainingStep
from sagemaker.serve.model_builder import ModelBuilder

from entrypoints import contract
from steps.common import StepContext, inference_image, service_retry_policies
from steps.evaluate import evaluation_file_uri
from steps.train import model_artifacts

NAME = "Register"
# The serving toolkit's script-mode variables: entry script and the folder holding it.
SERVING_ENVIRONMENT = {
    "SAGEMAKER_PROGRAM": "inference.py",
    "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
    "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
}


def register_step(ctx: StepContext, train: TrainingStep, evaluate: ProcessingStep) -> ModelStep:
    config, params = ctx.config, ctx.params
    builder = ModelBuilder(
        s3_model_data_url=model_artifacts(train),
        image_uri=inference_image(config),
        role_arn=config.role_arn,
        sagemaker_session=ctx.session,
        env_vars=SERVING_ENVIRONMENT,
        instance_type=config.endpoint_instance_type,
    )
    step_args = builder.register(
        model_package_group_name=config.model_package_group,
        content_types=list(contract.INFERENCE_CONTENT_TYPES),
        response_types=list(contract.INFERENCE_RESPONSE_TYPES),
        inference_instances=[params["EndpointInstanceType"]],
        transform_instances=[params["EndpointInstanceType"]],
        approval_status=params["ModelApprovalStatus"],
        model_metrics=ModelMetrics(
            model_statistics=MetricsSource(content_type="application/json", s3_uri=evaluation_file_uri(evaluate))
        ),
        domain="COMPUTER_VISION",
        task="IMAGE_CLASSIFICATION",
    )
    return ModelStep(name=NAME, step_args=step_args, retry_policies=service_retry_policies())
