"""Asking a model about instances: prompt each in a format, generate, parse the answer.

The one path every step takes from an instance to a parsed choice (evaluation, the
assessment's and the teacher's answers, the teacher's verification votes, the challenge
filter), so that a format or a parser changes in one place.
"""

from __future__ import annotations

from mmdc.data.prompts import build_prompt, parse_answer
from mmdc.data.record import Instance
from mmdc.generation import Request


def ask(generator, instances: list[Instance], images: list, fmt: str, *, repeat: int = 1,
        **generate_kwargs) -> tuple[list[str], list[str], list[int | None]]:
    """Prompt every instance in ``fmt`` (``repeat`` times in a row, for sampled votes) with
    its image, generate with ``generator`` (any backend), and parse each output. Returns
    the prompts (one per instance), the outputs and their parsed choices (one per
    request; None where an output names no option)."""
    prompts = [build_prompt(i, fmt) for i in instances]
    requests = [Request(p, img) for p, img in zip(prompts, images, strict=True)
                for _ in range(repeat)]
    outputs = generator.generate(requests, **generate_kwargs)
    sizes = [len(i.choices) for i in instances for _ in range(repeat)]
    return prompts, outputs, [parse_answer(o, n) for o, n in zip(outputs, sizes)]
