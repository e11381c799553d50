"""The engine on token ids with a mock model and a byte tokenizer: greedy, seeded sampling, stop ids, max tokens,
continuous batching, the prefix cache, abort and reset, and the detokenizer's stop strings; no checkpoint."""

from __future__ import annotations

import pytest
import torch

from internvl.engine.detok import Detokenizer, TextStream
from internvl.engine.engine import Engine
from internvl.engine.prefix_cache import PrefixCache
from internvl.engine.sampling import SamplingParams
from internvl.errors import PromptError
from internvl.model.cache import KVCache

VOCAB = 256


def scripted(history: list[int]) -> torch.Tensor:
    """Next-token logits after `history`: a peak on a lowercase letter that depends on every id so far,
    falling off with the distance from it (so sampling has a spread to draw from)."""
    peak = 97 + (sum(history) * 7 + len(history)) % 26
    dist = (torch.arange(VOCAB) - peak).abs().float()
    return -0.7 * dist


def reference(prompt: list[int], n: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding of the mock, in plain Python."""
    seq, out = list(prompt), []
    for _ in range(n):
        token = int(scripted(seq).argmax())
        if token in stop_ids:
            break
        seq.append(token)
        out.append(token)
    return out


class MockModel:
    """What the engine needs of a model. Each row's ids are stored in the cache as its keys, and the logits are
    computed from what the cache holds, so a row read from the wrong slot, a prefix copied wrong or a
    padded position taken for a real one changes the tokens."""

    image_token_id = None
    num_image_token = 256
    device = torch.device("cpu")

    def __init__(self):
        self.version = 0
        self.prefills: list[tuple[int, int]] = []  # (rows, padded length) of each prefill

    def new_cache(self, batch: int, capacity: int = 256) -> KVCache:
        return KVCache(1, batch, 1, 1, torch.float32, "cpu", capacity)

    def _append(self, ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, T, vocab] for ids [B, T] written after each row; rows advance by `valid` (all T)."""
        b, t = ids.shape
        cache.reserve(int(cache.lengths.max()) + t)
        valid = valid if valid is not None else torch.full((b,), t)
        logits = torch.zeros(b, t, VOCAB)
        for row in range(b):
            start = int(cache.lengths[row])
            cache.k[0][row, 0, start : start + t, 0] = ids[row].float()
            stored = cache.k[0][row, 0, : start + t, 0].long().tolist()
            for i in range(t):
                logits[row, i] = scripted(stored[: start + i + 1])
        cache.lengths += valid
        return logits

    def prefill(self, ids, pixel_values, cache, valid_lengths=None, logits_to_keep=0):
        assert pixel_values is None
        self.prefills.append(tuple(ids.shape))
        return self._append(ids, cache, valid_lengths)[:, -logits_to_keep:]

    def decode(self, tokens, cache, valid_lengths=None):
        return self._append(tokens[:, None], cache, valid_lengths)[:, -1]

    def decoder_version(self):
        return self.version


class ByteTokenizer:
    """Token i is byte i: multi-byte characters span several tokens."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def engine(**kw) -> Engine:
    return Engine(MockModel(), max_model_len=kw.pop("max_model_len", 512), **kw)


PROMPTS = [list(b"hello"), list(b"a longer prompt"), list(b"x"), list(b"the mock model"), list(b"ids")]


def test_greedy_equals_the_reference_and_max_tokens_gives_length():
    for prompt in PROMPTS:
        seq = engine().generate([(prompt, SamplingParams(max_new_tokens=7), None)])[0]
        assert seq.output_ids == reference(prompt, 7) and seq.finish_reason == "length"
    short = engine(max_model_len=10).generate([(PROMPTS[0], SamplingParams(max_new_tokens=50), None)])[0]
    assert len(PROMPTS[0]) + len(short.output_ids) + 1 == 10 and short.finish_reason == "length"


def test_continuous_batching_equals_one_by_one():
    """Three rows at a time: requests wait, join as others leave (from the middle of the batch too), and
    decode as they would alone."""
    lengths = [8, 3, 6, 4, 7]
    requests = [(p, SamplingParams(max_new_tokens=n), None) for p, n in zip(PROMPTS, lengths)]
    eng = engine(max_batch=3)
    seqs = eng.generate(requests)
    assert [s.output_ids for s in seqs] == [reference(p, n) for p, n in zip(PROMPTS, lengths)]
    assert eng.cache is None and not eng.running and not eng.has_work()
    # a request joining a running batch mid-way
    eng = engine()
    first = eng.add(PROMPTS[1], SamplingParams(max_new_tokens=12))
    for _ in range(4):
        eng.step()
    second = eng.add(PROMPTS[3], SamplingParams(max_new_tokens=5))
    while eng.has_work():
        eng.step()
    assert first.output_ids == reference(PROMPTS[1], 12) and second.output_ids == reference(PROMPTS[3], 5)


def test_prompts_of_similar_length_share_one_prefill():
    model = MockModel()
    eng = Engine(model, max_model_len=512, prefix_cache=False)
    prompts = [list(b"abcdefgh"), list(b"abcdefghij"), list(b"qrstuvwxyz0")]
    seqs = eng.generate([(p, SamplingParams(max_new_tokens=4), None) for p in prompts])
    assert model.prefills == [(3, 11)]  # one right-padded forward; padding never reaches a row's tokens
    assert [s.output_ids for s in seqs] == [reference(p, 4) for p in prompts]


def test_stop_ids_end_a_request_and_min_new_tokens_suppresses_them():
    want = reference(PROMPTS[0], 10)
    stop = want[3]
    seq = engine(stop_token_ids=[stop]).generate([(PROMPTS[0], SamplingParams(max_new_tokens=10), None)])[0]
    assert seq.output_ids == want[: want.index(stop)] and seq.finish_reason == "stop"
    per_request = SamplingParams(max_new_tokens=10, stop_token_ids=[stop])
    assert engine().generate([(PROMPTS[0], per_request, None)])[0].output_ids == seq.output_ids
    late = SamplingParams(max_new_tokens=10, stop_token_ids=[stop], min_new_tokens=want.index(stop) + 2)
    seq = engine().generate([(PROMPTS[0], late, None)])[0]
    assert len(seq.output_ids) >= late.min_new_tokens and stop not in seq.output_ids[: late.min_new_tokens]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    def params(seed):
        return SamplingParams(max_new_tokens=12, temperature=1.0, top_k=8, seed=seed)

    runs = [engine().generate([(PROMPTS[1], params(s), None)])[0].output_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    together = engine().generate([(PROMPTS[1], params(1), None), (PROMPTS[3], params(2), None)])
    assert together[0].output_ids == runs[0]
    peaks = [int(scripted(PROMPTS[1] + runs[0][:i]).argmax()) for i in range(12)]
    assert all(abs(t - p) < 8 for t, p in zip(runs[0], peaks))  # within the top 8
    top1 = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=1, seed=5)
    assert engine().generate([(PROMPTS[1], top1, None)])[0].output_ids == reference(PROMPTS[1], 12)


def test_prefix_cache_serves_a_shared_prefix_and_forgets_it_when_the_weights_change():
    model = MockModel()
    eng = Engine(model, max_model_len=512, prefix_cache=PrefixCache(min_tokens=8))
    head = list(b"system: be brief. user: ")
    a, b = head + list(b"first"), head + list(b"second one")
    assert eng.generate([(a, SamplingParams(max_new_tokens=6), None)])[0].output_ids == reference(a, 6)
    assert eng.uncached_tokens(b) == len(b) - len(head)
    seq = eng.generate([(b, SamplingParams(max_new_tokens=6), None)])[0]
    assert seq.cached_tokens == len(head) and seq.output_ids == reference(b, 6)
    model.version += 1  # new weights: the stored keys and values are stale
    seq = eng.generate([(b, SamplingParams(max_new_tokens=6), None)])[0]
    assert seq.cached_tokens == 0 and seq.output_ids == reference(b, 6)


def test_abort_reset_and_bad_prompts():
    eng = engine()
    seq = eng.add(PROMPTS[0], SamplingParams(max_new_tokens=50))
    eng.step()
    eng.abort(seq)
    events = eng.step()
    assert seq.finish_reason == "abort" and [(e.token_id, e.finished) for e in events] == [(None, True)]
    running = eng.add(PROMPTS[1], SamplingParams(max_new_tokens=50))
    eng.step()
    late = eng.add(PROMPTS[2])
    assert set(map(id, eng.reset())) == {id(running), id(late)} and not eng.has_work()
    with pytest.raises(PromptError, match="the prompt is empty"):
        eng.add([])
    with pytest.raises(PromptError, match="the prompt has 600 tokens but the model's context is 512 tokens"):
        eng.add([1] * 600)


def test_detokenizer_cuts_at_stop_strings_and_never_shows_part_of_one():
    detok = Detokenizer(engine(), ByteTokenizer())
    free = detok.generate([(PROMPTS[3], SamplingParams(max_new_tokens=16), None)])[0]
    assert free.text == bytes(reference(PROMPTS[3], 16)).decode() and free.seq.finish_reason == "length"
    stop = free.text[6:9]
    params = SamplingParams(max_new_tokens=16, stop=[stop])
    done = detok.generate([(PROMPTS[3], params, None)])[0]
    assert done.text == free.text[: free.text.index(stop)] and done.seq.finish_reason == "stop"
    assert len(done.seq.output_ids) == free.text.index(stop) + len(stop)  # it ended on the stop's last token
    last = SamplingParams(max_new_tokens=len(done.seq.output_ids), stop=[stop])  # the stop on the last token
    assert detok.generate([(PROMPTS[3], last, None)])[0].seq.finish_reason == "stop"
    events = list(detok.stream(PROMPTS[3], params))
    assert "".join(e.text for e in events) == done.text and events[-1].finished and events[-1].output == done.text
    shown = ""
    for e in events:  # what was shown is never taken back
        shown += e.text
        assert done.text.startswith(shown) and stop not in shown
    assert not detok.streams and not detok.engine.has_work()


def test_a_stop_right_after_the_prefill_token_keeps_that_token():
    """The prefill's token and the next one come in one step: a stop id as the second token, or a stop string
    completed by the first, still leaves the first token's text (and only that token)."""
    detok = Detokenizer(engine(), ByteTokenizer())
    first, second = reference(PROMPTS[4], 2)
    done = detok.generate([(PROMPTS[4], SamplingParams(max_new_tokens=8, stop_token_ids=[second]), None)])[0]
    assert done.text == chr(first) and done.seq.output_ids == [first] and done.seq.finish_reason == "stop"
    done = detok.generate([(PROMPTS[4], SamplingParams(max_new_tokens=8, stop=[chr(first)]), None)])[0]
    assert done.text == "" and done.seq.output_ids == [first] and done.seq.finish_reason == "stop"
    events = list(detok.stream(PROMPTS[4], SamplingParams(max_new_tokens=8, stop=[chr(first)])))
    assert [(e.token_id, e.finished) for e in events] == [(first, True)]  # the second token's event is dropped
    assert not detok.engine.has_work()


def test_text_stream_holds_back_incomplete_characters_and_stop_prefixes():
    stream = TextStream(ByteTokenizer(), stop=["<end>"])
    ids = list("café <e".encode())
    for token in ids[:4]:  # "caf" and the first byte of "é"
        stream.push(token)
    assert stream.delta() == "caf"
    for token in ids[4:]:
        stream.push(token)
    assert stream.delta() == "é "  # "<e" could begin the stop string: held back
    for token in b"nd> more":
        stream.push(token)
    assert stream.stopped and stream.tokens == len(ids) + 3 and stream.end(flush=False) == ""
    assert stream.text == "café "
    tail = TextStream(ByteTokenizer())
    tail.push("é".encode()[0])
    assert tail.delta() == "" and tail.end(flush=True) == "\ufffd"  # flushed at the end of a request
