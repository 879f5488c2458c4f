"""Recipes: LoRA target modules, FFA-LoRA (frozen A), projected communication, and the presets in configs/.

Target modules and the frozen-A protocol are checked in-process against the same functions the
ServerApp and ClientApp call; the session's shared real `flwr run` with frozen A (4-bit base, fp16
transport: `quantized_frozen_a_fp16_run` in conftest.py) shows it end to end (checkpoints, what
travels, what is recorded). The presets are parsed as `flwr run --run-config FILE` and
the app would, and the leaderboard recipes' communication is projected from the published
shapes of their models (configs/model-configs.json), without downloading anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, smoke_config
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flowertune_finance import adapters, client_app, models
from flowertune_finance.checkpoint import ADAPTER_WEIGHTS, CheckpointError, save_checkpoint
from flowertune_finance.communication import MB, PROJECTION_FILE, project_communication, record_bytes
from flowertune_finance.config import ConfigError, ModelConfig, parse_run_config
from flowertune_finance.dev.tiny import build_tiny_model
from flowertune_finance.leaderboard import COMMUNICATION_BUDGET_MB
from flowertune_finance.metrics import read_metrics
from flowertune_finance.server_app import RoundRecorder, start_run
from flowertune_finance.strategy import build_strategy
from flowertune_finance.tools import presets
from flowertune_finance.tools.run_config_check import app_default_config
from flowertune_finance.worker_cache import WORKER_CACHE

PRESETS = sorted((REPO_ROOT / "configs").glob("*.toml"))
NOT_FOR_THE_LEADERBOARD = {"cpu-smoke.toml"}  # a tiny local model: no leaderboard recipe
LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def lora_modules(adapter) -> set[str]:
    """The module names (last component) that carry LoRA weights, e.g. {"q_proj", "v_proj"}."""
    return {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in adapter}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), architecture="llama")


# --- model.lora.target-modules -----------------------------------------------------------------------


@pytest.mark.parametrize("quantization", [0, 4])
def test_all_linear_puts_lora_on_every_linear_projection(tiny_llama, quantization):
    config = ModelConfig(name=str(tiny_llama), quantization=quantization, lora_target_modules="all-linear")
    adapter, lora = adapters.initial_adapter(config)
    num_layers = AutoModelForCausalLM.from_pretrained(tiny_llama).config.num_hidden_layers
    assert lora_modules(adapter) == LLAMA_LINEAR
    for layer in range(num_layers):
        for name in LLAMA_LINEAR:
            part = "self_attn" if name in {"q_proj", "k_proj", "v_proj", "o_proj"} else "mlp"
            for matrix in ("lora_A", "lora_B"):
                assert f"base_model.model.model.layers.{layer}.{part}.{name}.{matrix}.weight" in adapter
    assert not any("lm_head" in key for key in adapter)  # PEFT's all-linear leaves the output head alone
    # the clients' (quantized) model gets exactly the adapter the server built without weights
    trained = adapters.get_adapter_state(models.build_peft_model(config))
    assert list(trained) == list(adapter) and all(trained[k].shape == adapter[k].shape for k in adapter)
    assert {name.rsplit(".", 1)[-1] for name in lora.target_modules} == LLAMA_LINEAR


def test_listed_target_modules_get_lora_and_nothing_else(tiny_llama):
    config = ModelConfig(name=str(tiny_llama), quantization=0, lora_target_modules="q_proj, k_proj,down_proj")
    adapter, lora = adapters.initial_adapter(config)
    assert lora_modules(adapter) == {"q_proj", "k_proj", "down_proj"}
    assert sorted(lora.target_modules) == ["down_proj", "k_proj", "q_proj"]
    default, _ = adapters.initial_adapter(ModelConfig(name=str(tiny_llama), quantization=0))
    assert lora_modules(default) == {"q_proj", "v_proj"}  # empty: PEFT's default for the architecture


def test_checkpoint_of_an_all_linear_run_loads_with_plain_peft(tiny_llama, tmp_path):
    config = ModelConfig(name=str(tiny_llama), quantization=0, lora_target_modules="all-linear")
    adapter, lora = adapters.initial_adapter(config)
    adapter = {k: v + 0.01 * torch.randn_like(v) for k, v in adapter.items()}
    path = save_checkpoint(tmp_path, 1, adapter, lora, {})
    loaded = adapters.get_adapter_state(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), path))
    assert set(loaded) == set(adapter) and all(torch.equal(loaded[k], adapter[k]) for k in adapter)


def test_unknown_target_module_stops_the_run_at_start_naming_it(tiny_model, tmp_path):
    results = tmp_path / "results"
    run_config = smoke_config(tiny_model, results, **{"model.lora.target-modules": "q_proj,qkv_proj"})
    with pytest.raises(ConfigError) as refused:
        start_run(run_config, num_partitions=50)
    message = str(refused.value)
    assert "'model.lora.target-modules'" in message and "'qkv_proj' matches no linear module" in message
    assert "'q_proj'" not in message  # only the culprit is named as unmatched
    for name in sorted(LLAMA_LINEAR):  # the tiny Mistral's linear modules are listed
        assert name in message
    assert not results.exists() or not any(results.iterdir()), "a refused run created a run folder"


@pytest.mark.parametrize("value", ["q_proj,,v_proj", "q proj", "all_linear!", ","])
def test_malformed_target_modules_are_refused_by_the_config(value):
    with pytest.raises(ConfigError, match=r"'model\.lora\.target-modules' = .* not allowed; allowed: .*all-linear"):
        parse_run_config({"model.lora.target-modules": value})


# --- model.lora.freeze-a (FFA-LoRA) --------------------------------------------------------------------


class _Grid:
    def __init__(self, num_nodes: int) -> None:
        self.num_nodes = num_nodes

    def get_node_ids(self):
        return list(range(1, self.num_nodes + 1))


def _client_context(run_config: dict, partition_id: int) -> Context:
    return Context(run_id=1, node_id=partition_id + 1, node_config={"partition-id": partition_id, "num-partitions": 50},
                   state=RecordDict(), run_config=run_config)


@pytest.fixture
def message_identity(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)  # Flower needs an identity to create messages in-process


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedavgm"])
def test_frozen_a_round_with_every_strategy_and_fp16(tiny_model, tmp_path, message_identity, strategy):
    """One in-process round as the apps run it: only B travels (fp16), clients derive A, the
    checkpoint holds the unchanged A and the new B and loads with plain PEFT."""
    run_config = smoke_config(tiny_model, tmp_path / "results", **{
        "model.lora.freeze-a": True, "train.transport-dtype": "float16", "strategy.name": strategy,
        "train.learning-rate-max": 1e-2, "train.learning-rate-min": 1e-2})
    config, run, _ = start_run(run_config, num_partitions=50)
    a_keys = {k for k in run.adapter if ".lora_A." in k}
    b_keys = set(run.adapter) - a_keys
    assert a_keys and set(run.frozen_a) == a_keys and set(run.travelling()) == b_keys
    server = build_strategy(config.strategy, transport_dtype=config.train.transport_dtype)
    messages = list(server.configure_train(1, ArrayRecord(run.travelling()), run.round_config(), _Grid(50)))
    assert len(messages) == 5
    sent = messages[0].content["arrays"]
    assert set(sent) == b_keys and {array.dtype for array in sent.values()} == {"float16"}
    assert messages[0].content["config"][adapters.FROZEN_A_CHECKSUM_KEY] == adapters.adapter_checksum(run.frozen_a)

    replies = [client_app.train(message, _client_context(run_config, i)) for i, message in enumerate(messages[:2])]
    for reply in replies:
        assert set(reply.content["arrays"]) == b_keys and reply.content["arrays"].count_bytes() == sent.count_bytes()
    model = models.cached_peft_model(config.model)  # the worker's model after its last client call
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            assert not param.requires_grad and param.dtype == torch.float32
    trained_a = adapters.split_frozen(adapters.get_adapter_state(model))[0]
    assert all(torch.equal(trained_a[k], run.frozen_a[k]) for k in a_keys), "local training moved A"

    arrays, _ = server.aggregate_train(1, replies)
    stats = server.rounds[1]
    assert stats.accepted == 2 and stats.rejected == 0
    assert set(arrays) == b_keys and {array.dtype for array in arrays.values()} == {"float32"}
    assert stats.mb_sent == pytest.approx(5 * record_bytes({k: run.adapter[k].shape for k in b_keys}, "float16") / MB)
    RoundRecorder(config, run, server).save(1, arrays)
    saved = load_file(run.run_dir / "peft_1" / ADAPTER_WEIGHTS)
    assert set(saved) == set(run.adapter)
    assert all(torch.equal(saved[k], run.frozen_a[k]) for k in a_keys)
    assert all(saved[k].abs().sum() > 0 for k in b_keys), "B did not move from its zero initialisation"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run.run_dir / "peft_1")
    loaded = adapters.get_adapter_state(peft_model)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def _train_message(run, server_round: int = 1, **config_changes) -> Message:
    config = run.round_config()
    config["server-round"] = server_round
    for key, value in config_changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    return Message(RecordDict({"arrays": ArrayRecord(run.travelling()), "config": config}), dst_node_id=1,
                   message_type="train")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({adapters.FROZEN_A_CHECKSUM_KEY: "0" * 64},
         (r"frozen LoRA A matrices derived on this node \(sha256 [0-9a-f]{16}\.\.\.\) differ from the server's "
         r"\(sha256 0000000000000000")),
        ({adapters.FROZEN_A_CHECKSUM_KEY: None}, r"freeze-a is true but the round's config carries no 'lora-a-sha256'"),
    ],
)
def test_frozen_a_checksum_mismatch_fails_before_training(tiny_model, tmp_path, message_identity, change, match):
    run_config = smoke_config(tiny_model, tmp_path / "results", **{"model.lora.freeze-a": True})
    _, run, _ = start_run(run_config, num_partitions=50)
    loads = WORKER_CACHE.base_model_loads
    WORKER_CACHE.clear()
    with pytest.raises(adapters.FrozenAdapterMismatch, match=match):
        client_app.train(_train_message(run, **change), _client_context(run_config, 0))
    assert WORKER_CACHE.base_model_loads == loads, "the client loaded the base model before checking A"


def test_a_client_whose_a_differs_is_caught(tiny_model, tmp_path, message_identity, monkeypatch):
    """The check is on what the client actually derives: a different initialisation there fails."""
    run_config = smoke_config(tiny_model, tmp_path / "results", **{"model.lora.freeze-a": True})
    _, run, _ = start_run(run_config, num_partitions=50)
    other = {k: v + 1e-7 for k, v in adapters.frozen_lora_a(parse_run_config(run_config).model).items()}
    monkeypatch.setattr(adapters, "frozen_lora_a", lambda model_config: other)  # what a client with another torch derives
    with pytest.raises(adapters.FrozenAdapterMismatch, match="refusing to train on a different A"):
        client_app.train(_train_message(run), _client_context(run_config, 0))


def test_frozen_a_resumes_from_its_checkpoint_and_refuses_a_changed_a(tiny_model, tmp_path):
    run_config = smoke_config(tiny_model, tmp_path / "results", **{"model.lora.freeze-a": True, "num-server-rounds": 4})
    config, run, _ = start_run(run_config)
    trained_b = {k: torch.full_like(v, 0.5) for k, v in run.travelling().items()}
    recorder = RoundRecorder(config, run, build_strategy(config.strategy))
    run.history.append({"round": 2, "train_loss": 1.0})
    recorder.save(2, ArrayRecord(trained_b))

    _, resumed, _ = start_run({**run_config, "resume.from": str(run.run_dir)})
    assert resumed.start_round == 2
    assert set(resumed.travelling()) == set(trained_b)
    assert all(torch.equal(resumed.travelling()[k], trained_b[k]) for k in trained_b)
    assert all(torch.equal(resumed.frozen_a[k], run.frozen_a[k]) for k in run.frozen_a)
    assert resumed.round_config()[adapters.FROZEN_A_CHECKSUM_KEY] == run.round_config()[adapters.FROZEN_A_CHECKSUM_KEY]
    assert (run.run_dir / "projected_communication.from-round-2.json").is_file()

    # a checkpoint whose A is not the seeded initialisation (another torch, a hand-edited file) is refused
    changed = {**run.full_adapter(ArrayRecord(trained_b))}
    first_a = next(iter(run.frozen_a))
    changed[first_a] = changed[first_a] + 1e-3
    state = json.loads((run.run_dir / "peft_2" / "run_state.json").read_text())
    save_checkpoint(run.run_dir, 3, changed, run.lora, {k: v for k, v in state.items() if k != "round"})
    with pytest.raises(CheckpointError, match=r"A matrices of peft_3 .* differ from the seeded initialisation"):
        start_run({**run_config, "resume.from": str(run.run_dir)})
    # freeze-a is part of the model settings: resuming a frozen-A run without it is refused
    with pytest.raises(CheckpointError, match="settings that define the run differ"):
        start_run({**run_config, "model.lora.freeze-a": False, "resume.from": str(run.run_dir)})


def test_frozen_a_through_flwr_run(quantized_frozen_a_fp16_run, tiny_model):
    """The real apps: A bit-identical in every checkpoint (and equal to what clients derive), B
    trained, and the MB recorded per round what B alone costs in fp16; the projection matches the total.
    The run (conftest.RECIPE_RUN_CONFIG: 5 SuperNodes that all train, 4 rounds, a checkpoint every 2, the
    base in 4 bits, fp16 transport) is shared with test_resume, test_smoke_run and test_performance."""
    result, run_dir = quantized_frozen_a_fp16_run
    assert result.status == "finished:completed"
    first, second = (load_file(run_dir / f"peft_{r}" / ADAPTER_WEIGHTS) for r in (2, 4))
    derived = adapters.frozen_lora_a(ModelConfig(name=str(tiny_model), quantization=4, lora_freeze_a=True))
    a_keys = set(derived)
    b_keys = set(first) - a_keys
    assert a_keys and b_keys and set(first) == set(second) == a_keys | b_keys
    assert all(torch.equal(first[k], derived[k]) and torch.equal(second[k], derived[k]) for k in a_keys)
    assert all(first[k].abs().sum() > 0 for k in b_keys)
    assert any(not torch.equal(first[k], second[k]) for k in b_keys), "B did not change between rounds"

    b_mb = record_bytes({k: tuple(first[k].shape) for k in b_keys}, "float16") / MB
    full_mb = record_bytes({k: tuple(first[k].shape) for k in first}, "float16") / MB
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert record["clients_sampled"] == 5 and record["clients_accepted"] == 5  # fraction-train 1.0
        assert record["mb_sent"] == pytest.approx(5 * b_mb) and record["mb_received"] == pytest.approx(5 * b_mb)
    assert b_mb < 0.5 * full_mb  # q_proj/v_proj of the tiny Mistral (v has half q's outputs): B is 3/7 of it
    # 4 rounds x 5 clients x (B down + B up)
    assert records[0]["projected_mb"] == pytest.approx(records[-1]["cumulative_mb"]) == pytest.approx(40 * b_mb)
    assert "projected_mb" not in records[1]
    plan = json.loads((run_dir / PROJECTION_FILE).read_text())
    assert plan["projected_mb"] == pytest.approx(40 * b_mb) and plan["freeze_a"] and plan["within_budget"]
    assert plan["clients_per_round"] == 5 and plan["num_supernodes"] == 5 and plan["rounds"] == 4
    loaded = adapters.get_adapter_state(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                                                run_dir / "peft_4"))
    assert all(torch.equal(loaded[k], second[k]) for k in second)


# --- projected communication -------------------------------------------------------------------------


def test_projection_counts_what_the_strategy_counts(tiny_model, tmp_path):
    both = {"model.lora.freeze-a": True, "train.transport-dtype": "float16", "strategy.fraction-train": 0.5}
    for overrides in ({}, {"train.transport-dtype": "float16"}, {"model.lora.freeze-a": True}, both):
        run_config = smoke_config(tiny_model, tmp_path / "results", **overrides)
        config, run, _ = start_run(run_config, num_partitions=50)
        dtype = getattr(torch, config.train.transport_dtype)
        wire = ArrayRecord({k: v.to(dtype) for k, v in run.travelling().items()}).count_bytes() / MB
        plan = run.projection
        assert plan.mb_per_client_each_way == pytest.approx(wire, rel=1e-12)
        assert plan.clients_per_round == max(int(50 * config.strategy.fraction_train), 2)
        assert plan.projected_mb == pytest.approx(wire * 2 * plan.clients_per_round * 3)
        saved = json.loads((run.run_dir / PROJECTION_FILE).read_text())
        assert saved["projected_mb"] == pytest.approx(plan.projected_mb) and saved["start_round"] == 0


def test_over_budget_projection_warns_in_one_line_and_still_runs(tiny_model, tmp_path):
    run_config = smoke_config(tiny_model, tmp_path / "results", **{"num-server-rounds": 10**8})
    _, run, _ = start_run(run_config, num_partitions=50)  # no refusal
    warning = run.projection.warning()
    assert warning and "\n" not in warning
    assert re.match(r"Projected communication [\d,]+ MB exceeds the leaderboard budget of 200,000 MB", warning)
    assert not json.loads((run.run_dir / PROJECTION_FILE).read_text())["within_budget"]


# --- presets -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def defaults() -> dict:
    return app_default_config(REPO_ROOT)


def preset_config(defaults: dict, *items: str | Path):
    """The app's config for presets/overrides stacked on the pyproject defaults, as a run would see it."""
    overrides = presets.merge_run_configs([str(item) for item in items])
    unknown = sorted(set(overrides) - set(defaults))
    assert not unknown, f"Flower rejects keys missing from pyproject.toml: {unknown}"
    return parse_run_config({**defaults, **overrides})


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"template.toml", "aligned-prompt.toml", "qwen25-7b-all-linear.toml",
                                         "frozen-a.toml", "cpu-smoke.toml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_parses_and_leaderboard_recipes_fit_the_budget(defaults, preset):
    config = preset_config(defaults, preset)
    text = preset.read_text()
    for line in text.splitlines():  # dotted keys quoted: a line per key, as Flower's flatten reads it
        assert not line.strip() or line.startswith(("#", '"')), line
    if preset.name in NOT_FOR_THE_LEADERBOARD:
        return
    assert config.dataset_name == "flwrlabs/fingpt-sentiment-train" and not config.dataset_path
    plan = project_communication(config, 50, hf_config=presets.published_model_config(config.model.name))
    assert plan.projected_mb <= COMMUNICATION_BUDGET_MB, f"{preset.name}: {plan.summary()}"
    stated = re.search(r"Projected communication(?: on the template)?: ([\d,]+) MB", text)
    assert stated, f"{preset.name} does not state its projected communication"
    assert int(stated.group(1).replace(",", "")) == round(plan.projected_mb), plan.summary()


