"""Compile the C kernels with the system C compiler at first use, cache the shared library, load it with ctypes.

Two variants, each with the GEMVs and the one-call decode step: "avx512" (gemv.c, int4_q8.c, decode.c; AVX-512 VNNI, AMX
where present) and "avx2" (gemv_avx2.c, decode_avx2.c; AVX2 + FMA + F16C); both compile the common team.c
(threads), step.c (the decode step) and quant.c. The first the CPU supports is chosen once;
INTERNVL_KERNELS=avx512|avx2|torch forces one (INTERNVL_NO_KERNELS=1 means torch). Every failure leaves `load()`
returning None with the reason in `load_error()`; callers then keep the plain torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
ABI_VERSION = 10
ENV = "INTERNVL_KERNELS"
COMMON_CFLAGS = ("-O3", "-std=gnu11", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
# AMX is optional: compiled in when the compiler knows it, used when the CPU and the kernel allow it.
AMX_CFLAGS = ("-mamx-tile", "-mamx-bf16", "-mamx-int8", "-DIVL_AMX")


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: its sources, ISA flags (explicit rather than -march=native, so a cached
    library stays valid on any CPU that passes the feature check) and the /proc/cpuinfo flags it needs."""

    name: str
    sources: tuple[str, ...]
    cflags: tuple[str, ...]
    cpu_flags: tuple[str, ...]
    optional_cflags: tuple[str, ...] = ()


COMMON_SOURCES = ("team.c", "step.c", "quant.c")
VARIANTS = {
    "avx512": Variant("avx512", ("gemv.c", "int4_q8.c", "decode.c", *COMMON_SOURCES),
                      ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mbmi2",
                       "-mf16c"),
                      ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"), AMX_CFLAGS),
    "avx2": Variant("avx2", ("gemv_avx2.c", "decode_avx2.c", *COMMON_SOURCES), ("-mavx2", "-mfma", "-mf16c"),
                    ("avx2", "fma", "f16c")),
}
HEADERS = ("gemv.h", "job.h", "quant.h", "step.h", "step_ops.h")  # every header a source includes: shipped with them, part of the cache key
KERNEL_FILES = tuple(sorted({s for v in VARIANTS.values() for s in v.sources} | set(HEADERS)))

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_variant: Variant | None = None
_error: str | None = None
_tried = False


def cache_dir() -> Path:
    """$INTERNVL_CACHE/kernels, else $XDG_CACHE_HOME/internvl/kernels, else ~/.cache/internvl/kernels."""
    root = os.environ.get("INTERNVL_CACHE")
    if root:
        return Path(root).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "internvl" / "kernels"


def disabled_by_env() -> bool:
    return os.environ.get("INTERNVL_NO_KERNELS", "").strip().lower() not in ("", "0", "false", "no")


