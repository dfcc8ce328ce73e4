"""What a run folder holds: every artifact's name in one place, and the schema of the
generation reports, so the steps that write them and whatever reads them (the report,
the toy diagnostics, a resume) agree.

    RUN_DIR/
      config.yaml  state.json  journal.jsonl  report.md  report.json  tensorboard/
      baseline/metrics.json
      align/<role>/adapter/  align/<role>/metrics.json
      iter_<k>/  assessment.jsonl  assessment_summary.json  student_probe_answers.jsonl
                 teacher_probe_answers.jsonl  teacher_self_assessment.jsonl
                 generated_accepted.jsonl  generated_rejected.jsonl  generation_report.json
                 teacher_generated_accepted.jsonl  teacher_generated_rejected.jsonl
                 teacher_generation_report.json  teacher_adapter/  teacher_update.json
                 teacher_answers.jsonl  student_adapter/  imitate.json  metrics.json
                 {teacher,student}_test_{samples.jsonl,metrics.json,result.json}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CONFIG = "config.yaml"
STATE = "state.json"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
METRICS = "metrics.json"
# one calibration iteration (iter_<k>/)
ASSESSMENT = "assessment.jsonl"
ASSESSMENT_SUMMARY = "assessment_summary.json"
STUDENT_PROBE_ANSWERS = "student_probe_answers.jsonl"
TEACHER_PROBE_ANSWERS = "teacher_probe_answers.jsonl"
TEACHER_SELF_ASSESSMENT = "teacher_self_assessment.jsonl"
GENERATED_ACCEPTED = "generated_accepted.jsonl"
GENERATED_REJECTED = "generated_rejected.jsonl"
GENERATION_REPORT = "generation_report.json"
TEACHER_GENERATED_ACCEPTED = "teacher_generated_accepted.jsonl"
TEACHER_GENERATED_REJECTED = "teacher_generated_rejected.jsonl"
TEACHER_GENERATION_REPORT = "teacher_generation_report.json"
TEACHER_UPDATE = "teacher_update.json"
TEACHER_ANSWERS = "teacher_answers.jsonl"
IMITATE = "imitate.json"
TEACHER_ADAPTER = "teacher_adapter"  # folders: a PEFT adapter each
STUDENT_ADAPTER = "student_adapter"
TEST_RESULTS = "{role}_test_*"  # the held-out test's samples, metrics and result per role

# why a written instance was not kept, in the order the filters run
DROP_REASONS = ("malformed", "duplicate", "unverified", "not_challenging", "over_budget")


def iter_dir(run_dir: str | Path, k: int) -> Path:
    """The folder of calibration iteration ``k`` (1-based)."""
    return Path(run_dir) / f"iter_{k}"


@dataclass
class GenerationReport:
    asked: int = 0
    accepted: int = 0
    dropped: Counter = field(default_factory=Counter)
    per_skill: dict = field(default_factory=dict)

    def merge(self, other: GenerationReport) -> None:
        """Add another round's counts (a refill of the same iteration)."""
        self.asked += other.asked
        self.accepted += other.accepted
        self.dropped.update(other.dropped)
        for skill, counts in other.per_skill.items():
            self.per_skill.setdefault(skill, Counter()).update(counts)

    def count(self, skill: str, outcome: str) -> None:
        self.per_skill.setdefault(skill or "(unknown)", Counter())[outcome] += 1

    def to_dict(self) -> dict:
        return {"asked": self.asked, "accepted": self.accepted,
                "dropped": {r: self.dropped.get(r, 0) for r in DROP_REASONS},
                "per_skill": {k: dict(v) for k, v in sorted(self.per_skill.items())}}
