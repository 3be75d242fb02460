"""The step builders: what each step hands its script parses with that script's own parser.

The definition's arguments are resolved the way SageMaker resolves them (parameters to their
defaults, the tuner's best values to values from its ranges) and fed to the real argument parsers
of entrypoints/prepare.py, train.py, evaluate.py and deploy.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kennel_support import repo_config

import contract

TUNED_SAMPLE = {"lr": "0.003", "batch-size": "64", "epochs": "3"}


def resolve(value: Any, parameters: dict[str, Any]) -> Any:
    """A pipeline expression as SageMaker would evaluate it for a run with default parameters."""
    if isinstance(value, dict) and "Get" in value:
        reference = value["Get"]
        if reference.startswith("Parameters."):
            return str(parameters[reference.removeprefix("Parameters.")])
        if "TunedHyperParameters" in reference:
            return TUNED_SAMPLE[reference.split("['")[1].rstrip("']")]
        return "s3://bucket/resolved/at/run/time"
    if isinstance(value, dict) and "Std:Join" in value:
        return value["Std:Join"]["On"].join(resolve(v, parameters) for v in value["Std:Join"]["Values"])
    return value


def steps_by_name(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {}
    for step in definition["Steps"]:
        found[step["Name"]] = step
        for branch in ("IfSteps", "ElseSteps"):
            for inner in step.get("Arguments", {}).get(branch, []):
                found[inner["Name"]] = inner
    return found


@pytest.fixture(scope="module", autouse=True)
def sdk_imported() -> None:
    """steps/ imports the SageMaker SDK, which refuses to import without a region."""
    from pipeline.definition import sdk_environment

    with sdk_environment(repo_config()):
        import steps.train  # noqa: F401


@pytest.fixture(scope="module")
def built(offline_builds):
    definition = offline_builds["local"].definition
    defaults = {p["Name"]: p["DefaultValue"] for p in definition["Parameters"]}
    return steps_by_name(definition), defaults


def container_arguments(step: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    return [resolve(arg, defaults) for arg in step["Arguments"]["AppSpecification"]["ContainerArguments"]]


def toolkit_argv(hyperparameters: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """`--name value` pairs in sorted key order, as SageMaker's training toolkit passes them."""
    argv = []
    for name in sorted(hyperparameters):
        argv += [f"--{name}", resolve(hyperparameters[name], defaults)]
    return argv


def test_prepare_arguments_parse_with_prepare_py(built):
    import prepare

    steps, defaults = built
    args = prepare.get_args_parser().parse_args(container_arguments(steps["PrepareData"], defaults))
    config = repo_config().for_target("local")  # `built` is the local definition
    assert args.input == "/opt/ml/processing/input/data"
    assert args.output == "/opt/ml/processing/output"
    assert (args.valid_fraction, args.test_fraction) == (config.valid_fraction, config.test_fraction)
    assert (args.seed, args.min_size) == (config.seed, config.min_image_size)
    inputs = {i["InputName"]: i["S3Input"]["LocalPath"] for i in steps["PrepareData"]["Arguments"]["ProcessingInputs"]}
    assert inputs["data"] == args.input


def test_final_training_hyperparameters_parse_with_train_py(built):
    import train

    steps, defaults = built
    hyperparameters = steps["TrainWithDebugger"]["Arguments"]["HyperParameters"]
    args = train.parse_args(toolkit_argv(hyperparameters, defaults))
    config = repo_config().for_target("local")
    assert (args.arch, args.freeze, args.image_size) == (config.architecture, config.freeze, config.image_size)
    assert (args.lr, args.batch_size, args.epochs) == (0.003, 64, 3)
    assert args.allow_download is False


def test_every_tuning_trial_parses_with_train_py(built):
    import train

    steps, defaults = built
    definition = steps["Tune"]["Arguments"]["TrainingJobDefinition"]
    hyperparameters = {**definition["StaticHyperParameters"], **TUNED_SAMPLE}
    args = train.parse_args(toolkit_argv(hyperparameters, defaults))  # drops sagemaker_program etc.
    assert args.arch == repo_config().for_target("local").architecture
    channels = [c["ChannelName"] for c in definition["InputDataConfig"]]
    assert [c for c in channels if c in contract.TRAIN_CHANNELS] == list(contract.TRAIN_CHANNELS)


def test_evaluate_arguments_parse_with_evaluate_py(built):
    import evaluate

    steps, defaults = built
    step = steps["Evaluate"]["Arguments"]
    args = evaluate.get_args_parser().parse_args(container_arguments(steps["Evaluate"], defaults))
    inputs = {i["InputName"]: i["S3Input"]["LocalPath"] for i in step["ProcessingInputs"]}
    assert (args.model, args.test) == (inputs["model"], inputs["test"])
    (output,) = step["ProcessingOutputConfig"]["Outputs"]
    assert args.output == output["S3Output"]["LocalPath"]


