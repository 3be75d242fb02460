"""The aws target: SageMaker Pipelines, the Model Registry and S3, with the user's credentials."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from local.files import write_bytes_atomic
from local.home import resolve_home
from pipeline import events
from pipeline.config import KennelConfig
from pipeline.definition import definitions, deploy_pipeline_name, pipeline_session, sdk_environment
from pipeline.errors import KennelError
from pipeline.policy import endpoint_name_allowed
from pipeline.targets import (
    UPLOADS_FOLDER,
    Endpoint,
    ExecutionStatus,
    ModelPackage,
    StepStatus,
    UpsertResult,
    dataset_files,
    dataset_name,
    iso_time,
    model_package,
)

log = logging.getLogger("kennel.aws")

APPROVED, REJECTED = "Approved", "Rejected"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def create_target(config: KennelConfig) -> AwsTarget:
    return AwsTarget(config)


@contextlib.contextmanager
def aws_errors(action: str) -> Iterator[None]:
    """Turn botocore and SDK failures into one-line messages that say what to do."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise KennelError(f"{action}: no AWS credentials found; run `aws configure` or `aws sso login`, "
                          "or set AWS_PROFILE / AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
    except NoRegionError:
        raise KennelError(f"{action}: no AWS region; set region in kennel.toml or AWS_REGION") from None
    except ProfileNotFound as error:
        raise KennelError(f"{action}: {error}; fix AWS_PROFILE or ~/.aws/config") from None
    except EndpointConnectionError as error:
        raise KennelError(f"{action}: cannot reach AWS ({error}); check the network and the region") from None
    except ClientError as error:
        details = error.response.get("Error", {})
        code, message = details.get("Code", "Error"), details.get("Message", str(error))
        hint = " (check the IAM permissions of your credentials)" if "AccessDenied" in code else ""
        raise KennelError(f"{action}: AWS said {code}: {message}{hint}") from None
    except BotoCoreError as error:
        raise KennelError(f"{action}: {error}") from None


