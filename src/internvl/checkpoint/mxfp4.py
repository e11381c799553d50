"""MXFP4 expert weights (GPT-OSS's released format), dequantized at load: every 32 values along a row are a block
of FP4 (e2m1) codes, two per byte (low nibble first), sharing one e8m0 scale (a power of two, bias 127).
"""

from __future__ import annotations

import re

import torch

from .common import Entry

# the 16 e2m1 codes: sign bit, 2 exponent bits, 1 mantissa bit
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8 and scales [..., G] uint8 -> values [..., G * 32] in `dtype`. Exact: each
    value is an FP4 code times 2**(scale - 127)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise RuntimeError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair up "
                         f"(blocks [..., G, {BLOCK // 2}], scales [..., G])")  # fmt: skip
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = blocks.to(torch.uint8)
    values = torch.stack([lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]], dim=-1)  # low nibble first
    values = values.reshape(*blocks.shape[:-1], BLOCK)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.reshape(*blocks.shape[:-2], -1).to(dtype)


def expert_weight(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A stacked expert projection: stored [E, out, in] (blocks along `in`), used as [E, in, out]."""
    return dequantize(blocks, scales, dtype).transpose(1, 2).contiguous()


def packed_entries(entries: list[Entry], keys: set[str]) -> list[Entry]:
    """`entries` with each expert projection that the checkpoint holds only as `*_blocks` + `*_scales` read
    from those (dequantized to bf16). Such entries are `packed`: their sizes are checked after conversion."""
    out = []
    for e in entries:
        ext = e.external[0] if len(e.external) == 1 else ""
        pair = [ext + "_blocks", ext + "_scales"]
        if _EXPERTS.search(ext) and ext not in keys and all(k in keys for k in pair):
            e = Entry(e.internal, pair, lambda ts: [expert_weight(*ts)], _no_writer, packed=True)
        out.append(e)
    return out


def _no_writer(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    raise NotImplementedError("MXFP4 weights are dequantized at load; models are saved unquantized")
