"""qvg_backend end to end on small hand-written graphs, one per cache idiom (docs/design.md §5) and
per attention reader kind: the compiled function computes what the same function computes
eagerly on caches quantized with `QVGCache.from_dense` and the same config (fp32, max abs diff
<= 1e-5), the dense buffers are freed, compiles stay bounded; negatives stay dense and correct."""

import gc
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import qvg_compile
from qvg_compile import QVGCache, QVGConfig
from qvg_compile.backend import QVGBackend, QVGBackendWarning, ValidationError
from qvg_compile.passes.flat_inputs import UnflattenCache

from flash_ops import flash_attn_op

CFG = QVGConfig.preset("qvg", centroids=8, kmeans_iters=2, group_size=16)
B, H, D, C = 1, 2, 16, 4  # batch, heads, head dim, tokens per chunk
N = 24  # cache capacity (tokens)
TOL = 1e-5
MAX_GRAPHS_PER_FRAME = 3  # the first compile and at most 2 recompiles


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def chunk(i: int, shape=(B, C, H, D)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(100 + i))


def sdpa_bshd(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)


@dataclass
class Case:
    """A step function run over a loop of chunks with its state (a dict holding the caches).

    ``caches``: state key -> (seq_dim, role or roles); ``args(state, i)``: the arguments of step
    ``i``; ``commit(state, out)``: what the caller does with the outputs (store returned caches),
    returning the tensor to compare."""

    fn: Callable
    state: Callable[[], dict]
    caches: dict[str, tuple[int, Any]]
    args: Callable[[dict, int], tuple]
    steps: int = 6
    commit: Optional[Callable[[dict, Any], torch.Tensor]] = None
    fullgraph: bool = True
    idioms: set = field(default_factory=set)


def quantized(case: Case) -> dict:
    state = case.state()
    for key, (seq_dim, role) in case.caches.items():
        roles = {"roles": role} if isinstance(role, tuple) else {"role": role}
        state[key] = QVGCache.from_dense(state[key], seq_dim, CFG, **roles)
    return state


def loop(fn: Callable, case: Case, state: dict) -> list[torch.Tensor]:
    outs = []
    for i in range(case.steps):
        out = fn(*case.args(state, i))
        outs.append((case.commit(state, out) if case.commit else out).clone())
    return outs


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def compiled_run(case: Case, qvg: Optional[QVGBackend] = None):
    """Eager reference on quantized caches, compiled run on dense caches; returns both outputs,
    the compiled run's state, weak references to its dense caches and the backend; `stats()`
    afterwards count the compiled run only."""
    expected = loop(case.fn, case, quantized(case))
    qvg_compile.reset_stats()
    qvg = qvg or qvg_compile.backend(CFG)
    state = case.state()
    refs = {key: weakref.ref(state[key]) for key in case.caches}
    got = loop(torch.compile(case.fn, backend=qvg, fullgraph=case.fullgraph), case, state)
    gc.collect()
    return expected, got, state, refs, qvg


def assert_rewritten(case: Case, qvg_run):
    expected, got, state, refs, qvg = qvg_run
    assert max_diff(got, expected) <= TOL
    assert all(r() is None for r in refs.values()), "a dense cache buffer is still referenced"
    assert all(isinstance(state[key], QVGCache) for key in case.caches)
    report = qvg.report
    assert {s.source for s in report.sites} == {f"L['state'][{key!r}]" for key in case.caches}
    assert case.idioms <= {i for s in report.sites for i in s.idioms}
    assert not any(g.eager for g in report.graphs), [g.eager for g in report.graphs]
    return report


def dict_state(n: int = N, layout=(B, N, H, D)) -> Callable[[], dict]:
    return lambda: {"k": torch.zeros(*layout[:1], *(n if d == N else d for d in layout[1:])),
                    "v": torch.zeros(*layout[:1], *(n if d == N else d for d in layout[1:]))}


KV_BSHD = {"k": (1, "key"), "v": (1, "value")}
KV_BHND = {"k": (2, "key"), "v": (2, "value")}


def returned(state: dict, out: tuple) -> torch.Tensor:
    """The caller stores the caches the step returns (idioms C, D)."""
    o, state["k"], state["v"] = out
    return o


# --- A: preallocated buffer, slice writes, prefix reads ----------------------------------------
def idiom_a(state, x, s: int, e: int):
    state["k"][:, s:e] = x
    state["v"][:, s:e] = x * 2
    return sdpa_bshd(x, state["k"][:, :e], state["v"][:, :e])


CASE_A = Case(idiom_a, dict_state(), KV_BSHD, lambda st, i: (st, chunk(i), i * C, (i + 1) * C), idioms={"A"})


def test_idiom_a_fullgraph_equals_eager_frees_dense_and_compiles_twice():
    run = compiled_run(CASE_A)
    report = assert_rewritten(CASE_A, run)
    assert len(report.graphs) == 2  # dense first call (swap), then the QVGCache graph
    assert report.graphs[1].inputs_are_caches
    assert sorted(report.graphs[0].swapped) == ["L['state']['k']", "L['state']['v']"]
    dense = loop(idiom_a, CASE_A, CASE_A.state())
    assert max_diff(run[1], dense) > 1e-2  # the cache really is quantized


