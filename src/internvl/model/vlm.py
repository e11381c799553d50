"""InternVL chat model: InternViT -> pixel shuffle -> mlp1 -> image embeddings written at <IMG_CONTEXT>."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import PromptError
from .cache import KVCache
from .llm import CausalLM
from .projector import Projector, merge_and_project
from .v2pe import image_step, plain_rope, prompt_positions, sample_positions
from .vir import CrossAttentionPooling, Gating, Mlp2, route, token_counts, vir_embeddings
from .vit import InternVisionModel


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class InternVLChatModel(nn.Module):
    """Top-level module; children are named as in the original checkpoints."""

    def __init__(self, config: ModelConfig, image_token_id: int | None = None):
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision, config.image_size)
        self.mlp1 = Projector(config.vision.hidden_size, config.llm.hidden_size, config.projector)
        self.language_model = CausalLM(config.llm)
        self.image_token_id = image_token_id
        if config.flash_mode:  # InternVL3.5-Flash's router and 64-token projector (model/vir.py)
            c = config.vision.hidden_size
            self.mlp2 = Mlp2(c, config.llm.hidden_size, config.projector.downsample_ratio)
            self.pooling_before_gating = CrossAttentionPooling(c)
            self.gating = Gating(c)
        self.vir: int | None = None  # Flash: None routes each tile; 256 or 64 forces every tile's tokens

    # the token embedding is never swapped for a quantized layer, so it tells the model's dtype and device
    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    @property
    def num_image_token(self) -> int:
        return self.config.num_image_token

    def extract_feature(self, pixel_values: torch.Tensor, routed: bool = True) -> torch.Tensor:
        """Tiles [N, 3, S, S] -> image embeddings [N, num_image_token, H]; with Flash [1, sum(tile_tokens), H]
        (`routed` False: the plain path, as the original Flash model's forward(), which training uses)."""
        flash = self.config.flash_mode and routed
        vit = self.vision_model(pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype),
                                select_layer=-1 if flash else self.config.select_layer)  # fmt: skip
        if flash:
            return vir_embeddings(self, vit, self.vir).unsqueeze(0)
        return merge_and_project(vit, self.mlp1, self.config.projector)

    def tile_tokens(self, pixel_values: torch.Tensor) -> list[int]:
        """Tokens each tile gives: num_image_token, or with Flash the router's choice (model/vir.py)."""
        if not self.config.flash_mode:
            return [self.num_image_token] * pixel_values.shape[0]
        with torch.no_grad():
            w = self.vision_model.embeddings.patch_embedding.weight
            vit = self.vision_model(pixel_values.to(device=w.device, dtype=w.dtype))
            return token_counts(self.config, route(self, vit, self.vir))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image embeddings written over the <IMG_CONTEXT> positions, in order."""
        emb = self.language_model.embed(input_ids)
        if pixel_values is None and image_embeds is None:
            return emb
        if image_embeds is None:
            image_embeds = self.extract_feature(pixel_values, routed=image_flags is None)  # training: unrouted
        keep = image_embeds
        if image_flags is not None:
            keep = image_embeds[image_flags.view(-1) == 1]
            # dropped (dummy) tiles still join the graph, so every parameter gets a gradient on every rank
            emb = emb + 0.0 * image_embeds.sum()
        if self.image_token_id is None:
            raise PromptError("the model has no image token id: load it with its tokenizer")
        sel = input_ids == self.image_token_id
        n_tokens, n_feats = int(sel.sum()), keep.shape[0] * keep.shape[1]
        if n_tokens != n_feats:
            raise PromptError(
                f"the prompt has {n_tokens} <IMG_CONTEXT> tokens but the images give {n_feats} embeddings "
                f"({keep.shape[0]} tiles x {keep.shape[1]}); each <image> must expand to {self.num_image_token} "
                "tokens per tile"
            )
        return emb.masked_scatter(sel.unsqueeze(-1), keep.to(emb.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid_lengths: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        image_embeds: torch.Tensor | None = None,
    ) -> ModelOutput:
        emb = self.embed(input_ids, pixel_values, image_flags, image_embeds)
        logits = self.language_model(emb, cache=cache, valid_lengths=valid_lengths,
                                     seq_ids=seq_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                                     **self.lm_inputs(input_ids, positions, cache, valid_lengths))  # fmt: skip
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return ModelOutput(logits=logits, loss=loss)

    def lm_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None,
                  valid_lengths: torch.Tensor | None) -> dict:  # fmt: skip
        """The language model's inputs besides the embeddings: the positions, V2PE's fractional ones where the
        config turns it on (model/v2pe.py): for a prompt (they also shift the cache's later positions), or
        renumbering the integer positions of training rows sample by sample."""
        if image_step(self.config) is not None:
            plain_rope(self.language_model)
            if positions is None:
                positions = prompt_positions(self.config, input_ids, self.image_token_id, cache, valid_lengths)
            elif cache is None and not positions.is_floating_point():  # training rows: per packed sample
                positions = sample_positions(self.config, input_ids, self.image_token_id, positions, self.training)
        if self.language_model.efficiency is not None and self.image_token_id is not None:  # model/prune.py
            return {"positions": positions, "visual_mask": input_ids == self.image_token_id}
        return {"positions": positions}

    # ---- generation: a prompt into a KV cache, then one token per row at a time ----

    def new_cache(self, batch: int, capacity: int = 256) -> KVCache:
        return self.language_model.new_cache(batch, capacity=capacity)

    def prefill(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, cache: KVCache,
                valid_lengths: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:  # fmt: skip
        """Logits [B, T or logits_to_keep, vocab] of prompts [B, T] (right-padded, `valid_lengths` real
        tokens per row) appended to `cache`, with the images' embeddings at their <IMG_CONTEXT> tokens."""
        return self(input_ids, pixel_values=pixel_values, cache=cache, valid_lengths=valid_lengths,
                    logits_to_keep=logits_to_keep).logits  # fmt: skip

    def decode(self, tokens: torch.Tensor, cache: KVCache, valid_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab] of one new token per cache row (`tokens` [B]); rows with valid_lengths 0 do
        not advance."""
        return self.language_model.decode(tokens, cache, valid_lengths)

    def decoder_version(self) -> tuple:
        """Changes whenever the language model's tensors are replaced or changed in place: what keys and
        values computed earlier (a prefix cache) depend on."""
        return tuple((t.data_ptr(), t._version if not t.is_inference() else 0)
                     for t in self.language_model.state_dict(keep_vars=True).values())

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.vision_model.encoder.gradient_checkpointing = enabled
        self.language_model.gradient_checkpointing = enabled
