"""``imitate``: the teacher answers the instruction pool; the student learns its answers.

Teacher answers (CQM-LEA: lecture, solution, "The answer is X.") are generated once and
cached as JSONL, so the teacher never has to be in memory while the student trains.
Sequence-level distillation: the student is fine-tuned (LoRA, TRL ``SFTTrainer``) on the
teacher's parsed answers; answers that do not parse are dropped and counted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmdc.data.pool import read_jsonl, write_jsonl
from mmdc.data.record import LETTERS, Instance
from mmdc.generation import Request, generate
from mmdc.prompts import build_prompt, parse_answer

log = logging.getLogger(__name__)


def answer_pool(model, processor, instances: list[Instance], images: list, *,
                fmt: str = "CQM-LEA", batch_size: int = 32, max_new_tokens: int = 64,
                desc: str = "answer") -> list[dict]:
    """Answer every instance; rows with id, prompt, output and the parsed choice."""
    prompts = [build_prompt(i, fmt) for i in instances]
    outputs = generate(model, processor, [Request(p, img) for p, img in zip(prompts, images)],
                       max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    rows = []
    for inst, prompt, out in zip(instances, prompts, outputs):
        choice = parse_answer(out, len(inst.choices))
        rows.append({"id": inst.id, "prompt": prompt, "output": out, "choice": choice,
                     "letter": None if choice is None else LETTERS[choice]})
    return rows


def cached_answers(path: str | Path, instances: list[Instance], compute) -> list[dict]:
    """Reuse ``path`` when it answers exactly these instances; else compute and save."""
    path = Path(path)
    ids = [i.id for i in instances]
    if path.is_file():
        rows = read_jsonl(path)
        if [r.get("id") for r in rows] == ids:
            log.info("reusing cached answers %s", path)
            return rows
        log.warning("%s answers other instances: recomputing", path)
    rows = compute()
    write_jsonl(path, rows)
    return rows


def imitation_targets(instances: list[Instance], answers: list[dict]
                      ) -> tuple[list[Instance], list[str], int]:
    """Pair instances with the teacher's answers; drop (and count) unparsable ones."""
    by_id = {a["id"]: a for a in answers}
    kept, targets, dropped = [], [], 0
    for inst in instances:
        ans = by_id.get(inst.id)
        if ans is None or ans["choice"] is None:
            dropped += 1
            continue
        kept.append(inst)
        targets.append(ans["output"])
    return kept, targets, dropped
