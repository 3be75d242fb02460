"""The aws target against a moto server: upsert, run, status, models, approve, reject.

moto records pipelines and executions but runs no step (an execution is Succeeded at once) and
has no ListPipelineExecutionSteps; the registry, S3 and EventBridge behave as on AWS.
"""

from __future__ import annotations

import json

import boto3
import pytest
from kennel_support import BUCKET, REGION, ROLE_ARN, repo_config

from pipeline.aws import AwsTarget
from pipeline.config import ConfigError
from pipeline.errors import KennelError

SPEC = {
    "Containers": [{"Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-cpu-py312",
                    "ModelDataUrl": "s3://bucket/model.tar.gz"}],
    "SupportedContentTypes": ["image/png"],
    "SupportedResponseMIMETypes": ["application/json"],
}


def aws_config(**overrides: str):
    return repo_config(target="aws", role_arn=ROLE_ARN, bucket=BUCKET, **overrides).for_target("aws")


@pytest.fixture
def target(aws_env) -> AwsTarget:
    boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)
    return AwsTarget(aws_config(), poll_seconds=0)


@pytest.fixture
def upserted(target: AwsTarget) -> AwsTarget:
    target.upsert()
    return target


def sagemaker():
    return boto3.client("sagemaker", region_name=REGION)


def register(*statuses: str) -> None:
    group = repo_config().model_package_group
    for status in statuses:
        sagemaker().create_model_package(ModelPackageGroupName=group, InferenceSpecification=SPEC,
                                         ModelApprovalStatus=status)


def test_upsert_creates_then_updates_the_pipeline(target):
    first = target.upsert()
    assert first.created and first.pipeline_name == "kennel"
    described = sagemaker().describe_pipeline(PipelineName="kennel")
    assert described["RoleArn"] == ROLE_ARN
    definition = json.loads(described["PipelineDefinition"])
    assert [step["Name"] for step in definition["Steps"]][-1] == "CheckTestLoss"
    second = target.upsert()
    assert not second.created and second.pipeline_arn == first.pipeline_arn
    described_again = sagemaker().describe_pipeline(PipelineName="kennel")
    assert described_again["PipelineArn"] == first.pipeline_arn
    # The same code lands at the same content-addressed keys: every step's arguments, SageMaker's
    # cache keys among them, are unchanged, so the next run reuses the cached steps.
    assert json.loads(described_again["PipelineDefinition"]) == definition


def test_upsert_uploads_the_code_the_definition_names_to_the_bucket(upserted):
    definition = json.loads(sagemaker().describe_pipeline(PipelineName="kennel")["PipelineDefinition"])
    prepare = definition["Steps"][0]["Arguments"]
    code = next(i for i in prepare["ProcessingInputs"] if i["InputName"] == "code")["S3Input"]["S3Uri"]
    key = code.removeprefix(f"s3://{BUCKET}/") + "sourcedir.tar.gz"
    assert boto3.client("s3", region_name=REGION).head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0
    hyperparameters = definition["Steps"][2]["Arguments"]["HyperParameters"]
    assert hyperparameters["allow-download"] == "True"


def test_upsert_creates_the_group_and_the_approval_rule(upserted):
    config = upserted.config
    groups = sagemaker().list_model_package_groups()["ModelPackageGroupSummaryList"]
    assert [g["ModelPackageGroupName"] for g in groups] == [config.model_package_group]
    events = boto3.client("events", region_name=REGION)
    rule = events.describe_rule(Name="kennel-package-approved")
    pattern = json.loads(rule["EventPattern"])
    assert pattern["detail-type"] == ["SageMaker Model Package State Change"]
    assert pattern["detail"] == {"ModelPackageGroupName": [config.model_package_group],
                                 "ModelApprovalStatus": ["Approved", "Rejected"]}
    (rule_target,) = events.list_targets_by_rule(Rule="kennel-package-approved")["Targets"]
    deploy_pipeline = sagemaker().describe_pipeline(PipelineName="kennel-deploy")
    assert rule_target["Arn"] == deploy_pipeline["PipelineArn"]
    assert rule_target["RoleArn"] == ROLE_ARN
    deploy_steps = json.loads(deploy_pipeline["PipelineDefinition"])["Steps"]
    assert [step["Name"] for step in deploy_steps] == ["Deploy"]


