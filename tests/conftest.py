"""Shared fixtures: models built in code with onnx.helper, recipe writing, the registry."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optcc.data.builtin import RandomOptions, RandomSource
from optcc.ir import Model
from optcc.passes import Capability, Pass, PassContext
from optcc.passes.manager import PassManager, ScheduledPass
from optcc.plugins import create_registry, get_registry
from optcc.runtime import OrtRunner

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "optcc" / "demo" / "digits_cnn.onnx"


def _gpu_available() -> bool:
    from optcc.backends.tensorrt import gpu_present

    return gpu_present()[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def encoder_exports(tmp_path_factory):  # type: ignore[no-untyped-def]
    """``get(name, exporter) -> Path``: tests/encoders.py's models exported once per session
    (each export takes seconds; every INT8 encoder test reads the same files)."""
    import warnings

    import encoders

    folder = tmp_path_factory.mktemp("encoders")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, exporter: str) -> Path:
        if (name, exporter) not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[(name, exporter)] = encoders.export(name, exporter, folder)
        return cache[(name, exporter)]

    return get

@pytest.fixture(scope="session")
def library():
    """liboptcc_kernels.so: prebuilt (OPTCC_KERNELS_LIBRARY), cached (after `python
    kernels/build.py`), or built now with OPTCC_TEST_BUILD_KERNELS=1; the suite compiles no
    CUDA otherwise. No toolchain or no build: skip. A build that was asked for and fails:
    fail, so that a compile error never passes as a skip."""
    from optcc.kernels import KernelsUnavailable, build_script, load

    build = os.environ.get("OPTCC_TEST_BUILD_KERNELS") == "1"
    if not os.environ.get("OPTCC_KERNELS_LIBRARY"):
        try:
            script = build_script()
            script.toolchain()
        except Exception as exc:  # noqa: BLE001  (the build script's BuildError)
            pytest.skip(f"no toolchain to build the kernels: {exc}")
        if not build and script.cached() is None:
            pytest.skip("liboptcc_kernels.so is not built: run `python kernels/build.py` "
                        "(minutes) or set OPTCC_TEST_BUILD_KERNELS=1")
    try:
        return load(build=build)
    except KernelsUnavailable as exc:
        pytest.fail(f"the kernel library did not build or load: {exc.reason}")


@pytest.fixture(scope="session")
def registry():
    return get_registry()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def conv_bn_model(
    *, channels: int = 8, with_identity: bool = False, seed: int = 0, opset: int = 17
) -> onnx.ModelProto:
    """x[N,3,8,8] → Conv(3→C) → BN → Relu → (Identity) → GlobalAveragePool → Flatten → Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "B"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32) * 0.1, "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, channels).astype(np.float32), "var"),
        numpy_helper.from_array(rng.standard_normal((4, channels)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(4, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"],
                         name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
    ]
    last = "r"
    if with_identity:
        nodes.append(helper.make_node("Identity", ["r"], ["r_id"], name="identity"))
        last = "r_id"
    nodes += [
        helper.make_node("GlobalAveragePool", [last], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def conv_bn_path(tmp_path: Path) -> Path:
    path = tmp_path / "conv_bn.onnx"
    onnx.save(conv_bn_model(), path)
    return path


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    """A private copy of the demo model (tests may check it is never modified)."""
    path = tmp_path / "digits_cnn.onnx"
    shutil.copy(DEMO_MODEL, path)
    return path


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory: pytest.TempPathFactory):
    """``zoo_export(name, exporter) -> Path``: a zoo model (tests/zoo.py) exported once per
    test session (or kept across sessions in ``OPTCC_ZOO_CACHE``)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import os

    import zoo

    folder = Path(os.environ.get("OPTCC_ZOO_CACHE") or tmp_path_factory.mktemp("zoo"))
    return lambda name, exporter: zoo.export(name, exporter, folder)


def int8_demo_recipe(target: str) -> str:
    """The demo, BatchNorm folded and quantized to INT8 (quick max calibration), for
    ``target`` (a YAML flow mapping such as ``{backend: tensorrt}``); no evaluation."""
    return f"""version: 1
model: {DEMO_MODEL}
target: {target}
data:
  calibration: {{source: digits, split: train, batch_size: 64, limit: 128}}
evaluate: none
passes:
  - fold-batchnorm
  - quantize-int8: {{method: max}}
output: out
"""


class StopAtEpoch:
    """A progress reporter that presses Ctrl-C when distillation's epoch ``epoch`` starts
    (so ``epoch - 1`` epochs finished and were checkpointed)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def track(self, iterable, *, description, total=None):
        if description.startswith(f"distill: epoch {self.epoch}/"):
            raise KeyboardInterrupt
        yield from iterable

    def status(self, message):
        pass


def tree(root: Path) -> dict[str, str]:
    """Every path below ``root`` with a digest of its content (or its link target): compare
    two snapshots to prove nothing was created, moved, changed or deleted."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[rel] = "/"
    return found


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def run_pipeline(model: Model, passes: list[Pass], feeds: dict[str, np.ndarray],
                 sizes: dict[str, int]) -> tuple[PassContext, list[dict[str, Any]]]:
    """Run ``passes`` on ``model`` through optcc's pass manager, as a build does: every pass
    verified on ``feeds`` and batch-checked (batch 1, an odd size, independent samples).
    Training and calibration data: 4 random samples (ids in range, masks of ones) with the
    dynamic dimensions in ``sizes``. Returns the context (``stages`` holds the model after
    each pass) and the per-pass report records."""
    data = RandomSource(RandomOptions(samples=4, batch_size=4, dims=sizes),
                        inputs=OrtRunner(model).input_specs, role="training")
    ctx = PassContext(
        data={"training": data, "calibration": data}, original=model, seed=0,
        capabilities=frozenset({Capability.TRAINING_DATA, Capability.CALIBRATION_DATA, Capability.TORCH}),
    )
    manager = PassManager(
        [ScheduledPass(p, i + 1, fragment=p.name) for i, p in enumerate(passes)],
        hook=create_registry(entry_points=[], core=False).hook, verification_feeds=feeds,
    )
    _, records = manager.run(model, ctx)
    return ctx, records
