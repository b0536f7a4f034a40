"""AsyncEngine: one engine thread owns every mx array; callers get asyncio streams.

The engine thread builds the LLMEngine (model, pools: every mx array is created and used
there), drains a thread-safe inbox, steps the engine and hands each delta back with
`loop.call_soon_threadsafe`. The event loop side only validates (plain ints cached at
build time), puts commands on the inbox and reads per-request asyncio queues. If the
thread dies, `is_healthy()` turns False and every open stream ends with an error.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from mlxkv.config import EngineConfig
from mlxkv.engine import LLMEngine
from mlxkv.errors import EngineDeadError, EngineOverloadedError
from mlxkv.outputs import RequestOutput
from mlxkv.sampling import SamplingParams

log = logging.getLogger("mlxkv.engine")


class AsyncEngine:
    """Implements server.engine_client.EngineClient over an LLMEngine on its own thread."""

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine],
                 max_waiting: int | None = None):
        """`engine`: a zero-argument builder, called on the engine thread (what
        `from_config` passes), or an engine already built (its arrays then predate the
        thread). Raises whatever the builder raises."""
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._stop = threading.Event()
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        build = engine if callable(engine) and not isinstance(engine, LLMEngine) else None
        self.engine: LLMEngine = None if build else engine  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._run, args=(build,), name="mlxkv-engine",
                                        daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        engine = self.engine
        self.model_name = getattr(engine, "model_name", "model")
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        sched = engine.config.scheduler
        self.max_waiting = max_waiting if max_waiting is not None else sched.max_waiting
        self._max_in_flight = sched.max_num_seqs + self.max_waiting

    @classmethod
    def from_config(cls, config: EngineConfig, loaded=None) -> AsyncEngine:
        """Build the engine (load the model unless `loaded`) on the engine thread."""
        return cls(lambda: LLMEngine.from_config(config, loaded))

    # -- EngineClient --------------------------------------------------------------------
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def cache_stats(self) -> dict[str, Any]:
        return dict(self._stats_snapshot["cache"])

    def metrics(self) -> dict[str, Any]:
        return dict(self._stats_snapshot["metrics"])

    def num_active(self) -> int:
        with self._lock:
            return len(self._streams)

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas (see EngineClient.generate for the raised errors)."""
        if not self.is_healthy():
            raise EngineDeadError(f"the engine thread is not running: {self._dead}")
        self.engine.validate(list(prompt_token_ids), params)
        limit = self._max_in_flight
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._streams) >= limit:
                raise EngineOverloadedError(
                    f"{len(self._streams)} requests in flight (limit {limit}); retry later")
            if request_id in self._streams:
                from mlxkv.errors import InvalidRequestError

                raise InvalidRequestError(f"duplicate request id {request_id!r}", "request_id")
            self._streams[request_id] = (loop, q)
        self._inbox.put(("add", request_id, list(prompt_token_ids), params))
        num_open = params.n
        try:
            while num_open:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    num_open -= 1
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if num_open:
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(("noop",))
        self._thread.join(timeout)

    # -- engine thread -------------------------------------------------------------------
    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, ids, params = cmd
            try:
                self.engine.add_request(rid, ids, params)
            except Exception as exc:
                self._deliver(rid, exc)
        elif kind == "abort":
            self.engine.abort(cmd[1])

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop is closed: the caller is gone
                pass

    def _build(self, build: Callable[[], LLMEngine] | None) -> bool:
        try:
            if build is not None:
                self.engine = build()
            self._snapshot()
        except BaseException as exc:
            self._build_error = exc
        self._built.set()
        return self._build_error is None

    def _snapshot(self) -> None:
        self._stats_snapshot = {"cache": self.engine.cache_stats(),
                                "metrics": self.engine.metrics()}

    def _run(self, build: Callable[[], LLMEngine] | None) -> None:
        if not self._build(build):
            # Parked, not ended: at thread exit MLX's thread-local teardown takes the GIL,
            # and when that races the caller's interpreter exit (it raises the build error,
            # often straight to sys.exit) the process aborts with status 134.
            self._stop.wait()
            return
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished()
                try:
                    cmd = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
                    self._handle(cmd)
                    while True:
                        self._handle(self._inbox.get_nowait())
                except queue.Empty:
                    pass
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
                self._snapshot()
        except BaseException as exc:  # the engine is gone: tell every open stream
            self._dead = f"{type(exc).__name__}: {exc}"
            log.exception("engine thread died")
            with self._lock:
                targets = list(self._streams)
            for rid in targets:
                self._deliver(rid, EngineDeadError(f"engine thread died: {self._dead}"))