def test_upsert_names_the_missing_bucket(aws_env):
    with pytest.raises(KennelError, match=f"S3 bucket '{BUCKET}' does not exist"):
        AwsTarget(aws_config()).upsert()


def test_upsert_needs_a_role_and_a_bucket(aws_env):
    with pytest.raises(ConfigError, match="KENNEL_ROLE_ARN.*KENNEL_BUCKET"):
        AwsTarget(repo_config().for_target("aws")).upsert()


def test_run_passes_parameter_overrides_and_waits(upserted):
    execution = upserted.start({"Epochs": "2", "MaxJobs": "8", "Architecture": "resnet50"}, wait=True)
    assert execution.status == "Succeeded" and execution.finished
    assert execution.parameters == {"Epochs": "2", "MaxJobs": "8", "Architecture": "resnet50"}
    recorded = sagemaker().list_pipeline_parameters_for_execution(PipelineExecutionArn=execution.execution_arn)
    assert {p["Name"]: p["Value"] for p in recorded["PipelineParameters"]}["MaxJobs"] == "8"


def test_run_refuses_an_endpoint_name_the_role_may_not_deploy_to(upserted):
    """The policy allows endpoints named <endpoint_name>*: a run that would end in AccessDenied in its
    Deploy step, hours later, is refused before it starts; a name under the prefix runs."""
    with pytest.raises(KennelError, match="EndpointName=someone-else: .* endpoints named kennel-endpoint\\* only"):
        upserted.start({"EndpointName": "someone-else"}, wait=False)
    assert sagemaker().list_pipeline_executions(PipelineName="kennel")["PipelineExecutionSummaries"] == []
    execution = upserted.start({"EndpointName": "Kennel-Endpoint-Blue"}, wait=False)  # ARNs are lowercase
    assert execution.parameters == {"EndpointName": "Kennel-Endpoint-Blue"}


def test_run_before_upsert_says_to_upsert(target):
    with pytest.raises(KennelError, match="kennel upsert --target aws"):
        target.start({}, wait=False)


def test_status_shows_the_newest_execution_or_the_one_asked_for(upserted):
    first = upserted.start({"Epochs": "1"}, wait=False)
    second = upserted.start({"Epochs": "3"}, wait=False)
    newest = upserted.status(None)
    assert newest.execution_arn == second.execution_arn and newest.parameters == {"Epochs": "3"}
    assert newest.notes  # moto cannot list steps: said, not raised
    by_id = upserted.status(first.execution_id)
    assert by_id.execution_arn == first.execution_arn
    with pytest.raises(KennelError, match="no execution nope"):
        upserted.status("nope")
    executions = sagemaker().list_pipeline_executions(PipelineName="kennel")["PipelineExecutionSummaries"]
    assert len(executions) == 2


def test_status_without_executions_says_how_to_start_one(upserted):
    with pytest.raises(KennelError, match="no executions yet"):
        upserted.status(None)


def test_models_lists_every_package_with_its_status_newest_first(upserted):
    assert upserted.models() == []
    register("Approved", "PendingManualApproval", "Rejected")
    listed = upserted.models()
    assert [(p.version, p.approval_status) for p in listed] == [
        (3, "Rejected"), (2, "PendingManualApproval"), (1, "Approved")]


def test_models_carry_the_test_metrics_and_the_execution_that_registered_them(upserted):
    evaluation = {"multiclass_classification_metrics": {"loss": {"value": 0.41}, "accuracy": {"value": 0.88}}}
    boto3.client("s3", region_name=REGION).put_object(Bucket=BUCKET, Key="kennel/run/evaluation.json",
                                                       Body=json.dumps(evaluation).encode())
    execution = f"arn:aws:sagemaker:{REGION}:123456789012:pipeline/kennel/execution/abc123"
    metrics = {"ModelQuality": {"Statistics": {"ContentType": "application/json",
                                               "S3Uri": f"s3://{BUCKET}/kennel/run/evaluation.json"}}}
    sagemaker().create_model_package(ModelPackageGroupName=repo_config().model_package_group,
                                     InferenceSpecification=SPEC, ModelApprovalStatus="PendingManualApproval",
                                     ModelMetrics=metrics, MetadataProperties={"GeneratedBy": execution})
    register("PendingManualApproval")  # no metrics: listed all the same
    approved = upserted.approve(1, "test loss 0.41")
    assert approved.metrics == {"test_loss": 0.41, "test_accuracy": 0.88}
    newest, first = upserted.models()
    assert (first.version, first.approval_description, first.execution_arn) == (1, "test loss 0.41", execution)
    assert first.metrics == {"test_loss": 0.41, "test_accuracy": 0.88}
    assert first.metrics_uri == f"s3://{BUCKET}/kennel/run/evaluation.json"
    assert first.history == []  # SageMaker keeps no history of status changes
    assert (newest.version, newest.metrics, newest.metrics_uri) == (2, {}, "")


