"""InternVL3.5-GPT-OSS: parity with transformers in both layouts (sinks, sliding windows, biased router, clamped
SwiGLU experts, YaRN), cached decoding inside the window, MXFP4 dequantization, the chat template, and the C
decode step declining the family."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from refmodels import (
    IMAGE_TOKEN_ID,
    assert_logits_match,
    greedy_tokens,
    hf_reference,
    prompt_with_images,
    save_reference,
)
from safetensors.torch import load_file, save_file

from internvl.checkpoint.io import load_model
from internvl.checkpoint.mxfp4 import FP4_VALUES, dequantize, expert_weight
from internvl.cli.main import main as cli
from internvl.config import LLMConfig
from internvl.errors import ConfigError
from internvl.model.gpt_oss import GptOssMoE, sink_attention
from internvl.model.llm import Attention, CausalLM
from internvl.model.yarn import yarn_frequencies
from internvl.processing.template import render_prompt, stop_strings


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(transformers model, its -hf folder, our original-layout conversion of it)."""
    ref = hf_reference("gpt_oss", "300m", seed=4)
    hf = save_reference(ref, tmp_path_factory.mktemp("hf-gpt-oss"))
    orig = tmp_path_factory.mktemp("orig-gpt-oss") / "m"
    assert cli(["convert", str(hf), str(orig), "--to", "original"]) == 0
    return ref, hf, orig


def _load(folder):
    model, report = load_model(folder, image_token_id=IMAGE_TOKEN_ID)
    assert not report.missing and not report.unexpected
    return model, report


def test_configs_name_the_family(folders):
    _, hf, orig = folders
    ours, _ = _load(hf)
    llm = ours.config.llm
    assert llm.family == "gpt_oss" and llm.qkv_bias and llm.o_bias and llm.head_dim == 16
    assert llm.layer_types == ["sliding_attention", "full_attention", "sliding_attention"] and llm.sliding_window == 4
    assert (llm.num_experts, llm.num_experts_per_tok) == (4, 2)
    assert llm.rope_scaling["rope_type"] == "yarn" and llm.rope_theta == 10000.0  # from rope_parameters
    assert ours.config.processor.template == "internvl3_5_gpt_oss"
    cfg = json.loads((orig / "config.json").read_text())
    text = cfg["llm_config"]
    assert text["architectures"] == ["GptOssForCausalLM"] and cfg["template"] == "internvl3_5_gpt_oss"
    assert text["num_local_experts"] == 4 and text["sliding_window"] == 4 and text["layer_types"] == llm.layer_types
    windows = [layer.self_attn.window for layer in ours.language_model.model.layers]
    assert windows == [4, None, 4]


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_logits_match_transformers(folders, layout):
    ref, hf, orig = folders
    ours, report = _load(hf if layout == "hf" else orig)
    assert report.layout == layout
    ids, pv = prompt_with_images([1, 3, 2], seed=2)  # 48 tokens: far past the 4-token window
    assert_logits_match(ref, ours, ids, pv)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_32_greedy_tokens_equal_transformers_generate(folders, layout):
    ref, hf, orig = folders
    ours, _ = _load(hf if layout == "hf" else orig)
    expected, got = greedy_tokens(ref, ours, *prompt_with_images([2, 1], seed=11))
    assert got == expected


def test_our_hf_layout_loads_in_transformers(folders, tmp_path):
    """original -> -hf by `internvl convert`: transformers reads our text_config (experts, windows, YaRN) and keys."""
    from transformers import InternVLForConditionalGeneration

    ref, _, orig = folders
    assert cli(["convert", str(orig), str(tmp_path / "hf"), "--to", "hf", "--image-token-id", str(IMAGE_TOKEN_ID)]) == 0
    back = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert back.config.text_config.layer_types == ref.config.text_config.layer_types
    assert back.config.text_config.rope_parameters["rope_type"] == "yarn"
    ids, pv = prompt_with_images([2], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pv).logits,
                                   ref(input_ids=ids, pixel_values=pv).logits, atol=1e-5, rtol=0)  # fmt: skip


def test_cached_decode_of_uneven_rows_matches_full_forward(folders):
    """Two right-padded rows of different lengths, prefilled then decoded token by token: each step's logits
    equal a full forward of that row (the window is a mask over the whole cache)."""
    _, hf, _ = folders
    lm = _load(hf)[0].language_model
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 400, (n,), generator=g) for n in (9, 5)]
    extra = torch.randint(0, 400, (2, 6), generator=g)
    with torch.no_grad():
        cache = lm.new_cache(2)
        padded = torch.zeros(2, 9, dtype=torch.long)
        for r, row in enumerate(rows):
            padded[r, : len(row)] = row
        lm(lm.embed(padded), cache=cache, valid_lengths=torch.tensor([9, 5]))
        for step in range(extra.shape[1]):
            got = lm.decode(extra[:, step], cache)
            for r, row in enumerate(rows):
                full = torch.cat([row, extra[r, : step + 1]])[None]
                want = lm(lm.embed(full))[0, -1]
                torch.testing.assert_close(got[r], want, atol=1e-4, rtol=0)


