"""The cuda backend around the kernels: weight extraction and packing, operand layouts
(rows, 1x1 convolutions, residuals), INT8 scales and requantization, the node overrides,
and the tile tuner with its cache. The kernel itself is replaced by a CPU reference of the
same math (sparse_nets.ReferenceRuntime) so that all of this runs without a GPU; the
kernel's own correctness is in test_kernels.py (GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto
from sparse_nets import ReferenceRuntime, onnx_mlp, sparse_bert_onnx, sparsify_module
from test_cuda_plan import _qdq_model

from optcc import Model
from optcc.backends.cuda import CudaBackend, CudaOptions, install_sparse_layers
from optcc.backends.cuda_plan import plan_model
from optcc.backends.cuda_tuning import KernelTuner, TuneKey, TuningCache
from optcc.runtime import OrtRunner
from optcc.torchview import GraphModule

HERE = Path(__file__).parent


def run_reference(model: Model, feeds: dict[str, np.ndarray], *, precision: str = "float16",
                  fmt: str = "sm90") -> tuple[list[np.ndarray], ReferenceRuntime, object]:
    plan = plan_model(model, precision=precision)  # type: ignore[arg-type]
    module = GraphModule(model).eval()
    runtime = ReferenceRuntime(fmt)
    install_sparse_layers(module, model, plan, runtime)
    # as on the GPU: the graph under autocast, the sparse layers returning 16-bit outputs
    with torch.no_grad(), torch.autocast("cpu", dtype=getattr(torch, precision)):
        outputs = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return [o.float().numpy() for o in outputs], runtime, plan


def assert_close(got: np.ndarray, expected: np.ndarray, rel: float) -> None:
    assert np.isfinite(got).all()
    scale = max(float(np.abs(expected).max()), 1e-6)
    assert float(np.abs(got - expected).max()) <= rel * scale, float(np.abs(got - expected).max())


@pytest.mark.parametrize("precision,fmt", [("float16", "sm90"), ("float16", "sm80"),
                                           ("bfloat16", "sm90")])
def test_mlp_through_the_overrides_matches_onnxruntime(precision: str, fmt: str) -> None:
    model = onnx_mlp()
    x = np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32)  # odd batch
    expected = OrtRunner(model).run({"x": x})[0]
    (got,), runtime, _ = run_reference(model, {"x": x}, precision=precision, fmt=fmt)
    assert runtime.calls == ["fc1", "fc2"]
    assert_close(got, expected, 1e-2 if precision == "float16" else 4e-2)


@pytest.mark.parametrize("fmt", ["sm90", "sm80"])  # sm80: 4 rows padded to 16 for INT8
def test_int8_layer_quantizes_its_input_and_requantizes_its_output(fmt: str) -> None:
    model = _qdq_model(TensorProto.INT8)
    x = np.random.default_rng(3).standard_normal((4, 128)).astype(np.float32)
    expected = OrtRunner(model).run({"x": x})[0]
    (got,), runtime, plan = run_reference(model, {"x": x}, fmt=fmt)
    assert plan.layers[0].precision == "int8" and runtime.calls == ["fc"]
    assert np.abs(got - expected).max() <= 0.05 + 1e-6  # one step of the output grid


def test_residual_that_broadcasts_is_finished_in_torch() -> None:
    model = onnx_mlp()
    graph = model.graph
    r = [t for t in graph.inputs if t.name == "x"][0]
    # replace the residual x[batch, 64] by an input r[1, 64] that broadcasts over the batch
    import onnx_graphsurgeon as gs

    rb = gs.Variable("r", dtype=np.float32, shape=[1, 64])
    graph.inputs.append(rb)
    residual = next(n for n in graph.nodes if n.name == "residual")
    residual.inputs = [residual.inputs[0] if residual.inputs[0] is not r else rb,
                       rb if residual.inputs[1] is r else residual.inputs[1]]
    model = Model.from_proto(model.to_proto())
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32),
             "r": np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)}
    expected = OrtRunner(model).run(feeds)[0]
    (got,), runtime, plan = run_reference(model, feeds)
    assert plan.layers[1].residual == "r" and runtime.calls == ["fc1", "fc2"]
    assert_close(got, expected, 1e-2)


def test_bert_style_encoder_matches_onnxruntime() -> None:
    model, feeds = sparse_bert_onnx("legacy")
    expected = OrtRunner(model).run(feeds)[0]
    (got,), runtime, _ = run_reference(model, feeds)
    assert len(runtime.calls) == 12
    assert_close(got, expected, 3e-2)


class Bottleneck(torch.nn.Module):
    """ResNet-50 style: 1x1 reduce -> 3x3 -> 1x1 expand, residual (strided 1x1 shortcut)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.reduce = torch.nn.Conv2d(cin, mid, 1)
        self.conv = torch.nn.Conv2d(mid, mid, 3, stride, 1)
        self.expand = torch.nn.Conv2d(mid, cout, 1)
        self.short = torch.nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.reduce(x))
        y = torch.relu(self.conv(y))
        return torch.relu(self.expand(y) + self.short(x))


