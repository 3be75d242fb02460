"""The local endpoint server: one process per endpoint, started by local/endpoints.py.

    python -m local.serving --name NAME --home HOME [--host 127.0.0.1] [--port 0]
                            [--max-payload-bytes 6291456]

Routes (SageMaker's container contract, and the runtime API path that boto3's
`sagemaker-runtime` client sends to an `endpoint_url`):

    GET  /ping                       200 once a model is loaded, 503 before
    POST /invocations                one request through entrypoints/inference.py's `handle`
    POST /endpoints/NAME/invocations the same (another NAME: 404)

Bound to a loopback address (the default), it answers only requests whose Host names loopback
(127.0.0.1, localhost, [::1], any port, as boto3 and urllib send it) or that carry no Host: a web
page that rebinds its own DNS name to 127.0.0.1 sends that name, and is refused (403).

A body whose Content-Length is over the limit is answered 413 without being buffered (what the
client still sends is read and discarded, briefly, so that it sees the answer instead of a reset);
a client that sends `Expect: 100-continue` gets the 413 before sending anything.

Life cycle. The server listens first (port 0 picks a free one) and writes `server.json` (state
Loading, port, URL), so /ping answers 503 while torch is imported and the model loaded. It then
waits until the parent's `endpoint.json` names its pid (the parent writes the record right after
starting it), loads the record's DesiredModel, and becomes InService.

Swapping models: the parent rewrites DesiredModel (with a new ReloadRequestId) and sends SIGHUP.
The server loads the new model fully while the old one keeps answering, then replaces its one
reference to the served model; a request takes that reference once when it starts, so requests in
flight finish on the old model. The outcome goes to server.json `LastReload` under the request id
(a model that fails to load leaves the old one serving). SIGTERM or SIGINT: stop accepting, let
requests in flight finish (up to 30 s), exit 0.

Signals are blocked in every thread and taken by the main thread with sigwait, so no handler ever
runs in the middle of a lock held by the code it interrupted.

torch is imported by this process only (never by the parent), with OMP_WAIT_POLICY=PASSIVE set
before the import unless the operator chose otherwise, and the intra-op threads sized by
inference.configure_threads.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from entrypoints.contract import MAX_PAYLOAD_BYTES
from local import endpoints
from local.endpoints import SERVER_FAILED, SERVER_LOADING, SERVER_READY, SERVER_STOPPED, ModelRef
from local.files import write_json_atomic
from local.home import resolve_home
from local.state import now

log = logging.getLogger("kennel.serving")

ENTRYPOINTS = Path(__file__).resolve().parents[1] / "entrypoints"
JSON_TYPE = "application/json"
VARIANT_NAME = "AllTraffic"
MODEL_VERSION_HEADER = "X-Kennel-Model-Package-Version"
STOP_GRACE_S = 30.0
DRAIN_LIMIT_S = 5.0  # how long an over-limit body is read and discarded before the connection closes
IDLE_CONNECTION_S = 120.0  # keep-alive connections idle longer than this are closed
RECORD_WAIT_S = 60.0
SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})

Handle = Callable[[Any, bytes, str | None, str | None], tuple[int, bytes, str]]

# --- routes ----------------------------------------------------------------------------------

PING, INVOKE, OTHER_ENDPOINT = "ping", "invoke", "other-endpoint"
_RUNTIME_PATH = re.compile(r"^/endpoints/([^/]+)/invocations$")


def route(path: str, endpoint_name: str) -> str | None:
    """Which route a request path names: ping, invoke, other-endpoint, or None (unknown)."""
    path = path.split("?", 1)[0]
    if path == "/ping":
        return PING
    if path == "/invocations":
        return INVOKE
    match = _RUNTIME_PATH.match(path)
    if match:
        return INVOKE if unquote(match.group(1)) == endpoint_name else OTHER_ENDPOINT
    return None


def error_body(kind: str, message: str) -> bytes:
    """The same shape as inference.py's errors: {"error": kind, "message": ...}."""
    return json.dumps({"error": kind, "message": message}).encode()


class RequestRefused(Exception):
    """A request answered before its body is read (bad length, too large, chunked)."""

    def __init__(self, status: int, kind: str, message: str, discard: int = 0) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.discard = status, kind, message, discard


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_host(headers: Any, loopback_only: bool) -> None:
    """RequestRefused (403) for a Host that does not name loopback, on a loopback-bound server.

    A page that rebinds its DNS name to 127.0.0.1 makes the browser send that name as Host; every
    client that means this server (boto3, urllib, curl on the recorded URL) sends a loopback one."""
    host = headers.get("Host")
    if not loopback_only or host is None:
        return
    try:
        name = urlsplit("//" + host.strip()).hostname
    except ValueError:
        name = None
    if name not in LOOPBACK_NAMES:
        raise RequestRefused(
            HTTPStatus.FORBIDDEN,
            "forbidden_host",
            f"Host {host!r} is not this endpoint server: send requests to 127.0.0.1 "
            f"(`kennel endpoints` shows the URL)",
        )


