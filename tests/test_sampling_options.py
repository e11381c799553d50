"""Typed generation options: keyword options, CLI flags and a validated HTTP request all become one checked
`SamplingParams` before anything runs."""

from __future__ import annotations

import pytest

from internvl.cli.chat import sampling_from_args
from internvl.cli.main import build_parser
from internvl.engine.sampling import SamplingParams, sampling_params
from internvl.errors import InternVLError
from internvl.serve.schemas import APIError, ChatCompletionRequest

DEFAULTS = SamplingParams(max_new_tokens=1024)


def test_keyword_options_apply_over_the_defaults():
    p = sampling_params(DEFAULTS, temperature=0.7, top_p=None, stop="###")
    assert (p.max_new_tokens, p.temperature, p.top_p, p.stop) == (1024, 0.7, 1.0, ["###"])
    assert DEFAULTS.temperature == 0.0  # the defaults are not changed
    assert sampling_params(DEFAULTS, temperature=0.7, do_sample=False).greedy
    assert sampling_params(DEFAULTS, do_sample=True).temperature == 1.0
    with pytest.raises(InternVLError, match=r"unknown generation option\(s\): \['max_tokens'\]"):
        sampling_params(DEFAULTS, max_tokens=3)
    with pytest.raises(InternVLError, match="top_p must be in"):
        sampling_params(DEFAULTS, top_p=0.0)


def test_cli_flags_become_sampling_params():
    args = build_parser().parse_args(["chat", "-p", "hi", "--temperature", "0.5", "--top-k", "5", "--seed", "3",
                                      "--max-new-tokens", "7"])  # fmt: skip
    assert sampling_from_args(args) == SamplingParams(max_new_tokens=7, temperature=0.5, top_k=5, seed=3)
    bad = build_parser().parse_args(["chat", "-p", "hi", "--repetition-penalty", "0"])
    with pytest.raises(InternVLError, match="repetition_penalty must be > 0"):
        sampling_from_args(bad)


def test_http_request_becomes_sampling_params():
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3, "top_k": -1, "seed": 9,
        "stop": ["\n\n"], "min_tokens": 2,
    })  # fmt: skip
    p = req.sampling(DEFAULTS, 16)
    assert p == SamplingParams(max_new_tokens=16, temperature=0.3, top_k=0, seed=9, stop=["\n\n"], min_new_tokens=2)
    unset = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    assert unset.sampling(DEFAULTS, 5) == SamplingParams(max_new_tokens=5)
    too_many = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 9})
    with pytest.raises(APIError, match="min_new_tokens must be in") as e:
        too_many.sampling(DEFAULTS, 4)
    assert (e.value.status, e.value.code) == (400, "invalid_sampling")
