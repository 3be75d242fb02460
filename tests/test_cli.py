"""The `kennel` command as a user runs it: a real process, its exit code, stdout and stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from kennel_support import BUCKET, REGION, REPO_ROOT, ROLE_ARN, aws_environment, repo_config

from pipeline.cli import main

SPEC = {
    "Containers": [{"Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-cpu-py312",
                    "ModelDataUrl": "s3://bucket/model.tar.gz"}],
    "SupportedContentTypes": ["image/png"],
    "SupportedResponseMIMETypes": ["application/json"],
}


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No AWS credentials, profile or Kennel settings of the developer; no route to the internet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KENNEL_", "SAGEMAKER_"))}
    dead = "http://127.0.0.1:9"  # nothing listens there: a build that needs the network fails
    env.update(HOME=str(home), KENNEL_HOME=str(home / ".kennel"), HTTP_PROXY=dead, HTTPS_PROXY=dead,
               NO_PROXY="127.0.0.1,localhost", **extra)
    return env


def kennel(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kennel: error: ")
    return lines[0]


def test_help_is_fast_and_does_not_import_the_sdk(tmp_path):
    started = time.monotonic()
    result = kennel("--help", env=clean_env(tmp_path))
    assert result.returncode == 0 and "definition" in result.stdout
    assert time.monotonic() - started < 5
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, pipeline.cli, pipeline.aws, pipeline.targets, pipeline.parameters\n"
        "pipeline.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sagemaker', 'moto', 'torch')))")],
        cwd=REPO_ROOT, env=clean_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stderr


def test_definition_is_written_offline_without_credentials(tmp_path):
    output = tmp_path / "definition.json"
    result = kennel("definition", "-o", str(output), env=clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    definition = json.loads(output.read_text())
    assert [step["Name"] for step in definition["Steps"]] == [
        "PrepareData", "Tune", "TrainWithDebugger", "Evaluate", "CheckTestLoss"]
    assert not list(tmp_path.glob(".definition.json.*"))  # no temp file left behind
    assert output.stat().st_mode & 0o044, "readable by others as any file the user writes (umask 022)"


def test_definition_for_aws_goes_to_stdout_as_pure_json(tmp_path):
    env = clean_env(tmp_path, KENNEL_BUCKET="my-kennel-bucket", KENNEL_ROLE_ARN=ROLE_ARN, KENNEL_REGION="eu-west-1")
    result = kennel("definition", "--target", "aws", env=env)
    assert result.returncode == 0, result.stderr
    definition = json.loads(result.stdout)
    text = json.dumps(definition)
    assert "s3://my-kennel-bucket/" in text and ROLE_ARN in text and ".dkr.ecr.eu-west-1." in text


def test_definition_into_a_missing_folder_is_one_clear_error(tmp_path):
    result = kennel("definition", "-o", str(tmp_path / "no" / "such" / "d.json"), env=clean_env(tmp_path))
    assert result.returncode == 1
    assert "does not exist" in one_line_error(result)


def test_a_bad_config_file_is_one_clear_error(tmp_path):
    config = tmp_path / "kennel.toml"
    config.write_text('[training]\nepoch = 3\n')
    result = kennel("definition", env=clean_env(tmp_path, KENNEL_CONFIG=str(config)))
    assert result.returncode == 1
    message = one_line_error(result)
    assert str(config) in message and "epoch" in message


def test_a_bad_environment_value_is_one_clear_error(tmp_path):
    result = kennel("definition", env=clean_env(tmp_path, KENNEL_TRAINING_INSTANCE_TYPE="g4dn.xlarge"))
    assert result.returncode == 1
    assert "training_instance_type 'g4dn.xlarge'" in one_line_error(result)


def test_a_proxy_that_cannot_be_reached_is_one_clear_error_too(tmp_path):
    result = kennel("models", "--target", "aws", env=clean_env(tmp_path))
    assert result.returncode == 1
    assert "Failed to connect to proxy URL" in one_line_error(result)


def test_unknown_parameters_are_refused_before_anything_is_sent(tmp_path):
    result = kennel("run", "--target", "aws", "--param", "Epoch=3", env=clean_env(tmp_path))
    assert result.returncode == 1
    message = one_line_error(result)
    assert "no such pipeline parameter" in message and "Epochs" in message


@pytest.mark.parametrize("argv, expected", [
    (["run", "--param", "Epochs=three"], "Epochs must be an integer"),
    (["run", "--param", "Freeze=everything"], "choose one of head, last-block, none"),
    (["run", "--param", "Epochs"], "write it as Name=Value"),
    (["approve", "--version", "0", "--target", "aws"], "versions start at 1"),
    (["run", "--target", "aws", "--data", "s3://b/d", "--param", "InputDataUri=s3://b/e"], "give the data once"),
])
def test_bad_arguments_in_process(argv, expected, capsys, monkeypatch):
    monkeypatch.setenv("KENNEL_CONFIG", str(REPO_ROOT / "kennel.toml"))
    assert main(argv) == 1
    assert expected in capsys.readouterr().err


def test_missing_aws_credentials_are_one_clear_error(tmp_path):
    # Off EC2 there is no instance metadata to ask; the dead proxy would otherwise answer first.
    result = kennel("status", "--target", "aws", env=clean_env(tmp_path, AWS_EC2_METADATA_DISABLED="true"))
    assert result.returncode == 1
    assert "no AWS credentials found" in one_line_error(result)


def test_upsert_without_a_role_or_bucket_names_both(tmp_path):
    result = kennel("upsert", "--target", "aws", env=clean_env(tmp_path, AWS_ACCESS_KEY_ID="a",
                                                                 AWS_SECRET_ACCESS_KEY="b"))
    assert result.returncode == 1
    message = one_line_error(result)
    assert "KENNEL_ROLE_ARN" in message and "KENNEL_BUCKET" in message


def test_policy_is_filled_in_for_the_configuration(tmp_path):
    env = clean_env(tmp_path, KENNEL_BUCKET=BUCKET, KENNEL_ROLE_ARN=ROLE_ARN)
    result = kennel("policy", env=env)
    assert result.returncode == 0, result.stderr
    assert "KENNEL_" not in result.stdout
    policy = json.loads(result.stdout)
    resources = json.dumps([statement["Resource"] for statement in policy["Statement"]])
    assert f"arn:aws:s3:::{BUCKET}/*" in resources and ROLE_ARN in resources
    assert f":123456789012:model-package-group/{repo_config().model_package_group}" in resources
    trust = json.loads(kennel("policy", "--trust", env=env).stdout)
    services = {statement["Principal"]["Service"] for statement in trust["Statement"]}
    assert services == {"sagemaker.amazonaws.com", "events.amazonaws.com"}


def test_the_aws_workflow_end_to_end_against_moto(aws_env, tmp_path):
    env = clean_env(tmp_path, **aws_environment(aws_env), KENNEL_BUCKET=BUCKET, KENNEL_ROLE_ARN=ROLE_ARN,
                    KENNEL_TARGET="aws")
    boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)

    created = kennel("upsert", env=env)
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created pipeline kennel: arn:aws:sagemaker:")
    updated = kennel("upsert", env=env)
    assert updated.stdout.startswith("updated pipeline kennel: "), updated.stderr

    run = kennel("run", "--param", "Epochs=2", "--param", "TestLossThreshold=0.5", "--wait", env=env)
    assert run.returncode == 0, run.stderr
    assert "Succeeded" in run.stdout and "Epochs=2" in run.stdout

    status = kennel("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    listing = json.loads(status.stdout)
    described = listing["newest"]
    assert described["status"] == "Succeeded"
    assert [e["execution_id"] for e in listing["executions"]] == [described["execution_id"]]
    assert described["parameters"] == {"Epochs": "2", "TestLossThreshold": "0.5"}

    group = repo_config().model_package_group
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    for _ in range(2):
        sagemaker.create_model_package(ModelPackageGroupName=group, InferenceSpecification=SPEC,
                                       ModelApprovalStatus="PendingManualApproval")
    approve = kennel("approve", "--latest", "--reason", "good enough", env=env)
    assert approve.stdout.splitlines()[0] == f"version 2 of {group} is now Approved", approve.stderr
    assert "the approval rule starts kennel-deploy" in approve.stdout
    reject = kennel("reject", "--version", "1", env=env)
    assert reject.stdout.splitlines()[0] == f"version 1 of {group} is now Rejected", reject.stderr

    models = kennel("models", "--json", env=env)
    assert [(m["version"], m["approval_status"]) for m in json.loads(models.stdout)] == [
        (2, "Approved"), (1, "Rejected")]
    table = kennel("models", env=env).stdout.splitlines()
    assert table[0].split() == ["VERSION", "STATUS", "TEST", "LOSS", "TEST", "ACCURACY", "CREATED", "EXECUTION",
                                "DESCRIPTION"]
    assert table[1].split()[:2] == ["2", "Approved"] and table[1].endswith("good enough")


def test_every_pipeline_parameter_is_documented():
    from pipeline.parameters import SPECS

    documented = (REPO_ROOT / "README.md").read_text()
    missing = [spec.name for spec in SPECS if f"| `{spec.name}` |" not in documented]
    assert missing == []


# --- configuration: defaults, kennel.toml, then the environment ----------------------------------
def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kennel.toml"
    path.write_text(text)
    return path


def test_environment_beats_the_file_which_beats_the_defaults(tmp_path):
    from pipeline.config import KennelConfig, load_config

    path = write_config(tmp_path, '[aws]\nbucket = "from-file"\nprefix = "p"\n[tuning]\nbatch_sizes = [8, 16]\n')
    config = load_config(path, environ={"KENNEL_BUCKET": "from-env", "AWS_REGION": "eu-west-1",
                                        "KENNEL_BATCH_SIZES": "4,8,16", "KENNEL_APPROVAL_RULE": "false"})
    assert (config.bucket, config.prefix, config.region) == ("from-env", "p", "eu-west-1")
    assert config.batch_sizes == (4, 8, 16) and config.approval_rule is False
    assert config.epochs == KennelConfig().epochs
    assert load_config(path, environ={"AWS_REGION": "eu-west-1", "KENNEL_REGION": "ap-south-1"}).region == "ap-south-1"


def test_kennel_config_names_the_file(tmp_path, monkeypatch):
    from pipeline.config import ConfigError, load_config

    path = write_config(tmp_path, 'target = "aws"\n')
    assert load_config(environ={"KENNEL_CONFIG": str(path)}).target == "aws"
    with pytest.raises(ConfigError, match="KENNEL_CONFIG=.*no such file"):
        load_config(environ={"KENNEL_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize("text, expected", [
    ("[aws]\nbucket = 3\n", "bucket must be a string, got 3"),
    ("[aws]\nepochs = 3\n", "unknown setting [aws] epochs; it belongs in [training]"),
    ("[tuning]\nbatch_sizes = 32\n", "batch_sizes must be a list of integers"),
    ("[training]\narchitecture = \"vgg\"\n", "architecture must be one of resnet18"),
    ("[aws]\nrole_arn = \"my-role\"\n", "role_arn 'my-role' is not an IAM role ARN"),
    ("[aws]\nbucket = \"s3://b\"\n", "bucket 's3://b' is not an S3 bucket name"),
    ("[tuning]\nmax_jobs = 2\nmax_parallel_jobs = 3\n", "max_parallel_jobs must not exceed max_jobs"),
    ("[training]\ntest_fraction = 0\n", "test_fraction must be between 0 and 1, got 0"),
    ("[aws\n", "not valid TOML"),
])
def test_bad_settings_are_named_with_their_fix(tmp_path, text, expected):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write_config(tmp_path, text), environ={})


def test_targets_get_stand_ins_only_where_nothing_is_configured():
    from pipeline.config import LOCAL_BUCKET, PLACEHOLDER_BUCKET, ConfigError

    assert repo_config().for_target("local").bucket == LOCAL_BUCKET
    assert repo_config(bucket="mine").for_target("local").bucket == "mine"
    aws = repo_config().for_target("aws")
    assert aws.bucket == PLACEHOLDER_BUCKET and aws.data_uri == f"s3://{PLACEHOLDER_BUCKET}/kennel/data"
    with pytest.raises(ConfigError, match="KENNEL_ROLE_ARN.*KENNEL_BUCKET"):
        aws.require_aws()
    repo_config(bucket="mine", role_arn=ROLE_ARN).for_target("aws").require_aws()


def test_parameter_overrides_come_back_as_the_strings_aws_takes():
    from pipeline.parameters import parse_overrides

    pairs = ["Epochs=3", "TestLossThreshold=0.5", "Architecture=resnet50", "InputDataUri=s3://b/k=v"]
    expected = {"Epochs": "3", "TestLossThreshold": "0.5", "Architecture": "resnet50", "InputDataUri": "s3://b/k=v"}
    assert parse_overrides(pairs) == expected
    assert parse_overrides(pairs, repo_config().for_target("local")) == expected
    # Alone, MaxParallelJobs=8 would exceed the configured MaxJobs; with MaxJobs=10 it does not.
    assert parse_overrides(["MaxParallelJobs=8", "MaxJobs=10"], repo_config().for_target("local")) == {
        "MaxParallelJobs": "8", "MaxJobs": "10"}


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["Epochs=0"], "--param Epochs=0: epochs must be at least 1, got 0"),
        (["MaxJobs=0"], "--param MaxJobs=0: max_jobs must be at least 1, got 0"),
        (["ImageSize=4"], "--param ImageSize=4: image_size must be between 32 and 1024, got 4"),
        (["TestLossThreshold=-1"], "--param TestLossThreshold=-1: test_loss_threshold must be positive"),
        (["InputDataUri=/data/dogs"], "--param InputDataUri=/data/dogs: input_data_uri '/data/dogs' must be an s3:// URI"),
        (["ProcessingInstanceType=big"], "processing_instance_type 'big' is not a SageMaker instance type"),
        (["EndpointName=bad_name!"], "--param EndpointName=bad_name!: endpoint_name 'bad_name!' must be 1-63 letters"),
        (["MaxParallelJobs=9"], "--param MaxParallelJobs=9: max_parallel_jobs must not exceed max_jobs"),
        # Each alone is fine; together they contradict each other.
        (["MaxJobs=3", "MaxParallelJobs=3", "MaxJobs=2"],
         "--param MaxJobs=2 MaxParallelJobs=3: max_parallel_jobs must not exceed max_jobs"),
    ],
)
def test_parameter_overrides_pass_the_checks_of_the_settings_they_stand_for(pairs, expected):
    from pipeline.errors import KennelError
    from pipeline.parameters import parse_overrides

    with pytest.raises(KennelError) as raised:
        parse_overrides(pairs, repo_config().for_target("local"))
    assert expected in str(raised.value)
