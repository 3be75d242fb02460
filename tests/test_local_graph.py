"""Table tests for local.graph: dependencies, deterministic order, cycles named."""

from __future__ import annotations

import pytest

from local.graph import Branch, CycleError, GraphError, build_graph, topological_order


def step(
    name: str, kind: str = "Processing", depends_on: list[str] | None = None, **arguments: object
) -> dict:
    result: dict = {"Name": name, "Type": kind, "Arguments": dict(arguments)}
    if depends_on:
        result["DependsOn"] = depends_on
    return result


def uses(name: str) -> dict:
    return {"Get": f"Steps.{name}.ProcessingOutputConfig.Outputs['out'].S3Output.S3Uri"}


def condition(name: str, if_steps: list[dict], else_steps: list[dict], on: str) -> dict:
    reads = {"Std:JsonGet": {"PropertyFile": {"Get": f"Steps.{on}.PropertyFiles.F"}, "Path": "a"}}
    return {
        "Name": name,
        "Type": "Condition",
        "Arguments": {
            "Conditions": [{"Type": "LessThan", "LeftValue": reads, "RightValue": 1}],
            "IfSteps": if_steps,
            "ElseSteps": else_steps,
        },
    }


PIPELINE = {
    "Steps": [
        step("Prepare"),
        step("Tune", Input=uses("Prepare")),
        step(
            "Train",
            Input=uses("Prepare"),
            Hyper={"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['lr']"},
        ),
        step("Evaluate", Model={"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}),
        condition(
            "Check",
            [
                step(
                    "Register", "RegisterModel", Model={"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}
                ),
                step("Deploy", depends_on=["Register"]),
            ],
            [
                {
                    "Name": "Fail",
                    "Type": "Fail",
                    "Arguments": {
                        "ErrorMessage": {
                            "Std:Join": {
                                "On": " ",
                                "Values": [
                                    {
                                        "Std:JsonGet": {
                                            "PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.F"},
                                            "Path": "a",
                                        }
                                    }
                                ],
                            }
                        }
                    },
                }
            ],
            on="Evaluate",
        ),
    ]
}


def test_dependencies_come_from_gets_depends_on_and_branches() -> None:
    nodes = build_graph(PIPELINE)
    expected = {
        "Prepare": set(),
        "Tune": {"Prepare"},
        "Train": {"Prepare", "Tune"},
        "Evaluate": {"Train"},
        "Check": {"Evaluate"},
        "Register": {"Check", "Train"},
        "Deploy": {"Check", "Register"},
        "Fail": {"Check", "Evaluate"},
    }
    assert {name: set(node.depends_on) for name, node in nodes.items()} == expected
    assert nodes["Register"].branch == Branch("Check", True)
    assert nodes["Fail"].branch == Branch("Check", False)
    assert nodes["Train"].branch is None


def test_order_respects_dependencies_and_definition_order() -> None:
    order = topological_order(build_graph(PIPELINE))
    assert order == ["Prepare", "Tune", "Train", "Evaluate", "Check", "Register", "Deploy", "Fail"]


@pytest.mark.parametrize(
    ("steps", "order"),
    [
        # Independent steps keep the order in which the definition lists them.
        ([step("B"), step("A"), step("C")], ["B", "A", "C"]),
        # A step listed before its dependency still comes after it.
        ([step("Late", Input=uses("Early")), step("Early")], ["Early", "Late"]),
        (
            [step("D", depends_on=["C", "B"]), step("C", depends_on=["A"]), step("B"), step("A")],
            ["B", "A", "C", "D"],
        ),
    ],
)
def test_order_table(steps: list[dict], order: list[str]) -> None:
    assert topological_order(build_graph({"Steps": steps})) == order


def test_order_is_deterministic() -> None:
    steps = [step(f"S{index}", depends_on=[f"S{index - 1}"] if index % 3 else None) for index in range(12)]
    orders = {tuple(topological_order(build_graph({"Steps": steps}))) for _ in range(5)}
    assert len(orders) == 1


@pytest.mark.parametrize(
    ("steps", "cycle"),
    [
        ([step("A", depends_on=["B"]), step("B", depends_on=["A"])], ["A", "B", "A"]),
        (
            [step("A", Input=uses("C")), step("B", Input=uses("A")), step("C", Input=uses("B")), step("D")],
            ["A", "B", "C", "A"],
        ),
        (
            [
                step("Start"),
                step("X", depends_on=["Start", "Z"]),
                step("Y", depends_on=["X"]),
                step("Z", depends_on=["Y"]),
            ],
            ["X", "Y", "Z", "X"],
        ),
        ([step("Self", Input=uses("Self"))], ["Self", "Self"]),
    ],
)
def test_cycles_are_named(steps: list[dict], cycle: list[str]) -> None:
    with pytest.raises(CycleError) as raised:
        topological_order(build_graph({"Steps": steps}))
    assert raised.value.cycle == cycle
    assert " -> ".join(cycle) in str(raised.value)


@pytest.mark.parametrize(
    ("steps", "words"),
    [
        ([step("A", Input=uses("Ghost"))], "step 'A' refers to step 'Ghost'"),
        ([step("A", depends_on=["Ghost"])], "refers to step 'Ghost'"),
        ([step("A"), step("A")], "'A' appears more than once"),
        ([condition("C", [step("A")], [step("A")], on="X"), step("X")], "'A' appears more than once"),
        ([{"Type": "Processing"}], "has no Name"),
    ],
)
def test_graph_errors(steps: list[dict], words: str) -> None:
    with pytest.raises(GraphError) as raised:
        build_graph({"Steps": steps})
    assert words in str(raised.value)
