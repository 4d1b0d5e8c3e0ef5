"""The one description of a TensorRT engine build, and the code that carries it out.

Everything that decides how an engine is built lives in :class:`EngineBuildDescription`:
strongly typed or not (and, for weakly typed networks, which reduced precisions are
allowed), 2:4 sparse tactics, the optimization profile (min/opt/max shape per dynamic
input), the workspace pool, the builder optimization level, the timing cache and the plugin
libraries to load. Three consumers read that one description:

- :func:`build_engine`: the TensorRT Python builder. optcc's ``tensorrt`` backend calls it
  when TensorRT and a GPU are present;
- :func:`trtexec_command`: the same settings as a ``trtexec`` command line (the generated
  ``build_engine.sh``);
- :func:`main`: a command-line front end. optcc writes this module's own source, with the
  description embedded, as the standalone ``build_engine.py`` that needs only Python and
  the ``tensorrt`` package; ``--dry-run`` checks its arguments and files without TensorRT.

So this module imports nothing but the standard library at module level, and imports
``tensorrt`` only inside :func:`build_engine`, after checking that a GPU is visible:
creating TensorRT objects in a process without a GPU driver can crash it.

The engine report helpers (:func:`summarize_layers`) read the engine inspector's JSON, the
same document ``trtexec --exportLayerInfo`` writes, so they work on engines built either way.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import pprint
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("optcc.backends.trt_build")

#: Bumped when the description's fields change meaning.
DESCRIPTION_VERSION = 1
PRECISIONS = ("fp16", "bf16")  # weakly typed networks only; TensorRT 11 has no such flags
PLUGIN_LOADING = ("dynamic", "static")


class BuildDescriptionError(ValueError):
    """A description, argument or file that cannot produce an engine."""


# --------------------------------------------------------------------------- the description
@dataclass
class ShapeProfile:
    """Smallest, tuned-for and largest shape of one dynamic input (one optimization profile)."""

    input: str
    min: list[int]
    opt: list[int]
    max: list[int]

    def check(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise BuildDescriptionError(
                f"profile for '{self.input}': min {self.min}, opt {self.opt} and max {self.max} "
                "have different ranks"
            )
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=False):
            if not 0 <= lo <= mid <= hi:
                raise BuildDescriptionError(
                    f"profile for '{self.input}': need 0 <= min <= opt <= max in every "
                    f"dimension, got min {self.min}, opt {self.opt}, max {self.max}"
                )


@dataclass
class PluginLibrary:
    """A shared library of TensorRT plugins.

    ``dynamic`` libraries export ``getCreators``/``getPluginCreators`` and are registered
    through ``IPluginRegistry.load_library`` (trtexec ``--dynamicPlugins``); ``static`` ones
    register their creators when loaded (``REGISTER_TENSORRT_PLUGIN``) and are simply
    ``dlopen``-ed (trtexec ``--staticPlugins``). ``serialize`` embeds a dynamic library in
    the engine (``plugins_to_serialize``, trtexec ``--setPluginsToSerialize``).
    """

    path: str
    loading: str = "dynamic"
    serialize: bool = False

    def check(self) -> None:
        if self.loading not in PLUGIN_LOADING:
            raise BuildDescriptionError(
                f"plugin library '{self.path}': loading must be one of {PLUGIN_LOADING}"
            )
        if self.serialize and self.loading != "dynamic":
            raise BuildDescriptionError(
                f"plugin library '{self.path}': only dynamically loaded libraries can be "
                "serialized into the engine"
            )


@dataclass
class EngineBuildDescription:
    """Every setting of one engine build. Paths are relative to the output folder."""

    onnx: str = "model.onnx"
    engine: str = "model.plan"
    strongly_typed: bool = True
    precisions: list[str] = field(default_factory=list)
    tf32: bool = True
    sparse_weights: bool = False
    profiles: list[ShapeProfile] = field(default_factory=list)
    workspace_mib: int = 4096
    builder_optimization_level: int = 3
    timing_cache: str | None = None
    plugin_libraries: list[PluginLibrary] = field(default_factory=list)
    layer_info: str | None = "model.layers.json"
    version: int = DESCRIPTION_VERSION

    def check(self) -> None:
        """Raise :class:`BuildDescriptionError` when the settings contradict each other."""
        if self.version != DESCRIPTION_VERSION:
            raise BuildDescriptionError(
                f"description version {self.version}; this code reads {DESCRIPTION_VERSION}"
            )
        unknown = sorted(set(self.precisions) - set(PRECISIONS))
        if unknown:
            raise BuildDescriptionError(f"unknown precisions {unknown}; known: {PRECISIONS}")
        if self.strongly_typed and self.precisions:
            raise BuildDescriptionError(
                "a strongly typed network takes its precisions from the graph's types; "
                f"precisions {self.precisions} apply to weakly typed networks only"
            )
        if self.workspace_mib < 1:
            raise BuildDescriptionError("workspace_mib must be at least 1")
        if not 0 <= self.builder_optimization_level <= 5:
            raise BuildDescriptionError("builder_optimization_level must be between 0 and 5")
        seen = set()
        for profile in self.profiles:
            if profile.input in seen:
                raise BuildDescriptionError(f"two profiles for input '{profile.input}'")
            seen.add(profile.input)
            profile.check()
        for library in self.plugin_libraries:
            library.check()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineBuildDescription:
        data = dict(data)
        data["profiles"] = [ShapeProfile(**p) for p in data.get("profiles", [])]
        data["plugin_libraries"] = [PluginLibrary(**p) for p in data.get("plugin_libraries", [])]
        try:
            description = cls(**data)
        except TypeError as exc:
            raise BuildDescriptionError(f"not a build description: {exc}") from exc
        description.check()
        return description


# --------------------------------------------------------------------------- trtexec
def _shape_spec(profiles: list[ShapeProfile], which: str) -> str:
    """trtexec's ``name:AxBxC,name2:...`` spec; names holding ':' or ',' are quoted."""
    parts = []
    for profile in profiles:
        name = profile.input
        if any(ch in name for ch in ":,'"):
            name = "'" + name.replace("'", "") + "'"
        dims = getattr(profile, which)
        parts.append(f"{name}:{'x'.join(str(d) for d in dims)}")
    return ",".join(parts)


