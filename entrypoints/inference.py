"""Serving functions for Kennel's classifiers (SageMaker PyTorch contract) and a pure request handler.

SageMaker's PyTorch serving container calls model_fn(model_dir) once, then for each request
input_fn(body, content_type) -> predict_fn(data, model) -> output_fn(prediction, accept).
Kennel's local endpoint server calls `handle(...)`, which runs the same three functions and turns
errors into (status, JSON body) with one table: the subclasses of InferenceError.

Requests (Content-Type; parameters such as "; charset=utf-8" and letter case are ignored):
  image/jpeg, image/png, application/x-image   one image's bytes (Pillow identifies the format)
  application/json   {"image": "<base64>"}                   one image
                     {"images": ["<base64>", ...]} or [...]  a batch
                     optional "top_k" (object forms; default 5, capped at the number of classes)
  application/x-npy  np.save of a uint8 array: HxWxC is one image, NxHxWxC a batch; C is 1, 3 or 4

Responses (application/json), labels sorted by probability, most probable first:
  one image:  {"predictions": [{"label": "sneaker", "probability": 0.93}, ...]}
  a batch:    {"results": [{"predictions": [...]}, ...]}   in request order, even for a batch of one
  an error:   {"error": "<kind>", "message": "<what was wrong with which input, and the fix>"}

input_fn returns the decoded RGB images rather than a tensor: the resize and normalization belong
to the model (its image size, mean and std), which SageMaker does not pass to input_fn, so
predict_fn applies the model's evaluation preset, the very transform evaluate.py scored it with.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
from dataclasses import dataclass
from http import HTTPStatus
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

import contract
import nets
from images import DEFAULT_MIN_SIZE, ImageRejected, decode_rgb, to_rgb
from presets import EvalPreset

try:
    # Inside SageMaker's serving containers: subclassing the toolkit's error makes it answer with our
    # status (a 4xx that clients do not retry) instead of turning every failure into a 500.
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ServingError
except ImportError:
    _ServingError = Exception

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"
DEFAULT_TOP_K = contract.DEFAULT_TOP_K
# The same floor as the prepare step: an image too small to have been trained on is refused
# rather than answered with a confident guess about a few upscaled pixels.
SERVING_MIN_SIZE = DEFAULT_MIN_SIZE
# Decoded pixels per request: a 6 MB body of compressed images can expand to gigabytes.
MAX_REQUEST_PIXELS = 100_000_000
NPY_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA (composited on white, as for PNGs)


# --- errors: one class per status ------------------------------------------------------------


class InferenceError(_ServingError):
    """A request the endpoint cannot serve; `status` is the HTTP status, `kind` the error's name."""

    status: ClassVar[int] = HTTPStatus.INTERNAL_SERVER_ERROR
    kind: ClassVar[str] = "inference_error"

    def __init__(self, message: str):
        Exception.__init__(self, message)
        self.message = message
        # The attributes sagemaker_inference's Transformer reads when it answers an error.
        self.status_code = int(self.status)
        self.phrase = HTTPStatus(self.status).phrase

    def __str__(self) -> str:
        return self.message


class BadRequest(InferenceError):
    status = HTTPStatus.BAD_REQUEST
    kind = "bad_request"


