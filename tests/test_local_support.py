"""Builders for the local runner's tests: step JSON and code bundles shaped like the SDK's.

Not a test module (it defines no tests); the other tests/test_local_*.py import it. The shapes
copy what SageMaker SDK v3 (3.27) writes into a definition and uploads to S3:

  * Processing (FrameworkProcessor): inputs `code` (sourcedir.tar.gz) and `entrypoint`
    (runproc.sh), ContainerEntrypoint `/bin/bash /opt/ml/processing/input/entrypoint/runproc.sh`;
  * Training (ModelTrainer): channels `code` (the files) and `sm_drivers` (sourcecode.json),
    ContainerArguments running sm_train.sh;
  * Tuning (HyperparameterTuner): StaticHyperParameters sagemaker_program and
    sagemaker_submit_directory (a sourcedir.tar.gz), MetricDefinitions.
"""

from __future__ import annotations

import io
import json
import tarfile
import textwrap
from pathlib import Path
from typing import Any

from local.home import store_root
from local.store import ObjectStore

BUCKET = "s3://kennel-test"
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5-cpu-py311"

RUNPROC = """#!/bin/bash

# Exit on any error. SageMaker uses error code to mark failed job.
set -e

cd /opt/ml/processing/input/code/

# Extract source code
if [ -f sourcedir.tar.gz ]; then
    tar -xzf sourcedir.tar.gz
else
    echo "ERROR: sourcedir.tar.gz not found!"
    exit 1
fi

if [[ -f 'requirements.txt' ]]; then
    pip uninstall --yes typing
    python3 /opt/ml/processing/input/code/install_requirements.py requirements.txt
fi

python {script} "$@"
"""


def store_for(home: Path) -> ObjectStore:
    return ObjectStore(store_root(home))


