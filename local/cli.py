"""`python -m local`: run, resume and inspect local executions of a definition JSON file.

    python -m local run DEFINITION.json [--param NAME=VALUE]... [--pipeline-name NAME]
    python -m local resume EXECUTION_ID
    python -m local status [EXECUTION_ID] [--json]

All take --home DIR (default: $KENNEL_HOME or ./.kennel). Exit status: 0 when the execution
succeeded, 1 when it failed or was stopped, 2 for a usage or input error (one line on stderr).
`kennel` wires its own commands to the same functions; this entry needs no SageMaker SDK.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from local.home import resolve_home
from local.progress import format_execution, make_progress
from local.runner import DEFAULT_PIPELINE_NAME, USER_ERRORS, RunOptions, resume, run_pipeline
from local.state import SUCCEEDED, Execution, list_executions, load_execution


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m local", description="Run a pipeline definition locally.")
    parser.add_argument("--home", type=Path, help="state folder (default: $KENNEL_HOME or ./.kennel)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="start an execution of a definition JSON file")
    run.add_argument("definition", type=Path)
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="parameter override")
    run.add_argument("--pipeline-name", default=DEFAULT_PIPELINE_NAME)
    run.add_argument("--parallel", type=int, help="steps at once (default: the machine's cores)")
    run.add_argument("--no-cache", action="store_true", help="ignore the steps' CacheConfig")
    run.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    again = commands.add_parser("resume", help="continue a failed, stopped or interrupted execution")
    again.add_argument("execution_id")
    again.add_argument("--quiet", action="store_true")
    status = commands.add_parser("status", help="list executions, or show one")
    status.add_argument("execution_id", nargs="?")
    status.add_argument("--json", action="store_true")
    return parser


def parse_params(pairs: Sequence[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise ValueError(f"--param {pair!r}: write NAME=VALUE")
        params[name] = value
    return params


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = resolve_home(args.home)
    # SIGTERM ends a run like Ctrl-C: jobs are stopped and the execution is recorded as Stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "status":
            return _status(home, args.execution_id, args.json)
        progress = make_progress(sys.stdout, quiet=args.quiet)
        if args.command == "run":
            definition = _read_definition(args.definition)
            options = RunOptions(max_parallel=args.parallel, use_cache=not args.no_cache)
            execution = run_pipeline(
                definition,
                parse_params(args.param),
                home,
                pipeline_name=args.pipeline_name,
                options=options,
                progress=progress,
            )
        else:
            execution = resume(args.execution_id, home, progress=progress)
    except (*USER_ERRORS, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped; see `python -m local status` and resume the execution later", file=sys.stderr)
        return 130
    if args.quiet:
        print(format_execution(execution))
    return 0 if execution.status == SUCCEEDED else 1


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _read_definition(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read the definition {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None


def _status(home: Path, execution_id: str | None, as_json: bool) -> int:
    if execution_id:
        execution = load_execution(home, execution_id)
        print(json.dumps(execution.to_summary(), indent=2) if as_json else format_execution(execution))
        return 0
    executions = list_executions(home)
    if as_json:
        print(json.dumps([item.to_summary() for item in executions], indent=2))
    elif not executions:
        print(f"no executions in {home}")
    else:
        for item in executions:
            print(_one_line(item))
    return 0


def _one_line(execution: Execution) -> str:
    done = sum(1 for record in execution.steps.values() if record.status == SUCCEEDED)
    return (
        f"{execution.execution_id}  {execution.pipeline_name:<20} {execution.status:<10} "
        f"{execution.creation_time}  {done}/{len(execution.steps)} steps succeeded"
    )
