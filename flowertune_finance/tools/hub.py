"""Check offline that the app can be published on Flower Hub, and stage exactly what would be uploaded.

`flwr app publish` needs a login and uploads at once; a problem (a file over 1 MB, a bad folder name, a
license file that is excluded) only shows up then. This module runs the same validation functions that
command calls before it uploads (imported from `flwr.cli.app_cmd.publish`), on a copy of the publishable
files in a folder named after the app: the folder `flwr new @account/app` unpacks is that same file set.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any, TypeVar

import click
from flwr.cli.app_cmd.publish import (  # the checks `flwr app publish` runs before it uploads
    _collect_file_paths,
    _validate_app_name,
    _validate_description,
    _validate_files,
)
from flwr.cli.config_utils import load_and_validate
from flwr.cli.utils import AppPathDepthError, collect_files, filter_paths_for_publish
from flwr.common.constant import FAB_CONFIG_FILE
from flwr.supercore.constant import MAX_FILE_BYTES, MAX_FILE_COUNT, MAX_TOTAL_BYTES

T = TypeVar("T")
MAX_DESCRIPTION_CHARS = 200  # over this, `flwr app publish` stops to ask for confirmation

# Markdown images/links `](target)` and HTML `src="target"` / `href="target"`.
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|(?:src|href)\s*=\s*\"([^\"]+)\"")


class HubCheckError(RuntimeError):
    """The app would be refused by `flwr app publish` (or it would stop to ask); the message says why."""


@dataclass(frozen=True)
class HubCheck:
    """What `flwr app publish` would upload from an app folder."""

    app_name: str
    files: dict[str, int]  # relative POSIX path -> bytes, sorted by path
    skipped: list[str]  # files in the folder that the publish filter leaves out
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def _fail(error: Exception) -> HubCheckError:
    message = error.format_message() if isinstance(error, click.ClickException) else str(error)
    return HubCheckError(message)


def publishable_files(app_dir: str | Path) -> tuple[dict[str, Path], list[str]]:
    """The files `flwr app publish` keeps (Flower's own collect + filter), and those it skips.

    Same selection as `_collect_file_paths`, without its per-file "Skip:" printing.
    """
    root = Path(app_dir).expanduser().resolve()
    try:
        everything = collect_files(root)
        kept = filter_paths_for_publish(everything)
    except AppPathDepthError as error:
        raise _fail(error.to_click_exception()) from None
    except ValueError as error:
        raise _fail(error) from None
    files = {rel: Path(path) for rel, path in sorted(kept.items()) if isinstance(path, Path)}
    return files, sorted(set(everything) - set(files))


def _project(app_dir: Path) -> dict[str, Any]:
    """`[project]` of the app's pyproject.toml, validated the way `flwr app publish` loads it."""
    if not (app_dir / FAB_CONFIG_FILE).is_file():
        raise HubCheckError(f"{app_dir} holds no {FAB_CONFIG_FILE}; pass the app folder (the repository root)")
    try:
        config, _ = load_and_validate(app_dir / FAB_CONFIG_FILE, check_module=False)
    except ValueError as error:
        raise HubCheckError(str(error)) from None
    return config["project"]


@contextmanager
def staged_app(app_dir: str | Path, parent: str | Path | None = None) -> Iterator[Path]:
    """Copy the publishable files of `app_dir` into `<parent>/<[project].name>/` (a temp folder by default).

    The copy is what the Hub stores and what `flwr new @account/app` unpacks. Removed on exit.
    """
    source = Path(app_dir).expanduser().resolve()
    name = _project(source)["name"]
    try:
        _validate_app_name(name, "[project].name (the Hub app name)")
    except click.ClickException as error:
        raise _fail(error) from None
    files, _ = publishable_files(source)
    with tempfile.TemporaryDirectory(prefix="hub-", dir=parent) as temp:
        target = Path(temp) / name
        for rel, path in files.items():
            destination = target / rel
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
        yield target


def _check_description(description: object) -> None:
    """Flower's own check, made non-interactive: over 200 characters `flwr app publish` would prompt."""
    if isinstance(description, str) and len(description) > MAX_DESCRIPTION_CHARS:
        raise HubCheckError(
            f"[project].description has {len(description)} characters; "
            f"Flower Hub allows {MAX_DESCRIPTION_CHARS} (`flwr app publish` stops to ask)"
        )
    try:
        _validate_description(description)
    except click.ClickException as error:
        raise _fail(error) from None


def _dangling_links(staged: Path, files: dict[str, int]) -> list[str]:
    """Relative links/images in uploaded Markdown whose target is not uploaded (Hub readers see alt text)."""
    found = []
    for rel in files:
        if not rel.endswith(".md"):
            continue
        text = (staged / rel).read_text(encoding="utf-8")
        for match in _LINK.finditer(text):
            target = (match.group(1) or match.group(2)).split("#", 1)[0]
            if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("/"):
                continue  # anchors, URLs, mailto:, site-absolute paths
            resolved = (staged / rel).parent.joinpath(target).resolve()
            try:
                inside = resolved.relative_to(staged.resolve()).as_posix()
            except ValueError:
                inside = None
            if inside is None or (inside not in files and not resolved.is_dir()):
                found.append(f"{rel} links {target}, which is not uploaded")
    return found


def _quietly(function: Callable[..., T], *args: Any) -> T:
    """Call a Flower publish helper with its console lines ("Skip: ...", "Validation passed") captured."""
    output = StringIO()
    try:
        with redirect_stdout(output), redirect_stderr(output):
            return function(*args)
    except (click.ClickException, ValueError) as error:
        raise _fail(error) from None


def check_staged(staged: Path) -> HubCheck:
    """Run `flwr app publish`'s pre-upload validation on an app folder, in the order it runs them."""
    try:
        config, warnings = load_and_validate(staged / FAB_CONFIG_FILE, check_module=False)
        _validate_app_name(staged.name, "Flower App directory name")
    except (click.ClickException, ValueError) as error:
        raise _fail(error) from None
    _check_description(config["project"].get("description", ""))
    paths = _quietly(_collect_file_paths, staged)
    _quietly(_validate_files, paths)
    files = {path.relative_to(staged.resolve()).as_posix(): path.stat().st_size for path in paths}
    skipped = sorted(set(collect_files(staged)) - set(files))
    return HubCheck(staged.name, files, skipped, list(warnings) + _dangling_links(staged.resolve(), files))


def check_app(app_dir: str | Path) -> HubCheck:
    """Stage `app_dir`'s publishable files under the app's name and validate them as `flwr app publish` does.

    The file selection also runs on `app_dir` itself, so an error there (say, a declared LICENSE that
    .gitignore excludes) reads exactly as `flwr app publish` would word it. Raises HubCheckError.
    """
    source = Path(app_dir).expanduser().resolve()
    name = _project(source)["name"]
    _quietly(_collect_file_paths, source)
    _, skipped_in_source = publishable_files(source)
    with staged_app(source) as staged:
        result = check_staged(staged)
    warnings = list(result.warnings)
    if source.name != name:
        warnings.append(
            f"`flwr app publish` checks the name of the folder it is given: this one is '{source.name}', the app "
            f"is '{name}'; publish from a folder named '{name}' (as checked here)"
        )
    return HubCheck(result.app_name, result.files, skipped_in_source, warnings)


def report(result: HubCheck) -> str:
    """The file list and totals, as `flowertune-finance hub-check` prints them."""
    lines = [f"{size:>10,}  {rel}" for rel, size in result.files.items()]
    lines.append(
        f"{result.app_name}: {len(result.files)} files, {result.total_bytes:,} bytes "
        f"(limits: {MAX_FILE_COUNT:,} files, {MAX_FILE_BYTES:,} bytes a file, {MAX_TOTAL_BYTES:,} in all)"
    )
    if result.skipped:
        lines.append(f"not uploaded ({len(result.skipped)}): " + ", ".join(_summarise(result.skipped)))
    lines += [f"warning: {warning}" for warning in result.warnings]
    lines.append("Flower's publish validation passed; `flwr app publish` would upload these files.")
    return "\n".join(lines)


def _summarise(paths: list[str], limit: int = 12) -> list[str]:
    """Files sharing a top-level folder collapse to `folder/ (N files)`, so a virtual environment does not flood."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault(path.split("/", 1)[0] + "/" if "/" in path else path, []).append(path)
    items = [f"{head} ({len(members)} files)" if len(members) > 1 else members[0] for head, members in groups.items()]
    return items[:limit] + ([f"... {len(items) - limit} more"] if len(items) > limit else [])
