"""The app on Flower's Deployment Engine: a real SuperLink and SuperNodes on 127.0.0.1, TLS, node auth.

One deployment (module-scoped) serves every test here, to pay the process start-ups once:
a SuperLink with TLS and SuperNode authentication, and three registered SuperNodes — two with a
partition of the run config's `dataset.path`, one with only its own local file (`dataset-path`). The
run test (a round over TLS, a SuperNode killed in it) runs last because it leaves two SuperNodes. Every
process is killed at the end, and the fixture checks that none is left.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flowertune_finance.config import parse_run_config
from flowertune_finance.dataset import DataError, load_partition
from flowertune_finance.dev import launch, synthetic
from flowertune_finance.dev.credentials import generate_node_keys
from flowertune_finance.dev.deployment import CONNECTION, MARKER, LocalDeployment
from flowertune_finance.dev.processes import processes_with_env
from flowertune_finance.metrics import read_metrics
from flowertune_finance.node_data import NodeData, node_data

REPO_ROOT = Path(__file__).resolve().parents[1]
OWN_ROWS = 40
FEDERATION_ROWS = 60
RECEIVED = "Receiving: train message"  # a SuperNode's log line when a round's instruction arrives
RUN_TIMEOUT = 600  # generous bound for a loaded 2-core machine; a quiet one needs far less


@pytest.fixture(scope="module")
def own_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data owner's own file in the fingpt schema (not a partition of anything)."""
    return synthetic.write_jsonl(synthetic.fingpt_rows(OWN_ROWS, seed=7), tmp_path_factory.mktemp("owner") / "own.jsonl")


