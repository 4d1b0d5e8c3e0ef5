"""optcc.channels, the public channel-dependency analysis: rules and their precedence, the
plugin hook (the README's example, run as written), index mapping (slice, zero, permute)
and Model.replace_all_uses."""

from __future__ import annotations

import re
import types

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import DEMO_MODEL, REPO
from onnx import TensorProto, helper, numpy_helper

from optcc import channels
from optcc.ir import Model
from optcc.plugins import create_registry, set_registry
from optcc.runtime import OrtRunner


def conv_op_conv(op: str, **attrs: object) -> Model:
    """x → Conv(3→8) → ``op`` → Conv(8→4): the middle op decides whether the 8 prune."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(op, ["a"], ["b"], name="mid", **attrs),
        helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return Model.from_proto(proto)


def _feeds(batch: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((batch, 3, 6, 6)).astype(np.float32)}


def _readme_rule_plugin() -> types.ModuleType:
    """The README's plugin example, executed as a module."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Teaching pruning a new op", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    module = types.ModuleType("readme_rule_plugin")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    return module


def test_readme_plugin_rule_makes_an_unknown_op_prunable() -> None:
    from optcc_plugins.pruning import StructuredPruningPass, zeroed_reference

    model = conv_op_conv("Shrink", lambd=0.1, bias=0.05)
    blocked = StructuredPruningPass(ratio=0.5, round_to=1, min_channels=1)(model.copy())
    assert not blocked.modified
    assert blocked.stats["blocked"]["conv1"] == "read by Shrink 'mid', which has no pruning rule"

    set_registry(create_registry(extra_plugins=[("shrink-rules", _readme_rule_plugin())]))
    try:
        assert channels.default_rules().owners()["Shrink"] == ["shrink-rules"]
        pass_ = StructuredPruningPass(ratio=0.5, round_to=1, min_channels=1)
        reference = zeroed_reference(model, pass_)
        result = pass_(model.copy())
    finally:
        set_registry(None)
    assert result.modified
    assert np.asarray(result.model.node("conv1").inputs[1].values).shape == (4, 3, 3, 3)
    assert np.asarray(result.model.node("conv2").inputs[1].values).shape == (4, 4, 1, 1)
    np.testing.assert_allclose(OrtRunner(result.model).run(_feeds())[0],
                               OrtRunner(reference).run(_feeds())[0], rtol=1e-5, atol=1e-5)


def test_plugin_with_a_bad_rule_is_reported_and_registers_none() -> None:
    class Good(channels.ChannelRule):
        ops = frozenset({"Shrink"})

        def propagate(self, node, ctx):  # pragma: no cover - never called
            pass

    from optcc import hookimpl

    plugin = types.ModuleType("bad_rules")
    plugin.optcc_channel_rules = hookimpl(lambda: [Good(), object()])  # type: ignore[attr-defined]
    registry = create_registry(extra_plugins=[("bad-rules", plugin)])
    info = next(p for p in registry.plugins if p.name == "bad-rules")
    assert info.error is not None and "is not an optcc.channels.ChannelRule" in info.error
    assert registry.channel_rules.candidates("Shrink") == []


def test_rule_precedence_priority_then_latest_then_applies() -> None:
    ctx = channels.ChannelContext(conv_op_conv("Relu"), {}, channels.ChannelAnalysis())
    node = ctx.model.node("mid")

    class Block(channels.ChannelRule):
        ops = frozenset({"Relu"})

        def propagate(self, node, ctx):
            ctx.block_all(node.inputs[0], "custom")

    class Picky(Block):
        priority = 5

        def applies(self, node, ctx):
            return node.name != "mid"

    rules = channels.builtin_rules()
    builtin = rules.rule_for(node, ctx)
    assert type(builtin).__name__ == "UnaryRule"
    mine = rules.register(Block(), "plugin")
    assert rules.rule_for(node, ctx) is mine  # equal priority: the later registration wins
    rules.register(Picky(), "plugin")
    assert rules.rule_for(node, ctx) is mine  # higher priority, but it does not apply here
    assert rules.owners()["Relu"] == ["plugin", "plugin", "optcc"]
    analysis = channels.analyze(ctx.model, rules=rules)
    assert analysis.describe_blocked()["conv1"] == "custom"
    with pytest.raises(TypeError, match="declares no op types"):
        rules.register(channels.ChannelRule())


