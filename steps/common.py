"""What every step builder shares: the build context, code bundle, images, retries, caching.

Modules in steps/ import the SageMaker SDK at the top: only the definition builder imports them,
after it has set up the region the SDK needs at import time.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagemaker.core import image_uris
from sagemaker.core.processing import FrameworkProcessor
from sagemaker.core.shapes import ProcessingInput, ProcessingOutput, ProcessingS3Input, ProcessingS3Output
from sagemaker.core.workflow.execution_variables import ExecutionVariables
from sagemaker.core.workflow.functions import Join
from sagemaker.mlops.workflow.retry import (
    SageMakerJobExceptionTypeEnum,
    SageMakerJobStepRetryPolicy,
    StepExceptionTypeEnum,
    StepRetryPolicy,
)
from sagemaker.mlops.workflow.steps import CacheConfig

from pipeline.config import ConfigError, KennelConfig
from pipeline.parameters import Parameters

ENTRYPOINTS_DIR = Path(__file__).resolve().parents[1] / "entrypoints"
# Files that must never travel in the code bundle (caches, editor droppings, local state).
_BUNDLE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "*.egg-info")


@dataclass(frozen=True)
class StepContext:
    """What a step builder needs besides its upstream steps."""

    config: KennelConfig
    params: Parameters
    session: Any  # sagemaker PipelineSession
    source_dir: str  # a clean copy of entrypoints/, uploaded as every step's source_dir

    @property
    def allow_download(self) -> str:
        # torchvision may fetch ImageNet weights on AWS; the local target stays offline.
        return "True" if self.config.target == "aws" else "False"


def stage_source_dir(destination: Path, source: Path = ENTRYPOINTS_DIR) -> str:
    """Copy the scripts and their sibling helpers from `source` (entrypoints/) to `destination`.

    Every step uses the same bundle, so the scripts can import their siblings flat. Caches and
    hidden files stay behind.
    """
    if not (source / "contract.py").is_file():
        raise ConfigError(f"{source} has no contract.py: the step scripts are missing")
    shutil.copytree(source, destination, ignore=_BUNDLE_IGNORE, dirs_exist_ok=True)
    return str(destination)


def execution_s3_uri(ctx: StepContext, step_name: str, output_name: str) -> Any:
    """s3://bucket/prefix/pipeline/<execution id>/<step>/<output>, resolved when the step runs."""
    config = ctx.config
    return Join(on="/", values=[
        "s3:/", config.bucket, config.prefix, config.pipeline_name,
        ExecutionVariables.PIPELINE_EXECUTION_ID, step_name, output_name,
    ])


def static_s3_uri(config: KennelConfig, *parts: str) -> str:
    return "/".join(["s3:/", config.bucket, config.prefix, *parts])


def job_retry_policies() -> list[Any]:
    """Retries for steps that run SageMaker jobs: capacity and internal errors, throttling, faults."""
    job_errors = [SageMakerJobExceptionTypeEnum.CAPACITY_ERROR, SageMakerJobExceptionTypeEnum.INTERNAL_ERROR]
    # Capacity comes back slowly: wait minutes, not seconds, between attempts.
    return [
        SageMakerJobStepRetryPolicy(exception_types=job_errors, interval_seconds=60, backoff_rate=2.0,
                                    max_attempts=4),
        *service_retry_policies(),
    ]


def service_retry_policies() -> list[Any]:
    """Retries for throttled or faulted calls to SageMaker itself (every step type allows these)."""
    return [
        StepRetryPolicy(exception_types=[StepExceptionTypeEnum.THROTTLING, StepExceptionTypeEnum.SERVICE_FAULT],
                        interval_seconds=5, backoff_rate=2.0, max_attempts=5),
    ]


def cache_config(config: KennelConfig) -> Any:
    return CacheConfig(enable_caching=True, expire_after=config.cache_expire_after)


def pytorch_image(config: KennelConfig, scope: str, instance_type: str, override: str) -> str:
    """The AWS PyTorch container for `scope` (training | inference), unless overridden."""
    if override:
        return override
    try:
        return image_uris.retrieve(
            "pytorch", config.region, version=config.pytorch_version, py_version=config.python_version,
            instance_type=instance_type, image_scope=scope,
        )
    except ValueError as error:
        raise ConfigError(
            f"no PyTorch {scope} image for pytorch_version={config.pytorch_version}, "
            f"python_version={config.python_version} in {config.region} ({error}); "
            f"change [images] in kennel.toml or set {scope}_image_uri"
        ) from None


def training_image(config: KennelConfig) -> str:
    return pytorch_image(config, "training", config.training_instance_type, config.training_image_uri)


def processing_image(config: KennelConfig) -> str:
    # Processing runs on CPU instances; the training image carries torch, torchvision and boto3.
    return pytorch_image(config, "training", config.processing_instance_type, config.processing_image_uri)


def inference_image(config: KennelConfig) -> str:
    return pytorch_image(config, "inference", config.endpoint_instance_type, config.inference_image_uri)


def framework_processor(ctx: StepContext, base_job_name: str, instance_type: Any, instance_count: Any,
                        image_uri: str | None = None, env: dict[str, str] | None = None) -> Any:
    return FrameworkProcessor(
        image_uri=image_uri or processing_image(ctx.config),
        role=ctx.config.role_arn,
        instance_type=instance_type,
        instance_count=instance_count,
        base_job_name=base_job_name,
        sagemaker_session=ctx.session,
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
    )


def processing_input(name: str, source: Any, local_path: str) -> Any:
    return ProcessingInput(
        input_name=name,
        s3_input=ProcessingS3Input(s3_uri=source, local_path=local_path, s3_data_type="S3Prefix",
                                   s3_input_mode="File", s3_data_distribution_type="FullyReplicated"),
    )


def processing_output(ctx: StepContext, step_name: str, name: str, local_path: str) -> Any:
    return ProcessingOutput(
        output_name=name,
        s3_output=ProcessingS3Output(s3_uri=execution_s3_uri(ctx, step_name, name), local_path=local_path,
                                     s3_upload_mode="EndOfJob"),
    )


def output_uri(step: Any, output_name: str) -> Any:
    """The S3 URI a processing step wrote its named output to (a `Get` on its properties)."""
    return step.properties.ProcessingOutputConfig.Outputs[output_name].S3Output.S3Uri
