"""``optcc build``: recipe → validated plan → model → passes → backend artifact → reports.

:func:`build` reads as the sequence it runs. The output folder's life (ownership, staging,
the journaled publish, repair after a crash, what a failed or interrupted build leaves) is
:mod:`optcc.output`'s job; this module loads the inputs, runs the passes, lowers the result
and assembles the report. The input model, recipe and data are only ever read.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optcc import __version__
from optcc.data.base import DataSource, InputSpec
from optcc.errors import DataError, ModelError, OptccError, PassError, RecipeError, RecipeErrors
from optcc.frontend import load_model
from optcc.ir.model import Model
from optcc.ir.stats import model_stats
from optcc.output import OutputFolder, fault_point
from optcc.passes.base import Capability, PassContext, Progress
from optcc.passes.manager import PassManager, ScheduledPass
from optcc.plugins import Registry, get_registry
from optcc.recipe.loader import (
    Plan,
    available_capabilities,
    load_recipe,
    option_paths,
    plan_recipe,
    sort_errors,
)
from optcc.resources import os_error

logger = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
NO_INPUTS = "the model has no inputs: there is nothing to feed it or check it on"


@dataclass
class BuildResult:
    """What a successful build produced."""

    output_dir: Path
    report: dict[str, Any]
    model: Model

    @property
    def artifact(self) -> Path:
        return self.output_dir / self.report["final"]["artifact"]["path"]


@dataclass
class Setup:
    """Everything loaded and checked before the first pass."""

    backend: Any
    original: Model
    specs: list[InputSpec]
    sources: dict[str, DataSource]
    feeds: dict[str, np.ndarray]
    feeds_from: str
    input_shapes: dict[str, list[int]]
    evaluator: Any = None


def build(
    recipe: str | Path | Plan,
    *,
    output: str | Path | None = None,
    progress: Progress | None = None,
    registry: Registry | None = None,
) -> BuildResult:
    """Run a recipe end to end and publish its output folder.

    Ctrl-C (or SIGTERM through the CLI) raises :class:`BuildInterrupted` saying where the
    output stands; a failure keeps its staging folder as ``OUT.failed/``.
    """
    registry = registry or get_registry()
    plan = recipe if isinstance(recipe, Plan) else load_recipe(recipe, registry)
    progress = progress or Progress()
    rank = int(os.environ.get("RANK", "0") or 0)  # torchrun: every rank builds, rank 0 publishes
    backend = make_backend(plan)  # fails before any work when the target cannot be used
    folder = OutputFolder(
        plan.output_folder(output), inputs=plan.input_files(), publish=rank == 0, rank=rank
    )
    with folder:  # lock, repair, clean up, refuse what is not optcc's, stage
        setup = prepare(plan, backend, progress)
        fault_point("build:prepared")
        report = new_report(plan, setup)
        started = time.perf_counter()
        try:
            final = run_passes(plan, setup, registry, folder, report, progress)
            lower(setup, final, folder, report, progress)
            export_triton(plan, folder, report)
            report["seconds"] = round(time.perf_counter() - started, 3)
            report["status"] = "ok"
            fault_point("build:compiled")
            from optcc.report import write_reports

            write_reports(report, folder.staging)
            folder.publish()
        except Exception as exc:
            _keep_failure(folder, report, exc)
            raise
        if folder.published:  # once, by the process that published (rank 0 under torchrun)
            registry.hook.optcc_build_finished(report=report, output_dir=folder.path)
            folder.adopt_new_files()  # what the hook wrote there belongs to this build
    return BuildResult(output_dir=folder.path, report=report, model=final)


def validate(
    recipe: str | Path, *, output: str | Path | None = None, registry: Registry | None = None
) -> Plan:
    """Check a recipe as far as a build would before its first pass, running no pass:
    the schema, the output folder, the backend's availability, that the model loads, and
    that every data source's first batch fits the model's inputs. ``callable`` sources and
    torch factories are user code: they are only looked up, not run. Raises
    :class:`RecipeErrors` with every problem, in file order."""
    registry = registry or get_registry()
    plan, errors = plan_recipe(recipe, registry)
    if plan is not None:
        errors += environment_problems(plan, output)
    if errors:
        raise RecipeErrors(sort_errors(errors))
    assert plan is not None
    return plan


def environment_problems(plan: Plan, output: str | Path | None = None) -> list[RecipeError]:
    """What a build of ``plan`` would refuse before its first pass, as recipe errors at the
    line of the section concerned (the part of :func:`validate` beyond the schema)."""
    found: list[RecipeError] = []

    def add(loc: tuple[str, ...], message: str, hint: str | None = None) -> None:
        found.append(plan.located.error(message, loc, hint=hint))

    try:
        _environment_checks(plan, output, add)
    except OSError as exc:  # a path the file system rejects (too long, no permission, ...)
        mapped = os_error(exc, "checking the recipe's files")
        add((), str(mapped) if mapped else f"cannot check the recipe's files: {exc}",
            mapped.hint if mapped else None)
    return found


def _environment_checks(plan: Plan, output: str | Path | None, add: Any) -> None:
    from optcc._objects import find_object_problem
    from optcc.output import REFUSE_HINT

    out_loc = ("output",) if output is None else ()
    try:
        folder = OutputFolder(plan.output_folder(output), inputs=plan.input_files())
        for problem in folder.problems():
            add(out_loc, problem, REFUSE_HINT)
    except OptccError as exc:
        add(out_loc, exc.message, exc.hint)
    if plan.backend_cls is not None:
        try:  # the backend's own answer: a tensorrt target lowers without TensorRT
            plan.backend_cls(plan.backend_options).ensure_available()
        except OptccError as exc:
            add(("target",), exc.message, exc.hint)
    try:
        specs = _model_input_specs(plan)
    except OptccError as exc:
        add(("model",), exc.message, exc.hint)
        for role, entry in plan.data.items():  # what can be checked without the model
            for key, value in dict(entry.options).items():
                for path in option_paths(plan, key, value):
                    if not path.exists():
                        add(("data", role), f"data.{role}: {path} not found")
        return
    complete = True  # every source read: the verification batch can be checked too
    for role, entry in plan.data.items():
        function = getattr(entry.options, "function", None)
        if isinstance(function, str):  # user code: look it up, do not run it
            problem = find_object_problem(function, base_dir=plan.base_dir)
            if problem:
                add(("data", role), f"data.{role}: {problem}")
            complete = False
            continue
        try:
            make_sources(plan, specs, roles=[role])[role].first_batch()
        except OptccError as exc:
            add(("data", role), exc.message, exc.hint)
            complete = False
    if complete:
        try:
            verification_feeds(plan, make_sources(plan, specs), specs)
        except OptccError as exc:
            add(("verification",), exc.message, exc.hint)


def _model_input_specs(plan: Plan) -> list[InputSpec]:
    """The model's inputs as a build would see them; a torch model's from the recipe (its
    factory is looked up, not run)."""
    spec = plan.recipe.model
    if spec.torch:
        from optcc._objects import find_object_problem

        problem = find_object_problem(spec.torch, base_dir=plan.base_dir)
        if problem:
            raise ModelError(f"model factory {problem}")
        return [InputSpec(i.name, tuple(i.shape), np.dtype(i.dtype)) for i in spec.inputs]
    from optcc.runtime import OrtRunner

    model = load_model(plan)
    specs = OrtRunner(model).input_specs
    if not specs:
        raise ModelError(NO_INPUTS, path=model.source)
    return specs


def make_sources(
    plan: Plan, specs: list[InputSpec], roles: list[str] | None = None
) -> dict[str, DataSource]:
    return {
        role: entry.cls(entry.options, inputs=specs, base_dir=plan.base_dir, role=role)
        for role, entry in plan.data.items() if roles is None or role in roles
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
    return random.first_batch(size).inputs, random.describe()


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


def make_backend(plan: Plan) -> Any:
    """The recipe's backend, checked to be usable on this machine."""
    assert plan.backend_cls is not None
    backend = plan.backend_cls(plan.backend_options)
    backend.ensure_available()
    return backend


