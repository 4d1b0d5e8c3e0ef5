"""Frontends: turn what the recipe names into a :class:`Model` — an ONNX file, or a PyTorch
module exported with torch.onnx.

Exporter choice: ``dynamo`` (torch.export based, opset 18 by default) is the default
because it is torch's default since 2.9 and the TorchScript exporter is deprecated;
``legacy`` stays available (opset 17 by default) for modules torch.export cannot trace.
Dynamic axes are declared from the input specs (a string dimension is dynamic), and the
example inputs use size 3 for them: with size 1 the dynamo exporter can silently fix a
batch dimension, and 2 collides with torch.export's 0/1 specialisation more often.
Export happens into a temporary folder; the user's files are never written.

BatchNorm survives export as ``BatchNormalization`` nodes with both exporters (each one
folds it into the preceding convolution by default in eval mode; see docs/torch-export.md
for how that is switched off), so BatchNorm recalibration works after pruning a torch
model and ``fold-batchnorm`` folds it once the recipe is done changing weights. What the
exporters print or warn is routed into the log.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from optcc._logging import captured_output
from optcc._objects import load_object
from optcc.errors import ModelError, OptccError, first_line
from optcc.ir.model import Model

logger = logging.getLogger(__name__)

EXAMPLE_DYNAMIC_SIZE = 3


def load_model(plan: Any) -> Model:
    """Load the recipe's model (ONNX path or torch factory)."""
    spec = plan.recipe.model
    if spec.path:
        return Model.load(plan.resolve(spec.path))
    return export_torch(
        spec.torch,
        inputs=[i.model_dump() for i in spec.inputs],
        outputs=spec.outputs,
        exporter=spec.exporter,
        opset=spec.opset,
        kwargs=spec.kwargs,
        base_dir=plan.base_dir,
    )


def export_torch(
    factory: str,
    *,
    inputs: list[dict[str, Any]],
    outputs: list[str] | None = None,
    exporter: str = "dynamo",
    opset: int | None = None,
    kwargs: dict[str, Any] | None = None,
    base_dir: Path | None = None,
) -> Model:
    """Build the module from ``factory`` and export it to ONNX with dynamic axes."""
    try:
        import torch
    except ImportError as exc:
        raise ModelError(
            "exporting a torch model needs torch", hint="pip install 'optcc[torch]'"
        ) from exc
    label = f"torch:{factory}"
    try:
        make = load_object(factory, base_dir=base_dir, what="model factory")
    except OptccError as exc:
        raise ModelError(exc.message, hint=exc.hint) from exc
    try:
        module = make(**(kwargs or {}))
    except Exception as exc:
        raise ModelError(f"the factory raised {type(exc).__name__}: {plain(str(exc))}", path=label) from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelError(
            f"the factory returned {type(module).__name__}, expected a torch.nn.Module",
            path=label,
        )
    module.eval()
    examples = []
    for spec in inputs:
        shape = [d if isinstance(d, int) else EXAMPLE_DYNAMIC_SIZE for d in spec["shape"]]
        dtype = getattr(torch, spec.get("dtype", "float32"))
        if dtype.is_floating_point:
            examples.append(torch.randn(*shape, dtype=dtype))
        else:  # ones: valid token ids, and an attention mask that masks nothing
            examples.append(torch.ones(*shape, dtype=dtype))
    input_names = [spec["name"] for spec in inputs]
    output_names = list(outputs or []) or None
    with tempfile.TemporaryDirectory(prefix="optcc-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with captured_output(logger, f"torch.onnx ({exporter})"):
                if exporter == "dynamo":
                    dims: dict[str, Any] = {}
                    dynamic_shapes = tuple(
                        {
                            axis: dims.setdefault(d, torch.export.Dim(_dim_name(d)))
                            for axis, d in enumerate(spec["shape"])
                            if isinstance(d, str)
                        }
                        or None
                        for spec in inputs
                    )
                    # With BatchNorm, optimize=False: torch's own optimizer folds it into the
                    # Conv; _optimize_keeping_batchnorm runs the clean-up without that rule.
                    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                        for m in module.modules())
                    options = dict(
                        dynamo=True, opset_version=opset or 18, input_names=input_names,
                        output_names=output_names, dynamic_shapes=dynamic_shapes,
                        external_data=False, verbose=False,
                        optimize=not has_batchnorm,  # torch's clean-up fuses BatchNorm
                    )
                    try:
                        program = torch.onnx.export(module, tuple(examples), **options)
                    except Exception as first:
                        program = _export_predecomposed(module, tuple(examples), options, first)
                    if has_batchnorm:
                        _optimize_keeping_batchnorm(program.model)
                    program.save(str(path))
                else:
                    dynamic_axes = {
                        spec["name"]: {a: d for a, d in enumerate(spec["shape"]) if isinstance(d, str)}
                        for spec in inputs
                    }
                    if output_names:
                        batch_names = {
                            d for spec in inputs for a, d in enumerate(spec["shape"]) if a == 0 and isinstance(d, str)
                        }
                        if batch_names:
                            for name in output_names:
                                dynamic_axes[name] = {0: sorted(batch_names)[0]}
                    # PRESERVE exports the module in the mode it is in (eval, so BatchNorm
                    # uses its running statistics) and skips the eval-mode clean-up that
                    # fuses BatchNorm into the preceding Conv.
                    torch.onnx.export(
                        module, tuple(examples), str(path), dynamo=False,
                        opset_version=opset or 17, input_names=input_names,
                        output_names=output_names, dynamic_axes=dynamic_axes,
                        training=torch.onnx.TrainingMode.PRESERVE,
                    )
        except Exception as exc:
            raise ModelError(
                f"torch.onnx export ({exporter}) failed: {export_failure(exc)}",
                path=label,
                hint="try 'exporter: legacy'" if exporter == "dynamo" else "try 'exporter: dynamo'",
            ) from exc
        model = Model.load(path)
    model.source = label
    _check_export(module, examples, model, label)
    return model


