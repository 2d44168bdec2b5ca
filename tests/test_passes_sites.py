"""Detection of KV-cache sites in Dynamo graphs: every idiom of docs/design.md §5, every reader kind,
and negatives that must stay untouched."""

import torch
import torch.nn.functional as F

from qvg_compile.passes.readers import find_readers
from qvg_compile.passes.sites import Known, find_sites

from flash_ops import flash_attn_op

B, H, D = 1, 2, 16


def capture(fn, *args, **kwargs):
    """Dynamo graphs of ``fn(*args)`` and the sites found in each."""
    results = []

    def backend(gm, example_inputs):
        results.append(find_sites(gm.graph))
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*args, **kwargs)
    torch._dynamo.reset()
    return results


def one_graph(fn, *args):
    results = capture(fn, *args)
    assert len(results) == 1
    return results[0]


def bshd(n):
    return torch.zeros(B, n, H, D)


def act(n, seed=0):
    return torch.randn(B, n, H, D, generator=torch.Generator().manual_seed(seed))


def sdpa_bshd(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)


def idiom_a(cache, x, s: int, e: int):
    cache["k"][:, s:e] = x
    cache["v"][:, s:e] = x * 2
    return sdpa_bshd(x, cache["k"][:, :e], cache["v"][:, :e])


def test_idiom_a_slice_write_prefix_read():
    sites, rejected, readers = one_graph(idiom_a, {"k": bshd(16), "v": bshd(16)}, act(4), 0, 4)
    assert [r.kind for r in readers] == ["sdpa"]
    by_source = {s.source: s for s in sites}
    assert set(by_source) == {"L['cache']['k']", "L['cache']['v']"}
    k = by_source["L['cache']['k']"]
    assert k.idioms == ["A"] and k.roles == ["key"] and k.seq_dim == 1 and k.layout == "[B, S, H, D]"
    assert by_source["L['cache']['v']"].roles == ["value"]
    assert not rejected


def idiom_b(kb, vb, x, sink: int, ev: int, r: int, s: int, e: int):
    kb[:, sink:sink + r] = kb[:, sink + ev:sink + ev + r].clone()
    vb[:, sink:sink + r] = vb[:, sink + ev:sink + ev + r].clone()
    kb[:, s:e] = x
    vb[:, s:e] = x
    return sdpa_bshd(x, kb[:, :e], vb[:, :e])


def test_idiom_b_rolling_window_with_sinks():
    sites, _, _ = one_graph(idiom_b, bshd(16), bshd(16), act(4), 2, 4, 6, 8, 12)
    assert {s.source for s in sites} == {"L['kb']", "L['vb']"}
    assert all(s.idioms == ["A", "B"] and s.seq_dim == 1 for s in sites)


def idiom_c(kb, vb, x, sink: int, w0: int, s: int, e: int):
    k2, v2 = kb.clone(), vb.clone()
    k2[:, s:e] = x
    v2[:, s:e] = x
    k = torch.cat([k2[:, :sink], k2[:, w0:e]], dim=1)
    v = torch.cat([v2[:, :sink], v2[:, w0:e]], dim=1)
    return sdpa_bshd(x, k, v), k2, v2


def test_idiom_c_clone_write_cat_read():
    sites, _, _ = one_graph(idiom_c, bshd(16), bshd(16), act(4), 2, 6, 8, 12)
    assert {s.source for s in sites} == {"L['kb']", "L['vb']"}
    assert all("C" in s.idioms and "A" not in s.idioms for s in sites)


def idiom_d(k_cache, v_cache, x):
    q = x.transpose(1, 2)
    k = torch.cat([k_cache, q[:1]], dim=2)
    v = torch.cat([v_cache, q[:1]], dim=2)
    out = F.scaled_dot_product_attention(q, k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1))
    return out, k, v  # the grown caches are returned: a functional append


