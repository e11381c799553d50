"""Compile the C kernels (gemv.c, decode.c) with the system C compiler at first use, cache the shared library, load it with ctypes.

Every failure (no compiler, no AVX-512 VNNI, a compile error, INTERNVL_NO_KERNELS=1) leaves `load()`
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
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = (HERE / "gemv.c", HERE / "decode.c")
HEADERS = (HERE / "gemv.h",)
ABI_VERSION = 7
# Explicit ISA flags rather than -march=native: the cached library stays valid on any CPU that passes
# the runtime feature check, even when the cache directory is shared between machines.
CFLAGS = [
    "-O3", "-std=gnu11", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
    "-mavx512vnni", "-mfma", "-mbmi2", "-fno-math-errno", "-fno-trapping-math",
]
# AMX is optional: compiled in when the compiler knows it, used when the CPU and the kernel allow it.
AMX_CFLAGS = ["-mamx-tile", "-mamx-bf16", "-mamx-int8", "-DIVL_AMX"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
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


def cpu_supported() -> tuple[bool, str]:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"kernels need Linux on x86-64, this is {platform.system()} {platform.machine()}"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as e:
        return False, f"cannot read /proc/cpuinfo: {e}"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    missing = [f for f in CPU_FLAGS if f not in flags]
    if missing:
        return False, f"CPU lacks {', '.join(missing)}"
    return True, ""


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


def library_path(cc: str, gomp: Path | None) -> Path:
    key = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(CFLAGS + AMX_CFLAGS).encode(),
                 _compiler_id(cc).encode(), str(gomp).encode(), str(ABI_VERSION).encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"gemv-{key.hexdigest()[:16]}.so"


def build(cc: str, gomp: Path | None, out: Path) -> None:
    """Compile into a temporary file next to `out`, then rename: concurrent builders never see half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_so = tempfile.mkstemp(prefix=out.stem + ".", suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    objs = [f"{tmp_so[:-len('.so.tmp')]}.{src.stem}.o" for src in SOURCES]
    try:
        for src, obj in zip(SOURCES, objs):
            try:
                _run([cc, *CFLAGS, *AMX_CFLAGS, "-c", str(src), "-o", obj])
            except RuntimeError:  # a compiler without AMX intrinsics: the AVX-512 paths alone
                _run([cc, *CFLAGS, "-c", str(src), "-o", obj])
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
    p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.ivl_abi_version.restype = i
    lib.ivl_cpu_ok.restype = i
    lib.ivl_param_count.restype = i
    lib.ivl_run.argtypes = [p]
    lib.ivl_run.restype = i
    lib.ivl_quantize_int8.argtypes = [p, i, i, i, p, p, i]
    lib.ivl_quantize_int8.restype = i
    lib.ivl_dequantize_int8.argtypes = [p, p, i, i, p, i, i]
    lib.ivl_dequantize_int8.restype = i
    lib.ivl_amx_available.restype = i
    lib.ivl_set_amx_min_rows.argtypes = [i]
    lib.ivl_set_amx_min_rows.restype = i
    lib.ivl_read_pass.argtypes = [p, sz, i]
    lib.ivl_read_pass.restype = ctypes.c_double
    lib.ivl_decode_step.argtypes = [p]
    lib.ivl_decode_step.restype = i
    i64 = ctypes.c_int64
    lib.ivl_argmax_rows.argtypes = [p, i64, i64, i64, i64, p, i64]
    lib.ivl_argmax_rows.restype = i


def _load() -> ctypes.CDLL:
    if disabled_by_env():
        raise RuntimeError("disabled by INTERNVL_NO_KERNELS")
    ok, why = cpu_supported()
    if not ok:
        raise RuntimeError(why)
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
    gomp = _torch_gomp()
    path = library_path(cc, gomp)
    if not path.exists():
        build(cc, gomp, path)
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if lib.ivl_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.ivl_abi_version()}, expected {ABI_VERSION}")
    if not lib.ivl_cpu_ok():
        raise RuntimeError("runtime CPU check failed (avx512f/bw/vl/bf16)")
    return lib


def load() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None when the kernels cannot be used here."""
    global _lib, _error, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _load()
            except Exception as e:  # noqa: BLE001 - any failure means "use torch", never a crash
                _lib, _error = None, f"{type(e).__name__}: {e}"
            _tried = True
    return _lib


def load_error() -> str | None:
    load()
    return _error


def reset() -> None:
    """Forget the loaded library so the next load() looks again (tests toggle the environment)."""
    global _lib, _error, _tried
    with _lock:
        _lib, _error, _tried = None, None, False
