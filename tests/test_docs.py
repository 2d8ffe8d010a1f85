"""The documentation site builds without a warning and says what the code and deployments do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hcl2.api import loads as parse_hcl

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = (ROOT / "README.md", *sorted(DOCS.rglob("*.md")))
IAM = ROOT / "deploy" / "terraform" / "ecs" / "iam.tf"
SITE_URL = "https://konnichiwa.github.io/konnichiwa/"  # alerts link their runbooks under it
FENCED = re.compile(r"^```.*?^```$", re.MULTILINE | re.DOTALL)
ACTION = re.compile(r"\b(?:ssm|kms|s3|secretsmanager):[A-Za-z]+\b")
SSM_PATH = re.compile(r"/konnichiwa/<env>/[\w/*]*")


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """A broken link or anchor, or a page missing from the navigation, is a warning: it fails."""
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    built = {path.relative_to(site).as_posix() for path in site.rglob("index.html")}
    for page in DOCS.rglob("*.md"):
        name = page.relative_to(DOCS).with_suffix("").as_posix()
        expected = "index.html" if name == "index" else f"{name.removesuffix('/index')}/index.html"
        assert expected in built, f"{page.relative_to(ROOT)} was not built"


def test_the_site_is_published_where_the_alerts_link() -> None:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.SafeLoader)
    assert config["site_url"] == SITE_URL


def _prose(page: Path) -> str:
    """A page without its code blocks: what it states, not what it quotes."""
    return FENCED.sub("", page.read_text())


def _task_roles() -> dict[str, list[dict[str, Any]]]:
    """The IAM statements of each service role, as deploy/terraform/ecs/iam.tf grants them."""
    terraform = parse_hcl(IAM.read_text())
    for block in terraform["locals"]:
        if "task_role_statements" in block:
            roles: dict[str, list[dict[str, Any]]] = block["task_role_statements"][0]
            return roles
    raise AssertionError("iam.tf has no task_role_statements")


def _granted(statements: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """The actions granted, and the SSM parameter paths they are granted on (`<env>` for the
    environment)."""
    actions = {action for statement in statements for action in statement["Action"]}
    paths = {
        resource.split("}", 1)[1].replace("${var.environment}", "<env>")
        for statement in statements
        for resource in statement["Resource"]
        if resource.startswith("${local.ssm_parameter_arn}")
    }
    return actions, paths


def _rows_granting(role: str) -> list[tuple[str, str]]:
    """(page, row) of every table row in the README and the docs that names `role` in its first
    cell and lists AWS actions."""
    rows = []
    for page in PAGES:
        for line in _prose(page).splitlines():
            cells = line.split("|")
            if line.startswith("|") and len(cells) > 2 and ACTION.search(line):
                first = cells[1]
                if re.search(rf"\b{role}\b", first):
                    rows.append((page.relative_to(ROOT).as_posix(), line))
    return rows


@pytest.mark.parametrize("role", ["api", "aux"])
def test_the_iam_tables_grant_what_the_terraform_grants(role: str) -> None:
    actions, paths = _granted(_task_roles()[role])
    assert paths == {f"/konnichiwa/<env>/{role}", f"/konnichiwa/<env>/{role}/*"}
    rows = _rows_granting(role)
    assert rows, f"no table says what the {role} role may do"
    for page, row in rows:
        assert set(ACTION.findall(row)) == actions, f"{page}: {row}"
        assert set(SSM_PATH.findall(row)) == paths, f"{page}: {row}"


# Each rule of the API is stated in one place; other pages link to it. (A signature phrase of the
# rule, as it reads in prose; answers quoted in code blocks do not count.)
RULES = {
    "the name rule": "single spaces",
    "the Idempotency-Key shape": "visible ASCII",
}


@pytest.mark.parametrize("phrase", RULES.values(), ids=RULES.keys())
def test_each_rule_is_stated_once(phrase: str) -> None:
    statements = [
        page.relative_to(ROOT).as_posix()
        for page in PAGES
        for paragraph in re.split(r"\n\s*\n", _prose(page))
        if phrase in paragraph
    ]
    assert len(statements) == 1, statements
