"""The pipeline definition: valid requests for the SageMaker APIs, wired as the DAG says.

Every step's Arguments are checked against botocore's own model of the API SageMaker calls for
that step, after each pipeline expression is replaced by a value of the member's type (walking
the botocore shape alongside the arguments). Parameters are replaced by their defaults, so the
defaults are checked too, and an Integer parameter where the API wants a string is an error.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.model import Shape
from botocore.validate import ParamValidator
from kennel_support import repo_config

import contract

SAGEMAKER = botocore.session.get_session().get_service_model("sagemaker")
# Step type -> (API SageMaker calls, the name member it fills in at run time)
STEP_APIS = {
    "Processing": ("CreateProcessingJob", "ProcessingJobName"),
    "Training": ("CreateTrainingJob", "TrainingJobName"),
    "Tuning": ("CreateHyperParameterTuningJob", "HyperParameterTuningJobName"),
    "RegisterModel": ("CreateModelPackage", None),
    "Model": ("CreateModel", "ModelName"),
}
EXPRESSIONS = ("Get", "Std:Join", "Std:JsonGet")
PARAMETER_KINDS = {"string": "String", "integer": "Integer", "long": "Integer", "float": "Float",
                   "double": "Float", "boolean": "Boolean"}


# --- the checker ---------------------------------------------------------------------------------
class RequestChecker:
    """Resolves expressions against a botocore shape and collects what botocore would not."""

    def __init__(self, parameters: list[dict[str, Any]]):
        self.parameters = {p["Name"]: p for p in parameters}
        self.problems: list[str] = []

    def resolve(self, value: Any, shape: Shape, path: str) -> Any:
        if _is_expression(value):
            return self.sample(value, shape, path)
        if shape.type_name == "structure" and isinstance(value, dict):
            return {key: self.resolve(item, shape.members[key], f"{path}.{key}") if key in shape.members
                    else item for key, item in value.items()}
        if shape.type_name == "list" and isinstance(value, list):
            return [self.resolve(item, shape.member, f"{path}[{i}]") for i, item in enumerate(value)]
        if shape.type_name == "map" and isinstance(value, dict):
            return {key: self.resolve(item, shape.value, f"{path}[{key}]") for key, item in value.items()}
        self.check_literal(value, shape, path)
        return value

    def sample(self, expression: dict[str, Any], shape: Shape, path: str) -> Any:
        """A value of `shape`'s type standing for `expression` (a parameter: its default)."""
        (kind, body), = expression.items()
        if kind == "Std:Join":
            if shape.type_name != "string":
                self.problems.append(f"{path}: Std:Join makes a string, the API wants {shape.type_name}")
            return body["On"].join(str(self.join_part(part)) for part in body["Values"])
        if kind == "Get" and body.startswith("Parameters."):
            return self.parameter(body.removeprefix("Parameters."), shape, path)
        if kind == "Get" and body.startswith("Execution."):
            if shape.type_name != "string":
                self.problems.append(f"{path}: {body} is a string, the API wants {shape.type_name}")
            return "execution-0123456789ab"
        return _sample_of(shape)  # a step property or a JsonGet: typed by the API member

    def join_part(self, part: Any) -> Any:
        if isinstance(part, dict) and part.get("Get", "").startswith("Parameters."):
            return self.parameters[part["Get"].removeprefix("Parameters.")]["DefaultValue"]
        return "part" if _is_expression(part) else part

    def parameter(self, name: str, shape: Shape, path: str) -> Any:
        if name not in self.parameters:
            self.problems.append(f"{path}: parameter {name} is not declared")
            return _sample_of(shape)
        declared = self.parameters[name]["Type"]
        wanted = PARAMETER_KINDS.get(shape.type_name)
        if declared != wanted:
            self.problems.append(f"{path}: {declared} parameter {name} where the API wants {shape.type_name}")
            return _sample_of(shape)
        value = self.parameters[name]["DefaultValue"]
        self.check_literal(value, shape, f"{path} (default of {name})")
        return value

    def check_literal(self, value: Any, shape: Shape, path: str) -> None:
        """What ParamValidator leaves out: enums, patterns and maxima."""
        if isinstance(value, str) and shape.type_name == "string":
            if shape.enum and value not in shape.enum:
                self.problems.append(f"{path}: {value!r} is not one of the API's values")
            pattern = shape.metadata.get("pattern")
            if pattern and _compiles(pattern) and not re.fullmatch(pattern, value):
                self.problems.append(f"{path}: {value!r} does not match {pattern}")
            if len(value) > shape.metadata.get("max", len(value)):
                self.problems.append(f"{path}: {value!r} is longer than {shape.metadata['max']}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "max" in shape.metadata:
            if value > shape.metadata["max"]:
                self.problems.append(f"{path}: {value} is above {shape.metadata['max']}")


def _is_expression(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in EXPRESSIONS


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:  # Java-only syntax (\p{L}); botocore does not check patterns either
        return False
    return True


def _sample_of(shape: Shape) -> Any:
    if shape.type_name == "string":
        return shape.enum[0] if shape.enum else "x" * max(1, shape.metadata.get("min", 1))
    if shape.type_name in ("integer", "long"):
        return max(1, shape.metadata.get("min", 1))
    if shape.type_name in ("float", "double"):
        return float(max(0.5, shape.metadata.get("min", 0.5)))
    if shape.type_name == "boolean":
        return True
    if shape.type_name == "list":
        return [_sample_of(shape.member)]
    return {}


def check_step(step: dict[str, Any], parameters: list[dict[str, Any]]) -> list[str]:
    """Problems with one step's Arguments as a request to its API (empty: valid)."""
    operation_name, name_member = STEP_APIS[step["Type"]]
    input_shape = SAGEMAKER.operation_model(operation_name).input_shape
    checker = RequestChecker(parameters)
    request = checker.resolve(copy.deepcopy(step["Arguments"]), input_shape, step["Name"])
    if name_member:
        request[name_member] = f"pipelines-{step['Name'].lower()}"  # SageMaker names the job at run time
    report = ParamValidator().validate(request, input_shape)
    problems = list(checker.problems)
    if report.has_errors():
        problems.append(report.generate_report())
    return problems


def job_steps(definition: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step that calls an API, the condition's branches included."""
    found = []
    for step in definition["Steps"]:
        if step["Type"] == "Condition":
            found += job_steps({"Steps": step["Arguments"]["IfSteps"] + step["Arguments"]["ElseSteps"]})
        elif step["Type"] in STEP_APIS:
            found.append(step)
    return found


def all_steps(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    steps = {}
    for step in definition["Steps"]:
        steps[step["Name"]] = step
        if step["Type"] == "Condition":
            steps.update(all_steps({"Steps": step["Arguments"]["IfSteps"] + step["Arguments"]["ElseSteps"]}))
    return steps


# --- the checker catches what it should ------------------------------------------------------------
def test_checker_rejects_an_integer_parameter_in_a_string_member(offline_builds):
    definition = offline_builds["local"].definition
    train = copy.deepcopy(all_steps(definition)["TrainWithDebugger"])
    train["Arguments"]["HyperParameters"]["image-size"] = {"Get": "Parameters.ImageSize"}
    problems = check_step(train, definition["Parameters"])
    assert any("Integer parameter ImageSize" in problem for problem in problems)


def test_checker_rejects_missing_and_unknown_members_and_bad_enums(offline_builds):
    definition = offline_builds["local"].definition
    prepare = copy.deepcopy(all_steps(definition)["PrepareData"])
    del prepare["Arguments"]["AppSpecification"]["ImageUri"]
    prepare["Arguments"]["ProcessingResources"]["ClusterConfig"]["VolumeSizeInGigabytes"] = 30
    prepare["Arguments"]["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3UploadMode"] = "Whenever"
    problems = "\n".join(check_step(prepare, definition["Parameters"]))
    assert "ImageUri" in problems
    assert "VolumeSizeInGigabytes" in problems
    assert "'Whenever' is not one of the API's values" in problems


def test_checker_checks_parameter_defaults_against_the_api(offline_builds):
    definition = offline_builds["local"].definition
    parameters = copy.deepcopy(definition["Parameters"])
    for parameter in parameters:
        if parameter["Name"] == "ProcessingInstanceType":
            parameter["DefaultValue"] = "m5.xlarge"  # missing the ml. prefix
    problems = check_step(all_steps(definition)["PrepareData"], parameters)
    assert any("'m5.xlarge' is not one of the API's values" in problem for problem in problems)


# --- the definition ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["local", "aws"])
def test_every_step_is_a_valid_request_for_its_api(offline_builds, target):
    definition = offline_builds[target].definition
    steps = job_steps(definition)
    assert {step["Type"] for step in steps} == {"Processing", "Tuning", "Training", "RegisterModel"}
    problems = {step["Name"]: check_step(step, definition["Parameters"]) for step in steps}
    assert {name: found for name, found in problems.items() if found} == {}


def test_deploy_pipeline_is_a_valid_request_too(offline_builds):
    definition = offline_builds["aws"].deploy_definition
    assert [step["Name"] for step in definition["Steps"]] == ["Deploy"]
    assert check_step(definition["Steps"][0], definition["Parameters"]) == []


def test_steps_are_chained_as_the_dag(offline_builds):
    definition = offline_builds["local"].definition
    assert [step["Name"] for step in definition["Steps"]] == [
        "PrepareData", "Tune", "TrainWithDebugger", "Evaluate", "CheckTestLoss"]
    text = json.dumps(all_steps(definition)["Tune"]["Arguments"])
    for split in contract.TRAIN_CHANNELS:
        assert f"Steps.PrepareData.ProcessingOutputConfig.Outputs['{split}'].S3Output.S3Uri" in text
    evaluate_inputs = {i["InputName"]: i["S3Input"]["S3Uri"]
                       for i in all_steps(definition)["Evaluate"]["Arguments"]["ProcessingInputs"]}
    assert evaluate_inputs["model"] == {"Get": "Steps.TrainWithDebugger.ModelArtifacts.S3ModelArtifacts"}
    assert evaluate_inputs["test"] == {
        "Get": "Steps.PrepareData.ProcessingOutputConfig.Outputs['test'].S3Output.S3Uri"}


def test_training_takes_the_best_trials_hyperparameters(offline_builds):
    steps = all_steps(offline_builds["local"].definition)
    hyperparameters = steps["TrainWithDebugger"]["Arguments"]["HyperParameters"]
    ranges = steps["Tune"]["Arguments"]["HyperParameterTuningJobConfig"]["ParameterRanges"]
    tuned = {r["Name"] for kind in ranges.values() for r in kind}
    assert tuned == {"lr", "batch-size", "epochs"}
    for name in tuned:
        assert hyperparameters[name] == {"Get": f"Steps.Tune.BestTrainingJob.TunedHyperParameters['{name}']"}


def test_final_training_runs_under_torchrun_across_every_gpu_and_instance(offline_builds, tmp_path):
    """The drivers uploaded for TrainWithDebugger make the SDK's own torchrun driver launch train.py
    once per GPU on every host, so TrainingInstanceCount > 1 trains one model, not N copies."""
    import subprocess
    import sys

    build = offline_builds["aws"]
    steps = all_steps(build.definition)
    train = steps["TrainWithDebugger"]["Arguments"]
    assert train["ResourceConfig"]["InstanceCount"] == {"Get": "Parameters.TrainingInstanceCount"}
    # A trial would run independent copies of train.py on extra instances: one instance each.
    assert steps["Tune"]["Arguments"]["TrainingJobDefinition"]["ResourceConfig"]["InstanceCount"] == 1
    drivers_uri = next(channel["DataSource"]["S3DataSource"]["S3Uri"] for channel in train["InputDataConfig"]
                       if channel["ChannelName"] == "sm_drivers").rstrip("/") + "/"
    drivers = {key[len(drivers_uri):]: body for key, body in build.objects.items() if key.startswith(drivers_uri)}
    assert json.loads(drivers["sourcecode.json"])["entry_script"] == "train.py"
    assert "distributed_drivers/torchrun_driver.py" in drivers["sm_train.sh"].decode()
    distributed = json.loads(drivers["distributed.json"])
    assert distributed["process_count_per_node"] is None  # the driver's default: one per GPU
    for name, body in drivers.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(body)
    probe = ("import json, torchrun_driver; print(json.dumps(torchrun_driver.create_commands()))")
    environment = {"SM_ENTRY_SCRIPT": "train.py", "SM_DISTRIBUTED_CONFIG": json.dumps(distributed),
                   "SM_HPS": json.dumps({"lr": "0.001"}), "SM_HOST_COUNT": "2", "SM_NUM_GPUS": "4",
                   "SM_MASTER_ADDR": "algo-1", "SM_MASTER_PORT": "7777", "SM_CURRENT_HOST_RANK": "1",
                   "PATH": "/usr/bin:/bin"}
    completed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path / "distributed_drivers",
                               env=environment, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    command = json.loads(completed.stdout.strip().splitlines()[-1])
    assert command[:3] == ["torchrun", "--nnodes=2", "--nproc_per_node=4"]
    assert "--node_rank=1" in command and "train.py" in command


def test_tuning_minimizes_the_validation_loss_that_train_py_prints(offline_builds):
    tune = all_steps(offline_builds["local"].definition)["Tune"]["Arguments"]
    config = tune["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Minimize", "MetricName": contract.OBJECTIVE_METRIC}
    assert config["Strategy"] == "Bayesian"
    assert config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": {"Get": "Parameters.MaxJobs"},
                                        "MaxParallelTrainingJobs": {"Get": "Parameters.MaxParallelJobs"}}
    lr = config["ParameterRanges"]["ContinuousParameterRanges"][0]
    assert lr["ScalingType"] == "Logarithmic"
    assert config["ParameterRanges"]["IntegerParameterRanges"][0]["MaxValue"] == {
        "Std:Join": {"On": "", "Values": [{"Get": "Parameters.Epochs"}]}}
    definitions = tune["TrainingJobDefinition"]["AlgorithmSpecification"]["MetricDefinitions"]
    line = contract.EPOCH_METRIC_LINE.format(epoch=3, train_loss=0.5, valid_loss=0.25, valid_accuracy=0.9)
    found = {d["Name"]: float(re.search(d["Regex"], line).group(1)) for d in definitions}
    assert found[contract.OBJECTIVE_METRIC] == 0.25 and found["train:loss"] == 0.5


def test_condition_reads_the_test_loss_from_the_evaluation_property_file(offline_builds):
    steps = all_steps(offline_builds["local"].definition)
    evaluate = steps["Evaluate"]
    assert evaluate["PropertyFiles"] == [{"PropertyFileName": "EvaluationReport",
                                          "OutputName": contract.EVALUATION_OUTPUT,
                                          "FilePath": contract.EVALUATION_FILE}]
    outputs = [o["OutputName"] for o in evaluate["Arguments"]["ProcessingOutputConfig"]["Outputs"]]
    assert outputs == [contract.EVALUATION_OUTPUT]
    (condition,) = steps["CheckTestLoss"]["Arguments"]["Conditions"]
    assert condition["Type"] == "LessThanOrEqualTo"
    assert condition["LeftValue"] == {"Std:JsonGet": {
        "PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.EvaluationReport"},
        "Path": contract.TEST_LOSS_JSON_PATH}}
    assert condition["RightValue"] == {"Get": "Parameters.TestLossThreshold"}


def test_register_and_deploy_sit_in_the_if_branch_and_fail_in_the_else_branch(offline_builds):
    check = all_steps(offline_builds["local"].definition)["CheckTestLoss"]["Arguments"]
    if_steps = {step["Name"]: step for step in check["IfSteps"]}
    assert list(if_steps) == ["Register", "Deploy"]
    assert if_steps["Register"]["Type"] == "RegisterModel"
    assert if_steps["Deploy"]["DependsOn"] == ["Register"]
    assert [(step["Name"], step["Type"]) for step in check["ElseSteps"]] == [("Fail", "Fail")]


def test_fail_message_gives_the_measured_loss_and_the_threshold(offline_builds):
    fail = all_steps(offline_builds["local"].definition)["Fail"]
    values = fail["Arguments"]["ErrorMessage"]["Std:Join"]["Values"]
    assert {"Get": "Parameters.TestLossThreshold"} in values
    loss = [v for v in values if isinstance(v, dict) and "Std:JsonGet" in v]
    assert loss and loss[0]["Std:JsonGet"]["Path"] == contract.TEST_LOSS_JSON_PATH


def test_registration_uses_the_approval_parameter_and_the_evaluation_metrics(offline_builds):
    register = all_steps(offline_builds["local"].definition)["Register"]["Arguments"]
    assert register["ModelApprovalStatus"] == {"Get": "Parameters.ModelApprovalStatus"}
    assert register["ModelPackageGroupName"] == repo_config().model_package_group
    statistics = register["ModelMetrics"]["ModelQuality"]["Statistics"]
    assert statistics["S3Uri"]["Std:Join"]["Values"][-1] == contract.EVALUATION_FILE
    spec = register["InferenceSpecification"]
    assert spec["SupportedContentTypes"] == list(contract.INFERENCE_CONTENT_TYPES)
    assert spec["SupportedResponseMIMETypes"] == list(contract.INFERENCE_RESPONSE_TYPES)
    assert spec["SupportedRealtimeInferenceInstanceTypes"] == [{"Get": "Parameters.EndpointInstanceType"}]
    (container,) = spec["Containers"]
    assert container["ModelDataUrl"] == {"Get": "Steps.TrainWithDebugger.ModelArtifacts.S3ModelArtifacts"}
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"


def test_parameters_are_declared_once_with_the_configured_defaults(offline_builds):
    from pipeline.parameters import SPECS

    config = repo_config().for_target("local")
    declared = {p["Name"]: p for p in offline_builds["local"].definition["Parameters"]}
    assert list(declared) == [spec.name for spec in SPECS]
    for spec in SPECS:
        assert declared[spec.name]["Type"] == spec.kind
        assert declared[spec.name]["DefaultValue"] == spec.default(config)
    assert declared["ModelApprovalStatus"]["DefaultValue"] == "PendingManualApproval"


def test_costly_steps_are_cached_and_job_steps_retry_capacity_and_throttling(offline_builds):
    steps = all_steps(offline_builds["local"].definition)
    for name in ("PrepareData", "Tune", "TrainWithDebugger", "Evaluate"):
        assert steps[name]["CacheConfig"] == {"Enabled": True, "ExpireAfter": repo_config().cache_expire_after}
    assert "CacheConfig" not in steps["Deploy"]  # approvals change outside the pipeline
    for name in ("PrepareData", "Tune", "TrainWithDebugger", "Evaluate", "Deploy"):
        kinds = {kind for policy in steps[name]["RetryPolicies"] for kind in policy["ExceptionType"]}
        assert kinds == {"SageMaker.CAPACITY_ERROR", "SageMaker.JOB_INTERNAL_ERROR",
                         "Step.THROTTLING", "Step.SERVICE_FAULT"}


# What SageMaker compares to find a cached run (AWS: "Default cache key attributes by step type").
CACHE_KEYS = {
    "Processing": ("AppSpecification", "Environment", "ProcessingInputs"),
    "Training": ("AlgorithmSpecification", "CheckpointConfig", "DebugHookConfig", "DebugRuleConfigurations",
                 "Environment", "HyperParameters", "InputDataConfig"),
    "Tuning": ("HyperParameterTuningJobConfig", "TrainingJobDefinition"),
}


def test_cache_keys_hold_nothing_that_changes_every_execution(offline_builds):
    for step in all_steps(offline_builds["local"].definition).values():
        if not step.get("CacheConfig", {}).get("Enabled"):
            continue
        keys = {name: step["Arguments"].get(name) for name in CACHE_KEYS[step["Type"]]}
        assert "Execution." not in json.dumps(keys), step["Name"]


def cache_key_fields(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What SageMaker compares to find a cached run, for each cached step."""
    return {step["Name"]: {name: step["Arguments"].get(name) for name in CACHE_KEYS[step["Type"]]}
            for step in all_steps(definition).values() if step.get("CacheConfig", {}).get("Enabled")}


def test_a_rebuild_keeps_the_cache_keys_unless_the_code_changed(offline_builds, monkeypatch):
    """The code lies in S3 under keys named by its content: building again (the next upsert) gives the
    cached steps the same arguments, so SageMaker reuses their runs; a changed script changes them all
    (every step runs the same bundle)."""
    from pipeline.definition import build_offline, sdk_environment

    with sdk_environment(repo_config()):
        from steps import common
    first = offline_builds["aws"]
    again = build_offline(repo_config(), "aws")
    keys = cache_key_fields(first.definition)
    assert set(keys) == {"PrepareData", "Tune", "TrainWithDebugger", "Evaluate"}
    assert cache_key_fields(again.definition) == keys
    assert again.definition == first.definition and again.deploy_definition == first.deploy_definition

    stage = common.stage_source_dir

    def edited(destination, source=common.ENTRYPOINTS_DIR):
        staged = stage(destination, source)
        with (Path(staged) / "train.py").open("a", encoding="utf-8") as script:
            script.write("# a comment changes no behaviour, but it is other code\n")
        return staged

    monkeypatch.setattr(common, "stage_source_dir", edited)
    changed = cache_key_fields(build_offline(repo_config(), "aws").definition)
    assert [name for name in keys if changed[name] == keys[name]] == []


def test_code_lies_at_content_addressed_keys_the_local_runner_can_read(offline_builds):
    """The code channel, the trials' submit directory, the processing bundles and the driver
    channels lie under <prefix>/code/; the tarball is reproducible and holds the same files."""
    import io
    import tarfile

    from pipeline.definition import sdk_environment

    with sdk_environment(repo_config()):
        from steps.common import bundle_files, content_digest, reproducible_tarball
    build = offline_builds["aws"]
    config = repo_config().for_target("aws")
    code_root = f"s3://{config.bucket}/{config.prefix}/code/"
    uris = literal_inputs(build.definition) | literal_inputs(build.deploy_definition)
    assert uris and all(uri.startswith(code_root) for uri in uris), sorted(uris)
    steps = all_steps(build.definition)
    code = next(c["DataSource"]["S3DataSource"]["S3Uri"] for c in steps["TrainWithDebugger"]["Arguments"]["InputDataConfig"]
                if c["ChannelName"] == "code")
    files = {key.removeprefix(code): body for key, body in build.objects.items() if key.startswith(code)}
    assert "train.py" in files and code == f"{code_root}{content_digest(files)}/source/"
    submit = steps["Tune"]["Arguments"]["TrainingJobDefinition"]["StaticHyperParameters"]["sagemaker_submit_directory"]
    assert submit == f"{code_root}{content_digest(files)}/sourcedir.tar.gz"
    assert build.objects[submit] == reproducible_tarball(files)
    with tarfile.open(fileobj=io.BytesIO(build.objects[submit])) as archive:
        assert {member.name: archive.extractfile(member).read() for member in archive.getmembers()} == files
    with tarfile.open(fileobj=io.BytesIO(build.objects[submit])) as archive:
        assert {(member.mtime, member.uid, member.uname) for member in archive.getmembers()} == {(0, 0, "")}
    assert not [name for name in bundle_files(Path(__file__).resolve().parents[1] / "entrypoints")
                if "__pycache__" in name or name.endswith(".pyc")]


def test_prepare_writes_one_output_per_contract_name(offline_builds):
    prepare = all_steps(offline_builds["local"].definition)["PrepareData"]["Arguments"]
    outputs = {o["OutputName"]: o["S3Output"]["LocalPath"] for o in prepare["ProcessingOutputConfig"]["Outputs"]}
    assert outputs == {name: f"/opt/ml/processing/output/{name}" for name in contract.PREPARE_OUTPUTS}


def test_only_aws_lets_torchvision_download_weights(offline_builds):
    for target, allowed in (("aws", "True"), ("local", "False")):
        steps = all_steps(offline_builds[target].definition)
        assert steps["TrainWithDebugger"]["Arguments"]["HyperParameters"]["allow-download"] == allowed
        static = steps["Tune"]["Arguments"]["TrainingJobDefinition"]["StaticHyperParameters"]
        assert static["allow-download"] == allowed


def literal_inputs(definition: dict[str, Any]) -> set[str]:
    """S3 URIs the jobs read that are fixed when the definition is built (code, drivers, scripts)."""
    found = set()
    for step in job_steps(definition):
        arguments = step["Arguments"]
        job = arguments.get("TrainingJobDefinition", arguments)
        uris = [item["S3Input"]["S3Uri"] for item in arguments.get("ProcessingInputs", [])]
        uris += [channel["DataSource"]["S3DataSource"]["S3Uri"] for channel in job.get("InputDataConfig", [])]
        uris.append(job.get("StaticHyperParameters", {}).get("sagemaker_submit_directory"))
        found.update(uri for uri in uris if isinstance(uri, str))  # expressions resolve at run time
    return found


def test_every_object_the_jobs_read_is_in_the_offline_build(offline_builds):
    build = offline_builds["local"]
    uris = literal_inputs(build.definition) | literal_inputs(build.deploy_definition)
    assert len(uris) >= 10  # code and entrypoint of 4 processing jobs, drivers, code, source bundle
    for uri in uris:
        prefix = uri if uri.endswith("/") else uri + "/"
        assert uri in build.objects or any(key.startswith(prefix) for key in build.objects), uri


def test_code_bundles_carry_the_scripts_and_no_caches(offline_builds):
    import io
    import tarfile

    objects = offline_builds["local"].objects
    bundles = [body for key, body in objects.items() if key.endswith("/source/sourcedir.tar.gz")]
    assert bundles
    for body in bundles:
        names = tarfile.open(fileobj=io.BytesIO(body)).getnames()
        assert {"prepare.py", "train.py", "evaluate.py", "inference.py", "deploy.py", "contract.py"} <= set(names)
        assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


# --- the execution role's policy -------------------------------------------------------------------
def policy_actions() -> set[str]:
    from pipeline.policy import POLICY_FILE

    policy = json.loads(POLICY_FILE.read_text())
    actions: set[str] = set()
    for statement in policy["Statement"]:
        actions.update([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])
    return actions


def test_the_policy_allows_the_api_of_every_step(offline_builds):
    build = offline_builds["aws"]
    needed = {STEP_APIS[step["Type"]][0] for step in job_steps(build.definition) + job_steps(build.deploy_definition)}
    assert {f"sagemaker:{operation}" for operation in needed} <= policy_actions()


def test_every_sagemaker_action_in_the_policy_is_a_real_operation():
    operations = set(SAGEMAKER.operation_names)
    named = {action.split(":", 1)[1] for action in policy_actions() if action.startswith("sagemaker:")}
    assert named and named <= operations, named - operations


def test_the_rendered_policy_has_no_placeholder_left():
    from pipeline.policy import render_execution_role_policy

    config = repo_config(bucket="my-bucket", role_arn="arn:aws:iam::210987654321:role/k")
    text = json.dumps(render_execution_role_policy(config))
    assert "KENNEL_" not in text
    assert "arn:aws:sagemaker:us-east-1:210987654321:model-package/kennel-models/*" in text