def test_cudagraphs_option_compiles_the_same_model_and_every_cache_op_is_tagged():
    # On the CPU Inductor captures no CUDA graph: the option must compile and compute the same
    # (the GPU test is `tests/test_gpu_fast_read.py`); the tag keeps the ops out of the graphs.
    assert_rewritten(CASE_A, compiled_run(CASE_A, qvg_compile.backend(CFG, cudagraphs=True)))
    ops = [name for name in dir(torch.ops.qvg) if name.startswith("cache_")]
    assert len(ops) >= 10
    assert all(torch.Tag.cudagraph_unsafe in getattr(torch.ops.qvg, name).default.tags for name in ops)
    with pytest.raises(TypeError, match="cudagraphs: expected a bool"):
        qvg_compile.backend(CFG, cudagraphs="yes")


def test_compile_count_bounded_over_a_long_loop():
    case = Case(idiom_a, dict_state(4 * 16), KV_BSHD, lambda st, i: (st, chunk(i), i * C, (i + 1) * C), steps=16)
    counters = torch._dynamo.utils.counters
    counters.clear()
    _, got, _, _, qvg = compiled_run(case)
    assert len(qvg.report.graphs) <= MAX_GRAPHS_PER_FRAME
    assert counters["stats"]["unique_graphs"] <= MAX_GRAPHS_PER_FRAME


def idiom_a_bf16(state, x, s: int, e: int):
    state["k"][:, s:e] = x.to(torch.bfloat16)
    state["v"][:, s:e] = x.to(torch.bfloat16)
    return sdpa_bshd(x, state["k"][:, :e].float(), state["v"][:, :e].to(torch.float32))


def test_bf16_caches_cast_at_read_are_freed_and_read_fused():
    def state():
        return {name: torch.zeros(B, N, H, D, dtype=torch.bfloat16) for name in ("k", "v")}

    case = Case(idiom_a_bf16, state, KV_BSHD, lambda st, i: (st, chunk(i), i * C, (i + 1) * C), steps=4, idioms={"A"})
    report = assert_rewritten(case, compiled_run(case))
    assert {s.dtype for s in report.sites} == {"bfloat16"}
    stats = qvg_compile.stats()
    assert stats["decoded_tokens"] == 0 and stats["attention_calls"] > 0


# --- B: rolling window with sink tokens -------------------------------------------------------
SINK, WINDOW = 2, 14


def idiom_b(state, x, roll: int, s: int, e: int):
    kb, vb = state["k"], state["v"]
    if roll:
        r = s - SINK - roll
        kb[:, SINK:SINK + r] = kb[:, SINK + roll:SINK + roll + r].clone()
        vb[:, SINK:SINK + r] = vb[:, SINK + roll:SINK + roll + r].clone()
        s, e = s - roll, e - roll
    kb[:, s:e] = x
    vb[:, s:e] = x
    return sdpa_bshd(x, kb[:, :e], vb[:, :e])


def b_args(state, i):
    s = SINK + min(WINDOW - SINK - C, i * C)  # after the window fills, every chunk rolls
    roll = C if i * C > WINDOW - SINK - C else 0
    return state, chunk(i), roll, s + roll, s + roll + C


def test_idiom_b_rolling_window_with_sinks():
    case = Case(idiom_b, dict_state(WINDOW), KV_BSHD, b_args, steps=6, idioms={"A", "B"})
    report = assert_rewritten(case, compiled_run(case))
    assert len(report.graphs) <= MAX_GRAPHS_PER_FRAME


# --- C: clone, write into the clone, read a cat of sinks and window, commit outside ------------
def idiom_c(state, x, sink: int, w0: int, s: int, e: int):
    k2, v2 = state["k"].clone(), state["v"].clone()
    k2[:, s:e] = x
    v2[:, s:e] = x
    k = torch.cat([k2[:, :sink], k2[:, w0:e]], dim=1)
    v = torch.cat([v2[:, :sink], v2[:, w0:e]], dim=1)
    return sdpa_bshd(x, k, v), k2, v2


def test_idiom_c_clone_write_cat_read_commit_outside():
    case = Case(idiom_c, dict_state(), KV_BSHD,
                lambda st, i: (st, chunk(i), 2, max(2, (i - 1) * C), i * C, (i + 1) * C),
                commit=returned, idioms={"C"})
    report = assert_rewritten(case, compiled_run(case))
    assert len(report.graphs) <= MAX_GRAPHS_PER_FRAME


# --- D: functional append (cat), CFG repeat, the grown cache returned and fed back -------------
def idiom_d(state, x):
    q = x.transpose(1, 2)
    k = torch.cat([state["k"], q], dim=2)
    v = torch.cat([state["v"].to(x.device), q * 2], dim=2)
    out = F.scaled_dot_product_attention(q.repeat(2, 1, 1, 1), k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1))
    return out, k, v