def test_template_preset_is_the_app_defaults(defaults):
    overrides = presets.read_run_config(REPO_ROOT / "configs" / "template.toml")
    assert {key: defaults[key] for key in overrides} == overrides


def test_qwen_preset_is_the_reported_recipe_and_its_reported_communication(defaults):
    config = preset_config(defaults, REPO_ROOT / "configs" / "qwen25-7b-all-linear.toml")
    model = config.model
    assert (model.name, model.quantization, model.lora_r, model.lora_alpha, model.lora_target_modules) == (
        "Qwen/Qwen2.5-7B", 4, 32, 64, "all-linear")
    assert (config.strategy.name, config.num_server_rounds) == ("fedavg", 10)
    assert (config.train.learning_rate_max, config.train.learning_rate_min) == (5e-4, 5e-5)
    plan = project_communication(config, 50, hf_config=presets.published_model_config(model.name))
    assert plan.projected_mb == pytest.approx(30_807, abs=1)  # the entry reports 30,807 MB
    shapes = adapters.adapter_shapes(model, presets.published_model_config(model.name))
    assert lora_modules(shapes) == LLAMA_LINEAR and len(shapes) == 2 * 7 * 28


@pytest.mark.parametrize(
    ("items", "expected_mb"),
    [
        (["frozen-a.toml", "train.transport-dtype='float16'"], 20_023),
        (["qwen25-7b-all-linear.toml", "frozen-a.toml"], 16_979),
        (["qwen25-7b-all-linear.toml", "frozen-a.toml", "train.transport-dtype='float16'"], 8_491),
        (["template.toml", "model.lora.target-modules='all-linear'", "model.lora.freeze-a=true",
          "train.transport-dtype='float16'"], 168_081),
    ],
)
def test_stacked_presets_and_their_communication(defaults, items, expected_mb):
    paths = [REPO_ROOT / "configs" / item if item.endswith(".toml") else item for item in items]
    config = preset_config(defaults, *paths)
    plan = project_communication(config, 50, hf_config=presets.published_model_config(config.model.name))
    assert round(plan.projected_mb) == expected_mb and plan.within_budget


