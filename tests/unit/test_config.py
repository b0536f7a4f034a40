from __future__ import annotations

import argparse

import pytest

from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
from mlxkv.errors import InvalidRequestError
from mlxkv.sampling import SamplingParams


@pytest.mark.parametrize(
    "kwargs",
    [{"block_size": 3}, {"num_blocks": 1}, {"memory_fraction": 0.0}, {"memory_budget_bytes": 0}],
)
def test_cache_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        CacheConfig(**kwargs)


def test_scheduler_config_rejects_zero_budget():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)


def test_from_args_maps_flags():
    parser = argparse.ArgumentParser()
    EngineConfig.add_cli_args(parser)
    cfg = EngineConfig.from_args(
        parser.parse_args(["--block-size", "32", "--kv-codec", "int8", "--max-num-seqs", "4"])
    )
    assert cfg.cache.block_size == 32
    assert cfg.cache.kv_codec == "int8"
    assert cfg.scheduler.max_num_seqs == 4
    assert cfg.server.host == "127.0.0.1"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": ("",)}, "stop"),
        ({"n": 0}, "n"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param
