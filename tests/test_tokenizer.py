"""Tokenizer loading: tokenizer.json (checked against transformers) and InternLM2-style sentencepiece."""

from __future__ import annotations

import json

import pytest

from internvl.errors import TokenizerError
from internvl.tokenizer import INTERNVL_TOKENS, IncrementalDecoder, Tokenizer, train_bpe_tokenizer

TEXT = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat color is the star? 星形<|im_end|>\n"
CORPUS = ["What color is the star? It is red. How many circles are there? 3", "There are 2 blue squares. 星形"] * 40


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(CORPUS, folder, vocab_size=300)
    return folder


def test_tokenizer_json_matches_transformers(bpe_dir):
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer.from_dir(bpe_dir)
    ref = PreTrainedTokenizerFast.from_pretrained(str(bpe_dir))
    ids = ours.encode(TEXT)
    assert ids == ref(TEXT).input_ids
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for token in INTERNVL_TOKENS + ("<|im_end|>",):
        assert ours.token_to_id(token) == ref.convert_tokens_to_ids(token)


def test_incremental_decoder_reassembles_text_with_multibyte_characters(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    ids = tok.encode("星形 and 星形! red")
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """An InternLM2-style folder: sentencepiece model + added tokens in tokenizer_config.json."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    (folder / "corpus.txt").write_text("\n".join(CORPUS * 5))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=380, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   byte_fallback=True, minloglevel=2)  # fmt: skip
    added = ["<|im_start|>", "<|im_end|>"] + list(INTERNVL_TOKENS)
    config = {
        "add_bos_token": True,
        "eos_token": "</s>",
        "added_tokens_decoder": {str(380 + i): {"content": t, "special": True} for i, t in enumerate(added)},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_sentencepiece_splits_on_added_tokens_and_adds_bos(sp_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = Tokenizer.from_dir(sp_dir)
    ids = tok.encode("<|im_start|>user\nWhat color<IMG_CONTEXT><|im_end|>")
    # the reference rule: BOS, then added tokens as single ids and sentencepiece on the text between them
    expected = [1, 380] + sp.encode("user\nWhat color") + [384, 381]
    assert ids == expected
    assert tok.image_context_id == 384 and tok.bos_id == 1
    assert tok.decode(ids[1:], skip_special_tokens=True) == "user\nWhat color"
    assert tok.encode("red", add_special_tokens=False) == sp.encode("red")


def test_missing_tokenizer_and_missing_token(tmp_path, bpe_dir):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    tok = Tokenizer.from_dir(bpe_dir)
    with pytest.raises(TokenizerError, match="has no token '<video>'"):
        tok.require("<video>")


# ---- what a prompt starts with: the official chat() encodes with `tokenizer(query)` (add_special_tokens) ----

PROMPT = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat color is the star?<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _family_tokenizer(folder, family: str):
    """A tiny tokenizer.json + tokenizer_config.json shaped like the family's: Llama-3 has a TemplateProcessing
    post-processor adding <|begin_of_text|>; Qwen2/Qwen3 (class Qwen2Tokenizer) a ByteLevel one adding nothing."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    train_bpe_tokenizer(CORPUS, folder, vocab_size=300)
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if family == "llama3":
        tok.add_special_tokens(list(LLAMA3_SPECIALS))
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                          special_tokens=[("<|begin_of_text|>", bos)]),
        ])  # fmt: skip
        config.update(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    else:
        if family == "qwen3":
            tok.add_special_tokens(["<think>", "</think>"])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, eos_token="<|im_end|>")
    config["added_tokens_decoder"] = {str(i): {"content": t.content, "special": True, "normalized": False}
                                      for i, t in tok.get_added_tokens_decoder().items()}  # fmt: skip
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_prompt_ids_match_transformers_tokenizer_call(family, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = _family_tokenizer(tmp_path, family)
    ours = Tokenizer.from_dir(folder)
    for ref in (AutoTokenizer.from_pretrained(str(folder)), PreTrainedTokenizerFast.from_pretrained(str(folder))):
        assert ours.encode(PROMPT) == ref(PROMPT).input_ids
        assert ours.encode(PROMPT, add_special_tokens=False) == ref(PROMPT, add_special_tokens=False).input_ids
    ids = ours.encode(PROMPT)
    if family == "llama3":
        bos = ours.require("<|begin_of_text|>")
        assert ids[0] == bos and ids.count(bos) == 1 and ours.bos_id == bos  # the trainer adds the same one
        assert ours.encode(PROMPT, add_special_tokens=False) == ids[1:]
    else:
        assert ids[0] == ours.require("<|im_start|>") and ours.bos_id is None


def test_sentencepiece_without_add_bos_token_adds_nothing(sp_dir, tmp_path):
    import shutil

    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    config = json.loads((sp_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tok = Tokenizer.from_dir(tmp_path)
    with_bos = Tokenizer.from_dir(sp_dir)
    assert tok.bos_id is None and with_bos.bos_id == 1
    assert [1] + tok.encode("<|im_start|>user\nred") == with_bos.encode("<|im_start|>user\nred")
