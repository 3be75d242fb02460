"""inference.py: every request format through the real model, and every error a client can cause."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import contract
import images
import inference
from images import decode_rgb

SAMPLE_TEST = Path(__file__).resolve().parents[1] / "data" / "sample" / "test"
JSON = "application/json"
NPY = "application/x-npy"


# --- fixtures and request builders -------------------------------------------------------------


@pytest.fixture(scope="module")
def served(trained_model_dir: Path) -> Iterator[inference.LoadedModel]:
    threads = torch.get_num_threads()
    loaded = inference.model_fn(str(trained_model_dir))
    yield loaded
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    """Three real test images of different classes, as the PNG files they are stored in."""
    return [next((SAMPLE_TEST / name).glob("*.png")).read_bytes() for name in ("bag", "sneaker", "trouser")]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(decode_rgb(png).image)  # HxWx3 uint8, exactly what the PNG decodes to


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def jpeg(png: bytes, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    decode_rgb(png).image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def grey16(png: bytes, mode: str) -> Image.Image:
    """The sample image's grey values on a 16-bit scale, in a 16-bit mode of either byte order."""
    values = np.asarray(decode_rgb(png).image)[:, :, 0].astype(np.uint16) * 257
    return Image.frombytes(mode, (values.shape[1], values.shape[0]), values.astype(
        ">u2" if mode == "I;16B" else "<u2").tobytes())


def call(served, body, content_type, accept=JSON) -> tuple[int, dict]:
    status, payload, response_type = inference.handle(served, body, content_type, accept)
    assert response_type == JSON
    return status, json.loads(payload)


def as_results(payload: dict) -> list[dict]:
    return payload["results"] if "results" in payload else [payload]


# Each builder: (images as PNG bytes) -> (body, content type, images in the request, is a batch).
REQUESTS = {
    "png": lambda p: (p[0], "image/png", 1, False),
    "x-image": lambda p: (p[0], "application/x-image", 1, False),
    "jpeg": lambda p: (jpeg(p[0]), "image/jpeg", 1, False),
    "json single": lambda p: (json.dumps({"image": b64(p[0])}), JSON, 1, False),
    "json batch": lambda p: (json.dumps({"images": [b64(x) for x in p]}).encode(), JSON, 3, True),
    "json list": lambda p: (json.dumps([b64(x) for x in p[:2]]).encode(), JSON, 2, True),
    "npy single": lambda p: (npy(pixels(p[0])), NPY, 1, False),
    "npy grey": lambda p: (npy(pixels(p[0])[:, :, :1]), NPY, 1, False),
    "npy batch": lambda p: (npy(np.stack([pixels(x) for x in p])), NPY, 3, True),
}


# --- every format answers with top-k labels of the model ----------------------------------------


@pytest.mark.parametrize("kind", REQUESTS)
def test_every_content_type_gives_top_k_labels(served, pngs, kind):
    body, content_type, count, batch = REQUESTS[kind](pngs)
    status, payload = call(served, body, content_type)
    assert status == 200, payload
    assert ("results" in payload) == batch
    results = as_results(payload)
    assert len(results) == count
    for result in results:
        predictions = result["predictions"]
        labels = [entry["label"] for entry in predictions]
        probabilities = [entry["probability"] for entry in predictions]
        assert len(predictions) == inference.DEFAULT_TOP_K
        assert len(set(labels)) == len(labels) and set(labels) <= set(served.meta.class_names)
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
    # The full distribution behind the top k sums to one for every image.
    prediction = inference.predict_fn(inference.input_fn(body, content_type), served)
    assert prediction.probabilities.shape == (count, served.meta.num_classes)
    assert torch.allclose(prediction.probabilities.sum(dim=1), torch.ones(count), atol=1e-5)


