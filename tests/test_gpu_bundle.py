"""The GPU bundle (scripts/gpu_bundle.py: `make gpu-bundle`) and how the GPU check installs it (scripts/gpu_check.py
--bundle), with pip itself. The whole of it, on the GPU image's versions: `make gpu-rehearsal` (docs/gpu.md)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

from conftest import DEV_V1, SHARED
from flan_squad.data.squad import read_squad_file
from flan_squad.utils.config import PROJECT_ROOT


def _script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    if name not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _wheel(directory: Path, name: str, version: str, files: dict[str, bytes], tag: str = "py3-none-any") -> Path:
    """A wheel as build tools write one: the files, then METADATA, WHEEL and RECORD (with each file's hash)."""
    info = f"{name}-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {tag}\n".encode()}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()] + [f"{info}/RECORD,,"]
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in {**files, f"{info}/RECORD": "\n".join(record).encode() + b"\n"}.items():
            archive.writestr(path, data)
    return wheel


def test_bitsandbytes_keeps_the_image_libraries_and_the_check_installs_only_what_this_python_lacks(tmp_path,
                                                                                                   monkeypatch):
    bundle, check = _script("gpu_bundle"), _script("gpu_check")
    installed = check._version
    # a Python without bitsandbytes, as the image
    monkeypatch.setattr(check, "_version", lambda name: None if name == "bitsandbytes" else installed(name))
    wheels = tmp_path / "bundle" / "wheels"
    libraries = {f"bitsandbytes/libbitsandbytes_{kind}.so": kind.encode() * 1000 for kind in
                 ("cpu", "cuda118", "cuda128", "cuda130")}
    _wheel(wheels, "bitsandbytes", "0.50.2", {"bitsandbytes/__init__.py": b"", **libraries},
           tag="py3-none-manylinux_2_24_x86_64")
    _wheel(wheels, "torch", "0.0.1", {"torch/__init__.py": b"raise ImportError"})  # this Python has torch

    trimmed = bundle.trim_bitsandbytes(wheels)
    assert sorted(p.name for p in wheels.iterdir()) == [
        "bitsandbytes-0.50.2-1trimmed-py3-none-manylinux_2_24_x86_64.whl", "torch-0.0.1-py3-none-any.whl"]
    notes = check.install_bundle(tmp_path / "bundle", tmp_path / "site")  # pip install --no-index --no-deps --target

    site = tmp_path / "site"
    assert sorted(p.name for p in (site / "bitsandbytes").glob("*.so")) == ["libbitsandbytes_cpu.so",
                                                                           "libbitsandbytes_cuda130.so"]
    record = next(site.glob("bitsandbytes-*.dist-info")).joinpath("RECORD").read_text()
    assert "cuda130" in record and "cuda128" not in record and "cuda118" not in record
    assert not (site / "torch").exists()  # left to this Python's own
    assert f"{trimmed.name}: installed" in notes and any(n.startswith("torch-0.0.1") and "this Python has" in n
                                                         for n in notes)


def test_squad_cut_keeps_whole_articles_that_the_project_reads(tmp_path):
    bundle = _script("gpu_bundle")
    target = tmp_path / "dev.json"
    kept = bundle.cut_squad(DEV_V1, target, questions=50)
    version, questions = read_squad_file(target)
    full = json.loads(DEV_V1.read_text())
    first = full["data"][0]
    assert version == "v1" and len(questions) == kept >= 50
    assert json.loads(target.read_text())["data"][0] == first  # whole articles, as they were, in order
    assert kept < 50 + max(sum(len(p["qas"]) for p in a["paragraphs"]) for a in full["data"][:10])


def test_bundle_pins_every_package_it_carries():
    bundle = _script("gpu_bundle")
    pinned = bundle.pins()
    assert {name: pinned.get(name) for name in bundle.BUNDLED if name not in pinned} == {}
    assert (SHARED / "models" / "flan-t5-small-tokenizer").is_dir()  # what copy_shared copies whole