def test_approve_the_latest_and_reject_a_version(upserted):
    register("PendingManualApproval", "PendingManualApproval")
    approved = upserted.approve(None, "test loss 0.41 on the held-out split")
    assert (approved.version, approved.approval_status) == (2, "Approved")
    rejected = upserted.reject(1, None)
    assert (rejected.version, rejected.approval_status) == (1, "Rejected")
    assert "rolls kennel-endpoint back" in rejected.message and "or deletes it" in rejected.message
    described = sagemaker().describe_model_package(ModelPackageName=approved.arn)
    assert described["ModelApprovalStatus"] == "Approved"
    assert described["ApprovalDescription"] == "test loss 0.41 on the held-out split"


def test_approving_what_does_not_exist_is_one_clear_error(upserted):
    with pytest.raises(KennelError, match="has no packages yet"):
        upserted.approve(None, None)
    register("PendingManualApproval")
    with pytest.raises(KennelError, match="no version 9 .* versions: 1"):
        upserted.reject(9, None)


def test_a_local_folder_is_uploaded_once_and_used_as_input(target, tmp_path):
    data = tmp_path / "pets"
    for name in ("cat/a.png", "dog/b.png", ".DS_Store"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(name.encode())
    uri = target.stage_data(str(data))
    # Outside the default data prefix (s3://BUCKET/kennel/data), whose tree it would otherwise join.
    assert uri.startswith(f"s3://{BUCKET}/kennel/uploads/pets-")
    prefix = uri.removeprefix(f"s3://{BUCKET}/")
    s3 = boto3.client("s3", region_name=REGION)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"])
    assert keys == [f"{prefix}/cat/a.png", f"{prefix}/dog/b.png"]
    assert target.stage_data(str(data)) == uri  # same content, same place
    (data / "dog" / "b.png").write_bytes(b"changed")
    assert target.stage_data(str(data)) != uri  # new content never mixes with the old
    assert target.stage_data("s3://elsewhere/images") == "s3://elsewhere/images"
    with pytest.raises(KennelError, match="not a folder"):
        target.stage_data(str(tmp_path / "missing"))


def test_missing_credentials_are_one_clear_error(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(KennelError, match="no AWS credentials found"):
        AwsTarget(aws_config()).models()


def test_executions_lists_newest_first(upserted):
    first = upserted.start({"Epochs": "1"}, wait=False)
    second = upserted.start({"Epochs": "2"}, wait=False)
    listed = upserted.executions()
    assert [e.execution_arn for e in listed] == [second.execution_arn, first.execution_arn]
    assert all(e.steps == [] and e.status for e in listed)


def test_resume_asks_sagemaker_to_retry_the_execution(upserted, monkeypatch):
    """moto has no RetryPipelineExecution: the request is checked against botocore's shapes."""
    from botocore.stub import ANY, Stubber

    execution = upserted.start({}, wait=False)
    client = upserted.client("sagemaker")
    stub = Stubber(client)
    pipeline_arn = sagemaker().describe_pipeline(PipelineName="kennel")["PipelineArn"]
    stub.add_response("describe_pipeline", {"PipelineArn": pipeline_arn}, {"PipelineName": "kennel"})
    stub.add_response("retry_pipeline_execution", {"PipelineExecutionArn": execution.execution_arn},
                      {"PipelineExecutionArn": execution.execution_arn, "ClientRequestToken": ANY})
    stub.add_response("describe_pipeline_execution", {"PipelineExecutionStatus": "Executing"},
                      {"PipelineExecutionArn": execution.execution_arn})
    stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
        {"StepName": "PrepareData", "StepStatus": "Succeeded"}, {"StepName": "Tune", "StepStatus": "Executing"}]},
        {"PipelineExecutionArn": execution.execution_arn, "SortOrder": "Ascending"})
    stub.add_response("list_pipeline_parameters_for_execution", {"PipelineParameters": []},
                      {"PipelineExecutionArn": execution.execution_arn})
    monkeypatch.setattr(upserted, "client", lambda service: client)
    with stub:
        resumed = upserted.resume(execution.execution_id)
    stub.assert_no_pending_responses()
    assert resumed.status == "Executing"
    assert [(s.name, s.status) for s in resumed.steps] == [("PrepareData", "Succeeded"), ("Tune", "Executing")]


