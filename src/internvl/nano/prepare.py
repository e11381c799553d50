"""The built-in model's configuration (`nano_config`) and its tokenizer, trained on a synthetic split's text:
`prepare` writes `tokenizer.json`, `tokenizer_config.json` and `config.json` (original layout) for
`internvl finetune --init-from-config OUT/config.json --tokenizer OUT` to train from scratch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..checkpoint.original import to_original_dict
from ..config import LLMConfig, ModelConfig, ProcessorConfig, VisionConfig
from ..tokenizer import train_bpe_tokenizer

# Sized for a 2-core CPU: 224-px tiles with 14-px patches (64 tokens per tile after pixel shuffle). The recipe
# trains on one tile per image (config max_dynamic_patch 1, the 64-token view that fits the CPU budget); the
# dynamic tiling stays on (dynamic_image_size), and configs/train/nano-stage2.yaml trains up to 4 tiles plus
# the thumbnail, so objects of 14 px keep about their native resolution.
NANO_VISION = {"hidden_size": 192, "intermediate_size": 768, "num_attention_heads": 3, "num_hidden_layers": 6,
               "patch_size": 14, "image_size": 224, "qkv_bias": True, "qk_normalization": False,
               "norm_type": "layer_norm", "drop_path_rate": 0.0}  # fmt: skip
NANO_LLM = {"family": "qwen2", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
            "max_position_embeddings": 4096}  # fmt: skip


def nano_config(vocab_size: int) -> ModelConfig:
    """InternViT + pixel shuffle + Qwen2-style decoder, template internvl2_5, dynamic tiling (max 1 tile)."""
    return ModelConfig(
        vision=VisionConfig(**NANO_VISION),
        llm=LLMConfig(vocab_size=vocab_size, **NANO_LLM),
        # no system block: the synthetic world needs none, and prompts stay short
        processor=ProcessorConfig(template="internvl2_5", system_message="", max_dynamic_patch=1),
        force_image_size=224,
    )


def split_texts(split_dir: str | Path) -> Iterator[str]:
    """Every question and answer of a split's JSONL files, without the `<image>` placeholders.

    OCR answers are left out: they are random letter strings, and merges learned from them would split
    text the model reads into arbitrary pairs; without them uppercase strings stay one token per letter.
    """
    for path in sorted(Path(split_dir).glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for turn in row.get("conversations", []):
                    if turn["from"] == "gpt" and row.get("task") == "ocr":
                        continue
                    yield turn["value"].replace("<image>", "")
                for key in ("question", "chosen", "rejected"):
                    if key in row:
                        yield row[key].replace("<image>", "")


def prepare(data: str | Path, out: str | Path, vocab_size: int = 1024) -> ModelConfig:
    """Train the tokenizer on the split's text and write it with the nano config into `out`."""
    out = Path(out)
    tokenizer = train_bpe_tokenizer(split_texts(data), out, vocab_size=vocab_size)
    config = nano_config(tokenizer.vocab_size)
    (out / "config.json").write_text(json.dumps(to_original_dict(config), indent=2, ensure_ascii=False))
    return config
