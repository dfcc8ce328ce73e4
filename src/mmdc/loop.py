"""What the calibration loop's steps share: the :class:`Loop` (config, run folder and
state, data, and where the loop stands: the current adapters and the generated pool)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmdc import artifacts
from mmdc.config import Config
from mmdc.data.images import ImageCache
from mmdc.data.record import Instance
from mmdc.journal import journaled
from mmdc.roles import student_model, teacher_backend
from mmdc.runstate import RunState


@dataclass
class Loop:
    """What the steps of one run share: the config, the run folder and its state, the
    data, and where the loop stands (the current adapters and the generated pool)."""

    cfg: Config
    run_dir: Path
    state: RunState
    main: bool
    seed_split: object
    probe: object
    test: object
    images: ImageCache
    pool_images: list[str]
    labelled: list[Instance]
    adapter: str | None = None  # the student's current adapter
    teacher_adapter: str | None = None
    generated: list[Instance] = field(default_factory=list)
    used_images: set[str] = field(default_factory=set)
    image_vectors: dict = field(default_factory=dict)  # image path -> vision-tower vector

    @property
    def pool(self) -> list[Instance]:
        """The instruction pool: the seed split and every accepted instance so far."""
        return self.labelled + self.generated

    def it(self, k: int) -> Path:
        return artifacts.iter_dir(self.run_dir, k)

    def teacher(self, step: str, who: str = "teacher"):
        return journaled(teacher_backend(self.cfg, self.teacher_adapter, self.run_dir),
                         self.run_dir, step, who)

    def student(self, step: str, adapter: str | None = ...):
        return journaled(student_model(self.cfg, self.adapter if adapter is ... else adapter),
                         self.run_dir, step, "student")


def images_of(loop: Loop, instances: list[Instance]) -> list:
    return [loop.images(i.image) for i in instances]
