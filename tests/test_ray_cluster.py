"""The simulation attached to a real two-node Ray cluster: clients run on both nodes.

Flower's Ray backend calls `ray.init()` without an address, so a SuperLink started with `RAY_ADDRESS`
in its environment runs every simulation on that cluster. Here both nodes live on this machine (one
CPU each), which exercises the same path as a head machine plus worker machines.

The cluster is found and stopped by PID only: its daemons carry a marker variable whose value is the
cluster's own temp dir (most also name that dir on their command line), and Ray's agents and workers are
their descendants. `ray stop` is never used, since it would stop every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flowertune_finance.dev import launch, processes, servers

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = "FLOWERTUNE_RAY_CLUSTER"
CLIENT_ACTOR = "ClientAppActor"  # Flower's Ray actor class that runs ClientApp calls


@dataclass
class RayCluster:
    address: str  # what `ray start --address` and RAY_ADDRESS take
    temp_dir: Path
    stopped: set[int] = field(default_factory=set)  # after exit: the processes that were signalled
    survivors: set[int] = field(default_factory=set)  # after exit: those still alive (should be none)


def _ray(*args: str, env: dict[str, str]) -> str:
    ray = Path(sys.executable).parent / "ray"
    done = subprocess.run([str(ray), *args], check=False, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"`ray {' '.join(args)}` failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _cluster_pids(temp_dir: Path) -> set[int]:
    """Live processes of this cluster only.

    Daemons carry the marker in their environment and the temp dir on their command line; Ray's agents
    and workers rename themselves (`ray::...`), which overwrites both, so their parent (a raylet) is
    what ties them to this cluster.
    """
    table = _process_table()
    found = set(processes.processes_with_env(MARKER, str(temp_dir)))
    needle = str(temp_dir).encode()
    for pid in table:
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            continue
    grew = True
    while grew:  # add descendants
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= children
        grew = bool(children)
    found.discard(os.getpid())
    return {pid for pid in found if pid in table and table[pid][1] != "Z"}


def _stop_cluster(temp_dir: Path, grace: float = 5.0) -> tuple[set[int], set[int]]:
    """SIGTERM this cluster's processes, then SIGKILL what is left after `grace` seconds.

    Returns (every process signalled, those still alive at the end).

    The set is taken before any signal and only grows: a process whose raylet is gone is re-parented
    and could no longer be traced to this cluster.
    """
    known = _cluster_pids(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        known |= _cluster_pids(temp_dir)
        for pid in sorted(known):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and _alive(known):
            time.sleep(0.2)
    return known, _alive(known | _cluster_pids(temp_dir))


def _alive(pids: set[int]) -> set[int]:
    table = _process_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


def _gcs_records(address: str, env: dict[str, str]) -> dict:
    """Ray's own records from the cluster's GCS: nodes, actors, and the node each actor task ran on.

    Read by a short-lived driver process, so this test process never joins the cluster. The state API
    (`ray list actors`, `ray.util.state`) would serve the same tables, but it needs the dashboard and
    `ray[default]`, which Flower's simulation extra does not install; the GCS accessors below need neither.
    """
    script = textwrap.dedent(
        f"""
        import json, ray
        from ray._private import state
        from ray.core.generated import common_pb2, gcs_pb2
        ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
        nodes = [{{"id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0),
                   "raylet_socket": n["RayletSocketName"]}} for n in ray.nodes()]
        actors = [{{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"],
                    "pid": a["Pid"]}} for a in state.actors().values()]
        finished = common_pb2.TaskStatus.Value("FINISHED")
        tasks = []
        for raw in state.state._connect_and_get_accessor().get_task_events():
            event = gcs_pb2.TaskEvents.FromString(raw)
            node = event.state_updates.node_id or event.task_info.node_id
            tasks.append({{"name": event.task_info.name, "node": node.hex(), "pid": event.state_updates.worker_pid,
                           "finished": finished in event.state_updates.state_ts_ns}})
        print(json.dumps({{"nodes": nodes, "actors": actors, "tasks": tasks}}))
        """
    )
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"reading the GCS failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _node_temp_dir(raylet_socket: str, cluster_dir: Path) -> Path:
    """The `--temp-dir` a node was started with, from its raylet socket (`<temp-dir>/session_.../sockets/raylet`)."""
    path = Path(raylet_socket)
    return path.parents[2] if path.is_relative_to(cluster_dir) else path


@contextmanager
def two_node_ray_cluster(cpus_per_node: int = 1) -> Iterator[RayCluster]:
    """A head and a worker node on this machine, each with its own temp dir and ports; stopped on exit."""
    # Short path: Ray's Unix sockets live under it and must stay below ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))
    env = processes.flwr_env({MARKER: str(temp_dir), "RAY_USAGE_STATS_ENABLED": "0"})
    env.pop("RAY_ADDRESS", None)
    # below the ephemeral range and derived from the cluster's own temp dir; a port another process
    # holds makes `ray start` fail rather than share it
    port, client_server_port, dashboard_port, head_agent_port, worker_agent_port = servers.port_candidates(
        str(temp_dir), 5)
    address = f"127.0.0.1:{port}"
    common = [f"--num-cpus={cpus_per_node}", "--num-gpus=0", "--object-store-memory=100000000",
              "--disable-usage-stats"]
    cluster = RayCluster(address, temp_dir)
    try:
        _ray("start", "--head", f"--port={port}", f"--temp-dir={temp_dir / 'head'}", *common,
             "--include-dashboard=false", f"--ray-client-server-port={client_server_port}",
             f"--dashboard-port={dashboard_port}",
             f"--dashboard-agent-listen-port={head_agent_port}", env=env)
        # Same machine: the second node needs its own temp dir and dashboard-agent port (52365 for every node
        # by default); Ray picks the raylet's other ports at random.
        _ray("start", f"--address={address}", f"--temp-dir={temp_dir / 'worker'}", *common,
             f"--dashboard-agent-listen-port={worker_agent_port}", env=env)
        yield cluster
    finally:
        cluster.stopped, cluster.survivors = _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
def test_simulation_runs_clients_on_both_nodes_of_a_ray_cluster(tiny_model, tmp_path):
    started = time.time()
    with two_node_ray_cluster(cpus_per_node=1) as cluster:
        cluster_up = time.time() - started
        config = launch.smoke_run_config(REPO_ROOT, tiny_model, rounds=1)
        config["output.dir"] = str(tmp_path / "results")
        config["strategy.fraction-train"] = 1.0  # all 4 SuperNodes train: 4 ClientApp calls, 2 actors
        with processes.isolated_flwr() as env:
            env["RAY_ADDRESS"] = cluster.address  # captured by the SuperLink that `flwr run` starts
            result = launch.run_app(
                REPO_ROOT, config, num_supernodes=4, env=env, timeout=600, client_resources={"num-cpus": 1}
            )
        records = _gcs_records(cluster.address, processes.flwr_env({MARKER: str(cluster.temp_dir)}))
        stopping = time.time()
    ended = time.time()
    total, stop_s = ended - started, ended - stopping
    assert len(cluster.stopped) >= 8, cluster.stopped  # per node at least raylet, 2 agents, log monitor
    assert not cluster.survivors, f"cluster processes outlived the test: {cluster.survivors}"

    assert result.status == "finished:completed"
    run_dirs = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    assert len(run_dirs) == 1 and (run_dirs[0] / "peft_1" / "adapter_config.json").is_file()

    # the cluster's two nodes, both alive to the end: one raylet under each --temp-dir given above
    node_temp_dirs = {node["id"]: _node_temp_dir(node["raylet_socket"], cluster.temp_dir)
                      for node in records["nodes"] if node["alive"]}
    assert sorted(node_temp_dirs.values()) == [cluster.temp_dir / "head", cluster.temp_dir / "worker"], records["nodes"]
    nodes = set(node_temp_dirs)
    actors = [a for a in records["actors"] if a["class"] == CLIENT_ACTOR]
    assert {a["node"] for a in actors} == nodes, actors  # one actor per 1-CPU node
    calls = [t for t in records["tasks"] if t["name"] == f"{CLIENT_ACTOR}.run" and t["finished"]]
    per_node = {node: sum(t["node"] == node for t in calls) for node in nodes}
    assert len(calls) == 4, calls  # one ClientApp call per SuperNode
    assert all(count >= 1 for count in per_node.values()), per_node  # client work ran on both nodes
    print(
        f"\nRay cluster up {cluster_up:.1f} s; `flwr run` (submit to finished) {result.wall_time_s:.1f} s; "
        f"cluster stop {stop_s:.1f} s ({len(cluster.stopped)} processes); whole test {total:.1f} s; "
        f"ClientApp calls per node {sorted(per_node.values())}"
    )