def test_idiom_d_functional_cat_returned_with_cfg_repeat():
    sites, _, _ = one_graph(idiom_d, torch.randn(1, H, 8, D), torch.randn(1, H, 8, D),
                            torch.randn(2, 4, H, D))
    assert {s.source for s in sites} == {"L['k_cache']", "L['v_cache']"}
    assert all(s.idioms == ["D"] and s.seq_dim == 2 and s.layout == "[B, H, S, D]" for s in sites)


def text_then_history(text_k, text_v, k_cache, v_cache, x):
    """HY-WorldPlay: text K/V in front of the history, the concatenation not returned."""
    q = x.transpose(1, 2)
    return F.scaled_dot_product_attention(q, torch.cat([text_k, k_cache, q], dim=2),
                                          torch.cat([text_v, v_cache, q], dim=2))


def test_idiom_d_history_fed_back_from_a_graph_output_text_prefix_rejected():
    args = (torch.randn(1, H, 3, D), torch.randn(1, H, 3, D), torch.randn(1, H, 8, D),
            torch.randn(1, H, 8, D), torch.randn(1, 4, H, D))
    results = []

    def backend(gm, example_inputs):
        fed_back = {"l_k_cache_", "l_v_cache_"}  # what the backend knows from earlier outputs
        results.append(find_sites(gm.graph, known_cache=lambda n: Known("fed_back") if n.name in fed_back else None))
        return gm

    torch._dynamo.reset()
    torch.compile(text_then_history, backend=backend)(*args)
    sites, rejected, _ = results[0]
    assert {s.source for s in sites} == {"L['k_cache']", "L['v_cache']"}
    assert all(s.idioms == ["D"] for s in sites)
    why = {r.source: r.reason for r in rejected}
    assert "constant prefix" in why["L['text_k']"] and "L['text_v']" in why
    # Without the fed-back evidence nothing is a cache: no input is written, returned or known.
    sites, rejected, _ = one_graph(text_then_history, *args)
    assert sites == [] and {r.source for r in rejected} == {"L['text_k']", "L['text_v']", "L['k_cache']",
                                                            "L['v_cache']"}


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def idiom_e(k_cache, v_cache, x, cos, sin):
    q = x.transpose(1, 2)
    k_all = torch.cat([k_cache, q], dim=2)  # pre-RoPE keys
    v = torch.cat([v_cache.to(x.device), q], dim=2)
    out = F.scaled_dot_product_attention(rope(q, cos[..., -4:, :], sin[..., -4:, :]), rope(k_all, cos, sin), v)
    return out, k_all, v