def history():
    g = torch.Generator().manual_seed(1)
    return {"k": torch.randn(B, H, C, D, generator=g), "v": torch.randn(B, H, C, D, generator=g)}


CASE_D = Case(idiom_d, history, KV_BHND, lambda st, i: (st, chunk(i)), steps=5, commit=returned, idioms={"D"})


def test_idiom_d_functional_append_equals_eager_and_frees_dense():
    expected, got, state, refs, qvg = compiled_run(CASE_D)
    assert max_diff(got, expected) <= TOL
    assert all(r() is None for r in refs.values())
    assert all(isinstance(state[k], QVGCache) for k in "kv") and state["k"].shape[2] == C * (1 + CASE_D.steps)
    assert {i for s in qvg.report.sites for i in s.idioms} == {"D"}


def test_idiom_d_stays_compiled_with_bounded_recompiles():
    _, _, _, _, qvg = compiled_run(CASE_D)
    assert not any(g.eager for g in qvg.report.graphs), [g.eager for g in qvg.report.graphs]
    assert len(qvg.report.graphs) <= MAX_GRAPHS_PER_FRAME


def cache_pass(frames):
    """LongCat-style: recompute the whole history's K/V (activations) and return them."""
    k = frames.transpose(1, 2) * 1.5
    return k.clone(), (k * -0.5).clone()


def denoise(state, x):
    q = x.transpose(1, 2)
    k = torch.cat([state["k"], q], dim=2)  # read only: the cache itself comes from cache_pass
    v = torch.cat([state["v"], q], dim=2)
    return F.scaled_dot_product_attention(q, k, v)


def quantize_kv(k, v):
    """The eager reference's cache: both halves as QVGCache of the same config (sequence dim 2)."""
    return QVGCache.from_dense(k, 2, CFG, role="key"), QVGCache.from_dense(v, 2, CFG, role="value")


def eager_and_compiled(video):
    """``video(run_pass, run_denoise, convert)`` eagerly with ``convert`` = `quantize_kv`, then with
    both steps compiled by one QVG backend and the caches left dense: (expected, got, final state,
    backend)."""
    expected, _ = video(cache_pass, denoise, quantize_kv)
    qvg = qvg_compile.backend(CFG)
    got, state = video(torch.compile(cache_pass, backend=qvg, fullgraph=True),
                       torch.compile(denoise, backend=qvg, fullgraph=True), lambda k, v: (k, v))
    return expected, got, state, qvg


def test_idiom_d_history_recomputed_each_chunk_returns_qvgcache_and_compiles_boundedly():
    frames = [chunk(i) for i in range(8)]

    def video(run_pass, run_denoise, convert):
        state, outs = {}, []
        for i in range(1, len(frames)):
            state["k"], state["v"] = convert(*run_pass(torch.cat(frames[:i], dim=1)))
            outs += [run_denoise(state, frames[i]) for _ in range(2)]  # two denoising steps
        return outs, state

    expected, got, state, qvg = eager_and_compiled(video)
    assert max_diff(got, expected) <= TOL
    assert isinstance(state["k"], QVGCache) and isinstance(state["v"], QVGCache)
    report = qvg.report
    assert sum(len(g.swapped) for g in report.graphs) == 2  # once; later passes return QVGCache
    assert {i for s in report.sites for i in s.idioms} == {"D"}
    assert all(n <= MAX_GRAPHS_PER_FRAME for n in report.compiles_per_frame().values())


def test_idiom_d_pieces_appended_by_the_caller_stay_dense_and_join_the_qvg_cache():
    """WorldPlay-style: the cache pass returns only the new chunk's K/V; the caller appends it
    with ``cat`` to the history, which is a QVGCache after the first swap."""
    frames = [chunk(i) for i in range(6)]

    def video(run_pass, run_denoise, first):
        state, outs = {}, []
        for i in range(len(frames) - 1):
            k, v = run_pass(frames[i])
            if state:
                state["k"], state["v"] = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)
            else:
                state["k"], state["v"] = first(k, v)
            outs += [run_denoise(state, frames[i + 1]) for _ in range(2)]
        return outs, state

    expected, got, state, qvg = eager_and_compiled(video)
    assert max_diff(got, expected) <= TOL
    assert isinstance(state["k"], QVGCache) and state["k"].shape[2] == C * (len(frames) - 1)
    assert sum(len(g.swapped) for g in qvg.report.graphs) == 2


