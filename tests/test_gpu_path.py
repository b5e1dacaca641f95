"""The GPU path's faults that a CPU can show: the DDP all-reduce's device, the bf16 probe, the schedule after the batch
size finder, training's and validation's peak memory apart, experiment=compare from the hub, FSDP on one device,
adapters saved under FSDP, what FSDP cannot train (4-bit weights; frozen ones unsharded), checkpoint writing timed
apart, callbacks=none, QLoRA's compute dtype, the dependency ranges.
(FSDP on two processes: tests/test_scale.py.)"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import lightning as L
import pytest
import tomllib
import torch
from hydra.utils import instantiate

from conftest import compose_config
from flan_squad.runs.cost import CostMonitor
from flan_squad.runs.trainer import full_model_on_rank_zero
from flan_squad.train import train
from flan_squad.utils.config import PROJECT_ROOT
from flan_squad.utils.precision import auto_precision


class _Strategy:
    """What CostMonitor uses of a Lightning strategy; `reduce` records the device of the tensor it is given."""

    def __init__(self, root_device: torch.device):
        self.root_device, self.reduced_on = root_device, None

    def reduce(self, tensor, reduce_op):
        self.reduced_on = tensor.device
        return torch.tensor([6.0, 60.0])


class _Trainer:
    """What CostMonitor uses of a Lightning Trainer."""

    def __init__(self, root_device: torch.device):
        self.strategy, self.sanity_checking = _Strategy(root_device), False

    def save_checkpoint(self, filepath, weights_only=False) -> None:  # timed by CostMonitor
        pass


def test_throughput_counts_are_all_reduced_on_the_root_device():
    # NCCL all-reduces CUDA tensors only: a CPU tensor there fails at the end of training, before any result is
    # written. "meta" stands in for a CUDA device on this CPU machine.
    trainer, monitor = _Trainer(torch.device("meta")), CostMonitor()
    monitor.on_train_start(trainer, None)
    monitor.on_train_batch_end(trainer, None, None, {"ids": [1, 2], "attention_mask": torch.ones(2, 3),
                                                     "labels": torch.zeros(2, 1)}, 0)
    monitor.on_train_end(trainer, None)
    assert trainer.strategy.reduced_on == torch.device("meta")
    assert (monitor.examples, monitor.tokens) == (6, 60)  # the sum over processes


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_bf16_that_a_gpu_only_emulates_is_not_taken_as_native(native, expected, monkeypatch):
    # torch's probe says yes by default also on V100/T4 (compute capability 7.x), which only emulate bf16.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert auto_precision("gpu") == expected


def test_bf16_probe_of_a_torch_without_the_emulation_argument(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert auto_precision("gpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert auto_precision("gpu") == "bf16-mixed"


class SchedulePlan(L.Callback):
    """Records, as training starts, how many steps the schedule was built for and how many training will take."""

    def on_train_start(self, trainer, pl_module) -> None:
        schedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]  # transformers' partial
        steps = len(trainer.train_dataloader) * trainer.max_epochs
        SchedulePlan.seen = (schedule.keywords["num_training_steps"], steps, trainer.datamodule.batch_size)


@pytest.mark.long
@pytest.mark.slow  # trains through the entry point
def test_schedule_is_sized_for_the_batch_size_the_finder_picks(tmp_path, cache_dir):
    cfg = compose_config(["experiment=smoke", "strategy=lora", "dataset.limit_train=16", "dataset.limit_val=4",
                          "dataset.batch_size=2", "trainer.max_epochs=2", "eval.max_new_tokens=4",
                          "trainer.auto_batch_size=true", "trainer.auto_batch_size_max=8", "logger=none",
                          "callbacks=none", "+callbacks.plan._target_=test_gpu_path.SchedulePlan"],
                         output_dir=tmp_path, cache=cache_dir)
    metrics = train(cfg)
    total_steps, steps, batch_size = SchedulePlan.seen
    assert batch_size == metrics["batch_size"] == 8  # 2 and 4 tried, 8 the ceiling: 2 steps per epoch, not 8
    assert total_steps == steps == metrics["optimizer_steps"] == 4


class _State:
    fn = "fit"


def _touch(megabytes: int) -> torch.Tensor:
    return torch.ones(megabytes * 2**20 // 4)  # written, so resident


def test_training_and_validation_peak_memory_are_reported_apart():
    trainer, monitor = _Trainer(torch.device("cpu")), CostMonitor()
    trainer.state = _State()
    monitor.on_train_start(trainer, None)
    base = monitor.peak.read_mb()
    training = _touch(100)
    del training
    monitor.on_validation_start(trainer, None)
    validation = _touch(300)  # generation at the eval batch size
    del validation
    monitor.on_validation_end(trainer, None)
    training = _touch(50)  # the next epoch
    del training
    monitor.on_train_end(trainer, None)
    result = monitor.as_dict()
    assert base + 90 < result["peak_memory_mb"] < base + 200  # training's 100 MB, not validation's 300
    assert result["peak_val_memory_mb"] > base + 290
    assert result["peak_memory_kind"] == "rss"


def test_compare_preset_trains_on_the_official_squad_from_the_hub(tmp_path):
    cfg = compose_config(["experiment=compare"], output_dir=tmp_path)
    assert cfg.dataset.train_file is None and cfg.dataset.validation_file is None
    assert cfg.dataset.hub_id == "rajpurkar/squad" and cfg.model.name == "flan-t5-base"


@pytest.mark.slow  # trains through the entry point
def test_qlora_export_says_it_is_not_the_scored_model_and_is_scored_beside_it(tmp_path, cache_dir, run_entry_point):
    from transformers import AutoModelForSeq2SeqLM

    from flan_squad.evaluate import evaluate
    from flan_squad.runs.restore import load_run

    settings = ["experiment=smoke", "dataset.limit_val=8", "eval.max_new_tokens=6", "trainer.precision=32-true"]
    run_dir = tmp_path / "qlora"
    train(compose_config([*settings, "strategy=qlora", "dataset.limit_train=16", "trainer.max_epochs=1",
                          "callbacks=none", "logger=none"], output_dir=run_dir, cache=cache_dir))
    result = run_entry_point("flan_squad.export", [f"run_dir={run_dir}", f"output_dir={tmp_path / 'export'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    note = json.loads((tmp_path / "export" / "flan_squad_export.json").read_text())["note"]
    assert note and "not the model the run scored" in note and f"NOTE: {note}" in result.stdout

    # It really is another model: the run's dequant(NF4(W)) + BA against the export's W + BA.
    run = load_run(run_dir, torch.device("cpu"))
    exported = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "export").eval()
    batch = run.tokenizer(["question: Where is it? context: It is in Paris."], return_tensors="pt")
    labels = run.tokenizer(["Paris"], return_tensors="pt").input_ids
    with torch.no_grad():
        gap = (run.model(**batch, labels=labels).logits - exported(**batch, labels=labels).logits).abs().max()
    assert gap > 1e-3  # a LoRA export matches its run within 1e-4 (tests/test_evaluate.py)

    # ... and it is scored through the same path, on the same questions, beside the run's score.
    scored = evaluate(compose_config([*settings, f"model.name_or_path={tmp_path / 'export'}", "model.init=pretrained"],
                                     output_dir=tmp_path / "eval", cache=cache_dir, config_name="evaluate"))
    ran = json.loads((run_dir / "metrics.json").read_text())
    assert scored["total"] == ran["total"] == 8 and 0 <= scored["f1"] <= 100
    answered = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert answered.keys() == json.loads((run_dir / "predictions.json").read_text()).keys()


def test_fsdp_on_one_gpu_gathers_the_model_without_offloading(monkeypatch):
    # torch makes any sharding NO_SHARD on one device, and refuses to offload an unsharded model to the CPU
    # (NotImplementedError): FSDP on one GPU crashed after validation, before model/ and metrics.json. A one-process
    # gloo group and a strategy that says it is on a GPU, which is all the choice of offloading reads.
    import torch.distributed as dist
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        root = FullyShardedDataParallel(torch.nn.Linear(4, 3), device_id=torch.device("cpu"))  # FULL_SHARD asked
        assert root.sharding_strategy == ShardingStrategy.NO_SHARD
        strategy = FSDPStrategy()
        strategy.model = root
        monkeypatch.setattr(FSDPStrategy, "root_device", property(lambda self: torch.device("cuda", 0)))
        with full_model_on_rank_zero(SimpleNamespace(strategy=strategy)):
            assert sum(p.numel() for p in root.parameters()) == 15
    finally:
        dist.destroy_process_group()


def test_fsdp_adapters_are_saved_from_the_gathered_model(tmp_path, tiny_base, monkeypatch):
    # PEFT finds its adapters by its modules' names, which under FSDP carry the wrappers' `_fsdp_wrapped_module.`
    # while the state dict's keys do not: model/adapter_model.safetensors was written with no tensor. The LoRA model
    # wrapped as training wraps it (each T5 block), in a one-process gloo group, saved inside the gather.
    import torch.distributed as dist
    from lightning.pytorch.strategies import FSDPStrategy
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel

    from conftest import make_strategy
    from flan_squad.runs.trainer import t5_fsdp_strategy

    strategy = make_strategy("lora")
    model = strategy.build(tiny_base, torch.device("cpu"))
    for name, parameter in model.named_parameters():
        if ".lora_B." in name:  # as trained: B starts at 0
            torch.nn.init.normal_(parameter)
    trained = {name.replace(".default.", "."): p.detach().clone() for name, p in model.named_parameters()
               if p.requires_grad}
    monkeypatch.setattr(FSDPStrategy, "root_device", property(lambda self: torch.device("cpu")))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fsdp = t5_fsdp_strategy()  # its kwargs: what Lightning wraps with (T5 blocks, original parameters)
        fsdp.model = FullyShardedDataParallel(torch.nn.ModuleDict({"model": model}), device_id=torch.device("cpu"),
                                              **fsdp.kwargs)
        assert any("_fsdp_wrapped_module." in name for name, _ in model.named_parameters())
        with full_model_on_rank_zero(SimpleNamespace(strategy=fsdp)):
            strategy.save(model, tiny_base.load_tokenizer(), tmp_path)
    finally:
        dist.destroy_process_group()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[name], trained[name]) for name in trained)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, refusal, advice", [
    (["strategy=qlora"], "strategy=qlora with trainer=fsdp", "trainer=ddp"),
    (["strategy=lora"], "strategy=lora with trainer=fsdp", "trainer=gpu on one device"),
    (["strategy=full", "model.compile=true"], "model.compile=true with trainer=fsdp", "model.compile=false"),
])
def test_fsdp_refuses_what_it_cannot_train_before_anything_trains(tmp_path, cache_dir, run_entry_point, overrides,
                                                                   refusal, advice):
    # QLoRA: FSDP cannot flatten 4-bit (integer) weights: it crashed at wrapping, after the model was built. LoRA on
    # one device (unsharded): torch's FSDP left the frozen base weights as plain tensors after the first backward
    # pass, and the second step crashed ("as_params=True type(prim_param)=<class 'torch.Tensor'>"). A compiled
    # model: the module compiles the model before FSDP wraps it.
    result = run_entry_point("flan_squad.train", [
        "experiment=smoke", *overrides, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.strategy._target_=fsdp_cpu.cpu_t5_fsdp_strategy", "logger=none", f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert refusal in message and advice in message
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model").exists()


SAVE_SECONDS = 1e4  # on the clock CostMonitor reads: far above anything a tiny run takes, on any machine's load


class SlowCheckpoint(L.Callback):
    """Writing a checkpoint takes SAVE_SECONDS (as a large model's takes long; its state is gathered inside
    `trainer.save_checkpoint`), on a clock of CostMonitor's that runs as the real one plus these seconds."""

    skipped = 0.0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        SlowCheckpoint.skipped += SAVE_SECONDS


