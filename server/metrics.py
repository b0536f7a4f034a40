"""Prometheus text exposition of engine counters, latency histograms and cache stats."""

from __future__ import annotations

from collections.abc import Iterable

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


_RATE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _histogram(name: str, help_text: str, samples: Iterable[float],
               buckets: tuple[float, ...] = _BUCKETS) -> list[str]:
    samples = list(samples)
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for b in buckets:
        lines.append(f'{name}_bucket{{le="{b}"}} {sum(s <= b for s in samples)}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {len(samples)}')
    lines.append(f"{name}_sum {sum(samples):.6f}")
    lines.append(f"{name}_count {len(samples)}")
    return lines


def _gauge(name: str, help_text: str, value, kind: str = "gauge") -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]


def render(metrics: dict, cache: dict, http_counts: dict[int, int]) -> str:
    """The /metrics body (recent-window histograms: the engine keeps the last samples)."""
    lines: list[str] = []
    counters = {
        "requests": "requests accepted by the engine",
        "prompt_tokens": "prompt tokens received",
        "generation_tokens": "tokens generated",
        "cached_tokens": "prompt tokens served from the prefix cache",
        "preemptions": "requests preempted (recomputed) for lack of KV blocks",
        "errors": "requests failed inside the engine",
        "spec_proposed_tokens": "speculative draft tokens verified",
        "spec_accepted_tokens": "speculative draft tokens accepted",
    }
    for key, text in counters.items():
        lines += _gauge(f"mlxkv_{key}_total", text, metrics.get(key, 0), "counter")
    lines += _gauge("mlxkv_running_requests", "requests running", metrics.get("running", 0))
    lines += _gauge("mlxkv_waiting_requests", "requests queued", metrics.get("waiting", 0))
    lines += _histogram("mlxkv_time_to_first_token_seconds", "time to first token",
                        metrics.get("ttft", []))
    lines += _histogram("mlxkv_inter_token_latency_seconds", "inter-token latency",
                        metrics.get("itl", []))
    lines += _histogram("mlxkv_spec_acceptance_rate", "per finished request, accepted / "
                        "verified speculative draft tokens", metrics.get("spec_acceptance", []),
                        _RATE_BUCKETS)
    for key in ("blocks_total", "blocks_used", "blocks_cached", "blocks_free"):
        lines += _gauge(f"mlxkv_cache_{key}", f"KV cache {key.replace('_', ' ')}",
                        cache.get(key, 0))
    lines += _gauge("mlxkv_cache_hit_rate", "prefix cache hit rate (tokens)",
                    f"{cache.get('hit_rate', 0.0):.6f}")
    lines += _gauge("mlxkv_cache_evictions_total", "cached blocks evicted",
                    cache.get("evictions", 0), "counter")
    lines.append("# HELP mlxkv_http_responses_total HTTP responses by status")
    lines.append("# TYPE mlxkv_http_responses_total counter")
    for status, count in sorted(http_counts.items()):
        lines.append(f'mlxkv_http_responses_total{{status="{status}"}} {count}')
    return "\n".join(lines) + "\n"
