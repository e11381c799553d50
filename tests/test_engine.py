"""Generation engine: parity with transformers' greedy generate, cache vs no cache, batching, stops, sampling."""

from __future__ import annotations

import pytest
import torch
from refmodels import IMAGE_TOKEN_ID, hf_reference, prompt_with_images, save_reference, tiny_checkpoint

from internvl.api import load
from internvl.checkpoint.io import load_model
from internvl.engine.engine import Engine
from internvl.engine.sampling import SamplingParams, filter_top_k_top_p
from internvl.errors import InternVLError, PromptError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = hf_reference("qwen2", "300m", seed=7)
    folder = save_reference(ref, tmp_path_factory.mktemp("engine-hf"))
    ours, _ = load_model(folder, image_token_id=IMAGE_TOKEN_ID)
    return ref, ours


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    return load(tiny_checkpoint(tmp_path_factory.mktemp("counting"), counting=True))


@pytest.mark.parametrize("tiles", [[2, 1], []], ids=["two images", "text only"])
def test_greedy_tokens_equal_transformers_generate(pair, tiles):
    ref, ours = pair
    ids, pv = prompt_with_images(tiles, seed=11)
    pv = pv if tiles else None
    images = {"pixel_values": pv} if tiles else {}
    with torch.no_grad():
        out = ref.generate(input_ids=ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, **images)
    expected = out[0, ids.shape[1] :].tolist()
    got = Engine(ours).generate([(ids[0].tolist(), SamplingParams(max_new_tokens=32), pv)])[0]
    assert got.output_ids == expected and got.finish_reason == "length"


def test_cache_equals_recomputing_without_cache(pair):
    _, ours = pair
    ids, pv = prompt_with_images([1, 2], seed=3)
    seq = ids[0].tolist()
    with torch.no_grad():
        for _ in range(24):
            logits = ours(torch.tensor([seq]), pv).logits[0, -1]
            seq.append(int(logits.argmax()))
    no_cache = seq[ids.shape[1] :]
    cached = Engine(ours).generate([(ids[0].tolist(), SamplingParams(max_new_tokens=24), pv)])[0].output_ids
    assert cached == no_cache


def test_batched_equals_one_by_one(pair):
    _, ours = pair
    requests = []
    for k, tiles in enumerate([[1], [], [3, 1], [2], []]):
        ids, pv = prompt_with_images(tiles, seed=20 + k, text_len=2 + 3 * k)
        requests.append((ids[0].tolist(), SamplingParams(max_new_tokens=6 + 4 * k), pv if tiles else None))
    # one request with its own stop token: it leaves the batch early while the others go on
    alone = [Engine(ours).generate([r])[0].output_ids for r in requests]
    stop_at = alone[2][3]
    requests[2] = (requests[2][0], SamplingParams(max_new_tokens=18, stop_token_ids=[stop_at]), requests[2][2])
    alone[2] = alone[2][: alone[2].index(stop_at)]
    together = Engine(ours, max_batch=3).generate(requests)
    assert [s.output_ids for s in together] == alone
    assert together[2].finish_reason == "stop" and together[0].finish_reason == "length"


def test_requests_joining_a_running_batch_decode_the_same(pair):
    _, ours = pair
    a = prompt_with_images([1], seed=1)
    b = prompt_with_images([2], seed=2, text_len=9)
    alone_b = Engine(ours).generate([(b[0][0].tolist(), SamplingParams(max_new_tokens=8), b[1])])[0].output_ids
    eng = Engine(ours)
    first = eng.add(a[0][0].tolist(), SamplingParams(max_new_tokens=20), a[1])
    for _ in range(5):
        eng.step()
    second = eng.add(b[0][0].tolist(), SamplingParams(max_new_tokens=8), b[1])
    while eng.has_work():
        eng.step()
    assert second.output_ids == alone_b and len(first.output_ids) == 20


def test_counting_model_and_stop_strings(counting):
    tok = counting.tokenizer
    prompt = tok.encode("red")
    free = counting.generate_ids(prompt, max_new_tokens=12)
    assert free == list(range(prompt[-1] + 1, prompt[-1] + 13))
    text = tok.decode(free)
    stop = text[5:7]
    done = counting.detok.generate([(prompt, SamplingParams(max_new_tokens=12, stop=[stop]), None)])[0]
    assert done.text == text[: text.index(stop)] and done.seq.finish_reason == "stop"
    # streamed deltas never show part of the stop string and add up to the final text
    deltas = [e.text for e in counting.detok.stream(prompt, SamplingParams(max_new_tokens=12, stop=[stop]))]
    assert "".join(deltas) == done.text and stop not in done.text
    shown = ""
    for d in deltas:  # what was shown is never taken back: every partial stream is a prefix of the answer
        shown += d
        assert done.text.startswith(shown)


