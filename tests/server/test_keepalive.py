"""Regression: streamed requests over reused keep-alive connections never drop.

The flaky APIConnectionError was uvicorn's 5 s keep-alive racing the openai client's 5 s
idle expiry: a request sent on a connection the server was closing met a reset socket.
benchmarks/stream_loop.py has the 1,500-request loop (6 drops with the server timing out
first, 0 with serve's setting); this is its short, time-scaled version.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import time

import httpx2
import openai
import pytest
from fake_engine import FakeEngine
from live_server import free_port, live_server, serve_in_thread

from mlxkv.config import ServerConfig
from server.app import create_app
from server.serve import KEEP_ALIVE_S, uvicorn_config

HTTPX_DEFAULT_EXPIRY_S = httpx2.Limits().keepalive_expiry  # what the openai client uses


def test_server_keeps_idle_connections_longer_than_clients_do():
    config = uvicorn_config(create_app(FakeEngine()), "127.0.0.1", 8000)
    assert config.timeout_keep_alive == KEEP_ALIVE_S
    assert KEEP_ALIVE_S >= 10 * HTTPX_DEFAULT_EXPIRY_S


def _stream(client, max_tokens: int) -> int:
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True,
        max_tokens=max_tokens, stream_options={"include_usage": True})
    return [c for c in stream][-1].usage.completion_tokens


def test_streams_over_reused_connections_at_the_idle_expiry_all_complete():
    expiry = 0.2  # the client side, scaled down from httpx's 5 s
    app = create_app(FakeEngine(), ServerConfig())
    config = uvicorn_config(app, "127.0.0.1", free_port(),
                            keep_alive_s=KEEP_ALIVE_S * expiry / HTTPX_DEFAULT_EXPIRY_S)
    config.log_level = "error"
    limits = httpx2.Limits(max_keepalive_connections=8, keepalive_expiry=expiry)
    rng = random.Random(3)
    errors = []
    with serve_in_thread(config) as url:
        clients = [openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                 http_client=openai.DefaultHttpxClient(limits=limits))
                   for _ in range(8)]
        with cf.ThreadPoolExecutor(8) as pool:
            for _ in range(30):
                time.sleep(rng.choice([0.0, expiry - 0.01, expiry + 0.01]))
                lengths = [rng.choice([1, 4, 16]) for _ in range(rng.choice([1, 4, 8]))]
                futures = [pool.submit(_stream, clients[i], n) for i, n in enumerate(lengths)]
                for fut, n in zip(futures, lengths, strict=True):
                    try:
                        assert fut.result() == n
                    except openai.APIConnectionError as exc:
                        errors.append(repr(exc.__cause__))
    assert not errors, errors


class _RaisingEngine(FakeEngine):
    """Streams one delta, then its stream raises (an engine fault after the headers)."""

    async def generate(self, request_id, prompt_token_ids, params):
        from mlxkv.outputs import RequestOutput

        yield RequestOutput(request_id, 0, [100], "t100 ", num_prompt_tokens=3,
                            num_generated_tokens=1)
        raise RuntimeError("engine fault")


def test_a_stream_that_fails_after_the_headers_still_ends_cleanly():
    with live_server(create_app(_RaisingEngine(), ServerConfig())) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(openai.APIError, match="engine fault"):
            list(stream)
        raw = httpx2.post(url + "/v1/chat/completions", json={
            "model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
            "stream": True}).text
    assert '"RuntimeError: engine fault"' in raw and raw.endswith("data: [DONE]\n\n")
