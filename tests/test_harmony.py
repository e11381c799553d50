"""GPT-OSS's harmony replies: the detokenizer's text is the final channel's message (analysis kept apart), in
streamed deltas too, other templates unchanged; training text and labels follow preprocess_internvl3_5_gpt_oss."""

from __future__ import annotations

import pytest
import torch

from internvl.engine.detok import Detokenizer, TextStream
from internvl.engine.engine import Engine
from internvl.engine.sampling import SamplingParams
from internvl.model.cache import KVCache
from internvl.processing.harmony import is_harmony
from internvl.processing.template import get_template, render_prompt
from internvl.train.tokenize import IGNORE, render_turn, tokenize_conversation

SPECIALS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>")
START, END, MESSAGE, CHANNEL, RETURN = range(256, 256 + len(SPECIALS))
VOCAB = 256 + len(SPECIALS)


class HarmonyBytes:
    """Byte i is token i; the harmony specials follow, and a special is one token in encode()."""

    special_ids = frozenset(range(256, VOCAB))
    bos_id = None

    def token_to_id(self, token: str) -> int | None:
        return 256 + SPECIALS.index(token) if token in SPECIALS else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        while text:
            hit = next((s for s in SPECIALS if text.startswith(s)), None)
            ids += [self.token_to_id(hit)] if hit else list(text[0].encode())
            text = text[len(hit) if hit else 1 :]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out, raw = [], b""
        for i in ids:
            if i < 256:
                raw += bytes([i])
            elif not skip_special_tokens:
                out.append(raw.decode("utf-8", errors="replace") + SPECIALS[i - 256])
                raw = b""
        return "".join(out) + raw.decode("utf-8", errors="replace")


TOK = HarmonyBytes()
FINAL = "<|channel|>final<|message|>Two blue squares. é<|return|>"
THINK = ("<|channel|>analysis<|message|>Count: 1, 2.<|end|><|start|>assistant"
         "<|channel|>final<|message|>Two blue squares. é<|return|>")  # fmt: skip


class ScriptModel:
    """A model that writes `script` after the prompt whatever the input (a peak at the scripted id)."""

    image_token_id = None
    num_image_token = 256
    device = torch.device("cpu")

    def __init__(self, prompt_len: int, script: list[int]):
        self.prompt_len, self.script = prompt_len, script

    def new_cache(self, batch: int, capacity: int = 256) -> KVCache:
        return KVCache(1, batch, 1, 1, torch.float32, "cpu", capacity)

    def _logits(self, b: int, t: int, cache: KVCache, valid) -> torch.Tensor:
        cache.reserve(int(cache.lengths.max()) + t)
        logits = torch.zeros(b, t, VOCAB)
        for row in range(b):
            for i in range(t):
                k = int(cache.lengths[row]) + i + 1 - self.prompt_len
                logits[row, i, self.script[min(max(k, 0), len(self.script) - 1)]] = 10.0
        cache.lengths += valid if valid is not None else torch.full((b,), t)
        return logits

    def prefill(self, ids, pixel_values, cache, valid_lengths=None, logits_to_keep=0):
        return self._logits(*ids.shape, cache, valid_lengths)[:, -logits_to_keep:]

    def decode(self, tokens, cache, valid_lengths=None):
        return self._logits(tokens.shape[0], 1, cache, valid_lengths)[:, -1]

    def decoder_version(self):
        return 0


PROMPT = TOK.encode("<|start|>user<|message|>What?<|end|><|start|>assistant")


def detok(reply: str, harmony: bool = True) -> Detokenizer:
    model = ScriptModel(len(PROMPT), TOK.encode(reply))
    return Detokenizer(Engine(model, max_model_len=512, stop_token_ids=[RETURN], prefix_cache=False), TOK, harmony)


@pytest.mark.parametrize("reply", [FINAL, THINK])
def test_text_is_the_final_channel_and_analysis_is_reasoning(reply):
    done = detok(reply).generate([(PROMPT, SamplingParams(max_new_tokens=100), None)])[0]
    assert done.text == "Two blue squares. é" and done.seq.finish_reason == "stop"
    assert done.reasoning == ("Count: 1, 2." if reply is THINK else "")


