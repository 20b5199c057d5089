"""Reading user images safely: any common mode in, an RGB PIL image out, or a clear error."""
from __future__ import annotations

import glob
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # ~6300 x 6300: beyond this we refuse instead of decoding
MAX_FILE_BYTES = 50 * 1024 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An input that is not a usable image; the message is meant for the user."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grayscale
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"array of shape {arr.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if arr.dtype == np.uint16 or (arr.dtype.kind == "f" and arr.max(initial=0) > 1.0):
        arr = arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 else 255.0)
    if arr.dtype.kind == "f":
        arr = np.clip(arr * 255.0, 0, 255)
    return Image.fromarray(arr.astype(np.uint8))


@dataclass
class Decoded:
    """An upright RGB ``image``, the ``size`` (width, height) of the whole upright photo, and whether the
    image was decoded at a reduced scale (``reduced``: a JPEG's DCT scaling, PIL's ``draft``)."""

    image: Image.Image
    size: tuple[int, int]
    reduced: bool = False


def decode(src: ImageInput, name: str | None = None, draft_side: int | None = None) -> Decoded:
    """Open ``src`` (path, bytes, PIL image or array) as an upright RGB image.

    Applies EXIF orientation, flattens transparency onto white, scales 16-bit to 8-bit, and raises
    :class:`ImageError` with a readable message for anything that is not a usable image. With
    ``draft_side``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose long side is
    still at least that, without decoding it whole."""
    label = name or (str(src) if isinstance(src, (str, Path)) else type(src).__name__)
    reduced = False
    if isinstance(src, np.ndarray):
        img = _from_array(src)
        full = img.size
    elif isinstance(src, Image.Image):
        img = src
        full = img.size
    else:
        if isinstance(src, (str, Path)):
            path = Path(src)
            if not path.is_file():
                raise ImageError(f"{label}: no such file")
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ImageError(f"{label}: file is larger than {MAX_FILE_BYTES // 2**20} MB")
            data = path.read_bytes()
        else:
            data = bytes(src)
        if not data:
            raise ImageError(f"{label}: file is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                full = img.size
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"{label}: image is {img.width}x{img.height}, more than {MAX_PIXELS:,} pixels")
                if draft_side and img.format == "JPEG" and max(full) > draft_side:
                    scale = draft_side / max(full)
                    img.draft("RGB", (int(np.ceil(full[0] * scale)), int(np.ceil(full[1] * scale))))
                    reduced = img.size != full
                img.load()
        except ImageError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{label}: not a readable image ({e.__class__.__name__})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{label}: corrupt or truncated image ({e})") from None
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{label}: image has no pixels ({img.width}x{img.height})")
    if img.width * img.height > MAX_PIXELS:
        raise ImageError(f"{label}: image is {img.width}x{img.height}, more than {MAX_PIXELS:,} pixels")
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not make the pixels unusable
        upright = img
    if upright.size != img.size:  # turned a quarter: so is the whole photo
        full = full[::-1]
    return Decoded(_to_rgb(upright), full, reduced)


def load_image(src: ImageInput, name: str | None = None) -> Image.Image:
    """``src`` as an upright RGB PIL image at full size (:func:`decode`)."""
    return decode(src, name).image


def expand_paths(items: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and globs to a list of image paths."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"{item}: no such file, folder or matching glob")
            out += matches
    return out