def test_the_same_image_gives_the_same_answer_in_every_format(served, pngs):
    answers = {}
    for kind, build in REQUESTS.items():
        body, content_type, _, _ = build(pngs)
        status, payload = call(served, body, content_type)
        assert status == 200
        answers[kind] = as_results(payload)[0]["predictions"]
    lossless = [kind for kind in answers if kind != "jpeg"]
    reference = answers["png"]
    for kind in lossless:
        assert [p["label"] for p in answers[kind]] == [p["label"] for p in reference], kind
        for got, expected in zip(answers[kind], reference, strict=True):
            assert got["probability"] == pytest.approx(expected["probability"], abs=1e-5), kind
    # JPEG is lossy (and on 28 px images its 8x8 blocks are coarse): compare on the image the model
    # is surest of: the same best label, a close confidence.
    tops = [(call(served, png, "image/png")[1]["predictions"][0], png) for png in pngs]
    best = max(tops, key=lambda top: top[0]["probability"])
    lossy = call(served, jpeg(best[1]), "image/jpeg")[1]["predictions"][0]
    assert lossy["label"] == best[0]["label"]
    assert lossy["probability"] == pytest.approx(best[0]["probability"], abs=0.1)


def test_batch_results_keep_request_order(served, pngs):
    singles = [call(served, png, "image/png")[1]["predictions"] for png in pngs]
    status, payload = call(served, json.dumps({"images": [b64(png) for png in reversed(pngs)]}), JSON)
    assert status == 200
    assert [result["predictions"][0]["label"] for result in payload["results"]] == [
        single[0]["label"] for single in reversed(singles)
    ]


