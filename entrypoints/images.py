"""Decode untrusted image bytes into RGB, or say exactly why not.

Shared by prepare.py (cleaning a dataset) and inference.py (decoding request bodies), so that a
file the pipeline would have rejected at training time is rejected the same way at serving time.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MIN_SIZE = 16  # pixels on the shorter side; Fashion-MNIST (28 px) must pass
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning threshold
ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")  # composited on white

# Never let Pillow fill a truncated file with grey: a truncated image is a rejected image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageRejected(ValueError):
    """The bytes are not a usable image; `reason` is a short machine-friendly word."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # always mode RGB
    source_format: str  # "JPEG", "PNG", ... as Pillow identified it
    source_mode: str  # the mode before conversion ("L", "RGBA", "CMYK", "I;16", ...)
    rotated: bool = False  # an EXIF Orientation tag was applied (phone photos)


def decode_rgb(
    data: bytes | Path,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Fully decode `data` (bytes or a file path) and convert it to RGB.

    Raises ImageRejected with reason one of: empty, not_an_image, decompression_bomb, too_small,
    corrupt (truncated or undecodable pixel data), undecodable (the decoder or the conversion
    failed in a way Pillow does not document: still this file's problem, never the caller's crash).
    """
    raw = data.read_bytes() if isinstance(data, Path) else data
    if not raw:
        raise ImageRejected("empty", "zero bytes")
    with warnings.catch_warnings(), pillow_pixel_limit(max_pixels):
        # Pillow warns above its limit (and raises above twice that); we check the size ourselves.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return _decode(raw, min_size, max_pixels)
        except (ImageRejected, MemoryError):  # out of memory says nothing about the file
            raise
        except Exception as error:
            raise ImageRejected(
                "undecodable",
                f"unexpected {type(error).__name__} while decoding: {error}; "
                "re-save the image as an 8-bit PNG or JPEG",
            ) from None


@contextmanager
def pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Let Pillow open images of up to `max_pixels` pixels while the block runs.

    Pillow refuses any image over 2 * Image.MAX_IMAGE_PIXELS (about 179M) when it opens it, so a
    higher `max_pixels` could otherwise never take effect. That limit is one global of the process,
    so it is raised only when ours is higher, and put back afterwards: a lower or default limit
    leaves it untouched, which keeps this safe in the threaded endpoint server (it uses the
    default); higher limits come from prepare.py, whose processes decode one file at a time.
    """
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is None or max_pixels <= 2 * pillow_limit:
        yield
        return
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow now raises above 2 * max_pixels; we check the rest
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _decode(raw: bytes, min_size: int, max_pixels: int) -> DecodedImage:
    try:
        image = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not a format Pillow can identify") from None
    except Image.DecompressionBombError as error:
        raise ImageRejected("decompression_bomb", str(error)) from None
    except (OSError, SyntaxError, ValueError) as error:  # header present but broken or cut short
        raise ImageRejected("corrupt", str(error)) from None
    # Opening read only the header: both checks run before a single pixel is decoded.
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            "decompression_bomb", f"{width}x{height} = {width * height} pixels, limit {max_pixels}"
        )
    if min(width, height) < min_size:
        raise ImageRejected("too_small", f"{width}x{height}, shorter side under {min_size} px")
    source_format, source_mode = image.format or "unknown", image.mode
    try:
        image.load()
    except Image.DecompressionBombError as error:  # a GIF frame or TIFF tile larger than the image
        raise ImageRejected("decompression_bomb", str(error)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected("corrupt", f"{error}") from None
    # Phones store photos sideways with an EXIF Orientation tag; apply it so that training,
    # evaluation and serving all see the picture upright.
    orientation = image.getexif().get(0x0112, 1)
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    return DecodedImage(to_rgb(image), source_format, source_mode, rotated=orientation != 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "F" or image.mode.startswith("I"):  # I, I;16, I;16B, I;16L, I;16N, ...
        image = stretch_to_8bit(image)
    elif image.mode == "La":  # grey with premultiplied alpha (TIFF): Pillow converts it only to LA
        image = image.convert("LA")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def stretch_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float greyscale image as mode L, its used range stretched over 0-255.

    Stretching the range actually used, rather than dividing by the type's maximum, keeps 12-bit
    sensor data and floats in [0, 1] visible instead of black. numpy rather than Pillow's
    getextrema()/point(), which refuse I;16B, I;16L and I;16N ("image has wrong mode"); numpy reads
    every byte order. float64 holds every 32-bit integer exactly. NaN and infinities become black.
    """
    pixels = np.array(image, dtype=np.float64)  # a copy, scaled in place below
    finite = np.isfinite(pixels)
    low, high = (pixels[finite].min(), pixels[finite].max()) if finite.any() else (0.0, 0.0)
    pixels[~finite] = low
    pixels -= low
    pixels *= 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(np.rint(pixels, out=pixels).astype(np.uint8))
