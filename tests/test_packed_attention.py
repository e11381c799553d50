"""Packed rows attend per sample: the same logits and gradients as each sample run alone (no packing)."""

import pytest
import torch

from internvl.config import LLMConfig
from internvl.model import llm as llm_module
from internvl.model.llm import CausalLM, Spans, init_weights


@pytest.fixture
def lm():
    torch.manual_seed(0)
    cfg = LLMConfig(family="qwen2", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = CausalLM(cfg)
    init_weights(model, std=0.2)
    return model.eval()


def test_spans_follow_the_sequence_ids():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert Spans(ids).spans == [(0, 0, 3), (0, 3, 5), (0, 5, 6), (1, 0, 1), (1, 1, 6)]


@pytest.mark.parametrize("mode", ["spans", "mask"])
def test_packed_row_matches_each_sample_alone(lm, mode, monkeypatch):
    monkeypatch.setattr(llm_module, "PACKED_ATTENTION", mode)
    lengths = [5, 3, 7]
    samples = [torch.randint(0, 50, (n,)) for n in lengths]
    embed = lm.model.embed_tokens
    alone = [lm(embed(s)[None])[0] for s in samples]
    ids = torch.cat(samples)[None]
    seq_ids = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = lm(embed(ids), positions=positions, seq_ids=seq_ids)[0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_spans_and_mask_give_the_same_gradients(lm, monkeypatch):
    lengths = [4, 6, 2]
    ids = torch.randint(0, 50, (1, sum(lengths)))
    seq_ids = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    grads = {}
    for mode in ("spans", "mask"):
        monkeypatch.setattr(llm_module, "PACKED_ATTENTION", mode)
        lm.zero_grad()
        lm(lm.model.embed_tokens(ids), positions=positions, seq_ids=seq_ids).square().mean().backward()
        grads[mode] = [p.grad.clone() for p in lm.parameters()]
    for a, b in zip(grads["spans"], grads["mask"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