# --- E: RoPE applied to the whole cached history at read time ---------------------------------
COS = torch.randn(N, D // 2, generator=torch.Generator().manual_seed(7))
SIN = torch.randn(N, D // 2, generator=torch.Generator().manual_seed(8))


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def idiom_e(state, x, cos, sin, s: int, e: int):
    state["k"][:, :, s:e] = x  # pre-RoPE keys
    state["v"][:, :, s:e] = x
    k = rope(state["k"][:, :, :e], cos[:e], sin[:e])
    return F.scaled_dot_product_attention(rope(x, cos[s:e], sin[s:e]), k, state["v"][:, :, :e])


def test_idiom_e_rope_on_the_history_at_read():
    case = Case(idiom_e, dict_state(layout=(B, H, N, D)), KV_BHND,
                lambda st, i: (st, chunk(i, (B, H, C, D)), COS, SIN, i * C, (i + 1) * C), steps=5, idioms={"A", "E"})
    report = assert_rewritten(case, compiled_run(case))
    k_site = next(s for s in report.sites if s.source.endswith("['k']"))
    assert "RoPE applied at read" in k_site.notes
    assert len(report.graphs) <= MAX_GRAPHS_PER_FRAME


# --- F: K and V packed along the last dim, GQA expansion at read ------------------------------
def idiom_f(state, k, v, s: int, e: int):
    state["kv"][:, s:e] = torch.cat([k, v], dim=-1)
    kk, vv = state["kv"][:, :e].split(D, dim=-1)
    q = k.repeat_interleave(2, dim=2)
    return sdpa_bshd(q, kk.repeat_interleave(2, dim=2), vv.repeat_interleave(2, dim=2))


def test_idiom_f_packed_kv_with_gqa():
    case = Case(idiom_f, lambda: {"kv": torch.zeros(B, N, H, 2 * D)}, {"kv": (1, ("key", "value"))},
                lambda st, i: (st, chunk(i), chunk(50 + i), i * C, (i + 1) * C), steps=5, idioms={"A", "F"})
    report = assert_rewritten(case, compiled_run(case))
    assert sorted(report.sites[0].roles) == ["key", "value"] and "GQA expansion" in report.sites[0].notes


# --- G: index bookkeeping with .item(): write and read land in different graphs ----------------
def idiom_g(state, x):
    s = int(state["pos"].item())
    state["k"][:, s:s + C] = x
    state["v"][:, s:s + C] = x
    state["pos"] += C
    e = int(state["pos"].item())  # graph break: the read below is in another graph
    return sdpa_bshd(x, state["k"][:, :e], state["v"][:, :e])


def test_idiom_g_graph_breaks_split_write_and_read():
    def state():
        return {**dict_state()(), "pos": torch.tensor(0)}

    case = Case(idiom_g, state, KV_BSHD, lambda st, i: (st, chunk(i)), steps=5, fullgraph=False, idioms={"G"})
    expected, got, st, refs, qvg = compiled_run(case)
    report = assert_rewritten(case, (expected, got, st, refs, qvg))
    split = [g for g in report.graphs if any("G" in s.idioms for s in g.sites)]
    assert split, "no graph recognised a cache from another graph's evidence"
    frames = len({g.code_before.split("def forward")[1].split(")")[0] for g in report.graphs})
    assert len(report.graphs) <= MAX_GRAPHS_PER_FRAME * frames


# --- H: tensor-indexed writes -----------------------------------------------------------------
def idiom_h(state, x, idx):
    state["k"][:, idx] = x
    state["v"].index_copy_(1, idx, x)
    return sdpa_bshd(x, state["k"], state["v"])


def test_idiom_h_tensor_indexed_writes():
    case = Case(idiom_h, dict_state(), KV_BSHD, lambda st, i: (st, chunk(i), torch.arange(i * C, (i + 1) * C)),
                steps=5, idioms={"H"})
    report = assert_rewritten(case, compiled_run(case))
    assert len(report.graphs) <= MAX_GRAPHS_PER_FRAME


# --- module state: registered buffers [B, H, N, D] --------------------------------------------
class BufferAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(B, H, N, D))
        self.register_buffer("v_cache", torch.zeros(B, H, N, D))

    def forward(self, x, s: int, e: int):
        self.k_cache[:, :, s:e] = x
        self.v_cache[:, :, s:e] = x
        return F.scaled_dot_product_attention(x, self.k_cache[:, :, :e], self.v_cache[:, :, :e])


def test_module_buffers_are_replaced_in_the_module():
    xs = [(chunk(i, (B, H, C, D)), i * C, (i + 1) * C) for i in range(4)]
    ref = qvg_compile.compress(BufferAttention(), CFG, seq_dim=2)
    expected = [ref(*a) for a in xs]
    m = BufferAttention()
    refs = [weakref.ref(m.k_cache), weakref.ref(m.v_cache)]
    qvg = qvg_compile.backend(CFG)
    compiled = torch.compile(m, backend=qvg, fullgraph=True)
    got = [compiled(*a) for a in xs]
    gc.collect()
    assert max_diff(got, expected) <= TOL
    assert all(r() is None for r in refs)
    assert isinstance(m.k_cache, QVGCache) and isinstance(m._buffers["v_cache"], QVGCache)
    assert len(qvg.report.graphs) <= MAX_GRAPHS_PER_FRAME


# --- reader kinds -----------------------------------------------------------------------------
def matmul_softmax(state, x, s: int, e: int, mask):
    state["k"][:, s:e] = x
    state["v"][:, s:e] = x
    q, k, v = (t.transpose(1, 2) for t in (x, state["k"][:, :e], state["v"][:, :e]))
    scores = (q @ k.transpose(-2, -1)) * D ** -0.5 + mask[..., :e]
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def matmul_softmax_unmasked(state, x, s: int, e: int):
    state["k"][:, s:e] = x
    state["v"][:, s:e] = x
    q, k, v = (t.transpose(1, 2) for t in (x, state["k"][:, :e], state["v"][:, :e]))
    scores = q @ k.transpose(-2, -1) / D ** 0.5
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def aten_sdpa(state, x, s: int, e: int):
    state["k"][:, :, s:e] = x
    state["v"][:, :, s:e] = x
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(x, state["k"][:, :, :e], state["v"][:, :, :e])[0]


flash_attn_forward = flash_attn_op("qvg_test_flash_attn::_flash_attn_forward")  # [B, N, H, D] operands


def flash_attn(state, x, s: int, e: int):
    state["k"][:, s:e] = x
    state["v"][:, s:e] = x
    return flash_attn_forward(x, state["k"][:, :e], state["v"][:, :e])


MASK = torch.triu(torch.full((C, N), -1e4), diagonal=1)


@pytest.mark.parametrize("fn, layout, caches, extra, kind", [
    (matmul_softmax, (B, N, H, D), KV_BSHD, (MASK,), "matmul_softmax"),
    (matmul_softmax_unmasked, (B, N, H, D), KV_BSHD, (), "matmul_softmax"),
    (aten_sdpa, (B, H, N, D), KV_BHND, (), "sdpa"),
    (flash_attn, (B, N, H, D), KV_BSHD, (), "flash_attn"),
], ids=["matmul_softmax_fp32_mask", "matmul_softmax_fp32", "aten_sdpa_variant", "flash_attn_op"])
def test_reader_kinds(fn, layout, caches, extra, kind):
    shape = (B, C, H, D) if layout[1] == N else (B, H, C, D)
    case = Case(fn, dict_state(layout=layout), caches,
                lambda st, i: (st, chunk(i, shape), i * C, (i + 1) * C, *extra), steps=4, idioms={"A"})
    report = assert_rewritten(case, compiled_run(case))
    assert kind in report.graphs[0].readers
    assert len(report.graphs) <= MAX_GRAPHS_PER_FRAME
    if fn is matmul_softmax_unmasked:
        # Rewritten into SDPA: the compiled run reads the cache fused, never decoding it whole.
        assert all("scaled_dot_product_attention" in g.rewrites[0] for g in report.graphs)
        stats = qvg_compile.stats()  # (its fallbacks count Dynamo's fake-tensor trace of the matmuls)
        assert stats["decoded_tokens"] == 0 and stats["attention_calls"] > 0
    elif fn is matmul_softmax:
        assert not any(g.rewrites for g in report.graphs)  # the fused read takes no mask
        # ... and the matmuls over the cache are reported as left as written, not as rewrites.
        assert any("left as written" in line for g in report.graphs for line in g.untouched)


# --- negatives: stay dense, unchanged and correct ---------------------------------------------
def assert_untouched(fn, args, qvg, fullgraph=True):
    dense_inputs = [a for a in args if isinstance(a, torch.Tensor)]
    expected = fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    got = torch.compile(fn, backend=qvg, fullgraph=fullgraph)(*args)
    assert all(type(a) is torch.Tensor for a in dense_inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not any(g.swapped for g in qvg.report.graphs)


def test_cat_of_activations_and_cross_attention_constants_untouched():
    def fn(x, y, text_k, text_v):
        kv = torch.cat([x, y], dim=2)
        return F.scaled_dot_product_attention(x, kv, kv) + F.scaled_dot_product_attention(x, text_k, text_v)

    qvg = qvg_compile.backend(CFG)
    assert_untouched(fn, [chunk(0, (B, H, C, D)), chunk(1, (B, H, C, D)), chunk(2, (B, H, 7, D)),
                          chunk(3, (B, H, 7, D))], qvg)
    assert qvg.report.sites == []
    why = {r.source: r.reason for r in qvg.report.graphs[0].rejected}
    assert "cross-attention constant" in why["L['text_k']"] and "L['text_v']" in why


def test_model_without_cache_is_left_alone():
    lin = torch.nn.Linear(8, 8)
    qvg = qvg_compile.backend(CFG)
    x = torch.randn(2, 8)
    torch.testing.assert_close(torch.compile(lin, backend=qvg)(x), lin(x))
    assert qvg.report.sites == [] and qvg.report.graphs[0].readers == {}


def test_bare_local_caches_cannot_be_replaced_stay_dense_and_are_reported():
    def fn(kb, vb, x, s: int, e: int):
        kb[:, s:e] = x
        vb[:, s:e] = x
        return sdpa_bshd(x, kb[:, :e], vb[:, :e])

    qvg = qvg_compile.backend(CFG)
    ref_k, ref_v = torch.zeros(B, N, H, D), torch.zeros(B, N, H, D)
    kb, vb = torch.zeros(B, N, H, D), torch.zeros(B, N, H, D)
    compiled = torch.compile(fn, backend=qvg, fullgraph=True)
    for i in range(3):
        expected = fn(ref_k, ref_v, chunk(i), i * C, (i + 1) * C)
        torch.testing.assert_close(compiled(kb, vb, chunk(i), i * C, (i + 1) * C), expected, rtol=0, atol=TOL)
    assert type(kb) is torch.Tensor and torch.equal(kb, ref_k)
    errors = " ".join(e for g in qvg.report.graphs for e in g.swap_errors)
    assert "L['kb']: not replaced" in errors and "bare local" in errors
    assert "not replaced" in qvg.report.summary()


def test_unsupported_config_keeps_the_model_dense_with_a_clear_message():
    qvg = qvg_compile.backend(QVGConfig.preset("qvg", group_size=64))  # does not divide head dim 16
    state = dict_state()()
    ref = dict_state()()
    compiled = torch.compile(idiom_a, backend=qvg, fullgraph=True)
    for i in range(3):
        expected = idiom_a(ref, chunk(i), i * C, (i + 1) * C)
        torch.testing.assert_close(compiled(state, chunk(i), i * C, (i + 1) * C), expected, rtol=0, atol=TOL)
    assert all(type(t) is torch.Tensor for t in state.values())
    errors = [e for g in qvg.report.graphs for e in g.swap_errors]
    assert any("group_size" in e and "not replaced" in e for e in errors)
    assert len(qvg.report.graphs) <= 2  # as Inductor alone: static ints, then dynamic ones


def test_a_cache_that_cannot_be_quantized_leaves_every_cache_dense():
    state, ref = dict_state()(), dict_state()()
    for st in (state, ref):
        st["v"][0, 0, 0, 0] = float("nan")  # check_finite refuses to quantize it
    qvg = qvg_compile.backend(CFG)
    with pytest.warns(qvg_compile.QVGBackendWarning, match="could not be quantized"):
        got = torch.compile(idiom_a, backend=qvg, fullgraph=True)(state, chunk(0), C, 2 * C)
    expected = idiom_a(ref, chunk(0), C, 2 * C)
    assert all(type(t) is torch.Tensor for t in state.values())  # K too: all or none
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL, equal_nan=True)


def test_written_but_never_read_by_attention_is_not_a_cache():
    def fn(state, x, s: int, e: int):
        state["k"][:, s:e] = x
        return state["k"].sum()

    qvg = qvg_compile.backend(CFG)
    assert_untouched(fn, [dict_state()(), chunk(0), 0, C], qvg)
    assert qvg.report.sites == []


# --- validate, registration, config errors ----------------------------------------------------
def test_validate_passes_on_a_correct_rewrite():
    qvg = qvg_compile.backend(CFG, validate=True)
    case = Case(idiom_a, dict_state(), KV_BSHD, lambda st, i: (st, chunk(i), i * C, (i + 1) * C), steps=3)
    expected, got, *_ = compiled_run(case, qvg)
    assert max_diff(got, expected) <= TOL


class HFCache:
    """A HuggingFace-style cache object: per-layer key and value lists grown by ``cat``."""

    def __init__(self, layers: int) -> None:
        self.key_cache: list = [None] * layers
        self.value_cache: list = [None] * layers


class PeekModel(torch.nn.Module):
    """Idiom J in a small two-layer model: the non-final denoising pass reads
    ``cat([cache, new])`` without storing it, the final pass stores it; ``[B, H, S, D]``."""

    def __init__(self, layers: int = 2, head_dim: int = D) -> None:
        super().__init__()
        self.d = head_dim
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(H * head_dim, 3 * H * head_dim) for _ in range(layers))

    def forward(self, x, cache: HFCache, store: bool):
        b, n, _ = x.shape
        for i, proj in enumerate(self.qkv):
            q, k, v = proj(x).view(b, n, 3, H, self.d).permute(2, 0, 3, 1, 4)
            if cache.key_cache[i] is None:
                kk, vv = k, v
            else:
                kk = torch.cat([cache.key_cache[i], k], -2)
                vv = torch.cat([cache.value_cache[i], v], -2)
            if store:
                cache.key_cache[i], cache.value_cache[i] = kk, vv
            x = x + F.scaled_dot_product_attention(q, kk, vv).transpose(1, 2).reshape(b, n, -1)
        return x