def prepare(plan: Plan, backend: Any, progress: Progress) -> Setup:
    """Load the model and data and check them against each other, before any pass."""
    progress.status(f"loading model ({plan.recipe.model.path or plan.recipe.model.torch})")
    original = load_model(plan)
    from optcc.runtime import OrtRunner

    specs = OrtRunner(original).input_specs
    if not specs:
        raise ModelError(NO_INPUTS, path=original.source)
    sources = make_sources(plan, specs)
    for source in sources.values():
        source.first_batch()  # shape/dtype problems surface now, before any pass
    feeds, feeds_from = verification_feeds(plan, sources, specs)
    backend.check_model(original, feeds)  # e.g. TensorRT profiles: fail before any pass
    evaluator = None
    if "evaluation" in sources and plan.recipe.evaluate != "none":
        from optcc.evaluate import Evaluator

        evaluator = Evaluator(sources["evaluation"], original, progress=progress)
    return Setup(
        backend=backend, original=original, specs=specs, sources=sources, feeds=feeds,
        feeds_from=feeds_from, evaluator=evaluator,
        input_shapes={name: [1, *arr.shape[1:]] for name, arr in feeds.items()},  # per sample
    )


def new_report(plan: Plan, setup: Setup) -> dict[str, Any]:
    """The report as it stands before the first pass (a failed build keeps this much)."""
    return {
        "schema": REPORT_SCHEMA_VERSION,
        "optcc_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "recipe": {"file": str(plan.file.resolve()), "name": plan.name},
        "model": {
            "source": setup.original.source,
            "inputs": [s.describe() for s in setup.specs],
            "outputs": [t.name for t in setup.original.outputs],
        },
        "target": {
            "backend": setup.backend.name,
            "options": setup.backend.options.model_dump(mode="json"),
        },
        "verification": {
            "batch_size": int(next(iter(setup.feeds.values())).shape[0]),
            "data": setup.feeds_from,
        },
        "metric": None,
        "passes": [],
    }