def content_length(headers: Any, limit: int) -> int:
    """The body's length from the headers, or RequestRefused (411, 400, 413)."""
    encoding = (headers.get("Transfer-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise RequestRefused(
            HTTPStatus.LENGTH_REQUIRED,
            "length_required",
            f"Transfer-Encoding {encoding!r} is not supported: send the body with a Content-Length header",
        )
    raw = headers.get("Content-Length")
    if raw is None:
        return 0
    try:
        length = int(raw)
        if length < 0:
            raise ValueError
    except ValueError:
        raise RequestRefused(
            HTTPStatus.BAD_REQUEST, "bad_request", f"Content-Length {raw!r} is not a byte count"
        ) from None
    if length > limit:
        raise RequestRefused(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            "payload_too_large",
            f"request body is {length} bytes, over the {limit}-byte limit of SageMaker real-time endpoints: "
            f"send fewer or smaller images per request",
            discard=length,
        )
    return length


# --- the server ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """The loaded model and the package it came from; replaced whole on a swap."""

    model: Any  # inference.LoadedModel
    ref: ModelRef


class EndpointServer(ThreadingHTTPServer):
    # Request threads do not keep the process alive; stopping waits for requests in flight instead.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], endpoint_name: str, max_payload_bytes: int) -> None:
        super().__init__(address, RequestHandler)
        self.endpoint_name = endpoint_name
        self.max_payload_bytes = max_payload_bytes
        self.loopback_only = is_loopback(str(self.server_address[0]))
        self.served: Served | None = None
        self.handle: Handle | None = None  # inference.handle, once torch is imported
        self._in_flight = 0
        self._idle = threading.Condition()

    @contextmanager
    def request_in_flight(self) -> Iterator[None]:
        with self._idle:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)