class AwsTarget:
    """Kennel's commands against one AWS account and region."""

    name = "aws"

    def __init__(self, config: KennelConfig, boto_session: Any = None, poll_seconds: float = 30,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config.for_target("aws")  # e.g. torchvision may download weights here
        self._boto_session = boto_session
        self.poll_seconds = poll_seconds
        self._sleep = sleep

    # --- clients ------------------------------------------------------------------------------
    @property
    def boto_session(self) -> Any:
        if self._boto_session is None:
            import boto3

            with aws_errors("opening an AWS session"):
                self._boto_session = boto3.Session(region_name=self.config.region)
        return self._boto_session

    def client(self, service: str) -> Any:
        """A boto3 client; create it inside `aws_errors`, as creating one resolves the credentials."""
        return self.boto_session.client(service, region_name=self.config.region)

    # --- upsert -------------------------------------------------------------------------------
    def upsert(self) -> UpsertResult:
        """Create or update the pipeline (and the approval rule's deploy pipeline)."""
        self.config.require_aws()
        messages: list[str] = []
        with aws_errors("upsert"):
            self._check_bucket()
            if self._ensure_model_package_group():
                messages.append(f"created model package group {self.config.model_package_group}")
            main, deploy = self._build_definitions()
            arn, created = self._create_or_update(self.config.pipeline_name, main,
                                                  "Kennel: prepare, tune, train, evaluate, register, deploy")
            if self.config.approval_rule:
                deploy_arn, _ = self._create_or_update(deploy_pipeline_name(self.config), deploy,
                                                       "Kennel: deploy the newest Approved package")
                self._put_approval_rule(deploy_arn)
                messages.append(f"approval rule {events.rule_name(self.config)} starts "
                                f"{deploy_pipeline_name(self.config)} when a package is approved")
        return UpsertResult(self.config.pipeline_name, arn, created, messages)

    def _check_bucket(self) -> None:
        from botocore.exceptions import ClientError

        bucket = self.config.bucket
        try:
            self.client("s3").head_bucket(Bucket=bucket)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise KennelError(f"S3 bucket {bucket!r} does not exist; create it (aws s3 mb s3://{bucket} "
                                  f"--region {self.config.region}) or set KENNEL_BUCKET") from None
            if code in ("403", "AccessDenied"):
                raise KennelError(f"no access to S3 bucket {bucket!r}; grant s3:ListBucket/PutObject on it "
                                  "or set KENNEL_BUCKET to a bucket you own") from None
            raise

    def _ensure_model_package_group(self) -> bool:
        """Create the group if missing (registration fails without it). True if created."""
        sagemaker = self.client("sagemaker")
        group = self.config.model_package_group
        if any(g["ModelPackageGroupName"] == group for g in _model_package_groups(sagemaker, group)):
            return False
        sagemaker.create_model_package_group(
            ModelPackageGroupName=group,
            ModelPackageGroupDescription=f"Image classifiers registered by the {self.config.pipeline_name} pipeline",
        )
        return True

    def _build_definitions(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both definitions, their code bundles uploaded to the configured bucket."""
        with sdk_environment(self.config):
            from sagemaker.core.helper.iam_role_resolver import RoleValidationError

            session = pipeline_session(self.config, self.boto_session)
            try:
                return definitions(self.config, session)
            except RoleValidationError as error:
                first_line = str(error).strip().splitlines()[0]
                raise KennelError(f"the execution role {self.config.role_arn} cannot be used: {first_line}; "
                                  "see pipeline/execution_role_policy.json") from None

    def _create_or_update(self, name: str, definition: dict[str, Any], description: str) -> tuple[str, bool]:
        from botocore.exceptions import ClientError

        sagemaker = self.client("sagemaker")
        request = {"PipelineName": name, "PipelineDefinition": json.dumps(definition),
                   "PipelineDescription": description, "RoleArn": self.config.role_arn}
        try:
            sagemaker.describe_pipeline(PipelineName=name)
        except ClientError as error:
            if not _not_found(error):
                raise
            arn = sagemaker.create_pipeline(ClientRequestToken=_token(name, definition), **request)["PipelineArn"]
            return arn, True
        return sagemaker.update_pipeline(**request)["PipelineArn"], False

    def _put_approval_rule(self, deploy_pipeline_arn: str) -> None:
        client = self.client("events")
        client.put_rule(**events.put_rule_request(self.config))
        client.put_targets(**events.put_targets_request(self.config, deploy_pipeline_arn))

    # --- data ---------------------------------------------------------------------------------
    def stage_data(self, data: str) -> str:
        """An s3:// URI as is; a local folder uploaded once to s3://BUCKET/PREFIX/uploads/<name>-<hash>
        (outside the default data prefix, whose ImageFolder tree an upload would otherwise join)."""
        if data.startswith("s3://"):
            return data
        self.config.require_aws()
        folder = Path(data).expanduser()
        if not folder.is_dir():
            raise KennelError(f"--data {data}: not a folder or an s3:// URI; give an ImageFolder tree")
        files = dataset_files(folder)
        if not files:
            raise KennelError(f"--data {data}: the folder holds no files")
        key_prefix = f"{self.config.prefix}/{UPLOADS_FOLDER}/{dataset_name(folder, files)}"
        with aws_errors(f"uploading {folder}"):
            s3 = self.client("s3")
            if s3.list_objects_v2(Bucket=self.config.bucket, Prefix=key_prefix + "/", MaxKeys=1).get("KeyCount"):
                log.info("%s is already uploaded", folder)
            else:
                for path in files:
                    s3.upload_file(str(path), self.config.bucket, f"{key_prefix}/{path.relative_to(folder).as_posix()}")
                log.info("uploaded %d files from %s", len(files), folder)
        return f"s3://{self.config.bucket}/{key_prefix}"

    # --- executions ---------------------------------------------------------------------------
    def start(self, parameters: Mapping[str, str], wait: bool) -> ExecutionStatus:
        self._check_endpoint_name(parameters.get("EndpointName"))
        with aws_errors("run"):
            sagemaker = self.client("sagemaker")
            self._require_pipeline(sagemaker)
            arn = sagemaker.start_pipeline_execution(
                PipelineName=self.config.pipeline_name,
                PipelineParameters=[{"Name": k, "Value": v} for k, v in parameters.items()],
                PipelineExecutionDescription="started by kennel run",
            )["PipelineExecutionArn"]
            log.info("started execution %s", arn.rsplit("/", 1)[-1])
            execution = self._describe(sagemaker, arn)
            seen: dict[str, str] = {}
            while wait and not execution.finished:
                self._sleep(self.poll_seconds)
                execution = self._describe(sagemaker, arn)
                _log_changes(execution, seen)
        return execution

    def _check_endpoint_name(self, name: str | None) -> None:
        """Refuse, before hours of training, an EndpointName the execution role may not deploy to."""
        if name is None or endpoint_name_allowed(self.config, name):
            return
        prefix = self.config.endpoint_name
        raise KennelError(
            f"--param EndpointName={name}: the execution role's policy (kennel policy) allows the Deploy step "
            f"endpoints named {prefix}* only; choose a name starting with {prefix!r} (e.g. {prefix}-blue), or set "
            f"endpoint_name (KENNEL_ENDPOINT_NAME) to {name!r} and apply `kennel policy` to the role again")

    def status(self, execution: str | None) -> ExecutionStatus:
        with aws_errors("status"):
            sagemaker = self.client("sagemaker")
            pipeline_arn = self._require_pipeline(sagemaker)
            if execution is None:
                summaries = sagemaker.list_pipeline_executions(
                    PipelineName=self.config.pipeline_name, SortBy="CreationTime", SortOrder="Descending",
                    MaxResults=1)["PipelineExecutionSummaries"]
                if not summaries:
                    raise KennelError(f"pipeline {self.config.pipeline_name} has no executions yet; "
                                      "start one with `kennel run --target aws`")
                arn = _newest(summaries)["PipelineExecutionArn"]
            elif execution.startswith("arn:"):
                arn = execution
            else:
                arn = f"{pipeline_arn}/execution/{execution}"
            return self._describe(sagemaker, arn)

    def executions(self) -> list[ExecutionStatus]:
        """The pipeline's most recent executions, newest first (without their steps)."""
        with aws_errors("status"):
            sagemaker = self.client("sagemaker")
            self._require_pipeline(sagemaker)
            summaries = sagemaker.list_pipeline_executions(
                PipelineName=self.config.pipeline_name, SortBy="CreationTime", SortOrder="Descending",
                MaxResults=20)["PipelineExecutionSummaries"]
        # Newest first; equal times go to the one listed later, as in _newest (emulators list oldest first).
        summaries = [summary for _, summary in sorted(
            enumerate(summaries), key=lambda pair: (pair[1].get("StartTime") or _EPOCH, pair[0]), reverse=True)]
        return [
            ExecutionStatus(execution_arn=summary["PipelineExecutionArn"], pipeline_name=self.config.pipeline_name,
                            status=summary.get("PipelineExecutionStatus", ""), started=iso_time(summary.get("StartTime")))
            for summary in summaries
        ]

    def resume(self, execution_id: str) -> ExecutionStatus:
        """RetryPipelineExecution: SageMaker re-runs the failed steps and keeps what succeeded."""
        with aws_errors("resume"):
            sagemaker = self.client("sagemaker")
            pipeline_arn = self._require_pipeline(sagemaker)
            arn = execution_id if execution_id.startswith("arn:") else f"{pipeline_arn}/execution/{execution_id}"
            sagemaker.retry_pipeline_execution(PipelineExecutionArn=arn,
                                               ClientRequestToken=hashlib.sha256(f"{arn}{time.time()}".encode())
                                               .hexdigest()[:32])
            return self._describe(sagemaker, arn)

    def _require_pipeline(self, sagemaker: Any) -> str:
        from botocore.exceptions import ClientError

        try:
            return sagemaker.describe_pipeline(PipelineName=self.config.pipeline_name)["PipelineArn"]
        except ClientError as error:
            if _not_found(error):
                raise KennelError(f"pipeline {self.config.pipeline_name} does not exist in {self.config.region}; "
                                  "create it with `kennel upsert --target aws`") from None
            raise

    def _describe(self, sagemaker: Any, arn: str) -> ExecutionStatus:
        from botocore.exceptions import ClientError

        try:
            described = sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
        except ClientError as error:
            if _not_found(error):
                raise KennelError(f"no execution {arn.rsplit('/', 1)[-1]} of pipeline "
                                  f"{self.config.pipeline_name}; list them with `kennel status`") from None
            raise
        steps, notes = self._steps(sagemaker, arn)
        parameters = sagemaker.list_pipeline_parameters_for_execution(PipelineExecutionArn=arn)
        return ExecutionStatus(
            execution_arn=arn,
            pipeline_name=self.config.pipeline_name,
            status=described["PipelineExecutionStatus"],
            started=iso_time(described.get("CreationTime")),
            failure_reason="" if described.get("FailureReason") in (None, "", "None")
            else described["FailureReason"],
            parameters={p["Name"]: p["Value"] for p in parameters.get("PipelineParameters", [])},
            steps=steps,
            notes=notes,
        )

    def _steps(self, sagemaker: Any, arn: str) -> tuple[list[StepStatus], list[str]]:
        """The execution's steps, oldest first; a refusal becomes a note, not a failure."""
        from botocore.exceptions import ClientError

        steps: list[StepStatus] = []
        try:
            for page in sagemaker.get_paginator("list_pipeline_execution_steps").paginate(
                    PipelineExecutionArn=arn, SortOrder="Ascending"):
                for step in page.get("PipelineExecutionSteps", []):
                    steps.append(StepStatus(
                        name=step["StepName"], status=step.get("StepStatus", ""),
                        started=iso_time(step.get("StartTime")), ended=iso_time(step.get("EndTime")),
                        failure_reason=step.get("FailureReason", ""),
                        details=self._training_details(sagemaker, step)))
        except ClientError as error:
            return [], [f"steps not listed: {error}"]
        return steps, []

    def _training_details(self, sagemaker: Any, step: Mapping[str, Any]) -> list[str]:
        """A training step's Debugger and profiler rule statuses (DescribeTrainingJob), and its
        profiler report fetched to the local state folder once the ProfilerReport rule is done."""
        from botocore.exceptions import ClientError

        arn = ((step.get("Metadata") or {}).get("TrainingJob") or {}).get("Arn")
        if not arn:
            return []
        job_name = arn.rsplit("/", 1)[-1]
        try:
            job = sagemaker.describe_training_job(TrainingJobName=job_name)
        except ClientError as error:
            return [f"training job {job_name} not described: {error}"]
        lines = []
        for kind, key in (("Debugger rule", "DebugRuleEvaluationStatuses"),
                          ("profiler rule", "ProfilerRuleEvaluationStatuses")):
            for status in job.get(key) or []:
                detail = str(status.get("StatusDetails") or "").splitlines()[:1]
                lines.append(f"{kind} {status.get('RuleConfigurationName')}: {status.get('RuleEvaluationStatus')}"
                             + (f" - {detail[0][:200]}" if detail and detail[0] else ""))
        report = self._fetch_profiler_report(job)
        if report:
            lines.append(f"profiler report: {report}")
        return lines

    def _fetch_profiler_report(self, job: Mapping[str, Any]) -> str:
        """The HTML the ProfilerReport rule wrote, copied under the state folder once the rule is done.

        Where it lies (profiler_report_prefix): under the rule's own S3OutputPath when its
        configuration sets one, otherwise under the training job's OutputDataConfig.S3OutputPath
        (AWS: `<output path>/<job>/rule-output/<rule configuration name>/profiler-output/`), not under
        ProfilerConfig.S3OutputPath, which holds the profiler's metrics only.
        """
        from botocore.exceptions import ClientError

        rule = profiler_report_rule(job)
        done = rule is not None and any(
            s.get("RuleConfigurationName") == rule["RuleConfigurationName"]
            and s.get("RuleEvaluationStatus") in ("NoIssuesFound", "IssuesFound")
            for s in job.get("ProfilerRuleEvaluationStatuses") or [])
        prefix = profiler_report_prefix(job, rule) if done else ""
        if not prefix:
            return ""
        name = job["TrainingJobName"]
        target = resolve_home() / "aws-reports" / name / "profiler-report.html"
        if target.exists():
            return str(target)
        bucket, _, key_prefix = prefix.removeprefix("s3://").partition("/")
        s3 = self.client("s3")
        try:
            keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix)
                    for item in page.get("Contents", []) if item["Key"].endswith(REPORT_KEY)]
            if not keys:
                return f"not found under {prefix}"
            key = min(keys, key=len)
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as error:
            return f"{prefix} (not fetched: {error})"
        write_bytes_atomic(target, body)
        return str(target)

    # --- registry -----------------------------------------------------------------------------
    def models(self) -> list[ModelPackage]:
        """Every package, newest first, each with its test metrics and the execution that made it."""
        with aws_errors("models"):
            sagemaker = self.client("sagemaker")
            return [self._described_package(sagemaker, package.arn) for package in self._packages(sagemaker)]

    def _described_package(self, sagemaker: Any, arn: str) -> ModelPackage:
        """DescribeModelPackage, with the test metrics read from the evaluation.json it names.
        SageMaker keeps no history of status changes, so `history` stays empty here."""
        described = sagemaker.describe_model_package(ModelPackageName=arn)
        package = model_package(described)
        return model_package(described, self._evaluation(package.metrics_uri)) if package.metrics_uri else package

    def _evaluation(self, uri: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            return json.loads(self.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
        except (ClientError, ValueError) as error:
            log.warning("model metrics %s not read: %s", uri, error)  # the package is listed all the same
            return None

    def approve(self, version: int | None, reason: str | None) -> ModelPackage:
        return self._set_status(version, APPROVED, reason)

    def reject(self, version: int | None, reason: str | None) -> ModelPackage:
        return self._set_status(version, REJECTED, reason)

    def _set_status(self, version: int | None, status: str, reason: str | None) -> ModelPackage:
        verb = "approve" if status == APPROVED else "reject"
        with aws_errors(verb):
            sagemaker = self.client("sagemaker")
            package = _choose(self._packages(sagemaker), version, self.config.model_package_group)
            request: dict[str, Any] = {"ModelPackageArn": package.arn, "ModelApprovalStatus": status}
            if reason:
                request["ApprovalDescription"] = reason
            sagemaker.update_model_package(**request)
            described = self._described_package(sagemaker, package.arn)
        # The same rule as the local target's: the newest Approved package serves, and with none
        # left an endpoint serving a rejected package is deleted (deploy.py).
        endpoint = self.config.endpoint_name
        effect = (f"serves the newest Approved package on {endpoint}" if status == APPROVED else
                  f"rolls {endpoint} back to the newest Approved package, or deletes it if it served this "
                  "version and none is left")
        message = (f"the approval rule starts {deploy_pipeline_name(self.config)}, which {effect}"
                   if self.config.approval_rule else
                   "no approval rule installed (approval_rule = false): run the pipeline's Deploy step "
                   "or `kennel run` to update the endpoint")
        return dataclasses.replace(described, message=message)

    # --- endpoints ------------------------------------------------------------------------------
    def endpoints(self) -> list[Endpoint]:
        """Endpoints whose name starts with the configured endpoint name."""
        with aws_errors("endpoints"):
            sagemaker = self.client("sagemaker")
            summaries = sagemaker.list_endpoints(NameContains=self.config.endpoint_name,
                                                 SortBy="CreationTime", SortOrder="Descending")["Endpoints"]
            return [self._endpoint(sagemaker, summary["EndpointName"]) for summary in summaries]

    def _endpoint(self, sagemaker: Any, name: str) -> Endpoint:
        described = sagemaker.describe_endpoint(EndpointName=name)
        config_name = described.get("EndpointConfigName", "")
        # deploy.py names configs <endpoint>-v<package version>-<shape hash> (resource_names).
        match = re.search(r"-v(\d+)-[0-9a-f]{8}$", config_name)
        return Endpoint(name=name, status=described["EndpointStatus"],
                        url=f"https://runtime.sagemaker.{self.config.region}.amazonaws.com/endpoints/{name}/invocations",
                        model_package_version=int(match.group(1)) if match else None,
                        detail=described.get("FailureReason", "") or f"config {config_name}")

    def stop_endpoint(self, name: str) -> Endpoint:
        """DeleteEndpoint (the endpoint config and model stay, so a redeploy is quick)."""
        with aws_errors("endpoint stop"):
            sagemaker = self.client("sagemaker")
            endpoint = self._endpoint(sagemaker, name)
            sagemaker.delete_endpoint(EndpointName=name)
        return dataclasses.replace(endpoint, status="Deleting")

    def predict(self, body: bytes, content_type: str, endpoint: str) -> dict[str, Any]:
        with aws_errors("predict"):
            runtime = self.client("sagemaker-runtime")
            answer = runtime.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType=content_type,
                                             Accept="application/json")
            payload = answer["Body"].read()
        try:
            return json.loads(payload)
        except ValueError:
            raise KennelError(f"predict: endpoint {endpoint} answered {answer.get('ContentType', 'a body')} that is "
                              f"not JSON ({payload[:80]!r}); is it serving a Kennel model?") from None

    def _packages(self, sagemaker: Any) -> list[ModelPackage]:
        """Every package of the group, newest version first."""
        packages = []
        paginator = sagemaker.get_paginator("list_model_packages")
        for page in paginator.paginate(ModelPackageGroupName=self.config.model_package_group,
                                       ModelPackageType="Versioned"):
            packages.extend(model_package(summary) for summary in page.get("ModelPackageSummaryList", []))
        return sorted(packages, key=lambda p: p.version, reverse=True)


def _log_changes(execution: ExecutionStatus, seen: dict[str, str]) -> None:
    """One line per step (and for the execution) whose status changed since the last poll."""
    for name, status in [(step.name, step.status) for step in execution.steps] + [("execution", execution.status)]:
        if seen.get(name) != status:
            seen[name] = status
            log.info("%s: %s", name, status)


# The ProfilerReport rule's HTML, under its rule output folder.
REPORT_KEY = "profiler-output/profiler-report.html"
PROFILER_REPORT_RULE = "ProfilerReport"


def profiler_report_rule(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The job's ProfilerReport rule configuration (DescribeTrainingJob's ProfilerRuleConfigurations),
    found by the rule it invokes: the name is free (the v2 SDK named it ProfilerReport-<timestamp>)."""
    configurations = job.get("ProfilerRuleConfigurations") or []
    for configuration in configurations:
        if (configuration.get("RuleParameters") or {}).get("rule_to_invoke") == PROFILER_REPORT_RULE:
            return dict(configuration)
    for configuration in configurations:
        if str(configuration.get("RuleConfigurationName", "")).startswith(PROFILER_REPORT_RULE):
            return dict(configuration)
    # A job described without its configurations: the statuses still name the rule.
    for status in job.get("ProfilerRuleEvaluationStatuses") or []:
        if str(status.get("RuleConfigurationName", "")).startswith(PROFILER_REPORT_RULE):
            return {"RuleConfigurationName": status["RuleConfigurationName"]}
    return None


def profiler_report_prefix(job: Mapping[str, Any], rule: Mapping[str, Any]) -> str:
    """The S3 prefix under which the ProfilerReport rule writes `REPORT_KEY`.

    AWS documents the default: `<OutputDataConfig.S3OutputPath>/<job>/rule-output/<rule name>/`.
    A rule configuration with its own S3OutputPath writes there instead.
    """
    explicit = str(rule.get("S3OutputPath") or "")
    if explicit:
        return explicit.rstrip("/") + "/"
    output = str((job.get("OutputDataConfig") or {}).get("S3OutputPath") or "")
    if not output:
        return ""
    return "/".join([output.rstrip("/"), job["TrainingJobName"], "rule-output", rule["RuleConfigurationName"], ""])


def _newest(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest of the summaries returned (SageMaker returns one; an emulator may return all,
    oldest first, hence the scan and the tie going to the later one)."""
    return max(reversed(summaries), key=lambda summary: summary.get("StartTime") or _EPOCH)


def _choose(packages: list[ModelPackage], version: int | None, group: str) -> ModelPackage:
    if not packages:
        raise KennelError(f"model package group {group} has no packages yet; a pipeline run registers one")
    if version is None:
        return packages[0]
    for package in packages:
        if package.version == version:
            return package
    known = ", ".join(str(p.version) for p in packages)
    raise KennelError(f"no version {version} in model package group {group}; versions: {known}")


def _model_package_groups(sagemaker: Any, name: str) -> list[dict[str, Any]]:
    groups = []
    for page in sagemaker.get_paginator("list_model_package_groups").paginate(NameContains=name):
        groups.extend(page.get("ModelPackageGroupSummaryList", []))
    return groups


def _not_found(error: Any) -> bool:
    details = error.response.get("Error", {})
    message = str(details.get("Message", "")).lower()
    return details.get("Code") in ("ValidationException", "ResourceNotFound") and (
        "could not find" in message or "does not exist" in message)


def _token(name: str, definition: dict[str, Any]) -> str:
    """Idempotency token: a retried create with the same definition creates nothing twice."""
    return hashlib.sha256((name + json.dumps(definition, sort_keys=True)).encode()).hexdigest()[:64]