def test_deploy_arguments_parse_with_deploy_py(built):
    import deploy

    steps, defaults = built
    args = deploy.get_args_parser().parse_args(container_arguments(steps["Deploy"], defaults))
    config = repo_config().for_target("local")
    assert args.model_package_group == config.model_package_group
    assert (args.endpoint_name, args.instance_type) == (config.endpoint_name, config.endpoint_instance_type)
    assert args.instance_count == config.endpoint_instance_count
    assert (args.region, args.execution_role_arn, args.wait) == (config.region, config.role_arn, True)


def test_the_package_serves_the_code_train_py_puts_in_the_model(built):
    import train

    steps, _ = built
    (container,) = steps["Register"]["Arguments"]["InferenceSpecification"]["Containers"]
    environment = container["Environment"]
    assert environment["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"  # model.tar.gz's code/
    assert environment["SAGEMAKER_PROGRAM"] in train.SERVING_FILES


def test_debugger_hook_saves_every_collection_its_rules_read(built):
    from steps.train import DEBUG_RULES

    steps, _ = built
    request = steps["TrainWithDebugger"]["Arguments"]
    saved = {c["CollectionName"] for c in request["DebugHookConfig"]["CollectionConfigurations"]}
    assert {"losses", "weights", "gradients", "biases"} <= saved
    for rule in DEBUG_RULES:
        assert set(rule.collections) <= saved, rule.base_config.__name__
    names = [r["RuleConfigurationName"] for r in request["DebugRuleConfigurations"]]
    assert {"LossNotDecreasing", "VanishingGradient", "Overfit", "Overtraining",
            "PoorWeightInitialization"} <= set(names)
    assert [r["RuleConfigurationName"] for r in request["ProfilerRuleConfigurations"]] == [
        "ProfilerReport", "LowGPUUtilization"]
    for rule in request["DebugRuleConfigurations"] + request["ProfilerRuleConfigurations"]:
        assert rule["RuleParameters"]["rule_to_invoke"] == rule["RuleConfigurationName"]
        assert all(isinstance(v, str) for v in rule["RuleParameters"].values())
    assert request["ProfilerConfig"]["ProfilingIntervalInMilliseconds"] == 500


def test_rule_images_come_from_the_configured_region():
    from pipeline.definition import sdk_environment

    images = {}
    for region in ("us-east-1", "eu-west-1"):
        config = repo_config(region=region)
        with sdk_environment(config):
            from steps.common import StepContext
            from steps.train import debugger_request

            request = debugger_request(StepContext(config=config, params=None, session=None, source_dir=""))
        images[region] = {r["RuleEvaluatorImage"] for r in request["DebugRuleConfigurations"]}
    for region, found in images.items():
        assert len(found) == 1 and f".dkr.ecr.{region}.amazonaws.com/" in found.pop()


def test_code_bundle_holds_the_scripts_without_caches(tmp_path):
    import shutil

    from steps.common import ENTRYPOINTS_DIR, stage_source_dir

    source = tmp_path / "entrypoints"
    shutil.copytree(ENTRYPOINTS_DIR, source)
    (source / "__pycache__").mkdir(exist_ok=True)
    (source / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"cache")
    (source / ".scratch.py").write_text("# an editor's file\n")
    staged = stage_source_dir(tmp_path / "code", source)
    names = {path.name for path in (tmp_path / "code").rglob("*")}
    assert {"prepare.py", "train.py", "evaluate.py", "inference.py", "deploy.py", "contract.py"} <= names
    assert not names & {"__pycache__", "train.cpython-311.pyc", ".scratch.py"}
    assert staged == str(tmp_path / "code")


def test_a_missing_script_folder_is_a_config_error(tmp_path):
    from pipeline.config import ConfigError
    from steps.common import stage_source_dir

    with pytest.raises(ConfigError, match="no contract.py"):
        stage_source_dir(tmp_path / "code", tmp_path)


def test_an_unknown_pytorch_version_is_a_config_error():
    from pipeline.config import ConfigError
    from pipeline.definition import sdk_environment

    config = repo_config(pytorch_version="0.1")
    with sdk_environment(config):
        from steps.common import training_image

        with pytest.raises(ConfigError, match="pytorch_version=0.1"):
            training_image(config)
        assert training_image(repo_config(training_image_uri="my.registry/kennel:1")) == "my.registry/kennel:1"


def test_hyperband_turns_the_tuners_own_early_stopping_off():
    from pipeline.definition import build_definition

    definition = build_definition(repo_config(strategy="Hyperband"), "local")
    config = steps_by_name(definition)["Tune"]["Arguments"]["HyperParameterTuningJobConfig"]
    assert (config["Strategy"], config["TrainingJobEarlyStoppingType"]) == ("Hyperband", "Off")
    assert json.dumps(definition)  # still plain JSON