def run_passes(
    plan: Plan, setup: Setup, registry: Registry, folder: OutputFolder,
    report: dict[str, Any], progress: Progress,
) -> Model:
    """Measure the original, then run the recipe's passes under the pass manager."""
    evaluator, original = setup.evaluator, setup.original
    original_stats = model_stats(original, setup.input_shapes)
    original_metric = evaluator(original, "evaluating original") if evaluator else None
    if evaluator:
        report["metric"] = {"name": evaluator.metric, "data": setup.sources["evaluation"].describe()}
    report["original"] = {**original_stats.to_dict(layers=False), "metric": original_metric}
    report["layers"] = {"original": [layer.to_dict() for layer in original_stats.layers]}

    known = {c.value for c in Capability}
    caps = {Capability(c) for c in available_capabilities(plan) if c in known}
    folder.workdir.mkdir(exist_ok=True)
    ctx = PassContext(
        target=setup.backend.name, data=setup.sources, original=original,
        workdir=folder.workdir, cache_dir=folder.cache, progress=progress,
        evaluate=evaluator, seed=plan.recipe.seed, capabilities=frozenset(caps),
    )
    scheduled = [
        ScheduledPass(pass_=p.cls(p.options), position=p.position, plugin=p.plugin, fragment=p.fragment)
        for p in plan.passes
    ]
    keep_stages = plan.recipe.output is not None and plan.recipe.output.keep_stages
    manager = PassManager(
        scheduled,
        hook=registry.hook,
        verification_feeds=setup.feeds,
        evaluate=evaluator if plan.recipe.evaluate == "each" else None,
        input_shapes=setup.input_shapes,
        failure_dir=folder.staging / "reproducer",
        stages_dir=folder.staging / "stages" if keep_stages else None,
        pass_outputs_dir=folder.staging / "passes",
        reproducer_recipe=_reproducer_recipe(plan),
    )
    report["passes"] = manager.records  # filled as passes finish, kept on failure
    final, _ = manager.run(original, ctx)
    if manager.batch_checks is not None:
        report["verification"]["batch_checks"] = manager.batch_checks.summary()
    return final


def lower(
    setup: Setup, final: Model, folder: OutputFolder, report: dict[str, Any], progress: Progress
) -> None:
    """Compile the final model; where the backend can run here, compile the original too and
    measure both; check the artifact against the model; complete the report."""
    backend, staging = setup.backend, folder.staging
    progress.status(f"compiling for {backend.name}")
    artifact = backend.compile(final, staging)
    original_latency = final_latency = original_artifact = None
    measurable, not_measured = backend.can_measure()
    if measurable:
        original_artifact = backend.compile(setup.original, folder.workdir / "original")
        latency_feeds = _latency_feeds(backend, setup.sources, setup.feeds)
        progress.status("measuring latency")
        original_latency = backend.measure_latency(original_artifact, latency_feeds)
        final_latency = backend.measure_latency(artifact, latency_feeds)
    else:
        progress.status(f"latency not measured: {not_measured}")
    artifact_check = backend.check_artifact(artifact, final, setup.feeds)
    final_stats = model_stats(final, setup.input_shapes)
    records = report["passes"]
    final_metric = (
        records[-1]["metric"] if records and records[-1]["metric"] is not None
        else (setup.evaluator(final, "evaluating final") if setup.evaluator else None)
    )
    report["original"]["latency"] = original_latency.to_dict() if original_latency else None
    if original_artifact is not None:
        report["original"]["file_bytes"] = original_artifact.path.stat().st_size
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
    report["layers"]["final"] = [layer.to_dict() for layer in final_stats.layers]
    report["summary"] = _summary(report)


def export_triton(plan: Plan, folder: OutputFolder, report: dict[str, Any]) -> None:
    """Write the Triton model repository into the output when the recipe asks for one."""
    triton = plan.recipe.output.triton if plan.recipe.output else None
    if not triton:
        return
    from optcc.triton import export_triton as export

    options = triton.model_dump() if not isinstance(triton, bool) else {}
    report["triton"] = export(folder.staging, folder.staging / "triton", report=report, **options)


def _keep_failure(folder: OutputFolder, report: dict[str, Any], exc: Exception) -> None:
    """Park the failed build as OUT.failed/ and point the error's hints at it."""
    failed = folder.park_failure(report, exc)
    if failed is None:
        return
    if isinstance(exc, PassError) and exc.reproducer is not None:
        moved = failed / exc.reproducer.relative_to(folder.staging)
        exc.hint = (exc.hint or "").replace(str(exc.reproducer), str(moved)) or f"reproducer: {moved}"
        exc.reproducer = moved
    if isinstance(exc, OptccError):
        note = f"partial report in {failed}"
        exc.hint = f"{exc.hint}; {note}" if exc.hint else note


def _latency_feeds(
    backend: Any, sources: dict[str, DataSource], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    batch_size = backend.options.batch_size
    for role in ("evaluation", "calibration", "training"):
        if role in sources:
            return sources[role].first_batch(batch_size).inputs
    if batch_size:
        from optcc.resources import check_allocation

        check_allocation(sum(batch_size * v[:1].nbytes for v in feeds.values()),
                         f"latency inputs of batch size {batch_size}",
                         hint="lower target.batch_size")
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