def test_idiom_e_rope_at_read_and_device_move():
    n = 12
    cos, sin = torch.randn(n, D // 2), torch.randn(n, D // 2)
    sites, rejected, _ = one_graph(idiom_e, torch.randn(1, H, 8, D), torch.randn(1, H, 8, D),
                                   torch.randn(1, 4, H, D), cos, sin)
    by_source = {s.source: s for s in sites}
    assert set(by_source) == {"L['k_cache']", "L['v_cache']"}
    assert by_source["L['k_cache']"].idioms == ["D", "E"]
    assert "RoPE applied at read" in by_source["L['k_cache']"].notes
    # The cos/sin tables also feed the query's RoPE: current-chunk inputs, never caches.
    assert not {"L['cos']", "L['sin']"} & set(by_source)


def idiom_f(kv_buf, k, v, s: int, e: int):
    kv_buf[:, s:e] = torch.cat([k, v], dim=-1)
    kk, vv = kv_buf[:, :e].split(D, dim=-1)
    kk = kk.repeat_interleave(2, dim=2)
    vv = vv.repeat_interleave(2, dim=2)
    q = torch.randn(1, 4, 2 * H, D)
    return sdpa_bshd(q, kk, vv)


def test_idiom_f_packed_kv_with_gqa():
    sites, _, _ = one_graph(idiom_f, torch.zeros(1, 16, H, 2 * D), act(4), act(4, 1), 0, 4)
    assert len(sites) == 1
    s = sites[0]
    assert s.source == "L['kv_buf']" and {"A", "F"} <= set(s.idioms)
    assert sorted(s.roles) == ["key", "value"] and "GQA expansion" in s.notes


def idiom_g(cache, x, idx):
    e = int(idx.item())
    cache["k"][:, e - 4:e] = x
    cache["v"][:, e - 4:e] = x
    return sdpa_bshd(x, cache["k"][:, :e], cache["v"][:, :e])


def test_idiom_g_graph_break_on_item():
    torch._dynamo.config.capture_scalar_outputs = False
    results = capture(idiom_g, {"k": bshd(16), "v": bshd(16)}, act(4), torch.tensor([8]))
    assert len(results) >= 1
    found = {s.source for sites, _, _ in results for s in sites}
    assert {"L['cache']['k']", "L['cache']['v']"} <= found


def test_idiom_g_read_only_graph_uses_known_caches():
    def read_only(kb, vb, x):
        return sdpa_bshd(x, kb[:, :8], vb[:, :8])

    results = []

    def backend(gm, example_inputs):
        results.append(find_sites(gm.graph, known_cache=lambda n: "kb" in n.name or "vb" in n.name))
        return gm

    torch._dynamo.reset()
    torch.compile(read_only, backend=backend)(bshd(16), bshd(16), act(4))
    sites, rejected, _ = results[0]
    assert {s.source for s in sites} == {"L['kb']", "L['vb']"} and all(s.idioms == ["G"] for s in sites)


def idiom_h(kb, vb, x, idx):
    kb[:, idx] = x
    vb.index_copy_(1, idx, x)
    return sdpa_bshd(x, kb, vb)


def test_idiom_h_tensor_indexed_writes():
    sites, _, _ = one_graph(idiom_h, bshd(16), bshd(16), act(4), torch.arange(4, 8))
    assert {s.source for s in sites} == {"L['kb']", "L['vb']"}
    assert all("H" in s.idioms and s.seq_dim == 1 for s in sites)


def plain_attention(cache, x, s: int, e: int, mask):
    cache["k"][:, s:e] = x
    cache["v"][:, s:e] = x
    q, k, v = (t.transpose(1, 2) for t in (x, cache["k"][:, :e], cache["v"][:, :e]))
    scores = (q @ k.transpose(-2, -1)) * D ** -0.5 + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def test_matmul_softmax_reader():
    sites, _, readers = one_graph(plain_attention, {"k": bshd(16), "v": bshd(16)}, act(4), 0, 4,
                                  torch.zeros(4, 4))
    assert [r.kind for r in readers] == ["matmul_softmax"]
    assert {s.source for s in sites} == {"L['cache']['k']", "L['cache']['v']"}


class CacheModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(B, H, 16, D))
        self.register_buffer("v_cache", torch.zeros(B, H, 16, D))

    def forward(self, x, s: int, e: int):
        self.k_cache[:, :, s:e] = x
        self.v_cache[:, :, s:e] = x
        return F.scaled_dot_product_attention(x, self.k_cache[:, :, :e], self.v_cache[:, :, :e])


def test_module_buffer_caches():
    sites, _, _ = one_graph(CacheModule(), torch.randn(B, H, 4, D), 0, 4)
    assert len(sites) == 2 and all(s.seq_dim == 2 and s.idioms == ["A"] for s in sites)
    assert all("k_cache" in s.source or "v_cache" in s.source for s in sites)


def test_negative_cat_of_activations_and_cross_attention_constant():
    def fn(x, y, text_k, text_v):
        kv = torch.cat([x, y], dim=2)
        self_attn = F.scaled_dot_product_attention(x, kv, kv)
        return self_attn + F.scaled_dot_product_attention(x, text_k, text_v)

    x = torch.randn(B, H, 4, D)
    sites, rejected, readers = one_graph(fn, x, x.clone(), torch.randn(B, H, 7, D), torch.randn(B, H, 7, D))
    assert len(readers) == 2
    assert sites == []
    assert {r.source for r in rejected} >= {"L['text_k']", "L['text_v']"}


