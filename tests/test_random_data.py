"""The random data source feeds integer inputs values the model can use: token ids within
the embedding table it indexes, ones for masks; and it says what it generated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optcc.data.builtin import RandomOptions, RandomSource
from optcc.ir import Model
from optcc.ir.indices import index_ranges
from optcc.runtime import OrtRunner


def embedding_model() -> onnx.ModelProto:
    """ids → Cast(int32) → Unsqueeze → Gather(word table 50×4); types → Gather(2×4);
    mask → Cast → Mul; x float; a second, smaller table behind a Reshape of the ids."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((50, 4)).astype(np.float32), "word_table"),
        numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "type_table"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["word_table", "ids32"], ["words"]),
        helper.make_node("Gather", ["type_table", "token_type_ids"], ["types"]),
        helper.make_node("Add", ["words", "types"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis1"], ["mask3"]),
        helper.make_node("Transpose", ["mask3"], ["mask3t"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["emb", "mask3t"], ["masked"]),
        helper.make_node("Add", ["masked", "x"], ["y"]),
    ]
    seq = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes, "embeddings",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, seq),
         helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, seq),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, seq),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_index_ranges_follow_ids_to_their_tables() -> None:
    ranges = index_ranges(Model.from_proto(embedding_model()))
    assert {k: (v.limit, v.table) for k, v in ranges.items()} == {
        "input_ids": (50, "word_table"), "token_type_ids": (2, "type_table")}


def test_random_source_generates_ids_in_range_and_masks_of_ones() -> None:
    model = Model.from_proto(embedding_model())
    specs = OrtRunner(model).input_specs
    source = RandomSource(RandomOptions(samples=16, dims={"sequence": 32}), inputs=specs)
    batch = source.first_batch()
    ids = batch.inputs["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (16, 32)
    assert ids.min() >= 0 and ids.max() < 50 and len(np.unique(ids)) > 25  # spread, not zeros
    assert set(np.unique(batch.inputs["token_type_ids"])) == {0, 1}
    assert (batch.inputs["attention_mask"] == 1).all()
    assert batch.inputs["x"].dtype == np.float32 and abs(batch.inputs["x"].std() - 1) < 0.2
    assert source.describe() == (
        "random (input_ids: ids in [0, 50) (rows of 'word_table'); token_type_ids: ids in [0, 2) "
        "(rows of 'type_table'); attention_mask: ones; x: normal(0, 1))")
    OrtRunner(model).run(batch.inputs)  # the model runs on them


def test_random_source_on_an_exported_encoder_uses_its_vocabulary() -> None:
    from optcc.frontend import export_torch

    tokens = [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
              {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"}]
    for exporter in ("legacy", "dynamo"):
        model = export_torch("nets:bert_style", inputs=tokens, exporter=exporter,
                             base_dir=Path(__file__).parent)
        specs = {s.name: s for s in OrtRunner(model).input_specs}
        assert specs["input_ids"].index_limit == 100, exporter  # nn.Embedding(100, 64)
        assert specs["attention_mask"].index_limit is None
        batch = RandomSource(RandomOptions(samples=4, dims={"sequence": 8}),
                             inputs=list(specs.values())).first_batch()
        assert batch.inputs["input_ids"].max() < 100 and batch.inputs["input_ids"].any()
        assert (batch.inputs["attention_mask"] == 1).all()


def test_build_report_says_what_random_verification_data_was(tmp_path: Path) -> None:
    from conftest import write_recipe

    from optcc.build import build

    onnx.save(embedding_model(), tmp_path / "emb.onnx")
    recipe = write_recipe(tmp_path, "version: 1\nmodel: emb.onnx\npasses: [eliminate-dead-nodes]\n")
    result = build(recipe)
    report = result.report
    assert report["verification"]["data"].startswith("random (input_ids: ids in [0, 50)")
    assert report["verification"]["batch_checks"]["probes"] == ["batch size 1", "batch size 3"]
    text = (result.output_dir / "report.md").read_text()
    assert "batch checks: batch size 1, batch size 3, samples independent of their batch-mates" in text
    assert "samples from random (input_ids: ids in [0, 50)" in text
