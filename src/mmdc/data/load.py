"""Loading a configured dataset split, whatever its on-disk format.

``load_split(cfg.data, split)`` returns a :class:`Split`: the records and the root that
their image paths are relative to. The built-in synthetic task is written (once, by
:func:`mmdc.toy.task.prepare_data`, where a command loads its config) in the official
ScienceQA layout and read back here through the ScienceQA reader.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mmdc.data.images import MAX_IMAGE_PIXELS, ImageCache
from mmdc.data.pool import read_jsonl
from mmdc.data.record import Instance
from mmdc.data.scienceqa import read_scienceqa, read_scienceqa_hf
from mmdc.errors import DataError

log = logging.getLogger(__name__)

SYNTH_MARKER = "mmdc_synthetic.json"


@dataclass
class Split:
    name: str
    root: Path
    instances: list[Instance]
    _images: ImageCache | None = field(default=None, repr=False)
    max_pixels: int | None = MAX_IMAGE_PIXELS  # data.max_image_pixels

    def image(self, inst: Instance) -> Image.Image | None:
        if self._images is None:
            self._images = ImageCache(self.root, self.max_pixels)
        return self._images(inst.image, f"{self.root} (id {inst.id!r})")

    def load_images(self) -> None:
        """Load every image now, so a bad one is reported before any work starts."""
        for inst in self.instances:
            self.image(inst)


def load_split_collective(data_cfg, split: str, cache_dir: str | Path | None = None) -> Split:
    """:func:`load_split` called by every rank together: rank 0 loads first (writing the
    synthetic task or the image cache once) while the others wait."""
    from mmdc import distributed

    return distributed.main_first(lambda: load_split(data_cfg, split, cache_dir))


def load_split(data_cfg, split: str, cache_dir: str | Path | None = None) -> Split:
    loaded = _read_split(data_cfg, split, cache_dir)
    loaded.max_pixels = data_cfg.max_image_pixels
    return loaded


def _read_split(data_cfg, split: str, cache_dir: str | Path | None) -> Split:
    fmt = data_cfg.format
    root = Path(data_cfg.root)
    if fmt == "synthetic":
        if not (root / SYNTH_MARKER).is_file():
            raise DataError(f"{root}: the synthetic task is not written here yet (data.root); "
                            f"mmdc run / eval / align write it, or: mmdc data synth --out {root}")
        return Split(split, root, read_scienceqa(root, split))
    if fmt == "scienceqa":
        return Split(split, root, read_scienceqa(root, split))
    if fmt == "scienceqa_hf":
        key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
        image_dir = Path(cache_dir or Path.home() / ".cache" / "mmdc" / "images") / key
        return Split(split, image_dir, read_scienceqa_hf(root, split, image_dir,
                                                         data_cfg.max_image_pixels))
    if fmt == "llava":
        from mmdc.data.llava import read_llava_json

        image_root = Path(data_cfg.image_root) if data_cfg.image_root else root.parent
        return Split(split, image_root, read_llava_json(root, image_root))
    raise DataError(f"unknown data.format {fmt!r}")  # pragma: no cover - config validates


def read_image_pool(root: str | Path, name: str = "pool") -> list[dict]:
    """The unlabelled image pool: rows with ``id`` and ``image`` (relative to root)."""
    path = Path(root) / f"{name}.jsonl"
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "id" not in row or "image" not in row:
            raise DataError(f"{path}, line {n}: a pool row needs 'id' and 'image'")
    return rows