def trtexec_command(
    description: EngineBuildDescription,
    *,
    onnx: str | None = None,
    engine: str | None = None,
    trtexec: str = "trtexec",
) -> list[str]:
    """The trtexec argument list that builds what :func:`build_engine` builds.

    Flag by flag: ``--stronglyTyped`` (TensorRT 10; a no-op in 11, where networks are always
    strongly typed), ``--fp16``/``--bf16`` for weakly typed networks, ``--noTF32``,
    ``--sparsity=enable``, ``--minShapes/--optShapes/--maxShapes``,
    ``--memPoolSize=workspace:<N>M``, ``--builderOptimizationLevel``, ``--timingCacheFile``,
    ``--staticPlugins``/``--dynamicPlugins``/``--setPluginsToSerialize``, and
    ``--profilingVerbosity=detailed --exportLayerInfo`` for the layer report.
    ``--skipInference`` because building is the job here.
    """
    description.check()
    args = [trtexec, f"--onnx={onnx or description.onnx}",
            f"--saveEngine={engine or description.engine}"]
    if description.strongly_typed:
        args.append("--stronglyTyped")
    args += [f"--{precision}" for precision in description.precisions]
    if not description.tf32:
        args.append("--noTF32")
    if description.sparse_weights:
        args.append("--sparsity=enable")
    if description.profiles:
        for which, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
            args.append(f"{flag}={_shape_spec(description.profiles, which)}")
    args.append(f"--memPoolSize=workspace:{description.workspace_mib}M")
    args.append(f"--builderOptimizationLevel={description.builder_optimization_level}")
    if description.timing_cache:
        args.append(f"--timingCacheFile={description.timing_cache}")
    for library in description.plugin_libraries:
        args.append(f"--{library.loading}Plugins={library.path}")
        if library.serialize:
            args.append(f"--setPluginsToSerialize={library.path}")
    args.append("--profilingVerbosity=detailed")
    if description.layer_info:
        args.append(f"--exportLayerInfo={description.layer_info}")
    args.append("--skipInference")
    return args


