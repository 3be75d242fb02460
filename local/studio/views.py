"""The JSON documents the studio page shows, built from the state folder (no HTTP here).

Every function takes the home folder and names from the request; names are checked before they
touch the file system, and the only files ever read for the page are the ones the state records
point to (a step's log, plots and profiler report) and that lie under the home folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from entrypoints.contract import EVALUATION_METRICS_KEY, METRIC_DEFINITIONS
from local.endpoints import list_endpoints
from local.expressions import ExpressionError, Scope, referenced_steps, resolve
from local.files import read_json
from local.graph import GraphError, build_graph, topological_order
from local.home import store_root
from local.progress import LIVE_RULE_STATUSES, rule_statuses
from local.registry import LocalRegistry, RegistryError
from local.state import Execution, StateError, StepRecord, list_executions, load_execution
from local.store import ObjectStore, StoreError

LOG_TAIL_LINES = 200
LOG_TAIL_BYTES = 256 * 1024
WHOLE_LOG_MAX_BYTES = 16 * 1024 * 1024  # a browser tab can show this much text
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,255}$")
FILE_KINDS = ("log", "plot", "profiler-report")


class NotFound(LookupError):
    """Nothing by that name in the state folder (HTTP 404)."""


class Forbidden(PermissionError):
    """A file the page may not read: outside the state folder, or not one the state records (HTTP 403)."""


def check_name(value: str, what: str) -> str:
    """Execution ids, step, pipeline and endpoint names: letters, digits, '-', '_', '.' only."""
    if not SAFE_NAME.match(value) or ".." in value:
        raise NotFound(f"{what} {value!r} is not a valid name")
    return value


# --- pipelines and their DAG --------------------------------------------------------------------


def list_pipelines(home: Path) -> list[dict[str, Any]]:
    """Every upserted pipeline (pipelines/<name>/definition.json), by name."""
    root = home / "pipelines"
    names = sorted(p.parent.name for p in root.glob("*/definition.json")) if root.is_dir() else []
    return [{"Name": name} for name in names if SAFE_NAME.match(name)]


def pipeline_view(home: Path, name: str) -> dict[str, Any]:
    path = home / "pipelines" / check_name(name, "pipeline") / "definition.json"
    if not path.is_file():
        raise NotFound(f"no pipeline {name!r} in {home} (run `kennel upsert` first)")
    definition = read_json(path)
    return {"Name": name, **dag(definition), "Parameters": parameters(definition)}


def parameters(definition: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {"Name": item.get("Name"), "Type": item.get("Type"), "DefaultValue": item.get("DefaultValue")}
        for item in definition.get("Parameters") or []
    ]


def dag(definition: Mapping[str, Any]) -> dict[str, Any]:
    """Nodes with a layer (longest dependency path from a root) and typed edges: 'depends'
    (DependsOn), 'data' (a Get/JsonGet on the other step's properties), 'if' / 'else' (branches)."""
    try:
        nodes = build_graph(definition)
        order = topological_order(nodes)
    except GraphError as error:
        return {"Nodes": [], "Edges": [], "Error": str(error)}
    layer: dict[str, int] = {}
    edges = []
    for name in order:
        node = nodes[name]
        layer[name] = 1 + max((layer[d] for d in node.depends_on), default=-1)
        explicit = set(node.step.get("DependsOn") or [])
        arguments = {k: v for k, v in (node.step.get("Arguments") or {}).items() if k not in ("IfSteps", "ElseSteps")}
        data = referenced_steps(arguments)
        # A branch edge is implied when another step of the same branch leads here already.
        implied = node.branch is not None and any(nodes[d].branch == node.branch for d in node.depends_on)
        for source in sorted(node.depends_on, key=lambda n: nodes[n].index):
            edge: dict[str, Any] = {"From": source, "To": name}
            if node.branch is not None and source == node.branch.condition:
                edge.update(Kind="if" if node.branch.when else "else", Implied=implied)
            else:
                edge["Kind"] = "data" if source in data and source not in explicit else "depends"
            edges.append(edge)
    return {
        "Nodes": [
            {
                "Name": name,
                "Type": nodes[name].type,
                "Layer": layer[name],
                "Branch": (
                    {"Condition": nodes[name].branch.condition, "When": nodes[name].branch.when}  # type: ignore[union-attr]
                    if nodes[name].branch
                    else None
                ),
            }
            for name in order
        ],
        "Edges": edges,
    }


# --- executions ---------------------------------------------------------------------------------


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start:
        return None
    try:
        begin = datetime.fromisoformat(start)
        finish = datetime.fromisoformat(end) if end else datetime.now(begin.tzinfo)
    except ValueError:
        return None
    return round((finish - begin).total_seconds(), 1)


def execution_summary(execution: Execution) -> dict[str, Any]:
    return {
        "ExecutionId": execution.execution_id,
        "PipelineName": execution.pipeline_name,
        "Status": execution.status,
        "StartTime": execution.creation_time,
        "EndTime": execution.end_time,
        "DurationSeconds": _seconds_between(execution.creation_time, execution.end_time),
        "Parameters": execution.parameters,
        "FailureReason": execution.failure_reason,
        "Interrupted": execution.interrupted,
    }


def executions_view(home: Path) -> list[dict[str, Any]]:
    return [execution_summary(execution) for execution in list_executions(home)]


def _load(home: Path, execution_id: str) -> Execution:
    try:
        return load_execution(home, check_name(execution_id, "execution"))
    except StateError as error:
        raise NotFound(str(error)) from None


def _definition(execution: Execution) -> dict[str, Any]:
    path = (execution.folder or Path()) / "definition.json"
    return read_json(path) if path.is_file() else {}


def execution_view(home: Path, execution_id: str) -> dict[str, Any]:
    execution = _load(home, execution_id)
    definition = _definition(execution)
    steps = {
        name: {
            "Status": record.status,
            "Type": record.type,
            "StartTime": record.start_time,
            "EndTime": record.end_time,
            "DurationSeconds": _seconds_between(record.start_time, record.end_time),
            "FailureReason": record.failure_reason,
            "CacheHit": bool(record.cache_hit),
        }
        for name, record in execution.steps.items()
    }
    return {
        **execution_summary(execution),
        **dag(definition),
        "DefinitionParameters": parameters(definition),
        "Steps": steps,
        "SkippedSteps": execution.skipped_steps,
    }


# --- one step -----------------------------------------------------------------------------------


def _record(execution: Execution, step: str) -> StepRecord:
    record = execution.steps.get(check_name(step, "step"))
    if record is None:
        raise NotFound(f"execution {execution.execution_id} has no record of step {step!r} (it has not started)")
    return record


def step_view(home: Path, execution_id: str, step: str) -> dict[str, Any]:
    execution = _load(home, execution_id)
    record = _record(execution, step)
    properties, metadata = record.properties, record.metadata
    arguments, resolved = _arguments(home, execution, record)
    base = f"/api/executions/{execution.execution_id}/steps/{record.name}"
    log = _log_file(home, record)
    profiler_report = _recorded_file(home, (metadata.get("Profiler") or {}).get("Report"))
    return {
        "Name": record.name,
        "Type": record.type,
        "Status": record.status,
        "StartTime": record.start_time,
        "EndTime": record.end_time,
        "DurationSeconds": _seconds_between(record.start_time, record.end_time),
        "FailureReason": record.failure_reason,
        "AttemptCount": record.attempt_count,
        "JobName": record.job_name,
        "CacheHit": record.cache_hit,
        "Arguments": arguments,
        "ArgumentsResolved": resolved,
        "Properties": properties,
        "Metadata": metadata,
        "Log": log_tail(log) if log else None,
        "LogUrl": f"{base}/log" if log else None,
        "Metrics": metrics(properties) or log_metrics(properties, log),
        "Trials": trials(properties),
        "Evaluation": evaluation(properties),
        "Conditions": metadata.get("EvaluatedConditions") or properties.get("EvaluatedConditions"),
        "DebugRules": shown_rule_statuses(home, record, "DebugRuleEvaluationStatuses"),
        "ProfilerRules": shown_rule_statuses(home, record, "ProfilerRuleEvaluationStatuses"),
        "ProfilerReportUrl": f"{base}/files/profiler-report/0" if profiler_report else None,
        "Plots": [
            {"Name": str(plot.get("Name") or f"plot {index}"), "Url": f"{base}/files/plot/{index}"}
            for index, plot in enumerate(metadata.get("Plots") or [])
            if isinstance(plot, Mapping) and _recorded_file(home, plot.get("Path"))
        ],
    }


def _arguments(home: Path, execution: Execution, record: StepRecord) -> tuple[Any, bool]:
    """The step's Arguments with parameters and upstream properties filled in, as the runner
    resolved them (CurrentDateTime reads as the execution's start time); the raw
    Arguments when something they read is not available (yet)."""
    try:
        node = build_graph(_definition(execution)).get(record.name)
    except GraphError:
        return None, False
    if node is None:
        return None, False
    raw = {k: v for k, v in (node.step.get("Arguments") or {}).items() if k not in ("IfSteps", "ElseSteps")}
    store = ObjectStore(store_root(home))
    variables = execution.variables(record.job_name, current_time=execution.creation_time,
                                    step_type=record.type or None)
    values = {p["Name"]: p["DefaultValue"] for p in parameters(_definition(execution)) if p["Name"]}
    values.update(execution.parameters)
    scope = Scope(
        parameters=values,
        execution=variables,
        steps={name: other.properties for name, other in execution.steps.items() if other.status == "Succeeded"},
        read_json=lambda uri: json.loads(store.read_bytes(uri)),
    )
    try:
        return resolve(raw, scope), True
    except (ExpressionError, StoreError, ValueError, KeyError, TypeError):
        return raw, False


def shown_rule_statuses(home: Path, record: StepRecord, key: str) -> list[dict[str, Any]]:
    """The step's Debugger or profiler rule statuses (`key`) as `kennel status` reads them: settled
    once the job has ended, live from the job folder while it runs (InProgress at first)."""
    live = Path(record.job_dir or "") / LIVE_RULE_STATUSES[key]
    if record.job_dir and _recorded_file(home, str(live)) is None:
        record = replace(record, job_dir=None)  # the page reads no file outside the state folder
    statuses = rule_statuses(record, key)
    return [status for status in statuses if isinstance(status, Mapping)] if isinstance(statuses, list) else []


def metrics(properties: Mapping[str, Any]) -> list[dict[str, Any]]:
    """FinalMetricDataList (training) or the evaluation's scalar metrics, as Name/Value rows."""
    rows = [
        {"Name": item.get("MetricName"), "Value": item.get("Value")}
        for item in properties.get("FinalMetricDataList") or []
        if isinstance(item, Mapping)
    ]
    report = evaluation(properties)
    if report:
        rows += [{"Name": name, "Value": value} for name, value in report["Metrics"].items()]
    return rows


def log_metrics(properties: Mapping[str, Any], log: Path | None) -> list[dict[str, Any]]:
    """A training job's metrics as the tuner reads them: the last match of each MetricDefinition's
    regex in the log's tail (what SageMaker would have put in FinalMetricDataList)."""
    specification = properties.get("AlgorithmSpecification")
    if not isinstance(specification, Mapping):
        return []  # not a training job
    # A step without MetricDefinitions still runs train.py, whose metric lines the contract names.
    definitions = specification.get("MetricDefinitions") or METRIC_DEFINITIONS
    if log is None:
        return []
    text = log_tail(log, lines=LOG_TAIL_BYTES)["Text"]
    rows = []
    for definition in definitions:
        try:
            found = re.findall(str(definition.get("Regex") or "(?!)"), text)
        except re.error:
            continue
        if found:
            last = found[-1][0] if isinstance(found[-1], tuple) else found[-1]
            try:
                rows.append({"Name": definition.get("Name"), "Value": float(last)})
            except ValueError:
                continue
    return rows


def trials(properties: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The tuning job's trials: hyperparameters, status, final objective; the best one marked."""
    summaries = properties.get("TrainingJobSummaries")
    if not isinstance(summaries, list):
        return None
    best = (properties.get("BestTrainingJob") or {}).get("TrainingJobName")
    rows = []
    for summary in summaries:
        if not isinstance(summary, Mapping):
            continue
        objective = summary.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
        rows.append(
            {
                "TrainingJobName": summary.get("TrainingJobName"),
                "Status": summary.get("TrainingJobStatus"),
                "HyperParameters": summary.get("TunedHyperParameters") or {},
                "Objective": objective.get("Value"),
                "ObjectiveName": objective.get("MetricName"),
                "FailureReason": summary.get("FailureReason"),
                "EarlyStopped": summary.get("ObjectiveStatus") == "Stopped" or None,
                "Best": summary.get("TrainingJobName") == best,
            }
        )
    return rows


def evaluation(properties: Mapping[str, Any]) -> dict[str, Any] | None:
    """An evaluation.json among the step's property files: scalar metrics and the confusion matrix."""
    for content in (properties.get("PropertyFiles") or {}).values():
        block = content.get(EVALUATION_METRICS_KEY) if isinstance(content, Mapping) else None
        if isinstance(block, Mapping):
            return _evaluation(content, block)
    return None


def _evaluation(content: Mapping[str, Any], block: Mapping[str, Any]) -> dict[str, Any]:
    scalars = {
        name: item["value"]
        for name, item in block.items()
        if isinstance(item, Mapping) and isinstance(item.get("value"), int | float)
    }
    counts = block.get("confusion_matrix")
    matrix = None
    if isinstance(counts, Mapping) and counts:
        labels = [str(name) for name in content.get("class_names") or counts]
        matrix = {
            "Labels": labels,
            "Counts": [[int((counts.get(a) or {}).get(p, 0)) for p in labels] for a in labels],
        }
    return {"Metrics": scalars, "ConfusionMatrix": matrix, "PerClass": block.get("per_class")}


# --- files the state records --------------------------------------------------------------------


def _recorded_file(home: Path, recorded: Any) -> Path | None:
    """`recorded` (a path a record holds) when it is an existing file under the home folder."""
    if not isinstance(recorded, str) or not recorded:
        return None
    path = Path(recorded).resolve()
    if not path.is_relative_to(home.resolve()) or not path.is_file():
        return None
    return path


def _log_file(home: Path, record: StepRecord) -> Path | None:
    return _recorded_file(home, record.log_path)


def step_file(home: Path, execution_id: str, step: str, kind: str, index: int = 0) -> Path:
    """The file a step record points to: its log, its index-th plot, or its profiler report."""
    record = _record(_load(home, execution_id), step)
    if kind == "log":
        recorded = record.log_path
    elif kind == "plot":
        plots = record.metadata.get("Plots") or []
        recorded = plots[index].get("Path") if 0 <= index < len(plots) and isinstance(plots[index], Mapping) else None
    elif kind == "profiler-report":
        recorded = (record.metadata.get("Profiler") or {}).get("Report")
    else:
        raise NotFound(f"unknown file kind {kind!r} (one of {', '.join(FILE_KINDS)})")
    if not recorded:
        raise NotFound(f"step {step} records no {kind} file")
    path = _recorded_file(home, recorded)
    if path is None:
        raise Forbidden(f"the {kind} file of step {step} is missing or outside the state folder")
    return path


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> dict[str, Any]:
    """The last `lines` lines of a log (read from the end: logs can be large)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        handle.seek(max(0, size - LOG_TAIL_BYTES))
        data = handle.read()
    text_lines = data.decode("utf-8", errors="replace").splitlines()
    if size > LOG_TAIL_BYTES:
        text_lines = text_lines[1:]  # the first one is probably cut
    shown = text_lines[-lines:]
    return {"Text": "\n".join(shown), "Size": size, "Truncated": size > LOG_TAIL_BYTES or len(text_lines) > lines}


def whole_log(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with path.open("rb") as handle:
        handle.seek(max(0, size - WHOLE_LOG_MAX_BYTES))
        data = handle.read()
    return {"Text": data.decode("utf-8", errors="replace"), "Size": size, "Truncated": size > WHOLE_LOG_MAX_BYTES}


# --- registry and endpoints ---------------------------------------------------------------------


def _iso(value: Any) -> Any:
    return value.isoformat(timespec="seconds") if isinstance(value, datetime) else value


def registry_view(home: Path) -> list[dict[str, Any]]:
    """Every model package group with its packages (newest first), metrics and status history."""
    if not (home / "registry.db").is_file():
        return []
    registry = LocalRegistry(home)
    groups = []
    for group in registry.list_model_package_groups():
        name = group["ModelPackageGroupName"]
        packages = []
        for package in reversed(registry.list_model_packages(name)):
            report = package.get("Evaluation")
            block = report.get(EVALUATION_METRICS_KEY) if isinstance(report, Mapping) else None
            generated_by = (package.get("MetadataProperties") or {}).get("GeneratedBy") or ""
            packages.append(
                {
                    "Version": package["ModelPackageVersion"],
                    "Arn": package["ModelPackageArn"],
                    "Status": package["ModelApprovalStatus"],
                    "ApprovalDescription": package.get("ApprovalDescription") or "",
                    "CreationTime": _iso(package.get("CreationTime")),
                    "ModelDataUrl": package.get("ModelDataUrl"),
                    "ExecutionId": generated_by.rsplit("/", 1)[-1] if generated_by else None,
                    "Metrics": _evaluation(report, block)["Metrics"] if isinstance(block, Mapping) else {},
                    "History": [change.to_json() for change in registry.history(package["ModelPackageArn"])],
                }
            )
        groups.append({"Name": name, "CreationTime": _iso(group.get("CreationTime")), "Packages": packages})
    return groups


def endpoints_view(home: Path) -> list[dict[str, Any]]:
    return [
        {
            "Name": endpoint.name,
            "Status": endpoint.status,
            "Url": endpoint.url,
            "ModelPackageArn": endpoint.model_package_arn,
            "ModelPackageVersion": endpoint.model_package_version,
            "FailureReason": endpoint.failure_reason,
            "LastModifiedTime": endpoint.last_modified_time,
        }
        for endpoint in list_endpoints(home)
    ]


__all__ = [
    "Forbidden",
    "NotFound",
    "RegistryError",
    "dag",
    "shown_rule_statuses",
    "endpoints_view",
    "execution_view",
    "executions_view",
    "list_pipelines",
    "pipeline_view",
    "registry_view",
    "step_file",
    "step_view",
    "whole_log",
]
