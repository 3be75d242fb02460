"""Table tests for local.expressions (Get, Std:Join, Std:JsonGet, conditions) and local.parameters."""

from __future__ import annotations

from typing import Any

import pytest

from local.expressions import (
    ExpressionError,
    Scope,
    UnsupportedExpression,
    evaluate_condition,
    evaluate_conditions,
    json_path_get,
    parse_property_path,
    referenced_steps,
    resolve,
    to_text,
)
from local.parameters import ParameterError, resolve_parameters

EVALUATION = {"multiclass_classification_metrics": {"loss": {"value": 0.42}, "accuracy": {"value": 0.9}}}

SCOPE = Scope(
    parameters={"Epochs": 3, "Threshold": 0.5, "Data": "s3://b/data", "Flag": True, "Name": "resnet18"},
    execution={"PipelineExecutionId": "exec-1", "PipelineName": "P"},
    steps={
        "Prep": {
            "ProcessingOutputConfig": {
                "Outputs": [
                    {"OutputName": "train", "S3Output": {"S3Uri": "s3://b/prep/train"}},
                    {"OutputName": "valid", "S3Output": {"S3Uri": "s3://b/prep/valid"}},
                ]
            },
            "ProcessingJobName": "pipelines-exec-1-Prep-1",
        },
        "Tune": {
            "BestTrainingJob": {"TrainingJobName": "tune-001", "TunedHyperParameters": {"lr": "0.01"}},
            "TrainingJobSummaries": [{"TrainingJobName": "tune-001"}, {"TrainingJobName": "tune-002"}],
        },
        "Train": {
            "ModelArtifacts": {"S3ModelArtifacts": "s3://b/models/j/output/model.tar.gz"},
            "FinalMetricDataList": [{"MetricName": "valid:loss", "Value": 0.3}],
        },
        "Eval": {"PropertyFiles": {"Evaluation": EVALUATION}},
    },
    read_json=lambda uri: {"from": uri, "nested": {"list": [10, 20]}},
)


def json_get(path: str) -> dict:
    return {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Eval.PropertyFiles.Evaluation"}, "Path": path}}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ({"Get": "Parameters.Epochs"}, 3),
        ({"Get": "Parameters.Flag"}, True),
        ({"Get": "Execution.PipelineExecutionId"}, "exec-1"),
        ({"Get": "Steps.Prep.ProcessingOutputConfig.Outputs['valid'].S3Output.S3Uri"}, "s3://b/prep/valid"),
        ({"Get": 'Steps.Prep.ProcessingOutputConfig.Outputs["train"].S3Output.S3Uri'}, "s3://b/prep/train"),
        ({"Get": "Steps.Prep.ProcessingOutputConfig.Outputs[1].S3Output.S3Uri"}, "s3://b/prep/valid"),
        ({"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['lr']"}, "0.01"),
        ({"Get": "Steps.Tune.TrainingJobSummaries[1].TrainingJobName"}, "tune-002"),
        ({"Get": "Steps.Train.FinalMetricDataList['valid:loss'].Value"}, 0.3),
        ({"Std:Join": {"On": "", "Values": [{"Get": "Parameters.Epochs"}]}}, "3"),
        (
            {"Std:Join": {"On": "/", "Values": ["s3:/", "b", {"Get": "Execution.PipelineExecutionId"}]}},
            "s3://b/exec-1",
        ),
        ({"Std:Join": {"On": "-", "Values": [{"Get": "Parameters.Flag"}, 1.5, None]}}, "true-1.5-"),
        (
            {
                "Std:Join": {
                    "On": "/",
                    "Values": [
                        "s3:/",
                        "b",
                        {"Get": "Steps.Tune.TrainingJobSummaries[0].TrainingJobName"},
                        "output",
                    ],
                }
            },
            "s3://b/tune-001/output",
        ),
        (json_get("multiclass_classification_metrics.loss.value"), 0.42),
        (json_get("$.multiclass_classification_metrics.accuracy.value"), 0.9),
        ({"Std:JsonGet": {"S3Uri": {"Get": "Parameters.Data"}, "Path": "nested.list[1]"}}, 20),
        # Plain data is kept, expressions inside it are resolved.
        ({"A": [{"Get": "Parameters.Name"}, 1], "B": {"C": None}}, {"A": ["resnet18", 1], "B": {"C": None}}),
        ({"Get": "Parameters.Epochs", "Other": 1}, {"Get": "Parameters.Epochs", "Other": 1}),
    ],
)
def test_resolve(expression: Any, expected: Any) -> None:
    assert resolve(expression, SCOPE) == expected


