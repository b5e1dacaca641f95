"""Training strategies: how a base model becomes the model that trains, and what becomes of its result.

`Strategy` is all the rest of the project knows of a strategy: training builds and saves the model through
it, evaluate and predict load the result, export turns it into a plain Hugging Face model, and reports show
what `describe()` said (training records it in metrics.json). No other module knows a strategy's name or
fields, so adding a strategy means one class here and one YAML file `conf/strategy/<its name>.yaml` (its
`_target_`, `lr`, `gradient_checkpointing`); the strategy and report tests then cover it (they read conf/strategy/).

- `FullFineTuning`: every parameter trains; the whole model is saved.
- `Adapters` (PEFT) on a frozen base, the only part that trains and is saved; an export merges them into
  a full-precision base: `LoRA`, `QLoRA` (LoRA on a 4-bit base) and `IA3`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from flan_squad.models.base import BaseModel, unwrapped_name
from flan_squad.utils.errors import ConfigError, error_line
from flan_squad.utils.precision import bf16_is_native, precision_dtype

log = logging.getLogger(__name__)

_NON_REENTRANT = {"use_reentrant": False}  # reentrant checkpointing needs inputs that require grad
_CPU = torch.device("cpu")


@runtime_checkable
class Strategy(Protocol):
    """How a run trains: built from `conf/strategy/<name>.yaml`. Everything any other module reads from a
    strategy is named here; every shipped YAML builds one (tests/test_strategies.py checks each)."""

    name: str  # metrics.json["strategy"]; stated by the class only, and equal to its YAML file's name (checked)
    lr: float  # the learning rate it trains with
    gradient_checkpointing: bool  # recompute activations in backward: less memory, more time (the benchmarks switch it)

    def load_base(self, base: BaseModel, device: torch.device) -> nn.Module:
        """The base model as this strategy trains on it (e.g. in 4-bit), untrained: evaluation's baseline."""

    def build(self, base: BaseModel, device: torch.device) -> nn.Module:
        """The model that trains, on `device`: its trainable parameters are the ones with requires_grad."""

    def save(self, model: nn.Module, tokenizer, directory: str | Path) -> None:
        """What training produced (the whole model, or only what trained) and the tokenizer, into `directory`."""

    def load(self, directory: str | Path, base: BaseModel, device: torch.device) -> nn.Module:
        """What `save` wrote, on `device`, computing exactly what the trained model computed."""

    export_note: str | None  # how an export differs from the model the run scored (None: it does not)
    shardable: bool  # FSDP can shard its weights (if not, trainer=fsdp is refused before training starts)
    freezes_base: bool  # most weights stay frozen (trainer=fsdp unsharded, on one device, is refused)

    def export(self, directory: str | Path, base: BaseModel) -> nn.Module:
        """What `save` wrote as one plain transformers model on CPU in full precision (adapters merged), for
        `save_pretrained`: it loads without PEFT or this project."""

    def describe(self) -> dict[str, Any]:
        """How reports show it, as JSON (training writes it into metrics.json["approach"]): `label` (a table
        row's approach, e.g. "lora r=16") and `capacity`, the hyperparameter besides lr that sets how much
        trains, as {"key": its name in the config, "title": an axis label, "value"}, or None. Reports draw an
        lr x capacity heat map for sweeps over both."""


def _check_lr(lr: float) -> float:
    if not lr > 0:
        raise ConfigError(f"strategy.lr={lr}: must be > 0")
    return lr


def _full_precision(base: BaseModel, device: torch.device, gradient_checkpointing: bool) -> nn.Module:
    model = base.load().to(device)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=_NON_REENTRANT)
        else:  # transformers before 5.23 (the GPU image's 5.17) has the older name only (deprecated since)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_NON_REENTRANT)
        model.config.use_cache = False  # the cache is useless while training and warns under checkpointing
    return model


class _Trains:
    """What every shipped strategy shares: its learning rate and checkpointing, the base in full precision, saving
    with `save_pretrained`, and the defaults of `Strategy`'s attributes."""

    name: str
    export_note: str | None = None
    shardable = True
    freezes_base = False

    def __init__(self, lr: float, gradient_checkpointing: bool):
        self.lr, self.gradient_checkpointing = _check_lr(lr), gradient_checkpointing

    def load_base(self, base: BaseModel, device: torch.device) -> nn.Module:
        return _full_precision(base, device, self.gradient_checkpointing)

    def save(self, model: nn.Module, tokenizer, directory: str | Path) -> None:
        model.save_pretrained(directory)  # a PEFT model writes its adapters only
        tokenizer.save_pretrained(directory)

    def describe(self) -> dict[str, Any]:
        return {"label": self.name, "capacity": None}


class FullFineTuning(_Trains):
    """Every parameter trains."""

    name = "full"

    def __init__(self, lr: float = 5e-5, gradient_checkpointing: bool = False):
        super().__init__(lr, gradient_checkpointing)

    def build(self, base: BaseModel, device: torch.device) -> nn.Module:
        return self.load_base(base, device)

    def load(self, directory: str | Path, base: BaseModel, device: torch.device) -> nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(directory).to(device)

    def export(self, directory: str | Path, base: BaseModel) -> nn.Module:
        return self.load(directory, base, _CPU)


