"""What a run leaves and prints: its result files (each written whole or not at all, by `flan_squad.utils.files`)
and the summary at its end, with the note every result from random or self-trained weights must carry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flan_squad.utils.files import write_json_atomic


def weights_note(metrics: dict[str, Any]) -> str | None:
    """What every result from these weights must say (random init, a self-trained base); None for real ones."""
    if metrics.get("model_note"):
        return str(metrics["model_note"])
    if metrics.get("init") == "random":
        return "random-init weights: these scores say nothing about FLAN-T5's accuracy"
    return None


def framed(lines: list[str], metrics: dict[str, Any]) -> str:
    """End-of-run lines between rules, with the weights' note (if any) under the title."""
    note = weights_note(metrics)
    if note:
        lines = [lines[0], f"  NOTE       {note}", *lines[1:]]
    width = max(len(line) for line in lines)
    return "\n".join(["=" * width, *lines, "=" * width])


def summary(metrics: dict[str, Any], output_dir: Path) -> str:
    """The few lines printed at the end of a run."""
    scores = f"exact {metrics['exact']:.2f}  f1 {metrics['f1']:.2f}  on {metrics['total']} questions"
    if "HasAns_f1" in metrics:
        scores += f"  (HasAns f1 {metrics['HasAns_f1']:.2f}"
        scores += f", NoAns f1 {metrics['NoAns_f1']:.2f})" if "NoAns_f1" in metrics else ")"
    share = 100.0 * metrics["trainable_params"] / max(1, metrics["total_params"])
    return framed([
        f"flan-squad · {metrics['strategy']} · {metrics['model']} ({metrics['init']} init) · {metrics['dataset']}",
        f"  scores     {scores}",
        f"  training   {metrics['train_time_s']:.1f} s, {metrics['train_examples_per_s']:.2f} examples/s, "
        f"{metrics['train_examples']} questions x {metrics['epochs']} epochs"
        + (" (stopped early)" if metrics.get("stopped_early") else "") + f", {metrics['optimizer_steps']} steps",
        *memory_lines(metrics),
        f"  parameters {metrics['trainable_params']:,} trainable of {metrics['total_params']:,} ({share:.2f}%)"
        + (f"; {metrics['params_4bit']:,} stored in 4-bit" if metrics.get("params_4bit") else ""),
        f"  artefacts  {output_dir}",
    ], metrics)


def memory_lines(metrics: dict[str, Any]) -> list[str]:
    """The summary's memory: the run's own peaks (above what the process held before the model was built), the raw
    ones, and the account of the training peak."""
    kind = metrics["peak_memory_kind"]
    own, own_val = metrics.get("own_peak_memory_mb"), metrics.get("own_peak_val_memory_mb")
    if own is None:
        return [f"  memory     peak {metrics['peak_memory_mb']:.0f} MB training, "
                f"{metrics['peak_val_memory_mb']:.0f} MB validation ({kind})"]
    lines = [f"  memory     the run's own: {own:.0f} MB training, {own_val:.0f} MB validation ({kind} above "
             f"{metrics['memory_before_model_mb']:.0f} MB held before the model; peaks {metrics['peak_memory_mb']:.0f}"
             f" and {metrics['peak_val_memory_mb']:.0f} MB)"]
    account = metrics.get("memory_account")
    if account:
        weights = account["weights_mb"]
        by_dtype = ", ".join(f"{kind} {_mb(mb)}" for kind, mb in weights.items())
        lines.append(f"  account    weights {_mb(sum(weights.values()))} MB ({by_dtype}) + gradients "
                     f"{_mb(account['gradients_mb'])} + optimizer state {_mb(account['optimizer_state_mb'])} + "
                     f"the rest (activations, workspace) {_mb(account['rest_mb'])} MB")
    return lines


def _mb(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"  # a LoRA's gradients are a fraction of a MB


def write_results(output_dir: Path, predictions: dict[str, str], na_probs: dict[str, float] | None,
                  metrics: dict[str, Any]) -> None:
    """What a training run or an evaluation leaves, each file whole or not at all: `predictions.json`,
    `na_probs.json` (SQuAD v2), and `metrics.json` last (its presence means the results are complete). Call on
    rank 0 only."""
    write_json_atomic(output_dir / "predictions.json", predictions)
    if na_probs is not None:
        write_json_atomic(output_dir / "na_probs.json", na_probs)
    write_json_atomic(output_dir / "metrics.json", metrics)
