"""Decode untrusted image bytes into RGB, or say exactly why not.

Shared by prepare.py (cleaning a dataset) and inference.py (decoding request bodies), so that a
file the pipeline would have rejected at training time is rejected the same way at serving time.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MIN_SIZE = 16  # pixels on the shorter side; Fashion-MNIST (28 px) must pass
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning threshold

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
    corrupt (truncated or undecodable pixel data).
    """
    raw = data.read_bytes() if isinstance(data, Path) else data
    if not raw:
        raise ImageRejected("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not a format Pillow can identify") from None
    except Image.DecompressionBombError as error:
        raise ImageRejected("decompression_bomb", str(error)) from None
    except (OSError, SyntaxError, ValueError) as error:  # header present but broken or cut short
        raise ImageRejected("corrupt", str(error)) from None
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
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale the used range to 8 bits instead of clipping at 255.
        low, high = image.getextrema()
        scale = 255.0 / (high - low) if high > low else 0.0
        image = image.point(lambda value: (value - low) * scale).convert("L")
    elif image.mode == "F":
        low, high = image.getextrema()
        scale = 255.0 / (high - low) if high > low else 0.0
        image = image.point(lambda value: (value - low) * scale).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