def test_endpoints_show_the_served_version_and_stop_deletes(upserted):
    client = sagemaker()
    client.create_model(ModelName="kennel-models-v3", ExecutionRoleArn=ROLE_ARN,
                        PrimaryContainer={"Image": SPEC["Containers"][0]["Image"]})
    client.create_endpoint_config(EndpointConfigName="kennel-endpoint-v3-0123abcd", ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": "kennel-models-v3", "InitialInstanceCount": 1,
         "InstanceType": "ml.m5.large"}])
    client.create_endpoint(EndpointName="kennel-endpoint", EndpointConfigName="kennel-endpoint-v3-0123abcd")

    (endpoint,) = upserted.endpoints()
    assert endpoint.name == "kennel-endpoint" and endpoint.model_package_version == 3
    assert endpoint.url.endswith("/endpoints/kennel-endpoint/invocations")
    stopped = upserted.stop_endpoint("kennel-endpoint")
    assert stopped.status == "Deleting"
    assert upserted.endpoints() == []


@pytest.fixture
def runtime(target, monkeypatch):
    """The sagemaker-runtime client `predict` uses, behind a Stubber (moto's InvokeEndpoint fails on
    a binary body); the Stubber checks each request against botocore's InvokeEndpoint shape."""
    from botocore.stub import Stubber

    client = boto3.client("sagemaker-runtime", region_name=REGION)
    monkeypatch.setattr(target, "client", lambda service: {"sagemaker-runtime": client}[service])
    with Stubber(client) as stub:
        yield stub
        stub.assert_no_pending_responses()


def streamed(body: bytes):
    import io

    from botocore.response import StreamingBody

    return StreamingBody(io.BytesIO(body), len(body))


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def test_predict_sends_the_image_to_the_endpoint_and_returns_its_json(target, runtime):
    answer = {"predictions": [{"label": "beagle", "probability": 0.91}, {"label": "basset", "probability": 0.05}]}
    runtime.add_response(
        "invoke_endpoint", {"Body": streamed(json.dumps(answer).encode()), "ContentType": "application/json"},
        {"EndpointName": "kennel-endpoint-blue", "Body": PNG, "ContentType": "image/png", "Accept": "application/json"})
    assert target.predict(PNG, "image/png", "kennel-endpoint-blue") == answer


def test_predict_says_what_the_endpoint_or_aws_refused(target, runtime):
    runtime.add_client_error(
        "invoke_endpoint", "ModelError", 'Received client error (415) from primary with message "unsupported '
        'content type". See https://us-east-1.console.aws.amazon.com/cloudwatch/ for more information.',
        http_status_code=424)
    with pytest.raises(KennelError, match="predict: AWS said ModelError: Received client error \\(415\\)"):
        target.predict(b"GIF89a", "image/gif", "kennel-endpoint")
    runtime.add_client_error("invoke_endpoint", "ValidationError",
                             "Endpoint nope of account 123456789012 not found.", http_status_code=400)
    with pytest.raises(KennelError, match="AWS said ValidationError: Endpoint nope .* not found"):
        target.predict(PNG, "image/png", "nope")


def test_predict_names_an_answer_that_is_not_json(target, runtime):
    runtime.add_response("invoke_endpoint", {"Body": streamed(b"<html>hello</html>"), "ContentType": "text/html"})
    with pytest.raises(KennelError, match="endpoint kennel-endpoint answered text/html that is not JSON"):
        target.predict(PNG, "image/png", "kennel-endpoint")