def test_prefix_cache_and_batching_keep_the_greedy_tokens(folders):
    """A reused prompt prefix (longer than the window) and two uneven prompts decoded together: the same
    tokens as each prompt alone without the prefix cache."""
    from internvl.engine.engine import Engine
    from internvl.engine.sampling import SamplingParams

    _, hf, _ = folders
    ours = _load(hf)[0]
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 400, (20,), generator=g).tolist()  # the prefix cache keeps 16 tokens or more
    prompts = [shared + torch.randint(0, 400, (n,), generator=g).tolist() for n in (3, 7)]
    params = SamplingParams(max_new_tokens=10)
    plain = Engine(ours, prefix_cache=False)
    want = [plain.generate([(ids, params, None)])[0].output_ids for ids in prompts]
    cached = Engine(ours)
    assert [cached.generate([(ids, params, None)])[0].output_ids for ids in prompts] == want
    assert cached.prefix_cache.hits == 1
    assert [s.output_ids for s in plain.generate([(ids, params, None) for ids in prompts])] == want


def _cfg(**changes) -> LLMConfig:
    base = {"family": "gpt_oss", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
            "num_experts_per_tok": 2, "sliding_window": 3, "rope_theta": 10000.0, "o_bias": True}  # fmt: skip
    return LLMConfig(**{**base, **changes})


def test_sinks_join_the_softmax_denominator():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    plain = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True)  # fmt: skip
    no_sink = sink_attention(q, k, v, allowed, torch.full((4,), -1e9), 8**-0.5)
    torch.testing.assert_close(no_sink, plain, atol=1e-5, rtol=1e-5)
    sinks = torch.tensor([0.0, 1.0, -1.0, 2.0])
    got = sink_attention(q, k, v, allowed, sinks, 8**-0.5)
    # with the sink in the denominator, each row is the plain output times sum(exp(s)) / (sum(exp(s)) + exp(sink))
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8**-0.5
    mass = scores.masked_fill(~allowed, float("-inf")).exp().sum(-1, keepdim=True)
    torch.testing.assert_close(got, plain * mass / (mass + sinks.exp()[None, :, None, None]), atol=1e-5, rtol=1e-5)


def test_sliding_layer_sees_only_its_window():
    torch.manual_seed(1)
    cfg = _cfg()
    attn = Attention(cfg, 0)
    assert attn.window == 3 and Attention(cfg, 1).window is None
    x = torch.randn(1, 8, 32)
    cos, sin = torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    y = attn(x, cos, sin, None, True, None, 0, 8)
    x2 = x.clone()
    x2[0, 0] += 5.0  # token 0 is outside the window of queries 3..7
    y2 = attn(x2, cos, sin, None, True, None, 0, 8)
    torch.testing.assert_close(y2[0, 3:], y[0, 3:])
    assert not torch.allclose(y2[0, :3], y[0, :3])


def _dense_moe(moe: GptOssMoE, x: torch.Tensor) -> torch.Tensor:
    """transformers' formula written out: every token through its top-k experts, softmax over the chosen logits."""
    ex = moe.experts
    logits = x @ moe.router.weight.T + moe.router.bias
    top, idx = logits.topk(moe.top_k, dim=-1)
    w = top.softmax(-1)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(moe.top_k):
            e = int(idx[n, j])
            gu = x[n] @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
            gate, up = gu[0::2].clamp(max=7.0), gu[1::2].clamp(-7.0, 7.0)
            h = (up + 1) * gate * torch.sigmoid(1.702 * gate)
            out[n] += w[n, j] * (h @ ex.down_proj[e] + ex.down_proj_bias[e])
    return out


def test_moe_matches_the_formula_and_runs_only_routed_experts():
    torch.manual_seed(2)
    moe = GptOssMoE(_cfg(num_experts=6))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 1.0)  # large enough that the clamps at +-7 bite
    x = torch.randn(7, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _dense_moe(moe, x), atol=1e-4, rtol=1e-4)
        ran: list[int] = []
        run = moe.experts.run
        moe.experts.run = lambda e, rows: (ran.append(e), run(e, rows))[1]
        moe(x[:1])  # one token: exactly its two experts run
        chosen = (moe.router(x[:1])).topk(2).indices[0].tolist()
    assert sorted(ran) == sorted(chosen)


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_frequencies_match_transformers(truncate):
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": truncate,
               "original_max_position_embeddings": 4096}  # fmt: skip
    cfg = GptOssConfig(num_hidden_layers=2, head_dim=64, max_position_embeddings=131072,
                       rope_parameters={**scaling, "rope_theta": 150000.0})  # fmt: skip
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    got, factor = yarn_frequencies(scaling, 150000.0, 64, 131072)
    torch.testing.assert_close(got, want)
    assert factor == pytest.approx(want_factor)


