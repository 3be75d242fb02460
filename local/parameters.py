"""Pipeline parameters: the definition's declared Parameters, their defaults and the overrides.

Overrides may arrive typed (from Python) or as strings (from a command line); both are checked
against the declared type. An unknown name, a value of the wrong type, a value outside a
String parameter's EnumValues or a missing required value is one ParameterError whose message
names the parameter and what would be accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

TYPES = ("String", "Integer", "Float", "Boolean")


class ParameterError(ValueError):
    """A parameter override the definition does not accept."""


def declared_parameters(definition: Mapping[str, Any]) -> dict[str, dict]:
    """Name -> declaration ({"Name", "Type", "DefaultValue"?, "EnumValues"?})."""
    declared = {}
    for declaration in definition.get("Parameters") or []:
        kind = declaration.get("Type", "String")
        if kind not in TYPES:
            raise ParameterError(f"parameter {declaration.get('Name')!r} has unsupported type {kind!r}")
        declared[declaration["Name"]] = declaration
    return declared


def resolve_parameters(definition: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The value of every declared parameter: the override if given, else the default."""
    declared = declared_parameters(definition)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        accepted = ", ".join(sorted(declared)) or "(none)"
        raise ParameterError(f"unknown parameter {unknown[0]!r}; this pipeline takes: {accepted}")
    values = {}
    for name, declaration in declared.items():
        if name in overrides:
            values[name] = coerce(declaration, overrides[name])
        elif "DefaultValue" in declaration:
            values[name] = coerce(declaration, declaration["DefaultValue"])
        else:
            raise ParameterError(f"parameter {name!r} has no default value; give one, e.g. {name}=...")
    return values


def coerce(declaration: Mapping[str, Any], value: Any) -> Any:
    """`value` as the declared type, or ParameterError naming the parameter and the type."""
    name, kind = declaration["Name"], declaration.get("Type", "String")
    converted = _CONVERTERS[kind](value)
    if converted is None:
        raise ParameterError(f"parameter {name!r} is {_ARTICLE[kind]} {kind}; {value!r} is not")
    enum_values = declaration.get("EnumValues")
    if enum_values and converted not in enum_values:
        raise ParameterError(
            f"parameter {name!r} must be one of {', '.join(map(str, enum_values))}; got {value!r}"
        )
    return converted


def _to_string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _to_integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _to_boolean(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


_CONVERTERS = {"String": _to_string, "Integer": _to_integer, "Float": _to_float, "Boolean": _to_boolean}
_ARTICLE = {"String": "a", "Integer": "an", "Float": "a", "Boolean": "a"}
