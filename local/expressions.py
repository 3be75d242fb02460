"""Resolution of the expressions a SageMaker pipeline definition holds, as pure functions.

The definition's step arguments are plain JSON in which a few one-key objects are expressions:

    {"Get": "Parameters.Epochs"}                                  a parameter's value
    {"Get": "Execution.PipelineExecutionId"}                      an execution variable
    {"Get": "Steps.Prep.ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri"}
                                                                  a property of a finished step
    {"Std:Join": {"On": "/", "Values": [...]}}                    string join
    {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Eval.PropertyFiles.Eval"}, "Path": "a.b"}}
    {"Std:JsonGet": {"S3Uri": ..., "Path": ...}}                  a value from a JSON file

Conditions (ConditionStep) are objects with a "Type": Equals, GreaterThan, GreaterThanOrEqualTo,
LessThan, LessThanOrEqualTo, In, Not, Or. Anything else that looks like an expression raises
UnsupportedExpression rather than being passed through as data.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

GET = "Get"
JOIN = "Std:Join"
JSON_GET = "Std:JsonGet"
FUNCTION_PREFIX = "Std:"


class ExpressionError(Exception):
    """An expression that cannot be resolved (missing parameter, step or property...)."""


class UnsupportedExpression(ExpressionError):
    """A construct of the definition language that the local runner does not implement."""


@dataclass(frozen=True)
class Scope:
    """What expressions can see: parameter values, execution variables, finished steps."""

    parameters: Mapping[str, Any] = field(default_factory=dict)
    execution: Mapping[str, Any] = field(default_factory=dict)
    steps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # s3 URI -> parsed JSON, for JsonGet over an S3 object; None when no store is at hand.
    read_json: Callable[[str], Any] | None = None


# --- resolution -------------------------------------------------------------------------------


def is_expression(value: Any) -> bool:
    """True for the one-key objects that denote an expression rather than data."""
    if not isinstance(value, dict) or len(value) != 1:
        return False
    (key,) = value
    return key == GET or key.startswith(FUNCTION_PREFIX)


def resolve(value: Any, scope: Scope) -> Any:
    """`value` with every expression inside it replaced by its value."""
    if is_expression(value):
        return _resolve_expression(value, scope)
    if isinstance(value, dict):
        return {key: resolve(item, scope) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, scope) for item in value]
    return value


def _resolve_expression(expression: dict, scope: Scope) -> Any:
    ((key, body),) = expression.items()
    if key == GET:
        if not isinstance(body, str):
            raise ExpressionError(f"Get expects a property path string, got {body!r}")
        return resolve_get(body, scope)
    if key == JOIN:
        return _join(body, scope)
    if key == JSON_GET:
        return _json_get(body, scope)
    raise UnsupportedExpression(f"{key} is not supported by the local runner (in {json.dumps(expression)})")


def resolve_get(path: str, scope: Scope) -> Any:
    """Value of a `Get` path: Parameters.X, Execution.X or Steps.<name>.<property path>."""
    root, _, rest = path.partition(".")
    if root == "Parameters":
        if rest not in scope.parameters:
            raise ExpressionError(f"Get {path}: the pipeline has no parameter {rest!r}")
        return scope.parameters[rest]
    if root == "Execution":
        if rest not in scope.execution:
            raise UnsupportedExpression(f"Get {path}: execution variable {rest!r} is not available locally")
        return scope.execution[rest]
    if root == "Steps":
        tokens = parse_property_path(rest)
        if not tokens or not isinstance(tokens[0], str):
            raise ExpressionError(f"Get {path}: no step name")
        step_name = tokens[0]
        if step_name not in scope.steps:
            raise ExpressionError(f"Get {path}: step {step_name!r} has not succeeded in this execution")
        return lookup(scope.steps[step_name], tokens[1:], where=f"Get {path}")
    raise UnsupportedExpression(
        f"Get {path}: unknown root {root!r} (expected Parameters, Execution or Steps)"
    )


_TOKEN = re.compile(r"""\.?([A-Za-z0-9_\-:$]+)|\[(\d+)\]|\['([^']*)'\]|\["([^"]*)"\]""")


