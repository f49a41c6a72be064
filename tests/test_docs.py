"""The README and docs/ stay true to the repository: the set-up and test commands are what CI runs,
every relative link and image resolves (anchors included), and the README stays short."""
import re
import shlex

import pytest

from conftest import REPO
from infdit_core.__main__ import main as cli

README = REPO / "README.md"
PAGES = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
CI = (REPO / ".ci" / "run").read_text()
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_SRC = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"")


def prose(text):
    """Markdown without HTML comments, fenced blocks and inline code: what is rendered as links."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def commands(block):
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def ci_commands():
    """.ci/run's commands, one per line, with pip's -q dropped and `python -m pip` read as `pip`."""
    out = []
    for line in commands(CI):
        words = [w for w in shlex.split(line) if w != "-q"]
        if words[:3] == ["python", "-m", "pip"]:
            words = ["pip", *words[3:]]
        out.append(" ".join(words))
    return out


def readme_blocks():
    return [commands(b) for b in FENCE.findall(README.read_text())]


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_test_command_is_what_ci_runs():
    blocks = [b for b in readme_blocks() if any(c.startswith("python -m pytest") for c in b)]
    assert len(blocks) == 1 and len(blocks[0]) == 1, "README.md needs one code block with the test command alone"
    assert blocks[0][0] == "python -m pytest -q tests"
    assert blocks[0][0] in commands(CI), f".ci/run does not run the README's test command {blocks[0][0]!r}"
    assert commands(CI)[-1] == blocks[0][0], ".ci/run must end with the README's test command"


def test_readme_setup_installs_what_ci_installs():
    blocks = [b for b in readme_blocks() if any(c.startswith("pip install") for c in b)]
    assert len(blocks) == 1, "README.md needs one set-up block with its pip install"
    installs = [c for c in blocks[0] if c.startswith("pip install")]
    assert installs == ["pip install -r requirements-dev.txt"]
    ci = ci_commands()
    for command in installs:
        assert command in ci, f".ci/run does not run the README's {command!r} (it runs {ci})"
    # The rest of the set-up block are the CLI's own subcommands (the download needs the network,
    # which CI has not got): each must exist.
    for command in blocks[0]:
        if command.startswith("python -m infdit_core "):
            subcommand = command.split()[3]
            with pytest.raises(SystemExit) as done:
                cli([subcommand, "--help"])
            assert done.value.code == 0, f"README's {command!r}: no such subcommand"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_and_images_resolve(page):
    text = prose(page.read_text())
    targets = LINK.findall(text) + HTML_SRC.findall(text)
    assert targets or page.name == "CHANGELOG.md", f"{page.name}: no links found; is the pattern right?"
    for target in targets:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        assert path.exists(), f"{page.relative_to(REPO)}: {target} does not exist"
        assert REPO in path.parents or path == REPO, f"{page.relative_to(REPO)}: {target} leaves the repository"
        if anchor:
            assert path.suffix == ".md" and anchor in anchors(path), \
                f"{page.relative_to(REPO)}: {target}: no heading with that anchor"


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](page.md#title) ![gone](images/none.png) `[code](nowhere.md)`\n"
                    "<!-- [comment](nowhere.md) -->\n")
    text = prose(page.read_text())
    assert LINK.findall(text) == ["page.md#title", "images/none.png"]
    assert anchors(page) == {"title"}
    assert slug("Bigger than the GPU: offload") == "bigger-than-the-gpu-offload"
