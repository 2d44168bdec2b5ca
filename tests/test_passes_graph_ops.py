"""passes/graph_ops.py: `reshape_shape` reads the target shape of every reshape spelling the
passes meet in a traced graph, and nothing else."""

import torch
import torch.fx as fx

from qvg_compile.passes.graph_ops import reshape_shape


def test_reshape_shape_of_each_spelling_and_none_for_other_ops():
    def fn(x):
        a = x.reshape(2, 3, 4)
        b = x.view([6, 4])
        c = torch.reshape(x, (24,))
        return a.flatten(), b, c

    gm = fx.symbolic_trace(fn)
    shapes = {n.name: reshape_shape(n) for n in gm.graph.nodes}
    assert shapes["reshape"] == [2, 3, 4]
    assert shapes["view"] == [6, 4]
    assert shapes["reshape_1"] == [24]
    assert shapes["flatten"] is None and shapes["x"] is None
    out = gm(torch.arange(24.0))
    assert out[0].shape == (24,) and out[1].shape == (6, 4)