def parse_property_path(path: str) -> list[str | int]:
    """`A.B['x'].C[0]` -> ['A', 'B', 'x', 'C', 0]; raises ExpressionError on anything else."""
    tokens: list[str | int] = []
    position = 0
    while position < len(path):
        match = _TOKEN.match(path, position)
        if not match or match.end() == position:
            raise ExpressionError(f"cannot parse property path {path!r} at {path[position:]!r}")
        name, index, single, double = match.groups()
        if index is not None:
            tokens.append(int(index))
        else:
            tokens.append(next(part for part in (name, single, double) if part is not None))
        position = match.end()
    return tokens


def lookup(document: Any, tokens: list[str | int], *, where: str) -> Any:
    """Follow `tokens` into `document`.

    A string index into a list selects the element whose `...Name` field equals it: that is
    how SageMaker exposes `Outputs['train']`, `FinalMetricDataList['valid:loss']` and the like.
    """
    current = document
    for depth, token in enumerate(tokens):
        current = _step_into(current, token)
        if current is _MISSING:
            walked = _format_path(tokens[: depth + 1])
            raise ExpressionError(f"{where}: no property {walked}")
    return current


_MISSING = object()


def _step_into(current: Any, token: str | int) -> Any:
    if isinstance(token, int):
        if isinstance(current, list) and -len(current) <= token < len(current):
            return current[token]
        return _MISSING
    if isinstance(current, dict):
        return current.get(token, _MISSING)
    if isinstance(current, list):
        for item in current:
            if isinstance(item, dict) and any(
                key.endswith("Name") and value == token for key, value in item.items()
            ):
                return item
    return _MISSING


def _format_path(tokens: list[str | int]) -> str:
    text = ""
    for token in tokens:
        text += f"[{token}]" if isinstance(token, int) else (f".{token}" if text else token)
    return text


def _join(body: Any, scope: Scope) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("Values"), list):
        raise ExpressionError(f"Std:Join expects On and a list of Values, got {body!r}")
    separator = to_text(resolve(body.get("On", ""), scope))
    return separator.join(to_text(resolve(item, scope)) for item in body["Values"])


def _json_get(body: Any, scope: Scope) -> Any:
    if not isinstance(body, dict) or not isinstance(body.get("Path"), str):
        raise ExpressionError(f"Std:JsonGet expects a Path and a PropertyFile or S3Uri, got {body!r}")
    path = body["Path"]
    if "PropertyFile" in body:
        source = body["PropertyFile"]
        document = resolve(source, scope)
        label = source.get(GET, "property file") if isinstance(source, dict) else str(source)
    elif "S3Uri" in body:
        uri = to_text(resolve(body["S3Uri"], scope))
        if scope.read_json is None:
            raise UnsupportedExpression(f"Std:JsonGet on {uri}: no object store available")
        document = scope.read_json(uri)
        label = uri
    else:
        raise ExpressionError(f"Std:JsonGet needs a PropertyFile or an S3Uri, got {body!r}")
    return json_path_get(document, path, where=f"Std:JsonGet {path!r} in {label}")


def json_path_get(document: Any, path: str, *, where: str = "JsonGet") -> Any:
    """The value at a simple JsonPath (`a.b[0].c`, optionally starting with `$.`)."""
    trimmed = path[2:] if path.startswith("$.") else path.lstrip("$")
    if not trimmed:
        return document
    try:
        tokens = parse_property_path(trimmed)
    except ExpressionError as error:
        raise ExpressionError(f"{where}: {error}") from None
    current = document
    for depth, token in enumerate(tokens):
        if isinstance(token, int):
            ok = isinstance(current, list) and -len(current) <= token < len(current)
        else:
            ok = isinstance(current, dict) and token in current
        if not ok:
            raise ExpressionError(f"{where}: nothing at {_format_path(tokens[: depth + 1])}")
        current = current[token]
    return current


