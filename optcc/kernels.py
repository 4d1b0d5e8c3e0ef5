"""Load ``liboptcc_kernels.so``, optcc's 2:4 sparse GEMM kernels, through ctypes.

The library (sources and build script in the repository's ``kernels/`` folder) is plain C
with raw device pointers, so this module needs neither torch nor a GPU to load it: the
host-side functions (configurations, metadata layouts, shape checks) work on any machine,
which is how CI tests the layouts against CUTLASS. Launching a kernel needs a CUDA device
and a stream handle (``torch.cuda.current_stream().cuda_stream``, or 0).

Where the library comes from, first match wins:

1. ``OPTCC_KERNELS_LIBRARY``: a prebuilt ``liboptcc_kernels.so`` (e.g. carried to a GPU
   machine), loaded as is;
2. the build cache: ``kernels/build.py`` compiles it once per source/flag/toolchain hash
   into ``~/.cache/optcc/kernels/<key>/`` (``OPTCC_CACHE_DIR`` moves the cache) and reuses
   it afterwards. A build needs nvcc and CUTLASS's headers (``pip install nvidia-cutlass``)
   and takes minutes; a missing piece raises :class:`KernelsUnavailable` with what to
   install.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from optcc.errors import BackendError, BackendUnavailable

logger = logging.getLogger(__name__)

ABI_VERSION = 1
ARCH_SM80, ARCH_SM90 = 80, 90
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "int8": 2}
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "clip": 4}
FORMAT_OF_ARCH = {ARCH_SM80: "sm80", ARCH_SM90: "sm90"}
INSTALL_HINT = (
    "install the CUDA toolkit (nvcc 12.4+) and `pip install 'optcc[kernels]'`, or point "
    "OPTCC_KERNELS_LIBRARY at a prebuilt liboptcc_kernels.so"
)


class KernelsUnavailable(BackendUnavailable):
    """The kernel library cannot be built or loaded on this machine."""

    def __init__(self, reason: str) -> None:
        super().__init__("cuda", reason, install_hint=INSTALL_HINT)


class KernelError(BackendError):
    """A kernel call that the library refused or that failed on the device."""


class GemmArgs(ctypes.Structure):
    """Mirror of ``optcc_sparse_gemm_args`` in ``kernels/optcc_kernels.h`` (field order matters)."""

    _fields_ = [
        ("m", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
        ("ab_dtype", ctypes.c_int32), ("d_dtype", ctypes.c_int32),
        ("arch", ctypes.c_int32), ("config", ctypes.c_int32),
        ("a_values", ctypes.c_void_p), ("a_meta", ctypes.c_void_p),
        ("b", ctypes.c_void_p), ("d", ctypes.c_void_p),
        ("alpha", ctypes.c_void_p), ("alpha_scalar", ctypes.c_float),
        ("bias", ctypes.c_void_p), ("residual", ctypes.c_void_p),
        ("activation", ctypes.c_int32), ("residual_after_activation", ctypes.c_int32),
        ("clip_min", ctypes.c_float), ("clip_max", ctypes.c_float),
        ("out_scale", ctypes.c_float),
        ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t),
    ]


def kernels_source_dir() -> Path:
    """The folder with the CUDA sources and build.py (``OPTCC_KERNELS_DIR`` overrides)."""
    override = os.environ.get("OPTCC_KERNELS_DIR")
    folder = Path(override) if override else Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "build.py").is_file():
        raise KernelsUnavailable(
            f"the kernel sources are not at {folder} (set OPTCC_KERNELS_DIR to the kernels/ "
            "folder of an optcc checkout)")
    return folder


def build_script() -> ModuleType:
    """``kernels/build.py`` imported as a module (it is standard-library only)."""
    path = kernels_source_dir() / "build.py"
    name = "optcc_kernels_build"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise KernelsUnavailable(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def library_path(*, build: bool = True, progress: Callable[[str], None] | None = None,
                 targets: list[str] | None = None) -> Path:
    """Path of the library: the prebuilt one, the cached build, or (``build``) a fresh
    build. With ``build=False`` nothing is compiled: no prebuilt or cached library raises
    :class:`KernelsUnavailable`."""
    prebuilt = os.environ.get("OPTCC_KERNELS_LIBRARY")
    if prebuilt:
        if not Path(prebuilt).is_file():
            raise KernelsUnavailable(f"OPTCC_KERNELS_LIBRARY={prebuilt} does not exist")
        return Path(prebuilt)
    script = build_script()
    try:
        if not build:
            found = script.cached(targets=targets)
            if found is None:
                raise KernelsUnavailable(
                    "liboptcc_kernels.so is not built for these sources and this toolchain "
                    "(python kernels/build.py builds it; minutes)")
            return Path(found)
        return Path(script.build(targets=targets, progress=progress or logger.info))
    except script.BuildError as exc:
        raise KernelsUnavailable(str(exc)) from exc


class KernelLibrary:
    """A loaded ``liboptcc_kernels.so`` with typed wrappers around its C functions."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise KernelsUnavailable(f"cannot load {self.path}: {exc}") from exc
        c_int, c_char_p, c_void_p = ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
        signatures: dict[str, tuple[Any, list[Any]]] = {
            "optcc_abi_version": (c_int, []),
            "optcc_last_error": (c_char_p, []),
            "optcc_build_info": (c_char_p, []),
            "optcc_num_configs": (c_int, [c_int, c_int, c_int]),
            "optcc_config_name": (c_char_p, [c_int, c_int, c_int, c_int]),
            "optcc_meta_bytes": (ctypes.c_int64, [c_int, c_int, c_int, c_int]),
            "optcc_meta_nibble_offsets": (c_int, [c_int, c_int, c_int, c_int, c_void_p]),
            "optcc_sparse_gemm_args_init": (None, [ctypes.POINTER(GemmArgs)]),
            "optcc_sparse_gemm_check": (c_int, [ctypes.POINTER(GemmArgs)]),
            "optcc_sparse_gemm_workspace_size": (
                c_int, [ctypes.POINTER(GemmArgs), ctypes.POINTER(ctypes.c_size_t)]),
            "optcc_sparse_gemm": (c_int, [ctypes.POINTER(GemmArgs), c_void_p]),
            "optcc_compress_sm90": (
                c_int, [c_int, c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p]),
        }
        for name, (restype, argtypes) in signatures.items():
            try:
                fn = getattr(lib, name)
            except AttributeError as exc:
                raise KernelsUnavailable(f"{self.path} lacks {name}: rebuild it") from exc
            fn.restype, fn.argtypes = restype, argtypes
        self._lib = lib
        version = lib.optcc_abi_version()
        if version != ABI_VERSION:
            raise KernelsUnavailable(
                f"{self.path} has ABI version {version}, this optcc expects {ABI_VERSION}: "
                "rebuild it (python kernels/build.py --force)")

    # ----------------------------------------------------------------- host-side facts
    @cached_property
    def build_info(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self._lib.optcc_build_info().decode())
        info["path"] = str(self.path)
        return info

    def configs(self, arch: int, ab_dtype: str, d_dtype: str) -> list[str]:
        """Names of the tile configurations compiled for a family and element types."""
        codes = (arch, DTYPE_CODES[ab_dtype], DTYPE_CODES[d_dtype])
        count = self._lib.optcc_num_configs(*codes)
        return [self._lib.optcc_config_name(*codes, i).decode() for i in range(count)]

    def meta_bytes(self, arch: int, ab_dtype: str, m: int, k: int) -> int:
        size = int(self._lib.optcc_meta_bytes(arch, DTYPE_CODES[ab_dtype], m, k))
        if size < 0:
            raise KernelError(self.last_error())
        return size

    def meta_nibble_offsets(self, arch: int, ab_dtype: str, m: int, k: int) -> np.ndarray:
        """Where CUTLASS puts each group's 4-bit code, ``int64 [M, K/4]`` (see packing)."""
        out = np.empty((m, k // 4), dtype=np.int64)
        rc = self._lib.optcc_meta_nibble_offsets(arch, DTYPE_CODES[ab_dtype], m, k,
                                                 out.ctypes.data)
        if rc:
            raise KernelError(self.last_error())
        return out

    def last_error(self) -> str:
        return (self._lib.optcc_last_error() or b"").decode()

    # ----------------------------------------------------------------- GEMM
    def new_args(self) -> GemmArgs:
        args = GemmArgs()
        self._lib.optcc_sparse_gemm_args_init(ctypes.byref(args))
        return args

    def check(self, args: GemmArgs) -> str | None:
        """None when a kernel accepts ``args`` (shape, alignment), else the reason."""
        rc = self._lib.optcc_sparse_gemm_check(ctypes.byref(args))
        return None if rc == 0 else self.last_error()

    def workspace_size(self, args: GemmArgs) -> int:
        size = ctypes.c_size_t(0)
        rc = self._lib.optcc_sparse_gemm_workspace_size(ctypes.byref(args), ctypes.byref(size))
        if rc:
            raise KernelError(self.last_error())
        return int(size.value)

    def gemm(self, args: GemmArgs, stream: int = 0) -> None:
        """Launch one sparse GEMM on ``stream`` (asynchronous, like any CUDA launch)."""
        rc = self._lib.optcc_sparse_gemm(ctypes.byref(args), ctypes.c_void_p(stream or None))
        if rc:
            raise KernelError(f"sparse GEMM {args.m}x{args.n}x{args.k} failed: "
                              f"{self.last_error()}")

    def compress_sm90(self, ab_dtype: str, m: int, k: int, dense: int, values: int, meta: int,
                      stream: int = 0) -> None:
        """CUTLASS's device-side compressor (Hopper layout) on raw device pointers."""
        rc = self._lib.optcc_compress_sm90(DTYPE_CODES[ab_dtype], m, k, dense, values, meta,
                                           ctypes.c_void_p(stream or None))
        if rc:
            raise KernelError(f"sm90 compression failed: {self.last_error()}")


_loaded: dict[str, KernelLibrary] = {}
_load_lock = threading.Lock()


def load(*, build: bool = True, progress: Callable[[str], None] | None = None) -> KernelLibrary:
    """The kernel library, built if needed and loaded once per process."""
    path = library_path(build=build, progress=progress)
    with _load_lock:
        key = str(path.resolve())
        if key not in _loaded:
            _loaded[key] = KernelLibrary(path)
        return _loaded[key]