def test_idiom_j_peek_reads_of_a_cat_grown_cache_validate():
    """The copies `validate` runs eagerly are exact (`QVGCache.snapshot`): a cache grown by cat
    keeps its appended tokens dense in the copy as in the original, so a read-only (peek) pass
    compares equal (with ``clone()`` the copy sealed them and validation failed). Every call over
    compressed caches equals the model run eagerly on exact copies of them (fp32, 1e-5)."""
    torch.manual_seed(5)
    model = PeekModel().eval()
    qvg = qvg_compile.backend(CFG, validate=True)
    compiled = torch.compile(model, backend=qvg)
    cache = HFCache(2)
    checked = 0
    with torch.no_grad():
        for c in range(4):
            x = torch.randn(B, C, H * D, generator=torch.Generator().manual_seed(c))
            for store in (False, True):
                held = cache.key_cache + cache.value_cache
                copy = HFCache(2)
                memo: dict = {}
                copy.key_cache, copy.value_cache = ([t.snapshot(memo) if isinstance(t, QVGCache) else t for t in ts]
                                                    for ts in (cache.key_cache, cache.value_cache))
                want = model(x, copy, store)
                x_next = compiled(x, cache, store)
                if all(isinstance(t, QVGCache) for t in held):
                    assert (x_next - want).abs().max() <= TOL
                    checked += 1
                x = x_next
    assert checked >= 4
    assert all(isinstance(t, QVGCache) for t in cache.key_cache + cache.value_cache)
    assert sum(len(g.swapped) for g in qvg.report.graphs) == 4


