"""`make bench` end to end in a tiny mode: correctness of what it runs and writes, never timing."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import bench
from benchmarks.evaluation import eval_config, eval_run
from benchmarks.flops import forward_flops
from benchmarks.runs import Spec
from conftest import SHARED
from flan_squad.evaluate import evaluate
from flan_squad.models.base import BaseModel
from flan_squad.utils.precision import bf16_is_native


@pytest.mark.long
def test_bench_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "latest.json"
    bench.main(["--model", "t5_tiny", "--memory-model", "t5_tiny", "--strategies", "full,qlora",
                "--dataset", "squad_v2", "--steps", "2", "--repeats", "2", "--batch-size", "2",
                "--eval-questions", "12", "--eval-repeats", "1", "--memory-steps", "1", "--max-source-length", "256",
                "--shared-dir", str(SHARED), "--in-process", "--out", str(out)])
    results = json.loads(out.read_text())
    # The headline ratios are what the headline table's own measurements give: project over Hugging Face, per
    # strategy the lower of its two checkpointing settings; eval: questions/s; memory: 4-bit+gc over full's base.
    headline = results["tables"][results["precision"]]
    train = {(r["spec"]["strategy"], r["spec"]["gradient_checkpointing"], r["spec"]["pipeline"]): r
             for r in headline["train"]}
    assert results["train_speedup_vs_hf"] == {
        s: min(round(train[s, gc, "project"]["examples_per_s"] / train[s, gc, "hf"]["examples_per_s"], 3)
               for gc in (False, True)) for s in ("full", "qlora")}
    evaluation = headline["eval"]
    assert results["eval_speedup_vs_hf"] == round(evaluation["examples_per_s"]["project"]
                                                  / evaluation["examples_per_s"]["hf"], 3)
    agreed = results["eval_answer_agreement"] * evaluation["single_window_questions"]  # a share of those questions
    assert results["eval_answer_agreement"] == evaluation["answer_agreement"] and agreed == pytest.approx(round(agreed))
    memory = {(bool(r["params_4bit"]), r["spec"]["gradient_checkpointing"]): r["peak_memory_mb"]
              for r in results["memory"]}
    assert results["qlora_gc_peak_over_full_base"] == round(memory[True, True] / memory[False, False], 3)
    own = {(bool(r["params_4bit"]), r["spec"]["gradient_checkpointing"]): r["own_peak_memory_mb"]
           for r in results["memory"]}
    assert all(0 < own[k] < memory[k] for k in own)  # above what the process held before the model was built
    assert results["qlora_gc_own_peak_over_full_base"] == {
        f"over_full_gc_{'on' if gc else 'off'}": round(own[True, True] / own[False, gc], 3) for gc in (False, True)}
    assert results["machine"]["cores"] == os.cpu_count() and results["peak_matmul"] == headline["peak_matmul"]
    run = headline["train"][0]
    assert run["mfu"] == round(run["model_flops_per_s"] / headline["peak_matmul"]["peak_flops"], 4)

    # --precision auto: an fp32 table and a bf16 one (a short sample where bf16 is emulated), the headline in the
    # project's automatic precision, and "what you get" = that precision against the baseline in fp32.
    native = bf16_is_native("cpu")
    assert set(results["tables"]) == {"fp32", "bf16"} and results["bf16_native"] == native
    assert results["precision"] == ("bf16" if native else "fp32")
    assert results["what_you_get"]["project_precision"] == ("bf16-mixed" if native else "32-true")
    for name, table in results["tables"].items():
        assert table["precision"] == name
        assert table["peak_matmul"]["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[name]
        lightning, hf_bf16 = {"fp32": ("32-true", False), "bf16": ("bf16-mixed", True)}[name]
        assert table["sample"] == (name == "bf16" and not native)
        assert not any("error" in r for r in table["train"])
        assert all(r["spec"]["precision"] == name for r in table["train"])
        for evaluation in (table["eval"], table["eval_trained"]):
            # As run: Lightning's precision read back from its Trainer, and the Seq2SeqTrainer's bf16 flag.
            assert (evaluation["lightning_precision"], evaluation["hf_bf16"]) == (lightning, hf_bf16)
            assert evaluation["questions"] == 12
            # Contexts longer than 256 tokens: the project answers several windows, the baseline truncates.
            assert evaluation["model_inputs"]["project"] > evaluation["model_inputs"]["hf"] == evaluation["questions"]
            assert 0 < evaluation["single_window_questions"] < evaluation["questions"]
        # Random weights never stop; the planted training teaches answers that do.
        assert table["eval"]["answer_tokens_mean"] == table["eval"]["max_new_tokens"] == 32
        assert table["eval_trained"]["answer_tokens_mean"] < 8 and table["eval_trained_answer_tokens_mean"] < 8
        assert table["eval_trained"]["model"] == "t5_tiny trained on planted facts, 24 steps"

    fp32 = results["tables"]["fp32"]
    # 2 strategies x 2 checkpointing settings x (project, hf) + the padded baseline without checkpointing
    assert len(fp32["train"]) == 10
    for run in fp32["train"]:
        assert run["every_example_once_per_epoch"], run["spec"]
        assert run["examples_per_epoch"] == 2 * 2 and len(run["epoch_seconds"]) == 2
        assert 0 < run["mfu"] < 1
    # The same questions, so the same model FLOPs, whatever the pipeline does with padding.
    flops = {r["spec"]["pipeline"]: r["model_flops_per_step"] for r in fp32["train"]
             if r["spec"]["strategy"] == "full" and not r["spec"]["gradient_checkpointing"]}
    assert flops["project"] == flops["hf"] == flops["hf_pad"]
    # Length-grouped batches never carry more padding than random ones, which never carry more than pad-to-max.
    padding = {r["spec"]["pipeline"]: r["padded_over_real_source_tokens"] for r in fp32["train"]
               if r["spec"]["strategy"] == "full" and not r["spec"]["gradient_checkpointing"]}
    assert 1.0 <= padding["project"] <= padding["hf"] <= padding["hf_pad"] and padding["project"] < padding["hf_pad"]
    assert len(results["memory"]) == 4
    assert all(r["spec"]["precision"] == results["precision"] for r in results["memory"])
    bf16 = results["tables"]["bf16"]
    assert len(bf16["train"]) == (10 if native else 2)  # the sample: full fine-tuning, gc off, project and hf
    printed = capsys.readouterr().out
    assert "x HF" in printed and "RANDOM INIT" in printed and "qlora+gc / full" in printed
    assert "== fp32: " in printed and "== bf16: " in printed and "what you get" in printed
    assert ("EMULATED bf16" in printed) == (not native) and "trained (planted)" in printed


def test_bench_evaluation_is_flan_squad_evaluate(tmp_path):
    # The benchmark's project side answers exactly as `python -m flan_squad.evaluate` does: the same windows
    # (contexts longer than 128 tokens), best window, no-answer probabilities (v2) and snapping.
    spec = Spec(model="t5_tiny", dataset="squad_v2", batch_size=4, max_source_length=128, eval_questions=8,
                shared_dir=str(SHARED))
    result = eval_run(spec, repeats=1, keep_predictions=True)
    metrics = evaluate(eval_config(spec, str(tmp_path)))
    assert result["predictions"] == json.loads((tmp_path / "predictions.json").read_text())
    assert result["model_inputs"]["project"] == metrics["val_windows"] > metrics["val_examples"] == 8
    assert result["f1"] == metrics["f1"] and result["snapped_answers"] == metrics["snapped_answers"]
    # The same greedy generation on questions answered from one window: the baseline's answers equal the project's.
    assert result["single_window_questions"] == 8 - metrics["multi_window_questions"] > 0
    assert result["answer_agreement"] == 1.0 and set(result["hf_answers"]) == set(result["predictions"])


def test_forward_flops_match_a_parameter_count_estimate(cache_dir):
    # Without attention terms, a forward pass costs 2 FLOPs per weight per token it touches.
    base = BaseModel(name="flan-t5-small", name_or_path="x", init="random",
                     architecture=dict(d_model=512, num_layers=8, num_decoder_layers=8, num_heads=6, d_ff=1024))
    config = base.config()
    d, inner, ff = 512, 6 * 64, 1024
    encoder_weights = 8 * (4 * d * inner + 3 * d * ff)
    decoder_weights = 8 * (8 * d * inner + 3 * d * ff)
    source, target = 100, 10
    # Attention score terms: encoder L^2, decoder T^2 and T*L, 2 matmuls each, 2 FLOPs per multiply-add.
    attention = 8 * 4 * source * source * inner + 8 * (4 * target * target * inner + 4 * target * source * inner)
    cross_kv = 8 * 2 * (2 * d * inner) * (source - target)  # decoder k/v projections run over the source
    expected = (2 * encoder_weights * source + 2 * decoder_weights * target + attention + cross_kv
                + 2 * d * 32128 * target)
    assert forward_flops(config, source, target) == pytest.approx(expected)


@pytest.mark.long
def test_compile_benchmark_runs_both_ways_and_compiling_changes_no_answer(tmp_path):
    from benchmarks import compile as compile_bench

    out = tmp_path / "compile.json"
    result = compile_bench.main(["--model", "t5_tiny", "--steps", "2", "--epochs", "2", "--max-source-length", "128",
                                 "--decode-source-length", "64", "--new-tokens", "4", "--shared-dir", str(SHARED),
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == result
    eager, compiled = result["train"]
    assert (eager["spec"]["compile"], compiled["spec"]["compile"]) == (False, True)
    for run in (eager, compiled):
        assert "error" not in run and run["every_example_once_per_epoch"] and len(run["epoch_seconds"]) == 2
    assert compiled["later_over_eager"] == round(compiled["later_epochs_examples_per_s"]
                                                 / eager["later_epochs_examples_per_s"], 3)
    assert [d["setting"] for d in result["decoding"]] == list(compile_bench.DECODING)
    for d in result["decoding"]:
        assert len(d["call_seconds"]) == 3 and d["same_answers_as_dynamic_cache"], d
