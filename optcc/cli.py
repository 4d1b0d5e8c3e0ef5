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
from collections.abc import Callable, Iterable, Iterator
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


_STDERR_CONSOLE: Any = None


def _stderr_console() -> Any:
    """The one stderr console: progress bars and log messages share it, so a message is
    printed above a live bar instead of through it."""
    global _STDERR_CONSOLE
    if _STDERR_CONSOLE is None:
        _STDERR_CONSOLE = _console(stderr=True)
    return _STDERR_CONSOLE


class _ConsoleLogHandler(logging.Handler):
    """Log records on the shared stderr console (above any live progress bar)."""

    STYLES = {"WARNING": "yellow", "ERROR": "red", "CRITICAL": "red"}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            style = self.STYLES.get(record.levelname, "dim")
            _stderr_console().print(
                f"[{style}]{record.levelname.lower()}:[/{style}] {_esc(self.format(record))}"
            )
        except Exception:
            self.handleError(record)


def _setup_logging(verbose: int) -> None:
    """Log to the terminal through the progress display's console: warnings and errors by
    default, -v info, -vv debug. Python warnings (deprecations and the like from torch,
    onnxruntime and others) are logged at INFO, so they never land on the progress display
    unless asked for."""
    import warnings

    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ConsoleLogHandler)]:
        root.removeHandler(handler)
    handler = _ConsoleLogHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.setLevel(logging.WARNING - 10 * min(verbose, 2))
    root.addHandler(handler)
    root.setLevel(min(logging.INFO, handler.level))  # INFO is kept in the build's build.log

    def log_warning(message: Any, category: type[Warning], filename: str, lineno: int,
                    file: Any = None, line: str | None = None) -> None:
        logging.getLogger("py.warnings").info(
            "%s: %s (%s:%d)", category.__name__, message, filename, lineno
        )

    warnings.showwarning = log_warning