def peek_video(model, compiled, chunks: int, head_dim: int) -> None:
    cache = HFCache(2)
    with torch.no_grad():
        for c in range(chunks):
            x = torch.randn(B, C, H * head_dim, generator=torch.Generator().manual_seed(c))
            for store in (False, True):
                x = compiled(x, cache, store)


def test_a_head_dim_the_group_size_does_not_divide_warns_once_and_costs_no_recompile():
    """Head dim 48 with groups of 64 channels: every cache stays dense, each is reported once as
    a warning that names a group size that fits, and the graphs are the ones Inductor compiles
    alone (no guard on the growing length)."""
    torch.manual_seed(6)
    model = PeekModel(head_dim=48).eval()
    counters = torch._dynamo.utils.counters
    counters.clear()
    peek_video(model, torch.compile(model), 6, 48)
    inductor_graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    qvg = qvg_compile.backend(CFG.replace(group_size=64))
    with pytest.warns(qvg_compile.QVGBackendWarning) as seen:
        peek_video(model, torch.compile(model, backend=qvg), 6, 48)
    messages = [str(w.message) for w in seen if "does not divide the head dim 48" in str(w.message)]
    assert len(messages) == 4 and len(set(messages)) == 4  # one per cache, once
    assert "group_size=16" in messages[0]
    assert counters["stats"]["unique_graphs"] == inductor_graphs


