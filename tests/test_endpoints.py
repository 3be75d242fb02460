"""local/endpoints.py: endpoint records, background servers, model swaps under load, failures."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil
import pytest
from PIL import Image
from serving_support import (
    ENDPOINT,
    Tarballs,
    not_a_tarball,
    register,
    sample_png,
    server_processes,
    tarball_without_weights,
    top_label,
)

from entrypoints.contract import MAX_PAYLOAD_BYTES
from local import endpoints, serving
from local.endpoints import FAILED, IN_SERVICE, OUT_OF_SERVICE, EndpointError
from local.files import read_json
from local.registry import APPROVED
from pipeline import cli


def reversed_label(label: str, class_names: list[str]) -> str:
    """What the reversed-metadata package answers for an image the original labels `label`."""
    return class_names[::-1][class_names.index(label)]


def test_start_records_a_detached_server_on_127_0_0_1(kennel_home: Path, tarballs: Tarballs) -> None:
    package = register(kennel_home, tarballs.original, APPROVED)
    deployed = endpoints.start_or_update(kennel_home, ENDPOINT, package)

    endpoint = deployed.endpoint
    assert deployed.action == "created"
    assert endpoint.status == IN_SERVICE
    assert urlsplit(endpoint.url).hostname == "127.0.0.1" and urlsplit(endpoint.url).port
    # The socket itself, not only the recorded URL: nothing but this machine can connect.
    listening = [(c.laddr.ip, c.laddr.port) for c in psutil.Process(endpoint.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening == [("127.0.0.1", urlsplit(endpoint.url).port)]
    assert endpoint.model_package_arn == package["ModelPackageArn"] and endpoint.model_package_version == 1
    assert Path(endpoint.log_path).is_file()
    assert [process.pid for process in server_processes(kennel_home)] == [endpoint.pid]
    assert os.getsid(endpoint.pid) == endpoint.pid  # its own session: the caller's Ctrl-C does not reach it
    assert endpoints.list_endpoints(kennel_home) == [endpoint]
    record = read_json(endpoints.endpoint_dir(kennel_home, ENDPOINT) / endpoints.RECORD_FILE)
    assert record["EndpointStatus"] == IN_SERVICE and record["Url"] == endpoint.url

    answer = endpoints.invoke_endpoint(kennel_home, ENDPOINT, sample_png("sandal"), "image/png")
    assert answer.status == 200 and top_label(answer.body) in tarballs.class_names

    again = endpoints.start_or_update(kennel_home, ENDPOINT, package)
    assert again.action == "up-to-date" and again.endpoint.pid == endpoint.pid


def test_swap_under_load_drops_no_request_and_switches_package(kennel_home: Path, tarballs: Tarballs) -> None:
    first = register(kennel_home, tarballs.original, APPROVED)
    second = register(kennel_home, tarballs.reversed, APPROVED)
    started = endpoints.start_or_update(kennel_home, ENDPOINT, first).endpoint
    png = sample_png("ankle_boot")
    clients = 3  # concurrent keep-alive connections, so requests are in flight on each side of the swap
    per_client: list[list[tuple[int, str | None, str | None]]] = [[] for _ in range(clients)]  # status, version, label
    stop = threading.Event()

    def answered() -> int:
        return sum(len(answers) for answers in per_client)

    def hammer(answers: list[tuple[int, str | None, str | None]]) -> None:
        parts = urlsplit(started.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        while not stop.is_set():
            try:
                connection.request(
                    "POST",
                    f"/endpoints/{ENDPOINT}/invocations",
                    body=png,
                    headers={"Content-Type": "image/png"},
                )
                response = connection.getresponse()
                body = response.read()
                label = top_label(body) if response.status == 200 else None
                answers.append((response.status, response.getheader(serving.MODEL_VERSION_HEADER), label))
            except (OSError, http.client.HTTPException) as error:
                answers.append((0, None, repr(error)))
                connection.close()

    workers = [threading.Thread(target=hammer, args=(answers,)) for answers in per_client]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: all(len(answers) >= 2 for answers in per_client))
        before = answered()
        swapped = endpoints.start_or_update(kennel_home, ENDPOINT, second)
        during = answered() - before
        wait_until(lambda: all(sum(answer[1] == "2" for answer in answers) >= 2 for answers in per_client))
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)

    assert swapped.action == "updated"
    assert swapped.endpoint.pid == started.pid  # swapped in place, not restarted
    assert swapped.endpoint.model_package_version == 2
    answers = [answer for client in per_client for answer in client]
    failures = [answer for answer in answers if answer[0] != 200]
    assert failures == []
    assert during > 0  # requests were answered while the new model loaded
    for client in per_client:  # each connection sees one clean switch, old model then new
        versions = [answer[1] for answer in client]
        switch = versions.index("2")
        assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}
    labels = {answer[1]: answer[2] for answer in answers}
    assert labels["2"] == reversed_label(labels["1"], tarballs.class_names)
    assert len(os.listdir(endpoints.endpoint_dir(kennel_home, ENDPOINT) / endpoints.MODELS_DIR)) == 1

    stopped = endpoints.stop(kennel_home, ENDPOINT)
    assert stopped.status == OUT_OF_SERVICE and stopped.url is None and stopped.pid is None
    assert server_processes(kennel_home) == []
    assert endpoints.ping(started.url) is None
    assert endpoints.describe_endpoint(kennel_home, ENDPOINT).status == OUT_OF_SERVICE


def test_a_failed_update_keeps_the_old_model_serving(kennel_home: Path, tarballs: Tarballs) -> None:
    good = register(kennel_home, tarballs.original, APPROVED)
    broken = register(kennel_home, tarballs.broken, APPROVED)
    started = endpoints.start_or_update(kennel_home, ENDPOINT, good).endpoint

    with pytest.raises(EndpointError) as raised:
        endpoints.start_or_update(kennel_home, ENDPOINT, broken)
    assert "could not load model package version 2" in str(raised.value)
    assert "pop from empty list" in str(raised.value)  # the log tail comes along

    endpoint = endpoints.describe_endpoint(kennel_home, ENDPOINT)
    assert endpoint.status == IN_SERVICE and endpoint.pid == started.pid
    assert endpoint.model_package_version == 1
    assert "update to model package version 2 failed" in endpoint.failure_reason
    answer = endpoints.invoke_endpoint(kennel_home, ENDPOINT, sample_png("bag"), "image/png")
    assert answer.status == 200 and answer.json()["predictions"]


def test_a_killed_server_is_not_in_service_and_starts_again(kennel_home: Path, tarballs: Tarballs) -> None:
    package = register(kennel_home, tarballs.original, APPROVED)
    started = endpoints.start_or_update(kennel_home, ENDPOINT, package).endpoint
    os.kill(started.pid, signal.SIGKILL)
    wait_until(lambda: endpoints.describe_endpoint(kennel_home, ENDPOINT).status != IN_SERVICE)

    dead = endpoints.list_endpoints(kennel_home)[0]
    assert dead.status == FAILED
    assert f"pid {started.pid}" in dead.failure_reason and dead.url is None
    with pytest.raises(EndpointError, match="is Failed"):
        endpoints.invoke_endpoint(kennel_home, ENDPOINT, sample_png("bag"), "image/png")

    # Started again, this time with a payload limit below the size of one sample image.
    png = sample_png("bag")
    limit = len(png) - 1
    restarted = endpoints.start_or_update(kennel_home, ENDPOINT, package, max_payload_bytes=limit)
    assert restarted.action == "created" and restarted.endpoint.status == IN_SERVICE
    assert restarted.endpoint.pid != started.pid
    too_large = endpoints.invoke_endpoint(kennel_home, ENDPOINT, png, "image/png")
    assert too_large.status == 413 and f"over the {limit}-byte limit" in too_large.json()["message"]
    under_limit = endpoints.invoke_endpoint(kennel_home, ENDPOINT, b'{"image": ', "application/json")
    assert under_limit.status == 400 and "not valid JSON" in under_limit.json()["message"]


def test_a_model_that_cannot_load_fails_the_start_with_the_log_tail(
    kennel_home: Path, tarballs: Tarballs
) -> None:
    package = register(kennel_home, tarballs.broken, APPROVED)
    with pytest.raises(EndpointError) as raised:
        endpoints.start_or_update(kennel_home, ENDPOINT, package, timeout=120)
    message = str(raised.value)
    assert "could not load model package version 1" in message
    assert "could not load its model" in message  # from the server's log

    endpoint = endpoints.describe_endpoint(kennel_home, ENDPOINT)
    assert endpoint.status == FAILED and endpoint.pid is None
    assert server_processes(kennel_home) == []


@pytest.mark.parametrize(
    ("make", "words"),
    [(not_a_tarball, "is not a readable model.tar.gz"), (tarball_without_weights, "lacks model.pth")],
)
def test_a_bad_artifact_is_refused_before_any_server_starts(
    kennel_home: Path, tmp_path: Path, make, words: str
) -> None:
    package = register(kennel_home, make(tmp_path / "model.tar.gz"), APPROVED)
    with pytest.raises(EndpointError, match=words):
        endpoints.start_or_update(kennel_home, ENDPOINT, package)
    assert server_processes(kennel_home) == []
    assert endpoints.list_endpoints(kennel_home) == []


def test_model_data_missing_from_the_store_is_one_clear_error(kennel_home: Path, tarballs: Tarballs) -> None:
    package = register(kennel_home, tarballs.original, APPROVED)
    missing = {**package, "ModelDataUrl": "s3://kennel-local/nowhere/model.tar.gz"}
    with pytest.raises(EndpointError, match="is not in the local object store"):
        endpoints.start_or_update(kennel_home, ENDPOINT, missing)


def test_names_and_unknown_endpoints(kennel_home: Path) -> None:
    with pytest.raises(EndpointError, match="not valid"):
        endpoints.describe_endpoint(kennel_home, "no_underscores")
    with pytest.raises(EndpointError, match="no local endpoint named 'absent'"):
        endpoints.stop(kennel_home, "absent")
    with pytest.raises(EndpointError, match="no local endpoint named 'absent'"):
        endpoints.invoke_endpoint(kennel_home, "absent", b"", "image/png")
    assert endpoints.list_endpoints(kennel_home) == []


def test_the_lock_is_reentrant_in_a_thread_and_exclusive_across_threads(kennel_home: Path) -> None:
    order: list[str] = []
    with endpoints.endpoint_lock(kennel_home, ENDPOINT):
        with endpoints.endpoint_lock(kennel_home, ENDPOINT):  # the same thread again: no deadlock
            order.append("outer")

        def other() -> None:
            with endpoints.endpoint_lock(kennel_home, ENDPOINT):
                order.append("other")

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.3)
        order.append("released")
    thread.join(10)
    assert order == ["outer", "released", "other"]


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


# --- kennel predict: raw image bytes, so images up to SageMaker's 6 MB limit get through ----------
def encoded(image: Image.Image, form: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=form)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("form", "top_k", "content_type"),
    [
        ("PNG", 3, "image/png"),
        ("JPEG", 5, "image/jpeg"),
        ("GIF", 1, "application/x-image"),  # the endpoint's Pillow identifies it
        ("PNG", 7, "application/json"),  # more labels than a raw image gets: only JSON can ask
    ],
)
def test_predict_sends_the_image_itself_unless_json_is_needed(form: str, top_k: int, content_type: str) -> None:
    data = encoded(Image.new("RGB", (40, 30), "red"), form)
    body, sent_as = cli.predict_request(data, top_k)
    assert sent_as == content_type
    if content_type == "application/json":
        assert json.loads(body) == {"image": base64.b64encode(data).decode(), "top_k": top_k}
    else:
        assert body == data


def test_kennel_predict_classifies_a_5_mb_image_that_json_would_not_carry(
    kennel_home: Path, tarballs: Tarballs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1300, 1300, 3), dtype=np.uint8)
    photo = tmp_path / "big.png"
    Image.fromarray(noise).save(photo)  # noise does not compress: about 5 MB
    data = photo.read_bytes()
    assert 4.5 * 2**20 < len(data) < MAX_PAYLOAD_BYTES < len(base64.b64encode(data))
    endpoints.start_or_update(kennel_home, ENDPOINT, register(kennel_home, tarballs.original, APPROVED))
    as_json = json.dumps({"image": base64.b64encode(data).decode()}).encode()
    assert endpoints.invoke_endpoint(kennel_home, ENDPOINT, as_json, "application/json").status == 413

    for name in [name for name in os.environ if name.startswith("KENNEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KENNEL_HOME", str(kennel_home))
    assert cli.main(["predict", str(photo), "--top-k", "2", "--json"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["image"] == str(photo) and len(answer["predictions"]) == 2
    assert all(prediction["label"] in tarballs.class_names for prediction in answer["predictions"])
    # A larger --top-k than a raw image gets cannot fit as JSON: the image is sent raw all the same.
    assert cli.main(["predict", str(photo), "--top-k", "9", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["predictions"]) == cli.RAW_IMAGE_LABELS
