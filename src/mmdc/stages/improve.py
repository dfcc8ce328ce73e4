"""The self-improving teacher (``loop.self_improve``): the teacher finds where its own
answers are unreliable, writes and verifies new instances there, and learns them with
rationales of its own that reach the verified answer (as STaR keeps the rationales that
reach the right answer).

1. Self-assessment, without labels: the teacher answers each probe twice, with the letter
   alone (CQM-A) and with a rationale (CQM-LEA). Where the two disagree, or the rationale
   reaches no answer, one of them is wrong: the teacher is unreliable there.
2. Generation: those probes seed new instances of the same kind, written, parsed and
   verified as the student's are (no challenge filter: here the teacher is the learner).
3. Rationales: the teacher samples k rationales for each verified instance, its own and
   the student-targeted ones of the iteration. A rationale reaches the verified label when
   its answer is that label and its reasoning does not argue for another option (names
   another option's text but not the label's: a right letter after a wrong reading
   teaches the teacher to answer apart from its reasoning). Where some but not all of
   them reach it, the teacher is unsure: the first that reaches it is kept to learn from
   (where all do, there is nothing to learn; where none does, no rationale to trust).
4. Update: LoRA on the kept rationales (CQM-LEA) and the verified letters of every
   instance (CQM-A), so that learning one format does not cost the other.
"""

from __future__ import annotations

from mmdc.data.record import LETTERS, Instance
from mmdc.generation import Request
from mmdc.prompts import build_prompt, names_other_option, parse_answer


def unreliable(instances: list[Instance], letters: list[dict], rationales: list[dict]
               ) -> list[dict]:
    """One row per probe: the teacher's letter (CQM-A) and its rationale's answer
    (CQM-LEA), and whether they disagree (``unreliable``)."""
    out = []
    for inst, a, r in zip(instances, letters, rationales, strict=True):
        out.append({"id": inst.id, "skill": inst.skill, "letter": a["choice"],
                    "rationale": r["choice"],
                    "unreliable": r["choice"] is None or a["choice"] != r["choice"]})
    return out


def reaches(text: str, inst: Instance) -> bool:
    """A rationale reaches the instance's (verified) answer: it answers that option and
    its reasoning does not argue for another (:func:`mmdc.prompts.names_other_option`)."""
    return (parse_answer(text, len(inst.choices)) == inst.answer
            and not names_other_option(text, inst.choices, inst.answer))


def sample_rationales(teacher, instances: list[Instance], images: list, *, k: int,
                      temperature: float, max_new_tokens: int, batch_size: int, seed: int,
                      desc: str) -> tuple[list[tuple[Instance, object, str]], dict]:
    """For each instance, k sampled rationales; where some but not all reach the
    instance's (verified) answer, the first that does is kept. Returns (instance, image,
    rationale) triples and counts (``reliable``: all k reached it; ``none``: none did)."""
    requests = [Request(build_prompt(i, "CQM-LEA"), img) for i, img in zip(instances, images)
                for _ in range(k)]
    texts = teacher.generate(requests, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             do_sample=temperature > 0, temperature=temperature, seed=seed,
                             desc=desc)
    kept, counts = [], {"instances": len(instances), "reliable": 0, "none": 0}
    for j, (inst, img) in enumerate(zip(instances, images)):
        right = [t for t in texts[j * k:(j + 1) * k] if reaches(t, inst)]
        if len(right) == k:
            counts["reliable"] += 1
        elif not right:
            counts["none"] += 1
        else:
            kept.append((inst, img, right[0]))
    counts["with_rationale"] = len(kept)
    return kept, counts


def update_rows(kept: list[tuple[Instance, object, str]], instances: list[Instance],
                images: list) -> list[dict]:
    """The teacher's update: the kept rationales (CQM-LEA) and the letters of every
    verified instance (CQM-A)."""
    from mmdc.stages.align import sft_rows

    return (sft_rows([i for i, _, _ in kept], [img for _, img, _ in kept], "CQM-LEA",
                     [t for _, _, t in kept])
            + sft_rows(instances, images, "CQM-A", [LETTERS[i.answer] for i in instances]))
