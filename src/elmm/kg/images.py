"""Checking entity images at ingestion time: decodable, and not a decompression bomb."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

DEFAULT_MAX_PIXELS = 64_000_000  # the same limit the encode stage applies (src/elmm/vision.py)
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}


@dataclass(frozen=True)
class ImageCheck:
    path: Path | Callable[[], bytes]
    ok: bool
    ext: str  # canonical extension for an accepted image (".jpg"), "" otherwise
    reason: str  # why it was skipped, "" when ok


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's own bomb check, at our limit; its warning (limit < pixels <= 2x limit) becomes an error."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _check(path: Path | Callable[[], bytes], max_pixels: int) -> ImageCheck:
    try:
        with Image.open(path if isinstance(path, Path) else io.BytesIO(path())) as im:
            # Image.open reads only the header; refuse large images before decoding a pixel.
            if im.width * im.height > max_pixels:
                raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels exceeds the limit of {max_pixels}")
            fmt = im.format or ""
            # Decode at reduced scale where the codec allows it (JPEG DCT scaling): a truncated or
            # garbled file still fails, at a fraction of the cost of a full decode.
            im.draft("RGB", (64, 64))
            im.load()
        suffix = path.suffix.lower() if isinstance(path, Path) else ""
        return ImageCheck(path, True, EXTENSIONS.get(fmt, suffix or ".img"), "")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return ImageCheck(path, False, "", f"decompression bomb ({e})")
    except Exception as e:  # any decoder failure: the image is skipped, never the stage
        return ImageCheck(path, False, "", f"cannot be decoded ({type(e).__name__}: {e})")


def check_images(paths: list[Path | Callable[[], bytes]], max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 progress: bool = True) -> list[ImageCheck]:
    """Check every image (a path, or a function returning the file's bytes), in threads (PIL releases
    the GIL while decoding); results in input order."""
    if not paths:
        return []
    with _pixel_limit(max_pixels), ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        # catch_warnings is process-global state, so the worker threads see the "error" filter too.
        return list(tqdm(pool.map(lambda p: _check(p, max_pixels), paths), total=len(paths), desc="check images",
                         unit="image", disable=not progress))
