"""What can the self-improving teacher learn from its own rationales on one skill?

The self-improving teacher (``loop.self_improve``) learns, STaR-like, the sampled
rationales (CQM-LEA) that reach its verified answers. That can only lift a skill where
some of its rationales reach the answer for the right reason. This draws N fresh
instances of one skill of the built-in task (labels and gold solutions exact), has the
teacher answer each greedily and k times sampled, as the loop does, and counts: answers
right; rationales that contain the gold solution word for word (the right reading);
right answers whose reasoning argues for another option (``names_other_option``, which
the loop does not learn from); the instances where the teacher is unsure (some but not
all k right), whose first kept rationale the loop would learn. One row per teacher
(the shipped one, or ``builtin:teacher`` with the adapters given).

    python benchmarks/teacher_rationales.py --skill spatial --n 200
    python benchmarks/teacher_rationales.py --skill spatial --adapters RUN/iter_1/teacher_adapter
"""

from __future__ import annotations

import argparse
import collections
import random
import sys


def measure(loaded, insts, images, *, k: int, temperature: float, batch_size: int
            ) -> tuple[collections.Counter, dict]:
    """The counts, and the greedy answers' letters (index: count; None: unparsed)."""
    from mmdc.generation import Request
    from mmdc.prompts import build_prompt, parse_answer
    from mmdc.stages.improve import reaches

    prompts = [Request(build_prompt(i, "CQM-LEA"), im) for i, im in zip(insts, images)]
    greedy = loaded.generate(prompts, max_new_tokens=128, batch_size=batch_size,
                             progress=False)
    sampled = loaded.generate([p for p in prompts for _ in range(k)], max_new_tokens=128,
                              batch_size=batch_size, do_sample=True,
                              temperature=temperature, seed=0, progress=False)
    c = collections.Counter()
    answers = collections.Counter()
    for j, (inst, g) in enumerate(zip(insts, greedy)):
        choice = parse_answer(g, len(inst.choices))
        answers[choice] += 1
        c["greedy right"] += choice == inst.answer
        c["greedy reads right"] += inst.solution in g
        texts = sampled[j * k:(j + 1) * k]
        right = [t for t in texts if parse_answer(t, len(inst.choices)) == inst.answer]
        kept = [t for t in right if reaches(t, inst)]
        c["sampled right"] += len(right)
        c["sampled reads right"] += sum(inst.solution in t for t in texts)
        c["right, argues for another"] += len(right) - len(kept)
        c["right, reads right"] += sum(inst.solution in t for t in right)
        if 0 < len(kept) < k:
            c["unsure"] += 1
            c["kept reads right"] += inst.solution in kept[0]
    return c, dict(sorted(answers.items(), key=str))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skill", default="spatial")
    ap.add_argument("--n", type=int, default=200, help="fresh instances of the skill")
    ap.add_argument("--k", type=int, default=5, help="sampled rationales per instance")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--teacher", default="builtin:teacher")
    ap.add_argument("--adapters", nargs="*", default=[],
                    help="teacher adapters (a run's iter_K/teacher_adapter) to measure too")
    args = ap.parse_args()
    from mmdc.models.load import load_model
    from mmdc.toy import world

    if args.skill not in world.SKILLS:
        ap.error(f"--skill: one of {', '.join(world.SKILLS)}")
    rng = random.Random(f"teacher-rationales-{args.skill}")
    insts = [world.make_instance(args.skill, rng, f"r{i}", "fresh") for i in range(args.n)]
    images = [world.draw_scene(i.meta["scene"]) if i.meta.get("scene") else None
              for i in insts]
    rows = []
    for adapter in [None, *args.adapters]:
        loaded = load_model(args.teacher, adapter=adapter, device="cpu")
        rows.append((adapter or args.teacher, *measure(
            loaded, insts, images, k=args.k, temperature=args.temperature,
            batch_size=args.batch_size)))
        del loaded
    n, s = args.n, args.n * args.k
    print(f"Teacher rationales (CQM-LEA) on {n} fresh {args.skill} instances: greedy, and "
          f"{args.k} sampled at temperature {args.temperature:g} each ({s} in all)\n")
    print("| teacher | greedy right | greedy reads right | sampled right | sampled reads right "
          "| right, argues for another | right, reads right | unsure | kept reads right "
          "| greedy answers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, c, answers in rows:
        print(f"| {name} | {c['greedy right']} / {n} | {c['greedy reads right']} "
              f"| {c['sampled right']} / {s} | {c['sampled reads right']} | "
              f"{c['right, argues for another']} | {c['right, reads right']} | "
              f"{c['unsure']} | {c['kept reads right']} | {answers} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