@pytest.mark.slow  # trains through the entry point
def test_checkpoint_writing_is_not_timed_as_training(tmp_path, cache_dir, monkeypatch):
    # A last.ckpt after each of the 4 steps, and the best one after validation. Timed as training, a full
    # fine-tuning's checkpoints (the whole model) biased its examples/s.
    monkeypatch.setattr("flan_squad.runs.cost.time", SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + SlowCheckpoint.skipped))
    cfg = compose_config(["experiment=smoke", "strategy=lora", "dataset.limit_train=16", "dataset.limit_val=4",
                          "dataset.batch_size=4", "trainer.max_epochs=1", "eval.max_new_tokens=2", "logger=none",
                          "callbacks.last_checkpoint.every_n_train_steps=1",
                          "+callbacks.slow._target_=test_gpu_path.SlowCheckpoint"],
                         output_dir=tmp_path, cache=cache_dir)
    metrics = train(cfg)
    assert metrics["optimizer_steps"] == 4 and len(list((tmp_path / "checkpoints").glob("*.ckpt"))) == 2
    assert metrics["checkpoint_time_s"] >= 5 * SAVE_SECONDS
    assert 0 < metrics["train_time_s"] < SAVE_SECONDS


@pytest.mark.slow
def test_callbacks_none_writes_no_checkpoint(tmp_path, cache_dir):
    # Lightning adds a ModelCheckpoint of its own unless told not to: callbacks=none wrote checkpoints/, reloaded one.
    metrics = train(compose_config(["experiment=smoke", "strategy=lora", "dataset.limit_train=4", "dataset.limit_val=2",
                                    "dataset.batch_size=4", "trainer.max_epochs=1", "eval.max_new_tokens=2",
                                    "logger=none", "callbacks=none"], output_dir=tmp_path, cache=cache_dir))
    assert metrics["optimizer_steps"] == 1 and metrics["best_checkpoint"] is None
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_qlora_computes_in_the_trainers_precision(precision, dtype, tmp_path, tiny_base):
    # It followed the device: bf16 wherever bf16 is native, so trainer.precision=32-true on an H100 (or a CPU with
    # AVX512-BF16) computed the 4-bit layers in bf16, and bf16-mixed elsewhere in fp32.
    import bitsandbytes as bnb

    cfg = compose_config(["strategy=qlora", "trainer=cpu", f"trainer.precision={precision}"], output_dir=tmp_path)
    model = instantiate(cfg.strategy, _convert_="all").load_base(tiny_base, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {m.compute_dtype for m in layers} == {dtype}


def _ranges() -> dict:
    from packaging.requirements import Requirement

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name.lower(): Requirement(r).specifier for r in project["dependencies"]}


def test_accelerate_range_starts_where_transformers_needs_it():
    # transformers loads with device_map (QLoRA's 4-bit weights) only from this accelerate on.
    from packaging.version import Version
    from transformers.utils.import_utils import ACCELERATE_MIN_VERSION

    floors = [Version(s.version) for s in _ranges()["accelerate"] if s.operator == ">="]
    assert floors and max(floors) >= Version(ACCELERATE_MIN_VERSION)


@pytest.mark.parametrize("tested", ["constraints-cpu.txt", "requirements-gpu-image.txt"])
def test_dependency_ranges_hold_the_tested_versions(tested):
    # pyproject.toml's ranges say what was tested: the CPU set and the GPU image's (make gpu-rehearsal).
    ranges = _ranges()
    pins = [line.split("#")[0].strip().split("==") for line in (PROJECT_ROOT / tested).read_text().splitlines()]
    pinned = {name.lower().replace("_", "-"): version for name, version in (p for p in pins if len(p) == 2)}
    checked = {name: version for name, version in pinned.items() if name in ranges}
    assert {"torch", "transformers", "peft", "accelerate"} <= set(checked)
    assert {name: version for name, version in checked.items() if not ranges[name].contains(version)} == {}
