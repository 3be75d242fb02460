"""The studio's HTTP server: a JSON API over the state folder and the static page (stdlib, and
psutil for this machine's interface addresses).

Safe by default, because it can approve models and start endpoints:
- it binds 127.0.0.1 unless told otherwise (and warns when told to bind another address), and
  answers only requests whose Host names this machine on its port: the loopback names, and for a
  non-loopback bind the machine's host name and its interface addresses too. A DNS-rebinding
  page reaches it under its own name, so it is refused (403) however the server is bound;
- it approves and rejects packages of one model package group only: the one whose newest Approved
  package its endpoint serves, as `kennel approve / reject` do;
- state-changing routes are POST only (GET there is 405, and POST on a read route is 405), take a
  JSON body (a plain HTML form from another site cannot send one without a CORS preflight, which
  is never granted), and refuse any request whose Origin or Referer is another site (403);
- JSON answers escape '<', '>' and '&', and the page puts data in the DOM with textContent only,
  so HTML in a log line stays text; files are served only when a step record points to them and
  they lie under the state folder.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil

from entrypoints.contract import MAX_PAYLOAD_BYTES
from local import deployment
from local.endpoints import EndpointError, invoke_endpoint
from local.registry import PackageNotFound
from local.studio import views

log = logging.getLogger("kennel.studio")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
DEFAULT_ENDPOINT = "kennel-endpoint"
DEFAULT_GROUP = "kennel-models"  # model_package_group's default in kennel.toml
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
# Base64 makes an image 4/3 larger; the endpoint itself refuses more than MAX_PAYLOAD_BYTES.
MAX_BODY_BYTES = MAX_PAYLOAD_BYTES * 4 // 3 + 64 * 1024
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
}
# The profiler report is self-contained HTML written by local/profiler.py: no script may run in it.
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class StudioSettings:
    home: Path
    endpoint_name: str = DEFAULT_ENDPOINT
    model_package_group: str = DEFAULT_GROUP  # the one group Approve / Reject act on


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[..., Any]


def _dumps(document: Any) -> bytes:
    """JSON that is inert as HTML too: '<', '>' and '&' only occur inside strings, so escaping
    them keeps the JSON equal and leaves no markup for anything that mis-sniffs it."""
    text = json.dumps(document, default=str, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("utf-8")


class StudioHandler(BaseHTTPRequestHandler):
    server: StudioHttpServer
    protocol_version = "HTTP/1.1"
    server_version = "KennelStudio"

    # --- plumbing ---------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_HEAD(self) -> None:  # noqa: N802
        self._fail(HttpError(HTTPStatus.METHOD_NOT_ALLOWED, "HEAD is not served", {"Allow": "GET"}))

    def do_OPTIONS(self) -> None:  # noqa: N802 (a CORS preflight is never granted)
        self._fail(HttpError(HTTPStatus.METHOD_NOT_ALLOWED, "OPTIONS is not served", {"Allow": "GET, POST"}))

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        try:
            self._check_host()
            path = urlsplit(self.path).path
            if method == "GET" and path in STATIC_FILES:
                self._static(*STATIC_FILES[path])
                return
            route, match = self._route(method, path)
            if method == "POST":
                self._check_same_origin()
                result = route.handler(self, self._json_body(), **match.groupdict())
            else:
                result = route.handler(self, **match.groupdict())
            if result is not None:
                self._send_json(HTTPStatus.OK, result)
        except HttpError as error:
            self._fail(error)
        except views.NotFound as error:
            self._fail(HttpError(HTTPStatus.NOT_FOUND, str(error)))
        except views.Forbidden as error:
            self._fail(HttpError(HTTPStatus.FORBIDDEN, str(error)))
        except Exception:
            log.exception("studio: %s %s failed", method, self.path)
            self._fail(HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: see the studio's output"))

    def _route(self, method: str, path: str) -> tuple[Route, re.Match[str]]:
        allowed = []
        for route in ROUTES:
            match = route.pattern.fullmatch(path)
            if match:
                if route.method == method:
                    return route, match
                allowed.append(route.method)
        if allowed:
            raise HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{path} takes {' or '.join(allowed)}, not {method}",
                {"Allow": ", ".join(allowed)},
            )
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such page or API route: {path}")

    # --- safety -----------------------------------------------------------------------------
    def _check_host(self) -> None:
        """Refuse a Host that is not this server: a rebinding DNS name would carry its own."""
        host = (self.headers.get("Host") or "").strip().lower()
        local_address = self.connection.getsockname()[0]  # the address this client reached
        if host not in self.server.own_hosts(local_address):
            raise HttpError(HTTPStatus.FORBIDDEN, f"Host {host!r} is not this server; open {self.server.url}")

    def _check_same_origin(self) -> None:
        """A browser sends Origin (or at least Referer) with a POST; another site's is refused.
        The Host it is compared with has passed _check_host: it names this server."""
        own = (self.headers.get("Host") or "").strip().lower()
        for header in ("Origin", "Referer"):
            value = self.headers.get(header)
            if value is None:
                continue
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or parts.netloc.lower() != own:
                raise HttpError(HTTPStatus.FORBIDDEN, f"cross-origin request refused ({header}: {value})")
            return

    def _json_body(self) -> dict[str, Any]:
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the request body as application/json")
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            document = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "the request body is not valid JSON") from None
        if not isinstance(document, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        return document

    # --- answers ----------------------------------------------------------------------------
    def _send(self, status: HTTPStatus, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {**SECURITY_HEADERS, **(extra or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, document: Any, extra: dict[str, str] | None = None) -> None:
        self._send(status, _dumps(document), "application/json; charset=utf-8", extra)

    def _fail(self, error: HttpError) -> None:
        self._send_json(error.status, {"Error": error.message, "Status": int(error.status)}, error.headers)

    def _static(self, name: str, content_type: str) -> None:
        self._send(HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), content_type)

    def send_file(self, path: Path, content_type: str, extra: dict[str, str] | None = None) -> None:
        self._send(HTTPStatus.OK, path.read_bytes(), content_type, extra)

    @property
    def settings(self) -> StudioSettings:
        return self.server.settings


# --- route handlers ---------------------------------------------------------------------------


def get_overview(request: StudioHandler) -> dict[str, Any]:
    home = request.settings.home
    return {"Home": str(home), "EndpointName": request.settings.endpoint_name,
            "ModelPackageGroup": request.settings.model_package_group, "Pipelines": views.list_pipelines(home)}


def get_pipeline(request: StudioHandler, name: str) -> dict[str, Any]:
    return views.pipeline_view(request.settings.home, name)


def get_executions(request: StudioHandler) -> list[dict[str, Any]]:
    return views.executions_view(request.settings.home)


def get_execution(request: StudioHandler, execution: str) -> dict[str, Any]:
    return views.execution_view(request.settings.home, execution)


def get_step(request: StudioHandler, execution: str, step: str) -> dict[str, Any]:
    return views.step_view(request.settings.home, execution, step)


def get_log(request: StudioHandler, execution: str, step: str) -> dict[str, Any]:
    path = views.step_file(request.settings.home, execution, step, "log")
    whole = parse_qs(urlsplit(request.path).query).get("whole") == ["1"]
    return views.whole_log(path) if whole else views.log_tail(path)


def get_file(request: StudioHandler, execution: str, step: str, kind: str, index: str) -> None:
    path = views.step_file(request.settings.home, execution, step, kind, int(index))
    if kind == "plot":
        if path.suffix.lower() != ".png":
            raise views.Forbidden(f"plot {index} of step {step} is not a PNG file")
        request.send_file(path, "image/png")
    elif kind == "profiler-report":
        request.send_file(path, "text/html; charset=utf-8", {"Content-Security-Policy": REPORT_CSP})
    else:
        request.send_file(path, "text/plain; charset=utf-8")


def get_registry(request: StudioHandler) -> list[dict[str, Any]]:
    return views.registry_view(request.settings.home)


def get_endpoints(request: StudioHandler) -> list[dict[str, Any]]:
    return views.endpoints_view(request.settings.home)


def _package_choice(body: dict[str, Any]) -> tuple[str, int, str]:
    group, version, reason = body.get("Group"), body.get("Version"), body.get("Reason", "")
    if not isinstance(group, str) or not group:
        raise HttpError(HTTPStatus.BAD_REQUEST, 'give the model package group as "Group"')
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise HttpError(HTTPStatus.BAD_REQUEST, 'give the package version as "Version" (a number from 1)')
    if not isinstance(reason, str) or len(reason) > 1024:
        raise HttpError(HTTPStatus.BAD_REQUEST, '"Reason" must be text of at most 1024 characters')
    return group, version, reason


def post_decision(request: StudioHandler, body: dict[str, Any], verb: str) -> dict[str, Any]:
    """Approve or reject through local.deployment, exactly as `kennel approve / reject` do."""
    group, version, reason = _package_choice(body)
    # Approving deploys the newest Approved package of the package's group to the one endpoint: a
    # package of another group would replace what it serves. `kennel approve` never does that either.
    allowed = request.settings.model_package_group
    if group != allowed:
        raise HttpError(
            HTTPStatus.FORBIDDEN,
            f"this page approves and rejects packages of model package group {allowed!r} only (the group "
            f"endpoint {request.settings.endpoint_name!r} serves, as `kennel {verb}` does), not {group!r}",
        )
    home = request.settings.home
    try:
        if verb == "approve":
            result = deployment.approve(home, group, version, reason, endpoint_name=request.settings.endpoint_name)
        else:
            result = deployment.reject(home, group, version, reason)
    except PackageNotFound as error:
        raise HttpError(HTTPStatus.NOT_FOUND, str(error)) from None
    except deployment.USER_ERRORS as error:
        raise HttpError(HTTPStatus.CONFLICT, str(error)) from None
    return {**result.to_json(), "Message": result.message}


def post_invoke(request: StudioHandler, body: dict[str, Any], name: str) -> dict[str, Any]:
    """Forward an uploaded image to the endpoint (as `kennel predict` does) and return its answer."""
    views.check_name(name, "endpoint")
    image, top_k = body.get("Image"), body.get("TopK", 3)
    if not isinstance(image, str) or not image:
        raise HttpError(HTTPStatus.BAD_REQUEST, 'send the image base64-encoded as "Image"')
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 100:
        raise HttpError(HTTPStatus.BAD_REQUEST, '"TopK" must be a number from 1 to 100')
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(HTTPStatus.BAD_REQUEST, '"Image" is not valid base64') from None
    forwarded = json.dumps({"image": base64.b64encode(data).decode("ascii"), "top_k": top_k}).encode()
    try:
        answer = invoke_endpoint(request.settings.home, name, forwarded, "application/json")
    except EndpointError as error:
        raise HttpError(HTTPStatus.CONFLICT, str(error)) from None
    if answer.status != 200:
        detail = answer.body.decode("utf-8", errors="replace")[:2000]
        raise HttpError(HTTPStatus.BAD_GATEWAY if answer.status >= 500 else HTTPStatus(answer.status),
                        f"endpoint {name} answered {answer.status}: {detail}")
    try:
        return {"EndpointName": name, "Answer": answer.json()}
    except ValueError:
        raise HttpError(HTTPStatus.BAD_GATEWAY, f"endpoint {name} answered something that is not JSON") from None


_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
ROUTES = [
    Route("GET", re.compile(r"/api/overview"), get_overview),
    Route("GET", re.compile(rf"/api/pipelines/(?P<name>{_NAME})"), get_pipeline),
    Route("GET", re.compile(r"/api/executions"), get_executions),
    Route("GET", re.compile(rf"/api/executions/(?P<execution>{_NAME})"), get_execution),
    Route("GET", re.compile(rf"/api/executions/(?P<execution>{_NAME})/steps/(?P<step>{_NAME})"), get_step),
    Route("GET", re.compile(rf"/api/executions/(?P<execution>{_NAME})/steps/(?P<step>{_NAME})/log"), get_log),
    Route(
        "GET",
        re.compile(
            rf"/api/executions/(?P<execution>{_NAME})/steps/(?P<step>{_NAME})/files/"
            r"(?P<kind>log|plot|profiler-report)/(?P<index>[0-9]{1,4})"
        ),
        get_file,
    ),
    Route("GET", re.compile(r"/api/registry"), get_registry),
    Route("POST", re.compile(r"/api/registry/approve"), lambda r, b: post_decision(r, b, "approve")),
    Route("POST", re.compile(r"/api/registry/reject"), lambda r, b: post_decision(r, b, "reject")),
    Route("GET", re.compile(r"/api/endpoints"), get_endpoints),
    Route("POST", re.compile(rf"/api/endpoints/(?P<name>{_NAME})/invoke"), post_invoke),
]


def _url_host(address: str) -> str:
    """An address as a URL's host: IPv6 in brackets, zone dropped; names and IPv4 as they are."""
    address = address.split("%", 1)[0].lower()
    return f"[{address}]" if ":" in address else address


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def interface_addresses() -> set[str]:
    """This machine's own IPv4 and IPv6 addresses, as URL hosts."""
    found = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                found.add(_url_host(address.address))
    return found


