"""What a benchmark run's measurements say: the ratios, project over baseline, and the printed tables.

`benchmarks.bench` measures, then calls `summarise` and `table` here, on plain dicts: the JSON it writes.
"""

from __future__ import annotations

from pathlib import Path


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _find(runs: list[dict], strategy: str, gc: bool, pipeline: str = "project") -> dict:
    for r in runs:
        s = r["spec"]
        if (s["strategy"], s["gradient_checkpointing"], s["pipeline"]) == (strategy, gc, pipeline) and "error" not in r:
            return r
    return {}


def _train_ratios(mine: list[dict], baseline: list[dict], key: str = "examples_per_s", against: str = "hf") -> dict:
    """{strategy: {"gc_off", "gc_on"}: project's `key` over the baseline's}, for the project's runs in `mine`."""
    out: dict[str, dict[str, float | None]] = {}
    for r in mine:
        s = r["spec"]
        if s["pipeline"] == "project":
            gc = s["gradient_checkpointing"]
            out.setdefault(s["strategy"], {})["gc_on" if gc else "gc_off"] = ratio(
                _find(mine, s["strategy"], gc).get(key), _find(baseline, s["strategy"], gc, against).get(key))
    return out


def _lower(by_gc: dict) -> dict:
    """Per strategy, the lower of its checkpointing settings."""
    return {s: min((v for v in d.values() if v is not None), default=None) for s, d in by_gc.items()}


def _eval_ratio(mine: dict | None, baseline: dict | None) -> float | None:
    if not mine or not baseline or mine["questions"] != baseline["questions"]:
        return None
    return ratio(mine["examples_per_s"]["project"], baseline["examples_per_s"]["hf"])


def summarise_table(t: dict) -> dict:
    """A table's ratios, project over baseline, both in the table's precision."""
    for r in t["train"]:
        if "error" not in r:
            r["mfu"] = round(r["model_flops_per_s"] / t["peak_matmul"]["peak_flops"], 4)
    by_gc = _train_ratios(t["train"], t["train"])
    trained = t["eval_trained"] or {}
    t.update({
        # The lower of the two checkpointing settings, per strategy (the detail is in _by_gc).
        "train_speedup_vs_hf": _lower(by_gc),
        "train_speedup_vs_hf_by_gc": by_gc,
        "train_speedup_vs_pad_to_max": {
            s: d.get("gc_off") for s, d in _train_ratios(t["train"], t["train"], against="hf_pad").items()},
        "peak_memory_over_hf": _train_ratios(t["train"], t["train"], "peak_memory_mb"),
        "eval_speedup_vs_hf": _eval_ratio(t["eval"], t["eval"]),
        "eval_answer_agreement": t["eval"]["answer_agreement"],
        "eval_speedup_vs_hf_trained": _eval_ratio(trained, trained),
        "eval_trained_answer_tokens_mean": trained.get("answer_tokens_mean"),
    })
    return t


HEADLINE = ("train_speedup_vs_hf", "train_speedup_vs_hf_by_gc", "train_speedup_vs_pad_to_max", "eval_speedup_vs_hf",
            "eval_answer_agreement", "eval_speedup_vs_hf_trained", "eval_trained_answer_tokens_mean",
            "peak_memory_over_hf")


