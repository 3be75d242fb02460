"""`kennel`: the same commands for both targets.

    kennel definition [--target T] [-o FILE]
    kennel upsert     [--target T]
    kennel run        [--target T] [--param Name=Value ...] [--data PATH_OR_S3_URI] [--wait]
    kennel run        [--target T] --resume EXECUTION
    kennel status     [EXECUTION] [--target T] [--json]
    kennel models     [--target T] [--json]
    kennel approve    (--latest | --version N) [--reason TEXT] [--target T]
    kennel reject     (--latest | --version N) [--reason TEXT] [--target T]
    kennel endpoints  [--target T] [--json]
    kennel endpoint stop NAME [--target T]
    kennel predict    IMAGE... [--endpoint NAME] [--top-k K] [--target T] [--json]
    kennel policy     [--trust]
    kennel studio     [--port N] [--host 127.0.0.1] [--no-open]

The target defaults to `target` in kennel.toml (KENNEL_TARGET), which defaults to local. The
SageMaker SDK is imported only by the commands that need it, so `kennel --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entrypoints import contract
from pipeline.config import TARGETS, KennelConfig, load_config
from pipeline.errors import KennelError

log = logging.getLogger("kennel")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kennel", description="Fine-tune image classifiers with one SageMaker pipeline, on AWS or locally.")
    parser.add_argument("--config", type=Path, help="kennel.toml to use (default: $KENNEL_CONFIG, ./kennel.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the SDK's and boto's logs too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--target", choices=TARGETS, help="where to run (default: target in kennel.toml)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")

    definition = commands.add_parser("definition", parents=[target], help="print or write the pipeline definition")
    definition.add_argument("-o", "--output", type=Path, help="write the JSON here instead of stdout")
    definition.add_argument("--deploy-pipeline", action="store_true",
                            help="the one-step deploy pipeline that approvals start, instead of the main one")

    commands.add_parser("upsert", parents=[target], help="create or update the pipeline on the target")

    run = commands.add_parser("run", parents=[target, as_json], help="start a pipeline execution")
    run.add_argument("--param", action="append", default=[], metavar="Name=Value",
                     help="override a pipeline parameter (repeatable); see README.md for the list")
    run.add_argument("--data", help="ImageFolder tree: a local folder (uploaded) or an s3:// URI")
    run.add_argument("--wait", action="store_true", help="wait for the execution to finish")
    run.add_argument("--resume", metavar="EXECUTION",
                     help="continue a failed or stopped execution from the steps that did not succeed")

    status = commands.add_parser("status", parents=[target, as_json],
                                 help="list the executions and show one with its steps")
    status.add_argument("execution", nargs="?", help="execution id or ARN (default: the newest)")

    commands.add_parser("models", parents=[target, as_json], help="list the registered model packages")

    for verb in ("approve", "reject"):
        decide = commands.add_parser(verb, parents=[target, as_json], help=f"{verb} a model package")
        which = decide.add_mutually_exclusive_group(required=True)
        which.add_argument("--latest", action="store_true", help="the newest package")
        which.add_argument("--version", type=int, help="package version N")
        decide.add_argument("--reason", help="recorded as the package's approval description")

    commands.add_parser("endpoints", parents=[target, as_json], help="list the endpoints and what they serve")
    endpoint = commands.add_parser("endpoint", parents=[target, as_json], help="manage one endpoint")
    endpoint_actions = endpoint.add_subparsers(dest="action", required=True, metavar="ACTION")
    stop = endpoint_actions.add_parser("stop", help="stop (locally) or delete (aws) an endpoint")
    stop.add_argument("name")

    predict = commands.add_parser("predict", parents=[target, as_json], help="classify images with an endpoint")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--endpoint", help="endpoint name (default: endpoint_name in kennel.toml)")
    predict.add_argument("--top-k", type=int, default=3, help="labels to show per image (default 3)")

    policy = commands.add_parser("policy", help="print the execution role's IAM policy for this configuration")
    policy.add_argument("--trust", action="store_true", help="print the role's trust policy instead")

    studio = commands.add_parser("studio", parents=[target], help="serve the local pipeline page in the browser")
    studio.add_argument("--port", type=int, default=8470, help="port to listen on (default 8470; 0 picks a free one)")
    studio.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: only this machine can open the page)")
    studio.add_argument("--no-open", action="store_true", help="do not open a browser tab")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        config = load_config(args.config)
        return COMMANDS[args.command](args, config)
    except KennelError as error:
        print(f"kennel: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("kennel: interrupted", file=sys.stderr)
        return 130


def _configure_logging(verbose: bool) -> None:
    """Kennel's progress at INFO on stderr; other libraries' records only when they are errors.

    The SDK sets levels on its own loggers (and narrates every build), so the filtering is done on
    the handler, where a library's logger levels cannot get around it.
    """
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_quiet_libraries)
        warnings.filterwarnings("ignore", module=r"sagemaker(\..*)?$")
        warnings.filterwarnings("ignore", message=".*PipelineSession.*")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    if record.name == "kennel" or record.name.startswith("kennel."):
        return record.levelno >= logging.INFO
    return record.levelno >= logging.ERROR


def _target_name(args: argparse.Namespace, config: KennelConfig) -> str:
    return args.target or config.target


def cmd_definition(args: argparse.Namespace, config: KennelConfig) -> int:
    from pipeline.config import PLACEHOLDER_BUCKET
    from pipeline.definition import build_offline, check_output_path, write_json

    target = _target_name(args, config)
    if args.output:
        check_output_path(args.output)
    # The SDK prints a few lines while it builds; stdout must hold only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        build = build_offline(config, target)
    if target == "aws" and config.for_target("aws").bucket == PLACEHOLDER_BUCKET:
        log.warning("no bucket or role configured: the definition uses placeholders; set KENNEL_BUCKET and "
                    "KENNEL_ROLE_ARN before `kennel upsert --target aws`")
    document = build.deploy_definition if args.deploy_pipeline else build.definition
    if args.output:
        write_json(document, args.output)
        log.info("wrote the %s definition (%d steps) to %s", target, len(document["Steps"]), args.output)
    else:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


def cmd_upsert(args: argparse.Namespace, config: KennelConfig) -> int:
    target = _get_target(args, config)
    with contextlib.redirect_stdout(sys.stderr):
        result = target.upsert()
    print(f"{'created' if result.created else 'updated'} pipeline {result.pipeline_name}: {result.pipeline_arn}")
    for message in result.messages:
        print(message)
    return 0


def cmd_run(args: argparse.Namespace, config: KennelConfig) -> int:
    from pipeline.parameters import parse_overrides

    # Checked before anything is sent, against the settings of the target the run goes to.
    parameters = parse_overrides(args.param, config.for_target(_target_name(args, config)))
    target = _get_target(args, config)
    if args.resume:
        if parameters or args.data:
            raise KennelError("--resume continues an execution with its own parameters and data; "
                              "drop --param/--data, or start a new run")
        with _progress_to_stderr(args.json):
            execution = target.resume(args.resume)
        _print_json(execution.to_dict()) if args.json else _print_execution(execution)
        return 0 if execution.status == "Succeeded" else 1
    if args.data:
        if "InputDataUri" in parameters:
            raise KennelError("give the data once: either --data or --param InputDataUri=...")
        parameters["InputDataUri"] = target.stage_data(args.data)
    with _progress_to_stderr(args.json):
        execution = target.start(parameters, args.wait)
    if args.json:
        _print_json(execution.to_dict())
    else:
        _print_execution(execution)
    if args.wait and execution.status != "Succeeded":
        return 1
    return 0


def _progress_to_stderr(as_json: bool) -> contextlib.AbstractContextManager:
    """With --json, stdout holds only the JSON document: a live run's progress goes to stderr."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def cmd_status(args: argparse.Namespace, config: KennelConfig) -> int:
    target = _get_target(args, config)
    if args.execution is None:
        executions = target.executions()
        if args.json:
            newest = target.status(executions[0].execution_arn) if executions else None
            _print_json({"executions": [e.to_dict() for e in executions],
                         "newest": newest.to_dict() if newest else None})
            return 0
        if not executions:
            print(f"no executions of {config.pipeline_name} yet; start one with `kennel run`")
            return 0
        rows = [("EXECUTION", "STATUS", "STARTED")]
        rows += [(e.execution_id, e.status, e.started or "-") for e in executions[:10]]
        _print_table(rows)
        print()
        args.execution = executions[0].execution_arn
    execution = target.status(args.execution)
    if args.json:
        _print_json(execution.to_dict())
    else:
        _print_execution(execution)
    return 0