def test_negative_written_but_never_read_by_attention():
    def fn(buf, x, s: int, e: int):
        buf[:, s:e] = x
        return buf.sum()

    sites, rejected, readers = one_graph(fn, bshd(16), act(4), 0, 4)
    assert sites == [] and readers == []


def test_packed_kv_read_with_ellipsis_slices_is_f():
    def magi(buf, k, v, s: int, e: int):
        buf[:, s:e] = torch.cat([k, v], dim=-1)
        kv = buf[:, :e]
        keys = kv[..., :D].transpose(1, 2).repeat_interleave(2, dim=1)
        values = kv[..., D:].transpose(1, 2).repeat_interleave(2, dim=1)
        return F.scaled_dot_product_attention(torch.randn(1, 2 * H, 4, D), keys, values)

    sites, _, _ = one_graph(magi, torch.zeros(1, 16, H, 2 * D), act(4), act(4, 1), 0, 4)
    assert len(sites) == 1 and sites[0].idioms == ["A", "F"] and sorted(sites[0].roles) == ["key", "value"]
    assert sites[0].seq_dim == 1


def test_aten_sdpa_variants_are_readers():
    from torch.fx.experimental.proxy_tensor import make_fx

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, H, 4, D)
    gm = make_fx(attn)(q, q, q)
    readers = find_readers(gm.graph)
    assert [r.kind for r in readers] == ["sdpa"]
    assert readers[0].node.target in {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                                      torch.ops.aten.scaled_dot_product_attention.default,
                                      torch.ops.aten._scaled_dot_product_efficient_attention.default}

    def packet(cache, x, s: int, e: int):
        cache["k"][:, :, s:e] = x
        cache["v"][:, :, s:e] = x
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            x, cache["k"][:, :, :e], cache["v"][:, :, :e])[0]

    sites, _, readers = one_graph(packet, {"k": torch.zeros(B, H, 16, D), "v": torch.zeros(B, H, 16, D)},
                                  torch.randn(B, H, 4, D), 0, 4)
    assert [r.kind for r in readers] == ["sdpa"] and len(sites) == 2 and all(s.seq_dim == 2 for s in sites)


varlen_forward = flash_attn_op("qvg_sites_flash_attn::flash_attn_varlen_forward")  # [total, H, D] operands


def test_flash_attn_varlen_reader_reads_token_major_caches():
    def fn(cache, x, s: int, e: int):
        cache["k"][s:e] = x
        cache["v"][s:e] = x
        return varlen_forward(x, cache["k"][:e], cache["v"][:e])

    sites, _, readers = one_graph(fn, {"k": torch.zeros(16, H, D), "v": torch.zeros(16, H, D)},
                                  torch.randn(4, H, D), 0, 4)
    assert [r.kind for r in readers] == ["flash_attn"] and readers[0].seq_dim == 0
    assert {s.seq_dim for s in sites} == {0}


def test_written_in_one_graph_read_in_another_is_g_both_ways():
    def write_only(buf, x, s: int, e: int):
        buf[:, s:e] = x
        return x * 2

    results = []

    def backend(gm, example_inputs):
        known = Known("read", None, ("key",))
        results.append(find_sites(gm.graph, known_cache=lambda n: known if n.name == "l_buf_" else None))
        return gm

    torch._dynamo.reset()
    torch.compile(write_only, backend=backend)(bshd(16), act(4), 0, 4)
    sites, _, readers = results[0]
    assert readers == [] and len(sites) == 1
    assert sites[0].idioms == ["G"] and sites[0].roles == ["key"] and sites[0].seq_dim == 1