def described_training_job(job: str, arguments: dict, **extra) -> dict:
    """DescribeTrainingJob as AWS answers for a job started from `arguments` (the step's request):
    the request's Debugger and output settings come back as given; an unset rule S3OutputPath stays
    absent and VolumeSizeInGB reads 0 (as in real responses)."""
    from datetime import datetime

    profiler_rules = [{key: value for key, value in rule.items() if key != "InstanceType"} | {"VolumeSizeInGB": 0}
                      for rule in arguments["ProfilerRuleConfigurations"]]
    return {
        "TrainingJobName": job, "TrainingJobArn": TRAINING_JOB_ARN + job,
        "ModelArtifacts": {"S3ModelArtifacts": f"{arguments['OutputDataConfig']['S3OutputPath']}/{job}/output/model.tar.gz"},
        "TrainingJobStatus": "Completed", "SecondaryStatus": "Completed",
        "AlgorithmSpecification": {"TrainingInputMode": "File", "TrainingImage": "image"},
        "OutputDataConfig": arguments["OutputDataConfig"],
        "ResourceConfig": {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600}, "CreationTime": datetime(2026, 11, 22),
        "DebugHookConfig": arguments["DebugHookConfig"], "ProfilerConfig": arguments["ProfilerConfig"],
        "ProfilerRuleConfigurations": profiler_rules, "ProfilingStatus": "Enabled", **extra,
    }


TRAINING_JOB_ARN = "arn:aws:sagemaker:us-east-1:123456789012:training-job/"
RULE_STATUSES = {
    "DebugRuleEvaluationStatuses": [
        {"RuleConfigurationName": "LossNotDecreasing", "RuleEvaluationStatus": "IssuesFound",
         "StatusDetails": "RuleEvaluationConditionMet: loss did not decrease"},
        {"RuleConfigurationName": "Overfit", "RuleEvaluationStatus": "NoIssuesFound"}],
    "ProfilerRuleEvaluationStatuses": [
        {"RuleConfigurationName": "ProfilerReport", "RuleEvaluationStatus": "NoIssuesFound"},
        {"RuleConfigurationName": "LowGPUUtilization", "RuleEvaluationStatus": "NoIssuesFound"}],
}


def status_with_training_job(target: AwsTarget, described: dict, monkeypatch):
    """`kennel status` of a new execution whose TrainWithDebugger step ran the job `described`.
    moto lists no execution steps and keeps no rule statuses: those answers come from a Stubber
    (checked against botocore's shapes); S3 is moto's."""
    from botocore.stub import Stubber

    execution = target.start({}, wait=False)
    client = target.client("sagemaker")
    stub = Stubber(client)
    pipeline_arn = sagemaker().describe_pipeline(PipelineName="kennel")["PipelineArn"]
    stub.add_response("describe_pipeline", {"PipelineArn": pipeline_arn})
    stub.add_response("describe_pipeline_execution", {"PipelineExecutionStatus": "Executing"})
    stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
        {"StepName": "TrainWithDebugger", "StepStatus": "Succeeded",
         "Metadata": {"TrainingJob": {"Arn": described["TrainingJobArn"]}}}]})
    stub.add_response("describe_training_job", described, {"TrainingJobName": described["TrainingJobName"]})
    stub.add_response("list_pipeline_parameters_for_execution", {"PipelineParameters": []})
    s3 = target.client("s3")
    monkeypatch.setattr(target, "client", lambda service: client if service == "sagemaker" else s3)
    with stub:
        status = target.status(execution.execution_id)
    stub.assert_no_pending_responses()
    (step,) = status.steps
    return step


def train_arguments(target: AwsTarget) -> dict:
    definition = json.loads(sagemaker().describe_pipeline(PipelineName="kennel")["PipelineDefinition"])
    return next(step for step in definition["Steps"] if step["Name"] == "TrainWithDebugger")["Arguments"]