@pytest.fixture(scope="module")
def federation_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run config's `dataset.path` that alice and bob partition; small, so each round's fresh ClientApp
    process loads and tokenizes little (the bundled 2,500-row sample costs seconds per node per round)."""
    path = tmp_path_factory.mktemp("federation") / "rows.jsonl"
    return synthetic.write_jsonl(synthetic.fingpt_rows(FEDERATION_ROWS, seed=11), path)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, own_file: Path):
    folder = tmp_path_factory.mktemp("deployment")
    with LocalDeployment(folder, supernode_auth=True) as running:
        running.start_superlink()
        node_configs = {
            "alice": {"partition-id": 0, "num-partitions": 2},
            "bob": {"partition-id": 1, "num-partitions": 2},
            "carol": {"dataset-path": str(own_file)},  # no partition keys: her whole file
        }
        for name, node_config in node_configs.items():
            private_key, public_key = generate_node_keys(folder / "keys", name)
            running.register_node(public_key)
            running.start_supernode(name, node_config, private_key, wait=False)
        for process in running.supernodes.values():
            running.wait_for_supernode(process)
        yield running
    assert processes_with_env(MARKER, str(folder)) == [], "deployment processes outlived the deployment"


def deployment_run_config(
    tiny_model: Path, federation_file: Path, output_dir: Path, rounds: int = 2, **overrides
) -> dict:
    """The smoke config for a deployment: every connected node trains each round (3 nodes, not 50)."""
    config = launch.smoke_run_config(REPO_ROOT, tiny_model, rounds=rounds)
    config.update({
        "output.dir": str(output_dir), "dataset.path": str(federation_file), "strategy.fraction-train": 1.0, **overrides,
    })
    return config


def only_run_dir(output_dir: Path) -> Path:
    runs = [path for path in output_dir.iterdir() if path.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def load_checkpoint(tiny_model: Path, checkpoint: Path) -> PeftModel:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), checkpoint)


def test_node_data_own_file_replaces_the_federation_data(own_file):
    node = node_data({"dataset-path": str(own_file)})
    assert node == NodeData(0, 1, str(own_file.resolve()))
    config = node.use_in(parse_run_config({"dataset.path": str(launch.SAMPLE_DATA)}))
    assert config.dataset_path == str(own_file.resolve())
    assert len(load_partition(node.partition_id, node.num_partitions, config.dataset_name, config.dataset_path)) == OWN_ROWS
    # with partition keys as well, the node takes that partition of its own file
    half = node_data({"dataset-path": str(own_file), "partition-id": 1, "num-partitions": 2})
    assert len(load_partition(half.partition_id, half.num_partitions, "", half.dataset_path)) == OWN_ROWS // 2
    # without dataset-path, the run config's data stays
    assert node_data({"partition-id": 3, "num-partitions": 50}).use_in(config) is config


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"dataset-path": "/nonexistent/mine.jsonl"},
         r"'/nonexistent/mine.jsonl' does not exist \(set by node config 'dataset-path'\)"),
        ({"dataset-path": 3}, r"'dataset-path' = 3 must be a quoted path"),
        ({"partition-id": 0}, r"lacks 'num-partitions'"),
        ({}, r"lacks 'partition-id', 'num-partitions' \(or 'dataset-path'\)"),
        ({"partition-id": 2, "num-partitions": 2}, r"partition-id 2 is out of range for num-partitions 2"),
        ({"partition-id": "0", "num-partitions": 2}, r"'partition-id' = '0' is not an integer"),
    ],
)
def test_bad_node_config_is_named(node_config, message):
    with pytest.raises(DataError, match=message):
        node_data(node_config)


def test_unregistered_supernode_cannot_join(deployment, tmp_path):
    registered = deployment.online_nodes()
    assert len(registered) == 3
    private_key, _ = generate_node_keys(tmp_path, "mallory")  # never registered
    mallory = deployment.start_supernode("mallory", {"partition-id": 0, "num-partitions": 2}, private_key, wait=False)
    assert deployment.wait_for_exit(mallory, timeout=120) != 0
    assert "Failed to activate SuperNode" in mallory.log()
    assert sorted(deployment.online_nodes()) == sorted(registered)


@pytest.mark.slow
def test_a_round_over_tls_with_authenticated_supernodes_completes_when_one_is_killed(
    deployment, tiny_model, federation_file, tmp_path
):
    """A round over TLS with the three authenticated SuperNodes: once its instruction reached bob, kills
    him (SIGKILL, his whole process group), and the round completes with the others' replies. Runs last,
    as it leaves two SuperNodes; one round, as each round costs a fresh ClientApp process per node.

    The round ends when the SuperLink declares bob offline: Flower 1.42's SuperNode sends a heartbeat
    every 17.5-22.5 s for a fixed 30 s interval, and the SuperLink marks a node offline 2 intervals after
    its last one, so that takes 38-60 s after the kill; neither side has a setting for it.
    """
    assert len(deployment.online_nodes()) == 3
    output_dir = tmp_path / "results"
    config = deployment_run_config(tiny_model, federation_file, output_dir, rounds=1)
    outcome: dict = {}

    def submit() -> None:
        try:
            outcome["result"] = launch.run_app(
                REPO_ROOT, config, env=deployment.env(), timeout=RUN_TIMEOUT, connection=CONNECTION, stream=False,
            )
        except launch.RunFailed as error:
            outcome["error"] = error

    bob = deployment.supernodes["bob"]
    received = bob.log().count(RECEIVED)  # his log holds the earlier runs too
    runner = threading.Thread(target=submit)
    runner.start()
    deadline = time.time() + RUN_TIMEOUT
    while bob.log().count(RECEIVED) < received + 1 and runner.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    assert runner.is_alive(), f"the run ended before bob received round 1: {outcome}"
    deployment.kill(bob, signal.SIGKILL)
    runner.join(RUN_TIMEOUT)

    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].status == "finished:completed"
    run_dir = only_run_dir(output_dir)
    (record,) = read_metrics(run_dir)
    # alice trains on her partition; carol has no partition keys, so she can only reply by training on her own file
    assert (record["clients_sampled"], record["clients_replied"], record["clients_failed"]) == (3, 2, 1)
    model = load_checkpoint(tiny_model, run_dir / "peft_1")
    assert any("lora_B" in name and parameter.abs().sum() > 0 for name, parameter in model.named_parameters())
    state = json.loads((run_dir / "peft_1" / "run_state.json").read_text())
    assert [r["round"] for r in state["history"]] == [1]