@pytest.mark.parametrize(
    ("expression", "error", "words"),
    [
        ({"Get": "Parameters.Missing"}, ExpressionError, "no parameter 'Missing'"),
        ({"Get": "Steps.Nope.X"}, ExpressionError, "step 'Nope' has not succeeded"),
        (
            {"Get": "Steps.Prep.ProcessingOutputConfig.Outputs['test'].S3Output.S3Uri"},
            ExpressionError,
            "Outputs.test",
        ),
        (
            {"Get": "Steps.Tune.TrainingJobSummaries[5].TrainingJobName"},
            ExpressionError,
            "TrainingJobSummaries[5]",
        ),
        ({"Get": "Execution.SomethingNew"}, UnsupportedExpression, "SomethingNew"),
        ({"Get": "Elsewhere.X"}, UnsupportedExpression, "unknown root"),
        ({"Std:Select": {"Array": [], "Index": 0}}, UnsupportedExpression, "Std:Select"),
        (json_get("multiclass_classification_metrics.f1.value"), ExpressionError, "nothing at multiclass"),
        ({"Std:JsonGet": {"Path": "a"}}, ExpressionError, "PropertyFile or an S3Uri"),
        ({"Get": "Steps.Prep.Bad path!"}, ExpressionError, "cannot parse"),
    ],
)
def test_resolve_errors(expression: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error) as raised:
        resolve(expression, SCOPE)
    assert words in str(raised.value)


def test_json_get_over_s3_without_a_store_is_unsupported() -> None:
    scope = Scope(parameters={"Data": "s3://b/x.json"})
    with pytest.raises(UnsupportedExpression, match="no object store"):
        resolve({"Std:JsonGet": {"S3Uri": {"Get": "Parameters.Data"}, "Path": "a"}}, scope)


@pytest.mark.parametrize(
    ("path", "tokens"),
    [
        ("A.B", ["A", "B"]),
        ("Outputs['train'].S3Output", ["Outputs", "train", "S3Output"]),
        ("Summaries[0].Name", ["Summaries", 0, "Name"]),
        ("FinalMetricDataList['valid:loss'].Value", ["FinalMetricDataList", "valid:loss", "Value"]),
        ("Step-1.X", ["Step-1", "X"]),
    ],
)
def test_parse_property_path(path: str, tokens: list) -> None:
    assert parse_property_path(path) == tokens


@pytest.mark.parametrize(
    ("document", "path", "expected"),
    [({"a": [{"b": 1}]}, "a[0].b", 1), ({"a": 1}, "$", {"a": 1}), ([5, 6], "[1]", 6)],
)
def test_json_path_get(document: Any, path: str, expected: Any) -> None:
    assert json_path_get(document, path) == expected


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (3, "3"),
        (0.001, "0.001"),
        (None, ""),
        ("x", "x"),
        ([1, "a"], '[1, "a"]'),
    ],
)
def test_to_text(value: Any, text: str) -> None:
    assert to_text(value) == text


LOSS = json_get("multiclass_classification_metrics.loss.value")


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (
            {"Type": "LessThanOrEqualTo", "LeftValue": LOSS, "RightValue": {"Get": "Parameters.Threshold"}},
            True,
        ),
        ({"Type": "LessThanOrEqualTo", "LeftValue": LOSS, "RightValue": 0.42}, True),
        ({"Type": "LessThan", "LeftValue": LOSS, "RightValue": 0.42}, False),
        ({"Type": "GreaterThan", "LeftValue": LOSS, "RightValue": 0.1}, True),
        ({"Type": "GreaterThanOrEqualTo", "LeftValue": 2, "RightValue": {"Get": "Parameters.Epochs"}}, False),
        ({"Type": "Equals", "LeftValue": {"Get": "Parameters.Epochs"}, "RightValue": 3.0}, True),
        ({"Type": "Equals", "LeftValue": "3", "RightValue": {"Get": "Parameters.Epochs"}}, True),
        ({"Type": "Equals", "LeftValue": {"Get": "Parameters.Flag"}, "RightValue": "true"}, True),
        ({"Type": "Equals", "LeftValue": "a", "RightValue": "b"}, False),
        (
            {
                "Type": "GreaterThan",
                "LeftValue": {"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['lr']"},
                "RightValue": 0.001,
            },
            True,
        ),
        ({"Type": "In", "QueryValue": {"Get": "Parameters.Name"}, "Values": ["resnet50", "resnet18"]}, True),
        ({"Type": "In", "QueryValue": {"Get": "Parameters.Epochs"}, "Values": ["x", 3]}, True),
        ({"Type": "In", "QueryValue": "c", "Values": ["a", "b"]}, False),
        ({"Type": "Not", "Condition": {"Type": "Equals", "LeftValue": 1, "RightValue": 1}}, False),
        (
            {
                "Type": "Or",
                "Conditions": [
                    {"Type": "Equals", "LeftValue": 1, "RightValue": 2},
                    {"Type": "LessThan", "LeftValue": 1, "RightValue": 2},
                ],
            },
            True,
        ),
        ({"Type": "Or", "Conditions": [{"Type": "Equals", "LeftValue": 1, "RightValue": 2}]}, False),
    ],
)
def test_conditions(condition: dict, expected: bool) -> None:
    assert evaluate_condition(condition, SCOPE) is expected


