"""Speculative decoding at the surfaces: CLI flag, request opt-in, usage extension, /metrics."""

from __future__ import annotations

import argparse

import pytest
from oracles import PROMPT
from spec_helpers import oracle_drafter, spec_llm

from mlxkv import cli
from mlxkv.config import EngineConfig, SpeculativeConfig
from mlxkv.models.tiny import make_tiny_model
from mlxkv.sampling import SamplingParams
from server.metrics import render
from server.protocol import ChatCompletionRequest
from server.responses import usage
from server.serve import add_serve_args


def test_flags_reach_the_engine_config():
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "x", "--speculative", "ngram",
                              "--num-speculative-tokens", "5"])
    assert EngineConfig.from_args(args).speculative == SpeculativeConfig("ngram", 5)
    assert EngineConfig.from_args(parser.parse_args(["generate", "x"])).speculative.method == "off"
    serve = argparse.ArgumentParser()
    add_serve_args(serve)
    assert EngineConfig.from_args(serve.parse_args(["--speculative", "ngram"])).speculative \
        .method == "ngram"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "x", "--speculative", "eagle"])
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", 0)


def test_request_opt_in_and_usage_extension():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                speculative=True)
    assert req.to_sampling_params(EngineConfig().server).speculative is True
    body = usage(10, 7, 0, (8, 6))
    assert body["speculative"] == {"draft_tokens": 8, "accepted_tokens": 6,
                                   "acceptance_rate": 0.75}
    assert "speculative" not in usage(10, 7, 0)


def test_outputs_and_metrics_carry_the_counts():
    model = make_tiny_model("llama")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ref = spec_llm(model, lambda ids, k: []).generate([PROMPT], params)[0]["token_ids"]
    llm = spec_llm(model, oracle_drafter([PROMPT + ref]))
    engine = llm.engine
    engine.add_request("a", PROMPT, params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    last = outs[-1]
    assert last.finished and [t for o in outs for t in o.new_token_ids] == ref
    assert 0 < last.num_accepted_tokens < last.num_draft_tokens
    assert any(len(o.new_token_ids) > 1 for o in outs)  # several tokens per delta
    m = engine.metrics()
    assert m["spec_proposed_tokens"] == last.num_draft_tokens
    assert m["spec_acceptance"] == [last.num_accepted_tokens / last.num_draft_tokens]
    text = render(m, engine.cache_stats(), {})
    assert f"mlxkv_spec_accepted_tokens_total {last.num_accepted_tokens}" in text
    assert 'mlxkv_spec_acceptance_rate_bucket{le="1.0"} 1' in text


def test_a_request_can_opt_out_of_the_server_default():
    model = make_tiny_model("llama")
    llm = spec_llm(model, lambda ids, k: [1] * k)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, speculative=False)
    llm.generate([PROMPT], params)
    assert llm.engine.speculator.counters["spec_proposed_tokens"] == 0


def test_cli_generate_speculative_equals_plain(smollm2_dir, capsys):
    passage = "the quick brown fox jumps over the lazy dog near the river bank at dawn"
    base = ["generate", "--chat", f"Repeat exactly: {passage}", "--max-tokens", "24",
            "--model", str(smollm2_dir)]
    outs = []
    for extra in ([], ["--speculative", "ngram"]):
        assert cli.main(base + extra) == 0
        outs.append(capsys.readouterr())
    assert outs[1].out == outs[0].out
    assert "speculative:" in outs[1].err and "speculative:" not in outs[0].err
