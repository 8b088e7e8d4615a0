"""Pixel handling shared by `prepare` and the reader: load, square-crop, resize, encode, decode (PIL + numpy).

One place decides how an input becomes a stored image, so a test (or a user) can reproduce a stored image from
its source with `load_image` -> `to_channels` -> `fit_square` and compare pixels exactly.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# Downscales by more than this factor first shrink with a box filter (PIL's `reducing_gap`), then finish with
# Lanczos: same quality as Lanczos all the way for big factors, several times faster on multi-megapixel photos.
REDUCING_GAP = 3.0


class UnreadableImage(ValueError):
    """An input is not an image, or is truncated or corrupt."""


def load_image(path: str | Path | BinaryIO) -> Image.Image:
    """Opens and fully decodes an image file (EXIF rotation applied); raises UnreadableImage with the reason."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated files fail here, not later inside a worker
            return ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as err:
        raise UnreadableImage(f"too many pixels ({err})") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image (PIL cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise UnreadableImage(f"truncated or corrupt image ({err})") from None


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Grey ("L") for 1 channel, RGB for 3; transparency is composited over white rather than dropped to black."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grey: scale to 8 bits by the image's own range rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(np.uint8(np.round((arr - lo) / max(hi - lo, 1e-12) * 255)), "L")
    return img.convert("L" if channels == 1 else "RGB")


def fit_square(img: Image.Image, resolution: int) -> Image.Image:
    """Centre-crops to a square and resizes to `resolution` (Lanczos, box pre-reduction for big downscales)."""
    w, h = img.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    return img


def encode_image(img: Image.Image, image_format: str, jpeg_quality: int = 95) -> tuple[bytes, str]:
    """PNG (lossless) or JPEG bytes and the member extension ("png" / "jpg")."""
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
        return buf.getvalue(), "png"
    if image_format == "jpeg":
        # 4:4:4 chroma: at 16-64 px, 4:2:0 subsampling visibly smears colour edges.
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0, optimize=False)
        return buf.getvalue(), "jpg"
    raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")


def decode_image(data: bytes, channels: int, resolution: int | None = None) -> np.ndarray:
    """Stored image bytes -> uint8 array (H, W, channels); raises UnreadableImage on bad bytes or wrong shape."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode != ("L" if channels == 1 else "RGB"):
                img = img.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"stored image does not decode ({err})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if resolution is not None and arr.shape[:2] != (resolution, resolution):
        raise UnreadableImage(f"stored image is {arr.shape[1]}x{arr.shape[0]}, the manifest says {resolution}px")
    return arr