def bottleneck_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return sparsify_module(torch.nn.Sequential(Bottleneck(64, 64, 128, 2),
                                               Bottleneck(128, 64, 128, 1)).eval())


def test_pointwise_convolutions_match_onnxruntime() -> None:
    from optcc.frontend import export_torch

    model = export_torch("test_cuda_backend:bottleneck_net",
                         inputs=[{"name": "x", "shape": ["batch", 64, 8, 8]}], exporter="legacy",
                         base_dir=HERE)
    x = np.random.default_rng(5).standard_normal((2, 64, 8, 8)).astype(np.float32)
    expected = OrtRunner(model).run({"x": x})[0]
    (got,), runtime, plan = run_reference(model, {"x": x})
    convs = {layer.node: layer for layer in plan.layers}
    assert len(convs) == 6  # reduce, expand and shortcut of both blocks
    assert any(layer.conv_strides == (2, 2) for layer in plan.layers)
    assert sum(1 for layer in plan.layers if layer.residual) == 2
    assert_close(got, expected, 1e-2)


# ----------------------------------------------------------------------------- options
def test_backend_is_listed_with_a_reason_when_unavailable() -> None:
    ok, reason = CudaBackend.is_available()
    if not ok:
        assert reason
    opts = CudaOptions(precision="bfloat16", arch="sm80", tune=False)
    assert opts.precision == "bfloat16" and not opts.tune
    with pytest.raises(ValueError):
        CudaOptions(precision="float32")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- tuner
def _key(n: int = 512) -> TuneKey:
    return TuneKey("NVIDIA H200", "lib-a", 90, "float16", "float16", 768, n, 3072)


