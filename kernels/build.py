#!/usr/bin/env python3
"""Build liboptcc_kernels.so: optcc's 2:4 sparse GEMM kernels, on CUTLASS, with a C ABI.

    python kernels/build.py                      # build (or reuse) the library, print its path
    python kernels/build.py --targets sm90a      # Hopper kernels only
    python kernels/build.py --dry-run            # show the plan and the nvcc commands

The library needs nvcc (CUDA 12.4 or newer; no GPU) and CUTLASS's headers, which the
``nvidia-cutlass`` wheel ships (``pip install nvidia-cutlass``), or a CUTLASS checkout named
by ``--cutlass`` / ``CUTLASS_PATH``. A build lands in ``<cache>/<key>/`` where the key is a
hash of the sources, this script, the flags, the nvcc version and the CUTLASS version, so an
unchanged build is reused and a changed one never overwrites a library in use. The default
cache is ``$OPTCC_CACHE_DIR/kernels`` or ``~/.cache/optcc/kernels``.

The tile configurations below are the whole kernel table: the tuner (optcc.kernels) times
them per GEMM shape. Every Hopper configuration of one element type must keep a K tile of at
least 128, so that they share one metadata layout and one packed weight serves them all.

This file uses only the standard library, so it runs before optcc is installed; optcc's
loader imports it by path.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "liboptcc_kernels.so"
MIN_NVCC = (12, 4)

# Element type codes of optcc_kernels.h and their file-name spelling.
DTYPES = {"f16": "OPTCC_F16", "bf16": "OPTCC_BF16", "s8": "OPTCC_S8"}
# (input, output) element types compiled for every family.
TYPE_PAIRS = [("f16", "f16"), ("bf16", "bf16"), ("s8", "f16"), ("s8", "s8")]

# Hopper (sm_90a): TMA + wgmma.sp, warp-specialized; tile M x N x K, cluster, schedule.
SM90_TILES = [
    {"name": "128x128x128_c1x2_coop", "tile": (128, 128, 128), "cluster": (1, 2, 1), "schedule": "coop"},
    {"name": "64x128x128_c1x1_pingpong", "tile": (64, 128, 128), "cluster": (1, 1, 1), "schedule": "pingpong"},
]
# Ampere family (sm_80, also compiled to sm_90 machine code): threadblock, warp, stages.
SM80_TILES = {
    16: [
        {"name": "128x128x64_s3", "tile": (128, 128, 64), "warp": (64, 64, 64), "stages": 3},
        {"name": "64x128x64_s6", "tile": (64, 128, 64), "warp": (32, 64, 64), "stages": 6},
    ],
    8: [
        {"name": "128x128x128_s3", "tile": (128, 128, 128), "warp": (64, 64, 128), "stages": 3},
        {"name": "64x128x128_s3", "tile": (64, 128, 128), "warp": (32, 64, 128), "stages": 3},
    ],
}
SCHEDULES = {
    "coop": ("cutlass::gemm::KernelTmaWarpSpecializedCooperative",
             "cutlass::epilogue::TmaWarpSpecializedCooperative"),
    "pingpong": ("cutlass::gemm::KernelTmaWarpSpecializedPingpong",
                 "cutlass::epilogue::TmaWarpSpecialized"),
}
TARGETS = {
    "sm90a": ["-gencode", "arch=compute_90a,code=sm_90a"],
    # Ampere kernels as sm_80 machine code, plus the same PTX compiled for Hopper so that
    # they run (and are tested) on H100/H200 too.
    "sm80": ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_80,code=sm_90"],
}
SOURCES = ["optcc_kernels.h", "common.cuh", "epilogue.cuh", "sm80_sparse_gemm.cuh",
           "sm90_sparse_gemm.cuh", "api.cu"]
FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler=-fPIC",
         "-Xcudafe=--diag_suppress=177"]


class BuildError(RuntimeError):
    """A build that cannot start or failed; the message says what to do."""


@dataclass
class Toolchain:
    nvcc: Path
    nvcc_version: tuple[int, int]
    nvcc_banner: str
    cutlass: Path
    cutlass_version: str


@dataclass
class Unit:
    """One translation unit: a generated instance file or api.cu."""

    name: str
    source: str          # file content (generated) or "" for a file in kernels/
    path: Path | None    # kernels/ file, when not generated
    gencode: list[str]
    kernels: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- toolchain
def find_nvcc(explicit: str | None = None) -> Path:
    """nvcc from --nvcc or $NVCC/$CUDACXX (taken as given), else PATH, $CUDA_HOME or
    /usr/local/cuda."""
    chosen = explicit or os.environ.get("NVCC") or os.environ.get("CUDACXX")
    if chosen:
        if Path(chosen).is_file() and os.access(chosen, os.X_OK):
            return Path(chosen)
        raise BuildError(f"nvcc (the CUDA compiler) was not found at {chosen}")
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise BuildError(
        "nvcc (the CUDA compiler) was not found. Install the CUDA toolkit 12.4 or newer, or "
        "point NVCC at it (NVCC=/usr/local/cuda/bin/nvcc). No GPU is needed to build.")


def nvcc_version(nvcc: Path) -> tuple[tuple[int, int], str]:
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"{nvcc} --version failed: {exc}") from exc
    for token in out.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            major, minor = token[1:].split(".")[:2]
            return (int(major), int(minor)), out.strip()
    raise BuildError(f"cannot read the version of {nvcc}:\n{out}")


def find_cutlass(explicit: str | None = None) -> Path:
    """CUTLASS's source tree: --cutlass or $CUTLASS_PATH (taken as given), else the
    nvidia-cutlass wheel."""
    hint = ("Install them with `pip install nvidia-cutlass` (about 6 MB; `pip install "
            "'optcc[kernels]'` does it), or set CUTLASS_PATH to a CUTLASS checkout (the folder "
            "holding include/cutlass).")
    chosen = explicit or os.environ.get("CUTLASS_PATH")
    candidates = [chosen] if chosen else []
    if not chosen:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is not None and spec.submodule_search_locations:
            candidates.append(str(Path(next(iter(spec.submodule_search_locations))) / "source"))
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cutlass" / "cutlass.h").is_file():
            return Path(candidate).resolve()
    where = f" at {chosen}" if chosen else ""
    raise BuildError(f"CUTLASS's headers were not found{where}. {hint}")


def cutlass_version(root: Path) -> str:
    text = (root / "include" / "cutlass" / "version.h").read_text()
    parts = {}
    for name in ("MAJOR", "MINOR", "PATCH"):
        for line in text.splitlines():
            if line.startswith(f"#define CUTLASS_{name} "):
                parts[name] = line.split()[2]
    return ".".join(parts.get(n, "?") for n in ("MAJOR", "MINOR", "PATCH"))


def toolchain(nvcc: str | None = None, cutlass: str | None = None) -> Toolchain:
    path = find_nvcc(nvcc)
    version, banner = nvcc_version(path)
    if version < MIN_NVCC:
        raise BuildError(f"{path} is CUDA {version[0]}.{version[1]}; the sparse Hopper kernels "
                         f"need CUDA {MIN_NVCC[0]}.{MIN_NVCC[1]} or newer")
    root = find_cutlass(cutlass)
    return Toolchain(path, version, banner, root, cutlass_version(root))


# ----------------------------------------------------------------------------- sources
def _shape(values: tuple[int, ...]) -> str:
    return "cute::Shape<" + ", ".join(f"cute::_{v}" for v in values) + ">"


def _gemm_shape(values: tuple[int, ...]) -> str:
    return "cutlass::gemm::GemmShape<" + ", ".join(str(v) for v in values) + ">"


def _instance_unit(family: str, ab: str, d: str, gemms: list[tuple[str, list[str]]]) -> Unit:
    """One generated file: the type aliases of each ``(name, alias lines)`` kernel (the last
    alias is ``Gemm<i>``) and the function that lists them for the registry."""
    arch = "OPTCC_ARCH_SM90" if family == "sm90" else "OPTCC_ARCH_SM80"
    lines = ["#include <vector>", f'#include "{family}_sparse_gemm.cuh"', "", "namespace optcc {", ""]
    entries = []
    for i, (name, aliases) in enumerate(gemms):
        lines += aliases
        entries.append(f'    KernelEntry{{{arch}, {DTYPES[ab]}, {DTYPES[d]}, "{name}", '
                       f"&Gemm{i}::check, &Gemm{i}::workspace, &Gemm{i}::run}},")
    lines += ["", f"std::vector<KernelEntry> kernels_{family}_{ab}_{d}() {{", "  return {",
              *entries, "  };", "}", "", "}  // namespace optcc", ""]
    target = "sm90a" if family == "sm90" else "sm80"
    return Unit(f"{family}_{ab}_{d}", "\n".join(lines), None, TARGETS[target],
                [name for name, _ in gemms])


def instance_units(targets: list[str]) -> list[Unit]:
    """The generated instance files: one per family and (input, output) type pair."""
    units = []
    for ab, d in TYPE_PAIRS:
        types = f"ElementOf<{DTYPES[ab]}>::type, ElementOf<{DTYPES[d]}>::type"
        if "sm90a" in targets:
            gemms = []
            for i, t in enumerate(SM90_TILES):
                kernel, epilogue = SCHEDULES[t["schedule"]]
                gemms.append((f"sm90_{ab}_{d}_{t['name']}", [
                    f"using Tile{i} = {_shape(t['tile'])};",
                    f"using Cluster{i} = {_shape(t['cluster'])};",
                    f"using Gemm{i} = sm90::SparseGemm<{types}, Tile{i}, Cluster{i}, {kernel}, "
                    f"{epilogue}>;",
                    f"static_assert(std::is_same_v<Gemm{i}::SparseConfig, sm90::SparseGemm<"
                    f"ElementOf<{DTYPES[ab]}>::type, ElementOf<{DTYPES[ab]}>::type, "
                    f"cute::Shape<cute::_128, cute::_128, cute::_128>, "
                    f"cute::Shape<cute::_1, cute::_1, cute::_1>, {SCHEDULES['coop'][0]}, "
                    f"{SCHEDULES['coop'][1]}>::SparseConfig>, \"every sm90 configuration "
                    f"must share one metadata layout\");"]))
            units.append(_instance_unit("sm90", ab, d, gemms))
        if "sm80" in targets:
            gemms = [(f"sm80_{ab}_{d}_{t['name']}", [
                f"using Gemm{i} = sm80::SparseGemm<{types}, {_gemm_shape(t['tile'])}, "
                f"{_gemm_shape(t['warp'])}, {t['stages']}>;"])
                for i, t in enumerate(SM80_TILES[8 if ab == "s8" else 16])]
            units.append(_instance_unit("sm80", ab, d, gemms))
    return units


def registry_unit(instances: list[Unit]) -> Unit:
    lines = ['#include <vector>', '#include "common.cuh"', "", "namespace optcc {", ""]
    lines += [f"std::vector<KernelEntry> kernels_{u.name}();" for u in instances]
    lines += ["", "std::vector<KernelEntry> const& registry() {",
              "  static std::vector<KernelEntry> const all = [] {",
              "    std::vector<KernelEntry> out;"]
    for u in instances:
        lines.append(f"    for (auto const& e : kernels_{u.name}()) out.push_back(e);")
    lines += ["    return out;", "  }();", "  return all;", "}", "", "}  // namespace optcc", ""]
    return Unit("registry", "\n".join(lines), None, TARGETS["sm90a"])


def plan(targets: list[str]) -> list[Unit]:
    """Every translation unit of a build for ``targets``."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise BuildError(f"unknown targets {unknown or targets}; choose from {', '.join(TARGETS)}")
    instances = instance_units(targets)
    api = Unit("api", "", HERE / "api.cu", TARGETS["sm90a"])
    return [*instances, registry_unit(instances), api]


