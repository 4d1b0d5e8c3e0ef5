"""The recipe schema (version 1): pydantic models for every section but the pass options,
which come from each pass's ``Options`` model, and the JSON Schema built from all of them.

A recipe, in full::

    version: 1
    name: quickstart                       # optional label for reports
    model: ../models/net.onnx              # or {path: ...} or {torch: pkg.mod:factory, inputs: [...]}
    target: onnxruntime                    # or {backend: onnxruntime, threads: 1, ...}
    data:                                  # roles: calibration, training, evaluation
      evaluation: {source: digits, split: test, batch_size: 256}
    verification: {batch_size: 8}          # the batch every pass is checked on
    evaluate: each                         # each | final | none
    passes:
      - fold-constants                     # a pass with default options
      - fold-batchnorm: {}                 # a pass with options
    output: out/quickstart                 # relative to the recipe's folder
    seed: 0
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
DATA_ROLES = ("calibration", "training", "evaluation")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InputSpecModel(_Strict):
    name: str = Field(..., description="Input name in the exported graph.")
    shape: list[int | str] = Field(
        ..., description="Dimensions; a string names a dynamic axis (e.g. 'batch')."
    )
    dtype: Literal["float32", "float16", "int64", "int32", "bool"] = "float32"


class ModelSpec(_Strict):
    """Where the model comes from: an ONNX file, or a PyTorch module to export."""

    path: str | None = Field(None, description="An .onnx file, relative to the recipe.")
    torch: str | None = Field(
        None,
        description="'package.module:factory' or 'file.py:factory' returning a torch.nn.Module.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Arguments to the factory.")
    inputs: list[InputSpecModel] = Field(
        default_factory=list, description="Input specs for export (torch models only)."
    )
    outputs: list[str] = Field(default_factory=list, description="Output names (torch only).")
    exporter: Literal["dynamo", "legacy"] = Field(
        "dynamo", description="torch.onnx exporter: dynamo (torch.export) or legacy (TorchScript)."
    )
    opset: int | None = Field(
        None, ge=13, le=23, description="ONNX opset (default: 18 for dynamo, 17 for legacy)."
    )


class DataEntry(BaseModel):
    """One data role; ``source`` picks the data source, the other keys are its options."""

    model_config = ConfigDict(extra="allow")
    source: str = Field(..., description="Data source name (see 'optcc passes --data').")


class VerificationSpec(_Strict):
    source: Literal["evaluation", "calibration", "training", "random"] | None = Field(
        None, description="Which data to check passes on (default: the first role present)."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Samples in the verification batch.")


class TargetSpec(BaseModel):
    """The backend to lower to; keys besides ``backend`` are the backend's options."""

    model_config = ConfigDict(extra="allow")
    backend: str = Field("onnxruntime", description="Backend name (see 'optcc plugins').")


class TritonSpec(_Strict):
    """Triton Inference Server export options (``output: {triton: {...}}``)."""

    name: str | None = Field(None, description="Model name in the repository (default: the recipe's name).")
    max_batch_size: int | None = Field(
        None, ge=0, description="Triton max_batch_size (default: the engine's largest profile "
        "batch, or the target's batch_size, or 64; 0 turns batching off)."
    )
    dynamic_batching: bool = Field(True, description="Let Triton merge requests into batches.")
    instance_kind: Literal["gpu", "cpu"] | None = Field(
        None, description="Where instances run (default: gpu, or cpu for onnxruntime builds)."
    )
    instance_count: int = Field(1, ge=1, description="Model instances per device.")


class OutputSpec(_Strict):
    path: str = Field(..., description="Output folder, relative to the recipe.")
    keep_stages: bool = Field(
        False, description="Also keep the model after every pass (stages/NN-name.onnx)."
    )
    triton: bool | TritonSpec = Field(
        False, description="Also write a Triton Inference Server model repository into "
        "OUTPUT/triton/ (the engine when it was built, else model.onnx)."
    )


