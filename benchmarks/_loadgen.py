"""A loopback load generator: concurrent streaming chat requests through the openai client."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    latency: float = 0.0
    error: str = ""


def one_request(client, model: str, prompt: str, max_tokens: int) -> Sample:
    start = time.perf_counter()
    last, sample = None, Sample(ok=True)
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0.0, stream=True)
        for chunk in stream:
            if not chunk.choices or not chunk.choices[0].delta.content:
                continue
            now = time.perf_counter()
            if last is None:
                sample.ttft = now - start
            else:
                sample.itls.append(now - last)
            last = now
            sample.tokens += 1
    except Exception as exc:  # counted, not raised: a load test reports errors
        return Sample(ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
    sample.latency = time.perf_counter() - start
    return sample


def run_load(base_url: str, model: str, prompts: list[str], concurrency: int,
             requests_per_worker: int, max_tokens: int, stop_at: float | None = None):
    """Each of `concurrency` workers sends requests back to back. Returns (samples, wall)."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0,
                           timeout=600)
    samples: list[Sample] = []
    lock = threading.Lock()

    def worker(wid: int) -> None:
        i = 0
        while (stop_at is None and i < requests_per_worker) or (
            stop_at is not None and time.perf_counter() < stop_at
        ):
            s = one_request(client, model, prompts[(wid + i) % len(prompts)], max_tokens)
            with lock:
                samples.append(s)
            i += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.ok]
    itls = [x for s in ok for x in s.itls]
    return {"requests": len(samples), "errors": len(samples) - len(ok),
            "tokens": sum(s.tokens for s in ok), "tok_s": sum(s.tokens for s in ok) / wall,
            "ttft_p50": pct([s.ttft for s in ok], 50), "ttft_p99": pct([s.ttft for s in ok], 99),
            "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99),
            "latency_p99": pct([s.latency for s in ok], 99),
            "first_error": next((s.error for s in samples if not s.ok), None),
            "median_tokens": statistics.median([s.tokens for s in ok]) if ok else 0}