def test_permute_channels_is_lossless_and_moves_every_coupled_slice() -> None:
    model = Model.load(DEMO_MODEL)
    channels.materialize_constant_aliases(model)
    before = OrtRunner(model.copy()).run(_digits())[0]
    analysis = channels.analyze(model)
    group = max(analysis.groups(), key=lambda g: len(g.sources))  # the residual stage
    assert len(group.sources) >= 3
    classes = group.classes
    moves = dict(zip(classes, list(reversed(classes)), strict=True))
    weight = model.node(group.sources[0]).inputs[1]
    original = np.asarray(weight.values).copy()
    channels.permute_channels(model, analysis, moves)
    after = OrtRunner(model).run(_digits())[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    permuted = np.asarray(model.node(group.sources[0]).inputs[1].values)
    np.testing.assert_array_equal(permuted, original[::-1])
    with pytest.raises(ValueError, match="not a permutation"):
        channels.permute_channels(model, analysis, {classes[0]: classes[1]})


def _digits() -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)}


def test_shape_slot_walks_concat_pieces_of_any_length() -> None:
    """A Reshape target assembled by Concat from a 2-element constant and a computed dim:
    the one Concat walk finds the element and its index inside the right piece."""
    x = gs.Variable("x", np.float32, [2, 6, 8])
    dims = gs.Variable("dims", np.int64, [1])
    shape = gs.Variable("shape", np.int64, [4])
    out = gs.Variable("y", np.float32, None)
    head = gs.Constant("head", np.array([0, 0], np.int64))
    tail = gs.Constant("tail", np.array([4], np.int64))
    graph = gs.Graph(
        nodes=[gs.Node("Concat", "cat", {"axis": 0}, [head, dims, tail], [shape]),
               gs.Node("Reshape", "r", inputs=[x, shape], outputs=[out])],
        inputs=[x, dims], outputs=[out], opset=17)
    reshape = graph.nodes[1]
    assert channels.shape_slot(reshape, 1) == "copy"
    assert channels.shape_slot(reshape, 2) is None  # computed at run time
    assert channels.shape_slot(reshape, 3) == (2, 0)  # input 2 of the Concat, element 0
    other = gs.Node("Reshape", "r2", inputs=[x, shape], outputs=[gs.Variable("y2", np.float32)])
    graph.nodes.append(other)
    graph.outputs.append(other.outputs[0])
    model = Model(graph)
    channels.set_shape_dim(model, reshape, (2, 0), 2)
    assert list(channels.constant_value(reshape.inputs[1].inputs[0].inputs[2])) == [2]
    assert list(tail.values) == [4]  # shared constants are copied, never edited...
    assert other.inputs[1] is shape and shape.inputs[0].inputs[2] is tail  # ...nor shared Concats


def test_replace_all_uses() -> None:
    model = conv_op_conv("Relu")
    relu = model.node("mid")
    a, b = relu.inputs[0], relu.outputs[0]
    conv2 = model.node("conv2")
    assert model.replace_all_uses(b, a) == 1 and conv2.inputs[0] is a
    assert not b.outputs
    shared = gs.Constant("shared", np.ones(8, np.float32))
    readers = [gs.Node("Add", f"add{i}", inputs=[a, shared], outputs=[gs.Variable(f"o{i}")])
               for i in range(2)]
    copy = gs.Constant("copy", np.ones(8, np.float32))
    assert model.replace_all_uses(shared, copy, nodes=[readers[1]]) == 1
    assert readers[0].inputs[1] is shared and readers[1].inputs[1] is copy
    out = model.graph.outputs[0]
    replacement = gs.Variable("z", np.float32)
    assert model.replace_all_uses(out, replacement) == 0  # outputs keep their name...
    assert model.replace_all_uses(out, replacement, graph_outputs=True) == 1  # ...unless asked
    assert model.graph.outputs[0] is replacement


def test_analysis_is_public_and_reports_slices(tmp_path) -> None:
    """What the 2:4 permutation work relies on: a weight's input columns are recorded with
    the ids of the producer's output rows they pair with."""
    model = conv_op_conv("Relu")
    analysis = channels.analyze(model)
    by_role = {(s.node.name, s.role): s for s in analysis.slices}
    out_ids = by_role[("conv1", "out")].ids
    in_ids = by_role[("conv2", "in")].ids
    assert [analysis.find(i) for i in out_ids] == [analysis.find(i) for i in in_ids]
    assert by_role[("conv2", "in")].axis == 1 and by_role[("conv1", "out")].axis == 0
    (group,) = analysis.groups()
    assert group.sources == ("conv1",) and len(group.classes) == 8
    onnx.checker.check_model(model.to_proto())
