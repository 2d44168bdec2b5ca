"""`OwnedOutputs`: fresh outputs come back as copies viewed as the originals were; inputs handed
back and their views come back as they are; outputs sharing a storage share one copy."""

from __future__ import annotations

import pytest
import torch

from qvg_compile.owned_outputs import OwnedOutputs


def test_fresh_outputs_are_copies_with_the_same_views_and_inputs_are_handed_back():
    buf = torch.arange(24.0)
    x = torch.ones(4, 3)

    def graph(x):
        # a fresh tensor, a strided view of it, the input, a view of the input, a non-tensor
        return buf.view(4, 6), buf.view(4, 6)[:, 1::2], x, x[1:], 7

    wrapped = OwnedOutputs(graph)
    for _ in range(2):
        fresh, strided, same, view, seven = wrapped(x)
        assert wrapped.fresh == (0, 1)
        assert same is x and view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        assert seven == 7
        assert torch.equal(fresh, buf.view(4, 6)) and torch.equal(strided, buf.view(4, 6)[:, 1::2])
        assert fresh.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
        assert strided.stride() == (6, 2) and strided.storage_offset() == 1
        # the two outputs that shared a storage still do
        assert strided.untyped_storage().data_ptr() == fresh.untyped_storage().data_ptr()
        buf.add_(1)  # the graph's memory is reused: what was returned must not change
        assert torch.equal(fresh, buf.view(4, 6) - 1)


def test_a_single_output_and_a_list_keep_their_form():
    t = torch.zeros(3)
    assert isinstance(OwnedOutputs(lambda: [t])(), list)
    single = OwnedOutputs(lambda: t)()
    assert isinstance(single, torch.Tensor) and single.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_an_output_autograd_tracks_keeps_its_history():
    w = torch.ones(3, requires_grad=True)
    out = OwnedOutputs(lambda: (w * 2,))()[0]
    out.sum().backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0))


def test_fn_must_be_callable():
    with pytest.raises(TypeError, match="fn: expected a callable"):
        OwnedOutputs(3)
