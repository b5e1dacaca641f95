"""What a training run continues from: the checkpoint that resume=true, ckpt_path=... or a SLURM requeue names,
checked before anything is loaded (only local files that are whole checkpoints; never a finished run)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from flan_squad.utils.errors import RunDirError

LAST_CHECKPOINT = "checkpoints/last.ckpt"  # the rolling checkpoint (conf/callbacks: last_checkpoint)


def checkpoint_to_resume(output_dir: Path, ckpt_path: str | None, overwrite: bool) -> str:
    """The checkpoint a resumed run starts from: `ckpt_path`, or else this dir's `checkpoints/last.ckpt`.

    Raises:
        RunDirError: no checkpoint there, one that is not readable, or a run that already finished (unless
            overwrite=true).
    """
    path = check_checkpoint(ckpt_path, "ckpt_path") if ckpt_path else output_dir / LAST_CHECKPOINT
    if not path.is_file():
        raise RunDirError(f"nothing to resume: no checkpoint at {path}"
                          + ("" if ckpt_path else " (resume=true continues a run in its own hydra.run.dir)"))
    if (output_dir / "metrics.json").exists() and not overwrite:
        raise RunDirError(f"{output_dir} holds a finished run (metrics.json): nothing to resume; "
                          f"pass overwrite=true to train again from the checkpoint")
    if not ckpt_path:
        check_checkpoint(str(path), "resume=true")
    return str(path)


def check_checkpoint(path: str, option: str) -> Path:
    """A local file that `torch.load` can read (a zip archive): a URL, a text file or a truncated file is refused."""
    if "://" in str(path):
        # Lightning unpickles remote checkpoints in full (weights_only=False): code could run.
        raise RunDirError(f"{option}={path}: remote checkpoints are not loaded (unpickling one can run code); "
                          f"download it and pass the local path")
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        what = "resume=true: " if option == "resume=true" else f"{option}="
        raise RunDirError(f"{what}{path} is not a readable checkpoint (truncated, e.g. written when the run was "
                          f"killed, or not a .ckpt file)"
                          + ("; resume from an earlier one with ckpt_path=<run dir>/checkpoints/<file>.ckpt"
                             if option == "resume=true" else ""))
    return path


def requeued(output_dir: Path) -> bool:
    """A SLURM job that was requeued (preempted, or Lightning's auto-requeue) and left an unfinished run here."""
    return (int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and (output_dir / LAST_CHECKPOINT).is_file()
            and not (output_dir / "metrics.json").exists())
