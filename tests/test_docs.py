"""The manual, README.md and docs/*.md: every relative link resolves, the README stays a front door that links every
page, and every command block a user would run is either run by a test or marked as an example."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.conftest import REPO, doc_files, doc_section, markdown_headings, readme_blocks

README_MAX_LINES = 200
RUNNABLE = {"bash", "sh", "shell", "console"}  # fences whose contents a reader would paste into a shell
EXAMPLE = "<!-- example -->"  # on the line right before such a fence: no test runs it
SKIPPED_SCHEMES = ("http://", "https://", "mailto:")  # no network in the tests


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text: lowercase, punctuation other than '-' and '_' dropped (Markdown's
    backticks and emphasis included), each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, level, line in markdown_headings(path.read_text().splitlines()):
        slug = github_slug(line[level:].strip().rstrip("#").strip())
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def _prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks, inline code spans blanked."""
    lines = text.splitlines()
    inside = {i for start, end in _fences(lines) for i in range(start, end + 1)}
    return [(i + 1, re.sub(r"`+[^`]*`+", "``", line)) for i, line in enumerate(lines) if i not in inside]


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link or image ``[text](target)`` and reference definition
    ``[name]: target`` in a Markdown file, outside code."""
    found = []
    for number, line in _prose(path.read_text()):
        found += [(number, m.group(1)) for m in re.finditer(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)", line)]
        found += [(number, m.group(1)) for m in re.finditer(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", line)]
    return found


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: target (why)`` for each relative link in ``path`` that does not resolve: to a file or folder
    inside ``root``, and, for an anchor into a Markdown file, to one of its headings."""
    broken = []
    for number, target in links(path):
        if target.startswith(SKIPPED_SCHEMES):
            continue
        part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(part)).resolve() if part else path
        why = ""
        if not dest.is_relative_to(root.resolve()):
            why = "outside the repository"
        elif not dest.exists():
            why = "no such file or folder"
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            why = f"no heading with the anchor #{anchor} in {dest.name}"
        if why:
            broken.append(f"{path.name}:{number}: {target} ({why})")
    return broken


def pages_not_linked(readme: Path, pages: list[Path]) -> list[str]:
    """The pages among ``pages`` that no link in ``readme`` points to (anchors and all)."""
    linked = {(readme.parent / unquote(t.partition("#")[0])).resolve() for _, t in links(readme)
              if not t.startswith(SKIPPED_SCHEMES) and t.partition("#")[0]}
    return [page.name for page in pages if page.resolve() not in linked]


def _fences(lines: list[str]) -> list[tuple[int, int]]:
    """(opening line index, closing line index) of each fenced code block (an unclosed one runs to the end)."""
    fences, opened, fence = [], 0, ""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if fence:
            if re.fullmatch(rf"{re.escape(fence[0])}{{{len(fence)},}}", stripped):
                fences.append((opened, i))
                fence = ""
        elif opening := re.match(r"`{3,}|~{3,}", stripped):
            opened, fence = i, opening.group(0)
    if fence:
        fences.append((opened, len(lines) - 1))
    return fences


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # index of the opening fence's line
    language: str  # the fence's first word: ```bash -> bash
    body: str  # between the fences, newline-terminated (what readme_blocks returns)
    marked: bool  # <!-- example --> on the line right before the fence

    def __str__(self) -> str:
        shown = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{shown}:{self.line + 1} ({self.language})"


def code_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks = []
    for start, end in _fences(lines):
        words = lines[start].strip().lstrip("`~").split()
        body = "".join(f"{line}\n" for line in lines[start + 1:end])
        blocks.append(Block(path, start, words[0] if words else "", body,
                            start > 0 and lines[start - 1].strip() == EXAMPLE))
    return blocks