class Adapters(_Trains):
    """PEFT adapters on a frozen base: only they train and are saved. A subclass says which (`peft_config`)."""

    freezes_base = True

    def peft_config(self):
        raise NotImplementedError

    def build(self, base: BaseModel, device: torch.device) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(self.load_base(base, device), self.peft_config())

    def save(self, model: nn.Module, tokenizer, directory: str | Path) -> None:
        super().save(model, tokenizer, directory)
        named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        if any(unwrapped_name(name) != name for name in named):  # under FSDP (inside its gather: full tensors)
            _save_adapters_by_module_names(model, named, directory)

    def load(self, directory: str | Path, base: BaseModel, device: torch.device) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(self.load_base(base, device), directory)

    def export(self, directory: str | Path, base: BaseModel) -> nn.Module:
        from peft import PeftModel

        # Into a full-precision reload of the base, whatever `load_base` trained on: merging into 4-bit
        # weights would round the update away.
        return PeftModel.from_pretrained(base.load(), directory).merge_and_unload()


def _save_adapters_by_module_names(model: nn.Module, named: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Writes the adapters again, found under their modules' names. PEFT finds its adapters' entries in the state dict
    by the names of its modules, which under FSDP carry its wrappers' `_fsdp_wrapped_module.` while the state dict's
    keys do not: it finds none and writes an empty file. Given the tensors by those names, it finds them all."""
    from peft import get_peft_model_state_dict
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    adapters = get_peft_model_state_dict(model, state_dict=named)  # keys: the saved format's, with FSDP's infix
    save_file({unwrapped_name(name): tensor.contiguous() for name, tensor in adapters.items()},
              Path(directory) / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})


class LoRA(Adapters):
    """Low-rank adapters (W + BA, B: d x rank) on the attention projections, or on every linear layer."""

    name = "lora"

    def __init__(self, lr: float = 1e-3, rank: int = 16, alpha: int = 32, dropout: float = 0.05,
                 target_modules: str | Sequence[str] = ("q", "v"), gradient_checkpointing: bool = False):
        super().__init__(lr, gradient_checkpointing)
        if not (isinstance(rank, int) and rank > 0):
            raise ConfigError(f"strategy.rank={rank}: must be a whole number > 0")
        if not alpha > 0:
            raise ConfigError(f"strategy.alpha={alpha}: must be > 0")
        if not 0 <= dropout < 1:
            raise ConfigError(f"strategy.dropout={dropout}: must be in [0, 1)")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        # "all-linear" is PEFT's own shorthand: every linear layer except the output head.
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)

    def peft_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type=TaskType.SEQ_2_SEQ_LM)

    def describe(self) -> dict[str, Any]:
        return {"label": f"{self.name} r={self.rank}",
                "capacity": {"key": "rank", "title": "LoRA rank", "value": self.rank}}


class QLoRA(LoRA):
    """LoRA on a base quantised to 4-bit NF4 with double quantisation, with gradient checkpointing.

    Every linear layer of the encoder and decoder is 4-bit; the embedding, `lm_head`, layer norms and relative
    attention biases stay in full precision. transformers' 4-bit loading also leaves T5's feed-forward outputs (`wo`)
    in full precision (`_keep_in_fp32_modules`, a guard against fp16 overflow): `quantize_wo` (the default) quantises
    them too, as this project computes in bf16 or fp32, never fp16 (docs/performance.md, "QLoRA's memory on T5").
    conf/strategy/qlora.yaml sets it; a config without it (a run dir from before the option) means false, as those
    runs trained. `count_parameters` reports how many parameters really are 4-bit.
    """

    name = "qlora"
    shardable = False  # FSDP flattens floating-point tensors only: not 4-bit (uint8) weights
    export_note = ("QLoRA: the adapters trained on 4-bit NF4 weights are merged into the full-precision base, so this "
                   "model computes W + BA where the run computed dequant(NF4(W)) + BA: it is not the model the run "
                   "scored; its answers and scores can differ (evaluate it: python -m flan_squad.evaluate "
                   "model.name_or_path=<export dir> model.init=pretrained)")

    def __init__(self, lr: float = 1e-3, rank: int = 16, alpha: int = 32, dropout: float = 0.05,
                 target_modules: str | Sequence[str] = ("q", "v"), gradient_checkpointing: bool = True,
                 quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "auto",
                 quantize_wo: bool = False):
        super().__init__(lr, rank, alpha, dropout, target_modules, gradient_checkpointing)
        if quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"strategy.quant_type={quant_type!r}: expected 'nf4' or 'fp4'")
        dtype_name = isinstance(getattr(torch, str(compute_dtype), None), torch.dtype)
        if compute_dtype != "auto" and precision_dtype(compute_dtype) is None and not dtype_name:
            raise ConfigError(f"strategy.compute_dtype={compute_dtype!r}: expected auto, a torch dtype (bfloat16, "
                              f"float32) or a trainer precision (bf16-mixed, 32-true)")
        if quantize_wo and getattr(torch, str(compute_dtype), None) is torch.float16:
            raise ConfigError(f"strategy.compute_dtype={compute_dtype} with strategy.quantize_wo=true: T5's wo "
                              f"overflows fp16; compute in bfloat16 or float32, or set strategy.quantize_wo=false")
        self.quant_type, self.double_quant, self.compute_dtype = quant_type, double_quant, compute_dtype
        self.quantize_wo = quantize_wo

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype == "auto":  # bf16 where it is native; elsewhere (most CPUs) it is 8-25x slower
            return torch.bfloat16 if bf16_is_native(device.type) else torch.float32
        return precision_dtype(self.compute_dtype) or getattr(torch, self.compute_dtype)

    def load_base(self, base: BaseModel, device: torch.device) -> nn.Module:
        try:
            import bitsandbytes.nn
        except ImportError:
            raise ConfigError(
                "strategy=qlora needs bitsandbytes (pip install bitsandbytes), or use strategy=lora") from None
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self._compute_dtype(device),
        )
        try:
            model = base.load(quantization_config=quantization, device_map={"": device})
        except (RuntimeError, ValueError, NotImplementedError, ImportError) as e:
            raise ConfigError(
                f"strategy=qlora: bitsandbytes cannot load 4-bit weights on device {device} ({error_line(e)}); "
                f"use strategy=lora or another device"
            ) from e
        if self.quantize_wo:
            _quantize_feed_forward_outputs(model, quantization)
        _release_checkpoint_mapping(model)
        # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 inference kernel the first time
        # the layer runs in eval mode without grad (validation, say). That kernel has no backward (training after
        # it gets no gradient through the 4-bit layers), computes in bf16 whatever compute_dtype says, and its
        # inverse is lossy (absmax goes through bf16). Never repacking keeps one behaviour on every CPU.
        for module in model.modules():
            if isinstance(module, bitsandbytes.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=self.gradient_checkpointing,
            gradient_checkpointing_kwargs=_NON_REENTRANT,
        )


def _quantize_feed_forward_outputs(model: nn.Module, quantization) -> None:
    """T5's feed-forward output layers (`wo`), which 4-bit loading leaves in full precision, quantised as it quantises
    the others (same quant type, double quantisation and compute dtype)."""
    import bitsandbytes.nn

    # T5 casts wo's input to wo.weight.dtype (for a full-precision wo): with the 4-bit weight stored in the compute
    # dtype (same bytes as uint8) that cast is the one Linear4bit makes anyway, where uint8 would destroy the input.
    storage = quantization.bnb_4bit_compute_dtype
    for block in [m for m in model.modules() if type(getattr(m, "wo", None)) is nn.Linear]:
        wo = block.wo
        quantized = bitsandbytes.nn.Linear4bit(
            wo.in_features, wo.out_features, bias=wo.bias is not None, compute_dtype=storage,
            compress_statistics=quantization.bnb_4bit_use_double_quant, quant_type=quantization.bnb_4bit_quant_type,
            quant_storage=storage, device="meta")
        quantized.weight = bitsandbytes.nn.Params4bit(
            wo.weight.data, requires_grad=False, compress_statistics=quantization.bnb_4bit_use_double_quant,
            quant_type=quantization.bnb_4bit_quant_type, quant_storage=storage, module=quantized)
        if wo.bias is not None:
            quantized.bias = wo.bias
        block.wo = quantized.to(wo.weight.device)  # quantises the weight


def _release_checkpoint_mapping(model: nn.Module) -> None:
    """The full-precision tensors left on the CPU (embedding, lm_head, layer norms) copied out of the checkpoint file
    that loading memory-maps: while any tensor views the mapping, every page that quantisation read stays resident
    (counted in the process's RSS: the whole fp32 checkpoint, for about a fifth of it kept)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and getattr(tensor, "quant_state", None) is None:
            tensor.data = tensor.data.clone()


class IA3(Adapters):
    """(IA)^3: learned vectors that rescale attention keys and values and the feed-forward input, one number per
    channel (T-Few, Liu et al. 2022): far fewer trainable parameters than LoRA, and no rank to choose."""

    name = "ia3"

    def __init__(self, lr: float = 3e-3, target_modules: Sequence[str] = ("k", "v", "wo"),
                 feedforward_modules: Sequence[str] = ("wo",), gradient_checkpointing: bool = False):
        super().__init__(lr, gradient_checkpointing)
        if not set(feedforward_modules) <= set(target_modules):
            raise ConfigError(f"strategy.feedforward_modules={list(feedforward_modules)}: must be among "
                              f"strategy.target_modules={list(target_modules)}")
        self.target_modules, self.feedforward_modules = list(target_modules), list(feedforward_modules)

    def peft_config(self):
        from peft import IA3Config, TaskType

        return IA3Config(target_modules=self.target_modules, feedforward_modules=self.feedforward_modules,
                         task_type=TaskType.SEQ_2_SEQ_LM)
