"""bench/after_sample.py: the forecaster's multiply-adds, counted from its graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.after_sample import forecaster_macs, optimised_nodes
from bwpredd.schema import WINDOW


def _init(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name)


class TestForecasterMacs:
    def test_lstm_per_step_and_matrix_once(self, tmp_path: Path) -> None:
        """An LSTM of 4 inputs and 8 units (W [1, 32, 4], R [1, 32, 8]) runs
        its weights once per step; a 8 x 3 MatMul head once; an Add with a
        constant costs no multiply-adds."""
        nodes = [
            helper.make_node("LSTM", ["x", "W", "R"], ["y", "h"], hidden_size=8),
            helper.make_node("Squeeze", ["h"], ["h2"]),
            helper.make_node("MatMul", ["h2", "M"], ["z"]),
            helper.make_node("Add", ["z", "b"], ["out"]),
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [WINDOW, 1, 4])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])],
            [_init("W", 1, 32, 4), _init("R", 1, 32, 8), _init("M", 8, 3), _init("b", 3)],
        )
        path = tmp_path / "f.onnx"
        onnx.save(helper.make_model(graph), str(path))
        assert forecaster_macs(path) == WINDOW * (32 * 4 + 32 * 8) + 8 * 3

    def test_shipped_forecaster_two_stacks(self) -> None:
        """The shipped graph: two 128-64-32 stacks over 4 features, 10 steps,
        plus small heads."""
        per_step = 4 * 128 * (4 + 128) + 4 * 64 * (128 + 64) + 4 * 32 * (64 + 32)
        lstm = 2 * WINDOW * per_step
        assert lstm <= forecaster_macs() < lstm + 5_000


class TestOptimisedNodes:
    def test_counts_what_onnxruntime_runs(self, tmp_path: Path) -> None:
        """A Mul by one and an Add of zero around a MatMul: onnxruntime
        keeps the MatMul and at most the two elementwise nodes, never more
        nodes than the graph has."""
        nodes = [
            helper.make_node("Mul", ["x", "one"], ["a"]),
            helper.make_node("MatMul", ["a", "M"], ["b"]),
            helper.make_node("Add", ["b", "zero"], ["out"]),
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
            [
                numpy_helper.from_array(np.ones(8, np.float32), "one"),
                numpy_helper.from_array(np.ones((8, 3), np.float32), "M"),
                numpy_helper.from_array(np.zeros(3, np.float32), "zero"),
            ],
        )
        path = tmp_path / "g.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        assert 1 <= optimised_nodes(path) <= 3
        assert 1 <= optimised_nodes(path, batch_one=False) <= 3
