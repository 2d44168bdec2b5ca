"""`drop_query_padding`: queries padded with a cache's shape to share one RoPE call get the RoPE
on their own rows (tables narrowed), values unchanged; anything not token-wise is left alone."""

import pytest
import torch

from qvg_compile.passes.pad_slice import drop_query_padding

H, D, N, n = 2, 16, 12, 4


def rope(x, cos, sin):
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).type_as(x)


def padded_read(cache, q, cos, sin):
    padded = torch.cat([torch.empty_like(cache), q], dim=2).contiguous()
    return rope(padded, cos, sin)[:, :, -q.shape[2]:].contiguous()


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, H, N - n, D, generator=g), torch.randn(1, H, n, D, generator=g),
            torch.randn(N, D, generator=g), torch.randn(N, D, generator=g))


def rewrite(fn, *args):
    """(rewrite notes, the rewritten graph's code, its output, the eager output)."""
    seen = []

    def backend(gm, example_inputs):
        seen.append(drop_query_padding(gm.graph))
        gm.recompile()
        seen.append(gm.code)
        return gm

    torch._dynamo.reset()
    got = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return seen[0], seen[1], got, fn(*args)


def test_padding_dropped_tables_narrowed_values_equal():
    notes, code, got, expected = rewrite(padded_read, *inputs())
    assert len(notes) == 1 and f"({N - n} rows dropped)" in notes[0]
    assert "empty_like" not in code and "torch.narrow" in code
    assert torch.equal(got, expected)


def test_a_slice_that_keeps_padding_or_a_padded_row_used_elsewhere_is_left_alone():
    def keeps_one_pad_row(cache, q, cos, sin):
        padded = torch.cat([torch.zeros_like(cache), q], dim=2)  # zeros: the kept pad row is compared
        return rope(padded, cos, sin)[:, :, -q.shape[2] - 1:]

    def uses_the_padded_rows(cache, q, cos, sin):
        padded = torch.cat([torch.zeros_like(cache), q], dim=2)
        rotated = rope(padded, cos, sin)
        return rotated[:, :, -q.shape[2]:], rotated.sum()

    for fn in (keeps_one_pad_row, uses_the_padded_rows):
        notes, _, got, expected = rewrite(fn, *inputs())
        assert notes == []
        assert all(torch.equal(a, b) for a, b in zip(got if isinstance(got, tuple) else (got,),
                                                      expected if isinstance(expected, tuple) else (expected,)))


def test_an_op_that_mixes_tokens_is_left_alone():
    def mixes(cache, q, cos, sin):
        padded = torch.cat([torch.zeros_like(cache), q], dim=2)
        return (padded.flip(2) * cos)[:, :, -q.shape[2]:]

    def reorders(cache, q, cos, sin):
        padded = torch.cat([torch.zeros_like(cache), q], dim=2)
        return (padded[..., torch.arange(N - 1, -1, -1), :] * cos)[:, :, -q.shape[2]:]

    for fn in (mixes, reorders):
        notes, _, got, expected = rewrite(fn, *inputs())
        assert notes == [] and torch.equal(got, expected)


def longcat_rope(x, cos, sin):
    """RoPE the way LongCat-Video's own attention writes it: sizes read back with ``size()``, the
    pairs split with ``reshape`` + ``unbind``, the token count written out when reshaping back."""
    x_ = x.float()
    size = x_.size()
    pairs = x_.reshape(size[0], size[1], size[2], D // 2, 2)
    x1, x2 = pairs.unbind(dim=-1)
    rotated = torch.stack((-x2, x1), dim=-1).reshape(size[0], H, N, D)
    return (x_ * cos + rotated * sin).type_as(x)


def test_longcat_form_with_a_dynamic_batch_and_a_slice_start_read_from_a_size():
    def read(cache, q, cos, sin):
        n = q.size()[2]
        padded = torch.cat([torch.empty_like(cache), q], dim=2).contiguous()
        return longcat_rope(padded, cos, sin)[:, :, -n:].contiguous()

    cache, q, cos, sin = inputs()
    cache, q = cache.expand(3, -1, -1, -1).contiguous(), q.expand(3, -1, -1, -1).contiguous()
    torch._dynamo.mark_dynamic(cache, 0)
    torch._dynamo.mark_dynamic(q, 0)
    notes, code, got, expected = rewrite(read, cache, q, cos, sin)
    assert len(notes) == 1 and f"({N - n} rows dropped)" in notes[0]
    assert "empty_like" not in code and "unbind" in code
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dynamic", [("cache",), ("cache", "q")])
def test_symbolic_token_counts_drop_the_padding_too(dynamic):
    # A growing cache (and a chunk length Dynamo made dynamic) leaves the padded length, and maybe
    # q's, symbolic: the padding is still dropped, q's count read back with size() and the tables
    # narrowed to their last rows. Kept, it would become a rotated view of a cache (idiom E) that
    # torch 2.11's Dynamo cannot guard on.
    cache, q, cos, sin = inputs()
    for name in dynamic:
        torch._dynamo.mark_dynamic({"cache": cache, "q": q}[name], 2)
    for table in (cos, sin):
        torch._dynamo.maybe_mark_dynamic(table, 0)
    notes, code, got, expected = rewrite(padded_read, cache, q, cos, sin)
    assert len(notes) == 1 and "rows dropped" in notes[0] and f"({N - n} rows" not in notes[0]
    assert "empty_like" not in code and "torch.narrow" in code and ("size" in code) == ("q" in dynamic)
    assert torch.equal(got, expected)


def sized_rope(x, cos, sin):
    """LongCat-Video's own RoPE spelling (einops ``rearrange``): sizes read from the shape and
    written out, so the last reshape is reached through those sizes before its tensor."""
    xf = x.float()
    b, h, t, d = xf.shape
    pairs = xf.reshape(b, h, t, d // 2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(b, h, t, d)
    return (xf * cos + rotated * sin).type_as(x)


def test_sizes_written_out_from_the_padded_shape_of_a_growing_cache():
    def read(cache, q, cos, sin):
        padded = torch.cat([torch.empty_like(cache), q], dim=2).contiguous()
        return sized_rope(padded, cos, sin)[:, :, -q.shape[2]:].contiguous()

    cache, q, cos, sin = inputs()
    cache, q = cache.expand(2, -1, -1, -1).contiguous(), q.expand(2, -1, -1, -1).contiguous()
    torch._dynamo.mark_dynamic(cache, 0)
    torch._dynamo.mark_dynamic(cache, 2)
    torch._dynamo.mark_dynamic(q, 0)
    for table in (cos, sin):
        torch._dynamo.maybe_mark_dynamic(table, 0)
    notes, code, got, expected = rewrite(read, cache, q, cos, sin)
    assert len(notes) == 1 and "rows dropped" in notes[0]
    assert "empty_like" not in code
    assert torch.equal(got, expected)