def test_snapshot_is_an_exact_copy_sharing_one_store_per_store():
    kc = QVGCache.from_dense(torch.randn(1, H, 16, D), 2, CFG)
    grown = torch.cat([kc, torch.randn(1, H, 4, D)], 2)
    memo: dict = {}
    a, b = grown.snapshot(memo), kc.snapshot(memo)
    assert torch.equal(a.dequantize(), grown.dequantize()) and torch.equal(b.dequantize(), kc.dequantize())
    assert a._handle is b._handle and a._handle is not grown._handle
    b[:, :, :4] = 0  # writes reach the copy only
    assert torch.equal(kc.dequantize(), grown.dequantize()[:, :, :16])


class _Corrupting(QVGBackend):
    """A backend whose Inductor output is off by 0.5: validation must catch it."""

    def _inductor(self, gm, example_inputs, graph_report):
        compiled = super()._inductor(gm, example_inputs, graph_report)

        def wrong(*args):
            out = compiled(*args)
            return [o + 0.5 if isinstance(o, torch.Tensor) else o for o in out]
        return wrong


class _InductorFails(QVGBackend):
    """A backend whose Inductor fails on graphs over QVGCache inputs."""

    def _inductor(self, gm, example_inputs, graph_report):
        # Over the caches themselves or over their inner tensors (`passes.flat_inputs`).
        if any(isinstance(x, QVGCache) for x in example_inputs) or \
                any(isinstance(m, UnflattenCache) for m in gm.modules()):
            raise RuntimeError("simulated lowering failure\ndeep inside Inductor")
        return super()._inductor(gm, example_inputs, graph_report)


def test_inductor_failure_runs_the_graph_eagerly_with_a_note():
    qvg = _InductorFails(CFG)
    with pytest.warns(qvg_compile.QVGBackendWarning, match="Inductor could not compile"):
        expected, got, state, refs, _ = compiled_run(CASE_A, qvg)
    assert max_diff(got, expected) <= TOL and isinstance(state["k"], QVGCache)
    flat = [g.flat_inputs for g in qvg.report.graphs if g.inputs_are_caches]
    assert flat and all(f.startswith("Inductor could not compile it over the caches' inner tensors") for f in flat)
    notes = [e for g in qvg.report.graphs for e in g.eager]
    assert notes == ["Inductor could not compile it over QVGCache inputs (RuntimeError: simulated lowering "
                     "failure); it runs eagerly"]
    assert "runs eagerly because" in qvg.report.summary()


def test_validate_raises_on_mismatch():
    qvg = _Corrupting(CFG, validate=True)
    compiled = torch.compile(idiom_a, backend=qvg, fullgraph=True)
    state = dict_state()()
    compiled(state, chunk(0), 0, C)  # swap call: eager on QVGCache
    with pytest.raises(ValidationError, match="output 0 .* differs from eager QVG execution"):
        compiled(state, chunk(1), C, 2 * C)


