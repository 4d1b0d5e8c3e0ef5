"""The ``optcc`` command line: build | validate | passes | plugins | inspect | bench | lint |
predict | triton | schema.

A user mistake (any :class:`optcc.OptccError`) prints one ``error:`` line, maybe a
``hint:`` line, and exits with status 2; an interrupted build exits 130; anything else is
a bug in optcc and keeps its traceback (status 70). SIGTERM interrupts like Ctrl-C (status
143). File-system errors (permissions, a full or read-only disk) are user errors too.
Heavy libraries are imported inside the commands, so ``optcc --help`` is fast and needs
neither torch nor onnxruntime.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_BUG = 70


# --------------------------------------------------------------------------- output helpers
def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (CI logs, files) gets a wide fixed width instead of rich's 80 columns.
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def _table(title: str | None, headers: list[str], rows: Iterable[list[str]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(_esc(cell) for cell in row))  # cells are data, never markup
    return table


def _esc(text: Any) -> str:
    from rich.markup import escape

    return escape(str(text))


class RichProgress:
    """Progress bars on stderr for long steps (passes, evaluation, latency)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.console = _console(stderr=True)
        self.interactive = sys.stderr.isatty()

    def track(
        self, iterable: Iterable[T], *, description: str, total: int | None = None
    ) -> Iterator[T]:
        if not self.enabled:
            yield from iterable
            return
        if not self.interactive:  # logs: one line per step, no redrawn bars
            self.console.print(f"[dim]• {_esc(description)}[/dim]")
            yield from iterable
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=True) as bar:
            yield from bar.track(iterable, total=total, description=description)

    def status(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[dim]• {_esc(message)}[/dim]")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _warn_plugin_errors(registry: Any, quiet: bool) -> None:
    if quiet:
        return
    err = _console(stderr=True)
    for error in registry.errors:
        err.print(f"[yellow]warning:[/yellow] {_esc(error)}")


# --------------------------------------------------------------------------- commands
def cmd_build(args: argparse.Namespace) -> int:
    from optcc.build import build
    from optcc.plugins import get_registry
    from optcc.report import (
        LATENCY_HEADERS,
        PASS_HEADERS,
        latency_rows,
        pass_rows,
    )

    registry = get_registry()
    _warn_plugin_errors(registry, args.quiet or args.json)
    progress = RichProgress(enabled=not (args.quiet or args.json))
    result = build(args.recipe, output=args.output, progress=progress, registry=registry)
    report = result.report
    if args.json:
        _print_json(report)
        return 0
    if args.quiet:
        print(result.output_dir)
        return 0
    console = _console()
    console.print(_table("passes", PASS_HEADERS, pass_rows(report)))
    if latency_rows(report):
        console.print(_table("latency", LATENCY_HEADERS, latency_rows(report)))
    summary = report["summary"]
    bits = []
    if summary.get("params_ratio") is not None:
        bits.append(f"params ×{summary['params_ratio']:.3f}")
    if summary.get("speedup") is not None:
        bits.append(f"speed-up ×{summary['speedup']:.2f}")
    if summary.get("metric_delta") is not None:
        bits.append(f"{report['metric']['name']} {100 * summary['metric_delta']:+.2f} pts")
    console.print(_esc(", ".join(bits)))
    console.print(_esc(f"wrote {result.output_dir} ({report['final']['artifact']['path']}, "
                       "report.json, report.md)"))
    engine = (report["final"]["artifact"].get("info") or {}).get("engine")
    if engine is not None and not engine.get("built"):
        console.print(_esc(f"engine not built here ({engine['reason']}); to build it on a GPU "
                           f"machine: bash {result.output_dir}/build_engine.sh, or python "
                           f"{result.output_dir}/build_engine.py"))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from optcc.build import validate
    from optcc.errors import RecipeErrors
    from optcc.plugins import get_registry

    registry = get_registry()
    _warn_plugin_errors(registry, args.json)
    try:
        plan = validate(args.recipe, output=args.output, registry=registry)
    except RecipeErrors as exc:
        if not args.json:
            raise
        _print_json({"recipe": str(args.recipe), "valid": False, "errors": [
            {"file": e.file, "line": e.line, "col": e.col, "message": e.bare_message, "hint": e.hint}
            for e in exc.errors]})
        return EXIT_USER_ERROR
    info = {
        "recipe": str(plan.file),
        "valid": True,
        "model": plan.recipe.model.path or plan.recipe.model.torch,
        "target": plan.recipe.target.backend,
        "data": {role: d.source for role, d in plan.data.items()},
        "passes": [{"name": p.name, "plugin": p.plugin, "line": p.line} for p in plan.passes],
        "output": str(plan.output_folder(args.output)),
    }
    if args.json:
        _print_json(info)
    else:
        names = " → ".join(p.name for p in plan.passes) or "(no passes)"
        print(f"{plan.file}: ok — {names} → {info['target']}")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from optcc.plugins import get_registry
    from optcc.recipe.schema import describe_options

    registry = get_registry()
    if args.data:
        items = registry.data_sources
        kind = "data source"
    else:
        items = registry.passes
        kind = "pass"
    if args.name:
        if args.name not in items:
            from optcc.errors import OptccError
            from optcc.recipe import suggest

            raise OptccError(f"unknown {kind} '{args.name}'", hint=suggest(args.name, list(items)))
        items = {args.name: items[args.name]}
    rows = []
    for name, cls in sorted(items.items()):
        options = describe_options(cls.Options)
        entry = {
            "name": name,
            "plugin": registry.owner.get((kind, name)),
            "summary": cls.summary,
            "options": options,
        }
        if kind == "pass":
            entry["requires"] = sorted(getattr(r, "value", str(r)) for r in cls.requires)
            entry["tolerance"] = cls.tolerance.describe()
        rows.append(entry)
    if args.json:
        _print_json(rows)
        return 0
    console = _console()
    for entry in rows:
        console.print(
            f"[bold]{entry['name']}[/bold]  ({_esc(entry['plugin'])})  {_esc(entry['summary'])}"
        )
        if kind == "pass":
            console.print(_esc(f"  tolerance: {entry['tolerance']}; requires: "
                               f"{', '.join(entry['requires']) or 'nothing'}"))
        for opt in entry["options"]:
            default = "required" if opt["required"] else f"default {opt['default']!r}"
            console.print(f"  [cyan]{opt['name']}[/cyan]: "
                          + _esc(f"{opt['type']} ({default}) {opt['description']}"))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from optcc.plugins import get_registry

    registry = get_registry()
    backends = []
    for name, cls in sorted(registry.backends.items()):
        ok, reason = cls.is_available()
        backends.append({"name": name, "available": ok, "reason": reason,
                         "install_hint": None if ok else cls.install_hint})
    if args.json:
        _print_json({"plugins": [p.to_dict() for p in registry.plugins], "backends": backends})
    else:
        console = _console()
        rows = []
        for p in registry.plugins:
            provides = ", ".join(p.passes + p.data_sources + p.backends) or "–"
            status = "[red]failed[/red]: " + p.error if p.error else "ok"
            rows.append([p.name, p.version or "?", p.distribution or "?", provides, status])
        console.print(_table("plugins", ["plugin", "version", "package", "provides", "status"], rows))
        rows = [[b["name"], "yes" if b["available"] else "no",
                 b["reason"] + (f" — {b['install_hint']}" if b["install_hint"] else "")]
                for b in backends]
        console.print(_table("backends", ["backend", "available", "why not"], rows))
    return 1 if registry.errors else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from optcc.ir import Model, model_stats
    from optcc.report import fmt_bytes, fmt_int

    model = Model.load(args.model)
    stats = model_stats(model, _parse_shapes(args.shape))
    nm = _nm_compliance(model, args.sparsity_pattern)
    info = {
        "model": str(args.model),
        "file_bytes": Path(args.model).stat().st_size,
        "opset": model.opset,
        "inputs": [f"{t.name}{list(t.shape or [])} {t.dtype.__name__ if hasattr(t.dtype, '__name__') else t.dtype}"
                   for t in model.inputs],
        "outputs": [t.name for t in model.outputs],
        **stats.to_dict(),
        "nm_compliance": {"pattern": args.sparsity_pattern, "layers": list(nm.values())},
        "history": model.meta.history,
    }
    if args.json:
        _print_json(info)
        return 0
    console = _console()
    console.print(f"[bold]{_esc(args.model)}[/bold]  opset {model.opset}, {stats.nodes} nodes, "
                  f"{fmt_int(stats.params)} params, {fmt_bytes(stats.weight_bytes)} of weights, "
                  f"{fmt_int(stats.flops)} FLOPs/sample, file {fmt_bytes(info['file_bytes'])}")
    console.print(_esc(f"inputs: {', '.join(info['inputs'])}; outputs: {', '.join(info['outputs'])}"))
    console.print(f"sparsity of weighted layers: {100 * stats.sparsity:.1f} %; "
                  f"INT8 coverage: {100 * stats.int8_coverage:.1f} %")
    console.print(_table("ops", ["op", "count"], [[k, str(v)] for k, v in stats.op_histogram.items()]))
    rows = [[layer.name, layer.op, "×".join(map(str, layer.weight_shape)), fmt_int(layer.params),
             fmt_int(layer.flops), f"{100 * layer.sparsity:.1f} %", _nm_cell(nm.get(layer.name)),
             layer.precision + (" W8A8" if layer.int8 else "")] for layer in stats.layers]
    console.print(_table("layers", ["layer", "op", "weight", "params", "FLOPs", "sparsity",
                                    args.sparsity_pattern, "precision"], rows))
    console.print(_esc(_nm_summary(args.sparsity_pattern, nm)))
    if model.meta.history:
        console.print(_esc("passes applied: " + " → ".join(h["pass"] for h in model.meta.history)))
    return 0


def _nm_compliance(model: Any, pattern: str) -> dict[str, dict[str, Any]]:
    """Per-layer N:M compliance rows (``optcc.sparse.layer_compliance``) by layer name."""
    from optcc.errors import OptccError
    from optcc.sparse import layer_compliance

    try:
        return {row["name"]: row for row in layer_compliance(model, pattern)}
    except ValueError as exc:
        raise OptccError(f"--sparsity-pattern: {exc}") from exc


def _nm_cell(row: dict[str, Any] | None) -> str:
    if row is None or row["status"] == "n/a":
        return "–"
    if row["status"] == "nearly":
        return f"nearly ({row['violating']} groups off)"
    return str(row["status"])


def _nm_summary(pattern: str, nm: dict[str, dict[str, Any]]) -> str:
    counts = {s: sum(r["status"] == s for r in nm.values()) for s in ("complies", "nearly", "no")}
    text = (f"{pattern} compliance: {counts['complies']} layer(s) comply, {counts['nearly']} nearly, "
            f"{counts['no']} do not, {sum(r['status'] == 'n/a' for r in nm.values())} cannot "
            "(reduction length not a multiple of M, depthwise)")
    if counts["nearly"]:
        text += "; `optcc lint` names the groups that break it"
    return text + ". Sparse tensor cores need NVIDIA GPUs: ONNX Runtime on CPU gains no speed."


def _parse_shapes(values: list[str] | None) -> dict[str, list[int]] | None:
    if not values:
        return None
    from optcc.errors import OptccError

    shapes = {}
    for value in values:
        name, _, dims = value.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError as exc:
            raise OptccError(f"--shape '{value}': expected NAME=D1,D2,...") from exc
    return shapes


def cmd_bench(args: argparse.Namespace) -> int:
    from optcc.backends.base import Artifact
    from optcc.data.builtin import RandomOptions, RandomSource
    from optcc.errors import OptccError
    from optcc.ir import Model
    from optcc.plugins import get_registry
    from optcc.recipe import suggest
    from optcc.runtime import OrtRunner

    registry = get_registry()
    cls = registry.backends.get(args.backend)
    if cls is None:
        raise OptccError(f"unknown backend '{args.backend}'", hint=suggest(args.backend, list(registry.backends)))
    backend = cls(cls.Options(threads=args.threads, warmup=args.warmup, runs=args.runs))
    results = []
    for path in [args.model, *(args.compare or [])]:
        model = Model.load(path)
        specs = OrtRunner(model).input_specs
        dims = dict(_parse_dims(args.dim))
        source = RandomSource(RandomOptions(samples=args.batch_size, dims=dims), inputs=specs)
        feeds = source.first_batch(args.batch_size).inputs
        artifact = Artifact(backend=backend.name, path=Path(path))
        if backend.name != "onnxruntime":
            import tempfile

            artifact = backend.compile(model, Path(tempfile.mkdtemp(prefix="optcc-bench-")))
        lat = backend.measure_latency(artifact, feeds)
        results.append({"model": str(path), **lat.to_dict()})
    if len(results) > 1:
        for r in results[1:]:
            r["speedup_vs_first"] = results[0]["median_ms"] / r["median_ms"]
    if args.json:
        _print_json(results)
        return 0
    rows = [[r["model"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", str(r["batch_size"]),
             str(r["threads"] or "default"), f"{r.get('speedup_vs_first', 1.0):.2f}×"] for r in results]
    _console().print(_table(f"latency on {backend.name}",
                            ["model", "median ms", "p90 ms", "batch", "threads", "vs first"], rows))
    return 0


def _parse_dims(values: list[str] | None) -> Iterator[tuple[str, int]]:
    from optcc.errors import OptccError

    for value in values or []:
        name, _, size = value.partition("=")
        if not size.isdigit():
            raise OptccError(f"--dim '{value}': expected NAME=SIZE, e.g. sequence=128")
        yield name, int(size)


def cmd_lint(args: argparse.Namespace) -> int:
    from optcc.ir import Model
    from optcc.lint import lint_tensorrt

    profiles = _lint_profiles(args)
    findings = lint_tensorrt(Model.load(args.model), profiles=profiles)
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    if args.json:
        _print_json([f.to_dict() for f in findings])
    else:
        for finding in findings:
            print(finding)
        print(f"{args.model}: {errors} error(s), {warnings} warning(s), "
              f"{len(findings) - errors - warnings} note(s) against TensorRT's ONNX parser, "
              "Q/DQ and 2:4 sparsity rules")
    return 1 if errors else 0


def _lint_profiles(args: argparse.Namespace) -> list[Any] | None:
    """trtexec-style --min/--opt/--max-shapes (name:1x3x224x224,...) as profile entries."""
    from optcc.backends.trt_build import ShapeProfile
    from optcc.errors import OptccError

    specs = {"min": args.min_shapes, "opt": args.opt_shapes, "max": args.max_shapes}
    if not any(specs.values()):
        return None
    parsed: dict[str, dict[str, list[int]]] = {}
    for which, text in specs.items():
        for item in filter(None, (text or "").split(",")):
            name, _, dims = item.rpartition(":")
            try:
                parsed.setdefault(name.strip("'"), {})[which] = [int(d) for d in dims.split("x")]
            except ValueError as exc:
                raise OptccError(f"--{which}-shapes '{item}': expected NAME:D1xD2x...") from exc
    profiles = []
    for name, shapes in parsed.items():
        opt = shapes.get("opt") or shapes.get("max") or shapes.get("min")
        profiles.append(ShapeProfile(name, shapes.get("min", opt), opt, shapes.get("max", opt)))
    return profiles


def cmd_predict(args: argparse.Namespace) -> int:
    import os

    import numpy as np

    from optcc.errors import OptccError
    from optcc.predict import load, load_npz

    feeds = load_npz(args.input)
    out = Path(args.output) if args.output else None
    if out is not None:
        if out.suffix != ".npz":
            raise OptccError(f"-o {out}: the output file must end in .npz")
        if out.exists() and not args.overwrite:
            raise OptccError(f"{out} exists; it is left as it is", hint="pass --overwrite to replace it")
        if not out.parent.is_dir():
            raise OptccError(f"-o {out}: folder {out.parent} does not exist")
    predictor = load(args.folder, backend=args.backend, batch_size=args.batch_size)
    outputs = predictor.predict(feeds)
    if out is not None:
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
        try:
            np.savez(tmp, **outputs)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    summary = {"backend": predictor.backend, "model": predictor.source,
               "samples": int(next(iter(feeds.values())).shape[0]) if feeds else 0,
               "outputs": {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in outputs.items()},
               "written": str(out) if out else None}
    if args.json:
        _print_json(summary)
    else:
        shapes = ", ".join(f"{k}{v['shape']} {v['dtype']}" for k, v in summary["outputs"].items())
        where = f"; wrote {out}" if out else ""
        print(f"{summary['samples']} sample(s) on {predictor.backend}: {shapes}{where}")
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from optcc.triton import export_triton

    result = export_triton(
        args.folder, args.repository or Path(args.folder) / "triton", name=args.name,
        backend=args.backend, max_batch_size=args.max_batch_size,
        dynamic_batching=not args.no_dynamic_batching, instance_kind=args.kind,
        instance_count=args.instances,
    )
    if args.json:
        _print_json(result)
    else:
        print(f"wrote {result['repository']}/{result['model']} ({result['platform']}, "
              f"max_batch_size {result['max_batch_size']})")
        for note in result["notes"]:
            print(f"note: {note}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    from optcc.plugins import ENTRY_POINT_GROUP, create_registry, get_registry
    from optcc.recipe import json_schema

    if args.builtin:  # optcc's own passes only (the schema committed in docs/)
        eps = [ep for ep in md.entry_points(group=ENTRY_POINT_GROUP)
               if ep.dist is not None and ep.dist.metadata["Name"] == "optcc"]
        registry = create_registry(entry_points=eps)
    else:
        registry = get_registry()
    schema = json_schema(registry)
    text = json.dumps(schema, indent=2, default=str) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


# --------------------------------------------------------------------------- parser
def make_parser() -> argparse.ArgumentParser:
    from optcc import __version__

    parser = argparse.ArgumentParser(
        prog="optcc",
        description="Compress a neural network with a recipe of passes and lower it to ONNX "
        "Runtime or TensorRT.",
    )
    parser.add_argument("--version", action="version", version=f"optcc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("build", help="run a recipe and write the output folder")
    p.add_argument("recipe", help="recipe YAML file (or a recipe name a plugin ships)")
    p.add_argument("-o", "--output", help="output folder (overrides the recipe's 'output')")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the output folder")
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("validate", help="check a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", help="the output folder a build would use (as for build)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("passes", help="list passes (or data sources) and their options")
    p.add_argument("name", nargs="?", help="show one pass")
    p.add_argument("--data", action="store_true", help="list data sources instead")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("plugins", help="list plugins, their versions and load errors; backends")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("inspect", help="ops, parameters, sparsity (and 2:4 compliance) and INT8 coverage of a model")
    p.add_argument("model")
    p.add_argument("--shape", action="append", metavar="NAME=D1,D2,...",
                   help="concrete input shape for FLOPs (dynamic dims default to 1)")
    p.add_argument("--sparsity-pattern", default="2:4", metavar="N:M",
                   help="N:M pattern whose per-layer compliance is shown (default 2:4)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="measure a model's latency on a backend")
    p.add_argument("model")
    p.add_argument("--compare", nargs="+", metavar="MODEL", help="more models, same inputs")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dim", action="append", metavar="NAME=SIZE",
                   help="size of a named dynamic dimension (e.g. sequence=128)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("lint", help="check a model against TensorRT's ONNX parser, Q/DQ and 2:4 sparsity rules")
    p.add_argument("model")
    for which in ("min", "opt", "max"):
        p.add_argument(f"--{which}-shapes", metavar="NAME:D1xD2,...",
                       help=f"optimization profile {which} shapes, as trtexec takes them")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("predict", help="run a build's artifact on inputs from an .npz file")
    p.add_argument("folder", help="the output folder of 'optcc build'")
    p.add_argument("-i", "--input", required=True, help=".npz with one array per model input")
    p.add_argument("-o", "--output", help=".npz to write the outputs to")
    p.add_argument("--backend", help="run with this backend instead of the one that built it "
                   "(e.g. onnxruntime for a TensorRT output on a machine without a GPU)")
    p.add_argument("--batch-size", type=int, help="samples per run (default: from the build)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("triton", help="export a build as a Triton Inference Server model")
    p.add_argument("folder", help="the output folder of 'optcc build'")
    p.add_argument("-r", "--repository", help="model repository folder (default: FOLDER/triton)")
    p.add_argument("--name", help="model name (default: the recipe's name)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"],
                   help="artifact to serve (default: the engine if built, else the ONNX model)")
    p.add_argument("--max-batch-size", type=int, help="Triton max_batch_size (0: no batching)")
    p.add_argument("--no-dynamic-batching", action="store_true")
    p.add_argument("--kind", choices=["gpu", "cpu"], help="instance kind (default: gpu, or cpu "
                   "for an onnxruntime build)")
    p.add_argument("--instances", type=int, default=1, help="instances per device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("schema", help="write the recipe JSON Schema (for editors)")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.add_argument("--builtin", action="store_true",
                   help="optcc's own passes only, not those of other installed plugins")
    p.set_defaults(func=cmd_schema)
    return parser


@contextlib.contextmanager
def _sigterm_like_ctrl_c() -> Iterator[list[int]]:
    """SIGTERM (``kill``, torchrun, a CI timeout) interrupts like Ctrl-C while a command
    runs: the build cleans up and says where its output stands; the exit status is 143."""
    import signal
    import threading

    received: list[int] = []  # truthy once SIGTERM has arrived
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USER_ERROR
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    with _sigterm_like_ctrl_c() as terminated:
        code = _run(args)
    return EXIT_TERMINATED if terminated and code == EXIT_INTERRUPTED else code


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command and turn its outcome into an exit status (module docstring)."""
    from optcc.errors import BuildInterrupted, OptccError
    from optcc.resources import os_error

    try:
        return int(args.func(args) or 0)
    except BuildInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OptccError as exc:
        for error in getattr(exc, "errors", [exc]):  # RecipeErrors: every error, in file order
            print(f"error: {error}", file=sys.stderr)
            if error.hint:
                print(f"hint: {error.hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the environment (permissions, full disk, ...), not a bug
        mapped = os_error(exc, "file system error")
        if mapped is None:
            raise
        print(f"error: {mapped}", file=sys.stderr)
        print(f"hint: {mapped.hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception:
        import traceback

        traceback.print_exc()
        print("internal error: this is a bug in optcc; please report it with the traceback "
              "above", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
