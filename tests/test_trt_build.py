"""The TensorRT build description and its three consumers, on a machine without TensorRT.

The trtexec command line, the generated build_engine.sh and build_engine.py are checked
flag by flag against the backend options; the standalone script runs in a subprocess
without optcc on its path (``python -S``) in its --dry-run mode; lowering-only builds of
the demo and of a BERT-style encoder write the ONNX, both scripts and a report that says
the engine was not built and how to build it.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DEMO_MODEL, REPO, int8_demo_recipe, write_recipe
from onnx import TensorProto, helper

from optcc.backends.compare import compare_outputs
from optcc.backends.tensorrt import TensorRTBackend, TensorRTOptions
from optcc.backends.trt_build import (
    BuildDescriptionError,
    EngineBuildDescription,
    PluginLibrary,
    ShapeProfile,
    shell_script,
    standalone_script,
    summarize_layers,
    trtexec_command,
)
from optcc.ir import Model

NO_TENSORRT = not TensorRTBackend.is_available()[0]
needs_no_tensorrt = pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is available here")


def full_description() -> EngineBuildDescription:
    return EngineBuildDescription(
        onnx="model.tensorrt.onnx", engine="net.plan", strongly_typed=False,
        precisions=["fp16", "bf16"], tf32=False, sparse_weights=True,
        profiles=[ShapeProfile("ids", [1, 8], [4, 16], [8, 32]),
                  ShapeProfile("in:0", [1, 3], [2, 3], [4, 3])],
        workspace_mib=1024, builder_optimization_level=5, timing_cache="/cache/t.cache",
        plugin_libraries=[PluginLibrary("plugins/libs.so", "static"),
                          PluginLibrary("plugins/libd.so", "dynamic", serialize=True)],
        layer_info="layers.json",
    )


def test_trtexec_command_flag_by_flag() -> None:
    assert trtexec_command(full_description()) == [
        "trtexec", "--onnx=model.tensorrt.onnx", "--saveEngine=net.plan",
        "--fp16", "--bf16", "--noTF32", "--sparsity=enable",
        "--minShapes=ids:1x8,'in:0':1x3", "--optShapes=ids:4x16,'in:0':2x3",
        "--maxShapes=ids:8x32,'in:0':4x3",
        "--memPoolSize=workspace:1024M", "--builderOptimizationLevel=5",
        "--timingCacheFile=/cache/t.cache",
        "--staticPlugins=plugins/libs.so",
        "--dynamicPlugins=plugins/libd.so", "--setPluginsToSerialize=plugins/libd.so",
        "--profilingVerbosity=detailed", "--exportLayerInfo=layers.json", "--skipInference",
    ]
    # The defaults: strongly typed, no sparsity flag, no shapes for a static model.
    assert trtexec_command(EngineBuildDescription()) == [
        "trtexec", "--onnx=model.onnx", "--saveEngine=model.plan", "--stronglyTyped",
        "--memPoolSize=workspace:4096M", "--builderOptimizationLevel=3",
        "--profilingVerbosity=detailed", "--exportLayerInfo=model.layers.json", "--skipInference",
    ]


def test_shell_script_runs_exactly_the_trtexec_command() -> None:
    description = full_description()
    text = shell_script(description)
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    command = text.split('cd "$(dirname "$0")"\n', 1)[1].replace("\\\n", " ")
    words = shlex.split(command)
    assert words[0] == "${TRTEXEC:-trtexec}" and words[-1] == "$@"
    assert words[1:-1] == trtexec_command(description)[1:]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"precisions": ["fp16"]}, "weakly typed networks only"),
        ({"precisions": ["fp8"], "strongly_typed": False}, "unknown precisions"),
        ({"profiles": [ShapeProfile("x", [4, 3], [2, 3], [8, 3])]}, "min <= opt <= max"),
        ({"profiles": [ShapeProfile("x", [1, 3], [2], [8, 3])]}, "different ranks"),
        ({"profiles": [ShapeProfile("x", [1], [1], [1]), ShapeProfile("x", [1], [1], [1])]},
         "two profiles"),
        ({"plugin_libraries": [PluginLibrary("a.so", "static", serialize=True)]},
         "only dynamically loaded"),
        ({"plugin_libraries": [PluginLibrary("a.so", "lazy")]}, "loading must be"),
        ({"builder_optimization_level": 6}, "between 0 and 5"),
    ],
)
def test_contradictory_descriptions_are_refused(change: dict, message: str) -> None:
    description = EngineBuildDescription(**change)
    with pytest.raises(BuildDescriptionError, match=message):
        description.check()


def test_description_round_trips_through_json() -> None:
    description = full_description()
    again = EngineBuildDescription.from_dict(json.loads(json.dumps(description.to_dict())))
    assert again == description
    with pytest.raises(BuildDescriptionError, match="not a build description"):
        EngineBuildDescription.from_dict({"onnx": "m.onnx", "colour": "red"})


# --------------------------------------------------------------------------- options
def static_model() -> Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    return Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize(
    ("options", "flags", "absent"),
    [
        ({}, ["--stronglyTyped", "--sparsity=enable", "--minShapes=image:1x1x8x8",
              "--optShapes=image:1x1x8x8", "--maxShapes=image:4x1x8x8",
              "--memPoolSize=workspace:4096M", "--builderOptimizationLevel=3"],
         ["--fp16", "--noTF32", "--timingCacheFile"]),
        ({"sparse_weights": False}, [], ["--sparsity"]),
        ({"strongly_typed": False, "fp16": True}, ["--fp16"], ["--stronglyTyped", "--bf16"]),
        ({"strongly_typed": False, "bf16": True}, ["--bf16"], ["--fp16"]),
        ({"tf32": False}, ["--noTF32"], []),
        ({"workspace_mib": 512}, ["--memPoolSize=workspace:512M"], []),
        ({"builder_optimization_level": 5}, ["--builderOptimizationLevel=5"], []),
        ({"timing_cache": "/caches/digits.cache"}, ["--timingCacheFile=/caches/digits.cache"], []),
        ({"batch_size": 32}, ["--optShapes=image:32x1x8x8", "--maxShapes=image:128x1x8x8"], []),
        ({"min_shapes": {"image": [2, 1, 8, 8]}, "opt_shapes": {"image": [16, 1, 8, 8]},
          "max_shapes": {"image": [64, 1, 8, 8]}},
         ["--minShapes=image:2x1x8x8", "--optShapes=image:16x1x8x8",
          "--maxShapes=image:64x1x8x8"], []),
    ],
)
def test_backend_options_reach_both_scripts_flag_by_flag(
    tmp_path: Path, options: dict, flags: list[str], absent: list[str]
) -> None:
    backend = TensorRTBackend(TensorRTOptions(engine="skip", **options))
    artifact = backend.compile(Model.load(DEMO_MODEL), tmp_path)
    words = shlex.split((tmp_path / "build_engine.sh").read_text().split('"$0")"\n', 1)[1]
                        .replace("\\\n", " "))
    for flag in flags:
        assert flag in words
    for flag in absent:
        assert not any(w.startswith(flag) for w in words)
    # build_engine.py embeds the same description that report.json records.
    script = (tmp_path / "build_engine.py").read_text()
    embedded = ast.literal_eval(script.split("\nDESCRIPTION = ", 1)[1].split("\n\nif __name__", 1)[0])
    assert embedded == artifact.info["build"]
    assert words[1:-1] == trtexec_command(EngineBuildDescription.from_dict(embedded))[1:]


def test_weakly_typed_precisions_need_strongly_typed_off() -> None:
    with pytest.raises(ValueError, match="weakly typed networks only"):
        TensorRTOptions(fp16=True)


def test_profile_mistakes_are_named(tmp_path: Path) -> None:
    from optcc.errors import BackendError

    model = Model.load(DEMO_MODEL)
    with pytest.raises(BackendError, match="'imag', which is not an input") as info:
        TensorRTBackend(TensorRTOptions(opt_shapes={"imag": [1, 1, 8, 8]})).profiles_for(model)
    assert info.value.hint == "did you mean 'image'?"
    with pytest.raises(BackendError, match=r"max shape \[4, 1, 9, 8\] for input 'image'"):
        TensorRTBackend(TensorRTOptions(max_shapes={"image": [4, 1, 9, 8]})).profiles_for(model)
    # A static model needs no profile at all.
    assert TensorRTBackend(TensorRTOptions()).profiles_for(static_model()) == []


# --------------------------------------------------------------------------- build_engine.py
def write_script(folder: Path, description: EngineBuildDescription) -> Path:
    script = folder / "build_engine.py"
    script.write_text(standalone_script(description))
    return script


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # -S: no site-packages, so neither optcc nor numpy can be imported: the script stands alone.
    return subprocess.run([sys.executable, "-S", str(script), *args], capture_output=True,
                          text=True, cwd=script.parent.parent)


def test_standalone_script_dry_run_checks_arguments_and_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(DEMO_MODEL.read_bytes())
    description = EngineBuildDescription(
        profiles=[ShapeProfile("image", [1, 1, 8, 8], [8, 1, 8, 8], [32, 1, 8, 8])],
        sparse_weights=True,
    )
    script = write_script(out, description)
    done = run_script(script, "--dry-run")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["description"] == description.to_dict()
    assert plan["paths"]["onnx"] == str(out / "model.onnx")  # relative to the script, not the cwd
    assert plan["trtexec"] == trtexec_command(description)

    done = run_script(script, "--dry-run", "--workspace-mib", "512", "--opt-level", "1",
                      "--timing-cache", "t.cache", "--engine", "other.plan")
    assert done.returncode == 0, done.stderr
    trtexec = json.loads(done.stdout)["trtexec"]
    assert {"--memPoolSize=workspace:512M", "--builderOptimizationLevel=1",
            "--timingCacheFile=t.cache", "--saveEngine=other.plan"} <= set(trtexec)
    done = run_script(script, "--print-trtexec", "--opt-level", "0")
    assert "--builderOptimizationLevel=0" in shlex.split(done.stdout)

    for args, message in [
        (["--onnx", "missing.onnx"], f"error: ONNX model not found: {out / 'missing.onnx'}"),
        (["--plugin", "plugins/libnope.so"], "error: plugin library not found:"),
        (["--engine", "no/such/folder/m.plan"], "error: folder for m.plan does not exist"),
        (["--timing-cache", "."], "error: timing cache path is a folder"),
        (["--opt-level", "9"], "error: builder_optimization_level must be between 0 and 5"),
    ]:
        done = run_script(script, "--dry-run", *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


@needs_no_tensorrt
def test_standalone_script_without_tensorrt_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(DEMO_MODEL.read_bytes())
    done = run_script(write_script(tmp_path, EngineBuildDescription()))
    assert done.returncode == 2
    assert "error: TensorRT's Python package does not import" in done.stderr
    assert "build_engine.sh" in done.stderr


# --------------------------------------------------------------------------- reports
def test_layer_summary_reads_precision_and_sparse_tactics() -> None:
    information = {
        "Layers": [
            {"Name": "conv1 + relu", "LayerType": "CaskConvolution",
             "Inputs": [{"Name": "x_q", "Format/Datatype": "Channel major Int8 format where channel % 32 == 0"}],
             "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32"}],
             "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_i8i8_i32_f32_nhwc"},
            {"Name": "fc", "LayerType": "CaskGemm",
             "Inputs": [{"Name": "y", "Format/Datatype": "Row major linear FP16 format"}],
             "Outputs": [{"Name": "z", "Format/Datatype": "Row major linear FP16 format"}],
             "TacticName": "sm80_xmma_gemm_f16f16_f16f32"},
            json.dumps({"Name": "softmax", "LayerType": "Softmax",
                        "Inputs": [{"Name": "z", "Format/Datatype": "Row major linear BFloat16 format"}],
                        "Outputs": []}),
        ],
        "Bindings": ["x", "z"],
    }
    summary = summarize_layers(json.dumps(information))
    assert [(layer["name"], layer["precision"], layer["sparse"]) for layer in summary["layers"]] == [
        ("conv1 + relu", "int8", True), ("fc", "fp16", False), ("softmax", "bf16", None),
    ]
    assert summary["layers"][0]["output_precision"] == "fp32"
    assert summary["sparse_layers"] == ["conv1 + relu"]
    assert summary["precision_counts"] == {"int8": 1, "fp16": 1, "bf16": 1}
    # Engines built without detailed verbosity list names only.
    brief = summarize_layers({"Layers": ["conv1", "fc"]})
    assert brief["detailed"] is False and brief["layers"][0]["precision"] is None


def test_output_comparison_names_the_output_that_differs() -> None:
    ref = {"logits": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
           "hidden": np.array([0.5, np.nan, np.inf], np.float32)}
    close = {"logits": ref["logits"] + 5e-4, "hidden": ref["hidden"].copy()}
    result = compare_outputs(ref, close, atol=1e-3, rtol=0)
    assert result["passed"] and result["failed"] == []
    assert result["outputs"][0]["max_abs_error"] == pytest.approx(5e-4, rel=1e-3)
    far = {"logits": ref["logits"] * np.float32(1.01), "hidden": np.array([0.5, 1.0, np.inf], np.float32)}
    result = compare_outputs(ref, far, atol=1e-3, rtol=1e-3)
    assert not result["passed"] and result["failed"] == ["logits", "hidden"]
    assert result["outputs"][0]["mismatched"] == 4
    assert result["outputs"][1]["nonfinite_mismatches"] == 1  # NaN where the reference had NaN is fine
    result = compare_outputs(ref, {"logits": ref["logits"][:1]})
    assert result["outputs"][0]["reason"] == "shapes differ"
    assert result["outputs"][1]["reason"] == "missing from the candidate"


# --------------------------------------------------------------------------- builds
@needs_no_tensorrt
def test_tensorrt_build_of_the_demo_lowers_and_says_how_to_build(tmp_path: Path) -> None:
    from optcc.build import build

    recipe = write_recipe(tmp_path, int8_demo_recipe("{backend: tensorrt, batch_size: 64}"))
    result = build(recipe)
    out, report = result.output_dir, result.report
    artifact = report["final"]["artifact"]
    assert artifact["path"] == "model.onnx"
    assert {"model.onnx", "build_engine.sh", "build_engine.py"} <= set(artifact["files"])
    engine = artifact["info"]["engine"]
    assert engine["built"] is False and "tensorrt" in engine["reason"]
    assert any("build_engine.sh" in step for step in engine["how_to_build"])
    assert report["final"]["latency"] is None and report["original"]["latency"] is None
    assert "engine is not built here" in report["final"]["latency_not_measured"]
    assert artifact["info"]["lint"]["errors"] == 0  # the INT8 model follows TensorRT's rules
    assert artifact["info"]["build"]["profiles"] == [
        {"input": "image", "min": [1, 1, 8, 8], "opt": [64, 1, 8, 8], "max": [256, 1, 8, 8]}]
    markdown = (out / "report.md").read_text()
    assert "**Engine not built here**" in markdown and "bash build_engine.sh" in markdown
    assert not (out / "model.plan").exists()
    done = run_script(out / "build_engine.py", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert os.access(out / "build_engine.sh", os.X_OK)


@needs_no_tensorrt
@pytest.mark.slow
def test_tensorrt_build_of_a_bert_style_encoder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from optcc.build import build

    recipe = write_recipe(tmp_path, f"""version: 1
