"""Compare two run folders' artifacts byte for byte: every JSON and JSONL file (the step
outputs, metrics, reports), with each folder's own path replaced by a placeholder, the
run record (state.json), caches and TensorBoard logs left out. Used to check that a
change of code keeps ``mmdc run`` exactly as it was.

    python scripts/compare_runs.py RUN_BEFORE RUN_AFTER    # exit 1 when any file differs
"""

from __future__ import annotations

import sys
from pathlib import Path

SKIP = ("cache", "tensorboard")
UNRECORDED = ("state.json", "adapter_config.json")


def artifacts(run: Path) -> list[Path]:
    return sorted(p.relative_to(run) for p in run.rglob("*.json*")
                  if p.suffix in (".json", ".jsonl") and p.name not in UNRECORDED
                  and not any(part in SKIP for part in p.relative_to(run).parts))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    a, b = (Path(x) for x in argv)
    names_a, names_b = artifacts(a), artifacts(b)
    differ = [str(n) for n in sorted(set(names_a) ^ set(names_b))]
    for name in sorted(set(names_a) & set(names_b)):
        text_a = (a / name).read_text().replace(str(a), "RUN_DIR")
        text_b = (b / name).read_text().replace(str(b), "RUN_DIR")
        if text_a != text_b:
            differ.append(str(name))
    for name in differ:
        print(f"differs: {name}")
    print(f"{len(set(names_a) | set(names_b))} files compared, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
