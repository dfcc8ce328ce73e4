"""Resolving and loading images referenced by records, confined to their dataset root."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmdc.errors import DataError


def resolve_image(root: str | Path, rel: str, where: str) -> Path:
    """The absolute path of ``rel`` under ``root``; an error if it escapes the root."""
    root = Path(root).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{where}: image path {rel!r} resolves outside the dataset root {root}")
    return path


def load_image(root: str | Path, rel: str, where: str) -> Image.Image:
    path = resolve_image(root, rel, where)
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where}: unreadable image {path} ({exc.__class__.__name__})") from None


def check_images(root: str | Path, rels: list[str], where: str) -> None:
    """Check that every image exists under ``root`` and is a readable image (its header and,
    for PNG, its checksums; not decoded), so a bad one is reported before any work starts."""
    for n, rel in enumerate(rels, 1):
        here = f"{where}, line {n}"
        path = resolve_image(root, rel, here)
        if not path.is_file():
            raise DataError(f"{here}: image file not found: {path}")
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{here}: unreadable image {path} "
                            f"({exc.__class__.__name__})") from None


class ImageCache:
    """Loads each image under ``root`` once; ``cache(rel, where)`` -> PIL image or None."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._images: dict[str, Image.Image] = {}

    def __call__(self, rel: str | None, where: str | None = None) -> Image.Image | None:
        if rel is None:
            return None
        if rel not in self._images:
            self._images[rel] = load_image(self.root, rel, where or f"{self.root} ({rel})")
        return self._images[rel]