def shell_script(description: EngineBuildDescription) -> str:
    """``build_engine.sh``: the trtexec command, run from the script's own folder."""
    command = trtexec_command(description, trtexec='"${TRTEXEC:-trtexec}"')
    lines = [shlex.quote(a) if not a.startswith('"${') else a for a in command]
    body = " \\\n    ".join(lines)
    return (
        "#!/usr/bin/env bash\n"
        "# Build the TensorRT engine for this model with trtexec, on a machine with an NVIDIA\n"
        "# GPU and TensorRT. Written by optcc from the same build description that\n"
        "# build_engine.py and optcc's TensorRT backend use. Set TRTEXEC to pick a binary;\n"
        "# extra arguments are passed on to trtexec.\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f"{body} \\\n    \"$@\"\n"
    )


# --------------------------------------------------------------------------- GPU check
def gpu_present() -> tuple[bool, str]:
    """Whether an NVIDIA GPU and driver are visible, without initialising CUDA."""
    if not Path("/dev/nvidiactl").exists() and not Path("/dev/nvidia0").exists():
        if shutil.which("nvidia-smi") is None:
            return False, "no NVIDIA GPU or driver found (/dev/nvidia* and nvidia-smi absent)"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"nvidia-smi failed: {exc}"
        if out.returncode != 0 or "GPU" not in out.stdout:
            return False, "nvidia-smi lists no GPU"
    return True, ""


# --------------------------------------------------------------------------- building
@dataclass
class BuildPaths:
    """Where one build reads and writes (absolute, after command-line overrides)."""

    onnx: Path
    engine: Path
    timing_cache: Path | None
    layer_info: Path | None
    plugins: list[PluginLibrary]

    @classmethod
    def resolve(cls, description: EngineBuildDescription, base: Path) -> BuildPaths:
        def at(p: str | None) -> Path | None:
            return None if p is None else (Path(p) if os.path.isabs(p) else base / p)

        plugins = [PluginLibrary(str(at(lib.path)), lib.loading, lib.serialize)
                   for lib in description.plugin_libraries]
        onnx, engine = at(description.onnx), at(description.engine)
        assert onnx is not None and engine is not None
        return cls(onnx, engine, at(description.timing_cache), at(description.layer_info), plugins)

    def problems(self) -> list[str]:
        """Every missing input file or unwritable output folder, as messages."""
        found = []
        if not self.onnx.is_file():
            found.append(f"ONNX model not found: {self.onnx}")
        for library in self.plugins:
            if not Path(library.path).is_file():
                found.append(f"plugin library not found: {library.path}")
        outputs = [self.engine, self.timing_cache, self.layer_info]
        for path in (p for p in outputs if p is not None):
            folder = path.parent
            if not folder.is_dir():
                found.append(f"folder for {path.name} does not exist: {folder}")
            elif not os.access(folder, os.W_OK):
                found.append(f"folder for {path.name} is not writable: {folder}")
        if self.timing_cache is not None and self.timing_cache.is_dir():
            found.append(f"timing cache path is a folder: {self.timing_cache}")
        return found


def load_plugin_libraries(trt: Any, libraries: list[PluginLibrary]) -> list[Any]:
    """Load plugin libraries into TensorRT's registry; returns the handles to keep alive."""
    handles: list[Any] = []
    registry = trt.get_plugin_registry()
    for library in libraries:
        if library.loading == "static":
            handles.append(ctypes.CDLL(library.path, mode=ctypes.RTLD_GLOBAL))
            continue
        handle = registry.load_library(library.path)
        if handle is None:
            raise BuildDescriptionError(
                f"TensorRT could not load plugin library {library.path} (its plugins may "
                "already be registered, or it exports no plugin creators)"
            )
        handles.append(handle)
    return handles


