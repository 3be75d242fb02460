"""The step graph of a pipeline definition: who waits for whom, in a deterministic order.

A step depends on another when it names it in DependsOn, when its arguments (or conditions, or
error message) read one of its properties through Get/JsonGet, and when it sits in an IfSteps or
ElseSteps branch of a ConditionStep (the branch waits for the condition). Steps inside branches
are nested in the definition JSON; `build_graph` flattens them.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from local.expressions import ExpressionError, referenced_steps


class GraphError(ValueError):
    """A definition whose steps cannot be ordered (unknown reference, duplicate, cycle)."""


class CycleError(GraphError):
    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__("the steps depend on each other in a cycle: " + " -> ".join(cycle))


@dataclass(frozen=True)
class Branch:
    condition: str  # name of the ConditionStep
    when: bool  # True: the step is in IfSteps; False: in ElseSteps


@dataclass(frozen=True)
class StepNode:
    name: str
    step: Mapping[str, Any]  # the step's JSON as in the definition
    depends_on: frozenset[str]
    branch: Branch | None
    index: int  # position in a pre-order walk of the definition, used to break ties

    @property
    def type(self) -> str:
        return str(self.step.get("Type", ""))


def build_graph(definition: Mapping[str, Any]) -> dict[str, StepNode]:
    """Every step of the definition (branches included), keyed by name, in definition order."""
    flat: list[tuple[Mapping[str, Any], Branch | None]] = []
    _flatten(definition.get("Steps") or [], None, flat)
    names = [step.get("Name") for step, _ in flat]
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name:
            raise GraphError(f"a step has no Name: {name!r}")
        if name in seen:
            raise GraphError(f"step name {name!r} appears more than once in the definition")
        seen.add(name)
    nodes = {}
    for index, (step, branch) in enumerate(flat):
        depends = _dependencies(step, branch)
        unknown = sorted(depends - seen)
        if unknown:
            raise GraphError(
                f"step {step['Name']!r} refers to step {unknown[0]!r}, which the definition does not have"
            )
        if step["Name"] in depends:
            raise CycleError([step["Name"], step["Name"]])
        nodes[step["Name"]] = StepNode(step["Name"], step, frozenset(depends), branch, index)
    return nodes


def _flatten(steps: list, branch: Branch | None, out: list) -> None:
    for step in steps:
        if not isinstance(step, Mapping):
            raise GraphError(f"a step must be an object, got {step!r}")
        out.append((step, branch))
        if step.get("Type") == "Condition":
            arguments = step.get("Arguments") or {}
            _flatten(arguments.get("IfSteps") or [], Branch(step["Name"], True), out)
            _flatten(arguments.get("ElseSteps") or [], Branch(step["Name"], False), out)


def _dependencies(step: Mapping[str, Any], branch: Branch | None) -> set[str]:
    depends = set(step.get("DependsOn") or [])
    arguments = dict(step.get("Arguments") or {})
    # A condition's branches are separate nodes; what they read is their own dependency.
    arguments.pop("IfSteps", None)
    arguments.pop("ElseSteps", None)
    try:
        depends |= referenced_steps(arguments)
    except ExpressionError as error:
        raise GraphError(f"step {step.get('Name')!r}: {error}") from None
    if branch is not None:
        depends.add(branch.condition)
    return depends


def topological_order(nodes: Mapping[str, StepNode]) -> list[str]:
    """Steps ordered so each comes after its dependencies; ties keep definition order."""
    waiting = {name: set(node.depends_on) for name, node in nodes.items()}
    dependents: dict[str, list[str]] = {name: [] for name in nodes}
    for name, node in nodes.items():
        for dependency in node.depends_on:
            dependents[dependency].append(name)
    ready = [(node.index, name) for name, node in nodes.items() if not waiting[name]]
    heapq.heapify(ready)
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for dependent in dependents[name]:
            waiting[dependent].discard(name)
            if not waiting[dependent]:
                heapq.heappush(ready, (nodes[dependent].index, dependent))
    if len(order) < len(nodes):
        raise CycleError(_find_cycle(nodes, {name for name in nodes if name not in order}))
    return order


def _find_cycle(nodes: Mapping[str, StepNode], remaining: set[str]) -> list[str]:
    """One cycle among the steps that could not be ordered, in dependency order."""
    start = min(remaining, key=lambda name: nodes[name].index)
    path: list[str] = []
    on_path: dict[str, int] = {}
    current = start
    # Every remaining step waits on at least one other remaining step, so this walk must loop.
    while current not in on_path:
        on_path[current] = len(path)
        path.append(current)
        candidates = sorted(
            (dependency for dependency in nodes[current].depends_on if dependency in remaining),
            key=lambda name: nodes[name].index,
        )
        current = candidates[0]
    cycle = path[on_path[current] :] + [current]
    # Written as "A -> B" meaning "A feeds B": reverse the walk along dependencies.
    return list(reversed(cycle))