def test_status_shows_rule_statuses_and_fetches_the_profiler_report(upserted, monkeypatch, tmp_path):
    """The report is where AWS documents it: <OutputDataConfig.S3OutputPath>/<job>/rule-output/
    <rule configuration name>/profiler-output/, for the job the upserted definition starts."""
    monkeypatch.setenv("KENNEL_HOME", str(tmp_path / ".kennel"))
    job = "pipelines-abc123-TrainWithDebugger-x1Y2z3"
    arguments = train_arguments(upserted)
    assert "S3OutputPath" not in next(r for r in arguments["ProfilerRuleConfigurations"]
                                      if r["RuleConfigurationName"] == "ProfilerReport")
    output = arguments["OutputDataConfig"]["S3OutputPath"]
    assert output != arguments["ProfilerConfig"]["S3OutputPath"]  # the report is not under the profiler's path
    s3 = boto3.client("s3", region_name=REGION)
    report = f"{output}/{job}/rule-output/ProfilerReport/profiler-output/profiler-report.html"
    s3.put_object(Bucket=BUCKET, Key=report.removeprefix(f"s3://{BUCKET}/"), Body=b"<html>report</html>")
    # What the profiler itself writes under ProfilerConfig.S3OutputPath: metrics, never the report.
    metrics = f"{arguments['ProfilerConfig']['S3OutputPath']}/{job}/profiler-output/system/incremental/1.algo-1.json"
    s3.put_object(Bucket=BUCKET, Key=metrics.removeprefix(f"s3://{BUCKET}/"), Body=b"{}")

    step = status_with_training_job(upserted, described_training_job(job, arguments, **RULE_STATUSES), monkeypatch)
    assert step.details[0] == ("Debugger rule LossNotDecreasing: IssuesFound - RuleEvaluationConditionMet: "
                               "loss did not decrease")
    assert step.details[1] == "Debugger rule Overfit: NoIssuesFound"
    assert step.details[2] == "profiler rule ProfilerReport: NoIssuesFound"
    fetched = tmp_path / ".kennel" / "aws-reports" / job / "profiler-report.html"
    assert step.details[4] == f"profiler report: {fetched}"
    assert fetched.read_bytes() == b"<html>report</html>"


def test_a_profiler_rule_with_its_own_output_path_is_read_there(upserted, monkeypatch, tmp_path):
    """A ProfilerReport rule configured with an S3OutputPath (and named the v2 SDK's way) writes there."""
    monkeypatch.setenv("KENNEL_HOME", str(tmp_path / ".kennel"))
    job = "pipelines-def456-TrainWithDebugger-a9B8c7"
    arguments = train_arguments(upserted)
    own = f"s3://{BUCKET}/reports/elsewhere"
    for rule in arguments["ProfilerRuleConfigurations"]:
        if rule["RuleConfigurationName"] == "ProfilerReport":
            rule.update(RuleConfigurationName="ProfilerReport-1764000000", S3OutputPath=own)
    statuses = {"ProfilerRuleEvaluationStatuses": [
        {"RuleConfigurationName": "ProfilerReport-1764000000", "RuleEvaluationStatus": "IssuesFound"}]}
    boto3.client("s3", region_name=REGION).put_object(
        Bucket=BUCKET, Key="reports/elsewhere/profiler-output/profiler-report.html", Body=b"<html>own</html>")

    step = status_with_training_job(upserted, described_training_job(job, arguments, **statuses), monkeypatch)
    fetched = tmp_path / ".kennel" / "aws-reports" / job / "profiler-report.html"
    assert step.details == ["profiler rule ProfilerReport-1764000000: IssuesFound", f"profiler report: {fetched}"]
    assert fetched.read_bytes() == b"<html>own</html>"


def test_a_report_not_written_yet_is_said_not_raised(upserted, monkeypatch, tmp_path):
    monkeypatch.setenv("KENNEL_HOME", str(tmp_path / ".kennel"))
    job = "pipelines-ghi789-TrainWithDebugger-q1W2e3"
    arguments = train_arguments(upserted)
    step = status_with_training_job(upserted, described_training_job(job, arguments, **RULE_STATUSES), monkeypatch)
    output = arguments["OutputDataConfig"]["S3OutputPath"]
    assert step.details[-1] == f"profiler report: not found under {output}/{job}/rule-output/ProfilerReport/"
    assert not (tmp_path / ".kennel" / "aws-reports" / job).exists()
