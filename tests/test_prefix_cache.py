"""Prompt prefix caching: the same greedy tokens with and without it, the cache really hit, images never
cached, the LRU bounds, and stale entries dropped when the weights change."""

from __future__ import annotations

import pytest
import torch
from refmodels import IMAGE_TOKEN_ID, TOKENS_PER_TILE, hf_reference, save_reference

from internvl.checkpoint.io import load_model
from internvl.engine.engine import Engine
from internvl.engine.prefix_cache import PrefixCache
from internvl.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_reference(hf_reference("qwen2", "300m", seed=5), tmp_path_factory.mktemp("prefix-hf"))
    return load_model(folder, image_token_id=IMAGE_TOKEN_ID)[0]


def _text(n: int, seed: int) -> list[int]:
    return torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = _text(40, 0)  # a shared system message and template head


def _requests():
    """Prompts that share SYSTEM: other questions, an image after it, a second turn, the same prompt twice."""
    image = [501] + [IMAGE_TOKEN_ID] * TOKENS_PER_TILE + [502]
    pv = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    first = SYSTEM + _text(9, 1)
    return [
        (first, None),
        (SYSTEM + _text(5, 2), None),
        (SYSTEM + _text(3, 3) + image + _text(4, 4), pv),
        (first + _text(6, 5) + _text(7, 6), None),  # the conversation goes on: a whole stored prompt is reused
        (list(first), None),
        (SYSTEM[:30] + _text(12, 7), None),  # a shorter shared part than any stored prompt
    ]


def test_greedy_tokens_equal_with_and_without_the_prefix_cache(model):
    params = SamplingParams(max_new_tokens=12)
    plain = Engine(model, prefix_cache=False)
    want = [plain.generate([(ids, params, pv)])[0].output_ids for ids, pv in _requests()]
    cached = Engine(model)
    got = [cached.generate([(ids, params, pv)])[0] for ids, pv in _requests()]
    assert [s.output_ids for s in got] == want
    pc = cached.prefix_cache
    assert pc.hits == len(got) - 1 and pc.misses == 1
    reused = [s.cached_tokens for s in got]
    assert reused[:3] == [0, 40, 40] and reused[3] == 49 and reused[4] == 48 and reused[5] == 30
    assert pc.tokens_reused == sum(reused)
    assert all(IMAGE_TOKEN_ID not in e.ids.tolist() for e in pc.entries.values())
    # admitted together: each prefill group finds what earlier calls stored, and the tokens are the same
    together = cached.generate([(ids, params, pv) for ids, pv in _requests()])
    assert [s.output_ids for s in together] == want and all(s.cached_tokens >= 30 for s in together)


def test_only_the_uncached_part_is_computed(model):
    eng = Engine(model)
    seen = []
    real = model.language_model.forward
    model.language_model.forward = lambda emb, *a, **k: seen.append(emb.shape[1]) or real(emb, *a, **k)
    try:
        eng.generate([(SYSTEM + _text(9, 1), SamplingParams(max_new_tokens=1), None)])
        eng.generate([(SYSTEM + _text(5, 2), SamplingParams(max_new_tokens=1), None)])
    finally:
        del model.language_model.forward
    assert seen == [49, 5]
    assert eng.uncached_tokens(SYSTEM + _text(3, 9)) == 3


def test_lru_bounds_and_prompts_that_extend_one_another(model):
    eng = Engine(model, prefix_cache=PrefixCache(max_entries=2, stop_token=IMAGE_TOKEN_ID))
    pc = eng.prefix_cache
    one = SamplingParams(max_new_tokens=1)
    eng.generate([(SYSTEM, one, None)])
    eng.generate([(SYSTEM + _text(8, 1), one, None)])  # extends the first: replaces it
    assert [len(e.ids) for e in pc.entries.values()] == [48]
    eng.generate([(SYSTEM[:20], one, None)])  # covered by a stored prompt: nothing new
    assert len(pc.entries) == 1
    for seed in (2, 3, 4):
        eng.generate([(_text(30, seed), one, None)])
    assert len(pc.entries) == 2 and pc.nbytes == sum(e.nbytes for e in pc.entries.values())
    eng.generate([(_text(10, 5), one, None)])  # below min_tokens: not stored
    assert len(pc.entries) == 2
    tight = Engine(model, prefix_cache=PrefixCache(max_bytes=1000))
    tight.generate([(SYSTEM, one, None)])
    assert not tight.prefix_cache.entries


def test_changed_weights_drop_the_cached_prefixes(model):
    eng = Engine(model)
    eng.generate([(SYSTEM + [1], SamplingParams(max_new_tokens=1), None)])
    assert eng.prefix_cache.entries
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(1.0)  # an in-place update, as an optimizer step makes
    seq = eng.generate([(SYSTEM + [2], SamplingParams(max_new_tokens=1), None)])[0]
    assert seq.cached_tokens == 0 and eng.prefix_cache.hits == 0
