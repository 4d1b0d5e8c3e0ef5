"""liboptcc_kernels.so: the build, its host-side answers checked against optcc's numpy
packing, clear errors when the toolchain is missing, and, on a GPU, every kernel family,
element type, tile configuration and epilogue against a float64 reference of the same
operation.

The suite compiles no CUDA by default (the build takes 5-8 minutes on 2 cores): the tests
that need the library use a prebuilt one (``OPTCC_KERNELS_LIBRARY``) or the build cache
(after ``python kernels/build.py``), and are skipped with that hint otherwise.
``OPTCC_TEST_BUILD_KERNELS=1`` makes the first of them build it.
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from sparse_nets import random_2to4, reference_epilogue

from optcc.kernels import (
    ACTIVATIONS,
    ARCH_SM80,
    ARCH_SM90,
    DTYPE_CODES,
    KernelError,
    KernelsUnavailable,
    build_script,
    library_path,
    load,
)
from optcc.sparse import packing

REPO = Path(__file__).resolve().parent.parent
TYPE_PAIRS = [("float16", "float16"), ("bfloat16", "bfloat16"), ("int8", "float16"),
              ("int8", "int8")]


# ----------------------------------------------------------------------------- CPU
@pytest.mark.slow
def test_library_builds_every_family_and_type_pair(library) -> None:
    info = library.build_info
    assert info["abi"] == 1 and info["cutlass"].count(".") == 2
    assert set(info["targets"].split(",")) == {"sm80", "sm90a"}
    for arch in (ARCH_SM80, ARCH_SM90):
        for ab, d in TYPE_PAIRS:
            names = library.configs(arch, ab, d)
            assert len(names) == 2, (arch, ab, d, names)
            assert all(name.startswith(f"sm{arch}_") for name in names)
    assert len(info["kernels"]) == 16
    assert library_path() == library.path  # cached: the second call does not rebuild


@pytest.mark.parametrize("arch", [ARCH_SM80, ARCH_SM90])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("shape", [(64, 128), (96, 256), (160, 384), (128, 1024)])
def test_metadata_layouts_are_cutlass_layouts(library, arch: int, dtype: str,
                                              shape: tuple[int, int]) -> None:
    """The numpy packer's offsets equal those derived from CUTLASS's own layout code
    (reorder_meta + ColumnMajorInterleaved<2> for sm80, Sm90GemmSparseConfig for sm90)."""
    m, k = shape
    bits = 8 if dtype == "int8" else 16
    fmt = "sm90" if arch == ARCH_SM90 else "sm80"
    np_dtype = np.int8 if dtype == "int8" else np.float16
    try:
        packing.check_shape((m, k), np.dtype(np_dtype), fmt)
    except ValueError:
        pytest.skip(f"{m}x{k} does not fit the {fmt} layout for {dtype}")
    expected = library.meta_nibble_offsets(arch, dtype, m, k)
    np.testing.assert_array_equal(packing.nibble_offsets(fmt, m, k, bits), expected)  # type: ignore[arg-type]
    packed = packing.pack(random_2to4(m, k, np_dtype, seed=m * k), fmt)  # type: ignore[arg-type]
    assert packed.meta.nbytes == library.meta_bytes(arch, dtype, m, k)


def _fake_args(library, arch: int, ab: str, d: str, m: int, n: int, k: int):  # type: ignore[no-untyped-def]
    args = library.new_args()
    args.m, args.n, args.k, args.arch = m, n, k, arch
    args.ab_dtype, args.d_dtype = DTYPE_CODES[ab], DTYPE_CODES[d]
    args.a_values = args.a_meta = args.b = args.d = 256  # never dereferenced by a check
    return args


@pytest.mark.parametrize("arch", [ARCH_SM80, ARCH_SM90])
def test_shape_checks_run_on_the_host(library, arch: int) -> None:
    good = _fake_args(library, arch, "float16", "float16", 768, 336, 3072)
    assert library.check(good) is None
    odd_tokens = _fake_args(library, arch, "int8", "float16", 768, 333, 3072)
    if arch == ARCH_SM80:  # CUTLASS's 2.x sparse kernels align N like K; callers pad rows
        assert "n (tokens) must be a multiple of 16" in library.check(odd_tokens)
    else:
        assert library.check(odd_tokens) is None
    bad_k = _fake_args(library, arch, "float16", "float16", 768, 333, 100)
    assert "multiple of 64" in library.check(bad_k)
    bad_m = _fake_args(library, arch, "int8", "int8", 48, 64, 256)
    assert "multiple of 32" in library.check(bad_m)
    missing = _fake_args(library, arch, "float16", "bfloat16", 64, 64, 64)
    assert "no kernel in this build" in library.check(missing)
    unknown_config = _fake_args(library, arch, "float16", "float16", 64, 64, 64)
    unknown_config.config = 7
    assert "config 7" in library.check(unknown_config)


def test_missing_toolchain_pieces_give_clear_messages(tmp_path: Path, monkeypatch) -> None:
    script = build_script()
    with pytest.raises(script.BuildError, match="CUTLASS's headers were not found.*nvidia-cutlass"):
        script.find_cutlass(str(tmp_path))
    with pytest.raises(script.BuildError, match="nvcc .*was not found"):
        script.find_nvcc(str(tmp_path / "nvcc"))
    monkeypatch.setenv("OPTCC_KERNELS_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(KernelsUnavailable, match="does not exist") as info:
        load()
    assert "nvcc" in (info.value.hint or "")
    bogus = tmp_path / "liboptcc_kernels.so"
    bogus.write_bytes(b"not a library")
    monkeypatch.setenv("OPTCC_KERNELS_LIBRARY", str(bogus))
    with pytest.raises(KernelsUnavailable, match="cannot load"):
        load()


def test_without_a_build_nothing_is_compiled(tmp_path: Path, monkeypatch) -> None:
    """build=False finds no library in an empty cache and says how to build one, within
    seconds: no nvcc compile runs."""
    try:
        build_script().toolchain()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no toolchain: {exc}")
    monkeypatch.delenv("OPTCC_KERNELS_LIBRARY", raising=False)
    monkeypatch.setenv("OPTCC_CACHE_DIR", str(tmp_path))
    assert build_script().cached() is None
    with pytest.raises(KernelsUnavailable, match="not built.*kernels/build.py"):
        library_path(build=False)
    assert list(tmp_path.iterdir()) == []


def test_build_script_dry_run_lists_every_kernel() -> None:
    try:
        build_script().toolchain()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no toolchain: {exc}")
    out = subprocess.run([sys.executable, str(REPO / "kernels" / "build.py"), "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    kernels = [line.strip() for line in out.splitlines() if line.startswith("    sm")]
    assert len(kernels) == 16
    assert "arch=compute_90a,code=sm_90a" in out and "arch=compute_80,code=sm_90" in out


def test_prebuilt_library_is_used_as_is(library, monkeypatch) -> None:
    monkeypatch.setenv("OPTCC_KERNELS_LIBRARY", str(library.path))
    assert library_path(build=False) == library.path


# ----------------------------------------------------------------------------- GPU
EPILOGUES = {
    "plain": {},
    "alpha_bias_relu": {"alpha": True, "bias": True, "activation": "relu"},
    "bias_residual_gelu": {"bias": True, "residual": True, "activation": "gelu"},
    "gelu_tanh_then_residual": {"bias": True, "residual": True, "activation": "gelu_tanh",
                                "after": True},
    "relu6": {"bias": True, "activation": "clip", "clip": (0.0, 6.0)},
}


def _torch_dtype(torch, name: str):  # type: ignore[no-untyped-def]
    return getattr(torch, name)


def _gpu_case(library, arch: int, ab: str, d: str, config: int, epilogue: dict, m: int, n: int,
              k: int, seed: int):  # type: ignore[no-untyped-def]
    """Run one kernel on random operands; return (output, float64 reference, output dtype)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    fmt = "sm90" if arch == ARCH_SM90 else "sm80"
    if ab == "int8":
        weight = torch.from_numpy(random_2to4(m, k, np.int8, seed))
        x = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        packed = packing.pack(weight.numpy(), fmt)
        values = torch.from_numpy(packed.values)
    else:
        dtype = _torch_dtype(torch, ab)
        weight = torch.from_numpy(random_2to4(m, k, np.float32, seed)).to(dtype)
        x = torch.randn(n, k, generator=gen).to(dtype)
        bits = weight.view(torch.int16).numpy().view(np.float16)
        packed = packing.pack(bits, fmt)
        values = torch.from_numpy(packed.values.view(np.int16)).view(dtype)
    dev = torch.device("cuda")
    values, meta = values.to(dev), torch.from_numpy(packed.meta.reshape(-1).view(np.uint8)).to(dev)
    xs = x.to(dev)
    alpha = (torch.rand(m, generator=gen) + 0.5) * (2e-4 if ab == "int8" else 1.0)
    bias = torch.randn(m, generator=gen)
    res_dtype = torch.bfloat16 if ab == "bfloat16" else torch.float16
    residual = torch.randn(n, m, generator=gen).to(res_dtype)
    out_dtype = _torch_dtype(torch, d)
    out = torch.full((n, m), 77, dtype=out_dtype, device=dev)  # poison: every element is written
    args = library.new_args()
    args.m, args.n, args.k, args.arch, args.config = m, n, k, arch, config
    args.ab_dtype, args.d_dtype = DTYPE_CODES[ab], DTYPE_CODES[d]
    args.a_values, args.a_meta, args.b, args.d = (values.data_ptr(), meta.data_ptr(),
                                                  xs.data_ptr(), out.data_ptr())
    keep = [values, meta, xs, out]
    if epilogue.get("alpha") or ab == "int8":
        a_dev = alpha.to(dev)
        keep.append(a_dev)
        args.alpha = a_dev.data_ptr()
    if epilogue.get("bias"):
        b_dev = bias.to(dev)
        keep.append(b_dev)
        args.bias = b_dev.data_ptr()
    if epilogue.get("residual"):
        r_dev = residual.to(dev)
        keep.append(r_dev)
        args.residual = r_dev.data_ptr()
        args.residual_after_activation = int(bool(epilogue.get("after")))
    args.activation = ACTIVATIONS[epilogue.get("activation", "none")]
    if "clip" in epilogue:
        args.clip_min, args.clip_max = epilogue["clip"]
    out_scale = 1.0
    if d == "int8":
        out_scale = 0.5
        args.out_scale = out_scale
    library.gemm(args, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    acc = x.double() @ weight.double().T
    ref = reference_epilogue(
        acc, alpha.double() if (epilogue.get("alpha") or ab == "int8") else 1.0,
        bias.double() if epilogue.get("bias") else 0.0,
        residual.double() if epilogue.get("residual") else None,
        activation=epilogue.get("activation", "none"),
        residual_after_activation=bool(epilogue.get("after")), clip=epilogue.get("clip"),
        out_scale=out_scale)
    del keep
    return out.cpu(), ref, d


def _check(out, ref, d: str) -> None:  # type: ignore[no-untyped-def]
    import torch

    if d == "int8":
        expected = torch.clamp(torch.round(ref), -128, 127)
        assert (out.double() - expected).abs().max() <= 1  # rounding of fp32 near .5
        return
    got = out.double()
    assert torch.isfinite(got).all()
    rel = {"float16": 1e-2, "bfloat16": 3e-2}[d]
    err = (got - ref).abs().max().item()
    assert err <= rel * max(ref.abs().max().item(), 1e-3), err


def _archs() -> list[int]:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
            return [ARCH_SM80, ARCH_SM90]
    except Exception:  # noqa: BLE001
        pass
    return [ARCH_SM80]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", [ARCH_SM80, ARCH_SM90])
@pytest.mark.parametrize("ab,d", TYPE_PAIRS)
@pytest.mark.parametrize("config", [0, 1])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_kernel_matches_float64_reference(library, arch: int, ab: str, d: str, config: int,
                                          epilogue: str) -> None:
    if arch not in _archs():
        pytest.skip("the sm90 kernels need a Hopper GPU")
    # token counts: any for the Hopper kernels, multiples of 16 for the Ampere family
    n = (200 if config == 0 else 77) if arch == ARCH_SM90 else (208 if config == 0 else 80)
    shape = (256, n, 512) if config == 0 else (384, n, 1024)
    out, ref, d = _gpu_case(library, arch, ab, d, config, EPILOGUES[epilogue], *shape,
                            seed=zlib.crc32(f"{arch}{ab}{d}{config}{epilogue}".encode()) % 1000)
    _check(out, ref, d)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", [ARCH_SM80, ARCH_SM90])
@pytest.mark.parametrize("n", [1, 8, 4099])
def test_token_counts_from_one_to_many(library, arch: int, n: int) -> None:
    if arch not in _archs():
        pytest.skip("the sm90 kernels need a Hopper GPU")
    if arch == ARCH_SM80:
        n = -(-n // 8) * 8  # the Ampere-family kernels take multiples of 8 (the backend pads)
    out, ref, d = _gpu_case(library, arch, "float16", "float16", 0, EPILOGUES["bias_residual_gelu"],
                            768, n, 768, seed=n)
    _check(out, ref, d)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_device_compressor_equals_numpy_packing(library, dtype: str) -> None:
    import torch

    if ARCH_SM90 not in _archs():
        pytest.skip("the Hopper compressor needs a Hopper GPU")
    m, k = 192, 512
    np_dtype = np.int8 if dtype == "int8" else np.float16
    dense = random_2to4(m, k, np_dtype, seed=9)
    packed = packing.pack(dense, "sm90")
    dev_dense = torch.from_numpy(dense.view(np.int8 if dtype == "int8" else np.int16)).cuda()
    values = torch.zeros(m, k // 2, dtype=dev_dense.dtype, device="cuda")
    meta = torch.zeros(library.meta_bytes(ARCH_SM90, dtype, m, k), dtype=torch.uint8, device="cuda")
    library.compress_sm90(dtype, m, k, dev_dense.data_ptr(), values.data_ptr(), meta.data_ptr())
    torch.cuda.synchronize()
    np.testing.assert_array_equal(meta.cpu().numpy(), packed.meta)
    got_values = values.cpu().numpy().view(np_dtype)
    np.testing.assert_array_equal(got_values.astype(np.float32), packed.values.astype(np.float32))


@pytest.mark.gpu
def test_a_rejected_call_raises_with_the_reason(library) -> None:
    import torch

    buf = torch.zeros(1 << 20, dtype=torch.float16, device="cuda")
    args = _fake_args(library, _archs()[-1], "float16", "float16", 256, 64, 100)
    args.a_values = args.a_meta = args.b = args.d = buf.data_ptr()
    with pytest.raises(KernelError, match="multiple of 64"):
        library.gemm(args)