def test_min_new_tokens_suppresses_stops_and_max_tokens_gives_length(counting):
    prompt = counting.tokenizer.encode("red")
    stop_id = prompt[-1] + 3
    seq = counting.engine.generate([(prompt, SamplingParams(max_new_tokens=10, stop_token_ids=[stop_id]), None)])[0]
    assert len(seq.output_ids) == 2 and seq.finish_reason == "stop"
    params = SamplingParams(max_new_tokens=10, stop_token_ids=[stop_id], min_new_tokens=5)
    seq = counting.engine.generate([(prompt, params, None)])[0]
    assert stop_id not in seq.output_ids[:5] and len(seq.output_ids) >= 5


def test_seeded_sampling_is_reproducible(pair):
    _, ours = pair
    ids, pv = prompt_with_images([1], seed=4)
    params = lambda seed: SamplingParams(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=seed)  # noqa: E731
    runs = [Engine(ours).generate([(ids[0].tolist(), params(s), pv)])[0].output_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    top1 = SamplingParams(max_new_tokens=16, temperature=0.7, top_k=1, seed=5)
    greedy = SamplingParams(max_new_tokens=16)
    assert (Engine(ours).generate([(ids[0].tolist(), top1, pv)])[0].output_ids
            == Engine(ours).generate([(ids[0].tolist(), greedy, pv)])[0].output_ids)  # fmt: skip


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_top_k_top_p(logits, 0, 0.8))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.1)).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_top_k_top_p(logits, 3, 1.0)).tolist() == [True, True, True, False]


def test_abort_stops_a_stream(counting):
    prompt = counting.tokenizer.encode("red")
    engine = counting.engine
    seq = engine.add(prompt, SamplingParams(max_new_tokens=50))
    engine.step()
    engine.abort(seq)
    while engine.has_work():
        engine.step()
    assert seq.finish_reason == "abort" and len(seq.output_ids) < 5


def test_bad_requests_raise_typed_errors(pair):
    _, ours = pair
    eng = Engine(ours, max_model_len=64)
    ids, pv = prompt_with_images([1])
    with pytest.raises(PromptError, match="the prompt has 70 tokens but the model's context is 64 tokens"):
        eng.add(list(range(70)))
    with pytest.raises(PromptError, match=r"has 4 image context tokens but 2 tile\(s\)"):
        eng.add(ids[0].tolist(), None, torch.cat([pv, pv]))
    with pytest.raises(InternVLError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)


def test_fused_projections_and_decode_kernels_match_the_plain_model(tmp_path):
    from internvl.engine.accelerate import use_decode_kernels

    folder = tiny_checkpoint(tmp_path / "m")
    plain, _ = load_model(folder, image_token_id=None)
    fused, _ = load_model(folder, image_token_id=None)
    fused.language_model.fuse_projections()
    ids = torch.randint(10, 300, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)
    # bf16 weights through the streaming kernels: the same greedy tokens as plain bf16 torch
    plain16, _ = load_model(folder, dtype="bf16")
    fast16, _ = load_model(folder, dtype="bf16")
    assert use_decode_kernels(fast16) > 0
    prompt = ids[0].tolist()
    want = Engine(plain16).generate([(prompt, SamplingParams(max_new_tokens=16), None)])[0].output_ids
    got = Engine(fast16).generate([(prompt, SamplingParams(max_new_tokens=16), None)])[0].output_ids
    assert got == want
    with pytest.raises(Exception, match="fused for decoding"):
        from internvl.checkpoint.io import save_model

        save_model(fast16, tmp_path / "out")