class RecipeModel(_Strict):
    """Top level of a recipe (after the short forms are expanded)."""

    version: Literal[1] = Field(..., description="Recipe schema version.")
    name: str | None = Field(None, description="A label for reports.")
    model: ModelSpec
    target: TargetSpec = Field(default_factory=TargetSpec)
    data: dict[Literal["calibration", "training", "evaluation"], DataEntry] = Field(
        default_factory=dict
    )
    verification: VerificationSpec = Field(default_factory=VerificationSpec)
    evaluate: Literal["each", "final", "none"] = Field(
        "each", description="When to compute the metric: after each pass, at the end, never."
    )
    passes: list[Any] = Field(default_factory=list, description="The passes, in order.")
    output: OutputSpec | None = None
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for everything random.")


def type_name(annotation: Any) -> str:
    """A readable option type: 'max' | 'entropy', list[str], int | None, ..."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is None:
        return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"


def describe_options(options_model: type[BaseModel]) -> list[dict[str, Any]]:
    """Each option of a pass / data source / backend: name, type, default, description
    (``optcc passes``)."""
    return [
        {
            "name": key,
            "type": type_name(info.annotation),
            "required": info.is_required(),
            "default": None if info.is_required() else info.get_default(call_default_factory=True),
            "description": info.description or "",
        }
        for key, info in options_model.model_fields.items()
    ]


def json_schema(registry: Any) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) for recipes, covering every registered pass, backend
    and data source — point yaml-language-server at it for completion and checking."""
    schema = RecipeModel.model_json_schema()
    defs = schema.setdefault("$defs", {})
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "optcc recipe"
    props = schema["properties"]
    # Short forms.
    props["model"] = {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/ModelSpec"}]}
    props["output"] = {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/OutputSpec"}]}

    pass_items: list[dict[str, Any]] = []
    for name, cls in sorted(registry.passes.items()):
        opt_schema = cls.Options.model_json_schema(ref_template="#/$defs/{model}")
        for key, value in opt_schema.pop("$defs", {}).items():
            defs[key] = value
        opt_schema["description"] = cls.summary
        def_name = f"pass:{name}"
        defs[def_name] = opt_schema
        pass_items.append({"const": name, "description": cls.summary})
        pass_items.append(
            {
                "type": "object",
                "properties": {name: {"anyOf": [{"$ref": f"#/$defs/{def_name}"}, {"type": "null"}]}},
                "required": [name],
                "additionalProperties": False,
            }
        )
    props["passes"] = {"type": "array", "items": {"anyOf": pass_items}}

    data_items = []
    for name, cls in sorted(registry.data_sources.items()):
        opt_schema = cls.Options.model_json_schema(ref_template="#/$defs/{model}")
        opt_schema.setdefault("properties", {})["source"] = {"const": name}
        opt_schema["required"] = sorted({*opt_schema.get("required", []), "source"})
        opt_schema["additionalProperties"] = False
        opt_schema["description"] = cls.summary
        defs[f"data:{name}"] = opt_schema
        data_items.append({"$ref": f"#/$defs/data:{name}"})
    props["data"] = {
        "type": "object",
        "properties": {role: {"anyOf": data_items} for role in DATA_ROLES},
        "additionalProperties": False,
    }

    target_items: list[dict[str, Any]] = []
    for name, cls in sorted(registry.backends.items()):
        opt_schema = cls.Options.model_json_schema(ref_template="#/$defs/{model}")
        opt_schema.setdefault("properties", {})["backend"] = {"const": name}
        opt_schema["required"] = ["backend"]
        opt_schema["additionalProperties"] = False
        defs[f"backend:{name}"] = opt_schema
        target_items.append({"const": name})
        target_items.append({"$ref": f"#/$defs/backend:{name}"})
    props["target"] = {"anyOf": target_items}
    return schema