def test_mistral_all_linear_in_fp32_is_over_budget_and_said_so(defaults):
    config = preset_config(defaults, REPO_ROOT / "configs" / "template.toml", "model.lora.target-modules='all-linear'")
    plan = project_communication(config, 50, hf_config=presets.published_model_config(config.model.name))
    assert round(plan.projected_mb) == 640_162 and not plan.within_budget and "exceeds" in plan.warning()


def test_merge_tool_writes_one_checked_file_and_never_overwrites(tmp_path, capsys):
    output = tmp_path / "run.toml"
    items = [str(REPO_ROOT / "configs" / "qwen25-7b-all-linear.toml"), str(REPO_ROOT / "configs" / "frozen-a.toml"),
             "num-server-rounds=20"]
    assert presets.main([*items, "-o", str(output), "--app-dir", str(REPO_ROOT)]) == 0
    merged = presets.read_run_config(output)
    assert merged["model.lora.freeze-a"] is True and merged["num-server-rounds"] == 20
    assert merged["model.lora.target-modules"] == "all-linear"
    before = output.read_bytes()
    with pytest.raises(SystemExit):
        presets.main([*items, "-o", str(output), "--app-dir", str(REPO_ROOT)])
    assert output.read_bytes() == before
    assert presets.main(["model.lora.target-modules='q proj'", "-o", str(tmp_path / "bad.toml"),
                         "--app-dir", str(REPO_ROOT)]) == 2
    assert "model.lora.target-modules" in capsys.readouterr().err and not (tmp_path / "bad.toml").exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_a_checkpoint_from_before_these_settings_resumes_as_the_default_adapter(tiny_model, tmp_path):
    run_config = smoke_config(tiny_model, tmp_path / "results", **{"num-server-rounds": 4})
    config, run, _ = start_run(run_config)
    run.history.append({"round": 2, "train_loss": 1.0})
    RoundRecorder(config, run, build_strategy(config.strategy)).save(2, ArrayRecord(run.adapter))
    state_file = run.run_dir / "peft_2" / "run_state.json"
    state = json.loads(state_file.read_text())
    for key in ("lora_target_modules", "lora_freeze_a"):
        del state["settings"]["model"][key]  # as written before the keys existed
    state_file.write_text(json.dumps(state))
    _, resumed, _ = start_run({**run_config, "resume.from": str(run.run_dir)})
    assert resumed.start_round == 2 and resumed.frozen_a is None
    with pytest.raises(CheckpointError, match=r"settings that define the run differ .*model"):
        start_run({**run_config, "model.lora.target-modules": "all-linear", "resume.from": str(run.run_dir)})
