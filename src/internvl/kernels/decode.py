"""The one-call decode step (step.c, with decode.c or decode_avx2.c) for a fused language model whose linears are the kernel modules.

`FusedDecoder.build(lm)` checks once that every layer can run in C (bf16 activations and norms, CPU
weights, FastBf16Linear, Int8Linear or Int4Linear projections, no hooks) and records the weight pointers; calling
it then decodes one token per cache row with a single ctypes call, or returns None for the caller's
own path (more rows than the kernels take, autograd, another dtype, hooks added later). It belongs to
whoever chose it (engine/accelerate.py): the model knows nothing of it.
"""

from __future__ import annotations

import ctypes
import struct
import threading

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import build
from .modules import FastBf16Linear, Int4Linear, Int8Linear
from .ops import _OP_BF16, MAX_ROWS, QK4, bias_args

_I64 = ctypes.c_int64


class _Lin(ctypes.Structure):
    _fields_ = [(name, _I64) for name in ("w", "scale", "bias", "bias_dt", "op", "n", "k")]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", _I64), ("ln2", _I64), ("qkv", _Lin), ("o", _Lin), ("gate_up", _Lin), ("down", _Lin)]


_PER_CALL = ("batch", "capacity", "threads", "x", "lengths", "inv_freq", "k_cache", "v_cache", "logits",
             "advance")
_PACK = struct.Struct(f"{len(_PER_CALL)}q")  # the per-call fields, written in one go


class _Step(ctypes.Structure):
    _fields_ = [(name, _I64) for name in _PER_CALL]
    _fields_ += [(name, _I64) for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "inter")]
    _fields_ += [("eps", ctypes.c_double), ("pos_div", ctypes.c_double)]
    _fields_ += [("layer_table", _I64), ("norm", _I64), ("head", _Lin)]


def _lin(module: nn.Module, keep: list) -> _Lin | None:
    """The C description of a kernel linear layer (CPU, contiguous), None for anything else."""
    bufs = module._buffers
    if isinstance(module, FastBf16Linear):
        w, scale, op = bufs["weight"], None, _OP_BF16
    elif isinstance(module, Int4Linear):
        w, scale, op = bufs["qweight"], bufs["scale"], module._op
        if not (scale.is_cpu and scale.is_contiguous() and scale.dtype == torch.float16
                and module.in_features % QK4 == 0):
            return None
    elif isinstance(module, Int8Linear):
        w, scale, op = bufs["qweight"], bufs["scale"], module._op
        if not (scale.is_cpu and scale.is_contiguous() and scale.dtype == torch.float32):
            return None
    else:
        return None
    if not (w.is_cpu and w.is_contiguous() and w.dim() == 2):
        return None
    b = bias_args(bufs["bias"])
    if b is None:
        return None
    keep += [t for t in (w, scale, bufs["bias"]) if t is not None]
    scale_ptr = 0 if scale is None else scale.data_ptr()
    return _Lin(w.data_ptr(), scale_ptr, b[0], b[1], op, module.out_features, module.in_features)


def _norm(norm: nn.Module, hidden: int, keep: list) -> int | None:
    w = getattr(norm, "weight", None)
    if type(norm).__name__ != "RMSNorm" or w is None or w.dtype != torch.bfloat16 or not w.is_cpu or \
            w.shape != (hidden,) or not w.is_contiguous():
        return None
    keep.append(w)
    return w.data_ptr()


_PLAIN = {"": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"},
          "self_attn": {"qkv_proj", "o_proj"}, "mlp": {"gate_up_proj", "down_proj"}}  # fmt: skip


def _plain(layer: nn.Module) -> bool:
    """Whether a decoder layer is exactly what decode.c computes: fused attention and SwiGLU, nothing more
    (no q/k norms, no experts, no attention sinks, no parameters of their own)."""
    for path, children in _PLAIN.items():
        m = layer.get_submodule(path) if path else layer
        if set(m._modules) != children or m._parameters:
            return False
    return True


def _hook_dicts(modules: list[nn.Module]) -> list[dict]:
    """The dicts that hooks registered on `modules` (or on every module) would land in."""
    dicts = [_module._global_forward_hooks, _module._global_forward_pre_hooks]
    return dicts + [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]


