"""A finished run folder, read defensively and checked against the leaderboard's rules.

Every reader here lists what it finds wrong in `problems` instead of raising: a broken rule,
a missing or unreadable file, a truncated metrics line each become one line of the refusal
`submit` prints, so a corrupt file never ends in a traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from flowertune_finance.checkpoint import ADAPTER_CONFIG, CheckpointError, checkpoint_folders, read_checkpoint
from flowertune_finance.config import ConfigError, parse_run_config
from flowertune_finance.leaderboard import COMMUNICATION_BUDGET_MB, STATIC_DATASET_NAME
from flowertune_finance.leaderboard import NUM_SUPERNODES as LEADERBOARD_SUPERNODES
from flowertune_finance.metrics import METRICS_FILE, RUN_CONFIG

LEADERBOARD_STATIC = {"static.dataset.name": STATIC_DATASET_NAME}


def read_json(path: Path) -> tuple[Any, str | None]:
    """A JSON file's content, or why it cannot be read: callers list problems, they never crash."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except UnicodeDecodeError:
        return None, f"{path} is not a text file (not UTF-8)"
    except OSError as error:
        return None, f"cannot read {path}: {error.strerror or error}"
    except (ValueError, RecursionError) as error:
        return None, f"{path} is not valid JSON ({error})"


def read_json_object(path: Path, expected: str) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON file that must hold an object (`expected` says which, for the message), or why it does not."""
    data, error = read_json(path)
    if error is None and not isinstance(data, dict):
        error = f"{path} holds a JSON {type(data).__name__}, not {expected}"
    return (data, None) if error is None else (None, error)


def rounds_text(rounds: list[Any]) -> str:
    """`1-3, 5, 7-8`: consecutive integer rounds folded into ranges."""
    parts: list[str] = []
    index = 0
    while index < len(rounds):
        end = index
        while (isinstance(rounds[index], int) and end + 1 < len(rounds) and isinstance(rounds[end + 1], int)
               and rounds[end + 1] == rounds[end] + 1):
            end += 1
        parts.append(str(rounds[index]) if end == index else f"{rounds[index]}-{rounds[end]}")
        index = end + 1
    return ", ".join(parts)


def read_run_config(run_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    """The run config the run kept (`run_config.json`), or None with the reason listed."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        problems.append(f"{RUN_CONFIG} is missing: the run's settings cannot be checked")
        return None
    data, error = read_json_object(path, "a mapping of run-config keys")
    if error is not None:
        problems.append(f"{error}: the run's settings cannot be checked")
        return None
    return data


def check_static(run_config: dict[str, Any] | None, problems: list[str]) -> None:
    """The run config's `static` section must be the leaderboard's."""
    for key, required in LEADERBOARD_STATIC.items():
        if run_config is not None and run_config.get(key) != required:
            problems.append(f"static section changed: '{key}' = {run_config.get(key)!r}; the leaderboard requires {required!r}")


def planned_rounds(run_config: dict[str, Any] | None, problems: list[str]) -> int | None:
    """The run's `num-server-rounds`, or None when its run config is missing or invalid (listed)."""
    try:
        return parse_run_config(run_config).num_server_rounds if run_config is not None else None
    except ConfigError as error:
        problems.append(f"{RUN_CONFIG} is not a valid run config: {error}")
        return None


def read_rounds(run_dir: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The run's round records; unreadable lines (a crash mid-write, a corrupt file) become problems."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        problems.append(f"{METRICS_FILE} is missing: the run's rounds cannot be checked")
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problems.append(f"{path} is not a text file (not UTF-8): the run's rounds cannot be checked")
        return []
    except OSError as error:
        problems.append(f"cannot read {path}: {error.strerror or error}")
        return []
    records, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        problems.append(f"{path} line(s) {rounds_text(bad)} are not JSON round records (truncated or corrupt)")
    if not records and not bad:
        problems.append(f"{path} is empty: the run recorded no round")
    return records


def check_rounds(records: list[dict[str, Any]], num_rounds: int | None, problems: list[str]) -> float:
    """Check every round trained with the leaderboard's SuperNodes; return the run's communication in MB."""
    if not records:
        return 0.0
    rounds = [r.get("round") for r in records]
    if num_rounds is not None and rounds != list(range(1, num_rounds + 1)):
        shown = f"{rounds[0]}..{rounds[-1]} ({len(rounds)} lines)"
        problems.append(f"{METRICS_FILE} holds rounds {shown}, not 1..{num_rounds}: the run did not finish")
    wrong = [(r.get("round"), r.get("num_supernodes")) for r in records
             if r.get("num_supernodes") != LEADERBOARD_SUPERNODES]
    if wrong:
        seen = sorted({str(value) for _, value in wrong})
        problems.append(
            f"the leaderboard requires {LEADERBOARD_SUPERNODES} SuperNodes; {len(wrong)} round(s) recorded "
            f"num_supernodes = {', '.join(seen)} (e.g. round {wrong[0][0]})"
        )
    accepted = [r.get("clients_accepted") for r in records]
    empty = [r.get("round") for r, n in zip(records, accepted) if r.get("round_skipped") is True or n == 0]
    if empty:
        problems.append(f"round(s) {rounds_text(empty)} accepted no client reply (skipped: the global adapter "
                        "did not change): a submitted run must train in every round it reports")
    unknown = [r.get("round") for r, n in zip(records, accepted)
               if r.get("round_skipped") is not True and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0)]
    if unknown:
        problems.append(f"round(s) {rounds_text(unknown)} record no valid clients_accepted: "
                        "it cannot be checked that they trained")
    communication = records[-1].get("cumulative_mb")
    if isinstance(communication, bool) or not isinstance(communication, (int, float)) or not (
            math.isfinite(communication) and communication >= 0):
        problems.append(f"the last line of {METRICS_FILE} records cumulative_mb = {communication!r}, not a number "
                        "of MB: the communication cost cannot be reported")
        return 0.0
    if communication > COMMUNICATION_BUDGET_MB:
        problems.append(f"communication {communication:,.0f} MB exceeds the budget of {COMMUNICATION_BUDGET_MB:,.0f} MB")
    return float(communication)


def check_checkpoint(run_dir: Path, num_rounds: int | None, problems: list[str]) -> Path | None:
    """The last round's checkpoint folder, complete and readable, or None (with the reason listed)."""
    folders = dict(checkpoint_folders(run_dir))
    if not folders:
        problems.append(f"{run_dir} holds no checkpoint (no peft_<round> folder)")
        return None
    newest = max(folders)
    if num_rounds is not None and newest != num_rounds:
        problems.append(f"the newest checkpoint is peft_{newest}, not the last round's peft_{num_rounds}")
        return None
    try:
        read_checkpoint(folders[newest])
    except CheckpointError as error:
        problems.append(str(error))
        return None
    except Exception as error:  # noqa: BLE001 -- e.g. a run_state.json that is not an object: a problem, not a crash
        problems.append(f"checkpoint {folders[newest]} is corrupt: its files do not hold what a checkpoint "
                        f"records ({type(error).__name__}: {error})")
        return None
    adapter_config, _ = read_json(folders[newest] / ADAPTER_CONFIG)
    if not isinstance(adapter_config, dict) or not adapter_config.get("peft_type"):
        problems.append(f"{folders[newest] / ADAPTER_CONFIG} is not a PEFT adapter config (a JSON object with a "
                        "peft_type): `PeftModel.from_pretrained` could not load the submitted adapter")
        return None
    return folders[newest]