def cmd_models(args: argparse.Namespace, config: KennelConfig) -> int:
    packages = _get_target(args, config).models()
    if args.json:
        _print_json([package.to_dict() for package in packages])
        return 0
    if not packages:
        print(f"no model packages in {config.model_package_group} yet")
        return 0
    rows = [("VERSION", "STATUS", "TEST LOSS", "TEST ACCURACY", "CREATED", "EXECUTION", "DESCRIPTION")]
    rows += [(str(p.version), p.approval_status, _metric(p.metrics.get("test_loss"), "{:.4f}"),
              _metric(p.metrics.get("test_accuracy"), "{:.1%}"), p.created or "-",
              p.execution_arn.rsplit("/", 1)[-1] or "-", p.approval_description or "-") for p in packages]
    _print_table(rows)
    print("(--json adds each package's ARN and metrics file, and on the local target its status history)")
    return 0


def _metric(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def cmd_decide(args: argparse.Namespace, config: KennelConfig) -> int:
    target = _get_target(args, config)
    version = None if args.latest else args.version
    if version is not None and version < 1:
        raise KennelError(f"--version {version}: versions start at 1")
    decide = target.approve if args.command == "approve" else target.reject
    package = decide(version, args.reason)
    if args.json:
        _print_json(package.to_dict())
    else:
        print(f"version {package.version} of {config.model_package_group} is now {package.approval_status}")
        if package.message:
            print(package.message)
    return 0


def cmd_endpoints(args: argparse.Namespace, config: KennelConfig) -> int:
    endpoints = _get_target(args, config).endpoints()
    if args.json:
        _print_json([endpoint.to_dict() for endpoint in endpoints])
        return 0
    if not endpoints:
        print("no endpoints yet; approving a model package deploys one (kennel approve --latest)")
        return 0
    rows = [("NAME", "STATUS", "URL", "PACKAGE", "DETAIL")]
    rows += [(e.name, e.status, e.url or "-", str(e.model_package_version or "-"), e.detail) for e in endpoints]
    _print_table(rows)
    return 0


def cmd_endpoint(args: argparse.Namespace, config: KennelConfig) -> int:
    endpoint = _get_target(args, config).stop_endpoint(args.name)
    if args.json:
        _print_json(endpoint.to_dict())
    else:
        print(f"endpoint {endpoint.name} is {endpoint.status}")
    return 0


# What the endpoint answers a raw image with; only JSON requests can ask for more.
RAW_IMAGE_LABELS = contract.DEFAULT_TOP_K
# File signatures of the image types the endpoint names; Pillow on the endpoint identifies any
# other format sent as application/x-image (GIF, BMP, WebP, TIFF, ...), whatever the file is called.
_IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def predict_request(data: bytes, top_k: int) -> tuple[bytes, str]:
    """The body and content type that send one image to the endpoint.

    The image's own bytes, as image/png, image/jpeg or application/x-image: SageMaker's 6 MB limit
    then holds images up to 6 MB, where base64 in JSON would cap them at 4.5 MB. JSON only when
    more labels are asked for than a raw image gets, and the JSON still fits under the limit.
    """
    import base64

    from entrypoints.contract import MAX_PAYLOAD_BYTES

    if top_k > RAW_IMAGE_LABELS:
        body = json.dumps({"image": base64.b64encode(data).decode("ascii"), "top_k": top_k}).encode()
        if len(body) <= MAX_PAYLOAD_BYTES:
            return body, "application/json"
    media = next((media for signature, media in _IMAGE_SIGNATURES if data.startswith(signature)),
                 "application/x-image")
    return data, media


def cmd_predict(args: argparse.Namespace, config: KennelConfig) -> int:
    if args.top_k < 1:
        raise KennelError(f"--top-k {args.top_k}: give 1 or more")
    target = _get_target(args, config)
    endpoint = args.endpoint or config.endpoint_name
    answers = []
    for image in args.images:
        try:
            data = image.read_bytes()
        except OSError as error:
            raise KennelError(f"{image}: cannot read it ({error.strerror})") from None
        body, content_type = predict_request(data, args.top_k)
        if content_type != "application/json" and args.top_k > RAW_IMAGE_LABELS:
            log.warning("%s: too large to ask for %d labels in JSON; the endpoint returns its %d", image,
                        args.top_k, RAW_IMAGE_LABELS)
        answer = target.predict(body, content_type, endpoint)
        answers.append({"image": str(image), "predictions": answer.get("predictions", [])[:args.top_k]})
    if args.json:
        _print_json(answers)
        return 0
    for answer in answers:
        print(answer["image"])
        for prediction in answer["predictions"]:
            print(f"  {prediction['probability']:7.2%}  {prediction['label']}")
    return 0


def cmd_policy(args: argparse.Namespace, config: KennelConfig) -> int:
    from pipeline.policy import render_execution_role_policy, trust_policy

    document = trust_policy() if args.trust else render_execution_role_policy(config)
    _print_json(document)
    return 0


def cmd_studio(args: argparse.Namespace, config: KennelConfig) -> int:
    """Serve the page over the local state folder until Ctrl-C."""
    if _target_name(args, config) != "local":
        raise KennelError("kennel studio shows the local target's state; for --target aws open the pipeline in "
                          "SageMaker Studio (Pipelines, then the pipeline's executions)")
    if not 0 <= args.port <= 65535:
        raise KennelError(f"--port {args.port}: give a port from 1 to 65535 (0 picks a free one)")
    import webbrowser

    from local.home import resolve_home
    from local.studio.server import serve

    def ready(url: str) -> None:
        print(f"Kennel studio: {url}  (state: {resolve_home()}; Ctrl-C stops it)", flush=True)
        if not args.no_open:
            webbrowser.open(url)

    try:
        serve(resolve_home(), args.host, args.port, config.endpoint_name, on_ready=ready,
              model_package_group=config.model_package_group)
    except OSError as error:
        raise KennelError(str(error)) from None
    except KeyboardInterrupt:
        print("kennel studio stopped", flush=True)
    return 0


def _get_target(args: argparse.Namespace, config: KennelConfig) -> Any:
    from pipeline.targets import get_target

    return get_target(_target_name(args, config), config)


def _print_execution(execution: Any) -> None:
    if execution.steps_shown:  # the run's own display already showed every step and the summary
        for note in execution.notes:
            print(f"  {note}")
        return
    print(f"execution {execution.execution_id}  {execution.status}  started {execution.started or '-'}")
    if execution.failure_reason:
        print(f"  failure: {execution.failure_reason}")
    if execution.parameters:
        print("  parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(execution.parameters.items())))
    if execution.steps:
        rows = [("  STEP", "STATUS", "STARTED", "ENDED")]
        rows += [(f"  {s.name}", s.status + (" (cached)" if s.cached else ""), s.started or "-", s.ended or "-")
                 for s in execution.steps]
        _print_table(rows)
        for step in execution.steps:
            if step.failure_reason:
                print(f"  {step.name} failed: {step.failure_reason}")
            if step.log_path:
                print(f"  {step.name} log: {step.log_path}")
            for line in step.details:
                print(f"  {step.name}: {line}")
    for note in execution.notes:
        print(f"  ({note})")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _print_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


COMMANDS = {
    "definition": cmd_definition,
    "upsert": cmd_upsert,
    "run": cmd_run,
    "status": cmd_status,
    "models": cmd_models,
    "approve": cmd_decide,
    "reject": cmd_decide,
    "studio": cmd_studio,
    "policy": cmd_policy,
    "endpoints": cmd_endpoints,
    "endpoint": cmd_endpoint,
    "predict": cmd_predict,
}
