"""`make bench` end to end in a tiny mode: correctness of what it runs and writes, never timing."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench
from benchmarks.flops import forward_flops
from flan_squad.base import BaseModel
from conftest import SHARED


def test_bench_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "latest.json"
    bench.main(["--model", "t5_tiny", "--memory-model", "t5_tiny", "--strategies", "full,qlora",
                "--dataset", "squad_v2", "--steps", "2", "--repeats", "2", "--eval-questions", "12",
                "--eval-repeats", "1", "--memory-steps", "1", "--max-source-length", "256",
                "--shared-dir", str(SHARED), "--in-process", "--out", str(out)])
    results = json.loads(out.read_text())
    for key in ("train_speedup_vs_hf", "eval_speedup_vs_hf", "eval_answer_agreement",
                "qlora_gc_peak_over_full_base", "machine"):
        assert results[key] is not None, key
    assert set(results["train_speedup_vs_hf"]) == {"full", "qlora"}
    assert all(v > 0 for v in results["train_speedup_vs_hf"].values())
    assert 0 <= results["eval_answer_agreement"] <= 1
    assert results["machine"]["cores"] >= 1 and results["peak_matmul"]["peak_flops"] > 0
    # 2 strategies x 2 checkpointing settings x (project, hf) + the padded baseline without checkpointing
    assert len(results["train"]) == 10 and not any("error" in r for r in results["train"])
    for run in results["train"]:
        assert run["every_example_once_per_epoch"], run["spec"]
        assert run["examples_per_epoch"] == 2 * 8 and len(run["epoch_seconds"]) == 2
        assert 0 < run["mfu"] < 1
    # The same questions, so the same model FLOPs, whatever the pipeline does with padding.
    flops = {r["spec"]["pipeline"]: r["model_flops_per_step"] for r in results["train"]
             if r["spec"]["strategy"] == "full" and not r["spec"]["gradient_checkpointing"]}
    assert flops["project"] == flops["hf"] == flops["hf_pad"]
    # Length-grouped batches never carry more padding than random ones, which never carry more than pad-to-max.
    padding = {r["spec"]["pipeline"]: r["padded_over_real_source_tokens"] for r in results["train"]
               if r["spec"]["strategy"] == "full" and not r["spec"]["gradient_checkpointing"]}
    assert 1.0 <= padding["project"] <= padding["hf"] <= padding["hf_pad"] and padding["project"] < padding["hf_pad"]
    assert results["eval"]["questions"] == 12 and len(results["memory"]) == 4
    printed = capsys.readouterr().out
    assert "x HF" in printed and "RANDOM INIT" in printed and "qlora+gc / full" in printed


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
