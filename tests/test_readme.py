"""The README is a front door that works: its examples, and the manual's, give the answers written
under them when pasted against a fresh `konnichiwa serve`, and it maps the whole package.

An example is a `bash` block that calls the service at localhost:4000, followed by a `json` or
`text` block with what it prints; `…` in an answer stands for anything (a timestamp, a latency).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.support import running_service

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SERVICE = "localhost:4000"
ANSWER_LANGUAGES = ("json", "text")
ANYTHING = "…"
FENCE = re.compile(r"^```(?P<language>\w*).*?\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)
MAX_LINES = 150
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest"
)


class Example(NamedTuple):
    line: int
    command: str
    answer: str | None  # None: no answer block follows the command


def examples(page: Path) -> list[Example]:
    """The page's calls of the service, in order, each with the answer block right after it."""
    text = page.read_text()
    blocks = list(FENCE.finditer(text))
    found = []
    for block, after in itertools.zip_longest(blocks, blocks[1:]):
        if block["language"] != "bash" or SERVICE not in block["body"]:
            continue
        answered = (
            after is not None
            and after["language"] in ANSWER_LANGUAGES
            and not text[block.end() : after.start()].strip()
        )
        found.append(
            Example(
                text.count("\n", 0, block.start()) + 1,
                block["body"],
                after["body"] if after is not None and answered else None,
            )
        )
    return found


def matches(answer: str, output: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in answer.strip().split(ANYTHING))
    return re.fullmatch(pattern, output.strip(), re.DOTALL) is not None


PAGES = [
    page
    for page in (README, *sorted((ROOT / "docs").rglob("*.md")))
    if examples(page)  # the pages that call the service
]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_the_examples_answer_as_documented(
    page: Path, tmp_path: Path, server_dir: Path, curl: str
) -> None:
    """A fresh dev service in a folder of its own, as a newcomer has after `konnichiwa serve`;
    each example runs there with the real curl, in the page's order."""
    state_dir = server_dir / ".konnichiwa"
    environment = {"ENVIRONMENT": "dev", "KONNICHIWA_STATE_DIR": str(state_dir)}
    with running_service(tmp_path / "serve.log", environment, "--workers", "1") as service:
        shell = {
            **os.environ,
            "PATH": f"{Path(curl).parent}{os.pathsep}{os.environ['PATH']}",
            "API_KEY": (state_dir / "api-key").read_text().strip(),
        }
        wrong = []
        for example in examples(page):
            assert example.answer is not None, f"line {example.line}: no answer follows"
            result = subprocess.run(
                ["bash", "-c", example.command.replace(SERVICE, f"localhost:{service.port}")],
                cwd=server_dir,
                env=shell,
                capture_output=True,
                timeout=30,
                check=False,
            )
            output = result.stdout.decode().replace("\r\n", "\n")
            if result.returncode != 0 or not matches(example.answer, output):
                wrong.append(
                    f"line {example.line}: exit {result.returncode}\n{output}\n"
                    f"documented:\n{example.answer}"
                )
        assert not wrong, "\n\n".join(wrong)


def test_the_readme_has_three_requests_to_try() -> None:
    assert len(examples(README)) >= 3


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines: the manual belongs in docs/"
    # .ci/run runs the command it finds within four lines of "**Test it**".
    start = next(n for n, line in enumerate(lines) if line.startswith("**Test it**"))
    assert TEST_COMMAND in lines[start : start + 5]


def test_the_readme_maps_every_module() -> None:
    """One row per module of the package (its first cell names it), and no row for one gone."""
    package = README.read_text().split("## The package", 1)[1].split("\n## ", 1)[0]
    mapped = {
        name
        for row in package.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(\w+\.py)`", row.split("|")[1])
    }
    modules = {path.name for path in (ROOT / "konnichiwa").glob("*.py")} - {"__init__.py"}
    assert mapped == modules


def test_the_readme_links_to_files_that_exist() -> None:
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text())
    assert targets
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing
