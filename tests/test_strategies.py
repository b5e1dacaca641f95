"""Each strategy on a tiny random T5: what trains, that it learns, 4-bit storage, save/reload round trips."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from conftest import STRATEGY_NAMES, compose_config, make_strategy
from flan_squad.data.encoding import collate, encode
from flan_squad.data.prompts import UNANSWERABLE
from flan_squad.data.squad import Question
from flan_squad.evaluation.inference import answer_windows
from flan_squad.models.base import BaseModel, count_parameters
from flan_squad.models.strategies import FullFineTuning, LoRA, Strategy

# Larger steps than a real run's, so that a few steps on one batch move the model: full fine-tuning moves every
# weight; IA3's vectors (one per layer, starting at 1) need the largest. A new strategy gets the default.
TEST_LR = {"full": 1e-3, "ia3": 1e-1}


def _for_tests(name: str):
    """conf/strategy/<name>.yaml with the test's lr, no dropout and, where it has a rank, a small one."""
    return make_strategy(name, lr=TEST_LR.get(name, 1e-2), dropout=0.0, rank=4, alpha=8)


@pytest.fixture(scope="module")
def batch(tokenizer):
    questions = [
        Question("q1", "Where is the tower?", "The Eiffel Tower is in Paris, France.", ("Paris",), (24,)),
        Question("q2", "What colour is the sky?", "On a clear day the sky is blue.", ("blue",), (26,)),
        Question("q3", "Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare.",
                 ("William Shakespeare",), (32,)),
        Question("q4", "When did it end?", "The war ended in 1945 after six years.", ("1945",), (17,)),
    ]
    encoded = encode(questions, tokenizer, "v1", 128, 16)
    return collate([{"id": i, "input_ids": x, "labels": y}
                    for i, x, y in zip(encoded.ids, encoded.input_ids, encoded.labels)], tokenizer.pad_token_id)


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def _generate(model, batch):
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_each_yaml_builds_a_strategy_named_as_its_file(name, tmp_path):
    # The contract (`Strategy`) is all that callers read; the name is the class's and must be the YAML file's,
    # which is what the command line (strategy=<name>) and the report's fallback for failed runs use.
    cfg = compose_config([f"strategy={name}", "strategy.gradient_checkpointing=true"], output_dir=tmp_path)
    from hydra.utils import instantiate

    strategy = instantiate(cfg.strategy, _convert_="all")
    assert isinstance(strategy, Strategy) and strategy.name == name
    assert strategy.gradient_checkpointing is True and strategy.lr == cfg.strategy.lr > 0  # benchmarks set the one
    assert make_strategy(name, gradient_checkpointing=False).gradient_checkpointing is False
    described = strategy.describe()
    assert set(described) == {"label", "capacity"} and described["label"].split()[0] == name
    capacity = described["capacity"]
    assert capacity is None or (set(capacity) == {"key", "title", "value"}
                                and capacity["value"] == cfg.strategy[capacity["key"]])  # a key of its YAML


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_loss_falls_on_a_repeated_batch(name, tiny_base, cpu, batch):
    torch.manual_seed(0)
    strategy = _for_tests(name)
    model = strategy.build(tiny_base, cpu).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=strategy.lr)
    losses = []
    for _ in range(12):
        loss = model(**_inputs(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def _adapter_gradients(model, batch) -> dict[str, torch.Tensor | None]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks every time
    model(**_inputs(batch)).loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def as_on_avx512_bf16(monkeypatch):
    """Every 4-bit layer built from here on believes the CPU has AVX512-BF16 (as recent Xeons and EPYCs do):
    bitsandbytes then repacks its weight for a bf16 inference kernel without backward the first time the
    layer runs in eval mode without grad. Forced, so that the tests cover that path on every CPU."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


def test_qlora_trains_the_same_after_a_validation_pass(tiny_base, cpu, batch, tokenizer, as_on_avx512_bf16):
    model = _for_tests("qlora").build(tiny_base, cpu)
    before = _adapter_gradients(model, batch)
    model.eval()  # as Lightning's validation loop does
    answer_windows(model, tokenizer, batch["input_ids"], batch["attention_mask"], 4, no_answer=UNANSWERABLE)
    after = _adapter_gradients(model, batch)
    assert len(before) == 4 * (tiny_base.config().num_layers + 2 * tiny_base.config().num_decoder_layers)
    assert all(g.abs().sum() > 0 for n, g in before.items() if "lora_B" in n)  # (A's is 0 while B is 0)
    for name, gradient in before.items():
        assert after[name] is not None and torch.equal(after[name], gradient), name


def _lora_params_expected(base: BaseModel, rank: int) -> int:
    config = base.config()
    inner = config.num_heads * config.d_kv
    per_module = rank * (config.d_model + inner)  # A: d_model -> r, B: r -> inner, for q and v alike
    attention_blocks = config.num_layers + 2 * config.num_decoder_layers  # decoder: self + cross attention
    return attention_blocks * 2 * per_module


def test_full_trains_every_parameter(tiny_base, cpu):
    model = FullFineTuning().build(tiny_base, cpu)
    counts = count_parameters(model)
    assert counts["trainable_params"] == counts["total_params"] == sum(p.numel() for p in model.parameters())
    assert counts["params_4bit"] == 0


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_adapters_alone_train(name, tiny_base, cpu):
    model = _for_tests(name).build(tiny_base, cpu)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q", "v"}  # ...SelfAttention.q.lora_A.default.weight
    assert count_parameters(model)["trainable_params"] == _lora_params_expected(tiny_base, rank=4)


def test_ia3_scales_keys_values_and_feed_forward_inputs(tiny_base, cpu):
    model = _for_tests("ia3").build(tiny_base, cpu)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[-3] for n in trainable} == {"k", "v", "wo"}  # ...SelfAttention.k.ia3_l.default
    config = tiny_base.config()
    inner = config.num_heads * config.d_kv
    attention_blocks = config.num_layers + 2 * config.num_decoder_layers
    ff_blocks = config.num_layers + config.num_decoder_layers
    assert count_parameters(model)["trainable_params"] == attention_blocks * 2 * inner + ff_blocks * config.d_ff


def test_all_linear_adapts_every_linear_layer(tiny_base, cpu):
    model = LoRA(rank=4, target_modules="all-linear").build(tiny_base, cpu)
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}  # lm_head excluded by PEFT


def test_qlora_weights_really_are_4bit(tiny_base, cpu):
    model = _for_tests("qlora").build(tiny_base, cpu)
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    names = {n.split(".")[-2] if n.endswith("base_layer") else n.split(".")[-1] for n in four_bit}
    assert names == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}  # the embedding and lm_head stay in full precision
    for name, module in four_bit.items():
        # wo's is stored in the compute dtype (T5 casts wo's input to its weight's dtype): the same bytes
        storage = module.compute_dtype if name.endswith(".wo") else torch.uint8
        assert module.weight.dtype == storage and module.weight.quant_state.quant_type == "nf4"
        assert module.weight.quant_state.nested  # double quantisation
        assert module.weight.untyped_storage().nbytes() * 2 == module.weight.quant_state.shape.numel()  # 2 a byte
    counts = count_parameters(model)
    assert counts["params_4bit"] == sum(m.weight.quant_state.shape.numel() for m in four_bit.values())
    full = count_parameters(FullFineTuning().build(tiny_base, cpu))
    assert counts["total_params"] == full["total_params"] + counts["trainable_params"]  # base + adapters
    assert model.base_model.model.is_activation_checkpointing


def test_a_qlora_run_dir_from_before_quantize_wo_loads_with_wo_as_it_trained(tmp_path):
    from omegaconf import OmegaConf

    from flan_squad.runs.restore import build_section
    from flan_squad.utils.config import CONFIG_DIR

    strategy = OmegaConf.load(CONFIG_DIR / "strategy" / "qlora.yaml")
    assert build_section(tmp_path, OmegaConf.create({"strategy": strategy}), "strategy").quantize_wo  # conf's default
    del strategy["quantize_wo"]  # a run's config.yaml written before the option
    assert not build_section(tmp_path, OmegaConf.create({"strategy": strategy}), "strategy").quantize_wo


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_saved_result_reloads_with_identical_predictions(name, tiny_base, cpu, batch, tmp_path, as_on_avx512_bf16):
    torch.manual_seed(0)
    strategy = _for_tests(name)
    model = strategy.build(tiny_base, cpu).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=strategy.lr)
    with torch.no_grad():
        untrained_logits = model.eval()(**_inputs(batch)).logits
    model.train()
    for _ in range(3):
        model(**_inputs(batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = _generate(model, batch)
    with torch.no_grad():  # training changed the model's output (LoRA's B starts at 0: an untrained adapter does not)
        assert (model(**_inputs(batch)).logits - untrained_logits).abs().max() > 1e-3

    from transformers import AutoTokenizer
    strategy.save(model, AutoTokenizer.from_pretrained(tiny_base.tokenizer), tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert "tokenizer_config.json" in saved
    assert ("adapter_model.safetensors" in saved) == (name != "full")
    assert ("model.safetensors" in saved) == (name == "full")
    reloaded = strategy.load(tmp_path, tiny_base, cpu)
    assert torch.equal(_generate(reloaded, batch), trained)
    trained_logits = model(**_inputs(batch)).logits
    assert torch.allclose(reloaded(**_inputs(batch)).logits, trained_logits, atol=1e-5)


def test_random_init_matches_flan_t5_small_parameter_count(cache_dir):
    # The published flan-t5-small has 76,961,152 parameters with its own (untied) lm_head.
    base = BaseModel(name="flan-t5-small", name_or_path="google/flan-t5-small", init="random",
                     architecture=dict(d_model=512, num_layers=8, num_decoder_layers=8, num_heads=6, d_ff=1024),
                     cache_dir=str(cache_dir))
    model = base.load()
    assert sum(p.numel() for p in model.parameters()) == 76_961_152
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    again = base.load()  # from the cache: the very same weights
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_random_init_is_seeded(tiny_base, tmp_path):
    other_seed = BaseModel(**{**tiny_base.__dict__, "init_seed": 1, "cache_dir": str(tmp_path)})
    a, b = tiny_base.load(), other_seed.load()
    assert not torch.equal(a.shared.weight, b.shared.weight)


def test_pretrained_hub_id_offline_says_how_to_use_local_files():
    from flan_squad.models.base import ModelLoadError
    base = BaseModel(name="flan-t5-base", name_or_path="google/flan-t5-base-not-cached")
    with pytest.raises(ModelLoadError, match="model.init=random"):
        base.load()


def test_missing_local_tokenizer_dir_names_it_and_the_shared_folder(tmp_path):
    from flan_squad.models.base import ModelLoadError
    missing = tmp_path / "shared" / "models" / "flan-t5-small-tokenizer"
    base = BaseModel(name="t5-tiny", name_or_path="x", init="random", tokenizer=str(missing))
    with pytest.raises(ModelLoadError, match=f"tokenizer directory {missing} does not exist.*FLAN_SQUAD_SHARED"):
        base.load_tokenizer()


@pytest.mark.parametrize("kwargs, option", [({"lr": 0}, "strategy.lr"), ({"rank": 0}, "strategy.rank")])
def test_invalid_strategy_numbers(kwargs, option):
    with pytest.raises(ValueError, match=option):
        LoRA(**kwargs)