@pytest.mark.parametrize(("top_k", "expected"), [(1, 1), (3, 3), (1000, 10)])
def test_top_k_is_honoured_and_capped_at_the_classes(served, pngs, top_k, expected):
    status, payload = call(served, json.dumps({"image": b64(pngs[1]), "top_k": top_k}), JSON)
    assert status == 200
    assert len(payload["predictions"]) == expected
    if expected == served.meta.num_classes:
        assert sum(p["probability"] for p in payload["predictions"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("content_type", "accept"),
    [
        ("IMAGE/PNG; charset=binary", None),
        ("image/png", ""),
        ("image/png", "*/*"),
        ("image/png", "application/*"),
        ("image/png", "text/html, application/json;q=0.9"),
        (" application/x-image ", "Application/JSON"),
    ],
)
def test_header_parameters_and_case_are_ignored(served, pngs, content_type, accept):
    status, payload = call(served, pngs[0], content_type, accept)
    assert status == 200 and payload["predictions"]


def test_json_body_as_text_with_charset(served, pngs):
    # SageMaker's toolkit hands application/json bodies over already decoded to str.
    request = inference.input_fn(json.dumps({"images": [b64(pngs[0])]}), "application/json; charset=utf-8")
    assert request.batch and len(request.images) == 1 and request.images[0].mode == "RGB"


def test_data_url_and_wrapped_base64_are_accepted(served, pngs):
    encoded = b64(pngs[0])
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    for text in (f"data:image/png;base64,{encoded}", wrapped):
        status, payload = call(served, json.dumps({"image": text}), JSON)
        assert status == 200, payload


def test_big_endian_16_bit_and_float_tiffs_are_served_like_the_16_bit_png(served, pngs):
    # The 16-bit PNG (little-endian I;16) is the long-supported case; the others used to answer 500.
    reference = call(served, encoded(grey16(pngs[1], "I;16"), "PNG"), "image/png")
    big_endian = encoded(grey16(pngs[1], "I;16B"), "TIFF")
    assert big_endian[:2] == b"MM"
    grey = np.asarray(decode_rgb(pngs[1]).image)[:, :, 0]
    floats = encoded(Image.fromarray((grey / 255).astype(np.float32)), "TIFF")
    assert reference[0] == 200, reference[1]
    for body in (big_endian, floats):
        status, payload = call(served, body, "application/x-image")
        assert status == 200, payload
        assert [p["label"] for p in payload["predictions"]] == [p["label"] for p in reference[1]["predictions"]]
        for got, expected in zip(payload["predictions"], reference[1]["predictions"], strict=True):
            assert got["probability"] == pytest.approx(expected["probability"], abs=1e-4)


def test_an_image_that_fails_conversion_is_a_400_naming_it(served, pngs, monkeypatch):
    def conversion_bug(image):  # as a Pillow conversion fails on an odd file: an undocumented type
        raise KeyError(f"no converter for {image.mode}")

    monkeypatch.setattr(images, "to_rgb", conversion_bug)
    for body, content_type, where in [
        (pngs[0], "image/png", "the request body"),
        (json.dumps({"images": [b64(pngs[0])]}), JSON, "images[0]"),
    ]:
        status, payload = call(served, body, content_type)
        assert status == 400, payload  # a 4xx: boto3 and the CLI do not retry it
        assert payload["error"] == "bad_request"
        message = payload["message"]
        assert message.startswith(f"{where} is not a usable image (undecodable:"), message
        assert "KeyError" in message and "no converter for L" in message and "re-save" in message


# --- errors a client can cause: the right status and a message naming the input ----------------


class Pickled:
    """Unpickling this creates a folder: proof that a body was (or was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _bad_requests(png: bytes, marker: Path) -> dict[str, tuple]:
    tiny = png_of_size(8, 8)
    image = pixels(png)
    too_many = contract.INFERENCE_MAX_BATCH + 1
    return {
        # name: (body, content type, accept, status, fragments of the message)
        "unsupported type": (png, "text/plain", JSON, 415, ["'text/plain'", "image/png", NPY]),
        "gif is not listed": (png, "image/gif", JSON, 415, ["'image/gif'"]),
        "no content type": (png, None, JSON, 415, ["no Content-Type"]),
        "unsupported accept": (png, "image/png", "text/csv", 406, ["'text/csv'", JSON]),
        "not an image": (b"GIF89a? no, just text", "image/png", JSON, 400, ["request body", "not_an_image"]),
        "truncated png": (png[: len(png) // 2], "image/png", JSON, 400, ["request body", "corrupt"]),
        "image too small": (tiny, "application/x-image", JSON, 400, ["too_small", "8x8"]),
        "malformed json": (b'{"image": ', JSON, JSON, 400, ["not valid JSON"]),
        "json not utf-8": (b'{"image": "\xff"}', JSON, JSON, 400, ["not valid JSON"]),
        "bad base64": (
            json.dumps({"images": [b64(png), "@@not base64@@"]}),
            JSON,
            JSON,
            400,
            ["images[1]", "base64"],
        ),
        "base64 of junk": (
            json.dumps({"images": [b64(b"junk" * 10)]}),
            JSON,
            JSON,
            400,
            ["images[0]", "usable"],
        ),
        "image not a string": (json.dumps({"image": 5}), JSON, JSON, 400, ["'image'", "not a base64 string"]),
        "wrong key": (json.dumps({"picture": b64(png)}), JSON, JSON, 400, ["'picture'", "exactly one of"]),
        "both keys": (json.dumps({"image": b64(png), "images": []}), JSON, JSON, 400, ["exactly one of"]),
        "json scalar": (b"42", JSON, JSON, 400, ["JSON int", "not an object"]),
        "images not a list": (json.dumps({"images": b64(png)}), JSON, JSON, 400, ["'images' must be a list"]),
        "empty batch": (json.dumps({"images": []}), JSON, JSON, 400, ["empty batch"]),
        "empty list": (b"[]", JSON, JSON, 400, ["empty batch"]),
        "batch too large": (json.dumps([b64(png)] * too_many), JSON, JSON, 400, [str(too_many), "split"]),
        "top_k zero": (json.dumps({"image": b64(png), "top_k": 0}), JSON, JSON, 400, ["'top_k'"]),
        "top_k text": (json.dumps({"image": b64(png), "top_k": "3"}), JSON, JSON, 400, ["'top_k'"]),
        "top_k bool": (json.dumps({"image": b64(png), "top_k": True}), JSON, JSON, 400, ["'top_k'"]),
        "npy float": (npy(image.astype(np.float32)), NPY, JSON, 400, ["dtype float32", "uint8"]),
        "npy 2-d": (npy(image[:, :, 0]), NPY, JSON, 400, ["shape (28, 28)"]),
        "npy 2 channels": (npy(image[:, :, :2]), NPY, JSON, 400, ["shape (28, 28, 2)"]),
        "npy too small": (npy(image[:8, :8]), NPY, JSON, 400, ["8x8", "shorter side"]),
        "npy empty batch": (npy(image[None][:0]), NPY, JSON, 400, ["empty batch"]),
        "npy batch too large": (npy(np.repeat(image[None], too_many, 0)), NPY, JSON, 400, [str(too_many)]),
        "npy truncated": (npy(image)[:-100], NPY, JSON, 400, ["incomplete or corrupt"]),
        "npz not npy": (_npz(image), NPY, JSON, 400, ["not a .npy"]),
        "npy broken header": (npy(image).replace(b"}", b" ", 1), NPY, JSON, 400, ["not a .npy"]),
        "npy pickle": (npy(np.array([Pickled(marker)], dtype=object), True), NPY, JSON, 400, ["objects"]),
        "too large": (png + b"\0" * contract.MAX_PAYLOAD_BYTES, "image/png", JSON, 413, ["bytes", "limit"]),
        "too large json": (b" " * (contract.MAX_PAYLOAD_BYTES + 1), JSON, JSON, 413, ["bytes"]),
    }


def _npz(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, image=array)
    return buffer.getvalue()


BAD_REQUEST_NAMES = list(
    _bad_requests(next((SAMPLE_TEST / "bag").glob("*.png")).read_bytes(), Path("unused"))
)


@pytest.mark.parametrize("name", BAD_REQUEST_NAMES)
def test_client_errors_get_their_status_and_a_clear_message(served, pngs, tmp_path, name):
    marker = tmp_path / "unpickled"
    body, content_type, accept, status, fragments = _bad_requests(pngs[0], marker)[name]
    got_status, payload = call(served, body, content_type, accept)
    assert got_status == status, payload
    assert set(payload) == {"error", "message"}
    for fragment in fragments:
        assert fragment in payload["message"], payload["message"]
    assert "Traceback" not in payload["message"]
    assert not marker.exists()  # nothing in any body was unpickled


def test_input_fn_raises_the_typed_errors(pngs):
    with pytest.raises(inference.PayloadTooLarge):
        inference.input_fn(b"\0" * (contract.MAX_PAYLOAD_BYTES + 1), "image/png")
    with pytest.raises(inference.UnsupportedContentType):
        inference.input_fn(pngs[0], "text/csv")
    with pytest.raises(inference.BadRequest, match="pickl"):
        inference.input_fn(npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), NPY)


def test_pixel_budget_bounds_what_one_request_decodes(served, pngs, monkeypatch):
    monkeypatch.setattr(inference, "MAX_REQUEST_PIXELS", 2 * 28 * 28)
    status, payload = call(served, json.dumps({"images": [b64(png) for png in pngs]}), JSON)
    assert status == 400 and "images[2]" in payload["message"] and str(2 * 28 * 28) in payload["message"]
    status, _ = call(served, json.dumps({"images": [b64(png) for png in pngs[:2]]}), JSON)
    assert status == 200


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (inference.BadRequest, 400),
        (inference.PayloadTooLarge, 413),
        (inference.UnsupportedContentType, 415),
        (inference.UnsupportedAccept, 406),
    ],
)
def test_error_types_carry_their_status(error, status):
    raised = error("the input named here was wrong")
    assert isinstance(raised, inference.InferenceError)
    assert raised.status == status and raised.status_code == status and raised.phrase
    assert str(raised) == "the input named here was wrong"


def test_a_model_bug_is_a_generic_500_not_a_client_error(served, pngs, caplog):
    # Metadata that does not fit the network (3 names, 10 outputs): the server's fault, not the client's.
    broken_meta = inference.nets.ModelMeta(
        served.meta.arch,
        served.meta.class_names[:3],
        served.meta.image_size,
        served.meta.mean,
        served.meta.std,
    )
    broken = inference.LoadedModel(served.model, broken_meta, served.preset, served.device)
    status, payload = call(broken, pngs[0], "image/png")
    assert status == 500
    assert payload["error"] == "internal_error"
    assert "IndexError" not in payload["message"] and "Traceback" not in payload["message"]
    assert "IndexError" in caplog.text  # the details went to the endpoint's log


def test_model_fn_loads_an_eval_model_and_sizes_threads(trained_model_dir, monkeypatch):
    threads = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SAGEMAKER_MODEL_SERVER_WORKERS", str(cpus))
    try:
        loaded = inference.model_fn(str(trained_model_dir))
        assert torch.get_num_threads() == 1  # as many workers as CPUs: one thread each
    finally:
        torch.set_num_threads(threads)
    assert not loaded.model.training
    assert loaded.meta.class_names and loaded.preset is not None
