"""The docs' promises that can rot: links resolve, commands and run-config keys exist, no stale process text."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, get_project_config

from flowertune_finance.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO_ROOT / "README.md", REPO_ROOT / "CONTRIBUTING.md", *(REPO_ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)


def _ids(pages):
    return [str(page.relative_to(REPO_ROOT)) for page in pages]


def command_lines(page: Path) -> list[str]:
    """Shell lines of a page's code blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in CODE_BLOCK.findall(page.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_relative_link_and_image_resolves(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+://|^mailto:|^#", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


SUBCOMMANDS = set(next(a for a in build_parser()._actions if a.dest == "command").choices)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_flowertune_finance_subcommand_in_a_command_block_exists(page):
    for line in command_lines(page):
        for match in re.finditer(r"flowertune-finance\s+([\w-]+)", line):
            assert match.group(1) in SUBCOMMANDS, f"{page.name}: `{line}` names no subcommand {match.group(1)!r}"


KNOWN_KEYS = set(flatten_dict(get_project_config(REPO_ROOT)["tool"]["flwr"]["app"]["config"]))


def run_config_keys(line: str) -> list[str]:
    """Keys of the `--run-config "k=v k2=v2"` strings on a command line (files are skipped)."""
    try:
        words = shlex.split(line)
    except ValueError:
        return []
    keys = []
    for flag, value in zip(words, words[1:]):
        if flag == "--run-config" and "=" in value:
            keys += [item.split("=", 1)[0] for item in re.findall(r"[\w.-]+=", value)]
    return [key.rstrip("=") for key in keys]


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_run_config_key_in_a_command_block_exists(page):
    for line in command_lines(page):
        if "check-config" in line:
            continue  # the validator's examples show unknown keys on purpose
        for key in run_config_keys(line):
            assert key in KNOWN_KEYS, f"{page.name}: `{line}` sets {key!r}, which pyproject.toml does not declare"


def test_the_readme_is_a_five_minute_read():
    assert len((REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