def test_gpt_oss_20b_config_round_trips_both_layouts():
    """gpt-oss-20b's shape (InternVL3.5-GPT-OSS-20B-A4B's LLM) through both config.json writers and readers."""
    from dataclasses import replace

    from internvl.checkpoint.hf import from_hf_dict, to_hf_dict
    from internvl.checkpoint.original import from_original_dict, to_original_dict
    from internvl.config import ModelConfig, ProcessorConfig

    yarn = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 4096}  # fmt: skip
    llm = _cfg(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
               num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_experts=32, num_experts_per_tok=4,
               sliding_window=128, rope_theta=150000.0, rope_scaling=yarn, max_position_embeddings=131072,
               rms_norm_eps=1e-5)  # fmt: skip
    cfg = ModelConfig(llm=llm, processor=ProcessorConfig(template="internvl3_5_gpt_oss"))
    assert len(llm.layer_types) == 24 and llm.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert from_original_dict(to_original_dict(cfg), "x").llm == llm
    assert from_hf_dict(to_hf_dict(cfg, 200021), "x").llm == llm
    assert from_original_dict(to_original_dict(cfg), "x").processor.template == "internvl3_5_gpt_oss"
    no_bias = replace(llm, qkv_bias=False, o_bias=False)
    assert from_original_dict(to_original_dict(replace(cfg, llm=no_bias)), "x").llm.qkv_bias is False


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="layer_types"):
        _cfg(layer_types=["sliding_attention"])
    with pytest.raises(ConfigError, match="layer_types"):
        _cfg(layer_types=["sliding_attention", "local"])
    with pytest.raises(ConfigError, match="sliding_window"):
        _cfg(sliding_window=None)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        _cfg(num_experts_per_tok=5)
    assert _cfg(sliding_window=None, layer_types=["full_attention"] * 2).layer_types == ["full_attention"] * 2


# ---- MXFP4 ---------------------------------------------------------------------------------------


