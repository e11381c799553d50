"""Mono-InternVL (arXiv 2410.08202): a monolithic model. The vision side is InternViT's patch embedding alone
(`intern_vit_patch`: no encoder layers), and the InternLM2 decoder (`InternLM2VEForCausalLM`) has a second,
visual-expert feed-forward per layer (`feed_forward_ve`), which image tokens take in the prompt; attention and
norms are shared. Generated tokens are text (the text feed-forward). Mono-InternVL-1.5 (visual attention
experts) has no released weights or code, so it is not supported.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig, VisionConfig
from .cache import KVCache
from .llm import MLP, CausalLM, DecoderLayer
from .projector import Projector
from .vit import VisionEmbeddings
from .vlm import InternVLChatModel


class PatchVisionModel(nn.Module):
    """`vision_model` of Mono-InternVL: `embeddings.{class_embedding,patch_embedding,position_embedding}` only;
    its output keeps the CLS token first, which the projector drops, as after InternViT. The encoder is empty
    (no tensors), so the trainer's per-layer freezing and sharding find zero vision layers."""

    def __init__(self, cfg: VisionConfig, image_size: int):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg, image_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList()
        self.encoder.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        return self.embeddings(pixel_values)


class VEDecoderLayer(DecoderLayer):
    """An InternLM2 layer with a visual expert: FFN(x)(1 - m) + FFN_ve(x) m for the image-token mask m, as the
    official layer computes it (both on every token); no mask (decoding) is all text."""

    def __init__(self, cfg, layer: int = 0):
        super().__init__(cfg, layer)
        self.mlp_ve = MLP(cfg)
        self.visual_mask: torch.Tensor | None = None  # [B, T], set by VECausalLM for each forward

    def forward(self, x, *attn_args):
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        h = self.post_attention_layernorm(x)
        if self.visual_mask is None:
            return x + self.mlp(h)
        m = self.visual_mask[..., None].to(h.dtype)
        return x + (self.mlp(h) * (1 - m) + self.mlp_ve(h) * m)


class VECausalLM(CausalLM):
    """InternLM2VEForCausalLM: CausalLM whose layers carry visual experts, routed by `visual_mask`."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model.layers = nn.ModuleList(VEDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))

    def fuse_projections(self) -> None:
        if not self.fused:
            super().fuse_projections()
            for layer in self.model.layers:
                layer.mlp_ve.fuse()

    def forward(
        self, embeds: torch.Tensor, *args, visual_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """CausalLM.forward; `visual_mask` [B, T] (1 = image token) routes the feed-forwards. It stays on the
        layers until the next call, so a checkpointed layer recomputed in backward sees the same mask."""
        mask = visual_mask if visual_mask is not None and bool(visual_mask.any()) else None
        for layer in self.model.layers:
            layer.visual_mask = mask
        return super().forward(embeds, *args, **kwargs)


class MonoInternVLChatModel(InternVLChatModel):
    """Mono-InternVL-2B's `InternVLChatModel`: patch embedding -> pixel shuffle -> mlp1, and InternLM2-VE."""

    def __init__(self, config: ModelConfig, image_token_id: int | None = None):
        nn.Module.__init__(self)
        self.config = config
        self.vision_model = PatchVisionModel(config.vision, config.image_size)
        self.mlp1 = Projector(config.vision.hidden_size, config.llm.hidden_size, config.projector)
        self.language_model = VECausalLM(config.llm)
        self.image_token_id = image_token_id

    def lm_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None,
                  valid_lengths: torch.Tensor | None) -> dict:  # fmt: skip
        out = super().lm_inputs(input_ids, positions, cache, valid_lengths)
        if self.image_token_id is not None:
            out["visual_mask"] = input_ids == self.image_token_id
        return out


def is_mono(config: ModelConfig) -> bool:
    """Whether `config` describes Mono-InternVL (its decoder has visual experts)."""
    return config.llm.visual_experts


def model_class(config: ModelConfig) -> type[InternVLChatModel]:
    return MonoInternVLChatModel if is_mono(config) else InternVLChatModel
