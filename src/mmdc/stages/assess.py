"""``assess``: where does the student fall short of the teacher?

Referees share one interface: given the probe instances with teacher and student answers,
return one verdict per instance (``hard``: the student falls short; ``easy``; or
``dropped`` with a reason when the instance cannot be judged). Ground truth is never used:
generated instances have none.

* :class:`AnswerAgreement` (multiple choice): hard when the student's letter differs from
  the teacher's; an unparsable teacher answer is dropped, an unparsable student answer is
  hard.
* :class:`LikelihoodHardness`: hard when the student's mean per-token probability of the
  teacher's answer is below a threshold.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from mmdc.data.record import Instance
from mmdc.generation import chat_text


@dataclass
class Verdict:
    id: str
    hard: bool | None  # None: dropped
    reason: str = ""
    score: float | None = None


class AnswerAgreement:
    name = "agreement"

    def judge(self, instances: list[Instance], teacher: list[dict], student: list[dict],
              **_) -> list[Verdict]:
        out = []
        for inst, t, s in zip(instances, teacher, student, strict=True):
            if t["choice"] is None:
                out.append(Verdict(inst.id, None, "teacher answer unparsable"))
            elif s["choice"] is None:
                out.append(Verdict(inst.id, True, "student answer unparsable", 0.0))
            else:
                agree = s["choice"] == t["choice"]
                out.append(Verdict(inst.id, not agree, "" if agree else "disagrees",
                                   float(agree)))
        return out


@torch.no_grad()
def answer_logprobs(model, processor, prompts: list[str], images: list, answers: list[str],
                    batch_size: int = 16) -> list[float]:
    """Mean log-probability per answer token of ``answers`` under ``model``."""
    tok = processor.tokenizer
    device = next(model.parameters()).device
    result = []
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))
        for i in chunk:  # one at a time keeps image/no-image handling simple and exact
            text = chat_text(processor, prompts[i], images[i] is not None)
            enc = processor(text=[text], images=[images[i]] if images[i] is not None else None,
                            add_special_tokens=False, return_tensors="pt")
            target = tok(" " + answers[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.cat([enc["input_ids"], torch.tensor([target])], dim=1).to(device)
            kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if "pixel_values" in enc:
                kwargs["pixel_values"] = enc["pixel_values"].to(device, next(model.parameters()).dtype)
            logits = model(**kwargs).logits[0, -len(target) - 1:-1].float()
            logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(target, device=device)[:, None])
            result.append(logp.mean().item())
    return result


class LikelihoodHardness:
    name = "likelihood"

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def judge(self, instances: list[Instance], teacher: list[dict], student: list[dict], *,
              student_model=None, processor=None, images=None, **_) -> list[Verdict]:
        keep = [n for n, t in enumerate(teacher) if t["choice"] is not None]
        logps = answer_logprobs(student_model, processor, [teacher[n]["prompt"] for n in keep],
                                [images[n] for n in keep], [teacher[n]["output"] for n in keep])
        scores = dict(zip(keep, logps))
        out = []
        for n, inst in enumerate(instances):
            if n not in scores:
                out.append(Verdict(inst.id, None, "teacher answer unparsable"))
                continue
            p = math.exp(scores[n])
            out.append(Verdict(inst.id, p < self.threshold, f"p={p:.3f}", p))
        return out


def summarize(instances: list[Instance], verdicts: list[Verdict]) -> dict:
    """Hard/easy/dropped counts, overall and per skill."""
    per_skill: dict[str, Counter] = {}
    for inst, v in zip(instances, verdicts, strict=True):
        key = "dropped" if v.hard is None else ("hard" if v.hard else "easy")
        per_skill.setdefault(inst.skill or "(none)", Counter())[key] += 1
    total = sum(per_skill.values(), Counter())
    return {"total": dict(total), "per_skill": {k: dict(v) for k, v in sorted(per_skill.items())}}
