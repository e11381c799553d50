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
