"""AsyncEngine builds its engine on the engine thread; validation reads only plain ints."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mlxkv.async_engine import AsyncEngine
from mlxkv.config import CacheConfig, EngineConfig
from mlxkv.engine import LLMEngine
from mlxkv.errors import InvalidRequestError
from mlxkv.models.tiny import make_tiny_model
from mlxkv.sampling import SamplingParams


def test_engine_is_built_and_stepped_on_its_own_thread():
    threads = []

    def build():
        threads.append(threading.current_thread().name)
        config = EngineConfig(cache=CacheConfig(block_size=4, num_blocks=64))
        return LLMEngine.from_config(config, loaded=(make_tiny_model("llama"), None))

    engine = AsyncEngine(build)
    try:
        assert threads == ["mlxkv-engine"] and engine.is_healthy()

        async def generate():
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            return [o async for o in engine.generate("a", [1, 2, 3, 4, 5], params)]

        outs = asyncio.run(generate())
        assert sum(len(o.new_token_ids) for o in outs) == 4 and outs[-1].finished
        with pytest.raises(InvalidRequestError):  # checked against the cached vocab size
            engine.engine.validate([engine.engine.vocab_size], SamplingParams())
    finally:
        engine.shutdown()


def test_a_failing_build_raises_in_the_caller():
    def build():
        raise RuntimeError("no model")

    with pytest.raises(RuntimeError, match="no model"):
        AsyncEngine(build)