def to_text(value: Any) -> str:
    """How a value reads once it becomes part of a string (Join, job arguments, env)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, sort_keys=True)


# --- references (for the dependency graph) --------------------------------------------------


def referenced_steps(value: Any) -> set[str]:
    """Names of the steps whose properties `value` reads (Get Steps.X..., JsonGet on X's files)."""
    found: set[str] = set()
    if isinstance(value, dict):
        get = value.get(GET) if len(value) == 1 else None
        if isinstance(get, str) and get.startswith("Steps."):
            tokens = parse_property_path(get[len("Steps.") :])
            if tokens and isinstance(tokens[0], str):
                found.add(tokens[0])
        for item in value.values():
            found |= referenced_steps(item)
    elif isinstance(value, list):
        for item in value:
            found |= referenced_steps(item)
    return found


# --- conditions -------------------------------------------------------------------------------

_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "Equals": lambda left, right: left == right,
    "GreaterThan": lambda left, right: left > right,
    "GreaterThanOrEqualTo": lambda left, right: left >= right,
    "LessThan": lambda left, right: left < right,
    "LessThanOrEqualTo": lambda left, right: left <= right,
}


def evaluate_conditions(conditions: list[dict], scope: Scope) -> bool:
    """A ConditionStep's outcome: all of its conditions hold."""
    return all(evaluate_condition(condition, scope) for condition in conditions)


def explain_conditions(conditions: list[dict], scope: Scope) -> list[dict]:
    """Each condition with its operands resolved and its outcome: what the step decided on."""
    explained = []
    for condition in conditions:
        entry: dict[str, Any] = {"Type": condition.get("Type")}
        if condition.get("Type") in _COMPARISONS:
            entry["LeftValue"] = resolve(condition.get("LeftValue"), scope)
            entry["RightValue"] = resolve(condition.get("RightValue"), scope)
        entry["Outcome"] = evaluate_condition(condition, scope)
        explained.append(entry)
    return explained


def evaluate_condition(condition: dict, scope: Scope) -> bool:
    if not isinstance(condition, dict) or "Type" not in condition:
        raise ExpressionError(f"a condition needs a Type, got {condition!r}")
    kind = condition["Type"]
    if kind in _COMPARISONS:
        left = resolve(condition.get("LeftValue"), scope)
        right = resolve(condition.get("RightValue"), scope)
        left, right = comparable(left, right, kind)
        return _COMPARISONS[kind](left, right)
    if kind == "In":
        query = resolve(condition.get("QueryValue"), scope)
        values = resolve(condition.get("Values", []), scope)
        return any(_equal(query, candidate) for candidate in values)
    if kind == "Not":
        return not evaluate_condition(condition.get("Condition"), scope)
    if kind == "Or":
        return any(evaluate_condition(inner, scope) for inner in condition.get("Conditions", []))
    raise UnsupportedExpression(f"condition type {kind!r} is not supported by the local runner")


def _equal(left: Any, right: Any) -> bool:
    try:
        left, right = comparable(left, right, "Equals")
    except ExpressionError:
        return False
    return left == right


def comparable(left: Any, right: Any, kind: str) -> tuple[Any, Any]:
    """Bring two operands to one type, as SageMaker compares a JsonGet string with a number.

    Numbers compare as numbers (a numeric string next to a number is read as one), booleans
    as booleans ("true"/"false" accepted), strings as strings. Other mixes are an error.
    """
    if isinstance(left, bool) or isinstance(right, bool):
        return _as_bool(left, kind), _as_bool(right, kind)
    if _is_number(left) or _is_number(right):
        return _as_number(left, kind), _as_number(right, kind)
    if isinstance(left, str) and isinstance(right, str):
        return left, right
    raise ExpressionError(f"{kind}: cannot compare {left!r} with {right!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_number(value: Any, kind: str) -> float:
    if _is_number(value):
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if not math.isnan(number):
                return number
    raise ExpressionError(f"{kind}: {value!r} is not a number")


def _as_bool(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ExpressionError(f"{kind}: {value!r} is not a boolean")