def test_condition_list_is_a_conjunction() -> None:
    true = {"Type": "Equals", "LeftValue": 1, "RightValue": 1}
    false = {"Type": "Equals", "LeftValue": 1, "RightValue": 2}
    assert evaluate_conditions([true, true], SCOPE) is True
    assert evaluate_conditions([true, false], SCOPE) is False
    assert evaluate_conditions([], SCOPE) is True


@pytest.mark.parametrize(
    ("condition", "error", "words"),
    [
        ({"Type": "LessThan", "LeftValue": "abc", "RightValue": 1}, ExpressionError, "'abc' is not a number"),
        ({"Type": "LessThan", "LeftValue": {"a": 1}, "RightValue": "x"}, ExpressionError, "cannot compare"),
        ({"Type": "Equals", "LeftValue": True, "RightValue": "yes"}, ExpressionError, "not a boolean"),
        ({"Type": "Xor", "Conditions": []}, UnsupportedExpression, "'Xor'"),
        ({"LeftValue": 1}, ExpressionError, "needs a Type"),
    ],
)
def test_condition_errors(condition: dict, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=None) as raised:
        evaluate_condition(condition, SCOPE)
    assert words in str(raised.value)


def test_referenced_steps_finds_gets_and_property_files() -> None:
    arguments = {
        "A": {"Get": "Steps.Prep.ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri"},
        "B": [
            {
                "Std:Join": {
                    "On": "",
                    "Values": [{"Get": "Steps.Tune.TrainingJobSummaries[0].TrainingJobName"}],
                }
            }
        ],
        "C": LOSS,
        "D": {"Get": "Parameters.Epochs"},
        "E": "Steps.NotAReference",
    }
    assert referenced_steps(arguments) == {"Prep", "Tune", "Eval"}


# --- parameters ---------------------------------------------------------------------------------

DECLARED = {
    "Parameters": [
        {"Name": "Data", "Type": "String", "DefaultValue": "s3://b/data"},
        {"Name": "Epochs", "Type": "Integer", "DefaultValue": 2},
        {"Name": "Threshold", "Type": "Float", "DefaultValue": 1.0},
        {"Name": "Debug", "Type": "Boolean", "DefaultValue": False},
        {
            "Name": "Approval",
            "Type": "String",
            "DefaultValue": "PendingManualApproval",
            "EnumValues": ["Approved", "PendingManualApproval"],
        },
    ]
}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, {"Epochs": 2, "Threshold": 1.0, "Debug": False}),
        (
            {"Epochs": "5", "Threshold": "0.25", "Debug": "TRUE"},
            {"Epochs": 5, "Threshold": 0.25, "Debug": True},
        ),
        ({"Epochs": 7, "Threshold": 1, "Debug": True}, {"Epochs": 7, "Threshold": 1.0, "Debug": True}),
        ({"Approval": "Approved"}, {"Approval": "Approved"}),
    ],
)
def test_parameters_take_defaults_and_typed_overrides(overrides: dict, expected: dict) -> None:
    values = resolve_parameters(DECLARED, overrides)
    assert set(values) == {"Data", "Epochs", "Threshold", "Debug", "Approval"}
    for name, value in expected.items():
        assert values[name] == value and type(values[name]) is type(value)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            {"Epoch": "3"},
            "unknown parameter 'Epoch'; this pipeline takes: Approval, Data, Debug, Epochs, Threshold",
        ),
        ({"Epochs": "three"}, "parameter 'Epochs' is an Integer; 'three' is not"),
        ({"Epochs": "2.5"}, "parameter 'Epochs' is an Integer"),
        ({"Epochs": True}, "parameter 'Epochs' is an Integer"),
        ({"Threshold": "low"}, "parameter 'Threshold' is a Float"),
        ({"Threshold": "nan"}, "parameter 'Threshold' is a Float"),
        ({"Debug": "yes"}, "parameter 'Debug' is a Boolean"),
        ({"Data": 3}, "parameter 'Data' is a String"),
        ({"Approval": "Rejected"}, "must be one of Approved, PendingManualApproval"),
    ],
)
def test_parameter_errors_name_the_parameter(overrides: dict, words: str) -> None:
    with pytest.raises(ParameterError) as raised:
        resolve_parameters(DECLARED, overrides)
    assert words in str(raised.value)
    assert "\n" not in str(raised.value)


def test_required_parameter_without_default() -> None:
    with pytest.raises(ParameterError, match="'Model' has no default value"):
        resolve_parameters({"Parameters": [{"Name": "Model", "Type": "String"}]}, {})
    assert resolve_parameters({"Parameters": [{"Name": "Model", "Type": "String"}]}, {"Model": "m"}) == {
        "Model": "m"
    }