def test_tuner_times_each_accepted_config_once_and_caches_the_fastest(tmp_path: Path) -> None:
    cache = TuningCache(tmp_path / "tuning.json")
    launched: list[int] = []
    speeds = {0: 0.30, 1: 0.10, 2: 0.05}
    timer = lambda launch: (launch(), speeds[launched[-1]])[1]  # noqa: E731
    tuner = KernelTuner(cache)
    chosen = tuner.choose(_key(), ["a", "b", "c"], accepts=lambda i: i != 2,
                          launch=launched.append, timer=timer)
    assert chosen == 1 and sorted(launched) == [0, 1]
    assert tuner.choose(_key(), ["a", "b", "c"], accepts=lambda i: True, launch=launched.append,
                        timer=timer) == 1 and len(launched) == 2  # remembered
    # a new process reads the decision from the file without timing anything
    code = ("import sys; from optcc.backends.cuda_tuning import KernelTuner, TuningCache, TuneKey\n"
            "key = TuneKey('NVIDIA H200', 'lib-a', 90, 'float16', 'float16', 768, 512, 3072)\n"
            f"tuner = KernelTuner(TuningCache({str(tmp_path / 'tuning.json')!r}))\n"
            "def timer(launch): raise SystemExit('timed again')\n"
            "print(tuner.choose(key, ['a', 'b', 'c'], lambda i: True, lambda i: None, timer))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    entry = json.loads((tmp_path / "tuning.json").read_text())["entries"][_key().text()]
    assert entry["name"] == "b" and set(entry["times_ms"]) == {"a", "b"}


def test_tuner_retunes_when_the_table_changed_and_keys_differ_by_shape(tmp_path: Path) -> None:
    cache = TuningCache(tmp_path / "tuning.json")
    cache.put(_key(), {"config": 1, "name": "old-name", "tuned": True})
    timed: list[int] = []
    tuner = KernelTuner(cache)
    chosen = tuner.choose(_key(), ["a", "b"], lambda i: True, timed.append,
                          lambda launch: (launch(), 1.0 if timed[-1] == 0 else 2.0)[1])
    assert chosen == 0 and timed == [0, 1]
    assert _key(512).text() != _key(1024).text()


def test_disabled_tuner_takes_the_first_accepted_config(tmp_path: Path) -> None:
    tuner = KernelTuner(TuningCache(tmp_path / "t.json"), enabled=False)
    never = lambda launch: pytest.fail("timed")  # noqa: E731
    assert tuner.choose(_key(), ["a", "b", "c"], lambda i: i > 0, lambda i: None, never) == 1
    assert not (tmp_path / "t.json").exists()
    with pytest.raises(ValueError, match="no kernel configuration accepts"):
        tuner.choose(_key(64), ["a"], lambda i: False, lambda i: None, never)


def test_unreadable_cache_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "tuning.json"
    path.write_text("{not json")
    assert TuningCache(path).get(_key()) is None


def test_node_overrides_replace_a_chain_and_name_unknown_nodes() -> None:
    from optcc.errors import ModelError

    model = onnx_mlp()
    module = GraphModule(model).eval()
    x = torch.randn(3, 64)
    (reference,) = module(x=x)
    seen: list[str] = []

    def fused_first_layer(env):  # type: ignore[no-untyped-def]
        seen.append("fused")
        w1, b1 = (torch.from_numpy(model.tensor_map()[n].values) for n in ("w1", "b1"))
        return {"a": torch.relu(env["x"] @ w1 + b1)}

    module.set_node_overrides({"fc1": None, "fc1_bias": None, "act": fused_first_layer})
    (got,) = module(x=x)
    assert seen == ["fused"]
    torch.testing.assert_close(got, reference)
    with pytest.raises(ModelError, match="not in the graph: nope"):
        module.set_node_overrides({"nope": None})


def test_sparsity_pass_output_runs_on_the_kernels() -> None:
    """optcc's own 2:4 pass (sparsify-2of4) on a dense model: every layer it sparsifies is
    dispatched, and the result matches ONNX Runtime on the sparsified model."""
    from optcc.plugins import get_registry

    model = onnx_mlp()
    rng = np.random.default_rng(7)
    for tensor in model.graph.tensors().values():
        if tensor.name in ("w1", "w2"):  # dense weights for the pass to prune
            tensor.values = rng.standard_normal(tensor.values.shape).astype(np.float32)
    assert not plan_model(model).layers
    sparse = get_registry().passes["sparsify-2of4"](method="magnitude")(model).model
    x = rng.standard_normal((9, 64)).astype(np.float32)
    expected = OrtRunner(sparse).run({"x": x})[0]
    (got,), runtime, plan = run_reference(sparse, {"x": x})
    assert runtime.calls == ["fc1", "fc2"] and not plan.skipped
    assert_close(got, expected, 1e-2)


# ----------------------------------------------------------------------------- kernel calls
@pytest.mark.parametrize("case,fmt", [("mlp", "sm90"), ("mlp", "sm80"), ("int8", "sm90"),
                                      ("int8", "sm80"), ("bert", "sm90")])
def test_kernel_arguments_of_every_layer_pass_the_librarys_checks(library, case: str,
                                                                  fmt: str) -> None:
    """The C arguments the backend fills for each planned layer (operand pointers, element
    types, epilogue codes, scales) are what the plan says, and the library's own host-side
    checks accept them for at least one compiled configuration, fused and unfused."""
    from optcc.backends.cuda import SparseRuntime
    from optcc.kernels import ACTIVATIONS, DTYPE_CODES

    model = {"mlp": onnx_mlp, "int8": lambda: _qdq_model(TensorProto.INT8),
             "bert": lambda: sparse_bert_onnx("legacy")[0]}[case]()
    plan = plan_model(model)
    arch = 90 if fmt == "sm90" else 80
    runtime = SparseRuntime(library, arch, torch.device("cpu"),
                            KernelTuner(TuningCache(None), enabled=False), device_name="host")
    layers = install_sparse_layers(GraphModule(model).eval(), model, plan, runtime)
    assert len(layers) == len(plan.layers) > 0
    for layer in layers:
        p = layer.plan
        tokens = -(-13 // layer._row_multiple()) * layer._row_multiple()
        rows = torch.zeros(tokens, p.k, dtype=torch.int8 if p.precision == "int8" else layer.in_dtype)
        out = torch.empty(tokens, p.m, dtype=layer.out_dtype)
        residual = torch.zeros(tokens, p.m, dtype=layer.residual_dtype) if p.residual else None
        for fused in (True, False):
            args = runtime._args(layer, rows, out, residual, with_epilogue=fused)
            assert (args.m, args.n, args.k, args.arch) == (p.m, tokens, p.k, arch)
            assert (args.ab_dtype, args.d_dtype) == (DTYPE_CODES[p.precision], DTYPE_CODES[p.output_dtype])
            assert (args.a_values, args.a_meta) == (layer.values.data_ptr(), layer.meta.data_ptr())
            assert (args.b, args.d) == (rows.data_ptr(), out.data_ptr())
            assert args.alpha == (layer.alpha.data_ptr() if layer.alpha is not None else None)
            assert args.bias == (layer.bias.data_ptr() if layer.bias is not None else None)
            if fused:
                assert args.activation == ACTIVATIONS[p.activation]
                assert args.residual == (residual.data_ptr() if residual is not None else None)
                expected_scale = 1.0 / p.output_scale if p.output_scale else 1.0
                assert args.out_scale == pytest.approx(expected_scale)
            else:
                assert args.activation == ACTIVATIONS["none"] and args.residual is None
            names = library.configs(arch, p.precision, p.output_dtype)
            verdicts = []
            for index in range(len(names)):
                args.config = index
                verdicts.append(library.check(args))
            assert None in verdicts, (p.node, verdicts)
    if case == "int8":
        p = plan.layers[0]
        assert p.output_dtype == "int8" and layers[0].alpha is not None
        # alpha folds the input scale and the per-channel weight scale: s_x * s_w[m]
        np.testing.assert_allclose(layers[0].alpha.numpy(), 0.02 * 0.01, rtol=1e-6)


def test_build_for_cuda_without_a_gpu_stops_with_one_error_and_touches_no_cuda(tmp_path: Path) -> None:
    """`optcc build` and `optcc validate` of a cuda recipe on a machine without a GPU: one
    error naming the recipe and the backend, before any pass, no output folder, and CUDA
    never initialized in the process."""
    ok, _ = CudaBackend.is_available()
    if ok:
        pytest.skip("this machine has a usable GPU")
    demo = Path(__file__).resolve().parent.parent / "optcc" / "demo" / "digits_cnn.onnx"
    recipe = tmp_path / "cuda.yaml"
    recipe.write_text(f"version: 1\nmodel: {demo}\ntarget: {{backend: cuda}}\n"
                      "passes: [fold-constants, {sparsify-2of4: {method: magnitude}}]\n"
                      f"output: {tmp_path / 'out'}\n")
    code = ("import sys\nfrom optcc.cli import main\n"
            "rc = main([sys.argv[1], sys.argv[2]])\n"
            "torch = sys.modules.get('torch')\n"
            "print('cuda-initialized', bool(torch and torch.cuda.is_initialized()))\n"
            "sys.exit(rc)\n")
    for command in ("build", "validate"):
        done = subprocess.run([sys.executable, "-c", code, command, str(recipe)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "cuda-initialized False" in done.stdout
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, done.stderr
        if command == "validate":  # located in the recipe: file, line and column
            assert f"{recipe}:3:" in errors[0]
        assert "backend 'cuda' is not available" in errors[0]
        assert not (tmp_path / "out").exists()
