"""The execution role's IAM policy (pipeline/execution_role_policy.json), filled in for a configuration.

The JSON file lists exactly what the pipeline's execution role needs: SageMaker Pipelines uses it
to start the jobs and register the model, the jobs use it to read and write S3, pull images and
write logs, deploy.py uses it to create or update the endpoint, and EventBridge uses it to start
the deploy pipeline when a package is approved. Names are placeholders (KENNEL_*) so the file
stays valid JSON; `kennel policy` prints it with this configuration's values.

Endpoints are allowed by name prefix (`endpoint/<endpoint_name>*`, and their configs
`<endpoint_name>-v<version>-<shape>`): the EndpointName pipeline parameter may be overridden per
run, so a run may deploy to `<endpoint_name>-blue` with the same role, and the aws target refuses
an override outside that prefix before starting (`endpoint_name_allowed`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import KennelConfig

POLICY_FILE = Path(__file__).with_name("execution_role_policy.json")
TRUST_POLICY_FILE = Path(__file__).with_name("execution_role_trust_policy.json")


def placeholders(config: KennelConfig) -> dict[str, str]:
    """Placeholder -> value; the account comes from the role ARN, or stays a wildcard."""
    account = config.role_arn.split(":")[4] if config.role_arn else "*"
    # SageMaker writes resource names in lowercase in its ARNs.
    return {
        "KENNEL_ROLE_ARN": config.role_arn or "arn:aws:iam::*:role/KENNEL_ROLE_NAME",
        "KENNEL_MODEL_PACKAGE_GROUP": config.model_package_group.lower(),
        "KENNEL_ENDPOINT": config.endpoint_name.lower(),
        "KENNEL_PIPELINE": config.pipeline_name.lower(),
        "KENNEL_BUCKET": config.bucket or "KENNEL_BUCKET",
        "KENNEL_REGION": config.region,
        "KENNEL_ACCOUNT": account,
    }


def render_execution_role_policy(config: KennelConfig) -> dict[str, Any]:
    text = POLICY_FILE.read_text(encoding="utf-8")
    # Longest first, so KENNEL_MODEL_PACKAGE_GROUP is not read as a shorter placeholder plus a tail.
    for name, value in sorted(placeholders(config).items(), key=lambda item: -len(item[0])):
        text = text.replace(name, value)
    return json.loads(text)


def trust_policy() -> dict[str, Any]:
    return json.loads(TRUST_POLICY_FILE.read_text(encoding="utf-8"))


def endpoint_name_allowed(config: KennelConfig, name: str) -> bool:
    """Whether the execution role policy lets the deploy step serve on endpoint `name`: names that
    start with the configured endpoint_name (ARNs hold names in lowercase, hence the comparison)."""
    return name.lower().startswith(config.endpoint_name.lower())