def cpu_flags() -> tuple[set[str] | None, str]:
    """The CPU's feature flags from /proc/cpuinfo, or None and why they cannot be known."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"kernels need Linux on x86-64, this is {platform.system()} {platform.machine()}"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as e:
        return None, f"cannot read /proc/cpuinfo: {e}"
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split()), ""
    return set(), ""


def choose() -> Variant:
    """The variant to run: INTERNVL_KERNELS when set, else the fastest the CPU supports; raises with the reason
    when there is none (also for INTERNVL_KERNELS=torch or INTERNVL_NO_KERNELS=1)."""
    want = os.environ.get(ENV, "").strip().lower()
    if disabled_by_env() or want == "torch":
        raise RuntimeError(f"disabled by {'INTERNVL_NO_KERNELS' if disabled_by_env() else ENV + '=torch'}")
    if want not in ("", "auto", *VARIANTS):
        raise RuntimeError(f"{ENV}={want!r}: expected one of auto, {', '.join(VARIANTS)}, torch")
    flags, why = cpu_flags()
    if flags is None:
        raise RuntimeError(why)
    missing = {}
    for v in VARIANTS.values():
        if want in ("", "auto") or want == v.name:
            missing[v.name] = [f for f in v.cpu_flags if f not in flags]
            if not missing[v.name]:
                return v
    raise RuntimeError("; ".join(f"{name}: CPU lacks {', '.join(m)}" for name, m in missing.items()))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _torch_gomp() -> Path | None:
    """torch's bundled libgomp: linking it keeps one OpenMP runtime (and one thread team) per process."""
    import torch

    lib = Path(torch.__file__).parent / "lib"
    for cand in sorted(lib.glob("libgomp*.so*")):
        return cand
    return None


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.splitlines()[0] if out.stdout else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def library_path(variant: Variant, cc: str, gomp: Path | None) -> Path:
    key = hashlib.sha256()
    files = [HERE / f for f in (*variant.sources, *HEADERS)]
    flags = " ".join((*COMMON_CFLAGS, *variant.cflags, *variant.optional_cflags))
    for part in (*(p.read_bytes() for p in files), flags.encode(), _compiler_id(cc).encode(), str(gomp).encode(),
                 str(ABI_VERSION).encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"gemv-{variant.name}-{key.hexdigest()[:16]}.so"


def compile_objects(variant: Variant, cc: str, src_dir: Path, prefix: str) -> list[str]:
    """gcc -c every source of `variant` found in src_dir into `prefix`.<stem>.o (with the optional flags when the
    compiler takes them); the object paths. Raises RuntimeError with the compiler's message."""
    objs = []
    for src in variant.sources:
        obj = f"{prefix}.{Path(src).stem}.o"
        base = [cc, *COMMON_CFLAGS, *variant.cflags]
        try:
            _run([*base, *variant.optional_cflags, "-c", str(src_dir / src), "-o", obj])
        except RuntimeError:  # e.g. a compiler without AMX intrinsics: the variant without them
            if not variant.optional_cflags:
                raise
            _run([*base, "-c", str(src_dir / src), "-o", obj])
        objs.append(obj)
    return objs


def build(variant: Variant, cc: str, gomp: Path | None, out: Path) -> None:
    """Compile into a temporary file next to `out`, then rename: concurrent builders never see half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_so = tempfile.mkstemp(prefix=out.stem + ".", suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    prefix = tmp_so[:-len(".so.tmp")]
    objs = [f"{prefix}.{Path(s).stem}.o" for s in variant.sources]
    try:
        compile_objects(variant, cc, HERE, prefix)
        # Compiled with -fopenmp, but linked to torch's OpenMP runtime when torch bundles one.
        link = [str(gomp), f"-Wl,-rpath,{gomp.parent}"] if gomp is not None else ["-fopenmp"]
        _run([cc, "-shared", *objs, *link, "-o", tmp_so])
        os.replace(tmp_so, out)
    finally:
        for p in (tmp_so, *objs):
            if os.path.exists(p):
                os.unlink(p)


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()[-2000:]}")


def _declare(lib: ctypes.CDLL) -> None:
    p, i, sz, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_int64
    lib.ivl_abi_version.restype = i
    lib.ivl_cpu_ok.restype = i
    lib.ivl_param_count.restype = i
    lib.ivl_run.argtypes = [p]
    lib.ivl_run.restype = i
    lib.ivl_quantize_int8.argtypes = [p, i, i, i, p, p, i]
    lib.ivl_quantize_int8.restype = i
    lib.ivl_dequantize_int8.argtypes = [p, p, i, i, p, i, i]
    lib.ivl_dequantize_int8.restype = i
    lib.ivl_dequantize_int4.argtypes = [p, p, i, i, p, i, i]
    lib.ivl_dequantize_int4.restype = i
    lib.ivl_amx_available.restype = i
    lib.ivl_set_amx_min_rows.argtypes = [i]
    lib.ivl_set_amx_min_rows.restype = i
    lib.ivl_read_pass.argtypes = [p, sz, i]
    lib.ivl_read_pass.restype = ctypes.c_double
    lib.ivl_argmax_rows.argtypes = [p, i64, i64, i64, i64, p, i64]
    lib.ivl_argmax_rows.restype = i
    lib.ivl_decode_step.argtypes = [p]
    lib.ivl_decode_step.restype = i


def _load() -> tuple[ctypes.CDLL, Variant]:
    variant = choose()
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
    gomp = _torch_gomp()
    path = library_path(variant, cc, gomp)
    if not path.exists():
        build(variant, cc, gomp, path)
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if lib.ivl_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.ivl_abi_version()}, expected {ABI_VERSION}")
    if not lib.ivl_cpu_ok():
        raise RuntimeError(f"runtime CPU check failed ({', '.join(variant.cpu_flags)})")
    return lib, variant


def load() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None when the kernels cannot be used here."""
    global _lib, _variant, _error, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib, _variant = _load()
            except Exception as e:  # noqa: BLE001 - any failure means "use torch", never a crash
                _lib, _variant, _error = None, None, f"{type(e).__name__}: {e}"
            _tried = True
    return _lib


def load_error() -> str | None:
    load()
    return _error


def variant() -> Variant | None:
    """The variant loaded (building it on first use), None on the torch path."""
    load()
    return _variant


def reset() -> None:
    """Forget the loaded library so the next load() looks again (tests toggle the environment)."""
    global _lib, _variant, _error, _tried
    with _lock:
        _lib, _variant, _error, _tried = None, None, None, False
