"""Open one engine stream per prompt and merge them into one stream of choices.

A /v1/completions request with several prompts runs each prompt as its own engine request
inside the continuous batch; choice `index` is `prompt_index * n + fork_index` (OpenAI's
numbering). Every prompt's first delta is awaited before the response starts, so a refusal
of any prompt is an HTTP error and none of the others is left running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from mlxkv.outputs import RequestOutput
from mlxkv.sampling import SamplingParams


async def open_stream(engine, request_id: str, prompts: Sequence[list[int]],
                      params: SamplingParams) -> tuple[RequestOutput, AsyncIterator]:
    """Start every prompt; return the first delta and the (merged) stream of the rest.

    Raises whatever the engine raises for any prompt (the other prompts are aborted).
    """
    if len(prompts) == 1:
        stream = engine.generate(request_id, prompts[0], params).__aiter__()
        return await stream.__anext__(), stream
    streams = [engine.generate(f"{request_id}-{p}", ids, params).__aiter__()
               for p, ids in enumerate(prompts)]
    firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
    failed = [f for f in firsts if isinstance(f, BaseException)]
    if failed:
        for s in streams:
            await s.aclose()
        raise failed[0]
    merged = _merge(streams, firsts, params.n)
    return await merged.__anext__(), merged


async def _merge(streams: list[AsyncIterator], firsts: list[RequestOutput], n: int):
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, stream: AsyncIterator, first: RequestOutput) -> None:
        try:
            out = first
            while out is not None:
                out.index += p * n
                inbox.put_nowait(out)
                out = await anext(stream, None)
        except Exception as exc:  # forwarded to the reader, which raises it
            inbox.put_nowait(exc)
        finally:
            inbox.put_nowait(None)

    tasks = [asyncio.create_task(pump(p, s, f))
             for p, (s, f) in enumerate(zip(streams, firsts, strict=True))]
    try:
        num_done = 0
        while num_done < len(tasks):
            item = await inbox.get()
            if item is None:
                num_done += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