def _table(title: str | None, headers: list[str], rows: Iterable[list[str]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:  # cells are data, never markup; a rich Text cell carries its own style
        table.add_row(*(cell if hasattr(cell, "stylize") else _esc(cell) for cell in row))
    return table


def _esc(text: Any) -> str:
    from rich.markup import escape

    return escape(str(text))


_PROGRESS_LOG = logging.getLogger("optcc.progress")


class RichProgress:
    """Progress on stderr for long steps (passes, evaluation, latency): a bar with a total
    and time left where the count is known (explicitly, or from the iterable's length hint,
    which data sources provide), one line per step when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.console = _stderr_console()
        self.interactive = sys.stderr.isatty()

    def track(
        self, iterable: Iterable[T], *, description: str, total: int | None = None
    ) -> Iterator[T]:
        import operator

        if total is None:
            total = operator.length_hint(iterable) or None
        _PROGRESS_LOG.info("%s%s", description, f" ({total} steps)" if total else "")
        if not self.enabled:
            yield from iterable
            return
        if not self.interactive:  # logs: one line per step, no redrawn bars
            count = f" ({total} steps)" if total else ""
            self.console.print(f"[dim]• {_esc(description)}{count}[/dim]")
            yield from iterable
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn()]
        if total:
            columns.append(TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            yield from bar.track(iterable, total=total, description=description)

    def status(self, message: str) -> None:
        _PROGRESS_LOG.info("%s", message)
        if self.enabled:
            self.console.print(f"[dim]• {_esc(message)}[/dim]")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _warn_plugin_errors(registry: Any, quiet: bool) -> None:
    if quiet:
        return
    err = _stderr_console()
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
        summary_line,
        warnings_of,
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
    console.print(_esc(summary_line(report)))
    for warning in warnings_of(report):
        _stderr_console().print(f"[yellow]warning:[/yellow] {_esc(warning)}")
    files = report.get("files") or [report["final"]["artifact"]["path"], "report.json"]
    console.print(_esc(f"wrote {result.output_dir}/: {', '.join(files)}"))
    if "report.html" in files:
        console.print(_esc(f"the full report: {result.output_dir / 'report.html'}"))
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
    from optcc.recipe.schema import bounds_text, describe_options

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
            entry["tolerance_explained"] = cls.tolerance.explain()
        rows.append(entry)
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    console = _console()
    for entry in rows:
        console.print(f"[bold]{entry['name']}[/bold]  [dim](plugin {_esc(entry['plugin'])})[/dim]")
        console.print(f"  {_esc(entry['summary'])}")
        if kind == "pass":
            console.print(f"  [dim]tolerance:[/dim] {_esc(entry['tolerance_explained'])}")
            console.print(f"  [dim]requires:[/dim]  {_esc(', '.join(entry['requires']) or 'nothing')}")
        grid = Table.grid(padding=(0, 2))
        for column in ("name", "type", "default", "description"):
            grid.add_column(column, overflow="fold", ratio=3 if column == "description" else None)
        for opt in entry["options"]:
            if kind == "pass" and opt["name"] == "tolerance":
                continue  # the tolerance line above says it
            kind_text = opt["type"] + (f", {bounds_text(opt['bounds'])}" if opt["bounds"] else "")
            default = "required" if opt["required"] else f"default {_show_default(opt['default'])}"
            grid.add_row(f"  [cyan]{_esc(opt['name'])}[/cyan]", _esc(kind_text), _esc(default),
                         _esc(opt["description"]))
        if grid.row_count:
            console.print(grid)
        console.print()
    return 0


def _show_default(value: Any) -> str:
    """A default as a recipe would spell it (YAML flow style)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...")


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
        from rich.text import Text

        console = _console()
        rows = []
        for p in registry.plugins:
            provides = ", ".join(p.passes + p.data_sources + p.backends) or "–"
            status = Text.assemble(("failed", "red"), f": {p.error}") if p.error else Text("ok", "green")
            rows.append([p.name, p.version or "?", p.distribution or "?", provides, status])
        console.print(_table("plugins", ["plugin", "version", "package", "provides", "status"], rows))
        rows = [[b["name"], Text("yes", "green") if b["available"] else Text("no", "red"),
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
    from optcc.backends.base import Artifact, speedup_between
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
    backend = cls(cls.Options(threads=args.threads, warmup=args.warmup, runs=args.runs,
                              rounds=args.rounds))
    paths = [args.model, *(args.compare or [])]
    models = {path: Model.load(path) for path in paths}
    specs = {path: OrtRunner(model).input_specs for path, model in models.items()}
    if not args.force:
        _check_same_inputs(specs)
    dims = dict(_parse_dims(args.dim))
    feeds_of = {
        path: RandomSource(RandomOptions(samples=args.batch_size, dims=dims), inputs=inputs)
        .first_batch(args.batch_size).inputs
        for path, inputs in specs.items()
    }
    artifacts = {}
    for path, model in models.items():
        artifact = Artifact(backend=backend.name, path=Path(path))
        if backend.name != "onnxruntime":
            import tempfile

            artifact = backend.compile(model, Path(tempfile.mkdtemp(prefix="optcc-bench-")))
        artifacts[path] = artifact
    # Same inputs: one set of arrays for all. --force: each model its own random inputs.
    timed = backend.compare_latency(artifacts, feeds_of[args.model],
                                    own_feeds=feeds_of if args.force else None)
    results = [{"model": str(path), **timed[path].to_dict()} for path in paths]
    warnings = []
    for result, path in zip(results[1:], paths[1:], strict=True):
        speedup = speedup_between(timed[args.model], timed[path])
        result["speedup_vs_first"] = speedup.ratio
        result["speedup_range"] = [speedup.low, speedup.high]
        if speedup.warning():
            warnings.append(f"{path}: {speedup.warning()}")
    if args.json:
        _print_json(results)
        return 0
    rows = [[r["model"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}",
             f"{100 * r['spread']:.0f} %", str(r["batch_size"]), str(r["threads"] or "default"),
             _speedup_cell(r)] for r in results]
    console = _console()
    console.print(_table(f"latency on {backend.name} ({results[0]['rounds']} interleaved rounds)",
                         ["model", "median ms", "p90 ms", "spread", "batch", "threads", "vs first"],
                         rows))
    for warning in warnings:
        _stderr_console().print(f"[yellow]warning:[/yellow] {_esc(warning)}")
    return 0


def _speedup_cell(result: dict[str, Any]) -> str:
    if "speedup_vs_first" not in result:
        return "1.00×"
    low, high = result["speedup_range"]
    return f"{result['speedup_vs_first']:.2f}× ({low:.2f}–{high:.2f})"


def _check_same_inputs(specs: dict[str, list[Any]]) -> None:
    """``bench --compare`` feeds every model the same arrays: their inputs must agree in
    names, ranks and static dimensions."""
    from optcc.errors import OptccError

    (first, reference), *others = specs.items()
    for path, inputs in others:
        problems = []
        ref_by_name = {spec.name: spec for spec in reference}
        names = {spec.name for spec in inputs}
        if names != set(ref_by_name):
            problems.append(f"input names {sorted(names)} vs {sorted(ref_by_name)}")
        for spec in inputs:
            ref = ref_by_name.get(spec.name)
            if ref is None:
                continue
            if len(spec.shape) != len(ref.shape):
                problems.append(f"'{spec.name}' has rank {len(spec.shape)} vs {len(ref.shape)}")
                continue
            for axis, (a, b) in enumerate(zip(spec.shape, ref.shape, strict=True)):
                if isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b:
                    problems.append(f"'{spec.name}' dimension {axis} is {a} vs {b}")
            if spec.dtype != ref.dtype:
                problems.append(f"'{spec.name}' is {spec.dtype.name} vs {ref.dtype.name}")
        if problems:
            raise OptccError(
                f"{path} does not take the same inputs as {first}: {'; '.join(problems)}",
                hint="bench --compare times every model on the same arrays; pass --force to "
                "time each on random inputs of its own shape",
            )


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
    elif args.list_all:
        for finding in findings:
            print(finding)
    else:
        for line in _grouped_findings(findings):
            print(line)
    if not args.json:
        print(f"{args.model}: {errors} error(s), {warnings} warning(s), "
              f"{len(findings) - errors - warnings} note(s) against TensorRT's ONNX parser, "
              "Q/DQ and 2:4 sparsity rules")
    return 1 if errors else 0


LINT_NODES_SHOWN = 3


def _grouped_findings(findings: list[Any]) -> list[str]:
    """One line per rule (errors first): the count, the message, the first few nodes."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for finding in findings:
        groups.setdefault((finding.severity, finding.rule), []).append(finding)
    lines = []
    rank = {"error": 0, "warning": 1}
    for (severity, rule), group in sorted(groups.items(), key=lambda kv: rank.get(kv[0][0], 2)):
        if len(group) == 1:
            lines.append(str(group[0]))
            continue
        messages = {f.message for f in group}
        message = group[0].message + ("" if len(messages) == 1 else " (and similar)")
        nodes = ", ".join(f.node for f in group[:LINT_NODES_SHOWN])
        more = len(group) - LINT_NODES_SHOWN
        where = nodes + (f" and {more} more (--verbose lists all)" if more > 0 else "")
        lines.append(f"{severity}: [{rule}] {len(group)} nodes: {message}\n    at {where}")
    return lines


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
class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and appends every option's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is argparse.SUPPRESS or action.required
                or not action.option_strings):
            return text
        if action.nargs == 0 and action.default is False:  # on/off flags
            return f"{text} (default: off)"
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} (got {value})")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _command(sub: Any, name: str, summary: str, description: str, examples: str) -> Any:
    """A subcommand whose --help has a description and examples."""
    import textwrap

    return sub.add_parser(
        name, help=summary, description=textwrap.fill(description, 88),
        formatter_class=_HelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines()),
    )


def make_parser() -> argparse.ArgumentParser:
    from optcc import __version__

    parser = argparse.ArgumentParser(
        prog="optcc",
        description="Compress a neural network with a recipe of passes and lower it to ONNX "
        "Runtime or TensorRT.",
        formatter_class=_HelpFormatter,
        epilog="examples:\n  optcc build recipes/quickstart.yaml\n  optcc passes prune-channels\n"
        "  optcc COMMAND --help     (every command's options, defaults and examples)",
    )
    parser.add_argument("--version", action="version", version=f"optcc {__version__}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output: -v info (exporter and library messages), -vv debug")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    json_help = "print the result as JSON on stdout (for scripts)"
    recipe_help = "recipe YAML file, or the name of a recipe a plugin ships"

    p = _command(sub, "build", "run a recipe and write the output folder",
                 "Run a recipe: load the model, run its passes (each one verified), compile for "
                 "the target, time original and final round-robin, and publish the output folder "
                 "(model, report.html, report.md, report.json, plots/).",
                 "optcc build recipes/quickstart.yaml\n"
                 "optcc build recipe.yaml -o out/try2 --quiet\n"
                 "optcc -v build recipe.yaml          (also show library messages)")
    p.add_argument("recipe", help=recipe_help)
    p.add_argument("-o", "--output", metavar="DIR",
                   help="output folder (default: the recipe's 'output', else out/<recipe name> "
                   "beside the recipe)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress or tables; print only the output folder")
    p.add_argument("--json", action="store_true", help="print report.json on stdout, no progress")
    p.set_defaults(func=cmd_build)

    p = _command(sub, "validate", "check a recipe without running it",
                 "Check everything a build would check before running a pass, and report every "
                 "problem at once: YAML, every pass, option, type and range, the output folder, "
                 "the backend, that the model loads, that each data source's first batch fits "
                 "the model, and that each pass's needs (calibration or training data, torch, "
                 "CUDA) are met. User code (torch factories, callable sources) is looked up, "
                 "not run.",
                 "optcc validate recipes/quickstart.yaml\noptcc validate recipe.yaml -o out/try2\n"
                 "optcc validate recipe.yaml --json")
    p.add_argument("recipe", help=recipe_help)
    p.add_argument("-o", "--output", metavar="DIR",
                   help="the output folder a build would use, as for build (default: the "
                   "recipe's 'output')")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_validate)

    p = _command(sub, "passes", "list passes (or data sources) and their options",
                 "List every pass (or data source) of every installed plugin with its options: "
                 "type, bounds, default and meaning, plus the pass's tolerance and needs.",
                 "optcc passes\noptcc passes quantize-int8\noptcc passes --data npz\n"
                 "optcc passes --json")
    p.add_argument("name", nargs="?", help="show only this pass (or data source)")
    p.add_argument("--data", action="store_true", help="list data sources instead of passes")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_passes)

    p = _command(sub, "plugins", "list plugins, their versions and load errors; backends",
                 "List installed plugins (name, version, package, what they provide, load "
                 "errors) and backends (available here or not, why, how to install). Exits 1 "
                 "when a plugin failed to load.",
                 "optcc plugins\noptcc plugins --json")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_plugins)

    p = _command(sub, "inspect", "ops, parameters, sparsity (and 2:4 compliance) and INT8 "
                 "coverage of a model",
                 "Describe an ONNX model: op histogram, parameters, weight bytes, FLOPs per "
                 "sample, per-layer shapes, sparsity, N:M compliance and precision, and the "
                 "passes optcc applied.",
                 "optcc inspect out/quickstart/model.onnx\n"
                 "optcc inspect bert.onnx --shape input_ids=1,128 --shape attention_mask=1,128\n"
                 "optcc inspect model.onnx --sparsity-pattern 1:4")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--shape", action="append", metavar="NAME=D1,D2,...",
                   help="concrete input shape for FLOPs; repeat per input (default: dynamic "
                   "dimensions set to 1)")
    p.add_argument("--sparsity-pattern", default="2:4", metavar="N:M",
                   help="N:M pattern whose per-layer compliance is shown")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_inspect)

    p = _command(sub, "bench", "measure and compare models' latency on a backend",
                 "Time one or more models on random inputs, round-robin: interleaved rounds, "
                 "so that load from other processes hits every model alike. Reports median, "
                 "p90 and the spread between rounds, and each model's speed-up over the first "
                 "with its range across rounds.",
                 "optcc bench model.onnx --threads 1 --batch-size 32\n"
                 "optcc bench original.onnx --compare out/quickstart/model.onnx --threads 1\n"
                 "optcc bench bert.onnx --dim sequence=128 --rounds 10")
    p.add_argument("model", help="ONNX file (the reference for --compare)")
    p.add_argument("--compare", nargs="+", metavar="MODEL",
                   help="more models to time against the first, on the same inputs")
    p.add_argument("--force", action="store_true",
                   help="compare models even when their inputs differ (each gets random inputs "
                   "of its own shape)")
    p.add_argument("--backend", default="onnxruntime", help="backend to time on")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                   help="samples per inference")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="intra-op threads (default: the runtime's choice, usually all cores)")
    p.add_argument("--runs", type=_positive_int, default=30, metavar="N",
                   help="timed runs per model, spread over the rounds")
    p.add_argument("--rounds", type=_positive_int, default=5, metavar="N",
                   help="interleaved timing rounds")
    p.add_argument("--warmup", type=_non_negative_int, default=5, metavar="N",
                   help="untimed runs per model before timing")
    p.add_argument("--dim", action="append", metavar="NAME=SIZE",
                   help="size of a named dynamic dimension, e.g. sequence=128; repeatable "
                   "(default: 1)")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_bench)

    p = _command(sub, "lint", "check a model against TensorRT's ONNX parser, Q/DQ and 2:4 "
                 "sparsity rules",
                 "Check any ONNX model against TensorRT's ONNX parser, explicit-quantization and "
                 "2:4 sparsity rules. Prints one line per rule broken with the number of nodes "
                 "and the first few; exits 1 when there are errors.",
                 "optcc lint model_int8.onnx\noptcc lint model_int8.onnx --verbose\n"
                 "optcc lint model.onnx --min-shapes image:1x1x8x8 --max-shapes image:64x1x8x8\n"
                 "optcc lint model_int8.onnx --json")
    p.add_argument("model", help="ONNX file")
    for which in ("min", "opt", "max"):
        p.add_argument(f"--{which}-shapes", metavar="NAME:D1xD2,...",
                       help=f"optimization profile {which} shapes, as trtexec takes them "
                       "(default: none; profile checks are skipped)")
    p.add_argument("--verbose", "--all", dest="list_all", action="store_true",
                   help="one line per finding instead of one line per rule")
    p.add_argument("--json", action="store_true", help="print every finding as JSON")
    p.set_defaults(func=cmd_lint)

    p = _command(sub, "predict", "run a build's artifact on inputs from an .npz file",
                 "Load the artifact of an 'optcc build' output folder (ONNX Runtime model or "
                 "TensorRT engine) and run it on the arrays of an .npz file, in batches.",
                 "optcc predict out/quickstart -i images.npz -o outputs.npz\n"
                 "optcc predict out/trt --backend onnxruntime -i images.npz --json")
    p.add_argument("folder", help="the output folder of 'optcc build'")
    p.add_argument("-i", "--input", required=True, metavar="NPZ",
                   help=".npz with one array per model input (required)")
    p.add_argument("-o", "--output", metavar="NPZ",
                   help=".npz to write the outputs to (default: none; only a summary is printed)")
    p.add_argument("--backend", help="run with this backend instead of the one that built it "
                   "(e.g. onnxruntime for a TensorRT output on a machine without a GPU; "
                   "default: the build's backend)")
    p.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help="samples per run (default: from the build)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_predict)

    p = _command(sub, "triton", "export a build as a Triton Inference Server model",
                 "Write a Triton model repository entry (config.pbtxt and the model file) for "
                 "the artifact of an 'optcc build' output folder.",
                 "optcc triton out/quickstart\n"
                 "optcc triton out/trt -r /models --name digits --max-batch-size 64")
    p.add_argument("folder", help="the output folder of 'optcc build'")
    p.add_argument("-r", "--repository", metavar="DIR",
                   help="model repository folder (default: FOLDER/triton)")
    p.add_argument("--name", help="model name (default: the recipe's name)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"],
                   help="artifact to serve (default: the engine if built, else the ONNX model)")
    p.add_argument("--max-batch-size", type=_non_negative_int, metavar="N",
                   help="Triton max_batch_size, 0 for no batching (default: from the build)")
    p.add_argument("--no-dynamic-batching", action="store_true",
                   help="do not enable Triton's dynamic batcher")
    p.add_argument("--kind", choices=["gpu", "cpu"], help="instance kind (default: gpu, or cpu "
                   "for an onnxruntime build)")
    p.add_argument("--instances", type=_positive_int, default=1, metavar="N",
                   help="instances per device")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_triton)

    p = _command(sub, "schema", "write the recipe JSON Schema (for editors)",
                 "Write a JSON Schema for recipes, covering the passes, data sources and "
                 "backends of every installed plugin; yaml-language-server uses it for "
                 "completion and checking.",
                 "optcc schema -o recipe.schema.json\noptcc schema --builtin -o docs/recipe.schema.json")
    p.add_argument("-o", "--output", metavar="FILE", help="file to write (default: stdout)")
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
    _setup_logging(args.verbose)
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
        internal = getattr(exc, "internal", False)  # a built-in pass's unexpected exception
        if internal and exc.__cause__ is not None:
            import traceback

            traceback.print_exception(exc.__cause__)
        for error in getattr(exc, "errors", [exc]):  # RecipeErrors: every error, in file order
            print(f"error: {error}", file=sys.stderr)
            if error.hint:
                print(f"hint: {error.hint}", file=sys.stderr)
        return EXIT_BUG if internal else EXIT_USER_ERROR
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
