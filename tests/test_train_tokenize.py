"""Golden label masks for every template: the expected ids and labels are spelled out segment by segment from the
reference preprocess functions (internvl2_5, internlm, mpt, phi3), then compared with `tokenize_conversation`."""

from __future__ import annotations

import json
import shutil

import pytest
from refmodels import tiny_checkpoint

from internvl.config import SYSTEM_INTERNVL2, SYSTEM_INTERNVL2_5
from internvl.tokenizer import Tokenizer
from internvl.train.tokenize import tokenize_conversation

IGNORE = -100
PHI3 = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The tiny BPE tokenizer plus phi3's special tokens (declared in tokenizer_config.json, as phi3 does)."""
    root = tmp_path_factory.mktemp("tok")
    model = tiny_checkpoint(root / "model")
    folder = root / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, folder / name)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    base = Tokenizer.from_dir(folder).vocab_size
    for k, t in enumerate(PHI3):
        cfg["added_tokens_decoder"][str(base + k)] = {"content": t, "special": True, "normalized": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer.from_dir(folder)


def expected(tok, parts):
    """parts: (text or special token, learned?) in order -> (ids, labels)."""
    ids, labels = [], []
    for text, learned in parts:
        piece = [tok.require(text)] if text in tok.added else tok.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if learned else [IGNORE] * len(piece)
    return ids, labels


def check(tok, template, turns, parts, **kw):
    ids, labels = tokenize_conversation(turns, tok, template, **kw)
    want_ids, want_labels = expected(tok, parts)
    assert ids == want_ids
    assert labels == want_labels


SINGLE = [("human", "What color is the circle?"), ("gpt", "red")]
MULTI = [("human", "What color is the circle?"), ("gpt", "red"), ("human", "How many squares?"), ("gpt", "3")]
SYSTEM = [("system", "Answer briefly.")] + SINGLE

S, E, N = "<|im_start|>", "<|im_end|>", "\n"


# ---- internvl2_5 (preprocess_internvl2_5): each turn ends with <|im_end|>\n; the final \n is not learned ----


def test_internvl2_5_single_turn(tok):
    check(tok, "internvl2_5", SINGLE, [
        (S, 0), ("system\n" + SYSTEM_INTERNVL2_5, 0), (E, 0), (N, 0),
        (S, 0), ("user\nWhat color is the circle?", 0), (E, 0), (N, 0),
        (S, 0), ("assistant\n", 0), ("red", 1), (E, 1), (N, 0),
    ])  # fmt: skip


def test_internvl2_5_multi_turn(tok):
    check(tok, "internvl2_5", MULTI, [
        (S, 0), ("system\n" + SYSTEM_INTERNVL2_5, 0), (E, 0), (N, 0),
        (S, 0), ("user\nWhat color is the circle?", 0), (E, 0), (N, 0),
        (S, 0), ("assistant\n", 0), ("red", 1), (E, 1), (N, 0),
        (S, 0), ("user\nHow many squares?", 0), (E, 0), (N, 0),
        (S, 0), ("assistant\n", 0), ("3", 1), (E, 1), (N, 0),
    ])  # fmt: skip


def test_internvl2_5_system_turn_replaces_the_default(tok):
    check(tok, "internvl2_5", SYSTEM, [
        (S, 0), ("system\nAnswer briefly.", 0), (E, 0), (N, 0),
        (S, 0), ("user\nWhat color is the circle?", 0), (E, 0), (N, 0),
        (S, 0), ("assistant\n", 0), ("red", 1), (E, 1), (N, 0),
    ])  # fmt: skip


def test_internvl2_5_bos_tokenizer_gets_one_unlearned_bos(tok, monkeypatch):
    bos = tok.require("<|endoftext|>")
    monkeypatch.setattr(tok, "bos_id", bos)
    ids, labels = tokenize_conversation(SYSTEM, tok, "internvl2_5")
    monkeypatch.setattr(tok, "bos_id", None)
    plain_ids, plain_labels = tokenize_conversation(SYSTEM, tok, "internvl2_5")
    assert ids == [bos] + plain_ids and labels == [IGNORE] + plain_labels
    assert ids.count(bos) == 1


# ---- internlm2-chat (preprocess_internlm): no \n after <|im_end|>; messages stripped; <|im_end|> learned ----


def test_internlm2_chat_single_turn_strips_messages(tok):
    turns = [("human", "  What color is the circle? "), ("gpt", " red\n")]
    check(tok, "internlm2-chat", turns, [
        (S, 0), ("system\n" + SYSTEM_INTERNVL2, 0), (E, 0),
        (S, 0), ("user\nWhat color is the circle?", 0), (E, 0),
        (S, 0), ("assistant\n", 0), ("red", 1), (E, 1),
    ])  # fmt: skip


def test_internlm2_chat_multi_turn_with_bos(tok, monkeypatch):
    bos = tok.require("<|endoftext|>")
    monkeypatch.setattr(tok, "bos_id", bos)
    ids, labels = tokenize_conversation(MULTI, tok, "internlm2-chat")
    want_ids, want_labels = expected(tok, [
        (S, 0), ("system\n" + SYSTEM_INTERNVL2, 0), (E, 0),
        (S, 0), ("user\nWhat color is the circle?", 0), (E, 0),
        (S, 0), ("assistant\n", 0), ("red", 1), (E, 1),
        (S, 0), ("user\nHow many squares?", 0), (E, 0),
        (S, 0), ("assistant\n", 0), ("3", 1), (E, 1),
    ])  # fmt: skip
    assert ids == [bos] + want_ids and labels == [IGNORE] + want_labels


def test_internlm2_chat_system_turn(tok):
    check(tok, "internlm2-chat", SYSTEM, [
        (S, 0), ("system\nAnswer briefly.", 0), (E, 0),
        (S, 0), ("user\nWhat color is the circle?", 0), (E, 0),
        (S, 0), ("assistant\n", 0), ("red", 1), (E, 1),
    ])  # fmt: skip


# ---- Hermes-2 (preprocess_mpt): as internlm2-chat, messages not stripped ----


def test_hermes2_single_turn_keeps_spaces(tok):
    turns = [("human", "What color is the circle?"), ("gpt", " red")]
    check(tok, "Hermes-2", turns, [
        (S, 0), ("system\n" + SYSTEM_INTERNVL2, 0), (E, 0),
        (S, 0), ("user\nWhat color is the circle?", 0), (E, 0),
        (S, 0), ("assistant\n", 0), (" red", 1), (E, 1),
    ])  # fmt: skip


def test_hermes2_multi_turn(tok):
    check(tok, "Hermes-2", MULTI, [
        (S, 0), ("system\n" + SYSTEM_INTERNVL2, 0), (E, 0),
        (S, 0), ("user\nWhat color is the circle?", 0), (E, 0),
        (S, 0), ("assistant\n", 0), ("red", 1), (E, 1),
        (S, 0), ("user\nHow many squares?", 0), (E, 0),
        (S, 0), ("assistant\n", 0), ("3", 1), (E, 1),
    ])  # fmt: skip


def test_hermes2_system_turn(tok):
    check(tok, "Hermes-2", SYSTEM, [
        (S, 0), ("system\nAnswer briefly.", 0), (E, 0),
        (S, 0), ("user\nWhat color is the circle?", 0), (E, 0),
        (S, 0), ("assistant\n", 0), ("red", 1), (E, 1),
    ])  # fmt: skip


# ---- phi3-chat (preprocess_phi3): <|role|>\n ... <|end|>; <|end|> learned, <|endoftext|> never ----


def test_phi3_single_turn(tok):
    check(tok, "phi3-chat", SINGLE, [
        ("<|system|>", 0), ("\n" + SYSTEM_INTERNVL2, 0), ("<|end|>", 0),
        ("<|user|>", 0), ("\nWhat color is the circle?", 0), ("<|end|>", 0),
        ("<|assistant|>", 0), ("\n", 0), ("red", 1), ("<|end|>", 1),
    ])  # fmt: skip


def test_phi3_multi_turn_never_learns_endoftext(tok):
    turns = MULTI[:3] + [("gpt", "3<|endoftext|>")]
    check(tok, "phi3-chat", turns, [
        ("<|system|>", 0), ("\n" + SYSTEM_INTERNVL2, 0), ("<|end|>", 0),
        ("<|user|>", 0), ("\nWhat color is the circle?", 0), ("<|end|>", 0),
        ("<|assistant|>", 0), ("\n", 0), ("red", 1), ("<|end|>", 1),
        ("<|user|>", 0), ("\nHow many squares?", 0), ("<|end|>", 0),
        ("<|assistant|>", 0), ("\n", 0), ("3", 1), ("<|endoftext|>", 0), ("<|end|>", 1),
    ])  # fmt: skip


def test_phi3_system_turn(tok):
    check(tok, "phi3-chat", SYSTEM, [
        ("<|system|>", 0), ("\nAnswer briefly.", 0), ("<|end|>", 0),
        ("<|user|>", 0), ("\nWhat color is the circle?", 0), ("<|end|>", 0),
        ("<|assistant|>", 0), ("\n", 0), ("red", 1), ("<|end|>", 1),
    ])  # fmt: skip


# ---- shared rules ----


def test_image_tokens_are_never_learned_and_truncation_cuts_the_end(tok):
    image = "<img>" + "<IMG_CONTEXT>" * 8 + "</img>"
    turns = [("human", image + "\nWhat color?"), ("gpt", "red")]
    ids, labels = tokenize_conversation(turns, tok, "internvl2_5")
    ctx = tok.require("<IMG_CONTEXT>")
    assert ids.count(ctx) == 8 and all(lab != ctx for lab in labels)
    cut_ids, cut_labels = tokenize_conversation(turns, tok, "internvl2_5", max_length=len(ids) - 3)
    assert cut_ids == ids[:-3] and cut_labels == labels[:-3]


def test_empty_system_message_omits_the_block(tok):
    ids, _ = tokenize_conversation(SINGLE, tok, "internvl2_5", system_message="")
    want, _ = expected(tok, [(S, 0), ("user\nWhat color is the circle?", 0), (E, 0), (N, 0),
                             (S, 0), ("assistant\n", 0), ("red", 1), (E, 1), (N, 0)])  # fmt: skip
    assert ids == want
