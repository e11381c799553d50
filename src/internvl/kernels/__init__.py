"""Optional weight-streaming kernels for CPU decoding (AVX-512/AMX, or AVX2): bf16, weight-only int8 and
group-wise int4 linear layers (`modules`, `ops`, gemv.c, int4_q8.c, gemv_avx2.c, team.c, quant.c), a whole decoding step in
one call on either (`decode`, step.c with decode.c or decode_avx2.c), and huge pages under the streamed weights
(`memory`).

Everything here falls back to plain torch when the kernels cannot be built or run; see `available()` and
`describe()`. INTERNVL_KERNELS=avx512|avx2|torch (before first use) forces a variant; INTERNVL_NO_KERNELS=1 torch.
INTERNVL_INT4_ACTIVATIONS=fp32 makes new int4 layers multiply x unrounded instead of as int8 (the default).
"""

from .decode import FusedDecoder
from .modules import FastBf16Linear, Int4Linear, Int8Linear
from .ops import (
    MAX_ROWS,
    argmax_rows,
    available,
    dequantize_int4,
    dequantize_int8,
    describe,
    linear_bf16,
    linear_int4,
    linear_int8,
    quantize_int4,
    quantize_int8,
    read_pass,
    unavailable_reason,
)

__all__ = [
    "MAX_ROWS",
    "FastBf16Linear",
    "FusedDecoder",
    "Int4Linear",
    "Int8Linear",
    "argmax_rows",
    "available",
    "dequantize_int4",
    "dequantize_int8",
    "describe",
    "linear_bf16",
    "linear_int4",
    "linear_int8",
    "quantize_int4",
    "quantize_int8",
    "read_pass",
    "unavailable_reason",
]
