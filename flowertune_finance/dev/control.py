"""The SuperLink's Control API from this process: what `flwr ls`, `log`, `stop` and `supernode ls` ask.

Each `flwr` command is a fresh Python process that spends about a CPU-second importing the CLI before it
asks its one question; a run followed to its end asks two or three. Here the same questions go through
Flower's own Control API client (`ControlHttpClient`, what those commands use) from the process that
already runs. The connection is read from the FLWR_HOME in the given environment, as `flwr` would.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
from flwr.cli.config_utils import load_certificate_in_connection
from flwr.cli.constant import LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE, LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE_IN_MEMORY
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.typing import SuperLinkConnection
from flwr.proto.control_pb2 import (  # pylint: disable=E0611
    ListNodesRequest,
    ListRunsRequest,
    StopRunRequest,
    StreamLogsRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

# os.environ is process-wide: Flower reads FLWR_HOME from it, so connections are read one at a time.
_FLWR_HOME_LOCK = threading.Lock()
T = TypeVar("T")


class ControlError(RuntimeError):
    """The SuperLink's Control API could not be reached, or its connection could not be read."""


@dataclass(frozen=True)
class RunRecord:
    run_id: int
    status: str  # as `flwr ls` shows it: `running`, `finished:completed`, `finished:failed`, ...
    details: str  # why it failed, or ''


def connection(env: Mapping[str, str], where: list[str] | None = None) -> SuperLinkConnection:
    """The connection `flwr <command> [where]` would use under the FLWR_HOME of `env`.

    Refuses Flower's magic local address: `flwr` would start its shared local SuperLink for it."""
    name = where[0] if where else None
    with _FLWR_HOME_LOCK:
        saved = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = env["FLWR_HOME"]
        try:
            found = read_superlink_connection(name)
        except Exception as error:  # click.ClickException: no config, no such connection
            raise ControlError(f"no SuperLink connection {name or '(default)'} under {env['FLWR_HOME']}: {error}") from error
        finally:
            if saved is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = saved
    if found.address in (LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE, LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE_IN_MEMORY):
        raise ControlError(f"connection {found.name!r} of {env['FLWR_HOME']} is Flower's shared local SuperLink "
                           f"({found.address}); a private FLWR_HOME names its SuperLink's address")
    return found


@contextmanager
def control_client(env: Mapping[str, str], where: list[str] | None = None) -> Iterator[ControlHttpClient]:
    """A Control API client for that connection, with the CLI's client and runtime-version headers."""
    found = connection(env, where)
    client = ControlHttpClient.from_server_address(
        server_address=str(found.address),
        insecure=found.insecure,
        root_certificates=load_certificate_in_connection(found),
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )
    try:
        yield client
    finally:
        client.close()


def _ask(env: Mapping[str, str], where: list[str] | None, what: str, call: Callable[[ControlHttpClient], T]) -> T:
    """One Control API call; an unreadable certificate, a transport error or Flower's error (an unknown run id,
    say) as ControlError."""
    try:
        with control_client(env, where) as client:
            return call(client)
    except ControlError:
        raise
    except Exception as error:
        raise ControlError(f"{what} failed: {error}") from error


def runs(env: Mapping[str, str], where: list[str] | None = None, run_id: int | None = None) -> list[RunRecord]:
    """The SuperLink's records of its runs, or of one run (what `flwr ls [--run-id]` shows)."""
    request = ListRunsRequest(run_id=run_id) if run_id is not None else ListRunsRequest()
    listed = _ask(env, where, "listing runs", lambda client: client.ListRuns(request))
    return [
        RunRecord(run.run_id, run.status.status + (f":{run.status.sub_status}" if run.status.sub_status else ""),
                  run.status.details)
        for run in listed.run_dict.values()
    ]


def run_record(run_id: int, env: Mapping[str, str], where: list[str] | None = None) -> RunRecord | None:
    """The SuperLink's record of one run, or None if it has none."""
    return next((record for record in runs(env, where, run_id) if record.run_id == run_id), None)


def stop(run_id: int, env: Mapping[str, str], where: list[str] | None = None) -> bool:
    """Ask the SuperLink to stop a run (`flwr stop`); True if it accepted."""
    stopped = _ask(env, where, f"stopping run {run_id}", lambda client: client.StopRun(StopRunRequest(run_id=run_id)))
    return bool(stopped.success)


def online_nodes(env: Mapping[str, str], where: list[str] | None = None) -> list[str]:
    """Ids of the SuperNodes the SuperLink sees online (what `flwr supernode ls` shows as `online`)."""
    listed = _ask(env, where, "listing SuperNodes", lambda client: client.ListNodes(ListNodesRequest()))
    return [str(node.node_id) for node in listed.nodes_info if node.status == "online"]


def log_lines(run_id: int, env: Mapping[str, str], deadline: float, where: list[str] | None = None) -> Iterator[str]:
    """The run's log, line by line as it comes, until the SuperLink closes the stream (it does once the run
    has finished), the connection breaks, or `deadline` (a `time.time()`) passes.

    The stream is read by a daemon thread, since it has no read timeout; this generator waits on a queue,
    so that a deadline or Ctrl-C (KeyboardInterrupt) in the caller ends it at once."""
    chunks: queue.Queue[str | None] = queue.Queue()
    client_box: list[ControlHttpClient] = []

    def pump() -> None:
        try:
            with control_client(env, where) as client:
                client_box.append(client)
                for response in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
                    chunks.put(response.log_output)
        except Exception:  # a broken stream ends the log; the caller asks for the run's status next
            pass
        finally:
            chunks.put(None)

    threading.Thread(target=pump, name=f"flwr-log-{run_id}", daemon=True).start()
    pending = ""
    try:
        while (remaining := deadline - time.time()) > 0:
            try:
                chunk = chunks.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if chunk is None:
                break
            *complete, pending = (pending + chunk).split("\n")
            yield from (line + "\n" for line in complete)
        if pending:
            yield pending
    finally:
        for client in client_box:  # stops the pump at the deadline or when the caller stops early
            client.close()