def test_mxfp4_dequantizes_hand_made_blocks():
    blocks = torch.zeros(1, 2, 16, dtype=torch.uint8)  # one row, two blocks of 32 values
    blocks[0, 0, 0] = 0x21  # values 0, 1: low nibble 1 (0.5), high nibble 2 (1.0)
    blocks[0, 0, 15] = 0xF7  # values 30, 31: 7 (6.0), 15 (-6.0)
    blocks[0, 1, 3] = 0x9C  # values 32 + 6, 32 + 7: 12 (-2.0), 9 (-0.5)
    scales = torch.tensor([[127, 129]], dtype=torch.uint8)  # 2**0 and 2**2
    got = dequantize(blocks, scales, torch.float32)
    assert got.shape == (1, 64)
    want = torch.zeros(1, 64)
    want[0, 0], want[0, 1], want[0, 30], want[0, 31] = 0.5, 1.0, 6.0, -6.0
    want[0, 38], want[0, 39] = -2.0 * 4, -0.5 * 4
    assert torch.equal(got, want)
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 16, 16)  # all byte values
    values = dequantize(every, torch.full((1, 16), 126, dtype=torch.uint8), torch.float32).reshape(-1, 2)
    lut = torch.tensor(FP4_VALUES)
    assert torch.equal(values[:, 0], lut[torch.arange(256) % 16] / 2)
    assert torch.equal(values[:, 1], lut[torch.arange(256) // 16] / 2)


def test_mxfp4_matches_transformers_and_loads_into_the_experts(folders, tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 2, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(120, 134, (3, 10, 2), generator=g, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(expert_weight(blocks, scales), convert_moe_packed_tensors(blocks, scales))
    # a checkpoint whose experts are stored as MXFP4: exact fp4 values, so the packed and the plain load agree
    _, _, orig = folders
    tensors = load_file(str(orig / "model.safetensors"))
    model, _ = _load(orig)
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, rows_in, rows_out = tensors[name].shape
        b = torch.randint(0, 256, (e, rows_out, rows_in // 32, 16), generator=g, dtype=torch.int32).to(torch.uint8)
        s = torch.randint(124, 128, (e, rows_out, rows_in // 32), generator=g, dtype=torch.int32).to(torch.uint8)
        del tensors[name]
        tensors[name + "_blocks"], tensors[name + "_scales"] = b, s
        model.get_parameter(name).data = expert_weight(b, s, torch.float32)
    folder = tmp_path / "mxfp4"
    folder.mkdir()
    (folder / "config.json").write_text((orig / "config.json").read_text())
    save_file(tensors, str(folder / "model.safetensors"))
    packed, report = load_model(folder, dtype="fp32", image_token_id=IMAGE_TOKEN_ID)
    assert not report.missing and not report.unexpected
    for name, p in model.state_dict().items():
        assert torch.equal(packed.state_dict()[name], p), name


# ---- chat template -------------------------------------------------------------------------------

SYSTEM = ("You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
          "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every "
          "message.")  # fmt: skip


def test_gpt_oss_template_golden_strings():
    one = render_prompt("internvl3_5_gpt_oss", [("user", "<image>\nWhat is it?"), ("assistant", None)])
    assert one == (f"<|start|>system<|message|>{SYSTEM}<|end|><|start|>user<|message|><image>\nWhat is it?<|end|>"
                   "<|start|>assistant")  # fmt: skip
    turns = [("user", "a"), ("assistant", "<|channel|>final<|message|>b"), ("user", "c"),
             ("assistant", "<|channel|>final<|message|>d")]  # fmt: skip
    # MPT_TWO: <|end|> after every block, <|return|> only after a final assistant message
    assert render_prompt("internvl3_5_gpt_oss", turns, "S") == (
        "<|start|>system<|message|>S<|end|><|start|>user<|message|>a<|end|>"
        "<|start|>assistant<|channel|>final<|message|>b<|end|><|start|>user<|message|>c<|end|>"
        "<|start|>assistant<|channel|>final<|message|>d<|return|>"
    )
    assert stop_strings("internvl3_5_gpt_oss") == ["<|return|>"]  # <|end|> also closes an analysis message
    assert stop_strings("internvl2_5") == ["<|im_end|>"]


HARMONY_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>",
                    "<|return|>")  # fmt: skip


def test_harmony_style_tokenizer_adds_no_bos(tmp_path):
    """GPT-OSS's o200k_harmony tokenizer defines <|startoftext|> but its ByteLevel post-processor adds nothing:
    prompt ids start at <|start|>, as transformers' tokenizer(query) gives, and the trainer adds no BOS."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors
    from transformers import AutoTokenizer

    from internvl.tokenizer import Tokenizer, train_bpe_tokenizer

    train_bpe_tokenizer(["What is in the image? A red circle and 2 blue squares."] * 40, tmp_path, vocab_size=300)
    tok = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.add_special_tokens(list(HARMONY_SPECIALS))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|startoftext|>", eos_token="<|return|>",
                  pad_token="<|endoftext|>")  # fmt: skip
    config["added_tokens_decoder"] = {str(i): {"content": t.content, "special": True, "normalized": False}
                                      for i, t in tok.get_added_tokens_decoder().items()}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    prompt = render_prompt("internvl3_5_gpt_oss", [("user", "<img><IMG_CONTEXT></img>\nWhat is in the image?"),
                                                   ("assistant", None)])  # fmt: skip
    ours, ref = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    ids = ours.encode(prompt)
    assert ids == ref(prompt).input_ids and ids[0] == ours.require("<|start|>") and ours.bos_id is None
    tail = ours.encode("assistant", add_special_tokens=False)
    assert ids[-len(tail) - 1 :] == [ours.require("<|start|>"), *tail]  # the prompt ends open at <|start|>assistant
    assert ours.require("<|startoftext|>") not in ids


# ---- the C decode step ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_accelerated_decode_declines_the_c_step_for_gpt_oss(mode):
    """Sinks, windows and experts are not in decode.c: the engine keeps the model's own decode, whose logits
    match the unaccelerated model's."""
    import copy

    from internvl.engine.accelerate import FusedStep, decode_step, quantize_model, use_decode_kernels

    torch.manual_seed(0)
    lm = CausalLM(_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    lm = lm.to(torch.bfloat16).eval()
    fast = copy.deepcopy(lm)
    (quantize_model if mode == "int8" else use_decode_kernels)(SimpleNamespace(language_model=fast))
    step = decode_step(SimpleNamespace(language_model=fast, decode=fast.decode))
    assert not isinstance(step, FusedStep)
    if mode == "int8":  # routing is never rounded to int8
        assert type(fast.model.layers[0].mlp.router) is torch.nn.Linear
    with torch.no_grad():
        caches = [m.new_cache(1) for m in (lm, fast)]
        for m, c in zip((lm, fast), caches):
            m(m.embed(torch.tensor([[1, 2, 3, 4, 5]])), cache=c)
        want, got = lm.decode(torch.tensor([6]), caches[0]).float(), step(torch.tensor([6]), caches[1]).float()
    tol = 0.1 if mode == "int8" else 0.05
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
