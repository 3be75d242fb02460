"""The pipeline definition: wiring of the steps, and the ways to build it.

`build_pipeline` reads like the DAG. `build_offline` builds it with no AWS account (the SDK uploads
code bundles while it builds, so the build runs against moto) and returns the definition together
with every object the SDK uploaded, for the local store. `build_definition` is the definition alone.
The aws target builds with a real session instead (`pipeline.aws`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import KennelConfig
from pipeline.errors import KennelError

DEPLOY_PIPELINE_SUFFIX = "-deploy"
# Offline builds must not read the user's SDK defaults or send the SDK's usage telemetry.
OFFLINE_SDK_CONFIG = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
_OFFLINE_CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                    "AWS_ENDPOINT_URL_SAGEMAKER", "AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL_IAM",
                    "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


@dataclass(frozen=True)
class OfflineBuild:
    """A definition built with no AWS account, and what the SDK uploaded while building it."""

    definition: dict[str, Any]  # the main pipeline
    deploy_definition: dict[str, Any]  # the one-step pipeline the approval event starts
    objects: dict[str, bytes]  # "s3://bucket/key" -> content (code bundles, drivers, scripts)


def build_pipeline(config: KennelConfig, session: Any, source_dir: str) -> Any:
    """The Kennel pipeline:

        PrepareData -> Tune -> TrainWithDebugger -> Evaluate -> CheckTestLoss
            test loss <= TestLossThreshold : Register -> Deploy
            otherwise                      : Fail (says the loss and the threshold)
    """
    from sagemaker.mlops.workflow.pipeline import Pipeline

    from pipeline.parameters import declare
    from steps.common import StepContext
    from steps.condition import condition_step
    from steps.deploy import deploy_step
    from steps.evaluate import evaluate_step
    from steps.fail import fail_step
    from steps.prepare import prepare_step
    from steps.register import register_step
    from steps.train import train_step
    from steps.tune import tune_step

    params = declare(config)
    ctx = StepContext(config=config, params=params, session=session, source_dir=source_dir)
    prepare = prepare_step(ctx)
    tune = tune_step(ctx, prepare)
    train = train_step(ctx, prepare, tune)
    evaluate = evaluate_step(ctx, prepare, train)
    register = register_step(ctx, train, evaluate)
    deploy = deploy_step(ctx, depends_on=[register])
    check = condition_step(ctx, evaluate, if_steps=[register, deploy], else_steps=[fail_step(ctx, evaluate)])
    return Pipeline(
        name=config.pipeline_name,
        parameters=params.all(),
        steps=[prepare, tune, train, evaluate, check],
        sagemaker_session=session,
        pipeline_experiment_config=None,  # no Experiments/Trials: fewer permissions, nothing to clean up
    )


def build_deploy_pipeline(config: KennelConfig, session: Any, source_dir: str) -> Any:
    """Deploy alone: what the "package approved" event starts (see pipeline.aws)."""
    from sagemaker.mlops.workflow.pipeline import Pipeline

    from pipeline.parameters import declare
    from steps.common import StepContext
    from steps.deploy import deploy_step

    params = declare(config)
    ctx = StepContext(config=config, params=params, session=session, source_dir=source_dir)
    used = ("EndpointName", "EndpointInstanceType", "EndpointInstanceCount")
    return Pipeline(
        name=deploy_pipeline_name(config),
        parameters=[params[name] for name in used],
        steps=[deploy_step(ctx)],
        sagemaker_session=session,
        pipeline_experiment_config=None,
    )


def deploy_pipeline_name(config: KennelConfig) -> str:
    return config.pipeline_name[: 63 - len(DEPLOY_PIPELINE_SUFFIX)] + DEPLOY_PIPELINE_SUFFIX


def pipeline_session(config: KennelConfig, boto_session: Any, sdk_config: dict | None = None) -> Any:
    from sagemaker.core.workflow.pipeline_context import PipelineSession

    return PipelineSession(boto_session=boto_session, default_bucket=config.bucket,
                           default_bucket_prefix=config.prefix, sagemaker_config=sdk_config)


def definitions(config: KennelConfig, session: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both pipeline definitions, built (and their code uploaded) through `session`."""
    from steps.common import stage_source_dir

    with tempfile.TemporaryDirectory(prefix="kennel-code-") as staging:
        source_dir = stage_source_dir(Path(staging) / "code")
        main = json.loads(build_pipeline(config, session, source_dir).definition())
        deploy = json.loads(build_deploy_pipeline(config, session, source_dir).definition())
    return main, deploy


def build_offline(config: KennelConfig, target: str) -> OfflineBuild:
    """Build for `target` with no AWS account: against moto, offline, with fake credentials."""
    config = config.for_target(target)
    with offline_environment(config):
        import boto3
        from moto import mock_aws

        with mock_aws():
            boto_session = boto3.Session(region_name=config.region)
            s3 = boto_session.client("s3")
            _create_bucket(s3, config)
            session = pipeline_session(config, boto_session, OFFLINE_SDK_CONFIG)
            main, deploy = definitions(config, session)
            objects = _read_all_objects(s3)
    return OfflineBuild(definition=main, deploy_definition=deploy, objects=objects)


def build_definition(config: KennelConfig, target: str) -> dict[str, Any]:
    """The pipeline definition (parsed JSON) for `target`, built offline."""
    return build_offline(config, target).definition


@contextlib.contextmanager
def sdk_environment(config: KennelConfig) -> Iterator[None]:
    """The region the SDK needs when it is first imported (it fails to import without one)."""
    with _patched_environ({"AWS_DEFAULT_REGION": config.region}, ()):
        yield


@contextlib.contextmanager
def offline_environment(config: KennelConfig) -> Iterator[None]:
    """No profile, endpoint override or config file of the user's may reach the offline build."""
    values = {
        "AWS_DEFAULT_REGION": config.region,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "SAGEMAKER_VALIDATE_ROLE": "false",  # it calls iam:SimulatePrincipalPolicy, which moto lacks
    }
    with _patched_environ(values, _OFFLINE_CLEARED):
        yield


@contextlib.contextmanager
def _patched_environ(values: dict[str, str], cleared: tuple[str, ...]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in (*values, *cleared)}
    for name in cleared:
        os.environ.pop(name, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _create_bucket(s3: Any, config: KennelConfig) -> None:
    extra = {} if config.region == "us-east-1" else {
        "CreateBucketConfiguration": {"LocationConstraint": config.region}}
    s3.create_bucket(Bucket=config.bucket, **extra)


def _read_all_objects(s3: Any) -> dict[str, bytes]:
    objects: dict[str, bytes] = {}
    for bucket in s3.list_buckets().get("Buckets", []):
        name = bucket["Name"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                body = s3.get_object(Bucket=name, Key=item["Key"])["Body"].read()
                objects[f"s3://{name}/{item['Key']}"] = body
    return objects


def check_output_path(path: Path) -> Path:
    """`path`, if a file can be written there; checked before the slow build, not after."""
    path = path.expanduser()
    if not path.parent.is_dir():
        raise KennelError(f"{path}: the folder {path.parent} does not exist; create it or choose another path")
    if path.is_dir():
        raise KennelError(f"{path} is a folder; give a file name such as {path / 'definition.json'}")
    return path


def write_json(document: dict[str, Any], path: Path) -> None:
    """Write `document` to `path` whole or not at all (temp file, then rename)."""
    from local.files import write_json_atomic

    write_json_atomic(check_output_path(path), document)
