"""Resolving and loading images referenced by records, confined to their dataset root,
and no larger than ``data.max_image_pixels`` (a decompression bomb, a few KB on disk that
decode to gigabytes, is refused by its header before any pixel is decoded)."""

from __future__ import annotations

import threading
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmdc.errors import DataError

# The default of data.max_image_pixels (and of mmdc serve --max-image-pixels): 64
# megapixels, 8000 x 8000, far above any image a LLaVA processor uses (336 or 672 square)
MAX_IMAGE_PIXELS = 64_000_000
_OPEN = threading.Lock()  # PIL's own limit is lifted while a header is read, one at a time


def open_checked(source, where: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image (a path or a file object) by its header alone and refuse it, naming
    ``where`` and its size, when it has more than ``max_pixels`` pixels (None: no limit).
    PIL's global limit is not relied on: ours is checked first, with the size in words."""
    with _OPEN:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise DataError(f"{where}: image of {width} x {height} pixels ({width * height:,}) is "
                        f"over the limit of {max_pixels:,} (data.max_image_pixels)")
    return img


def resolve_image(root: str | Path, rel: str, where: str) -> Path:
    """The absolute path of ``rel`` under ``root``; an error if it escapes the root."""
    root = Path(root).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{where}: image path {rel!r} resolves outside the dataset root {root}")
    return path


def load_image(root: str | Path, rel: str, where: str,
               max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    path = resolve_image(root, rel, where)
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    try:
        with open_checked(path, f"{where}: {path}", max_pixels) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where}: unreadable image {path} ({exc.__class__.__name__})") from None


def check_images(root: str | Path, rels: list[str], where: str,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
    """Check that every image exists under ``root``, is a readable image (its header and,
    for PNG, its checksums; not decoded) and within ``max_pixels``, so a bad one is
    reported before any work starts."""
    for n, rel in enumerate(rels, 1):
        here = f"{where}, line {n}"
        path = resolve_image(root, rel, here)
        if not path.is_file():
            raise DataError(f"{here}: image file not found: {path}")
        try:
            with open_checked(path, f"{here}: {path}", max_pixels) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{here}: unreadable image {path} "
                            f"({exc.__class__.__name__})") from None


class ImageCache:
    """Loads each image under ``root`` once; ``cache(rel, where)`` -> PIL image or None."""

    def __init__(self, root: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS):
        self.root = Path(root)
        self.max_pixels = max_pixels
        self._images: dict[str, Image.Image] = {}

    def __call__(self, rel: str | None, where: str | None = None) -> Image.Image | None:
        if rel is None:
            return None
        if rel not in self._images:
            self._images[rel] = load_image(self.root, rel, where or f"{self.root} ({rel})",
                                           self.max_pixels)
        return self._images[rel]