def _optimize_keeping_batchnorm(model: Any) -> None:
    """Clean up a dynamo export (an ``onnx_ir`` model, in place) the way torch's default
    ``optimize=True`` does — constant folding, onnxscript's default rewrite rules, unused
    nodes removed, constants lifted to initializers — except the rules that fuse
    BatchNormalization into a Conv/ConvTranspose/Gemm. BatchNorm must survive export so
    that ``recalibrate-batchnorm`` can re-estimate its statistics after pruning;
    ``fold-batchnorm`` folds it at the end of a recipe."""
    import onnx_ir.passes.common as common
    from onnxscript import optimizer, rewriter

    # The default rule list is not public API; without it only constant folding runs.
    rules = [
        rule for rule in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ())
        if "batchnorm" not in str(getattr(rule, "name", "") or "").lower()
    ]
    for _ in range(2):
        optimizer.fold_constants(model)
        if rules:
            rewriter.rewrite(model, pattern_rewrite_rules=rules)
    for cleanup in (
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
    ):
        cleanup(model)


def _export_predecomposed(module: Any, examples: tuple[Any, ...], options: dict[str, Any],
                          first: Exception) -> Any:
    """Retry a failed dynamo export from a program torch.export has already decomposed.

    torch's ONNX decomposition can turn a reshape of a transposed tensor into an invalid
    ``view`` ("Cannot view a tensor with shape ..."; T5 and Swin attention in recent
    transformers); decomposing with torch.export's own table first avoids it. When the
    retry fails too, the first error is the one reported.
    """
    import torch

    try:
        program = torch.export.export(
            module, examples, dynamic_shapes=options["dynamic_shapes"], strict=False
        ).run_decompositions()
        return torch.onnx.export(program, examples, **options)
    except Exception:  # the first error is the one to report
        pass
    raise first


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_CALL_SITE = re.compile(
    r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\S+)\s*\n\s*(\S.*)'
)
_SUMMARY = re.compile(r"## Exception summary\s*<class '(?:[\w.]+\.)?(\w+)'>: ([^\n]*)")


def plain(text: str) -> str:
    """``text`` without terminal colour codes (torch colours parts of its messages)."""
    return _ANSI.sub("", text)


def export_failure(exc: BaseException) -> str:
    """One line saying why torch could not export. torch.onnx wraps torch.export's error in
    a page of next steps; the line that matters is the innermost cause, plus the user's
    source line that triggered it when torch names one. No terminal colour codes."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = plain(str(exc))
    summary = _SUMMARY.search(text)
    if root is exc and summary:  # the cause was dropped on re-raise; torch's text names it
        message = f"{summary[1]}: {summary[2].strip()}"
    else:
        message = f"{type(root).__name__}: {plain(first_line(root))}"
    site = _CALL_SITE.search(text)
    if site:
        message += f" (at {Path(site[1]).name}:{site[2]} in {site[3]}: {site[4].strip()})"
    return message


def _dim_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"d_{cleaned}"


def _check_export(module: Any, examples: list[Any], model: Model, label: str) -> None:
    """The exported graph must reproduce the module's first output on the example input."""
    import torch

    from optcc.runtime import OrtRunner

    with torch.no_grad():
        expected = module(*examples)
    if isinstance(expected, tuple | list):
        expected = expected[0]
    if isinstance(expected, dict):
        expected = next(iter(expected.values()))
    runner = OrtRunner(model)
    feeds = {spec.name: ex.numpy() for spec, ex in zip(runner.input_specs, examples, strict=False)}
    got = runner.run(feeds)[0]
    ref = expected.detach().numpy()
    diff = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else float("inf")
    if not diff <= 1e-3 * max(1.0, float(np.max(np.abs(ref)))):
        raise ModelError(
            f"the exported ONNX graph does not match the module (max difference {diff:.3g})",
            path=label,
        )