def cache_pointers(cache) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Addresses of every layer's key and value tensors of a KVCache (int64 [layers] each), for the C step
    that writes them in place; None unless every one is a contiguous [batch, heads, capacity, dim]."""
    tensors = cache.k + cache.v
    shape = tensors[0].shape if tensors else None
    if not all(t.is_contiguous() and t.shape == shape for t in tensors):
        return None
    return (torch.tensor([t.data_ptr() for t in cache.k], dtype=torch.int64),
            torch.tensor([t.data_ptr() for t in cache.v], dtype=torch.int64))


class FusedDecoder:
    """Decodes one token per row of a KV cache through `ivl_decode_step`; see the module docstring.

    When the model's tensors were replaced since it was bound (`.to()`, `.float()`, new layers), the next
    call binds it again, to the new tensors or to nothing."""

    def __init__(self, lm):
        self.lm = lm
        self.bound = False
        self._head: tuple = (None, None, None)  # the head module, its weight's key and tensor when bound
        self._memo: tuple = ([], None)  # (addresses of the last cache's tensors, cache_pointers() of them)

    @classmethod
    def build(cls, lm) -> FusedDecoder | None:
        """The decoder for `lm` (a CausalLM), or None when some part of it cannot run in C."""
        dec = cls(lm)
        return dec if dec._bind() else None

    def _current(self) -> bool:
        """Whether the tensors bound are still the model's (its head stands for the rest: replacing
        the model's tensors replaces the head's too)."""
        head = self.lm._modules.get("lm_head")
        return head is self._head[0] and head._buffers.get(self._head[1]) is self._head[2]

    def _bind(self) -> bool:
        lm, lib = self.lm, build.load()
        self.bound = False
        head_mod = lm._modules.get("lm_head")
        key = "qweight" if isinstance(head_mod, (Int8Linear, Int4Linear)) else "weight"
        self._head = (head_mod, key, head_mod._buffers.get(key) if head_mod is not None else None)
        # (Rotary knows no other RoPE kinds today; a new one must be taught to decode.c first)
        if lib is None or not lm.fused or lm.rotary.kind not in ("default", "linear", "dynamic"):
            return False
        cfg, emb = lm.config, lm.model.embed_tokens.weight
        if emb.dtype != torch.bfloat16 or not emb.is_cpu:
            return False
        h, keep = cfg.hidden_size, []  # `keep`: the tensors whose addresses the tables hold
        layers = (_Layer * len(lm.model.layers))()
        modules: list[nn.Module] = [lm, lm.model, lm.model.norm, lm.lm_head]
        for i, layer in enumerate(lm.model.layers):
            if not _plain(layer):
                return False
            attn, mlp = layer.self_attn, layer.mlp
            parts = [_lin(m, keep) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            norms = [_norm(n, h, keep) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
            if any(p is None for p in parts + norms):
                return False
            layers[i] = _Layer(*norms, *parts)
            modules += [layer, attn, mlp, layer.input_layernorm, layer.post_attention_layernorm,
                        attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        head, norm = _lin(lm.lm_head, keep), _norm(lm.model.norm, h, keep)
        hooks = _hook_dicts(modules)
        if head is None or norm is None or any(hooks):
            return False
        self.template = _Step(batch=0, hidden=h, layers=len(layers), heads=cfg.num_attention_heads,
                              kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                              inter=cfg.intermediate_size, eps=cfg.rms_norm_eps,
                              layer_table=ctypes.addressof(layers), norm=norm, head=head,
                              pos_div=lm.rotary.factor if lm.rotary.kind == "linear" else 1.0)
        self.lib, self.layers, self.keep, self.hooks, self.rotary = lib, layers, keep, hooks, lm.rotary
        self.vocab, self._memo = head.n, ([], None)
        # the RoPE frequencies depend on the length only with dynamic scaling
        self.inv_freq = None if lm.rotary.kind == "dynamic" else lm.rotary.inv_freq(0, emb.device)
        self._tls = threading.local()  # one parameter block per calling thread (ctypes drops the GIL)
        self.bound = True
        return True

    def __call__(self, embeds: torch.Tensor, cache, valid_lengths: torch.Tensor | None = None):
        """Logits [B, 1, vocab] for embeds [B, 1, hidden] appended to `cache`, whose row lengths then
        advance by `valid_lengths` (default 1 each, as CausalLM.forward); None (nothing done) when this
        input needs the module path.

        This runs once per token right after a gigabyte of weights went through the caches, so every
        Python object it touches is a cache miss: it touches few (the cache checks are remembered per
        set of cache addresses, the per-call fields are packed in one go)."""
        if not self._current():
            self._bind()
        if not self.bound:
            return None
        b = embeds.shape[0]
        if (embeds.dtype != torch.bfloat16 or embeds.shape[1] != 1 or embeds.dim() != 3 or not embeds.is_cpu
                or not 0 < b <= MAX_ROWS or torch.is_grad_enabled() or any(self.hooks)):
            return None
        if getattr(cache, "offsets", None) is not None:  # V2PE positions: the module path computes them
            return None
        lengths = cache.lengths
        kv_len = max(lengths.tolist()) + 1
        cache.reserve(kv_len)
        seen, (known, ptrs) = [t.data_ptr() for t in cache.k + cache.v], self._memo
        if seen != known:  # a new cache, or its tensors changed (grown, rows kept or joined)
            ptrs = cache_pointers(cache)
            if (ptrs is None or cache.dtype != torch.bfloat16 or cache.device.type != "cpu"
                    or cache.num_layers != self.template.layers):
                return None
            self._memo = (seen, ptrs)  # one assignment: a thread never sees a half-updated pair
        if cache.batch != b or lengths.dtype != torch.int64 or not lengths.is_contiguous():
            return None
        advance = 0
        if valid_lengths is not None:
            if valid_lengths.dtype != torch.int64 or not valid_lengths.is_cpu or valid_lengths.shape != (b,):
                return None
            valid_lengths = valid_lengths.contiguous()
            advance = valid_lengths.data_ptr()
        x = embeds if embeds.is_contiguous() else embeds.contiguous()
        inv_freq = self.inv_freq
        if inv_freq is None:
            inv_freq = self.rotary.inv_freq(kv_len, embeds.device)
        logits = torch.empty(b, 1, self.vocab, dtype=torch.bfloat16)
        desc = getattr(self._tls, "desc", None)
        if desc is None:
            d = _Step.from_buffer_copy(self.template)
            desc = self._tls.desc = (d, ctypes.addressof(d))
        _PACK.pack_into(desc[0], 0, b, cache.capacity, torch.get_num_threads(), x.data_ptr(),
                        lengths.data_ptr(), inv_freq.data_ptr(), ptrs[0].data_ptr(), ptrs[1].data_ptr(),
                        logits.data_ptr(), advance)
        if self.lib.ivl_decode_step(desc[1]) != 0:
            return None
        return logits
