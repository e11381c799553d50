"""Tokenizers of a checkpoint folder: `tokenizer.json` (Qwen2, the nano model) through `tokenizers`, or
InternLM2's sentencepiece `tokenizer.model` plus the added tokens listed in `tokenizer_config.json`.

Special-token ids are always resolved from their strings, never hard-coded. A tokenizer next to a model's
config.json is checked against it: its files' size before loading, its vocabulary after (no id past the
embedding).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import TokenizerError

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json")
MAX_TOKENIZER_BYTES = 256 << 20  # any one of those files, without a model to compare with
BYTES_PER_TOKEN = 2048  # far above real files (Qwen2's tokenizer.json: ~50 bytes per token), with a 16 MiB floor
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


class Tokenizer:
    """Text <-> token ids with the interface the engine, trainer and server need."""

    def __init__(self, backend, added: dict[str, int], special: set[int], bos_id: int | None, add_bos: bool,
                 eos_token: str | None = None, pad_token: str | None = None, source: str = "tokenizer"):  # fmt: skip
        self._backend = backend
        self.added = added  # added-token string -> id
        self.special_ids = special
        self.bos_id = bos_id  # the id a text starts with (None: none is added)
        self._add_bos = add_bos  # True: added here (sentencepiece); False: by the backend (a post-processor)
        self.source = source
        self.eos_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_id = self.token_to_id(pad_token) if pad_token else None

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        model_vocab = _model_vocab(folder)
        _check_file_sizes(folder, model_vocab)
        cfg = _read_json(folder / "tokenizer_config.json")
        eos = _token_str(cfg.get("eos_token"))
        pad = _token_str(cfg.get("pad_token"))
        try:
            if (folder / "tokenizer.json").exists():
                tok = cls._from_tokenizers(folder, cfg, eos, pad)
            elif (folder / "tokenizer.model").exists():
                tok = cls._from_sentencepiece(folder, cfg, eos, pad)
            else:
                raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # added-token tables of the wrong shape
            raise TokenizerError(f"{folder}: malformed tokenizer files ({type(e).__name__}: {e})") from None
        if model_vocab is not None and tok.vocab_size > model_vocab:
            raise TokenizerError(f"{tok.source}: the tokenizer has {tok.vocab_size} tokens but the model's "
                                 f"vocab_size is {model_vocab} (config.json): ids past it have no embedding")  # fmt: skip
        return tok

    @classmethod
    def _from_tokenizers(cls, folder: Path, cfg: dict, eos: str | None, pad: str | None) -> Tokenizer:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        path = folder / "tokenizer.json"
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load ({e})") from None
        # tokens declared only in tokenizer_config.json still have to split the text (added in one call:
        # each call rebuilds the added-token matcher)
        missing: dict[str, None] = {}
        for _, info in sorted((cfg.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            if tok.token_to_id(info["content"]) is None:
                missing.setdefault(info["content"])
        if missing:
            tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in missing])
        added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        # Prompts are encoded as the official `tokenizer(query)` call does: with the post-processor of
        # tokenizer.json, which adds what the model wants (Llama-3: <|begin_of_text|>; Qwen2/Qwen3: nothing).
        # `bos_id` is the id it puts first, for the trainer, which encodes the turns separately.
        probe = tok.encode("a", add_special_tokens=True)
        bos_id = probe.ids[0] if probe.special_tokens_mask[:1] == [1] else None
        return cls(_TokenizersBackend(tok), added, special, bos_id, add_bos=False, eos_token=eos, pad_token=pad,
                   source=str(path))  # fmt: skip

    @classmethod
    def _from_sentencepiece(cls, folder: Path, cfg: dict, eos: str | None, pad: str | None) -> Tokenizer:
        import sentencepiece as spm

        path = folder / "tokenizer.model"
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load sentencepiece model ({e})") from None
        added: dict[str, int] = {}
        special: set[int] = set()
        for idx, info in (cfg.get("added_tokens_decoder") or {}).items():
            added[info["content"]] = int(idx)
            if info.get("special", True):
                special.add(int(idx))
        for content, idx in _read_json(folder / "added_tokens.json").items():
            added.setdefault(content, int(idx))
            special.add(int(idx))
        for piece_id in (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()):
            if piece_id >= 0:
                special.add(piece_id)
        add_bos = bool(cfg.get("add_bos_token", True))
        bos_id = sp.bos_id() if add_bos and sp.bos_id() >= 0 else None
        return cls(_SentencePieceBackend(sp, added), added, special, bos_id, add_bos, eos or "</s>", pad,
                   source=str(path))  # fmt: skip

    # ---- interface -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with `add_special_tokens`, what the tokenizer adds around a text (its post-processor,
        or sentencepiece's BOS when `add_bos_token`), as transformers' `tokenizer(text)` does."""
        ids = self._backend.encode(text, add_special_tokens)
        if add_special_tokens and self._add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._backend.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        return self._backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._backend.id_to_token(idx)

    def require(self, token: str) -> int:
        idx = self.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"{self.source}: the tokenizer has no token {token!r}")
        return idx

    @property
    def vocab_size(self) -> int:
        return max(self._backend.vocab_size, max(self.added.values(), default=-1) + 1)

    @property
    def image_context_id(self) -> int:
        return self.require(IMG_CONTEXT)

    def __len__(self) -> int:
        return self.vocab_size