def test_batched_greedy_argmax_equals_sampling_each_row(pair):
    """One argmax serves the plain greedy rows; penalties, suppressed stops and sampling go row by row."""
    from internvl.engine.sampling import sample_next

    _, ours = pair
    eng = Engine(ours, stop_token_ids=[7])
    logits = torch.randn(6, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    logits[0, 3] = logits[0, 300] = 9  # a tie: the first index
    logits[2, 7] = 12  # the best token is a stop that min_new_tokens suppresses
    logits[3, 7] = 12  # the same stop, no longer suppressed
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.3), SamplingParams(min_new_tokens=2),
              SamplingParams(min_new_tokens=1), SamplingParams(temperature=0.8, seed=3), SamplingParams()]
    seqs = [eng.add([1, 2, 3], p) for p in params]
    for s in seqs:
        s.output_ids = [5, 9]
    seqs[2].output_ids = [5]
    expected = []
    for s, row in zip(seqs, logits):
        suppress = sorted(s.stop_ids) if len(s.output_ids) < s.params.min_new_tokens else None
        gen = torch.Generator().manual_seed(3) if s.generator is not None else None
        expected.append(sample_next(row, s.params, s.output_ids, gen, suppress))
    events = eng._accept_all(seqs, logits)
    assert [e.token_id for e in events] == expected
    assert expected[0] == 3 and expected[2] != 7 and expected[3] == 7 and events[3].finished


def test_check_reset_and_released_pixel_values(pair):
    _, ours = pair
    eng = Engine(ours, max_model_len=64)
    ids, pv = prompt_with_images([1], seed=6)
    with pytest.raises(PromptError, match="the prompt has 70 tokens but the model's context is 64 tokens"):
        eng.check(list(range(70)))
    with pytest.raises(PromptError, match=r"has 4 image context tokens but 2 tile\(s\)"):
        eng.check(ids[0].tolist(), None, torch.cat([pv, pv]))
    with pytest.raises(PromptError, match="the prompt is empty"):
        eng.check([])
    eng.check(ids[0].tolist(), None, pv)  # valid: nothing raised, nothing queued
    assert not eng.has_work()
    seqs = [eng.add(ids[0].tolist(), SamplingParams(max_new_tokens=20), pv) for _ in range(3)]
    eng.step()
    assert all(s.pixel_values is None for s in seqs)  # released once prefilled
    late = eng.add(ids[0].tolist(), SamplingParams(max_new_tokens=20), pv)
    dropped = eng.reset()
    assert set(map(id, dropped)) == set(map(id, seqs + [late])) and late.pixel_values is None
    assert all(s.finish_reason == "abort" for s in dropped) and not eng.has_work() and eng.cache is None
    again = eng.generate([(ids[0].tolist(), SamplingParams(max_new_tokens=5), pv)])[0]
    assert len(again.output_ids) == 5


def test_prompts_admitted_together_share_a_prefill_and_rows_leave_in_place(pair):
    """Similar lengths go through one padded forward; finished rows' slots are refilled by the last rows."""
    _, ours = pair
    requests = [(prompt_with_images([], seed=30 + k, text_len=8 + k)[0][0].tolist(), SamplingParams(max_new_tokens=3 + 2 * k), None)
                for k in range(5)]  # fmt: skip
    alone = [Engine(ours).generate([r])[0].output_ids for r in requests]
    eng = Engine(ours, prefix_cache=False)
    calls = []
    real = ours.language_model.forward
    ours.language_model.forward = lambda emb, *a, **k: calls.append(tuple(emb.shape[:2])) or real(emb, *a, **k)
    try:
        together = eng.generate(requests)
    finally:
        del ours.language_model.forward
    assert [s.output_ids for s in together] == alone
    assert calls[0] == (5, 12)  # one prefill of all five prompts
    assert eng.cache is None and not eng.running


def test_kv_cache_rows_join_free_slots_and_leave_in_place():
    from internvl.kernels.decode import cache_pointers
    from internvl.model.cache import KVCache

    def rows(n, start):
        c = KVCache(2, n, 1, 4, torch.float32, capacity=8)
        for layer in range(2):
            c.write(layer, torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 3, 4),
                    torch.zeros(n, 1, 3, 4))  # fmt: skip
        c.lengths += 3
        return c

    cache = rows(2, 0)
    cache.concat(rows(1, 2))  # grows to 4 slots
    base = cache.k[0].data_ptr()
    cache.concat(rows(1, 3))  # a free slot: no new memory
    assert cache.k[0].data_ptr() == base and cache.batch == 4 and cache.slots == 4
    cache.keep([0, 3, 2])  # row 3 fills the hole of row 1
    assert cache.k[0].data_ptr() == base and cache.k[1][:, 0, 0, 0].tolist() == [0, 3, 2]
    assert cache_pointers(cache)[0].tolist() == [t.data_ptr() for t in cache.k]
    cache.keep([2, 0])  # a row moving to a later slot: copied out
    assert cache.k[1][:, 0, 0, 0].tolist() == [2, 0] and cache.lengths.tolist() == [3, 3]
