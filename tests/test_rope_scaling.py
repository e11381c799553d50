"""RoPE scaling as transformers computes it: linear, dynamic NTK past max_position_embeddings (the base grows
with the length, the engine keeps going), LongRoPE (`longrope`/`su`) with its attention factor."""

from __future__ import annotations

import pytest
import torch

from internvl.config import LLMConfig
from internvl.errors import ConfigError
from internvl.model.llm import CausalLM
from internvl.model.rope import Rotary

HEAD = 16
LONG = [1.0 + 0.5 * i for i in range(HEAD // 2)]
SHORT = [1.0 + 0.05 * i for i in range(HEAD // 2)]
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "longrope": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                 "original_max_position_embeddings": 16},
    "su (Phi-3's name), attention factor given": {"type": "su", "short_factor": SHORT, "long_factor": LONG,
                                                  "original_max_position_embeddings": 16, "attention_factor": 1.3},
}  # fmt: skip


def _cfg(scaling, max_pos: int = 32, family: str = "llama") -> LLMConfig:
    return LLMConfig(family=family, vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rope_scaling=scaling,
                     max_position_embeddings=max_pos, qkv_bias=False, o_bias=False)  # fmt: skip


def _reference_rotary(scaling, max_pos: int = 32):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_theta": 10000.0, "rope_type": "default"}
    if scaling:
        params = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_theta": 10000.0,
                  "rope_type": {"su": "longrope"}.get(scaling.get("type"), scaling.get("rope_type"))}  # fmt: skip
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=max_pos, rope_parameters=params)
    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("length", [8, 16, 17, 32, 100])
def test_rotary_tables_match_transformers(name, length):
    """Lengths inside and past original_max (16) and max_position_embeddings (32), one fresh call each."""
    ours = Rotary(_cfg(SCALINGS[name]))
    ref = _reference_rotary(SCALINGS[name])
    positions = torch.arange(length)[None]
    cos, sin = ours(positions, torch.float32)
    ref_cos, ref_sin = ref(torch.zeros(1, length, 64), positions)
    torch.testing.assert_close(cos, ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-5, rtol=0)


def test_dynamic_ntk_greedy_past_max_positions_matches_transformers():
    """A Llama with dynamic NTK (factor 2, max_position_embeddings 16): a 12-token prompt and 32 greedy tokens
    run to position 44; logits of a 40-token prefill and every greedy token equal transformers'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ref_cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                          rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                          tie_word_embeddings=False)  # fmt: skip
    ref = LlamaForCausalLM(ref_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
    cfg = _cfg({"rope_type": "dynamic", "factor": 2.0}, max_pos=16)
    ours = CausalLM(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    assert cfg.context_length == 32  # the engine's default limit: past max_position_embeddings

    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ours.embed(ids)), ref(ids).logits, atol=1e-4, rtol=0)

        prompt = ids[:, :12]
        want = ref.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, 12:].tolist()
        cache = ours.new_cache(1, torch.float32)
        logits = ours(ours.embed(prompt), cache=cache)[:, -1]
        got = []
        for _ in range(32):
            got.append(int(logits.argmax(-1)))
            logits = ours.decode(torch.tensor([got[-1]]), cache)
    assert got == want


def test_unsupported_or_malformed_scaling_is_a_config_error():
    with pytest.raises(ConfigError, match="unsupported type llama3"):
        _cfg({"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ConfigError, match="long_factor: expected 8 positive numbers"):
        _cfg({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG[:3]})
    assert _cfg(None).context_length == 32 and _cfg(SCALINGS["linear"]).context_length == 32


def test_engine_with_dynamic_ntk_runs_past_max_position_embeddings():
    """The engine's limit follows the rope settings: a prompt longer than max_position_embeddings is served."""
    from dataclasses import replace

    from internvl.checkpoint.io import build_model
    from internvl.engine.engine import Engine
    from internvl.engine.sampling import SamplingParams
    from internvl.presets import preset

    cfg = preset("tiny")
    cfg.llm = replace(cfg.llm, max_position_embeddings=24, rope_scaling={"type": "dynamic", "factor": 4.0})
    torch.manual_seed(0)
    model = build_model(cfg, image_token_id=cfg.llm.vocab_size - 1, meta=False).eval()
    engine = Engine(model)
    assert engine.max_model_len == 96
    prompt = torch.randint(0, 200, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    out = engine.generate([(prompt, SamplingParams(max_new_tokens=8), None)])[0]
    assert len(out.output_ids) == 8
    with torch.no_grad():  # the first token is the full forward's greedy choice at position 39
        logits = model.language_model(model.language_model.embed(torch.tensor([prompt])))[0, -1]
    assert out.output_ids[0] == int(logits.argmax())
