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
import re
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
def answer_logprobs(model, processor, prompts: list[str], images: list, answers: list[str]
                    ) -> list[float]:
    """Mean log-probability per answer token of ``answers`` under ``model`` (one forward
    pass per instance, so image and text-only instances need no special batching)."""
    tok = processor.tokenizer
    param = next(model.parameters())
    result = []
    for prompt, image, answer in zip(prompts, images, answers, strict=True):
        text = chat_text(processor, prompt, image is not None)
        enc = processor(text=[text], images=[image] if image is not None else None,
                        add_special_tokens=False, return_tensors="pt")
        target = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.cat([enc["input_ids"], torch.tensor([target])], dim=1).to(param.device)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "pixel_values" in enc:
            kwargs["pixel_values"] = enc["pixel_values"].to(param.device, param.dtype)
        logits = model(**kwargs).logits[0, -len(target) - 1:-1].float()
        targets = torch.tensor(target, device=param.device)[:, None]
        result.append(torch.log_softmax(logits, -1).gather(1, targets).mean().item())
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


# ------------------------------------------------------------------ judge referee

JUDGE_TEMPLATE = (
    "[Question]\n{question}\n\n[Assistant 1]\n{first}\n\n[Assistant 2]\n{second}\n\n"
    "Rate the helpfulness, relevance, accuracy and level of detail of the two answers. "
    "Output a line with two scores from 1 to 10, for Assistant 1 and 2, separated by a space, "
    "then explain."
)
_SCORES = re.compile(r"^\s*(10|[1-9](?:\.\d+)?)\s*[ ,]\s*(10|[1-9](?:\.\d+)?)\b")


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two 1-10 scores on the judge's first line (LLaVA-Bench / Lion layout)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = _SCORES.match(first)
    return (float(m.group(1)), float(m.group(2))) if m else None


class JudgeReferee:
    """A judge model scores two answers 1-10 in both orders; the two are averaged.

    Unparsable judgements are retried (sampling) ``retries`` times, then the pair is
    dropped and counted."""

    name = "judge"

    def __init__(self, judge, threshold: float = 1.0, retries: int = 2,
                 max_new_tokens: int = 64, batch_size: int = 16):
        self.judge_model = judge
        self.threshold = threshold
        self.retries = retries
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.unparsable = 0

    def _ask(self, prompts: list[str], images: list) -> list[tuple[float, float] | None]:
        from mmdc.generation import Request

        result: list[tuple[float, float] | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        for attempt in range(self.retries + 1):
            if not todo:
                break
            outs = self.judge_model.generate(
                [Request(prompts[i], images[i]) for i in todo],
                max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                do_sample=attempt > 0, temperature=0.7, seed=attempt, desc="judge",
                progress=False)
            for i, out in zip(todo, outs):
                result[i] = parse_scores(out)
            todo = [i for i in todo if result[i] is None]
        self.unparsable += len(todo)
        return result

    def score_pairs(self, questions: list[str], images: list, first: list[str],
                    second: list[str]) -> list[tuple[float, float] | None]:
        """Mean scores of (first, second) over both presentation orders, or None."""
        n = len(questions)
        prompts = [JUDGE_TEMPLATE.format(question=q, first=a, second=b)
                   for q, a, b in zip(questions, first, second)]
        prompts += [JUDGE_TEMPLATE.format(question=q, first=b, second=a)
                    for q, a, b in zip(questions, first, second)]
        scores = self._ask(prompts, list(images) + list(images))
        out = []
        for i in range(n):
            ab, ba = scores[i], scores[n + i]
            if ab is None or ba is None:
                out.append(None)
            else:
                out.append(((ab[0] + ba[1]) / 2, (ab[1] + ba[0]) / 2))
        return out

    def judge(self, instances: list[Instance], teacher: list[dict], student: list[dict], *,
              images=None, **_) -> list[Verdict]:
        images = images or [None] * len(instances)
        pairs = self.score_pairs([i.question for i in instances], images,
                                 [t["output"] for t in teacher], [s["output"] for s in student])
        out = []
        for inst, pair in zip(instances, pairs):
            if pair is None:
                out.append(Verdict(inst.id, None, "judge unparsable"))
            else:
                gap = pair[0] - pair[1]
                out.append(Verdict(inst.id, gap >= self.threshold, f"teacher {pair[0]:.1f} "
                                   f"student {pair[1]:.1f}", pair[1]))
        return out
