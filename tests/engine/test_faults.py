"""Faults inside the engine: one failing request, aborts mid-prefill and mid-COW, exhaustion."""

from __future__ import annotations

import pytest
from engine_helpers import GREEDY, make_llm

from mlxkv.errors import InvalidRequestError
from mlxkv.models.tiny import make_tiny_model
from mlxkv.sampling import SamplingParams

PROMPT = [(3 * i + 2) % 500 + 1 for i in range(41)]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def drain(engine):
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def assert_clean(engine):
    engine.cache.check_invariants()
    stats = engine.cache_stats()
    assert stats["blocks_used"] == 0 and stats["num_requests"] == 0


def test_exception_in_one_request_fails_only_that_request(model):
    llm = make_llm((model, None), block_size=4)
    ref = make_llm((model, None)).generate([PROMPT[:20]], GREEDY)[0]["token_ids"]
    engine = llm.engine
    engine.add_request("good", PROMPT[:20], GREEDY)
    engine.add_request("bad", PROMPT[5:30], GREEDY)

    class Boom:
        def update(self, *a, **k):
            raise RuntimeError("injected")

        stopped_on = None

    engine.step()
    engine._detok["bad"] = Boom()
    outs = drain(engine)
    bad = [o for o in outs if o.request_id == "bad" and o.finished]
    assert bad and bad[0].finish_reason == "error" and "injected" in bad[0].error
    good = [t for o in outs if o.request_id == "good" for t in o.new_token_ids]
    assert good == ref[1:]
    assert_clean(engine)


def test_abort_during_chunked_prefill_and_during_cow(model):
    llm = make_llm((model, None), block_size=4, max_batched=8)
    engine = llm.engine
    engine.add_request("a", PROMPT, GREEDY)
    engine.step()  # 8 of 41 prompt tokens computed
    assert engine.abort("a")
    engine.add_request("b", PROMPT[:10], SamplingParams(max_tokens=6, temperature=1.0, n=3,
                                                        seed=1))
    for _ in range(3):
        engine.step()  # prefill, fork, COW of the shared partial tail
    assert engine.abort("b")
    drain(engine)
    assert_clean(engine)


def test_pool_exhaustion_preempts_and_everyone_finishes_correctly(model):
    prompts = [PROMPT[i : i + 30] for i in range(6)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    ref = [o["token_ids"] for o in make_llm((model, None)).generate(prompts, params)]
    small = make_llm((model, None), block_size=4, num_blocks=40)
    got = [o["token_ids"] for o in small.generate(prompts, params)]
    assert got == ref and small.engine.scheduler.num_preemptions > 0
    assert_clean(small.engine)


def test_bad_input_rejected_before_allocation(model):
    engine = make_llm((model, None), block_size=4, num_blocks=10).engine
    with pytest.raises(InvalidRequestError):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(InvalidRequestError):
        engine.add_request("long", list(range(1, 60)), GREEDY)  # pool holds 36 tokens
    with pytest.raises(InvalidRequestError):
        engine.add_request("vocab", [10**6], GREEDY)
    with pytest.raises(InvalidRequestError):
        SamplingParams(temperature=-1)
    assert not engine.has_unfinished()
    assert_clean(engine)
