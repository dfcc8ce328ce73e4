"""``imitate``: the teacher answers the instruction pool; the student learns its answers.

Teacher answers (CQM-LEA: lecture, solution, "The answer is X.") are generated once and
cached as JSONL, so the teacher never has to be in memory while the student trains.
Sequence-level distillation: the student is fine-tuned (LoRA, TRL ``SFTTrainer``) on the
teacher's parsed answers; answers that do not parse are dropped and counted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmdc.answering import ask
from mmdc.data.pool import read_jsonl, write_jsonl
from mmdc.data.record import LETTERS, Instance

log = logging.getLogger(__name__)


def answer_pool(generator, instances: list[Instance], images: list, *,
                fmt: str = "CQM-LEA", batch_size: int = 32, max_new_tokens: int = 64,
                desc: str = "answer") -> list[dict]:
    """Answer every instance; rows with id, prompt, output and the parsed choice.
    ``generator`` is any backend (:mod:`mmdc.models.backends`)."""
    prompts, outputs, choices = ask(generator, instances, images, fmt,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    desc=desc)
    rows = []
    for inst, prompt, out, choice in zip(instances, prompts, outputs, choices):
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
    from mmdc import distributed

    rows = compute()
    if distributed.is_main():  # under several processes every rank holds the same rows
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


def imitation_rows(instances: list[Instance], answers: list[dict], images: list,
                   formats: list[str], repeat: set[str] = frozenset(), times: int = 1
                   ) -> tuple[list[dict], int]:
    """SFT rows for the student: each instance with a parsable teacher answer, once per
    format: CQM-LEA with the teacher's whole answer, CQM-A with the teacher's letter.
    The rows of instances whose id is in ``repeat`` come ``times`` times in all (the
    extra copies after the rest). Returns the rows and how many instances were dropped
    as unparsable."""
    from mmdc.training import sft_rows

    kept, targets, dropped = imitation_targets(instances, answers)
    by_id = {a["id"]: a for a in answers}
    image_of = {i.id: img for i, img in zip(instances, images, strict=True)}
    imgs = [image_of[i.id] for i in kept]
    blocks = []
    for fmt in formats:
        if fmt == "CQM-LEA":
            blocks.append(sft_rows(kept, imgs, "CQM-LEA", targets))
        else:
            blocks.append(sft_rows(kept, imgs, fmt,
                                   [LETTERS[by_id[i.id]["choice"]] for i in kept]))
    rows = [row for block in blocks for row in block]
    again = [row for block in blocks for inst, row in zip(kept, block) if inst.id in repeat]
    return rows + again * (times - 1), dropped


def kd_beta(kind: str, beta: float) -> float:
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, beta)


def check_kd_compatible(teacher_path: str, student_path: str) -> None:
    """Token-level KD compares the two models' next-token distributions position by
    position: they must share a vocabulary. Raises ConfigError otherwise."""
    from mmdc.errors import ConfigError
    from mmdc.models.load import vocab_report

    rep = vocab_report(teacher_path, student_path)
    if not rep["shared_vocabulary"]:
        raise ConfigError(
            f"imitate.kd needs teacher and student to share a vocabulary, but the teacher "
            f"({teacher_path}) has {rep['teacher_vocab_size']} tokens and the student "
            f"({student_path}) {rep['student_vocab_size']} with different ids; set imitate.kd=none "
            f"(sequence-level distillation only)")


def kd_trainer_class():
    """An SFTTrainer whose loss is (1-w) CE + w token-level generalised JSD against a frozen
    teacher, both summed over target tokens and divided by the number of target tokens in
    the gradient-accumulation window."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    from mmdc.losses import generalized_jsd

    class KDTrainer(SFTTrainer):
        def __init__(self, *args, teacher_model=None, beta=0.5, temperature=1.0, weight=0.5,
                     **kwargs):
            super().__init__(*args, **kwargs)
            teacher_model.eval()
            # the frozen teacher goes where the student's ranks are: a DeepSpeed inference
            # engine under ZeRO (sharded like the student under ZeRO-3), else accelerate's
            # evaluation-mode preparation (device placement, FSDP wrapping)
            if self.is_deepspeed_enabled:
                from trl.models import prepare_deepspeed

                self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
            else:
                self.teacher_model = self.accelerator.prepare_model(teacher_model,
                                                                    evaluation_mode=True)
            self.kd_beta, self.kd_temperature, self.kd_weight = beta, temperature, weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            fwd = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask",
                                                            "pixel_values")}
            outputs = model(**fwd, use_cache=False)
            with torch.no_grad():
                t_logits = self.teacher_model(**fwd, use_cache=False).logits
            s_logits = outputs.logits[:, :-1]
            target = labels[:, 1:]
            mask = target != -100
            n = num_items_in_batch if num_items_in_batch is not None else mask.sum()
            ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]).float(),
                                 target.reshape(-1), ignore_index=-100, reduction="sum")
            kd = generalized_jsd(s_logits, t_logits[:, :-1], mask, beta=self.kd_beta,
                                 temperature=self.kd_temperature)
            loss = ((1 - self.kd_weight) * ce + self.kd_weight * kd) / n
            return (loss, outputs) if return_outputs else loss

    return KDTrainer