def build_engine(description: EngineBuildDescription, paths: BuildPaths) -> dict[str, Any]:
    """Build and write the engine that ``description`` describes, with the TensorRT
    Python API; write the timing cache and the engine inspector's layer JSON.

    Returns facts about the build: TensorRT version, engine bytes, files written. Raises
    :class:`BuildDescriptionError` for a model the parser rejects or a failed build.
    """
    description.check()
    ok, reason = gpu_present()
    if not ok:  # creating TensorRT objects without a GPU driver can crash the process
        raise BuildDescriptionError(f"cannot build a TensorRT engine here: {reason}")
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.WARNING)
    plugin_handles = load_plugin_libraries(trt, paths.plugins)
    builder = trt.Builder(trt_logger)
    flags = 0
    if description.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(paths.onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildDescriptionError(
            "TensorRT's ONNX parser rejected the model: " + "; ".join(errors[:5])
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, description.workspace_mib << 20)
    config.builder_optimization_level = description.builder_optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if description.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if not description.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    for precision in description.precisions:
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise BuildDescriptionError(
                f"TensorRT {trt.__version__} has no {precision.upper()} builder flag (weakly "
                "typed precisions were removed in TensorRT 11); build strongly typed instead"
            )
        config.set_flag(flag)
    _add_profile(trt, builder, network, config, description.profiles)
    cache_bytes = b""
    if paths.timing_cache is not None and paths.timing_cache.is_file():
        cache_bytes = paths.timing_cache.read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialize = [lib.path for lib in paths.plugins if lib.serialize]
    if serialize:
        config.plugins_to_serialize = serialize
    config.progress_monitor = _progress_monitor(trt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildDescriptionError("TensorRT's builder failed (see the log above)")
    plan = bytes(serialized)
    _write_atomic(paths.engine, plan)
    files = [str(paths.engine)]
    if paths.timing_cache is not None:
        _write_atomic(paths.timing_cache, bytes(config.get_timing_cache().serialize()))
        files.append(str(paths.timing_cache))
    if paths.layer_info is not None:
        runtime = trt.Runtime(trt_logger)
        engine = runtime.deserialize_cuda_engine(plan)
        inspector = engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        _write_atomic(paths.layer_info, text.encode())
        files.append(str(paths.layer_info))
    del plugin_handles
    return {"tensorrt": trt.__version__, "engine_bytes": len(plan), "files": files}


def _add_profile(
    trt: Any, builder: Any, network: Any, config: Any, profiles: list[ShapeProfile]
) -> None:
    by_name = {p.input: p for p in profiles}
    missing = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape) and tensor.name not in by_name:
            missing.append(f"{tensor.name}{list(tensor.shape)}")
    if missing:
        raise BuildDescriptionError(
            "dynamic inputs without an optimization profile: " + ", ".join(missing)
        )
    if not profiles:
        return
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.input, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)


