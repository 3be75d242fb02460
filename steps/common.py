"""What every step builder shares: the build context, code bundle, images, retries, caching.

Modules in steps/ import the SageMaker SDK at the top: only the definition builder imports them,
after it has set up the region the SDK needs at import time.

Code lives in S3 at keys named by its content, so that a rebuilt definition with unchanged code
has the same step arguments and SageMaker's step caching finds the earlier runs (its cache key
holds the code's S3 URIs, not the code). The SDK would put each bundle under a new, time-stamped
key at every build. Under s3://<bucket>/<prefix>/code/:

    <digest>/source/...             entrypoints/, file by file: the training job's `code` channel
    <digest>/sourcedir.tar.gz       the same files as a tarball: the tuning trials' submit directory
    <digest>/processing/sagemaker-<version>/...
                                    the processing jobs' bundle, install helper and runproc.sh
                                    (FrameworkProcessor's code_location, with a fixed job name)
    sm_drivers/<digest>/...         the ModelTrainer's generated driver channel, copied here from
                                    the SDK's time-stamped upload (content_addressed_channel)

<digest> is the SHA-256 of the bundle's file names and contents; a changed script changes it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import shutil
import tarfile
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version
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
# Files derived from others (compiled Python): left out of content-addressed copies.
_DERIVED = re.compile(r"(^|/)__pycache__/|\.pyc$")
CODE_FOLDER = "code"
DRIVERS_FOLDER = "sm_drivers"


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

    @cached_property
    def code(self) -> CodeBundle:
        """The staged source_dir in S3 at content-addressed keys (uploaded on first use)."""
        return upload_code_bundle(self.config, self.s3, Path(self.source_dir))

    @cached_property
    def s3(self) -> Any:
        return self.session.boto_session.client("s3", region_name=self.config.region)


@dataclass(frozen=True)
class CodeBundle:
    """Where one version of entrypoints/ lies in S3 (see the module's docstring)."""

    bucket: str
    key_prefix: str  # <prefix>/code/<digest>

    @property
    def source_uri(self) -> str:
        """The files, as an S3 prefix (a training job's `code` channel)."""
        return f"s3://{self.bucket}/{self.key_prefix}/source/"

    @property
    def tarball_uri(self) -> str:
        """The files as sourcedir.tar.gz (the training toolkit's sagemaker_submit_directory)."""
        return f"s3://{self.bucket}/{self.key_prefix}/sourcedir.tar.gz"

    @property
    def processing_location(self) -> str:
        """FrameworkProcessor's code_location: it writes its bundle and helpers below it. The SDK's
        helpers change with the SDK, so its version is part of the place."""
        return f"s3://{self.bucket}/{self.key_prefix}/processing/sagemaker-{version('sagemaker')}"


def bundle_files(source_dir: Path) -> dict[str, bytes]:
    """Relative POSIX path -> content of every file under `source_dir`, sorted, derived files left out."""
    files = {path.relative_to(source_dir).as_posix(): path.read_bytes()
             for path in source_dir.rglob("*") if path.is_file()}
    return {name: files[name] for name in sorted(files) if not _DERIVED.search(name)}


def content_digest(files: dict[str, bytes]) -> str:
    """SHA-256 over the file names and contents (independent of times, owners and archive format)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def reproducible_tarball(files: dict[str, bytes]) -> bytes:
    """A tar.gz of `files` whose bytes depend on their names and contents only."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for name in sorted(files):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
                archive.addfile(info, io.BytesIO(files[name]))
    return buffer.getvalue()


def upload_code_bundle(config: KennelConfig, s3: Any, source_dir: Path) -> CodeBundle:
    """Put the files and their tarball under <prefix>/code/<digest>/, unless already there.

    The tarball goes last, so its presence says the upload is complete."""
    files = bundle_files(source_dir)
    bundle = CodeBundle(config.bucket, f"{config.prefix}/{CODE_FOLDER}/{content_digest(files)}".lstrip("/"))
    tarball_key = bundle.tarball_uri.removeprefix(f"s3://{config.bucket}/")
    if _object_exists(s3, config.bucket, tarball_key):
        return bundle
    for name, body in files.items():
        s3.put_object(Bucket=config.bucket, Key=f"{bundle.key_prefix}/source/{name}", Body=body)
    s3.put_object(Bucket=config.bucket, Key=tarball_key, Body=reproducible_tarball(files))
    return bundle


def content_addressed_channel(ctx: StepContext, channels: list[dict[str, Any]], name: str) -> None:
    """Point the channel `name` at a copy of its objects under <prefix>/code/<name>/<digest>.

    The ModelTrainer uploads its generated driver channel under the job's time-stamped name; the
    files are the same at each build for the same settings, so the copy's URI is too."""
    for channel in channels:
        source = (channel.get("DataSource") or {}).get("S3DataSource") or {}
        if channel.get("ChannelName") == name and isinstance(source.get("S3Uri"), str):
            source["S3Uri"] = copy_by_content(ctx, source["S3Uri"], name)


def copy_by_content(ctx: StepContext, uri: str, name: str) -> str:
    """The objects under the S3 prefix `uri` (derived files left out), copied to
    s3://<bucket>/<prefix>/code/<name>/<digest of their names and contents>; that URI."""
    bucket, _, key_prefix = uri.removeprefix("s3://").partition("/")
    key_prefix = key_prefix.rstrip("/") + "/"
    files: dict[str, bytes] = {}
    for page in ctx.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(key_prefix):]
            if not _DERIVED.search(relative):
                files[relative] = ctx.s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    if not files:
        raise ConfigError(f"{uri} holds no files: the SDK did not upload the {name} channel")
    config = ctx.config
    target = f"{config.prefix}/{CODE_FOLDER}/{name}/{content_digest(files)}".lstrip("/")
    present = {item["Key"] for page in ctx.s3.get_paginator("list_objects_v2").paginate(
        Bucket=config.bucket, Prefix=target + "/") for item in page.get("Contents", [])}
    for relative, body in files.items():
        if f"{target}/{relative}" not in present:
            ctx.s3.put_object(Bucket=config.bucket, Key=f"{target}/{relative}", Body=body)
    return f"s3://{config.bucket}/{target}"


def _object_exists(s3: Any, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


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
    """A FrameworkProcessor that uploads its code below the bundle's content-addressed place; run it
    with `run_processor(...)`, which fixes the job name that the SDK puts in the upload's key."""
    return FrameworkProcessor(
        image_uri=image_uri or processing_image(ctx.config),
        role=ctx.config.role_arn,
        instance_type=instance_type,
        instance_count=instance_count,
        base_job_name=base_job_name,
        code_location=ctx.code.processing_location,
        sagemaker_session=ctx.session,
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
    )


def run_processor(ctx: StepContext, processor: Any, code: str, **kwargs: Any) -> Any:
    """processor.run(...) for a pipeline step, its code at <processing_location>/<base job name>/source/.

    The job name only names that key: SageMaker Pipelines names the job itself at run time (the
    SDK drops ProcessingJobName from the step's arguments)."""
    return processor.run(code=code, source_dir=ctx.source_dir, job_name=processor.base_job_name, **kwargs)


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
