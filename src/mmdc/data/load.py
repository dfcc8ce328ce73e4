"""Loading a configured dataset split, whatever its on-disk format.

``load_split(cfg.data, split)`` returns a :class:`Split`: the records and the root that
their image paths are relative to. For the built-in synthetic task the data is written
(once) in the official ScienceQA layout and read back through the ScienceQA reader.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mmdc.data.images import MAX_IMAGE_PIXELS, ImageCache
from mmdc.data.pool import read_jsonl, write_json, write_jsonl
from mmdc.data.record import Instance
from mmdc.data.scienceqa import read_scienceqa, read_scienceqa_hf, write_scienceqa
from mmdc.errors import DataError
from mmdc.toy import world

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


def write_synthetic_task(out: str | Path, sizes: world.TaskSizes, seed: int = 0) -> Path:
    """Write the built-in synthetic task in the official ScienceQA layout plus an
    unlabelled image pool (``pool.jsonl`` and ``images/pool/<id>/image.png``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {name: world.generate_split(name, getattr(sizes, name), seed)
              for name in ("pretrain", "train", "val", "test") if getattr(sizes, name) > 0}
    write_scienceqa(out, splits)
    pool_rows = []
    for pid, scene, image in world.generate_pool(sizes.pool, seed):
        folder = out / "images" / "pool" / pid
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / "image.png")
        pool_rows.append({"id": pid, "image": f"images/pool/{pid}/image.png", "scene": scene})
    write_jsonl(out / "pool.jsonl", pool_rows)
    write_json(out / SYNTH_MARKER, _marker(seed, sizes))
    return out


def _marker(seed: int, sizes: world.TaskSizes) -> dict:
    return {"seed": seed, "sizes": sizes.__dict__, "pool": world.POOL_VERSION}


def ensure_synthetic(root: str | Path, synth_cfg) -> Path:
    """Write the synthetic task into ``root`` unless the same one is already there."""
    root = Path(root)
    sizes = world.TaskSizes(**{k: getattr(synth_cfg, k) for k in world.TaskSizes.__dataclass_fields__})
    want = _marker(synth_cfg.seed, sizes)
    marker = root / SYNTH_MARKER
    if marker.is_file():
        try:
            have = json.loads(marker.read_text())
        except json.JSONDecodeError:
            have = None
        if have == want:
            return root
        if isinstance(have, dict) and have.get("pool") != want["pool"]:
            raise DataError(f"{root}: holds the synthetic task as an earlier mmdc wrote it "
                            f"(its image pool is drawn differently now); delete the folder "
                            f"to have it written again, or choose another data.root")
        raise DataError(f"{root}: holds a synthetic task with other settings ({have}); "
                        f"choose another data.root or delete the folder")
    if (root / "problems.json").exists():
        raise DataError(f"{root}: has a problems.json that is not the synthetic task; "
                        f"set data.format or choose another data.root")
    log.info("writing the synthetic task to %s", root)
    return write_synthetic_task(root, sizes, synth_cfg.seed)


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
        ensure_synthetic(root, data_cfg.synth)
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
