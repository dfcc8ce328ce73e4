"""The README's command list and its documentation index stay in step with the CLI and
the docs/ folder."""

import argparse
import re

from mmdc.cli import build_parser
from tests.conftest import ROOT


def _commands_of(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    """Every leaf command of the parser ("run", "data synth", ...)."""
    out = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands_of(sub, f"{prefix}{name} ")
                out |= nested or {f"{prefix}{name}"}
    return out


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_lists_every_command_and_no_other():
    cli = _commands_of(build_parser())
    listed = set()
    for line in _readme_section("Commands").splitlines():
        m = re.match(r"mmdc ((?:data|models) \S+|\S+)", line)
        if m:
            listed.add(m.group(1))
    assert listed == cli


def test_the_readme_indexes_every_page_of_docs_and_each_link_resolves():
    index = _readme_section("Documentation")
    linked = set(re.findall(r"\]\((docs/[^)]+)\)", index))
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    pages.add("docs/experiments/README.md")
    assert linked == pages
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    for page in (ROOT / "docs").rglob("*.md"):  # links between the docs pages resolve too
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page}: {target}"


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    first_screen = "\n".join(lines[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", "\n".join(lines))
    assert not hashes, f"commit hashes in the README: {hashes}"
