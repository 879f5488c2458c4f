"""Flower Hub readiness: Flower's own publish checks pass offline, and the published file set runs on its own.

`flwr new @account/app` unpacks exactly the files `flwr app publish` uploaded, so the README's CPU smoke
runs from a folder holding only those files (checkout A of conftest.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flowertune_finance.cli import main
from flowertune_finance.tools import hub

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = "flowertune_finance/dev/data/fingpt_sentiment_sample.jsonl"


def test_hub_check_passes_on_the_repository(capsys):
    assert main(["hub-check", str(REPO_ROOT)]) == 0
    out = capsys.readouterr().out
    kept, skipped = hub.publishable_files(REPO_ROOT)
    for rel in ("LICENSE", "pyproject.toml", "README.md", SAMPLE_DATA, "flowertune_finance/client_app.py"):
        assert rel in kept
        assert re.search(rf"^\s*[\d,]+  {re.escape(rel)}$", out, re.MULTILINE), rel
    total = sum(path.stat().st_size for path in kept.values())
    assert f"flowertune-finance: {len(kept)} files, {total:,} bytes" in out
    assert "validation passed" in out
    # what the filter drops is really dropped (the README figure, for one)
    assert not any(rel.endswith(".png") for rel in kept)
    for png in (REPO_ROOT / "docs").glob("*.png"):
        assert png.relative_to(REPO_ROOT).as_posix() in skipped


@pytest.fixture
def app_copy(tmp_path: Path):
    """A writable copy of the publishable files, in a folder named like the app, to break on purpose."""
    with hub.staged_app(REPO_ROOT, parent=tmp_path) as staged:
        yield staged


def _edit_pyproject(app: Path, pattern: str, replacement: str) -> None:
    path = app / "pyproject.toml"
    text, count = re.subn(pattern, replacement, path.read_text(), count=1, flags=re.MULTILINE)
    assert count == 1, pattern
    path.write_text(text)


def _break_description_too_long(app: Path) -> None:
    _edit_pyproject(app, r'^description = ".*"$', 'description = "' + "x" * 201 + '"')


def _break_description_empty(app: Path) -> None:
    _edit_pyproject(app, r'^description = ".*"$', 'description = "  "')


def _break_name(app: Path) -> None:
    _edit_pyproject(app, r'^name = "flowertune-finance"$', 'name = "flowertune_finance"')


def _break_file_too_large(app: Path) -> None:
    (app / "flowertune_finance" / "dev" / "data" / "big.jsonl").write_text('{"x": 1}\n' * 120_000)  # ~1.08 MB


def _break_not_utf8(app: Path) -> None:
    (app / "NOTES.md").write_bytes(b"caf\xe9\n")


def _break_license_ignored(app: Path) -> None:
    with (app / ".gitignore").open("a") as gitignore:
        gitignore.write("LICENSE\n")


def _break_license_missing(app: Path) -> None:
    (app / "LICENSE").unlink()


def _break_too_deep(app: Path) -> None:
    deep = app.joinpath(*[f"d{i}" for i in range(11)])
    deep.mkdir(parents=True)
    (deep / "module.py").write_text("")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        pytest.param(_break_description_too_long, r"has 201 characters; Flower Hub allows 200", id="long_description"),
        pytest.param(_break_description_empty, r"description can't be empty", id="description_empty"),
        pytest.param(_break_name, r'"flowertune_finance" is invalid', id="name"),
        pytest.param(_break_file_too_large, r"File too large: '.*big\.jsonl'", id="file_too_large"),
        pytest.param(_break_not_utf8, r"Encoding error: '.*NOTES\.md' is not UTF-8", id="not_utf8"),
        pytest.param(_break_license_ignored, r"`LICENSE` is excluded by `.gitignore`", id="license_ignored"),
        pytest.param(_break_license_missing, r"`LICENSE` was declared but does not exist", id="license_missing"),
        pytest.param(_break_too_deep, r"exceeds the maximum directory depth", id="too_deep"),
    ],
)
def test_hub_check_names_what_publish_would_refuse(app_copy, capsys, breakage, message):
    breakage(app_copy)
    with pytest.raises(hub.HubCheckError, match=message):
        hub.check_app(app_copy)
    assert main(["hub-check", str(app_copy)]) == 1
    assert re.search(message, capsys.readouterr().err)


def test_hub_check_warns_about_links_to_files_that_are_not_uploaded(app_copy):
    with (app_copy / "README.md").open("a") as readme:
        readme.write(
            "\n![a figure](docs/missing.png)\n[license](LICENSE)\n[site](https://flower.ai/x.png)\n"
            '<img src="img/also-missing.svg" alt="x">\n[data](flowertune_finance/dev/data/README.md#top)\n'
        )
    warnings = hub.check_app(app_copy).warnings
    assert "README.md links docs/missing.png, which is not uploaded" in warnings
    assert "README.md links img/also-missing.svg, which is not uploaded" in warnings
    assert not [w for w in warnings if "LICENSE" in w or "flower.ai" in w or "data/README.md" in w]


def test_published_files_alone_run_the_smoke(checkouts, smoke_run):
    """What `flwr new` unpacks (the publish filter's output, nothing else) runs the README's smoke to
    completion: checkout A holds just those files, and `smoke_run` is its smoke (conftest.py)."""
    app = checkouts[0]
    kept, skipped = hub.publishable_files(REPO_ROOT)
    made_by_the_smoke = (".smoke", "results")  # its tiny model, private Flower home and logs; the run folder
    unpacked = {path.relative_to(app).as_posix() for path in app.rglob("*")
                if path.is_file() and path.relative_to(app).parts[0] not in made_by_the_smoke}
    assert unpacked == set(kept)
    assert not any((app / rel).exists() for rel in skipped if Path(rel).parts[0] not in made_by_the_smoke)
    result, run_dir = smoke_run
    assert result.status == "finished:completed"
    assert run_dir.parent == app / "results" and (run_dir / "peft_3" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "run_config.json").read_text())["dataset.path"] == str(app / SAMPLE_DATA)


def test_hub_check_warns_when_the_folder_is_not_named_like_the_app(app_copy):
    assert not [w for w in hub.check_app(app_copy).warnings if "name of the folder" in w]
    renamed = app_copy.rename(app_copy.with_name("my-clone"))
    warnings = hub.check_app(renamed).warnings
    assert any("this one is 'my-clone', the app is 'flowertune-finance'" in w for w in warnings), warnings
    renamed.rename(app_copy)  # the fixture removes the folder by its original name