def tarball(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def script(source: str) -> str:
    return textwrap.dedent(source).lstrip()


def processing_step(
    home: Path,
    name: str,
    source: str,
    *,
    inputs: list[tuple[str, Any, str]] = (),
    outputs: list[tuple[str, str, Any]] = (),
    arguments: list[Any] = (),
    environment: dict[str, Any] | None = None,
    code_key: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A Processing step whose code (one script, `main.py`) is uploaded like the SDK does."""
    code_prefix = f"{BUCKET}/{code_key or name.lower()}/source"
    store = store_for(home)
    store.put_bytes(f"{code_prefix}/sourcedir.tar.gz", tarball({"main.py": script(source)}))
    store.put_bytes(f"{code_prefix}/install_requirements.py", b"# the SDK's helper\n")
    entrypoint_uri = f"{BUCKET}/pipeline/code/{name.lower()}/runproc.sh"
    store.put_bytes(entrypoint_uri, RUNPROC.format(script="main.py").encode("utf-8"))
    processing_inputs = [_s3_input(input_name, uri, local) for input_name, uri, local in inputs]
    processing_inputs += [
        _s3_input("code", f"{code_prefix}/", "/opt/ml/processing/input/code/"),
        _s3_input("entrypoint", entrypoint_uri, "/opt/ml/processing/input/entrypoint"),
    ]
    step_arguments: dict[str, Any] = {
        "ProcessingResources": {
            "ClusterConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 30}
        },
        "AppSpecification": {
            "ImageUri": IMAGE,
            "ContainerArguments": list(arguments),
            "ContainerEntrypoint": ["/bin/bash", "/opt/ml/processing/input/entrypoint/runproc.sh"],
        },
        "RoleArn": "arn:aws:iam::111111111111:role/test",
        "ProcessingInputs": processing_inputs,
        "ProcessingOutputConfig": {
            "Outputs": [
                {
                    "OutputName": output_name,
                    "S3Output": {"S3Uri": uri, "LocalPath": local, "S3UploadMode": "EndOfJob"},
                }
                for output_name, local, uri in outputs
            ]
        },
    }
    if environment:
        step_arguments["Environment"] = environment
    if "timeout" in extra:
        step_arguments["StoppingCondition"] = {"MaxRuntimeInSeconds": extra.pop("timeout")}
    return {"Name": name, "Type": "Processing", "Arguments": step_arguments, **extra}


def _s3_input(name: str, uri: Any, local: str) -> dict[str, Any]:
    return {
        "InputName": name,
        "S3Input": {
            "S3Uri": uri,
            "LocalPath": local,
            "S3DataType": "S3Prefix",
            "S3InputMode": "File",
            "S3DataDistributionType": "FullyReplicated",
            "S3CompressionType": "None",
        },
    }


def _channel(name: str, uri: Any) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": uri,
                "S3DataDistributionType": "FullyReplicated",
            }
        },
        "InputMode": "File",
    }


def training_step(
    home: Path,
    name: str,
    source: str,
    *,
    channels: dict[str, Any],
    hyperparameters: dict[str, Any],
    output_path: str = f"{BUCKET}/models",
    metric_definitions: list[dict[str, str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A Training step shaped like a v3 ModelTrainer request (code + sm_drivers channels)."""
    prefix = f"{BUCKET}/{name.lower()}/{name.lower()}-20261122/input"
    store = store_for(home)
    store.put_bytes(f"{prefix}/code/train.py", script(source).encode("utf-8"))
    store.put_bytes(f"{prefix}/code/helper.py", b"VALUE = 41\n")
    sourcecode = {"source_dir": "src", "requirements": None, "entry_script": "train.py", "command": None}
    store.put_bytes(f"{prefix}/sm_drivers/sourcecode.json", json.dumps(sourcecode).encode("utf-8"))
    store.put_bytes(f"{prefix}/sm_drivers/distributed.json", b"{}")
    store.put_bytes(f"{prefix}/sm_drivers/sm_train.sh", b"#!/bin/bash\n# the SDK's driver\n")
    algorithm: dict[str, Any] = {
        "TrainingInputMode": "File",
        "TrainingImage": IMAGE,
        "ContainerEntrypoint": ["/bin/bash"],
        "ContainerArguments": [
            "-c",
            "chmod +x /opt/ml/input/data/sm_drivers/sm_train.sh && /opt/ml/input/data/sm_drivers/sm_train.sh",
        ],
    }
    if metric_definitions:
        algorithm["MetricDefinitions"] = metric_definitions
    arguments: dict[str, Any] = {
        "AlgorithmSpecification": algorithm,
        "HyperParameters": hyperparameters,
        "InputDataConfig": [_channel(channel, uri) for channel, uri in channels.items()]
        + [_channel("code", f"{prefix}/code"), _channel("sm_drivers", f"{prefix}/sm_drivers")],
        "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "RoleArn": "arn:aws:iam::111111111111:role/test",
        "StoppingCondition": {"MaxRuntimeInSeconds": extra.pop("timeout", 3600)},
        "OutputDataConfig": {"S3OutputPath": output_path, "CompressionType": "GZIP"},
    }
    arguments.update(extra.pop("arguments", {}))
    return {"Name": name, "Type": "Training", "Arguments": arguments, **extra}


def tuning_step(
    home: Path,
    name: str,
    source: str,
    *,
    strategy: str,
    ranges: dict[str, list[dict[str, Any]]],
    channels: dict[str, Any],
    static: dict[str, Any],
    max_jobs: int | None,
    max_parallel: int = 1,
    objective: tuple[str, str] = ("Minimize", "valid:loss"),
    early_stopping: str = "Off",
    seed: int | None = 7,
    output_path: str = f"{BUCKET}/tuning",
) -> dict[str, Any]:
    """A Tuning step shaped like the v3 HyperparameterTuner's request."""
    bundle = f"{BUCKET}/{name.lower()}/input/sourcedir/sourcedir.tar.gz"
    store_for(home).put_bytes(bundle, tarball({"train.py": script(source)}))
    limits: dict[str, Any] = {"MaxParallelTrainingJobs": max_parallel}
    if max_jobs is not None:
        limits["MaxNumberOfTrainingJobs"] = max_jobs
    config: dict[str, Any] = {
        "Strategy": strategy,
        "ResourceLimits": limits,
        "HyperParameterTuningJobObjective": {"Type": objective[0], "MetricName": objective[1]},
        "ParameterRanges": ranges,
        "TrainingJobEarlyStoppingType": early_stopping,
    }
    if seed is not None:
        config["RandomSeed"] = seed
    definition = {
        "AlgorithmSpecification": {
            "TrainingInputMode": "File",
            "TrainingImage": IMAGE,
            "MetricDefinitions": [
                {"Name": "valid:loss", "Regex": r"valid_loss=([0-9\.]+)"},
                {"Name": "valid:accuracy", "Regex": r"valid_accuracy=([0-9\.]+)"},
            ],
        },
        "RoleArn": "arn:aws:iam::111111111111:role/test",
        "OutputDataConfig": {"S3OutputPath": output_path, "CompressionType": "GZIP"},
        "StoppingCondition": {"MaxRuntimeInSeconds": 600},
        "StaticHyperParameters": {
            **static,
            "sagemaker_program": "train.py",
            "sagemaker_submit_directory": bundle,
        },
        "InputDataConfig": [_channel(channel, uri) for channel, uri in channels.items()],
        "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 30},
    }
    return {
        "Name": name,
        "Type": "Tuning",
        "Arguments": {"HyperParameterTuningJobConfig": config, "TrainingJobDefinition": definition},
    }


def definition(*steps: dict[str, Any], parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"Version": "2020-12-01", "Metadata": {}, "Parameters": parameters or [], "Steps": list(steps)}


def get(path: str) -> dict[str, str]:
    return {"Get": path}


def output_uri(step: str, output: str) -> dict[str, str]:
    return get(f"Steps.{step}.ProcessingOutputConfig.Outputs['{output}'].S3Output.S3Uri")
