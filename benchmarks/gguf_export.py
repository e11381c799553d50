"""Our Qwen2-family language model as a GGUF file for llama.cpp (used by bench_llamacpp.py): llama.cpp's qwen2
tensor names, BF16 / Q8_0 / Q4_0 weights through gguf-py's quantizers, and a minimal SentencePiece-style vocabulary
(token ids only: the benchmark feeds ids, so no text is ever tokenized)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FORMATS = ("bf16", "q8_0", "q4_0")
_LAYER = {  # ours (below model.layers.{i}.) -> llama.cpp's (below blk.{i}.)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}  # fmt: skip


def gguf_name(ours: str) -> str:
    """llama.cpp's name for one of our language-model tensors (`model.layers.3.mlp.up_proj.weight` ->
    `blk.3.ffn_up.weight`); raises for a tensor llama.cpp's qwen2 graph has no place for."""
    if ours in _TOP:
        return _TOP[ours]
    parts = ours.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
    raise ValueError(f"GGUF export: no qwen2 tensor for {ours!r} (fused or non-Qwen2 weights?)")


def tensor_type(gguf: str, tensor: torch.Tensor, fmt: str):
    """The GGUF type of a tensor in a `fmt` file: norms and biases F32, the embedding table BF16 (one row read
    per token, and ours keeps it bf16 in every format), every matrix of a layer and the output head in `fmt`
    (as llama.cpp's --pure quantization: the same format everywhere, like our quantize_model)."""
    from gguf import GGMLQuantizationType as T

    if tensor.dim() == 1:
        return T.F32
    if gguf == "token_embd.weight":
        return T.BF16
    return {"bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[fmt]


def _encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return tensor.detach().float().numpy()
    if qtype == T.BF16 and tensor.dtype == torch.bfloat16:  # the bits as they are, no float round trip
        return tensor.detach().contiguous().view(torch.int16).numpy().view(np.uint8)
    return quants.quantize(tensor.detach().float().numpy(), qtype)


def _vocab(writer, size: int, bos: int, eos: int) -> None:
    """`size` tokens (as many as the embedding rows): <unk>, <s>, </s>, the 256 byte tokens, then t{i}."""
    from gguf import TokenType

    if size < 259:
        raise ValueError(
            f"GGUF export: the vocabulary needs at least 259 tokens (3 special, 256 bytes), got {size}"
        )
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, *[TokenType.BYTE] * 256]
    tokens += [f"t{i}" for i in range(len(tokens), size)]
    types += [TokenType.NORMAL] * (size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * size)
    writer.add_token_types(types)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)


def write_gguf(state: dict[str, torch.Tensor], cfg, path: str | Path, fmt: str = "bf16") -> Path:
    """Write the language model `state` (our CausalLM's state_dict names, unfused) of config `cfg` (an
    LLMConfig of the qwen2 family) as a GGUF file in `fmt` (bf16, q8_0 or q4_0)."""
    import gguf

    if fmt not in FORMATS:
        raise ValueError(f"GGUF export: format must be one of {list(FORMATS)}, got {fmt!r}")
    scaling = (cfg.rope_scaling or {}).get("type", (cfg.rope_scaling or {}).get("rope_type"))
    if cfg.family != "qwen2" or scaling not in (None, "dynamic"):
        # InternVL3's dynamic scaling changes nothing below max_position_embeddings, where the benchmark runs
        raise ValueError(
            f"GGUF export: only Qwen2 decoders without rope scaling, got {cfg.family} {cfg.rope_scaling}"
        )
    names = {ours: gguf_name(ours) for ours in state}
    missing = {gguf_name(k) for k in _expected(cfg)} - set(names.values())
    if missing:
        raise ValueError(f"GGUF export: missing tensors {sorted(missing)[:4]}")
    path = Path(path)
    ftype = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[fmt]  # fmt: skip
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_name(f"random {cfg.hidden_size}x{cfg.num_hidden_layers} qwen2 ({fmt})")
    w.add_file_type(ftype)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    _vocab(w, cfg.vocab_size, 1, 2)
    for ours, name in names.items():
        qtype = tensor_type(name, state[ours], fmt)
        w.add_tensor(name, _encode(state[ours], qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _expected(cfg) -> list[str]:
    layer = [k for k in _LAYER if cfg.qkv_bias or not k.endswith(".bias")]
    return [*_TOP, *(f"model.layers.{i}.{k}" for i in range(cfg.num_hidden_layers) for k in layer)]
