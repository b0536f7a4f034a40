"""Bounded loop of streamed chat requests over keep-alive connections (loopback only).

Drives an in-process uvicorn server (FakeEngine by default, or a real model with --model)
with the official openai client: waves of mixed concurrency and mixed max_tokens (60%
streams read to the end, 20% non-streamed, 20% streams the client drops early), each
worker thread reusing its client's keep-alive connections, with idle gaps around the
server's keep-alive timeout. Every stream must end with [DONE] and the full token count;
any exception is counted and printed with its type.

Time is scaled down: clients expire idle connections after --client-expiry (0.5 s, httpx
uses 5 s) and the server keeps them --keep-alive (by default in serve's ratio, 12 s; pass
--keep-alive 0.5 --client-expiry 5 for a server that closes idle connections first, as
uvicorn's default 5 s did against clients keeping them 5 s or longer: requests drop).

    python benchmarks/stream_loop.py --requests 1500
    python benchmarks/stream_loop.py --requests 1500 --keep-alive 0.5 --client-expiry 5
    python benchmarks/stream_loop.py --model smollm2-135m-instruct --requests 150
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import random
import sys
import time
from pathlib import Path

from _common import header, print_header, write_json

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "server"))


def _server_app(model: str | None):
    from mlxkv.config import ServerConfig
    from server.app import create_app

    if model is None:
        from fake_engine import FakeEngine

        engine = FakeEngine(delay=0.0002)
        return create_app(engine, ServerConfig()), engine, "fake-model", None
    from mlxkv.async_engine import AsyncEngine
    from mlxkv.config import CacheConfig, EngineConfig
    from mlxkv.engine import LLMEngine
    from mlxkv.models.loader import load_model

    loaded = load_model(model, progress=False)
    engine = AsyncEngine(LLMEngine.from_config(EngineConfig(cache=CacheConfig(num_blocks=512)),
                                               loaded=loaded))
    return create_app(engine), engine, engine.model_name, engine.shutdown


def dropped_stream(client, model: str, max_tokens: int, cut: int) -> None:
    """A client that leaves after `cut` chunks (its connection is closed, not reused)."""
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Drop me"}], max_tokens=max_tokens,
        temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i >= cut:
            break
    stream.close()


def one_request(client, model: str, max_tokens: int, kind: str) -> int:
    if kind == "plain":
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Plain " + "y" * max_tokens}],
            max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
        return resp.usage.completion_tokens
    if kind == "drop":
        dropped_stream(client, model, max_tokens + 8, max_tokens // 4)
        return max_tokens
    return one_stream(client, model, max_tokens)


def one_stream(client, model: str, max_tokens: int) -> int:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count: " + "x" * max_tokens}],
        max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    return usage.completion_tokens


def run_loop(url: str, model: str, num_requests: int, keep_alive_s: float, seed: int,
             retries: int = 0, client_expiry_s: float = 5.0) -> dict:
    """Waves of requests; returns counts of complete ones and of errors by type."""
    import httpx2
    import openai

    rng = random.Random(seed)
    errors: collections.Counter[str] = collections.Counter()
    examples: list[str] = []
    num_ok = 0
    limits = httpx2.Limits(max_connections=100, max_keepalive_connections=20,
                           keepalive_expiry=client_expiry_s)
    clients = [openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=retries,
                             http_client=openai.DefaultHttpxClient(limits=limits))
               for _ in range(32)]
    done = 0
    while done < num_requests:
        concurrency = rng.choice([1, 2, 4, 8, 16, 32])
        lengths = [rng.choice([1, 2, 8, 32, 64]) for _ in range(min(concurrency,
                                                                    num_requests - done))]
        # idle gaps: none, short, or right around the earlier of the two timeouts (where
        # one side closes a connection the other may be about to reuse)
        first_close = min(keep_alive_s, client_expiry_s)
        gap = rng.choice([0.0, 0.0, 0.05, first_close - 0.02, first_close + 0.01])
        time.sleep(max(0.0, gap))
        with cf.ThreadPoolExecutor(len(lengths)) as pool:
            kinds = rng.choices(["stream", "plain", "drop"], weights=[6, 2, 2], k=len(lengths))
            futures = {pool.submit(one_request, clients[i], model, n, kind): (n, kind)
                       for i, (n, kind) in enumerate(zip(lengths, kinds, strict=True))}
            for fut, (n, kind) in futures.items():
                try:
                    got = fut.result()
                    if got != n:
                        raise AssertionError(f"{got} tokens, expected {n}")
                    num_ok += 1
                except Exception as exc:  # counted and reported, never fatal
                    errors[type(exc).__name__] += 1
                    if len(examples) < 5:
                        examples.append(f"{kind} after a {gap:.2f}s gap at concurrency "
                                        f"{concurrency}: {exc!r} (cause {exc.__cause__!r})")
        done += len(lengths)
    return {"num_requests": done, "num_ok": num_ok, "errors": dict(errors),
            "examples": examples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a real model (default: the FakeEngine)")
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--keep-alive", type=float, default=None,
                    help="server keep-alive timeout in seconds (default: server.serve's "
                    "KEEP_ALIVE_S scaled by --client-expiry / 5)")
    ap.add_argument("--client-expiry", type=float, default=0.5,
                    help="the clients' keep-alive expiry in seconds (httpx's default is 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retries", type=int, default=0, help="openai client max_retries")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import uvicorn
    from live_server import free_port, serve_in_thread

    from server.serve import KEEP_ALIVE_S

    if args.keep_alive is None:  # serve's ratio of server timeout to httpx's 5 s expiry
        args.keep_alive = KEEP_ALIVE_S * args.client_expiry / 5.0
    app, _, model, shutdown = _server_app(args.model)
    h = header(args.model or "fake-engine", "n/a", vars(args))
    print_header(h)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            timeout_keep_alive=args.keep_alive)
    with serve_in_thread(config) as url:
        t0 = time.perf_counter()
        result = run_loop(url, model, args.requests, args.keep_alive, args.seed, args.retries,
                          args.client_expiry)
        result["wall_s"] = time.perf_counter() - t0
    if shutdown:
        shutdown()
    print(f"{result['num_ok']}/{result['num_requests']} streams complete in "
          f"{result['wall_s']:.1f}s; errors {result['errors']}")
    for e in result["examples"]:
        print("  ", e)
    name = "stream_loop_" + ("fake" if args.model is None else "real") + (
        "_server_timeout_first" if args.keep_alive <= args.client_expiry else "")
    write_json(name, {**h, **result}, args.out)


if __name__ == "__main__":
    main()
