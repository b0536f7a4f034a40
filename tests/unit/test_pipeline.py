"""Pipelined steps (step N + 1 launched before N's ids are fetched) change nothing visible.

Each case runs the same requests with `LLMEngine.pipeline` on and off on a sharp tiny
model and compares every delta: ids and finish reasons exactly, logprobs to fp32 noise. Stops found in N's update
must land on the same token although N + 1 already holds a row for the request.
"""

from __future__ import annotations

import pytest

from mlxkv.config import CacheConfig, EngineConfig
from mlxkv.engine import LLMEngine
from mlxkv.models.tiny import make_tiny_model
from mlxkv.sampling import SamplingParams

PROMPTS = [[(5 * i + 3 * j) % 500 + 1 for j in range(n)] for i, n in enumerate((9, 23, 4))]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def make_engine(model, pipeline: bool) -> LLMEngine:
    config = EngineConfig(cache=CacheConfig(block_size=4, num_blocks=128))
    engine = LLMEngine.from_config(config, loaded=(model, None))
    engine.pipeline = pipeline
    return engine


def drive(engine, requests) -> tuple[dict, int]:
    """Run to the end; deltas per (request id, index) and the number of steps that ended
    with the next one already launched."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    got: dict = {}
    num_overlapped = 0
    while engine.has_unfinished():
        for o in engine.step():
            d = got.setdefault((o.request_id, o.index), {"ids": [], "lp": [], "end": None})
            d["ids"] += o.new_token_ids
            d["lp"] += [(t.token_id, t.logprob, t.top) for t in o.logprobs or []]
            d["end"] = o.finish_reason if o.finished else d["end"]
        num_overlapped += engine._inflight is not None
    engine.cache.check_invariants()
    assert engine.cache_stats()["blocks_used"] == 0
    return got, num_overlapped


def test_pipelined_equals_step_by_step(model):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    ref, _ = drive(make_engine(model, False), [("probe", PROMPTS[0], greedy)])
    stop_id = ref[("probe", 0)]["ids"][4]  # the 5th token: greedy stops there
    requests = [
        ("a", PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                         stop_token_ids=[stop_id])),
        ("b", PROMPTS[1], greedy),
        ("c", PROMPTS[2], SamplingParams(max_tokens=7, temperature=0.9, n=3, seed=5)),
        ("d", PROMPTS[1][:11], SamplingParams(max_tokens=1, temperature=0.0)),
    ]
    sync, num_sync = drive(make_engine(model, False), requests)
    piped, num_piped = drive(make_engine(model, True), requests)
    assert num_sync == 0 and num_piped > 5
    assert piped.keys() == sync.keys()
    for key, want in sync.items():  # batches differ (forks join a step later): fp32 noise only
        have = piped[key]
        assert (have["ids"], have["end"]) == (want["ids"], want["end"]), key
        for (t1, lp1, top1), (t2, lp2, top2) in zip(have["lp"], want["lp"], strict=True):
            assert t1 == t2 and abs(lp1 - lp2) < 1e-4 and top1.keys() == top2.keys()
    assert sync[("a", 0)]["ids"][-1] == stop_id and sync[("a", 0)]["end"] == "stop"
    assert len(sync[("a", 0)]["ids"]) <= 5 and len(sync[("b", 0)]["ids"]) == 12
    assert sorted(i for rid, i in sync if rid == "c") == [0, 1, 2]


def test_abort_with_a_step_in_flight_frees_every_block(model):
    engine = make_engine(model, True)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request("a", PROMPTS[1], params)
    engine.add_request("b", PROMPTS[0], SamplingParams(max_tokens=30, temperature=1.0, n=2))
    for _ in range(3):
        engine.step()
    assert engine._inflight is not None
    assert engine.abort("a") and engine.abort("b")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert sorted((o.request_id, o.index) for o in outs if o.finished) == [
        ("a", 0), ("b", 0), ("b", 1)]
    assert all(not o.new_token_ids for o in outs)  # in-flight rows of aborted requests drop
    engine.cache.check_invariants()
    assert engine.cache_stats()["blocks_used"] == 0
