"""``optcc build``: recipe → validated plan → model → passes → backend artifact → reports.

The output folder is published atomically: everything is written into a sibling staging
folder (``.NAME.partial-PID``) which replaces the output folder only when the build has
succeeded. A failed build leaves the previous output untouched and moves its staging folder
to ``NAME.failed/`` (holding the reproducer and a partial report); an interrupted build
removes its staging folder. The input model and recipe are only ever read.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optcc import __version__
from optcc.data.base import DataSource, InputSpec
from optcc.errors import BuildInterrupted, DataError, OptccError, PassError, RecipeError
from optcc.frontend import load_model
from optcc.ir.model import Model
from optcc.ir.stats import model_stats
from optcc.passes.base import Capability, PassContext, Progress
from optcc.passes.manager import PassManager, ScheduledPass
from optcc.plugins import Registry, get_registry
from optcc.recipe.loader import Plan, available_capabilities, load_recipe

logger = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1


@dataclass
class BuildResult:
    """What a successful build produced."""

    output_dir: Path
    report: dict[str, Any]
    model: Model

    @property
    def artifact(self) -> Path:
        return self.output_dir / self.report["final"]["artifact"]["path"]


def make_sources(plan: Plan, specs: list[InputSpec]) -> dict[str, DataSource]:
    return {
        role: entry.cls(entry.options, inputs=specs, base_dir=plan.base_dir, role=role)
        for role, entry in plan.data.items()
    }


def verification_feeds(
    plan: Plan, sources: dict[str, DataSource], specs: list[InputSpec]
) -> tuple[dict[str, np.ndarray], str]:
    """The batch every pass is checked on, and where it came from."""
    from optcc.data.builtin import RandomOptions, RandomSource

    spec = plan.recipe.verification
    size = spec.batch_size
    order = [spec.source] if spec.source else ["evaluation", "calibration", "training"]
    for role in order:
        if role in sources:
            return sources[role].first_batch(size).inputs, role
        if spec.source and role != "random":
            raise DataError(
                f"verification.source is '{role}', but the recipe has no data.{role}"
            )
    random = RandomSource(
        RandomOptions(samples=size, seed=plan.recipe.seed), inputs=specs, role="verification"
    )
    return random.first_batch(size).inputs, "random"


def _publish(staging: Path, output: Path) -> None:
    """Swap ``staging`` in as ``output``; the old output is removed only afterwards."""
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.replace(output, old)
    try:
        os.replace(staging, output)
    except BaseException:
        if old.exists() and not output.exists():
            os.replace(old, output)
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _absolute_data(plan: Plan) -> dict[str, Any]:
    """The recipe's data section with file paths made absolute (the reproducer lives in
    another folder)."""
    data = {}
    for role, entry in dict(plan.raw.get("data") or {}).items():
        entry = dict(entry)
        if isinstance(entry.get("path"), str):
            entry["path"] = str(plan.resolve(entry["path"]))
        func = entry.get("function")
        if isinstance(func, str) and ".py:" in func:
            file, _, attr = func.rpartition(":")
            entry["function"] = f"{plan.resolve(file)}:{attr}"
        data[role] = entry
    return data


def _check_output_does_not_hold_inputs(plan: Plan, out_dir: Path) -> None:
    """Publishing replaces the output folder: it must not contain the model or the recipe."""
    inputs = [plan.file.resolve()]
    if plan.recipe.model.path:
        inputs.append(plan.resolve(plan.recipe.model.path).resolve())
    for path in inputs:
        if path == out_dir or out_dir in path.parents:
            raise RecipeError(
                f"the output folder {out_dir} contains the input {path}; a build replaces its "
                "output folder, so it would be lost",
                file=plan.file, hint="choose another 'output' (or -o) outside the input's folder",
            )


def _reproducer_recipe(plan: Plan) -> Any:
    def make(item: ScheduledPass) -> dict[str, Any]:
        recipe: dict[str, Any] = {"version": 1, "model": "model_before.onnx"}
        for key in ("target", "verification"):
            if key in plan.raw:
                recipe[key] = plan.raw[key]
        if plan.raw.get("data"):
            recipe["data"] = _absolute_data(plan)
        recipe["passes"] = [item.fragment]
        recipe["output"] = "out"
        return recipe

    return make


def build(
    recipe: str | Path | Plan,
    *,
    output: str | Path | None = None,
    progress: Progress | None = None,
    registry: Registry | None = None,
) -> BuildResult:
    """Run a recipe end to end and publish its output folder (see module docstring)."""
    registry = registry or get_registry()
    plan = recipe if isinstance(recipe, Plan) else load_recipe(recipe, registry)
    progress = progress or Progress()
    out_dir = Path(output).expanduser() if output is not None else plan.output_dir
    out_dir = out_dir.resolve()
    _check_output_does_not_hold_inputs(plan, out_dir)

    assert plan.backend_cls is not None
    backend = plan.backend_cls(plan.backend_options)
    backend.ensure_available()  # fail before any work when the target cannot be used

    progress.status(f"loading model ({plan.recipe.model.path or plan.recipe.model.torch})")
    original = load_model(plan)
    from optcc.runtime import OrtRunner

    specs = OrtRunner(original).input_specs
    sources = make_sources(plan, specs)
    for source in sources.values():
        source.first_batch()  # shape/dtype problems surface now, before any pass
    feeds, feeds_from = verification_feeds(plan, sources, specs)
    backend.check_model(original, feeds)  # e.g. TensorRT profiles: fail before any pass
    input_shapes = {name: [1, *arr.shape[1:]] for name, arr in feeds.items()}  # per sample

    evaluator = None
    if "evaluation" in sources and plan.recipe.evaluate != "none":
        from optcc.evaluate import Evaluator

        evaluator = Evaluator(sources["evaluation"], original, progress=progress)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    failed_dir = out_dir.with_name(out_dir.name + ".failed")
    workdir = staging / "work"
    workdir.mkdir()
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA_VERSION,
        "optcc_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "recipe": {"file": str(plan.file.resolve()), "name": plan.name},
        "model": {
            "source": original.source,
            "inputs": [s.describe() for s in specs],
            "outputs": [t.name for t in original.outputs],
        },
        "target": {
            "backend": backend.name,
            "options": backend.options.model_dump(mode="json"),
        },
        "verification": {"batch_size": int(next(iter(feeds.values())).shape[0]), "data": feeds_from},
        "metric": None,
        "passes": [],
    }
    try:
        started = time.perf_counter()
        original_stats = model_stats(original, input_shapes)
        original_metric = evaluator(original, "evaluating original") if evaluator else None
        if evaluator:
            report["metric"] = {"name": evaluator.metric, "data": sources["evaluation"].describe()}
        report["original"] = {
            **original_stats.to_dict(layers=False),
            "metric": original_metric,
        }

        caps = {Capability(c) for c in available_capabilities(plan) if c in {x.value for x in Capability}}
        ctx = PassContext(
            target=backend.name,
            data=sources,
            original=original,
            workdir=workdir,
            cache_dir=out_dir.with_name(out_dir.name + ".cache"),
            progress=progress,
            evaluate=evaluator,
            seed=plan.recipe.seed,
            capabilities=frozenset(caps),
        )
        scheduled = [
            ScheduledPass(
                pass_=p.cls(p.options), position=p.position, plugin=p.plugin, fragment=p.fragment
            )
            for p in plan.passes
        ]
        stages_dir = staging / "stages" if plan.recipe.output and plan.recipe.output.keep_stages else None
        manager = PassManager(
            scheduled,
            hook=registry.hook,
            verification_feeds=feeds,
            evaluate=evaluator if plan.recipe.evaluate == "each" else None,
            input_shapes=input_shapes,
            failure_dir=staging / "reproducer",
            stages_dir=stages_dir,
            pass_outputs_dir=staging / "passes",
            reproducer_recipe=_reproducer_recipe(plan),
        )
        report["passes"] = manager.records  # filled as passes finish, kept on failure
        final, records = manager.run(original, ctx)

        progress.status(f"compiling for {backend.name}")
        artifact = backend.compile(final, staging)
        original_latency = final_latency = original_artifact = None
        measurable, not_measured = backend.can_measure()
        if measurable:
            original_artifact = backend.compile(original, workdir / "original")
            latency_feeds = _latency_feeds(backend, sources, feeds)
            progress.status("measuring latency")
            original_latency = backend.measure_latency(original_artifact, latency_feeds)
            final_latency = backend.measure_latency(artifact, latency_feeds)
        else:
            progress.status(f"latency not measured: {not_measured}")
        artifact_check = backend.check_artifact(artifact, final, feeds)
        final_stats = model_stats(final, input_shapes)
        final_metric = (
            records[-1]["metric"] if records and records[-1]["metric"] is not None
            else (evaluator(final, "evaluating final") if evaluator else None)
        )
        report["original"]["latency"] = original_latency.to_dict() if original_latency else None
        report["final"] = {
            **final_stats.to_dict(layers=False),
            "metric": final_metric,
            "latency": final_latency.to_dict() if final_latency else None,
            "file_bytes": artifact.path.stat().st_size,
            "artifact": {
                "backend": artifact.backend,
                "path": artifact.path.name,
                "files": [f.relative_to(staging).as_posix() for f in artifact.files],
                "info": artifact.info,
                "check": artifact_check,
            },
        }
        if not measurable:
            report["final"]["latency_not_measured"] = not_measured
        if original_artifact is not None:
            report["original"]["file_bytes"] = original_artifact.path.stat().st_size
        report["layers"] = {
            "original": [layer.to_dict() for layer in original_stats.layers],
            "final": [layer.to_dict() for layer in final_stats.layers],
        }
        report["summary"] = _summary(report)
        report["seconds"] = round(time.perf_counter() - started, 3)
        report["status"] = "ok"
        shutil.rmtree(workdir, ignore_errors=True)
        from optcc.report import write_reports

        triton = plan.recipe.output.triton if plan.recipe.output else None
        if triton:
            from optcc.triton import export_triton

            options = triton.model_dump() if not isinstance(triton, bool) else {}
            report["triton"] = export_triton(staging, staging / "triton", report=report, **options)
        write_reports(report, staging)
        if int(os.environ.get("RANK", "0")) == 0:
            _publish(staging, out_dir)
        else:  # torchrun: every rank built the same model; rank 0 publishes it
            shutil.rmtree(staging, ignore_errors=True)
    except KeyboardInterrupt:
        shutil.rmtree(staging, ignore_errors=True)
        raise BuildInterrupted(
            f"build interrupted; {out_dir} was left as it was before the build"
        ) from None
    except BaseException as exc:
        _park_failure(staging, failed_dir, report, exc)
        if isinstance(exc, PassError) and exc.reproducer is not None:
            exc.reproducer = failed_dir / exc.reproducer.relative_to(staging)
            exc.hint = f"reproducer: {exc.reproducer}"
        if isinstance(exc, OptccError):
            note = f"partial report in {failed_dir}"
            exc.hint = f"{exc.hint}; {note}" if exc.hint else note
        raise
    registry.hook.optcc_build_finished(report=report, output_dir=out_dir)
    return BuildResult(output_dir=out_dir, report=report, model=final)


def _latency_feeds(
    backend: Any, sources: dict[str, DataSource], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    batch_size = backend.options.batch_size
    for role in ("evaluation", "calibration", "training"):
        if role in sources:
            return sources[role].first_batch(batch_size).inputs
    if batch_size:
        return {k: np.resize(v, (batch_size, *v.shape[1:])) for k, v in feeds.items()}
    return feeds


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b in (None, 0):
        return None
    return a / b  # type: ignore[operator]


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    orig, final = report["original"], report["final"]
    summary: dict[str, Any] = {
        "params_ratio": _ratio(final["params"], orig["params"]),
        "weight_bytes_ratio": _ratio(final["weight_bytes"], orig["weight_bytes"]),
        "flops_ratio": _ratio(final["flops"], orig["flops"]),
        "speedup": _ratio((orig.get("latency") or {}).get("median_ms"),
                          (final.get("latency") or {}).get("median_ms")),
    }
    metric = report.get("metric")
    if metric and orig.get("metric") and final.get("metric"):
        name = metric["name"]
        summary["metric_delta"] = final["metric"][name] - orig["metric"][name]
    return summary


def _park_failure(staging: Path, failed_dir: Path, report: dict[str, Any], exc: BaseException) -> None:
    """Keep a failed build's staging folder as NAME.failed/ with a partial report."""
    if not staging.exists():
        return
    report["status"] = "failed"
    report["error"] = {"type": type(exc).__name__, "message": str(exc)}
    try:
        import json

        (staging / "report.json").write_text(json.dumps(report, indent=2, default=str))
        shutil.rmtree(staging / "work", ignore_errors=True)
        if failed_dir.exists():
            shutil.rmtree(failed_dir)
        os.replace(staging, failed_dir)
    except OSError:
        logger.exception("could not keep the failed build's folder")
        shutil.rmtree(staging, ignore_errors=True)

