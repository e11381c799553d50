"""Conversation -> input ids + labels for supervised fine-tuning, one segment per turn (reference rules).

Every turn is rendered with its template and tokenized on its own, then the segments are concatenated:

    internvl2_5      <|im_start|>{role}\\n{text}<|im_end|>\\n   (the reference `preprocess_internvl2_5`)
    internlm2-chat   <|im_start|>{role}\\n{text}<|im_end|>      (`preprocess_internlm`; turn texts are stripped)
    Hermes-2         <|im_start|>{role}\\n{text}<|im_end|>      (`preprocess_mpt`)
    phi3-chat        <|{role}|>\\n{text}<|end|>                 (`preprocess_phi3`; <|endoftext|> never learned)
    internvl3_5_gpt_oss  <|start|>{role}<|message|>{text}<|end|>, an assistant's
                     <|start|>assistant<|channel|>final<|message|>{text}<|end|>, the last one ending in <|return|>
                     (`preprocess_internvl3_5_gpt_oss`; the channel header is learned, `<|start|>assistant` not)

System and user segments are all -100. An assistant segment learns its text and the separator token
(`<|im_end|>` / `<|end|>`) but not the role prefix nor the whitespace after the separator (internvl2_5's final
`\\n`). A tokenizer that adds a BOS (InternLM2) gets exactly one, at the start, unlearned.

Every segment starts and ends at a special token, so the concatenation equals the whole-string tokenization
the older reference preprocessors use; their offset arithmetic (which zeroes all labels on a mismatch) is not
needed. Unlike the reference, a leading system turn overrides the system prompt for every template, not only
internvl2_5; an empty system message omits the block, as the inference prompt does.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DataError
from ..processing.harmony import FINAL_HEADER, is_harmony
from ..processing.template import get_template
from ..tokenizer import Tokenizer

IGNORE = -100
ROLES = ("system", "human", "gpt")


def render_turn(template: str, role: str, text: str, last: bool = False) -> str:
    """The text of one segment: `role` is "system", "human" or "gpt"; `last`: the conversation's final message,
    which a template with `last_sep` (GPT-OSS's `<|return|>`) ends with it when it is the assistant's. A harmony
    template's assistant text gets the final channel header unless it already names a channel."""
    t = get_template(template)
    if role == "system":
        return t.system_template.format(text) + t.sep
    if role not in ROLES:
        raise DataError(f"turn role must be one of {ROLES}, got {role!r}")
    if role == "human":
        return t.roles[0] + text + t.sep
    if is_harmony(t) and not text.startswith("<|channel|>"):
        text = FINAL_HEADER + text
    return t.roles[1] + text + (t.last_sep if last and t.last_sep is not None else t.sep)


def tokenize_conversation(
    turns: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    template: str,
    system_message: str | None = None,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for `turns` = [(role, text)] with role in {"system", "human", "gpt"}.

    `<image>` placeholders must already be expanded to `<img><IMG_CONTEXT>...</img>`. A first "system" turn
    replaces `system_message`; None means the template default. The result is cut to `max_length` tokens.
    """
    t = get_template(template)
    turns = list(turns)
    system = t.system_message if system_message is None else system_message
    if turns and turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
    strip = t.name == "internlm2-chat"  # preprocess_internlm strips every message
    segments: list[tuple[str, str]] = []
    if system != "":
        segments.append(("system", system))
    for role, text in turns:
        if role == "system":
            raise DataError("a system turn may only come first")
        segments.append((role, text.strip() if strip else text))

    prefix_len = len(tokenizer.encode(t.roles[1], add_special_tokens=False))
    tail_len = len(tokenizer.encode(t.sep, add_special_tokens=False)) - len(
        tokenizer.encode(t.sep.rstrip(), add_special_tokens=False)
    )
    never_learn: set[int] = set()
    if t.name == "phi3-chat" and tokenizer.token_to_id("<|endoftext|>") is not None:
        never_learn.add(tokenizer.token_to_id("<|endoftext|>"))

    ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    labels: list[int] = [IGNORE] * len(ids)
    for k, (role, text) in enumerate(segments):
        seg = tokenizer.encode(render_turn(t.name, role, text, last=k == len(segments) - 1), add_special_tokens=False)
        ids += seg
        if role != "gpt":
            labels += [IGNORE] * len(seg)
            continue
        end = len(seg) - tail_len
        learned = [i if i not in never_learn else IGNORE for i in seg[prefix_len:end]]
        labels += (
            [IGNORE] * min(prefix_len, len(seg)) + learned + [IGNORE] * (len(seg) - max(end, prefix_len))
        )
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels
