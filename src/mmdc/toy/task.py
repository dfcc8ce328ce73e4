"""The built-in synthetic task on disk: written once into ``data.root`` in the official
ScienceQA layout, with an unlabelled image pool, and checked against the config that asks
for it (:data:`mmdc.data.load.SYNTH_MARKER`); :mod:`mmdc.data.load` reads it back as
ScienceQA.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmdc.data.load import SYNTH_MARKER
from mmdc.data.pool import write_json, write_jsonl
from mmdc.data.scienceqa import write_scienceqa
from mmdc.errors import DataError
from mmdc.toy import world

log = logging.getLogger(__name__)


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


def prepare_data(data_cfg) -> None:
    """Where a command has loaded its config: write the synthetic task when ``data.format``
    asks for it and ``data.root`` does not hold it yet (rank 0 first, the others wait)."""
    if data_cfg.format != "synthetic":
        return
    from mmdc import distributed

    distributed.main_first(lambda: ensure_synthetic(data_cfg.root, data_cfg.synth))