def _progress_monitor(trt: Any) -> Any:
    """A TensorRT progress monitor that logs build phases (engine builds take minutes)."""

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            logger.info("tensorrt: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            logger.debug("tensorrt: %s done", phase_name)

    return Monitor()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- engine report
_PRECISION_WORDS = (  # checked in order: the first word found in a format string wins
    ("bfloat16", "bf16"), ("bf16", "bf16"), ("fp8", "fp8"), ("fp4", "fp4"), ("int4", "int4"),
    ("uint8", "uint8"), ("int8", "int8"), ("fp16", "fp16"), ("half", "fp16"),
    ("fp32", "fp32"), ("float", "fp32"), ("int32", "int32"), ("int64", "int64"),
    ("bool", "bool"), ("double", "fp64"),
)


def _precision_of(fmt: str | None) -> str | None:
    text = (fmt or "").lower()
    for word, precision in _PRECISION_WORDS:
        if word in text:
            return precision
    return None


def summarize_layers(information: dict[str, Any] | str) -> dict[str, Any]:
    """Per-layer precision and sparse-tactic use from the engine inspector's JSON.

    A layer's precision is that of its first input's ``Format/Datatype`` (the output's when
    it has no inputs): for a quantized convolution that is INT8. A layer counts as using a
    sparse tactic when its kernel (``TacticName``) names a sparse kernel; TensorRT names
    its 2:4 kernels that way. Engines built without detailed profiling verbosity list only
    layer names: precision and tactic are then ``None``.
    """
    if isinstance(information, str):
        information = json.loads(information)
    layers = []
    for raw in information.get("Layers", []):
        entry = json.loads(raw) if isinstance(raw, str) and raw.lstrip().startswith("{") else raw
        if isinstance(entry, str):
            layers.append({"name": entry, "type": None, "precision": None, "tactic": None,
                           "sparse": None})
            continue
        inputs, outputs = entry.get("Inputs") or [], entry.get("Outputs") or []
        source = inputs[0] if inputs else (outputs[0] if outputs else {})
        tactic = entry.get("TacticName") or entry.get("Tactic")
        tactic = None if tactic is None else str(tactic)
        layers.append({
            "name": entry.get("Name"),
            "type": entry.get("LayerType"),
            "precision": _precision_of(source.get("Format/Datatype")),
            "output_precision": _precision_of(outputs[0].get("Format/Datatype")) if outputs else None,
            "tactic": tactic,
            "sparse": None if tactic is None else "sparse" in tactic.lower(),
        })
    counts: dict[str, int] = {}
    for layer in layers:
        key = layer["precision"] or "unknown"
        counts[key] = counts.get(key, 0) + 1
    return {
        "layers": layers,
        "precision_counts": counts,
        "sparse_layers": [layer["name"] for layer in layers if layer["sparse"]],
        "detailed": any(layer["type"] is not None for layer in layers),
    }


# --------------------------------------------------------------------------- command line
def _parser(description: EngineBuildDescription) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build_engine.py",
        description="Build the TensorRT engine for this model (TensorRT Python API). Paths "
        "are relative to this script's folder. The settings are those optcc computed; "
        "--print-trtexec shows the equivalent trtexec command.",
    )
    parser.add_argument("--onnx", default=description.onnx, help="ONNX model to build from")
    parser.add_argument("--engine", default=description.engine, help="engine file to write")
    parser.add_argument("--timing-cache", default=description.timing_cache,
                        help="timing cache to read and update (same GPU, CUDA and TensorRT)")
    parser.add_argument("--layer-info", default=description.layer_info,
                        help="where to write the engine inspector's layer JSON")
    parser.add_argument("--workspace-mib", type=int, default=description.workspace_mib)
    parser.add_argument("--opt-level", type=int, default=description.builder_optimization_level,
                        help="builder optimization level, 0-5")
    parser.add_argument("--plugin", action="append", default=[], metavar="LIB",
                        help="another plugin library to load dynamically (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the arguments and files, print the settings, build nothing "
                        "(needs no TensorRT)")
    parser.add_argument("--print-trtexec", action="store_true",
                        help="print the equivalent trtexec command and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(description_data: dict[str, Any], argv: list[str] | None = None,
         base: Path | None = None) -> int:
    """Entry point of the generated ``build_engine.py``. Exit 0 on success, 2 on a bad
    argument or missing file, 1 when TensorRT fails."""
    description = EngineBuildDescription.from_dict(description_data)
    args = _parser(description).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    description.onnx, description.engine = args.onnx, args.engine
    description.timing_cache, description.layer_info = args.timing_cache, args.layer_info
    description.workspace_mib = args.workspace_mib
    description.builder_optimization_level = args.opt_level
    description.plugin_libraries = [*description.plugin_libraries,
                                    *(PluginLibrary(p) for p in args.plugin)]
    try:
        description.check()
    except BuildDescriptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base = base or Path(__file__).resolve().parent
    if args.print_trtexec:
        print(shlex.join(trtexec_command(description)))
        return 0
    paths = BuildPaths.resolve(description, base)
    problems = paths.problems()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    if args.dry_run:
        print(json.dumps({"dry_run": True, "description": description.to_dict(),
                          "paths": {k: str(v) for k, v in asdict(paths).items() if k != "plugins"},
                          "trtexec": trtexec_command(description)}, indent=2))
        return 0
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a missing libnvonnxparser.so
        print(f"error: TensorRT's Python package does not import ({exc})", file=sys.stderr)
        print("hint: install TensorRT on this GPU machine (pip install tensorrt, from "
              "NVIDIA's package index), or use build_engine.sh with trtexec", file=sys.stderr)
        return 2
    try:
        info = build_engine(description, paths)
    except BuildDescriptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2))
    return 0


def standalone_script(description: EngineBuildDescription) -> str:
    """``build_engine.py``: this module's source with ``description`` embedded."""
    description.check()
    source = Path(__file__).read_text(encoding="utf-8")
    data = pprint.pformat(description.to_dict(), sort_dicts=False)
    return (
        "#!/usr/bin/env python3\n"
        "# Build the TensorRT engine for this model with TensorRT's Python API. Written by\n"
        "# optcc: the code below is optcc's own engine builder, with this build's settings\n"
        "# (DESCRIPTION, at the end) filled in. Needs Python 3.10+ and the tensorrt package;\n"
        "# `python build_engine.py --dry-run` checks everything without TensorRT.\n"
        f"{source}\n\n"
        f"DESCRIPTION = {data}\n\n"
        'if __name__ == "__main__":\n'
        "    sys.exit(main(DESCRIPTION))\n"
    )
