"""local/serving.py: the endpoint server, over real HTTP on 127.0.0.1, with a real trained model."""

from __future__ import annotations

import email.message
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
import torch
from botocore.config import Config
from botocore.exceptions import ClientError
from serving_support import (
    ENDPOINT,
    Tarballs,
    register,
    sample_png,
    stop_all_servers,
)

import inference
from local import endpoints, serving
from local.endpoints import ModelRef
from local.files import extract_tarball, read_json, write_json_atomic
from local.registry import APPROVED
from local.state import ProcessRef

LIMIT = 6 * 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/ping", serving.PING),
        ("/ping?x=1", serving.PING),
        ("/invocations", serving.INVOKE),
        (f"/endpoints/{ENDPOINT}/invocations", serving.INVOKE),
        ("/endpoints/another/invocations", serving.OTHER_ENDPOINT),
        ("/endpoints//invocations", None),
        ("/invocations/extra", None),
        ("/", None),
    ],
)
def test_routes(path: str, expected: str | None) -> None:
    assert serving.route(path, ENDPOINT) == expected


def headers(**values: str) -> email.message.Message:
    message = email.message.Message()
    for name, value in values.items():
        message[name.replace("_", "-")] = value
    return message


@pytest.mark.parametrize(
    ("given", "status", "length"),
    [
        ({}, None, 0),
        ({"Content_Length": "12"}, None, 12),
        ({"Content_Length": str(LIMIT)}, None, LIMIT),
        ({"Content_Length": str(LIMIT + 1)}, 413, None),
        ({"Content_Length": "-1"}, 400, None),
        ({"Content_Length": "twelve"}, 400, None),
        ({"Transfer_Encoding": "chunked"}, 411, None),
    ],
)
def test_content_length(given: dict[str, str], status: int | None, length: int | None) -> None:
    if status is None:
        assert serving.content_length(headers(**given), LIMIT) == length
    else:
        with pytest.raises(serving.RequestRefused) as refused:
            serving.content_length(headers(**given), LIMIT)
        assert refused.value.status == status


# --- a running endpoint --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tarballs: Tarballs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[endpoints.Endpoint]:
    home = tmp_path_factory.mktemp("serving-home")
    package = register(home, tarballs.original, APPROVED)
    deployed = endpoints.start_or_update(home, ENDPOINT, package)
    yield deployed.endpoint
    stop_all_servers(home)


@pytest.fixture(scope="module")
def in_process(trained_model_dir: Path) -> Iterator[inference.LoadedModel]:
    threads = torch.get_num_threads()
    yield inference.model_fn(str(trained_model_dir))
    torch.set_num_threads(threads)


def post(
    url: str, body: bytes, content_type: str | None, accept: str | None = None, method: str = "POST"
) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body if method == "POST" else None, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def runtime_client(url: str):
    return boto3.client(
        "sagemaker-runtime",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def test_the_endpoint_answers_as_inference_py_does_in_process(server, in_process) -> None:
    png = sample_png("sneaker")
    expected = json.loads(inference.handle(in_process, png, "image/png", None)[1])
    for path in ("/invocations", f"/endpoints/{ENDPOINT}/invocations"):
        status, answer, response_headers = post(server.url + path, png, "image/png")
        assert status == 200
        assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in expected["predictions"]]
        for got, want in zip(answer["predictions"], expected["predictions"], strict=True):
            assert got["probability"] == pytest.approx(want["probability"], abs=1e-4)
        assert response_headers["Content-Type"] == "application/json"
        assert response_headers[serving.MODEL_VERSION_HEADER] == "1"


def test_boto3_sagemaker_runtime_gets_the_same_answer(server) -> None:
    png = sample_png("trouser", 1)
    _, direct, _ = post(server.url + "/invocations", png, "image/png")
    response = runtime_client(server.url).invoke_endpoint(
        EndpointName=ENDPOINT, ContentType="image/png", Accept="application/json", Body=png
    )
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert response["ContentType"] == "application/json"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert json.loads(response["Body"].read()) == direct


def test_boto3_gets_a_client_error_for_a_bad_request(server) -> None:
    with pytest.raises(ClientError) as raised:
        runtime_client(server.url).invoke_endpoint(EndpointName=ENDPOINT, ContentType="text/csv", Body=b"1,2")
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 415
    with pytest.raises(ClientError) as raised:
        runtime_client(server.url).invoke_endpoint(
            EndpointName="some-other", ContentType="image/png", Body=b"x"
        )
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


BAD_REQUESTS = [
    # (what, method, path, body, content type, accept, status, words in the message)
    ("unsupported content type", "POST", "/invocations", b"a,b", "text/csv", None, 415, "is not supported"),
    (
        "undecodable image",
        "POST",
        "/invocations",
        b"not an image at all",
        "image/png",
        None,
        400,
        "not a usable image",
    ),
    (
        "malformed JSON",
        "POST",
        "/invocations",
        b'{"image": ',
        "application/json",
        None,
        400,
        "not valid JSON",
    ),
    (
        "oversized body",
        "POST",
        "/invocations",
        b"\0" * (LIMIT + 1),
        "image/png",
        None,
        413,
        f"over the {LIMIT}-byte limit",
    ),
    ("unacceptable Accept", "POST", "/invocations", b"x", "image/png", "text/csv", 406, "cannot be served"),
    ("unknown route", "POST", "/predict", b"x", "image/png", None, 404, "no route POST /predict"),
    (
        "another endpoint's path",
        "POST",
        "/endpoints/other/invocations",
        b"x",
        "image/png",
        None,
        404,
        "not 'other'",
    ),
    ("GET on invocations", "GET", "/invocations", b"", None, None, 405, "takes POST"),
]


