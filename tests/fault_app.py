"""Test-only ClientApp: the production train handler with faults injected for chosen rounds
and partitions. tests/test_faults.py copies this module into a small app folder whose
pyproject.toml names it as the clientapp, writes the schedule there as faults.json, and runs
that folder with the real `flwr run`;
the production ClientApp carries no test hooks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

# server round -> partition-id -> fault ("raise": the client crashes; "nan": it replies with a NaN weight;
# "hang": the client never replies, so the round cannot end: test_resume.py kills the run while it waits).
# Each test writes its schedule to faults.json next to this module: {"round": {"partition": fault}}.
_SCHEDULE = Path(__file__).with_name("faults.json")
FAULTS = {int(r): {int(p): f for p, f in faults.items()} for r, faults in json.loads(_SCHEDULE.read_text()).items()}

HANG_SECONDS = 900  # bounded, so a test that forgets to kill the run still ends

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fail, or train and corrupt the reply, as FAULTS says for this round and partition."""
    server_round = int(msg.content["config"]["server-round"])
    fault = FAULTS.get(server_round, {}).get(int(context.node_config["partition-id"]))
    if fault == "raise":
        raise RuntimeError(f"injected client failure in round {server_round}")
    if fault == "hang":
        time.sleep(HANG_SECONDS)
        raise RuntimeError(f"injected hang in round {server_round} was not ended by the test")
    # imported on first use: a worker whose every call raises never loads torch, transformers and PEFT
    from flowertune_finance import client_app

    reply = client_app.train(msg, context)
    if fault == "nan":
        adapter = reply.content["arrays"].to_torch_state_dict()
        adapter[next(iter(adapter))].view(-1)[0] = float("nan")
        reply.content["arrays"] = ArrayRecord(adapter)
    return reply