class RequestHandler(BaseHTTPRequestHandler):
    server: EndpointServer
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects
    server_version = "KennelEndpoint/1"
    timeout = IDLE_CONNECTION_S
    # Small responses on kept-alive connections: without this, delayed ACKs add ~40 ms stalls.
    disable_nagle_algorithm = True

    def host_refused(self) -> bool:
        """Answer 403 (and close: a body stays unread) when the Host is foreign."""
        try:
            check_host(self.headers, self.server.loopback_only)
        except RequestRefused as refused:
            self.close_connection = True
            self.refuse(refused)
            return True
        return False

    def do_GET(self) -> None:
        if self.host_refused():
            return
        where = route(self.path, self.server.endpoint_name)
        if where == PING:
            if self.server.served is None:
                self.send_json(
                    HTTPStatus.SERVICE_UNAVAILABLE, error_body("loading", "the model is still loading")
                )
            else:
                self.send_json(HTTPStatus.OK, b'{"status": "Healthy"}')
        elif where in (INVOKE, OTHER_ENDPOINT):
            self.refuse(
                RequestRefused(
                    HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", f"{self.path} takes POST"
                ),
                allow="POST",
            )
        else:
            self.not_found()

    def do_POST(self) -> None:
        with self.server.request_in_flight():
            if self.host_refused():
                return
            where = route(self.path, self.server.endpoint_name)
            try:
                length = content_length(self.headers, self.server.max_payload_bytes)
            except RequestRefused as refused:
                self.close_connection = True  # the body (if any) stays unread: the connection cannot go on
                self.refuse(refused)
                return
            body = self.rfile.read(length) if length else b""
            if len(body) < length:
                self.close_connection = True  # the client went away mid-body
                return
            if where == INVOKE:
                self.invoke(body)
            elif where == PING:
                self.refuse(
                    RequestRefused(HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", "/ping takes GET"),
                    allow="GET",
                )
            elif where == OTHER_ENDPOINT:
                name = _RUNTIME_PATH.match(self.path.split("?", 1)[0]).group(1)  # type: ignore[union-attr]
                self.refuse(
                    RequestRefused(
                        HTTPStatus.NOT_FOUND,
                        "endpoint_not_found",
                        f"this server serves endpoint {self.server.endpoint_name!r}, not {unquote(name)!r}: "
                        f"`kennel endpoints` lists each endpoint's URL",
                    )
                )
            else:
                self.not_found()

    def invoke(self, body: bytes) -> None:
        served, handle = self.server.served, self.server.handle  # once: a swap does not affect this request
        if served is None or handle is None:
            self.refuse(
                RequestRefused(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "loading",
                    "the model is still loading: retry once GET /ping answers 200",
                )
            )
            return
        status, payload, response_type = handle(
            served.model, body, self.headers.get("Content-Type"), self.headers.get("Accept")
        )
        if status >= 400:
            log.info("POST %s -> %d %s", self.path, status, payload[:300].decode("utf-8", "replace"))
        self.send_json(status, payload, response_type, {MODEL_VERSION_HEADER: str(served.ref.version)})

    def handle_expect_100(self) -> bool:
        try:
            check_host(self.headers, self.server.loopback_only)
            content_length(self.headers, self.server.max_payload_bytes)
        except RequestRefused as refused:
            # The client waits for our go-ahead before sending the body: refuse and close, nothing to discard.
            self.close_connection = True
            self.refuse(RequestRefused(refused.status, refused.kind, refused.message))
            return False
        return super().handle_expect_100()

    # --- answering -------------------------------------------------------------------------
    def not_found(self) -> None:
        self.refuse(
            RequestRefused(
                HTTPStatus.NOT_FOUND,
                "not_found",
                f"no route {self.command} {self.path}: use GET /ping, POST /invocations or "
                f"POST /endpoints/{self.server.endpoint_name}/invocations",
            )
        )

    def refuse(self, refused: RequestRefused, allow: str | None = None) -> None:
        log.info("%s %s -> %d %s", self.command, self.path, refused.status, refused.message)
        if refused.discard:
            self.close_connection = True
        self.send_json(
            refused.status,
            error_body(refused.kind, refused.message),
            extra={"Allow": allow} if allow else None,
        )
        if refused.discard:
            self.discard_body(refused.discard)

    def send_json(
        self, status: int, body: bytes, content_type: str = JSON_TYPE, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Amzn-Invoked-Production-Variant", VARIANT_NAME)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def discard_body(self, length: int) -> None:
        """Read what the client is still sending, without keeping it, so that it reads the answer
        rather than a connection reset; give up after DRAIN_LIMIT_S."""
        deadline = time.monotonic() + DRAIN_LIMIT_S
        left = length
        try:
            self.connection.settimeout(1.0)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        # Requests are logged where they are answered (errors only); this keeps malformed-request notes.
        if not format.startswith('"%s" %s %s'):
            log.warning("%s: %s", self.address_string(), format % args)


# --- state file ------------------------------------------------------------------------------


class ServerState:
    """server.json: what this server is doing, for the parent and `kennel endpoints`."""

    def __init__(self, folder: Path, url: str, port: int) -> None:
        self.path = folder / endpoints.SERVER_FILE
        self.data: dict[str, Any] = {"Pid": os.getpid(), "Port": port, "Url": url, "StartTime": now()}
        self.lock = threading.Lock()

    def write(self, **changes: Any) -> None:
        with self.lock:
            self.data.update(changes, UpdatedTime=now())
            write_json_atomic(self.path, self.data)


# --- loading models ----------------------------------------------------------------------------


class ModelLoader:
    """Loads the record's model at start and on each reload request; runs in its own thread."""

    def __init__(
        self, server: EndpointServer, folder: Path, state: ServerState, max_payload_bytes: int
    ) -> None:
        self.server, self.folder, self.state = server, folder, state
        self.max_payload_bytes = max_payload_bytes
        self.jobs: queue.Queue[str | None] = queue.Queue()
        self.failed = False
        self.inference: Any = None

    def run(self) -> None:
        try:
            self.start()
        except Exception as error:  # anything that stops the first load ends the server
            # One line last, after any traceback: it is what the parent shows from the log's tail.
            log.error("the endpoint could not load its model: %s", error)
            self.failed = True
            self.state.write(State=SERVER_FAILED, Error=str(error))
            os.kill(os.getpid(), signal.SIGTERM)  # taken by the main thread's sigwait
            return
        while self.jobs.get() is not None:
            self.reload()

    def start(self) -> None:
        self.wait_for_record()
        target = endpoints.desired_model(self.folder)
        if target is None:
            raise RuntimeError(f"{self.folder / endpoints.RECORD_FILE} names no model to serve")
        self.inference = import_inference(self.max_payload_bytes)
        try:
            model = self.inference.model_fn(target.model_dir)
        except Exception as error:
            log.exception("loading the model failed")
            raise RuntimeError(load_error(target, error)) from None
        self.server.handle = self.inference.handle
        self.server.served = Served(model, target)
        settle_garbage_collector()
        self.state.write(State=SERVER_READY, Serving=target.to_json())
        log.info(
            "serving model package version %d (%s) from %s", target.version, target.arn, target.model_dir
        )

    def wait_for_record(self) -> None:
        deadline = time.monotonic() + RECORD_WAIT_S
        while endpoints.recorded_pid(self.folder) != os.getpid():
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{self.folder / endpoints.RECORD_FILE} does not name this server (pid {os.getpid()}) after "
                    f"{RECORD_WAIT_S:.0f}s: start endpoints through kennel, not by hand"
                )
            time.sleep(0.02)

    def reload(self) -> None:
        request_id = endpoints.reload_request_id(self.folder)
        target = endpoints.desired_model(self.folder)
        current = self.server.served
        if request_id is None or target is None or current is None:
            log.warning("SIGHUP without a reload request in %s; ignored", self.folder / endpoints.RECORD_FILE)
            return
        if target == current.ref:
            self.state.write(LastReload={"RequestId": request_id, "Ok": True, "Time": now()})
            return
        log.info("loading model package version %d from %s", target.version, target.model_dir)
        try:
            model = self.inference.model_fn(target.model_dir)
        except Exception as error:
            log.exception(
                "could not load model package version %d; still serving version %d",
                target.version,
                current.ref.version,
            )
            self.state.write(
                LastReload={
                    "RequestId": request_id,
                    "Ok": False,
                    "Time": now(),
                    "Error": load_error(target, error),
                }
            )
            return
        # One reference assignment: requests that already took the old model finish on it.
        self.server.served = Served(model, target)
        settle_garbage_collector()
        self.state.write(
            Serving=target.to_json(), LastReload={"RequestId": request_id, "Ok": True, "Time": now()}
        )
        log.info("now serving model package version %d (was %d)", target.version, current.ref.version)


def settle_garbage_collector() -> None:
    """Collect once, then exempt what is alive (torch, the model) from later collections.

    Otherwise the first full collection after loading, triggered by a request's allocations,
    walks every object torch's import made: a 150-200 ms pause in that request (the serving
    benchmark's p99 was that one request in each round)."""
    gc.collect()
    gc.freeze()


def load_error(target: ModelRef, error: Exception) -> str:
    return (
        f"could not load model package version {target.version} from {target.model_dir} "
        f"({type(error).__name__}: {error}); is its model.tar.gz a Kennel training job's output?"
    )


def import_inference(max_payload_bytes: int) -> Any:
    """entrypoints/inference.py, imported as SageMaker's container imports it (siblings flat)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (FACTS.md)
    if str(ENTRYPOINTS) not in sys.path:
        sys.path.insert(0, str(ENTRYPOINTS))
    import contract
    import inference

    # inference.input_fn checks the body against contract.MAX_PAYLOAD_BYTES: this process serves one
    # endpoint, so its configured limit is the limit.
    contract.MAX_PAYLOAD_BYTES = max_payload_bytes
    return inference


# --- main --------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m local.serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", required=True, help="endpoint name (its folder under <home>/endpoints)")
    parser.add_argument("--home", type=Path, help="state folder (default: $KENNEL_HOME or ./.kennel)")
    parser.add_argument(
        "--host", default=endpoints.DEFAULT_HOST, help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=0, help="port (default: 0, any free port)")
    parser.add_argument(
        "--max-payload-bytes",
        type=int,
        default=MAX_PAYLOAD_BYTES,
        help="largest request body accepted (default: %(default)s, as SageMaker)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before any thread exists, so that every thread inherits the mask and only sigwait sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    args = get_args_parser().parse_args(argv)
    home = resolve_home(args.home)
    try:
        folder = endpoints.endpoint_dir(home, args.name)
    except endpoints.EndpointError as error:
        log.error("%s", error)
        return 2
    try:
        server = EndpointServer((args.host, args.port), args.name, args.max_payload_bytes)
    except OSError as error:
        message = (
            f"cannot listen on {args.host}:{args.port} ({error}): choose another port or stop what uses it"
        )
        log.error("%s", message)
        write_json_atomic(
            folder / endpoints.SERVER_FILE,
            {"Pid": os.getpid(), "State": SERVER_FAILED, "Error": message, "UpdatedTime": now()},
        )
        return 2
    port = server.server_address[1]
    url_host = "127.0.0.1" if args.host in ("", "0.0.0.0") else args.host
    state = ServerState(folder, f"http://{url_host}:{port}", port)
    state.write(State=SERVER_LOADING)
    log.info("endpoint %s listening on %s:%d (pid %d)", args.name, args.host, port, os.getpid())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    loader = ModelLoader(server, folder, state, args.max_payload_bytes)
    threading.Thread(target=loader.run, name="loader", daemon=True).start()
    while (signum := signal.sigwait(SIGNALS)) == signal.SIGHUP:
        loader.jobs.put("reload")
    log.info("stopping (%s): finishing requests in flight", signal.Signals(signum).name)
    server.shutdown()
    if not server.wait_idle(STOP_GRACE_S):
        log.warning("requests still in flight after %.0fs; stopping anyway", STOP_GRACE_S)
    server.server_close()
    loader.jobs.put(None)
    if loader.failed:
        return 1
    state.write(State=SERVER_STOPPED)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