class _TokenizersBackend:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.tok.id_to_token(idx)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    """Split the text on added tokens, encode each piece with sentencepiece (as the reference tokenizer)."""

    def __init__(self, sp, added: dict[str, int]):
        self.sp = sp
        self.added = added
        self.added_by_id = {i: s for s, i in added.items()}
        names = sorted(added, key=len, reverse=True)
        self.split_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        parts = self.split_re.split(text) if self.split_re else [text]
        ids: list[int] = []
        for part in parts:
            if not part:
                continue
            if part in self.added:
                ids.append(self.added[part])
            else:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            if i in self.added_by_id:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.added_by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        idx = self.sp.piece_to_id(token)
        return None if idx == self.sp.unk_id() and token != self.sp.id_to_piece(idx) else idx

    def id_to_token(self, idx: int) -> str | None:
        if idx in self.added_by_id:
            return self.added_by_id[idx]
        return self.sp.id_to_piece(idx) if 0 <= idx < self.sp.get_piece_size() else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # decode from here, so that merges with earlier tokens render correctly
        self.read_offset = 0  # text up to here was already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise TokenizerError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _model_vocab(folder: Path) -> int | None:
    """vocab_size of the language model whose config.json shares the folder (either layout), if any."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
        text = cfg.get("llm_config") or cfg.get("text_config") or {}
        vocab = text.get("vocab_size")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None  # no config, or one the model loader reports itself
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None


def _check_file_sizes(folder: Path, model_vocab: int | None) -> None:
    """Refuse before loading a tokenizer file far larger than the model's vocabulary can explain."""
    limit = MAX_TOKENIZER_BYTES if model_vocab is None else min(
        MAX_TOKENIZER_BYTES, max(16 << 20, BYTES_PER_TOKEN * model_vocab)
    )  # fmt: skip
    for name in TOKENIZER_FILES:
        path = folder / name
        size = path.stat().st_size if path.is_file() else 0
        if size > limit:
            model = f" for a model of {model_vocab} tokens" if model_vocab is not None else ""
            raise TokenizerError(f"{path}: {size} bytes, above the limit of {limit} bytes{model}")


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_bpe_tokenizer(texts, folder: str | Path, vocab_size: int = 2000) -> Tokenizer:
    """Train a byte-level BPE tokenizer (ChatML + InternVL special tokens) and save it in `folder`.

    Written as `tokenizer.json` + `tokenizer_config.json`, the same files a Qwen2-based checkpoint has.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    # one token per digit (as Qwen2 does): numbers such as box coordinates get a regular form
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    specials = list(CHATML_TOKENS) + list(INTERNVL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 4096,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True, "normalized": False} for t in specials
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return Tokenizer.from_dir(folder)