def build_key(tools: Toolchain, targets: list[str]) -> str:
    """Hash of everything that determines the library's bytes: the hand-written sources,
    the generated instance files (so the tile table), flags, targets and toolchain; not the
    rest of this script, so editing its messages does not force a rebuild."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    for unit in plan(targets):
        digest.update(json.dumps([unit.name, unit.source, unit.gencode]).encode())
    digest.update(json.dumps({"targets": sorted(targets), "flags": FLAGS,
                              "nvcc": tools.nvcc_banner, "cutlass": tools.cutlass_version},
                             sort_keys=True).encode())
    return digest.hexdigest()[:20]


def default_cache_dir() -> Path:
    root = os.environ.get("OPTCC_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "optcc") / "kernels"


# ----------------------------------------------------------------------------- building
def _compile_command(tools: Toolchain, unit: Unit, source: Path, obj: Path,
                     targets: list[str]) -> list[str]:
    gencode = unit.gencode or [flag for t in targets for flag in TARGETS[t]]
    includes = [f"-I{HERE}", f"-I{tools.cutlass / 'include'}",
                f"-I{tools.cutlass / 'tools' / 'util' / 'include'}"]
    define = f"-DOPTCC_BUILD_TARGETS=\"{','.join(sorted(targets))}\""
    return [str(tools.nvcc), *FLAGS, *gencode, *includes, define, "-c", str(source), "-o", str(obj)]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(
    *,
    targets: list[str] | None = None,
    cache_dir: Path | None = None,
    nvcc: str | None = None,
    cutlass: str | None = None,
) -> Path | None:
    """The cached library of the current sources and toolchain, or None; compiles nothing
    (it runs ``nvcc --version`` to know the key)."""
    targets = sorted(targets or list(TARGETS))
    key = build_key(toolchain(nvcc, cutlass), targets)
    library = Path(cache_dir or default_cache_dir()) / key / LIBRARY_NAME
    return library if library.is_file() else None


def build(
    *,
    targets: list[str] | None = None,
    cache_dir: Path | None = None,
    jobs: int | None = None,
    nvcc: str | None = None,
    cutlass: str | None = None,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> Path:
    """Build the library (or find it in the cache) and return its path.

    Concurrent callers for the same key wait for one build; the finished folder is moved
    into place in one rename, so a reader never sees a half-written library.
    """
    targets = sorted(targets or list(TARGETS))
    say = progress or (lambda message: None)
    tools = toolchain(nvcc, cutlass)
    units = plan(targets)
    key = build_key(tools, targets)
    root = Path(cache_dir or default_cache_dir())
    final = root / key
    library = final / LIBRARY_NAME
    with _locked(root / f".{key}.lock"):
        if library.is_file() and not force:
            return library
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            started = time.monotonic()
            kernel_count = sum(len(u.kernels) for u in units)
            say(f"building {LIBRARY_NAME}: {len(units)} units, {kernel_count} kernels, targets "
                f"{', '.join(targets)}, CUTLASS {tools.cutlass_version}, nvcc "
                f"{tools.nvcc_version[0]}.{tools.nvcc_version[1]}")
            objects, timings = _compile_all(tools, units, staging, targets, jobs, say)
            link = [str(tools.nvcc), "-shared", "-o", str(staging / LIBRARY_NAME),
                    *[str(o) for o in objects], "-cudart", "static"]
            _run(link, "link")
            info = {
                "key": key, "targets": targets, "cutlass": tools.cutlass_version,
                "nvcc": f"{tools.nvcc_version[0]}.{tools.nvcc_version[1]}",
                "kernels": [k for u in units for k in u.kernels],
                "seconds": round(time.monotonic() - started, 1), "unit_seconds": timings,
            }
            (staging / "build.json").write_text(json.dumps(info, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            say(f"built {library} in {info['seconds']} s")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return library


# The hand-written files each generated unit includes (the API includes everything).
UNIT_SOURCES = {
    "sm90": ["optcc_kernels.h", "common.cuh", "epilogue.cuh", "sm90_sparse_gemm.cuh"],
    "sm80": ["optcc_kernels.h", "common.cuh", "epilogue.cuh", "sm80_sparse_gemm.cuh"],
    "registry": ["optcc_kernels.h", "common.cuh"],
}


def _unit_key(tools: Toolchain, unit: Unit, targets: list[str]) -> str:
    """Hash of what one object file depends on: the sources it includes, its own text,
    its flags and the toolchain (so editing one family recompiles only that family)."""
    digest = hashlib.sha256()
    for name in UNIT_SOURCES.get(unit.name.split("_")[0], SOURCES):
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    own = unit.source if unit.path is None else unit.path.read_text()
    digest.update(json.dumps([unit.name, own, unit.gencode or sorted(targets), FLAGS,
                              tools.nvcc_banner, tools.cutlass_version]).encode())
    return digest.hexdigest()[:24]


def _compile_all(tools: Toolchain, units: list[Unit], workdir: Path, targets: list[str],
                 jobs: int | None, say: Callable[[str], None]) -> tuple[list[Path], dict[str, float]]:
    """Compile every unit, in parallel. Objects are kept in ``<cache>/objects`` by unit
    hash, so a failed or changed build recompiles only the units whose inputs changed."""
    jobs = max(1, jobs or os.cpu_count() or 1)
    store = workdir.parent / "objects"
    store.mkdir(parents=True, exist_ok=True)
    done = 0
    timings: dict[str, float] = {}

    def compile_one(unit: Unit) -> Path:
        nonlocal done
        obj = store / f"{unit.name}-{_unit_key(tools, unit, targets)}.o"
        start = time.monotonic()
        if not obj.is_file():
            source = unit.path or workdir / f"{unit.name}.cu"
            if unit.path is None:
                source.write_text(unit.source)
            partial = workdir / f"{unit.name}.o"
            _run(_compile_command(tools, unit, source, partial, targets), unit.name)
            os.replace(partial, obj)
        timings[unit.name] = round(time.monotonic() - start, 1)
        done += 1
        say(f"  [{done}/{len(units)}] {unit.name} ({timings[unit.name]} s)")
        return obj

    # The API first (it instantiates every family's types: errors show up early), then the
    # largest units, so that the last one to finish is a short one.
    ordered = sorted(units, key=lambda u: (u.name != "api", -len(u.kernels)))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        objects = list(pool.map(compile_one, ordered))
    return objects, timings


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-40:])
        raise BuildError(f"nvcc failed on {what} (exit {result.returncode}):\n{tail}")


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated: sm90a (Hopper), sm80 (Ampere family)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: %(default)s")
    parser.add_argument("--jobs", "-j", type=int, default=None, help="parallel nvcc processes")
    parser.add_argument("--nvcc", default=None)
    parser.add_argument("--cutlass", default=None, help="CUTLASS source tree (holds include/)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        if args.dry_run:
            tools = toolchain(args.nvcc, args.cutlass)
            units = plan(targets)
            print(f"key {build_key(tools, targets)}; CUTLASS {tools.cutlass_version} at "
                  f"{tools.cutlass}; {tools.nvcc}")
            for unit in units:
                source = unit.path or Path(f"<build>/{unit.name}.cu")
                print(" ".join(_compile_command(tools, unit, source, Path(f"<build>/{unit.name}.o"),
                                                targets)))
                for kernel in unit.kernels:
                    print(f"    {kernel}")
            return 0
        library = build(targets=targets, cache_dir=args.cache_dir, jobs=args.jobs,
                        nvcc=args.nvcc, cutlass=args.cutlass, force=args.force,
                        progress=lambda m: print(m, file=sys.stderr, flush=True))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(library)
    return 0


if __name__ == "__main__":
    sys.exit(main())