def test_backend_registered_by_name_and_config_errors():
    assert "qvg" in torch._dynamo.list_backends()
    state = {"k": torch.zeros(B, N, H, 64), "v": torch.zeros(B, N, H, 64)}  # the default group is 64
    torch.compile(idiom_a, backend="qvg", fullgraph=True)(state, chunk(0, (B, C, H, 64)), 0, C)
    assert isinstance(state["k"], QVGCache)
    with pytest.raises(ValueError, match="key_bits"):
        qvg_compile.backend(bits=5)
    with pytest.raises(TypeError, match="config"):
        qvg_compile.QVGBackend(config={"bits": 2})
    with pytest.raises(ValueError, match="atol"):
        qvg_compile.QVGBackend(atol=-1)


# --- idiom K: the read crosses a compiler-disabled call ----------------------------------------


@torch.compiler.disable
def _exchange(q, k, v):
    """Stands in for a sequence-parallel all-to-all (an identity without context parallelism)."""
    return q, k, v


def _attend_across(q, k, v, kv):
    k_cache, v_cache = kv
    k_full = torch.cat([k_cache.to(q.device), k], dim=2)
    v_full = torch.cat([v_cache.to(q.device), v], dim=2)
    q, k_full, v_full = _exchange(q, k_full, v_full)
    return F.scaled_dot_product_attention(q, k_full, v_full)


def _history(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return chunk(50, (B, H, n, D)), chunk(51, (B, H, n, D))


def test_idiom_k_cache_swapped_in_the_callers_dict_across_a_disabled_call():
    qvg = qvg_compile.backend(CFG)
    fn = torch.compile(_attend_across, backend=qvg)
    caches = {0: _history()}
    q, k, v = (chunk(i, (B, H, C, D)) for i in (1, 2, 3))
    first = fn(q, k, v, caches[0])  # learns: this read is BF16
    assert torch.allclose(first, _attend_across(q, k, v, _history()), atol=TOL)
    got = fn(q, k, v, caches[0])  # the producing graph swaps the dict's tuple, then reads QVG
    assert all(isinstance(t, QVGCache) for t in caches[0])
    reference = tuple(QVGCache.from_dense(t, seq_dim=2, config=CFG, role=role)
                      for t, role in zip(_history(), ("key", "value")))
    assert (got - _attend_across(q, k, v, reference)).abs().max().item() <= TOL
    sites = {s.source: s for s in qvg.report.sites if "___stack" not in s.source}
    assert set(sites) == {"L['kv'][0]", "L['kv'][1]"}
    assert all(s.idioms == ["D", "K"] and s.seq_dim == 2 for s in sites.values())
    assert [sites["L['kv'][0]"].roles, sites["L['kv'][1]"].roles] == [["key"], ["value"]]


def test_idiom_k_cache_nobody_keeps_stays_dense_with_a_warning():
    qvg = qvg_compile.backend(CFG)
    fn = torch.compile(_attend_across, backend=qvg)
    q, k, v = (chunk(i, (B, H, C, D)) for i in (1, 2, 3))
    fn(q, k, v, _history())
    with pytest.warns(QVGBackendWarning, match="no dict or list of the model's frames holds it"):
        out = fn(q, k, v, _history())
    assert torch.allclose(out, _attend_across(q, k, v, _history()), atol=TOL)


@torch.compiler.disable
def _attention_out_of_sight(q, k, v, cache):
    cache["k"] = torch.cat([cache["k"], k], dim=2)
    return F.scaled_dot_product_attention(q, cache["k"], cache["k"])


def test_summary_names_a_compiler_disabled_function_that_hides_a_cache():
    qvg = qvg_compile.backend(CFG)

    def step(x, cache):
        q = x * 2
        return _attention_out_of_sight(q, x, x, cache) + 1

    fn = torch.compile(step, backend=qvg)
    cache = {"k": chunk(60, (B, H, 8, D))}
    fn(chunk(61, (B, H, C, D)), cache)
    # Read from a dict argument inside the disabled function: replaced at the call (idiom L).
    assert isinstance(cache["k"], QVGCache) and cache["k"].shape[2] == 8 + C
    assert qvg.report.graph_breaks and "graph break(s)" in qvg.report.summary()
    assert any("`_attention_out_of_sight`" in note for note in qvg.report.notes)
    assert "0 graph break(s)" not in qvg.report.summary()


def test_frames_compiled_again_after_a_dynamo_reset_count_as_new_frames():
    """`torch._dynamo.reset` numbers frames from 0 again: the report (and the backend's state kept
    per frame) must not merge a frame compiled after it with the one that had its id before."""
    qvg = qvg_compile.backend(CFG)
    x = torch.randn(4)
    for fn in (lambda t: t * 2, lambda t: t * 2, lambda t: t + 1):
        torch.compile(fn, backend=qvg)(x)
        torch.compile(fn, backend=qvg)(x[:3])  # a recompile of the same frame
        torch._dynamo.reset()
    assert qvg.report.compiles_per_frame() == {"0": 2, "0 after reset 1": 2, "0 after reset 2": 2}
    assert qvg.report.resets == 2
    assert qvg.report.budget_notes() == []