def readme_block_calls(test_files: list[Path]) -> list[tuple[str, str, int | None]]:
    """(heading, language, index or None for all) of each ``readme_blocks("<heading>", "<language>")[index]`` call
    in the test files."""
    call = re.compile(r"readme_blocks\(\s*\"([^\"]+)\"\s*,\s*\"([^\"]+)\"\s*\)(?:\[(-?\d+)\])?")
    return [(m.group(1), m.group(2), None if m.group(3) is None else int(m.group(3)))
            for path in test_files for m in call.finditer(path.read_text())]


def executed_blocks(calls: list[tuple[str, str, int | None]]) -> set[tuple[Path, int]]:
    """(file, fence line) of each block a test runs: the block of the call's language, at the call's index, in the
    section that ``readme_blocks`` reads (checked to be the very text it returns)."""
    executed = set()
    for heading, language, index in calls:
        section = doc_section(heading)
        blocks = [b for b in code_blocks(section.path)
                  if section.start < b.line < section.end and b.language == language]
        assert [b.body for b in blocks] == readme_blocks(heading, language), f"{heading}: blocks parsed differently"
        if index is not None:
            assert -len(blocks) <= index < len(blocks), f"{heading!r} has no {language} block [{index}]"
        executed |= {(b.path, b.line) for b in (blocks if index is None else [blocks[index]])}
    return executed


def unmarked_blocks(blocks: list[Block], executed: set[tuple[Path, int]]) -> list[str]:
    """Runnable blocks that no test runs and that are not marked as an example, and run ones marked as examples."""
    wrong = []
    for block in blocks:
        if block.language not in RUNNABLE:
            continue
        run = (block.path, block.line) in executed
        if not run and not block.marked:
            wrong.append(f"{block}: no test runs it; mark it with {EXAMPLE} on the line before the fence")
        elif run and block.marked:
            wrong.append(f"{block}: a test runs it, yet it is marked {EXAMPLE}")
    return wrong


def _tests_that_run_blocks() -> list[Path]:
    return [p for p in sorted((REPO / "tests").glob("*.py")) if p.name != Path(__file__).name]


