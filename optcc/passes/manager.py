"""The pass manager: runs passes in order and checks each one's work.

For every pass:

1. the ``optcc_before_pass`` hook;
2. its requirements are checked (:class:`PreconditionError`);
3. it runs on a private copy of the model; any exception becomes a :class:`PassError` that
   names the pass, its position, its plugin and the passes that ran before it;
4. the result is verified: ONNX checker (full), strict shape inference, and a run on the
   verification batch compared with the previous model's outputs within the pass's
   tolerance (:class:`VerificationError`, :class:`ToleranceError`); the batch checks of
   :mod:`optcc.passes.batch` run it at batch 1 and an odd batch size too, and fail a pass
   whose model no longer runs there or lets samples influence each other;
5. statistics are recorded (time, parameters, bytes, FLOPs, sparsity, INT8 coverage, the
   metric, the largest output change) and the ``optcc_after_pass`` hook is called.

On failure a reproducer — the model before the failing pass, a one-pass recipe and the
error — is written to ``failure_dir`` and ``optcc_pass_failed`` is called.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from optcc.errors import (
    ModelError,
    OptccError,
    PassError,
    PluginError,
    PreconditionError,
    ToleranceError,
    VerificationError,
)
from optcc.ir.model import Model
from optcc.ir.stats import model_stats
from optcc.ir.verify import verify_model
from optcc.passes.base import Pass, PassContext, PassResult
from optcc.passes.batch import BatchChecker
from optcc.runtime import OrtRunner

logger = logging.getLogger(__name__)


@dataclass
class ScheduledPass:
    """A configured pass in a pipeline, with where it came from."""

    pass_: Pass
    position: int
    plugin: str | None = None
    fragment: Any = None


def output_difference(
    new: list[np.ndarray], old: list[np.ndarray]
) -> tuple[float, float]:
    """The largest absolute output change, and the largest finite reference magnitude.

    NaN and infinities never pass for "no change": a value that is not finite in one
    model but is in the other, or a different non-finite value (NaN, +inf, -inf), counts as
    an infinite change. Python's ``max`` would skip a NaN; numpy's reductions are used on
    the finite values only.
    """
    worst = 0.0
    scale = 0.0
    for a, b in zip(new, old, strict=True):
        if a.shape != b.shape:
            return float("inf"), 0.0
        a64 = a.astype(np.float64)
        b64 = b.astype(np.float64)
        finite_a, finite_b = np.isfinite(a64), np.isfinite(b64)
        if not np.array_equal(finite_a, finite_b) or not np.array_equal(
            a64[~finite_a], b64[~finite_b], equal_nan=True
        ):
            return float("inf"), scale
        if finite_a.any():
            worst = max(worst, float(np.max(np.abs(a64[finite_a] - b64[finite_a]))))
            scale = max(scale, float(np.max(np.abs(b64[finite_b]))))
    return worst, scale


def nonfinite_outputs(
    new: list[np.ndarray], old: list[np.ndarray], names: list[str]
) -> str | None:
    """Which outputs became NaN or infinite where the previous model's were finite, in
    words; None when none did."""
    found = []
    for name, a, b in zip(names, new, old, strict=False):
        if a.dtype.kind not in "fc" or a.shape != b.shape:
            continue
        fresh = ~np.isfinite(a) & np.isfinite(b)
        if fresh.any():
            nan = int(np.isnan(a[fresh]).sum())
            inf = int(fresh.sum()) - nan
            parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} infinite"] * bool(inf)
            found.append(f"output '{name}' has {' and '.join(parts)} value(s)")
    if not found:
        return None
    return "; ".join(found) + " on the verification batch, where the model before it had finite values"


class PassManager:
    """Runs a pipeline of :class:`ScheduledPass` over a model."""

    def __init__(
        self,
        passes: list[ScheduledPass],
        *,
        hook: Any,
        verification_feeds: dict[str, np.ndarray],
        evaluate: Callable[..., dict[str, float]] | None = None,
        input_shapes: dict[str, list[int]] | None = None,
        failure_dir: Path | None = None,
        stages_dir: Path | None = None,
        pass_outputs_dir: Path | None = None,
        reproducer_recipe: Callable[[ScheduledPass], dict[str, Any]] | None = None,
    ) -> None:
        self.passes = passes
        self.hook = hook
        self.feeds = verification_feeds
        self.evaluate = evaluate
        self.input_shapes = input_shapes
        self.failure_dir = failure_dir
        self.stages_dir = stages_dir
        self.pass_outputs_dir = pass_outputs_dir
        self.reproducer_recipe = reproducer_recipe
        self.records: list[dict[str, Any]] = []
        self.batch_checks: BatchChecker | None = None

    def run(self, model: Model, ctx: PassContext) -> tuple[Model, list[dict[str, Any]]]:
        """Run every pass; return the final model and one report record per pass."""
        records = self.records
        records.clear()
        current = model
        runner = OrtRunner(current)
        reference_outputs = runner.run(self.feeds)
        self.batch_checks = BatchChecker.baseline(
            runner, self.feeds, reference_outputs, static_batch=_static_batch(model)
        )
        ran: list[str] = []
        for item in self.passes:
            ctx.position = item.position
            ctx.progress.status(f"pass {item.position}/{len(self.passes)}: {item.pass_.name}")
            current, reference_outputs, record = self._run_one(
                item, current, reference_outputs, ctx, ran
            )
            records.append(record)
            ran.append(item.pass_.name)
            ctx.stages[item.pass_.name] = current
        return current, records

    def _fail(
        self, item: ScheduledPass, error: PassError, before: Model, ctx: PassContext
    ) -> PassError:
        reproducer = self._write_reproducer(item, error, before)
        error.reproducer = reproducer
        if reproducer is not None:
            error.hint = (error.hint + "; " if error.hint else "") + f"reproducer: {reproducer}"
        try:
            self.hook.optcc_pass_failed(
                pass_=item.pass_, error=error, ctx=ctx, position=item.position,
                reproducer=reproducer,
            )
        except Exception:  # a broken failure hook must not hide the real error
            logger.exception("optcc_pass_failed hook raised")
        return error

    def _run_one(
        self,
        item: ScheduledPass,
        before: Model,
        reference_outputs: list[np.ndarray],
        ctx: PassContext,
        ran: list[str],
    ) -> tuple[Model, list[np.ndarray], dict[str, Any]]:
        p = item.pass_
        common = {"pass_name": p.name, "position": item.position, "plugin": item.plugin,
                  "ran_before": list(ran)}
        try:
            self.hook.optcc_before_pass(pass_=p, model=before, ctx=ctx, position=item.position)
        except Exception as exc:
            raise PluginError(
                f"optcc_before_pass hook raised {type(exc).__name__}: {exc}",
                plugin=_hook_owner(exc),
            ) from exc

        missing = sorted(
            getattr(r, "value", str(r)) for r in p.required_for(p.options)
            if getattr(r, "value", r) not in {getattr(c, "value", c) for c in ctx.capabilities}
        )
        if missing:
            raise self._fail(
                item, PreconditionError(f"needs {', '.join(missing)}", **common), before, ctx
            )

        ctx.output_dir = None
        if self.pass_outputs_dir is not None:
            ctx.output_dir = self.pass_outputs_dir / f"{item.position:02d}-{p.name}"
            ctx.output_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            result = p(before.copy(), ctx)
        except OptccError as exc:
            raise self._fail(item, PassError(exc.message, hint=exc.hint, **common), before, ctx) from exc
        except Exception as exc:
            internal = type(p).__module__.split(".")[0] in _OWN_PACKAGES
            err = PassError(
                f"raised {type(exc).__name__}: {exc}", internal=internal,
                hint="this is a bug in optcc, not in the recipe or the model: please report "
                "it with the traceback (also in the reproducer's error.txt)" if internal else None,
                **common,
            )
            err.__cause__ = exc
            raise self._fail(item, err, before, ctx) from exc
        seconds = time.perf_counter() - start
        published: list[str] = []
        if ctx.output_dir is not None and self.pass_outputs_dir is not None:
            root = self.pass_outputs_dir.parent
            published = sorted(
                f.relative_to(root).as_posix() for f in ctx.output_dir.rglob("*") if f.is_file()
            )
            if not published:  # keep the output folder free of empty folders
                ctx.output_dir.rmdir()
                if not any(self.pass_outputs_dir.iterdir()):
                    self.pass_outputs_dir.rmdir()
        if not isinstance(result, PassResult):
            raise self._fail(
                item,
                PassError(f"returned {type(result).__name__}, expected PassResult", **common),
                before, ctx,
            )
        after = result.model
        try:
            verify_model(after)
            runner = OrtRunner(after)
            outputs = runner.run(self.feeds)
        except ModelError as exc:
            raise self._fail(item, VerificationError(exc.message, **common), before, ctx) from exc
        broken = nonfinite_outputs(outputs, reference_outputs, runner.output_names)
        if broken:  # lossy or not, a pass that makes NaN/inf has failed
            raise self._fail(item, VerificationError(
                broken, hint="NaN or infinite weights? (a learning rate or another option "
                "too large, or data out of range)", **common), before, ctx)
        batch_record: dict[str, Any] = {}
        if self.batch_checks is not None:
            batch_record, problem = self.batch_checks.check(
                runner, outputs, pass_name=p.name, couples_samples=p.couples_samples(p.options)
            )
            if problem is not None:
                raise self._fail(
                    item,
                    VerificationError(problem, hint="a defect of the pass (the model before it "
                                      "passed these checks)", **common),
                    before, ctx,
                )
        diff, scale = output_difference(outputs, reference_outputs)
        tolerance = p.effective_tolerance
        if tolerance.enforced and not tolerance.allows(diff, scale):
            raise self._fail(
                item,
                ToleranceError(
                    f"changed the outputs by up to {diff:.3g} (output scale {scale:.3g}); "
                    + (f"the recipe's tolerance is {tolerance.describe()}"
                       if p.options.tolerance is not None
                       else f"declared tolerance is {tolerance.describe()}"),
                    hint="loosen or remove this pass's 'tolerance:' in the recipe"
                    if p.options.tolerance is not None
                    else "a lossless pass should not change outputs; override with "
                    "'tolerance: {atol: ..., rtol: ...}' only if this is expected",
                    **common,
                ),
                before, ctx,
            )

        stats = model_stats(after, self.input_shapes)
        record: dict[str, Any] = {
            "position": item.position,
            "name": p.name,
            "plugin": item.plugin,
            "options": p.options.model_dump(mode="json", exclude_defaults=True),
            "modified": bool(result.modified),
            "reason": result.reason,
            "seconds": round(seconds, 4),
            "params": stats.params,
            "weight_bytes": stats.weight_bytes,
            "flops": stats.flops,
            "nodes": stats.nodes,
            "sparsity": stats.sparsity,
            "int8_coverage": stats.int8_coverage,
            "max_abs_diff": diff,
            "batch_coupling": batch_record,
            "tolerance": tolerance.describe(),
            "stats": _jsonable(result.stats),
            "files": published,
            "metric": None,
        }
        if self.evaluate is not None:
            record["metric"] = self.evaluate(after, f"evaluating after {p.name}")
        after.meta.history.append(
            {
                "pass": p.name,
                "plugin": item.plugin,
                "options": record["options"],
                "modified": record["modified"],
            }
        )
        if self.stages_dir is not None:
            after.save(self.stages_dir / f"{item.position:02d}-{p.name}.onnx")
        try:
            self.hook.optcc_after_pass(
                pass_=p, result=result, record=record, ctx=ctx, position=item.position
            )
        except Exception as exc:
            raise PluginError(
                f"optcc_after_pass hook raised {type(exc).__name__}: {exc}",
                plugin=_hook_owner(exc),
            ) from exc
        return after, outputs, record

    def _write_reproducer(self, item: ScheduledPass, error: Exception, before: Model) -> Path | None:
        if self.failure_dir is None:
            return None
        folder = self.failure_dir / f"pass-{item.position:02d}-{item.pass_.name}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            before.save(folder / "model_before.onnx")
            recipe = (
                self.reproducer_recipe(item)
                if self.reproducer_recipe
                else {"version": 1, "model": "model_before.onnx", "passes": [item.fragment]}
            )
            (folder / "recipe.yaml").write_text(
                "# Reproduces the failure: the model as it was before the failing pass, and\n"
                "# that pass alone. Run: optcc build recipe.yaml\n"
                + yaml.safe_dump(recipe, sort_keys=False)
            )
            cause = error.__cause__ or error
            (folder / "error.txt").write_text(
                f"{error}\n\n" + "".join(traceback.format_exception(cause))
            )
        except Exception:
            logger.exception("could not write the reproducer")
            return None
        return folder


#: packages whose passes are optcc's own: an unexpected exception in them is optcc's bug
_OWN_PACKAGES = frozenset({"optcc", "optcc_plugins"})


def _static_batch(model: Model) -> bool:
    """Whether an input's first (batch) dimension is a fixed number."""
    return any(
        t.shape and isinstance(t.shape[0], int) and t.shape[0] > 0 for t in model.inputs
    )


def _hook_owner(exc: BaseException) -> str:
    """Best guess at which plugin module raised ``exc`` (from its traceback)."""
    tb = exc.__traceback__
    module = "unknown"
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", module)
        tb = tb.tb_next
    return module


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)
