"""Optional AVX-512/AMX weight-streaming kernels for CPU decoding: bf16 and weight-only int8 linear layers
(`modules`, `ops`, gemv.c), a whole decoding step in one call (`decode`, decode.c), and huge pages under
the streamed weights (`memory`).

Everything here falls back to plain torch when the kernels cannot be built or run; see `available()`.
Set INTERNVL_NO_KERNELS=1 (before first use) to force the torch path.
"""

from .decode import FusedDecoder
from .modules import FastBf16Linear, Int8Linear
from .ops import (
    MAX_ROWS,
    argmax_rows,
    available,
    dequantize_int8,
    linear_bf16,
    linear_int8,
    quantize_int8,
    read_pass,
    unavailable_reason,
)

__all__ = [
    "MAX_ROWS",
    "FastBf16Linear",
    "FusedDecoder",
    "Int8Linear",
    "argmax_rows",
    "available",
    "dequantize_int8",
    "linear_bf16",
    "linear_int8",
    "quantize_int8",
    "read_pass",
    "unavailable_reason",
]