@pytest.mark.parametrize("reply", [FINAL, THINK])
def test_streamed_deltas_never_show_a_header(reply):
    events = list(detok(reply).stream(PROMPT, SamplingParams(max_new_tokens=100)))
    deltas = [e.text for e in events]
    assert "".join(deltas) == "Two blue squares. é" == events[-1].output
    assert not any("final" in d or "analysis" in d or "assistant" in d for d in deltas)


def test_stop_strings_apply_to_the_final_text():
    done = detok(THINK).generate([(PROMPT, SamplingParams(max_new_tokens=100, stop=["squares"]), None)])[0]
    assert done.text == "Two blue " and done.seq.finish_reason == "stop"


def test_a_reply_without_a_channel_and_other_templates_are_plain_text():
    plain = detok("Just text.<|return|>").generate([(PROMPT, SamplingParams(max_new_tokens=100), None)])[0]
    assert plain.text == "Just text."
    off = detok(FINAL, harmony=False).generate([(PROMPT, SamplingParams(max_new_tokens=100), None)])[0]
    assert off.text == "finalTwo blue squares. é"  # specials skipped, as for every other template
    stream = TextStream(TOK, harmony=True)  # a reply cut short inside the header shows nothing
    for token in TOK.encode("<|channel|>fin"):
        stream.push(token)
    assert stream.end(flush=True) == "" and stream.text == ""


def test_only_the_gpt_oss_template_is_harmony():
    assert is_harmony(get_template("internvl3_5_gpt_oss"))
    assert not any(is_harmony(get_template(n)) for n in ("internvl2_5", "internlm2-chat", "Hermes-2", "phi3-chat"))


def test_a_shown_answer_goes_back_into_the_history_with_its_channel():
    """chat(history=...) and the server get back the final text only: the prompt restores its header."""
    turns = [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", None)]
    assert render_prompt("internvl3_5_gpt_oss", turns, "S") == (
        "<|start|>system<|message|>S<|end|><|start|>user<|message|>a<|end|>"
        "<|start|>assistant<|channel|>final<|message|>b<|end|><|start|>user<|message|>c<|end|><|start|>assistant"
    )
    assert "final" not in render_prompt("internvl2_5", turns, "S")


# ---- training ------------------------------------------------------------------------------------

GPT_OSS = "internvl3_5_gpt_oss"


def test_training_text_ends_the_last_answer_with_return():
    turns = [("system", "S"), ("human", "a"), ("gpt", "b"), ("human", "c"), ("gpt", "d")]
    text = "".join(render_turn(GPT_OSS, r, t, last=k == len(turns) - 1) for k, (r, t) in enumerate(turns))
    assert text == ("<|start|>system<|message|>S<|end|><|start|>user<|message|>a<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>b<|end|><|start|>user<|message|>c<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>d<|return|>")  # fmt: skip
    # an answer that already names its channel (analysis then final) keeps it
    think = "<|channel|>analysis<|message|>t<|end|><|start|>assistant<|channel|>final<|message|>d"
    assert render_turn(GPT_OSS, "gpt", think, last=True) == "<|start|>assistant" + think + "<|return|>"
    assert render_turn("internvl2_5", "gpt", "d", last=True) == "<|im_start|>assistant\nd<|im_end|>\n"


def test_training_labels_learn_the_header_answer_and_end_token():
    turns = [("system", "S"), ("human", "a"), ("gpt", "b"), ("human", "c"), ("gpt", "d")]
    ids, labels = tokenize_conversation(turns, TOK, GPT_OSS)
    learned = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    # per answer: <|channel|>final<|message|>{text}{<|end|> | <|return|>}; never <|start|>assistant
    assert learned == TOK.encode("<|channel|>final<|message|>b<|end|><|channel|>final<|message|>d<|return|>")
    assert ids == TOK.encode(
        "<|start|>system<|message|>S<|end|><|start|>user<|message|>a<|end|>"
        "<|start|>assistant<|channel|>final<|message|>b<|end|><|start|>user<|message|>c<|end|>"
        "<|start|>assistant<|channel|>final<|message|>d<|return|>"
    )
