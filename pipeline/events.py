"""The "package approved or rejected" EventBridge rule, as code.

When a person approves or rejects a package of Kennel's model package group, SageMaker emits a
"SageMaker Model Package State Change" event. This rule matches it and starts the one-step
deploy pipeline (the same entrypoints/deploy.py the main pipeline runs), which serves the newest
Approved package: an approval puts it on the endpoint, and rejecting the package that serves
rolls the endpoint back to the previous approved one, without anyone running a command.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.config import KennelConfig

TARGET_ID = "kennel-deploy-pipeline"


def rule_name(config: KennelConfig) -> str:
    return f"{config.pipeline_name}-package-approved"[:64]


def approval_event_pattern(config: KennelConfig) -> dict[str, Any]:
    return {
        "source": ["aws.sagemaker"],
        "detail-type": ["SageMaker Model Package State Change"],
        "detail": {
            "ModelPackageGroupName": [config.model_package_group],
            "ModelApprovalStatus": ["Approved", "Rejected"],
        },
    }


def put_rule_request(config: KennelConfig) -> dict[str, Any]:
    return {
        "Name": rule_name(config),
        "EventPattern": json.dumps(approval_event_pattern(config)),
        "State": "ENABLED",
        "Description": f"Deploy the newest Approved package of {config.model_package_group} "
                       f"to {config.endpoint_name}",
    }


def put_targets_request(config: KennelConfig, deploy_pipeline_arn: str) -> dict[str, Any]:
    """EventBridge starts the deploy pipeline with the role (it must trust events.amazonaws.com)."""
    return {
        "Rule": rule_name(config),
        "Targets": [{
            "Id": TARGET_ID,
            "Arn": deploy_pipeline_arn,
            "RoleArn": config.role_arn,
            "SageMakerPipelineParameters": {"PipelineParameterList": [
                {"Name": "EndpointName", "Value": config.endpoint_name},
                {"Name": "EndpointInstanceType", "Value": config.endpoint_instance_type},
                {"Name": "EndpointInstanceCount", "Value": str(config.endpoint_instance_count)},
            ]},
        }],
    }