@pytest.mark.parametrize(
    ("what", "method", "path", "body", "content_type", "accept", "status", "words"),
    BAD_REQUESTS,
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_each_bad_request_gets_its_status_and_the_next_request_succeeds(
    server, what, method, path, body, content_type, accept, status, words
) -> None:
    got, answer, _ = post(server.url + path, body, content_type, accept, method)
    assert got == status, answer
    assert words in answer["message"]
    assert answer["error"]
    good, prediction, _ = post(server.url + "/invocations", sample_png("bag"), "image/png")
    assert good == 200 and prediction["predictions"]


def test_one_kept_alive_connection_survives_bad_requests(server) -> None:
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    connection = http.client.HTTPConnection(host, port, timeout=60)
    statuses = []
    for body, content_type in [
        (sample_png("coat"), "image/png"),
        (b"{oops", "application/json"),
        (b"junk", "image/jpeg"),
        (b"x", "text/plain"),
        (sample_png("coat"), "image/png"),
    ]:
        connection.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
    connection.close()
    assert statuses == [200, 400, 400, 415, 200]


def test_an_oversized_body_announced_with_expect_100_is_refused_before_it_is_sent(server) -> None:
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    with socket.create_connection((host, port), timeout=10) as connection:
        connection.sendall(
            f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {LIMIT * 10}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in head
    assert json.loads(body)["error"] == "payload_too_large"
    good, _, _ = post(server.url + "/invocations", sample_png("bag"), "image/png")
    assert good == 200


def request_with_host(server, method: str, path: str, host: str, body: bytes | None = None) -> tuple[int, dict]:
    parts = urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        headers = {"Host": host, "Content-Type": "image/png"} if body else {"Host": host}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_foreign_host_is_refused_and_loopback_names_are_answered(server) -> None:
    """A web page that rebinds its DNS name to 127.0.0.1 sends its own name as Host: refused.
    What clients of this server send (boto3 and urllib send 127.0.0.1:PORT) is answered."""
    port = urlsplit(server.url).port
    png = sample_png("bag")
    for host in (f"rebind.example:{port}", "rebind.example", f"127.0.0.1.rebind.example:{port}"):
        status, answer = request_with_host(server, "GET", "/ping", host)
        assert (status, answer["error"]) == (403, "forbidden_host"), host
        status, answer = request_with_host(server, "POST", f"/endpoints/{ENDPOINT}/invocations", host, png)
        assert (status, answer["error"]) == (403, "forbidden_host"), host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1"):
        assert request_with_host(server, "POST", "/invocations", host, png)[0] == 200, host
        assert request_with_host(server, "GET", "/ping", host)[0] == 200, host


@pytest.mark.parametrize(
    ("host", "refused"),
    [(None, False), ("127.0.0.1:8080", False), ("[::1]:8080", False), ("LOCALHOST", False),
     ("evil.example:8080", True), ("[::1", True), ("", True)],
)
def test_check_host(host: str | None, refused: bool) -> None:
    given = headers(Host=host) if host is not None else headers()
    if refused:
        with pytest.raises(serving.RequestRefused) as error:
            serving.check_host(given, loopback_only=True)
        assert error.value.status == 403
    else:
        serving.check_host(given, loopback_only=True)
    serving.check_host(given, loopback_only=False)  # bound beyond loopback: not checked


# --- life cycle of the process itself --------------------------------------------------------------


def test_ping_is_503_until_the_model_is_loaded_and_sigterm_stops_cleanly(
    tarballs: Tarballs, tmp_path: Path
) -> None:
    """The server listens before it loads; it loads only the model of a record naming its pid."""
    home = tmp_path / "home"
    folder = endpoints.endpoint_dir(home, ENDPOINT)
    folder.mkdir(parents=True)
    model_dir = folder / "models" / "v1"
    extract_tarball(tarballs.original, model_dir)
    process = subprocess.Popen(
        [sys.executable, "-m", "local.serving", "--name", ENDPOINT, "--home", str(home)],
        cwd=REPO_ROOT,
        env=endpoints.server_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        state = wait_for(lambda: read_json_if_there(folder / endpoints.SERVER_FILE), "server.json")
        url = state["Url"]
        assert state["State"] == endpoints.SERVER_LOADING and url.startswith("http://127.0.0.1:")
        # No record names this process yet, so it cannot have loaded anything.
        assert endpoints.ping(url) == 503
        status, answer, _ = post(url + "/invocations", sample_png("bag"), "image/png")
        assert (status, answer["error"]) == (503, "loading")

        write_json_atomic(
            folder / endpoints.RECORD_FILE,
            {
                "EndpointName": ENDPOINT,
                "Process": ProcessRef.of(process.pid).to_json(),
                "DesiredModel": ModelRef("arn:local/kennel-models/1", 1, str(model_dir)).to_json(),
            },
        )
        wait_for(lambda: endpoints.ping(url) == 200, "/ping 200")
        assert post(url + "/invocations", sample_png("bag"), "image/png")[0] == 200
        assert read_json(folder / endpoints.SERVER_FILE)["Serving"]["ModelPackageVersion"] == 1

        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert read_json(folder / endpoints.SERVER_FILE)["State"] == endpoints.SERVER_STOPPED
    assert endpoints.ping(url) is None


def test_a_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "local.serving",
                "--name",
                ENDPOINT,
                "--home",
                str(tmp_path),
                "--port",
                str(port),
            ],
            cwd=REPO_ROOT,
            env=endpoints.server_environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def read_json_if_there(path: Path) -> dict | None:
    return read_json(path) if path.exists() else None


def wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