def summarise(args, info, native, auto, tables, memory, seconds) -> dict:
    from benchmarks.runs import LIGHTNING_PRECISION

    for t in tables.values():
        summarise_table(t)
    # The headline figures: like for like, in the precision the project runs in by default (when measured in full).
    headline = auto if auto in tables and not tables[auto]["sample"] else next(iter(tables))
    h = tables[headline]
    # What a user gets: the project in its automatic precision against a Seq2SeqTrainer left in fp32.
    mine, fp32 = tables.get(auto), tables.get("fp32")
    what_you_get = None
    if mine and fp32:
        by_gc = _train_ratios(mine["train"], fp32["train"])
        what_you_get = {"project_precision": LIGHTNING_PRECISION[auto], "baseline_precision": "fp32",
                        "train_speedup_vs_hf": _lower(by_gc), "train_speedup_vs_hf_by_gc": by_gc,
                        "eval_speedup_vs_hf": _eval_ratio(mine["eval"], fp32["eval"]),
                        "eval_speedup_vs_hf_trained": _eval_ratio(mine["eval_trained"], fp32["eval_trained"])}
    # A 4-bit base with checkpointing (QLoRA) against training every weight, without checkpointing (full's default)
    # and with it; raw peaks, and the run's own (the peak above what the process held before the model was built).
    ok = [r for r in memory if "error" not in r]

    def full_base(gc: bool) -> dict:
        return next((r for r in ok if r["trainable_params"] == r["total_params"]
                     and r["spec"]["gradient_checkpointing"] == gc), {})

    qlora_gc_base = min((r for r in ok if r["params_4bit"] and r["spec"]["gradient_checkpointing"]),
                        key=lambda r: r["peak_memory_mb"], default={})
    for r in memory:
        if "error" not in r:
            r["mfu"] = round(r["model_flops_per_s"] / tables[headline]["peak_matmul"]["peak_flops"], 4)
    per_strategy, eval_speedup = h["train_speedup_vs_hf"], h["eval_speedup_vs_hf"]
    qlora_over_full = ratio(qlora_gc_base.get("peak_memory_mb"), full_base(False).get("peak_memory_mb"))
    qlora_own = {f"over_full_gc_{'on' if gc else 'off'}": ratio(qlora_gc_base.get("own_peak_memory_mb"),
                                                                  full_base(gc).get("own_peak_memory_mb"))
                 for gc in (False, True)}
    # bf16 MFU: full fine-tuning without checkpointing, in a bf16 table measured in full (not an emulated sample).
    bf16 = tables.get("bf16")
    bf16_mfu = (_find(bf16["train"], "full", False).get("mfu") if bf16 and not bf16["sample"] else None)
    peak_over_hf = [v for d in h["peak_memory_over_hf"].values() for v in d.values()]
    return {
        "note": "random-init weights (no pretrained FLAN-T5 here): cost only, never accuracy",
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "precision": headline,  # of the figures below; every table has its own in `tables`
        "auto_precision": LIGHTNING_PRECISION[auto],
        "bf16_native": native,
        "peak_matmul": h["peak_matmul"],
        **{k: h[k] for k in HEADLINE},
        "what_you_get": what_you_get,
        "qlora_gc_peak_over_full_base": qlora_over_full,
        "qlora_gc_own_peak_over_full_base": qlora_own,
        "bf16_mfu_full": bf16_mfu,
        "targets_met": {
            "train_2x_vs_hf": all(v is not None and v >= 2.0 for v in per_strategy.values()),
            "eval_2x_vs_hf": bool(eval_speedup and eval_speedup >= 2.0),
            "eval_answers_identical": h["eval_answer_agreement"] == 1.0,
            "peak_memory_le_0.9x_hf": bool(peak_over_hf) and all(v is not None and v <= 0.9 for v in peak_over_hf),
            "qlora_gc_own_le_35pct_of_full_base": (None if qlora_own["over_full_gc_off"] is None
                                                   else qlora_own["over_full_gc_off"] <= 0.35),
            "bf16_mfu_ge_40pct": None if bf16_mfu is None else bf16_mfu >= 0.40,
        },
        "tables": tables,
        "memory": memory,
        "bench_seconds": round(seconds, 1),
    }


def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(res: dict) -> str:
    s, m = res["settings"], res["machine"]
    lines = [
        f"flan-squad benchmarks · {' + '.join(filter(None, (s['model'], s['memory_model'])))} architectures, "
        f"RANDOM INIT · {s['dataset']} · device {s['device']}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, torch {m['torch']} "
        f"({m['torch_threads']} threads), load at start {m['load_average_at_start']}; bf16 "
        f"{'native' if res['bf16_native'] else 'EMULATED (no AVX512-BF16/AMX: slow)'}, so the project runs in "
        f"{res['auto_precision']} by default",
    ]
    for t in res["tables"].values():
        lines += ["", *_precision_table(s, t)]
    w = res["what_you_get"]
    if w:
        train = ", ".join(f"{k} {_fmt(v)}" for k, v in w["train_speedup_vs_hf"].items())
        lines += ["", f"what you get: the project in its automatic precision ({w['project_precision']} here) against "
                      f"Seq2SeqTrainer in fp32: training x HF {train} (lower of gc off/on); evaluation "
                      f"x{_fmt(w['eval_speedup_vs_hf'])} (random init), "
                      f"x{_fmt(w['eval_speedup_vs_hf_trained'])} (trained)"]
    if res["memory"]:
        lines += ["", f"peak memory, {s['memory_model']} architecture, {s['memory_steps']} steps (project path, "
                      f"{res['auto_precision']}):"]
        for r in res["memory"]:
            sp = r["spec"]
            value = ("FAILED" if "error" in r else f"{r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']}), own "
                     f"{_fmt(r.get('own_peak_memory_mb'), '.0f')} MB")
            lines.append(f"  {sp['strategy']:<7} gc {'on ' if sp['gradient_checkpointing'] else 'off'}  {value}")
        own = res.get("qlora_gc_own_peak_over_full_base") or {}
        lines.append(f"  qlora+gc / full: {_fmt(res['qlora_gc_peak_over_full_base'])} (raw peaks); the run's own "
                     f"peak over full gc off {_fmt(own.get('over_full_gc_off'))}, over full gc on "
                     f"{_fmt(own.get('over_full_gc_on'))}")
    verdict = {True: "yes", False: "NO", None: "not measured"}
    lines += ["", f"targets ({res['precision']} table): "
              + ", ".join(f"{k} {verdict[v]}" for k, v in res["targets_met"].items()),
              f"({res['bench_seconds']:.0f} s in all)"]
    return "\n".join(lines)


