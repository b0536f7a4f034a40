"""`mlxkv serve`: flags, loopback-by-default binding, engine start-up, uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from mlxkv.config import EngineConfig
from mlxkv.errors import MlxkvError

log = logging.getLogger("mlxkv.server")

# NOTE: idle keep-alive connections must outlive the clients' own expiry. uvicorn's default
# (5 s) equals httpx's (the openai client's) keepalive_expiry, so a client reusing a
# connection idle for ~5 s raced the server closing it: the request met a reset socket and
# the client raised APIConnectionError (benchmarks/stream_loop.py reproduces it). With the
# server's timeout well above common client expiries (httpx 5 s, aiohttp 15 s, nginx 75 s,
# Go 90 s) the client always drops an idle connection first.
KEEP_ALIVE_S = 120.0


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags plus the HTTP ones."""
    EngineConfig.add_cli_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    g.add_argument("--served-model-name", default=None, help="model id clients must send")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback address")
    g.add_argument("--log-prompts", action="store_true", help="log prompt text (off by default)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool, api_key: str | None) -> None:
    """Refuse a non-loopback bind without --allow-remote; warn when it has no API key."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise MlxkvError(f"refusing to bind {host}: pass --allow-remote to serve beyond loopback")
    if api_key is None:
        log.warning("serving on %s without --api-key: anyone on the network can use it", host)


def uvicorn_config(app, host: str, port: int, keep_alive_s: float = KEEP_ALIVE_S):
    """The uvicorn.Config `serve` runs `app` with."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning",
                          timeout_keep_alive=keep_alive_s)


def serve(config: EngineConfig, allow_remote: bool = False) -> None:
    """Start the engine and serve until interrupted."""
    import uvicorn

    from mlxkv.async_engine import AsyncEngine
    from server.app import create_app

    check_bind(config.server.host, allow_remote, config.server.api_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine = AsyncEngine.from_config(config)
    app = create_app(engine, config.server)
    log.info("serving %s on http://%s:%d", engine.model_name, config.server.host,
             config.server.port)
    try:
        uvicorn.Server(uvicorn_config(app, config.server.host, config.server.port)).run()
    finally:
        engine.shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        serve(EngineConfig.from_args(args), allow_remote=args.allow_remote)
    except (MlxkvError, ValueError) as exc:
        print(f"mlxkv: error: {exc}", file=sys.stderr)
        return 2
    return 0