class PayloadTooLarge(InferenceError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    kind = "payload_too_large"


class UnsupportedContentType(InferenceError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    kind = "unsupported_content_type"


class UnsupportedAccept(InferenceError):
    status = HTTPStatus.NOT_ACCEPTABLE
    kind = "unsupported_accept"


# --- what flows between the functions ----------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    meta: nets.ModelMeta
    preset: EvalPreset
    device: torch.device


@dataclass(frozen=True)
class Request:
    images: list[Image.Image]  # RGB
    top_k: int
    batch: bool  # the client sent a list: answer {"results": [...]}


@dataclass(frozen=True)
class Prediction:
    probabilities: torch.Tensor  # (N, classes), rows sum to 1
    class_names: list[str]
    top_k: int
    batch: bool


# --- the SageMaker contract --------------------------------------------------------------------


def model_fn(model_dir: str) -> LoadedModel:
    configure_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = nets.load_artifacts(model_dir, device)  # torch.load(weights_only=True), eval mode
    model = model.to(memory_format=torch.channels_last)  # ~2x faster convolutions on CPU
    return LoadedModel(model, meta, EvalPreset(meta.image_size, meta.mean, meta.std), device)


def input_fn(body: bytes | bytearray | memoryview | str | None, content_type: str | None) -> Request:
    # SageMaker's toolkit hands JSON bodies over decoded to str; an empty POST may arrive as None.
    raw = body.encode() if isinstance(body, str) else bytes(body or b"")
    if len(raw) > contract.MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"request body is {len(raw)} bytes, over the {contract.MAX_PAYLOAD_BYTES}-byte limit of "
            f"SageMaker real-time endpoints: send fewer or smaller images per request"
        )
    media = media_type(content_type)
    if media in contract.IMAGE_CONTENT_TYPES:
        return Request([decode_image(raw, "the request body", PixelBudget())], DEFAULT_TOP_K, batch=False)
    if media == JSON_TYPE:
        return json_request(raw)
    if media == "application/x-npy":
        return npy_request(raw)
    given = f"Content-Type {content_type!r} is not supported" if media else "no Content-Type given"
    raise UnsupportedContentType(f"{given}: send one of {', '.join(contract.INFERENCE_CONTENT_TYPES)}")


def predict_fn(data: Request, model: LoadedModel) -> Prediction:
    batch = torch.stack([model.preset(image) for image in data.images])
    batch = batch.to(model.device, memory_format=torch.channels_last)
    with torch.inference_mode():
        probabilities = torch.softmax(model.model(batch).float(), dim=1).cpu()
    top_k = min(data.top_k, probabilities.shape[1])
    return Prediction(probabilities, list(model.meta.class_names), top_k, data.batch)


def output_fn(prediction: Prediction, accept: str | None) -> bytes:
    check_accept(accept)
    results = [
        top_predictions(row, prediction.class_names, prediction.top_k) for row in prediction.probabilities
    ]
    payload = {"results": results} if prediction.batch else results[0]
    return json.dumps(payload).encode()


def handle(
    model: LoadedModel, body: bytes | str | None, content_type: str | None, accept: str | None
) -> tuple[int, bytes, str]:
    """One request, start to end: (HTTP status, body, content type). Never raises."""
    try:
        check_accept(accept)  # before the work, not after it
        prediction = predict_fn(input_fn(body, content_type), model)
        return int(HTTPStatus.OK), output_fn(prediction, accept), JSON_TYPE
    except InferenceError as error:
        return error.status_code, error_body(error.kind, error.message), JSON_TYPE
    except Exception:
        # A bug in the model or in this code, not in the request: details go to the log only.
        logger.exception("inference failed")
        message = "the model failed to process this request; the endpoint's log has the details"
        return int(HTTPStatus.INTERNAL_SERVER_ERROR), error_body("internal_error", message), JSON_TYPE


def error_body(kind: str, message: str) -> bytes:
    return json.dumps({"error": kind, "message": message}).encode()


# --- helpers -----------------------------------------------------------------------------------


def configure_threads() -> None:
    """One intra-op thread pool per serving worker, sized so that the workers share the CPUs."""
    if os.environ.get("OMP_NUM_THREADS"):
        return  # the operator chose; torch already honours it
    try:
        workers = max(1, int(os.environ.get("SAGEMAKER_MODEL_SERVER_WORKERS", "1")))
    except ValueError:
        workers = 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cpus // workers))


def media_type(header: str | None) -> str:
    """'Image/PNG; charset=utf-8' -> 'image/png'."""
    return (header or "").split(";", 1)[0].strip().lower()


def check_accept(accept: str | None) -> None:
    if not accept:
        return
    for media_range in accept.split(","):
        if media_type(media_range) in (JSON_TYPE, "application/*", "*/*"):
            return
    raise UnsupportedAccept(f"Accept {accept!r} cannot be served: responses are {JSON_TYPE} (or send */*)")


def top_predictions(probabilities: torch.Tensor, class_names: list[str], k: int) -> dict:
    values, indices = probabilities.topk(k)
    return {
        "predictions": [
            {"label": class_names[index], "probability": float(value)}
            for value, index in zip(values.tolist(), indices.tolist(), strict=True)
        ]
    }


class PixelBudget:
    """Counts decoded pixels across one request and refuses the request once over the limit."""

    def __init__(self, limit: int | None = None):
        self.limit = MAX_REQUEST_PIXELS if limit is None else limit
        self.left = self.limit

    def take(self, width: int, height: int, where: str) -> None:
        self.left -= width * height
        if self.left < 0:
            raise BadRequest(
                f"{where}: the request's images add up to more than {self.limit} pixels; "
                f"send fewer or smaller images per request"
            )


def decode_image(raw: bytes, where: str, budget: PixelBudget) -> Image.Image:
    try:
        image = decode_rgb(raw, min_size=SERVING_MIN_SIZE).image
    except ImageRejected as error:
        raise BadRequest(f"{where} is not a usable image ({error.reason}: {error.detail})") from None
    budget.take(*image.size, where)
    return image


def check_batch_size(count: int, where: str) -> None:
    if count == 0:
        raise BadRequest(f"{where} is an empty batch: send at least one image")
    if count > contract.INFERENCE_MAX_BATCH:
        raise BadRequest(
            f"{where} holds {count} images, more than {contract.INFERENCE_MAX_BATCH} per request: "
            f"split the batch"
        )


def parse_top_k(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'top_k' is {json.dumps(value)}: give a whole number >= 1")
    return value


# --- application/json ------------------------------------------------------------------------

JSON_SHAPES = '{"image": "<base64>"}, {"images": ["<base64>", ...]} or ["<base64>", ...]'


def json_request(raw: bytes) -> Request:
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise BadRequest(
            f"the application/json body is not valid JSON ({error}); send {JSON_SHAPES}"
        ) from None
    top_k = DEFAULT_TOP_K
    if isinstance(payload, list):
        encoded, where, batch = payload, "images", True
    elif isinstance(payload, dict):
        unknown = sorted(set(payload) - {"image", "images", "top_k"})
        if unknown or ("image" in payload) == ("images" in payload):
            raise BadRequest(
                f"the JSON object has keys {sorted(payload)}; send exactly one of 'image' or 'images' "
                f"(and optionally 'top_k'): {JSON_SHAPES}"
            )
        top_k = parse_top_k(payload.get("top_k", DEFAULT_TOP_K))
        if "image" in payload:
            encoded, where, batch = [payload["image"]], "image", False
        else:
            encoded, where, batch = payload["images"], "images", True
            if not isinstance(encoded, list):
                raise BadRequest(f"'images' must be a list of base64 strings: send {JSON_SHAPES}")
    else:
        raise BadRequest(
            f"the JSON body is a JSON {type(payload).__name__}, not an object or a list; send {JSON_SHAPES}"
        )
    check_batch_size(len(encoded), f"'{where}'")
    budget = PixelBudget()
    images = []
    for position, item in enumerate(encoded):
        name = f"'{where}'" if not batch else f"{where}[{position}]"
        images.append(decode_image(decode_base64(item, name), name, budget))
    return Request(images, top_k, batch)


def decode_base64(item: object, where: str) -> bytes:
    if not isinstance(item, str):
        raise BadRequest(f"{where} is a JSON {type(item).__name__}, not a base64 string")
    text = item
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)  # line breaks are allowed
    except (binascii.Error, ValueError) as error:
        raise BadRequest(f"{where} is not valid base64 ({error}); encode the image file's bytes") from None


# --- application/x-npy -----------------------------------------------------------------------


def npy_request(raw: bytes) -> Request:
    array = load_npy(raw)
    if array.ndim == 3:
        arrays, batch = [array], False
    else:
        arrays, batch = list(array), True
        check_batch_size(len(arrays), "the application/x-npy array")
    budget = PixelBudget()
    images = []
    for position, pixels in enumerate(arrays):
        where = f"array[{position}]" if batch else "the array"
        height, width = pixels.shape[:2]
        if min(height, width) < SERVING_MIN_SIZE:
            raise BadRequest(
                f"{where} is {width}x{height}; the shorter side must be >= {SERVING_MIN_SIZE} px"
            )
        budget.take(width, height, where)
        plane = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
        images.append(to_rgb(Image.fromarray(np.ascontiguousarray(plane))))
    return Request(images, DEFAULT_TOP_K, batch)


def load_npy(raw: bytes) -> np.ndarray:
    """A uint8 HxWxC or NxHxWxC array; the header is checked before any data is read or allocated,
    and pickles are never loaded."""
    shape, dtype = read_npy_header(raw)
    if dtype.hasobject:
        raise BadRequest(
            "the application/x-npy array holds Python objects, which would need unpickling; refused: "
            "send a uint8 pixel array"
        )
    if dtype != np.uint8:
        raise BadRequest(f"the application/x-npy array has dtype {dtype}; send uint8 pixels (0-255)")
    if len(shape) not in (3, 4) or shape[-1] not in NPY_CHANNELS:
        raise BadRequest(
            f"the application/x-npy array has shape {shape}; send HxWxC for one image or NxHxWxC "
            f"for a batch, with C in {NPY_CHANNELS}"
        )
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise BadRequest(f"the application/x-npy body is incomplete or corrupt ({error})") from None
    return array


def read_npy_header(raw: bytes) -> tuple[tuple[int, ...], np.dtype]:
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} is not supported")
    except Exception as error:  # numpy's header parser raises ValueError, SyntaxError, TokenError, ...
        raise BadRequest(
            f"the application/x-npy body is not a .npy array ({error}); send np.save output"
        ) from None
    return tuple(shape), dtype