def _precision_table(s: dict, t: dict) -> list[str]:
    pk = t["peak_matmul"]
    title = {"fp32": "fp32: the project in 32-true against Seq2SeqTrainer in fp32",
             "bf16": "bf16: the project in bf16-mixed against Seq2SeqTrainer with bf16=True"}[t["precision"]]
    first = t["train"][0]["spec"] if t["train"] else {"steps": s["steps"], "epochs": s["repeats"]}
    lines = [
        f"== {title}{' · EMULATED bf16: a short sample' if t['sample'] else ''} · matmul peak "
        f"{pk['peak_flops'] / 1e9:.1f} GFLOP/s {pk['dtype']} ==",
        f"training: batch {s['batch_size']}, max_source_length {s['max_source_length']}, {first['steps']} steps x "
        f"{first['epochs']} epochs (median of epochs), same questions in every run",
        f"{'strategy':<9}{'gc':<5}{'ex/s':>8}{'tok/s':>8}{'MFU':>7}{'pad':>6}{'peak MB':>9} |{'HF ex/s':>9}{'pad':>6}"
        f"{'HF MB':>8}{'pad ex/s':>10} |{'x HF':>6}{'x pad':>7}{'mem/HF':>8}",
    ]
    for r in t["train"]:
        sp = r["spec"]
        if sp["pipeline"] != "project":
            continue
        strategy, gc = sp["strategy"], sp["gradient_checkpointing"]
        if "error" in r:
            lines.append(f"{strategy:<9}{'on' if gc else 'off':<5} FAILED: {r['error']}")
            continue
        hf, pad = _find(t["train"], strategy, gc, "hf"), _find(t["train"], strategy, gc, "hf_pad")
        key = "gc_on" if gc else "gc_off"
        lines.append(
            f"{strategy:<9}{'on' if gc else 'off':<5}{r['examples_per_s']:>8.2f}{r['tokens_per_s']:>8.0f}"
            f"{r['mfu'] * 100:>6.1f}%{_fmt(r.get('padded_over_real_source_tokens')):>6}{r['peak_memory_mb']:>9.0f} |"
            f"{_fmt(hf.get('examples_per_s')):>9}{_fmt(hf.get('padded_over_real_source_tokens')):>6}"
            f"{_fmt(hf.get('peak_memory_mb'), '.0f'):>8}{_fmt(pad.get('examples_per_s')):>10} |"
            f"{_fmt(t['train_speedup_vs_hf_by_gc'][strategy][key]):>6}"
            f"{_fmt(t['train_speedup_vs_pad_to_max'][strategy] if not gc else None):>7}"
            f"{_fmt(t['peak_memory_over_hf'][strategy][key]):>8}"
        )
    ev = t["eval"]
    lines += [
        "",
        f"evaluation: flan_squad.evaluate's path (Trainer.validate: every window, best window, snapping, scoring) "
        f"against Seq2SeqTrainer.predict(predict_with_generate=True), batch {s['batch_size']}, questions/s "
        f"(median of {len(ev['seconds']['project'])})",
        f"{'weights':<22}{'questions':>10}{'inputs':>10}{'tok/answer':>11} |{'project':>9}{'HF':>8} |{'x HF':>6} |"
        f"{'same answer':>17}{'same pred':>11}",
    ]
    trained = "planted" if s["trained_model"] == "planted" else Path(s["trained_model"]).name
    for label, e in (("random init", ev), (f"trained ({trained})", t["eval_trained"])):
        if not e:
            continue
        inputs = f"{e['model_inputs']['project']}/{e['model_inputs']['hf']}"
        same = (f"{e['answer_agreement'] * 100:.1f}% of {e['single_window_questions']}"
                if e["answer_agreement"] is not None else "-")
        lines.append(
            f"{label:<22}{e['questions']:>10}{inputs:>10}{e['answer_tokens_mean']:>11.1f} |"
            f"{e['examples_per_s']['project']:>9.2f}{e['examples_per_s']['hf']:>8.2f} |"
            f"{_fmt(_eval_ratio(e, e)):>6} |{same:>17}{e['prediction_agreement'] * 100:>10.1f}%"
        )
    lines.append("  inputs: model inputs, project/HF (long contexts: several windows); same answer: on questions "
                 "answered from one window, the project's greedy answer before snapping; same pred: final predictions")
    return lines