@functools.cache
def machine_names() -> frozenset[str]:
    """This machine's host name and fully qualified name (looked up once: getfqdn may ask DNS)."""
    names = {socket.gethostname().lower()}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    return frozenset(name for name in names if name)


class StudioHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], settings: StudioSettings) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, StudioHandler)
        self.settings = settings

    @property
    def bound_host(self) -> str:
        """The address the socket is bound to ('0.0.0.0' or '::' for every interface)."""
        return str(self.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def wildcard(self) -> bool:
        return self.bound_host in WILDCARD_HOSTS

    @property
    def loopback_only(self) -> bool:
        return _is_loopback(self.bound_host)

    def own_hosts(self, local_address: str) -> set[str]:
        """The Host headers this server answers: a name of this machine on its port.

        Always the loopback names; when bound beyond loopback, also the machine's host names, the
        bound address, and (for a wildcard bind) every interface address and the one the client
        reached. Never a name the client chose, so a rebinding DNS name is refused."""
        names = set(LOOPBACK_NAMES)
        if not self.loopback_only:
            names |= machine_names()
            if self.wildcard:
                names |= interface_addresses() | {_url_host(local_address)}
            else:
                names.add(_url_host(self.bound_host))
        hosts = {f"{name}:{self.port}" for name in names}
        if self.port == 80:  # a browser leaves the default port out of Host
            hosts |= names
        return hosts

    @property
    def url(self) -> str:
        """A URL that opens the page from this machine: the bound address, or loopback for a
        wildcard bind (which answers there too)."""
        if self.bound_host == "::":
            shown = "[::1]"
        elif self.wildcard:
            shown = "127.0.0.1"
        else:
            shown = _url_host(self.bound_host)
        return f"http://{shown}:{self.port}/"

    def exposure_warning(self) -> str | None:
        """What to tell the operator when the page is reachable from other machines."""
        if self.loopback_only:
            return None
        if self.wildcard:
            where = f"every network interface ({_url_host(self.bound_host)}:{self.port})"
            others = sorted(name for name in machine_names() | interface_addresses()
                            if not _is_loopback(name.strip("[]")))
        else:
            where = f"{_url_host(self.bound_host)}:{self.port}"
            others = sorted(machine_names() | {_url_host(self.bound_host)})
        shown = ", ".join(f"http://{name}:{self.port}/" for name in others)
        return (f"WARNING: kennel studio listens on {where}, not only on 127.0.0.1: anyone who can reach "
                f"this machine can open the page, approve and reject model packages and start the "
                f"endpoint, with no login. It answers as {shown or 'this machine'} and on 127.0.0.1. "
                f"Stop it unless that is what you want; the default --host 127.0.0.1 is private to "
                f"this machine.")


class StudioServer:
    """The studio on a background thread (tests, embedding); `serve` runs it in the foreground."""

    def __init__(self, home: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 endpoint_name: str = DEFAULT_ENDPOINT, model_package_group: str = DEFAULT_GROUP) -> None:
        settings = StudioSettings(Path(home).resolve(), endpoint_name, model_package_group)
        try:
            self.httpd = StudioHttpServer((host, port), settings)
        except OSError as error:
            raise OSError(f"cannot listen on {host}:{port} ({error.strerror}); pass another --port "
                          f"(0 picks a free one)") from None
        warning = self.httpd.exposure_warning()
        if warning:
            log.warning("%s", warning)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.httpd.url

    def start(self) -> StudioServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kennel-studio", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> StudioServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(home: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, endpoint_name: str = DEFAULT_ENDPOINT,
          on_ready: Callable[[str], None] | None = None, model_package_group: str = DEFAULT_GROUP) -> None:
    """Serve until interrupted (Ctrl-C raises KeyboardInterrupt out of here, after closing).
    Approve / Reject act on model_package_group only (kennel.toml's, as `kennel approve`)."""
    server = StudioServer(home, host, port, endpoint_name, model_package_group)
    if on_ready is not None:
        on_ready(server.url)
    try:
        server.httpd.serve_forever()
    finally:
        server.httpd.server_close()