model:
  torch: {REPO / 'tests' / 'nets.py'}:bert_style
  exporter: legacy
  inputs:
    - {{name: input_ids, shape: [batch, sequence], dtype: int64}}
    - {{name: attention_mask, shape: [batch, sequence], dtype: int64}}
target:
  backend: tensorrt
  min_shapes: {{input_ids: [1, 8], attention_mask: [1, 8]}}
  opt_shapes: {{input_ids: [8, 16], attention_mask: [8, 16]}}
  max_shapes: {{input_ids: [32, 64], attention_mask: [32, 64]}}
verification: {{batch_size: 4}}
passes: [fold-constants, eliminate-dead-nodes]
output: out
""")
    result = build(recipe)
    info = result.report["final"]["artifact"]["info"]
    assert info["engine"]["built"] is False
    assert [p["input"] for p in info["build"]["profiles"]] == ["input_ids", "attention_mask"]
    words = (result.output_dir / "build_engine.sh").read_text()
    assert "--minShapes=input_ids:1x8,attention_mask:1x8" in words
    assert "--maxShapes=input_ids:32x64,attention_mask:32x64" in words
    assert info["lint"]["errors"] == 0, info["lint"]["findings"]
    assert {f["rule"] for f in info["lint"]["findings"]} == {"int64"}  # int64 token inputs: a note
    done = run_script(result.output_dir / "build_engine.py", "--dry-run")
    assert done.returncode == 0, done.stderr


@needs_no_tensorrt
def test_sequence_axis_without_profile_fails_before_any_pass(tmp_path: Path) -> None:
    from optcc.build import build
    from optcc.errors import BackendError

    model = tmp_path / "tokens.onnx"
    ids = helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", "sequence"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence"])
    graph = helper.make_graph([helper.make_node("Relu", ["ids"], ["out"], name="r")], "g", [ids], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    recipe = write_recipe(tmp_path, f"version: 1\nmodel: {model}\ntarget: tensorrt\n"
                          "passes: [fold-constants]\noutput: out\n")
    with pytest.raises(BackendError, match="input 'ids' has dynamic dimensions") as info:
        build(recipe)
    assert "opt_shapes: {ids: [16, 16]}" in (info.value.hint or "")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.failed").exists()


@needs_no_tensorrt
def test_engine_required_fails_fast_and_skip_never_builds(tmp_path: Path) -> None:
    from optcc.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' is not available"):
        TensorRTBackend(TensorRTOptions(engine="required")).ensure_available()
    backend = TensorRTBackend(TensorRTOptions(engine="skip"))
    backend.ensure_available()
    assert backend.engine_decision() == (False, "the recipe sets engine: skip")
    assert backend.can_measure()[0] is False


# --------------------------------------------------------------------------- rewrites
def test_lowering_rewrites_add_plugin_nodes_and_libraries(tmp_path: Path) -> None:
    """A plugin's rewrite turns a Relu into a TensorRT plugin node; the portable model
    keeps the Relu, the engine is built from the rewritten graph with the plugin library."""
    import onnx_graphsurgeon as gs

    from optcc import hookimpl
    from optcc.backends.lowering import LoweringResult, LoweringRewrite
    from optcc.plugins import create_registry, get_registry, set_registry

    library = tmp_path / "libfastrelu.so"  # only copied here; TensorRT loads it on the GPU box
    library.write_bytes(b"\x7fELF placeholder for the copy test")

    class FastReluRewrite(LoweringRewrite):
        name = "fast-relu"
        summary = "Relu as the FastRelu plugin."

        def apply(self, model, ctx):
            assert ctx.target == "tensorrt" and ctx.description.sparse_weights
            relus = [n for n in model.graph.nodes if n.op == "Relu"]
            for node in relus:
                node.op, node.domain = "FastRelu", "trt.plugins"
                node.attrs = {"plugin_version": "1", "plugin_namespace": "optcc"}
            return LoweringResult(model, bool(relus), [PluginLibrary(str(library))],
                                  stats={"replaced": len(relus)})

    class Plugin:
        @hookimpl
        def optcc_lowering_rewrites(self):
            return [FastReluRewrite]

    previous = get_registry()
    set_registry(create_registry(extra_plugins=[("fastrelu", Plugin())]))
    try:
        artifact = TensorRTBackend(TensorRTOptions(engine="skip")).compile(
            Model.load(DEMO_MODEL), tmp_path / "out")
        skipped = TensorRTBackend(TensorRTOptions(engine="skip", rewrites=[])).compile(
            Model.load(DEMO_MODEL), tmp_path / "plain")
        with pytest.raises(Exception, match="unknown lowering rewrite"):
            TensorRTBackend(TensorRTOptions(rewrites=["fast-rlu"])).compile(
                Model.load(DEMO_MODEL), tmp_path / "bad")
    finally:
        set_registry(previous)
    out = tmp_path / "out"
    info = artifact.info
    fast_relu = next(r for r in info["rewrites"] if r["name"] == "fast-relu")
    assert fast_relu["modified"]
    assert info["build"]["onnx"] == "model.tensorrt.onnx"
    assert info["build"]["plugin_libraries"] == [
        {"path": "plugins/libfastrelu.so", "loading": "dynamic", "serialize": False}]
    assert (out / "plugins" / "libfastrelu.so").read_bytes() == library.read_bytes()
    lowered = gs.import_onnx(onnx.load(out / "model.tensorrt.onnx"))
    portable = gs.import_onnx(onnx.load(out / "model.onnx"))
    assert "FastRelu" in {n.op for n in lowered.nodes} and "Relu" not in {n.op for n in lowered.nodes}
    assert "Relu" in {n.op for n in portable.nodes}
    script = (out / "build_engine.sh").read_text()
    assert "--onnx=model.tensorrt.onnx" in script and "--dynamicPlugins=plugins/libfastrelu.so" in script
    assert {f["rule"] for f in info["lint"]["findings"] if f["severity"] == "info"} >= {"parser-op"}
    assert skipped.info["rewrites"] == [] and skipped.info["build"]["onnx"] == "model.onnx"