# ------------------------------------------------------------------------------------------------- the manual


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = [b for path in doc_files() for b in broken_links(path)]
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_door_that_links_every_docs_page():
    readme, pages = doc_files()[0], doc_files()[1:]
    assert pages, "no docs/*.md pages"
    lines = len(readme.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to a docs/ page"
    assert not pages_not_linked(readme, pages), f"pages the README does not link: {pages_not_linked(readme, pages)}"
    for page in pages:
        first, *rest = page.read_text().splitlines()
        assert first.startswith("# "), f"{page.name} starts with {first!r}, not a '# Title'"
        assert any("(../README.md" in line for line in rest[:4]), f"{page.name}: no link back to the README on top"


def test_every_command_block_is_run_by_a_test_or_marked_as_an_example():
    calls = readme_block_calls(_tests_that_run_blocks())
    assert ("## Use your own images", "bash", 0) in calls  # the scan finds the calls it is about
    executed = executed_blocks(calls)
    assert executed
    wrong = unmarked_blocks([b for path in doc_files() for b in code_blocks(path)], executed)
    assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------------------------------ the checks can fail


def test_github_slugs():
    assert github_slug("What each mode does with the shipped params") == "what-each-mode-does-with-the-shipped-params"
    assert github_slug("What gets rejected, and where to see it") == "what-gets-rejected-and-where-to-see-it"
    assert github_slug("`kennel compare`: runs_side by-side!") == "kennel-compare-runs_side-by-side"
    assert github_slug("Data: sources, rejects") == "data-sources-rejects"


def test_broken_links_are_reported(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("# B\n\n## Real heading\n\n```bash\n# not a heading\n```\n\n## Real heading\n")
    (tmp_path / "sub/a.md").write_text(
        "# A\n\n## Here\n\n"
        "[ok](../b.md#real-heading) [dup](../b.md#real-heading-1) [folder](../sub) [self](#here)\n"
        "[web](https://example.invalid/x) ![img](../b.md)\n"
        "[missing](../nope.md) [bad anchor](../b.md#not-a-heading) [code anchor](../b.md#not-a-heading-1)\n"
        "[self bad](#nowhere) [out](../../../../../etc/passwd)\n"
        "`[in code](nope.md)`\n\n```bash\n[in a block](nope.md)\n```\n\n[ref]: ../gone.md\n")
    broken = broken_links(tmp_path / "sub/a.md", root=tmp_path)
    assert [b.split(": ", 1)[1].split(" (")[0] for b in broken] == [
        "../nope.md", "../b.md#not-a-heading", "../b.md#not-a-heading-1", "#nowhere", "../../../../../etc/passwd",
        "../gone.md"]
    assert broken[0] == "a.md:7: ../nope.md (no such file or folder)"
    assert "outside the repository" in broken[4]


def test_a_docs_page_the_readme_does_not_link_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    pages = [tmp_path / "docs/linked.md", tmp_path / "docs/orphan.md"]
    for page in pages:
        page.write_text("# Page\n\n[← README](../README.md)\n")
    (tmp_path / "README.md").write_text("# R\n\n[linked](docs/linked.md#page)\n`[orphan](docs/orphan.md)`\n")
    assert pages_not_linked(tmp_path / "README.md", pages) == ["orphan.md"]


def test_unmarked_and_wrongly_marked_command_blocks_are_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# P\n\n```bash\nrun me\n```\n\n<!-- example -->\n```sh\nexample\n```\n\n"
                    "```console\nrun by a test\n```\n\n<!-- example -->\n```bash\nrun, yet marked\n```\n\n"
                    "```yaml\na: 1\n```\n\n  ```bash\n  indented\n  ```\n")
    blocks = code_blocks(page)
    assert [(b.line, b.language, b.marked) for b in blocks] == [
        (2, "bash", False), (7, "sh", True), (11, "console", False), (16, "bash", True), (20, "yaml", False),
        (24, "bash", False)]
    wrong = unmarked_blocks(blocks, {(page, 11), (page, 16)})
    assert [w.split(": ", 1)[0] for w in wrong] == [f"{page}:3 (bash)", f"{page}:17 (bash)", f"{page}:25 (bash)"]
    assert "no test runs it" in wrong[0] and "yet it is marked" in wrong[1]


def test_the_scan_finds_readme_blocks_calls(tmp_path):
    test = tmp_path / "test_x.py"
    test.write_text('a = readme_blocks("## Use your own images", "yaml")[0]\n'
                    'b = readme_blocks(\n    "## Team setup", "bash")[1]\n'
                    'c = readme_blocks("## Reproduce a run", "bash")\n'
                    "def readme_blocks(heading, language): ...\n")
    assert readme_block_calls([test]) == [("## Use your own images", "yaml", 0), ("## Team setup", "bash", 1),
                                          ("## Reproduce a run", "bash", None)]


def test_a_section_is_found_in_one_file_only_and_ends_at_a_heading_of_its_level_or_higher(tmp_path):
    one, two = tmp_path / "README.md", tmp_path / "two.md"
    one.write_text("# T\n\n## A\n\n```bash\n# a comment, no heading\nx\n```\n\n### A.1\n\ny\n\n## B\n\n## Twice\n")
    two.write_text("# Two\n\n## Twice\n\n# Top\n")
    section = doc_section("## A", [one, two])
    assert (section.path, section.start, section.end) == (one, 2, 13)
    assert "# a comment" in section.text and "### A.1" in section.text and "## B" not in section.text
    assert doc_section("## Twice", [two]).text == "## Twice\n\n"  # ends at a higher level too
    with pytest.raises(AssertionError, match="no heading '## Missing' in"):
        doc_section("## Missing", [one, two])
    with pytest.raises(AssertionError, match=r"more than one place: .*README.md:16, .*two.md:3"):
        doc_section("## Twice", [one, two])
