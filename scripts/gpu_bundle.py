"""The GPU bundle: what the lent GPU machine's image lacks, in one git-ignored folder that travels with the checkout.

    python scripts/gpu_bundle.py              # make gpu-bundle: writes gpu-bundle/, prints the size that travels

The image (CPython 3.12, torch 2.11 for CUDA 13.0, transformers, Lightning, peft; no package index, no hub, no
../shared: docs/gpu.md) gets from the bundle:
- wheels/: the packages it lacks (BUNDLED), at constraints-cpu.txt's versions, for CPython 3.12 on manylinux x86_64:
  downloaded with `pip download --no-deps --only-binary=:all:`; antlr4-python3-runtime, published as a source
  archive only, built into a wheel here; bitsandbytes rewritten with only its CUDA 13.0 and CPU libraries (its
  wheel carries one library per CUDA version, 43 MB in all);
- shared/: a cut of ../shared (FLAN_SQUAD_SHARED=<bundle>/shared): each large SQuAD file's first articles (about
  1,000 questions), the small ones and the tokenizer whole.
`scripts/gpu_check.py --bundle <dir>` installs the wheels the running Python lacks (`pip install --no-index
--no-deps --target <dir>/site`) and reads the data from shared/. Exits 1 when checkout + bundle exceed 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the image lacks of what the check imports: hydra and its config library, 4-bit weights, and `datasets`
# (the hub path; imported only there) with the two packages of its own that the image does not have.
BUNDLED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "bitsandbytes", "datasets", "dill", "multiprocess")
BUILT_HERE = ("antlr4-python3-runtime",)  # no wheel published
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PYTHON_VERSION = "3.12"
BNB_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")  # the image's CUDA 13.0, and the CPU fallback
SQUAD_QUESTIONS = 1000  # per SQuAD file: whole articles until at least this many questions ...
WHOLE_BELOW_MIB = 2  # ... unless it is small (the v2.0 train sample, whose unanswerable questions are in 2 articles)
TRAVEL_LIMIT_MIB = 64


def pins(constraints: Path = ROOT / "constraints-cpu.txt") -> dict[str, str]:
    """{normalised name: version} of the tested set."""
    found = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found[_normalise(name)] = version.strip()
    return found


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def fetch_wheels(wheels: Path, versions: dict[str, str]) -> None:
    """The BUNDLED packages' wheels for the image's Python and platform, built here where none is published."""
    missing = [name for name in BUNDLED if name not in versions]
    if missing:
        raise SystemExit(f"error: constraints-cpu.txt pins no version of {', '.join(missing)}")
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name in BUNDLED:
        spec = f"{name}=={versions[name]}"
        if name in BUILT_HERE:
            _pip("wheel", "--quiet", "--no-deps", "--no-binary", name, "--wheel-dir", str(wheels), spec)
        else:
            _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
                 *platforms, "--dest", str(wheels), spec)


def trim_bitsandbytes(wheels: Path) -> Path:
    """bitsandbytes' wheel rewritten without the native libraries the image does not load (BNB_KEEP stays).

    Same version and metadata; the file name gets the wheel build tag `1trimmed` so that it is never taken for the
    published wheel."""
    (source,) = [w for w in wheels.glob("bitsandbytes-*.whl") if "-1trimmed-" not in w.name]
    name, version, *tags = source.stem.split("-")
    target = wheels / ("-".join([name, version, "1trimmed", *tags]) + ".whl")
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        dropped = {i.filename for i in old.infolist()
                   if Path(i.filename).name.startswith("libbitsandbytes") and Path(i.filename).name not in BNB_KEEP}
        for item in old.infolist():
            if item.filename in dropped:
                continue
            data = old.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(",")[0] not in dropped).encode()
            elif item.filename.endswith(".dist-info/WHEEL"):
                data = data.decode().rstrip("\n").encode() + b"\nBuild: 1trimmed\n"
            new.writestr(item, data)
    kept = [n for n in BNB_KEEP if any(Path(f).name == n for f in zipfile.ZipFile(target).namelist())]
    if kept != list(BNB_KEEP):
        raise SystemExit(f"error: {source.name} lacks {sorted(set(BNB_KEEP) - set(kept))}: another CUDA build?")
    source.unlink()
    return target


def cut_squad(source: Path, target: Path, questions: int = SQUAD_QUESTIONS) -> int:
    """The file's first articles, whole, until at least `questions` questions: returns how many it kept."""
    squad = json.loads(source.read_text())
    kept, count = [], 0
    for article in squad["data"]:
        if count >= questions:
            break
        kept.append(article)
        count += sum(len(p["qas"]) for p in article["paragraphs"])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({**squad, "data": kept}))
    return count


def copy_shared(shared: Path, target: Path) -> list[str]:
    """The cut of ../shared: every large SQuAD file cut (`cut_squad`), small ones and the tokenizer whole."""
    notes = []
    for source in sorted((shared / "data" / "squad").rglob("*.json")):
        relative = source.relative_to(shared)
        if source.stat().st_size < WHOLE_BELOW_MIB * 2**20:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / relative)
            notes.append(f"{relative}: whole")
        else:
            notes.append(f"{relative}: {cut_squad(source, target / relative)} questions")
    tokenizer = Path("models") / "flan-t5-small-tokenizer"
    shutil.copytree(shared / tokenizer, target / tokenizer)
    return notes


def size_mib(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def checkout_files(root: Path = ROOT) -> list[Path]:
    """What travels of the checkout: tracked files and untracked ones that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    return [root / name for name in listed.split("\0") if name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "gpu-bundle"), help="the bundle's folder (git-ignored)")
    parser.add_argument("--shared", default=os.environ.get("FLAN_SQUAD_SHARED", str(ROOT.parent / "shared")))
    args = parser.parse_args(argv)
    out, shared = Path(args.out).resolve(), Path(args.shared).resolve()
    if not (shared / "data" / "squad").is_dir():
        raise SystemExit(f"error: no SQuAD files under {shared}/data/squad: set --shared or FLAN_SQUAD_SHARED")
    staging = out.with_name(out.name + ".partial")  # the old bundle stays whole until the new one is complete
    shutil.rmtree(staging, ignore_errors=True)
    fetch_wheels(staging / "wheels", pins())
    trim_bitsandbytes(staging / "wheels")
    notes = copy_shared(shared, staging / "shared")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    bundle = [p for p in out.rglob("*") if p.is_file()]
    checkout = [p for p in checkout_files() if out not in p.parents]
    total = size_mib(bundle) + size_mib(checkout)
    for path in sorted((out / "wheels").iterdir()):
        print(f"  {path.stat().st_size / 2**20:6.2f} MiB  {path.name}")
    print("\n".join(f"  {note}" for note in notes))
    print(f"bundle {out}: {size_mib(bundle):.1f} MiB; checkout: {size_mib(checkout):.1f} MiB; travels: "
          f"{total:.1f} MiB of {TRAVEL_LIMIT_MIB} MiB")
    if total > TRAVEL_LIMIT_MIB:
        print(f"error: {total:.1f} MiB travels, above the {TRAVEL_LIMIT_MIB} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
