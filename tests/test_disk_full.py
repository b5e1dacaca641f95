"""A full disk, on a real one: a small tmpfs that a filler file fills at a chosen write. The write fails in one line
naming its file (exit status 2), the file it would have replaced stays whole, no temporary file is left (freeing
the filler is enough), and the run then resumes to the uninterrupted run's result."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config, one_error_line
from fault_injection import fill, fill_disk_at_write
from flan_squad.runs.lifecycle import Run
from flan_squad.runs.trainer import AtomicCheckpointIO
from flan_squad.utils.errors import DiskFull
from flan_squad.utils.files import write_dir_atomic, write_json_atomic


@pytest.fixture
def disk(tmp_path) -> Iterator[Path]:
    """A 32 MiB tmpfs of its own, unmounted after (lazily: a run in this process may still hold a log open)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        pytest.fail(mounted.stderr)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def _leftovers(directory: Path) -> list[str]:
    """Temporary files and dirs of atomic writes (`.<name>.<random>.tmp`, `.<name>.staging-*`, `.<name>.old-*`)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*")
                  if p.name.endswith(".tmp") or ".staging-" in p.name or ".old-" in p.name)


# --- each writer: the old version whole, nothing left over ------------------------------------------------------

WRITERS = {  # a write of `version`, over a page of the filesystem
    "checkpoint": lambda path, version: AtomicCheckpointIO().save_checkpoint(
        {"version": version, "weights": torch.ones(50_000)}, path),
    "json": lambda path, version: write_json_atomic(path, {"version": version, "padding": "x" * 50_000}),
    "dir": lambda path, version: write_dir_atomic(path, lambda d: (
        (d / "version").write_text(str(version)), (d / "weights.bin").write_bytes(bytes(50_000)))),
}
READERS = {
    "checkpoint": lambda path: torch.load(path, weights_only=True)["version"],
    "json": lambda path: json.loads(path.read_text())["version"],
    "dir": lambda path: int((path / "version").read_text()),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_write_that_finds_the_disk_full_names_its_file_and_keeps_the_old_one(kind, disk):
    path = disk / "run" / "target"
    WRITERS[kind](path, 1)
    fill(disk / "filler")
    with pytest.raises(DiskFull) as failed:
        WRITERS[kind](path, 2)
    assert str(failed.value).startswith(f"{path}: no space left") and "\n" not in str(failed.value)
    assert READERS[kind](path) == 1 and _leftovers(disk / "run") == []
    (disk / "filler").unlink()
    WRITERS[kind](path, 2)
    assert READERS[kind](path) == 2


def test_the_run_log_on_a_full_disk_loses_lines_without_a_traceback(disk, capsys):
    # Hydra's job log (train.log) is written through RunLogFile: logging's own handler prints a traceback on stderr
    # for each line it cannot write, and the run's one-line error would drown in them.
    from flan_squad.utils.config import compose
    from flan_squad.utils.logs import RunLogFile

    job_logging = compose("train", [], return_hydra_config=True).hydra.job_logging
    assert job_logging.handlers.file["class"] == "flan_squad.utils.logs.RunLogFile"
    handler = RunLogFile(disk / "train.log")
    record = logging.LogRecord("run", logging.ERROR, __file__, 1, "x" * 200, None, None)
    fill(disk / "filler")
    for _ in range(100):  # 20 kB: pages the full disk cannot give
        handler.emit(record)
    assert capsys.readouterr().err == ""
    with contextlib.suppress(OSError):  # what it still buffers cannot be written either (as at logging.shutdown)
        handler.close()


# --- the results of a run --------------------------------------------------------------------------------------

SMOKE = ["experiment=smoke", "strategy=lora", "dataset=squad_v1"]
RESULTS = {"metrics": {"f1": 1.0}, "predictions": {"q1": "an answer"}, "na_probs": None, "summary": "done"}


@pytest.fixture
def _rank_zero(monkeypatch):
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.usefixtures("_rank_zero")
@pytest.mark.parametrize("name", ["predictions.json", "metrics.json", "status.json"])
def test_results_that_find_the_disk_full_leave_the_run_unfinished_and_resumable(name, disk):
    # A run that has trained (its config.yaml, and a last.ckpt) fails writing its results: no metrics.json (a run
    # without its status.json "completed" is not finished either), so resume=true continues it once space is freed.
    run_dir = disk / "run"
    cfg = compose_config(SMOKE, output_dir=run_dir)
    with pytest.raises(DiskFull) as failed, Run(cfg) as run:
        run.start()
        (run_dir / "checkpoints").mkdir()
        torch.save({"global_step": 4}, run_dir / "checkpoints" / "last.ckpt")
        fill_disk_at_write(run_dir, f".{name}.*", disk / "filler")
        run.complete(**RESULTS)
    assert str(failed.value) == (f"{run_dir / name}: no space left on its device (disk full or quota exceeded): "
                                 f"free space, then rerun the same command with resume=true in "
                                 f"hydra.run.dir={run_dir}")
    assert not (run_dir / "metrics.json").exists() and _leftovers(run_dir) == []

    (disk / "filler").unlink()
    with Run(compose_config([*SMOKE, "resume=true"], output_dir=run_dir)) as run:
        assert run.start(resume=True) == str(run_dir / "checkpoints" / "last.ckpt")
        run.complete(**RESULTS)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "metrics.json").read_text()) == RESULTS["metrics"]


@pytest.mark.usefixtures("_rank_zero")
def test_with_overwrite_a_full_disk_puts_the_previous_run_back_whole(disk):
    run_dir = disk / "run"
    cfg = compose_config(SMOKE, output_dir=run_dir)
    with Run(cfg) as run:
        run.start()
        run.complete(**RESULTS)
    before = {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(DiskFull) as failed, Run(cfg) as run:
        run.start(overwrite=True)
        fill_disk_at_write(run_dir, ".metrics.json.*", disk / "filler")
        run.complete(**{**RESULTS, "metrics": {"f1": 2.0}})
    # the previous run is back: this one starts again (it has nothing to resume)
    assert str(failed.value).endswith("free space, then run the same command again")
    assert {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# --- a training run, through the entry point ---------------------------------------------------------------------

# 16 questions in batches of 4: 4 steps, one epoch; a rolling last.ckpt after every step; the default logger.
RUN = ["experiment=smoke", "strategy=lora", "dataset=squad_v1", "dataset.limit_train=16", "dataset.batch_size=4",
       "dataset.limit_val=4", "trainer.max_epochs=1", "trainer.precision=32-true", "eval.max_new_tokens=4",
       "callbacks.last_checkpoint.every_n_train_steps=1"]


def _fill_at(pattern: str, filler: Path, nth: int = 1) -> list[str]:
    """A Hydra callback, so not part of the run's config: a resume may strike elsewhere."""
    return ["+hydra.callbacks.fill._target_=fault_injection.FillDiskAtWrite",
            f"+hydra.callbacks.fill.pattern={pattern}", f"+hydra.callbacks.fill.filler={filler}",
            f"+hydra.callbacks.fill.nth={nth}"]


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.long
def test_a_run_stopped_by_a_full_disk_again_and_again_resumes_to_the_uninterrupted_result(disk, tmp_path, cache_dir,
                                                                                         run_entry_point):
    from flan_squad.train import train

    run_dir, filler = disk / "run", disk / "filler"
    args = [*RUN, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}"]

    # Each attempt is the entry point's, in this process (a real process would add ~10 s of imports to each); its
    # fill strikes once and then does nothing.
    # 1. The disk fills as the third last.ckpt (step 3) is written: last.ckpt stays at step 2.
    first = run_entry_point("flan_squad.train", [*args, *_fill_at("checkpoints/.last.ckpt.*", filler, nth=3)])
    one_error_line(first, f"{run_dir}/checkpoints/last.ckpt: no space left", "free space",
                   f"resume=true in hydra.run.dir={run_dir}")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert _leftovers(run_dir) == [] and not (run_dir / "metrics.json").exists()

    # 2. Resumed before any space is freed: refused where it first writes, its config.yaml, which stays whole.
    config = (run_dir / "config.yaml").read_bytes()
    still_full = run_entry_point("flan_squad.train", [*args, "resume=true"])
    one_error_line(still_full, f"{run_dir}/config.yaml: no space left", "resume=true")
    assert (run_dir / "config.yaml").read_bytes() == config and _leftovers(run_dir) == []

    # 3. Space freed; the disk fills again as predictions.json is written (model/ is written by then).
    filler.unlink()
    results = run_entry_point("flan_squad.train", [*args, "resume=true", *_fill_at(".predictions.json.*", filler)])
    one_error_line(results, f"{run_dir}/predictions.json: no space left", "resume=true")
    assert not (run_dir / "predictions.json").exists() and not (run_dir / "metrics.json").exists()
    assert _leftovers(run_dir) == []

    # 4. Freed again; this time model/ finds the disk full: the one written in 3 stays, the very same dir.
    filler.unlink()
    model, inode = _files(run_dir / "model"), (run_dir / "model").stat().st_ino
    saved = run_entry_point("flan_squad.train", [*args, "resume=true", *_fill_at(".model.staging-*", filler)])
    one_error_line(saved, f"{run_dir}/model: no space left", "resume=true")
    assert (run_dir / "model").stat().st_ino == inode and _files(run_dir / "model") == model
    assert _leftovers(run_dir) == []

    # 5. Freed: the resume finishes, with the uninterrupted run's weights, answers and scores.
    filler.unlink()
    resumed = run_entry_point("flan_squad.train", [*args, "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference_dir = tmp_path / "uninterrupted"
    reference = train(compose_config(RUN, output_dir=reference_dir, cache=cache_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["f1"], metrics["exact"], metrics["best_checkpoint"], metrics["optimizer_steps"]) == (
        reference["f1"], reference["exact"], reference["best_checkpoint"], reference["optimizer_steps"])
    adapters = [load_file(d / "model" / "adapter_model.safetensors") for d in (run_dir, reference_dir)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all((adapters[0][key] - tensor).abs().max() <= 1e-6 for key, tensor in adapters[1].items())
    assert (run_dir / "predictions.json").read_text() == (reference_dir / "predictions.json").read_text()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
