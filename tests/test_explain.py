"""`qvg_compile.explain` and ``qvg-compile inspect``: per-graph tables (sites with module paths,
replacements, rejections with reasons, readers, graph breaks), dict/JSON, unified diffs with the
``qvg`` ops, no side effects on the caller's model and tensors, clear notes for models without
a cache, and the CLI on a model built by a factory in a Python file."""

import inspect
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

import qvg_compile
from qvg_compile import QVGCache, QVGConfig, cli
from qvg_compile.passes.report import SMALL_CACHE_RATIO, read_counts, read_rows, small_cache_note

CFG = QVGConfig.preset("qvg", centroids=8, kmeans_iters=2, group_size=16)
DIM, HEADS, N, C = 32, 2, 16, 4

MODEL_SOURCE = '''
import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, N, C = 32, 2, 16, 4


class Attention(nn.Module):
    """Self-attention over a [B, N, H, D] cache written by slices, plus cross-attention to text."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.o = nn.Linear(DIM, DIM)
        self.register_buffer("k_cache", torch.zeros(1, N, HEADS, DIM // HEADS))
        self.register_buffer("v_cache", torch.zeros(1, N, HEADS, DIM // HEADS))

    def forward(self, x, s: int, e: int, text_k, text_v):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).unbind(2)
        self.k_cache[:, s:e] = k
        self.v_cache[:, s:e] = v
        q = q.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, self.k_cache[:, :e].transpose(1, 2),
                                           self.v_cache[:, :e].transpose(1, 2))
        y = y + F.scaled_dot_product_attention(q, text_k, text_v)
        return self.o(y.transpose(1, 2).flatten(2))


class TinyAR(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Attention() for _ in range(2))

    def forward(self, x, s: int, e: int, text_k, text_v):
        for block in self.blocks:
            x = x + block(x, s, e, text_k, text_v)
        return x


def make():
    torch.manual_seed(0)
    text = torch.randn(1, HEADS, 5, DIM // HEADS)
    return TinyAR().eval(), (torch.randn(1, C, DIM), 0, C, text, text.clone())
'''


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "tiny_ar.py"
    path.write_text(MODEL_SOURCE)
    return path


@pytest.fixture(scope="module")
def explained(model_file):
    namespace = {}
    exec(compile(model_file.read_text(), str(model_file), "exec"), namespace)
    model, args = namespace["make"]()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    report = qvg_compile.explain(model, *args, config=CFG)
    return model, buffers, report


def test_sites_with_module_paths_replacements_and_rejections(explained):
    model, buffers, report = explained
    paths = {s.module_path for s in report.sites}
    assert paths == {f"blocks.{i}.{name}" for i in range(2) for name in ("k_cache", "v_cache")}
    assert all(s.idioms == ["A"] and s.seq_dim == 1 and s.layout == "[B, S, H, D]" for s in report.sites)
    assert sorted(report.graphs[0].swapped) == sorted(s.source for s in report.graphs[0].sites)
    assert report.graphs[1].inputs_are_caches and report.recompiles == 1
    why = {r.source: r.reason for r in report.graphs[0].rejected}
    assert "cross-attention constant" in why["L['text_k']"]
    assert report.graphs[0].readers == {"sdpa": 4}


def test_caller_model_and_tensors_untouched(explained):
    model, buffers, _ = explained
    for name, b in model.named_buffers():
        assert type(b) is torch.Tensor and torch.equal(b, buffers[name])


def test_summary_tables_and_diff(explained):
    _, _, report = explained
    text = report.summary()
    for header in ("graph |", "cache", "idiom", "seq dim", "replaced by QVGCache", "left untouched",
                   "attention reader"):
        assert header in text
    assert "blocks.0.k_cache" in text and "2 graph(s) (1 recompile(s)), 4 cache(s)" in text
    diff = report.graphs[1].diff()
    assert diff.startswith("--- graph_1 (Dynamo graph)\n+++ graph_1 (after QVG, post-grad)")
    assert "torch.ops.qvg." in diff  # the compressed cache's ops in the compiled graph
    assert diff in report.summary(diff=True) and diff not in text


def test_dict_and_json(explained):
    _, _, report = explained
    data = json.loads(report.to_json())
    assert data["recompiles"] == 1 and len(data["graphs"]) == 2
    sites = data["graphs"][0]["sites"]
    assert {s["source"] for s in sites} == {s.source for s in report.graphs[0].sites}
    assert data["graphs"][1]["diff"] == report.graphs[1].diff()


def test_graph_breaks_are_listed():
    def fn(state, x, pos):
        e = int(pos.item())
        state["k"][:, e - C:e] = x
        state["v"][:, e - C:e] = x
        return F.scaled_dot_product_attention(x.transpose(1, 2), state["k"][:, :e].transpose(1, 2),
                                              state["v"][:, :e].transpose(1, 2))

    state = {"k": torch.zeros(1, N, HEADS, 16), "v": torch.zeros(1, N, HEADS, 16)}
    report = qvg_compile.explain(fn, state, torch.randn(1, C, HEADS, 16), torch.tensor(C), config=CFG)
    assert any("item()" in b for b in report.graph_breaks)
    assert all("\n" not in b for b in report.graph_breaks)
    assert {s.module_path for s in report.sites} == {"state['k']", "state['v']"}
    assert type(state["k"]) is torch.Tensor


def test_no_cache_and_bad_arguments():
    report = qvg_compile.explain(torch.nn.Linear(4, 4), torch.randn(1, 4))
    assert "No KV cache found" in report.summary() and report.sites == []
    with pytest.raises(ValueError, match="calls"):
        qvg_compile.explain(torch.nn.Linear(4, 4), torch.randn(1, 4), calls=0)
    with pytest.raises(TypeError, match="model_or_fn"):
        qvg_compile.explain("not a model")


def test_cli_inspect_prints_tables_and_json(model_file, capsys):
    target = f"{model_file}:make"
    assert cli.main(["inspect", target, "--option", "group_size=16", "--option", "centroids=8",
                     "--option", "kmeans_iters=2"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.v_cache" in out and "replaced by QVGCache" in out
    assert cli.main(["inspect", target, "--option", "group_size=16", "--json", "--calls", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["graphs"]) == 1 and len(data["graphs"][0]["sites"]) == 4


def test_cli_inspect_errors_are_clear(model_file, tmp_path, capsys):
    assert cli.main(["inspect", str(model_file)]) == 2
    assert "FILE.py:FACTORY" in capsys.readouterr().err
    assert cli.main(["inspect", f"{model_file}:nope"]) == 2
    assert "no callable 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        def make():
            return 3
    """))
    assert cli.main(["inspect", f"{bad}:make"]) == 2
    assert "the factory must return" in capsys.readouterr().err
    assert cli.main(["inspect", f"{model_file}:make", "--option", "bits=5"]) == 2
    assert "key_bits" in capsys.readouterr().err


def test_report_flags_frames_over_the_compile_budget():
    from qvg_compile.passes.report import GraphReport, Report

    report = Report()
    ids = [(0, i) for i in range(8)] + [(1, i) for i in range(4)] + [(2, 0)]
    report.graphs = [GraphReport(n, f"graph_{n}", False, compile_id=f"{f}/{c}", frame=report.frame_of(f, c))
                     for n, (f, c) in enumerate(ids)]
    assert report.compiles_per_frame() == {"0": 8, "1": 4, "2": 1} and report.recompiles == 10
    notes = report.budget_notes()
    assert len(notes) == 2 and "recompile_limit" in notes[0] and "frame 1: 4 compiles, over the budget" in notes[1]
    assert notes[1] in report.summary() and notes[0] in report.to_dict()["notes"]


def test_json_of_graphs_with_symbolic_shapes():
    """A cache grown by ``cat`` makes the graph's sizes symbolic; the report still serialises."""
    qvg = qvg_compile.backend(QVGConfig.preset("qvg").replace(centroids=4))

    @torch.compile(backend=qvg, dynamic=True)
    def step(cache, k, q):
        cache["k"] = torch.cat([cache["k"], k], 2)
        return F.scaled_dot_product_attention(q, cache["k"], cache["k"])

    torch.manual_seed(3)
    cache = {"k": torch.randn(1, 2, 64, 64)}
    for _ in range(3):
        step(cache, torch.randn(1, 2, 64, 64), torch.randn(1, 2, 8, 64))
    data = json.loads(qvg.report.to_json())
    sites = [s for g in data["graphs"] for s in g["sites"]]
    assert sites and all(isinstance(x, (int, str)) for s in sites for x in s["shape"])
    assert any(isinstance(x, str) for s in sites for x in s["shape"])  # a symbolic size, printed


def test_replaced_caches_report_where_their_memory_goes(explained):
    """Each replaced cache's bits per element by component (`QVGCache.memory` when it was made),
    in the summary; a cache that gains less than 4x is explained (what its size costs)."""
    _, _, report = explained
    mems = [m for g in report.graphs for m in g.swapped_memory]
    assert len(mems) == sum(len(g.swapped) for g in report.graphs) == 4
    for mem in mems:
        parts = sum(mem[k] for k in ("codes", "scales", "assignments", "codebooks", "open_rows", "token_state",
                                     "dense_pieces"))
        assert abs(parts - mem["total"]) <= 1e-9 and mem["ratio"] == pytest.approx(32 / mem["total"])  # fp32
    text = report.summary()
    assert "x smaller" in text and f"{mems[0]['ratio']:.2f}" in text
    assert text.count("smaller while generating") == sum(m["ratio"] < SMALL_CACHE_RATIO for m in mems)
    assert report.to_dict()["graphs"][0]["swapped_memory"][0]["ratio"] == mems[0]["ratio"]


def test_a_small_cache_is_explained():
    mem = QVGCache.from_dense(torch.randn(1, 64, 2, 64), 1, CFG, chunk_tokens=32).memory()
    assert mem["ratio"] < SMALL_CACHE_RATIO
    note = small_cache_note("k_cache", mem)
    assert note.startswith(f"k_cache: {mem['ratio']:.1f}x smaller while generating")
    assert f"open dense rows cost {mem['open_rows']:.2f} bits" in note and "qvg_compile.seal" in note


def test_reads_of_the_replaced_caches_are_counted_by_path(explained):
    """The report says which reads took the fast path and why others did not: the fixture's four
    caches are read by SDPA in both calls, on the fast path (float32 queries on the CPU)."""
    _, _, report = explained
    assert report.cache_reads["fast"] >= 4 and report.cache_reads["fallbacks"] == {}
    text = report.summary()
    assert "cache reads while explaining" in text and "fast path (one gather + one SDPA)" in text


def test_read_rows_list_general_reasons_and_fallbacks():
    before = {"fast_reads": 2, "general_why": {"holes": 1}, "fallbacks": {}}
    after = {"fast_reads": 5, "general_why": {"holes": 3, "dense pieces appended by cat": 1},
             "fallbacks": {"aten.mul.Tensor": 2}}
    reads = read_counts(before, after)
    assert reads == {"fast": 3, "general": {"holes": 2, "dense pieces appended by cat": 1},
                     "fallbacks": {"aten.mul.Tensor": 2}}
    assert read_rows(reads) == [["fast path (one gather + one SDPA)", 3],
                                ["general path: dense pieces appended by cat", 1], ["general path: holes", 2],
                                ["dense fallback: aten.mul.Tensor", 2]]
    assert read_rows(read_counts(after, after)) == []


@torch.compiler.disable
def _sequence_parallel_attention(q, k, v, cache):
    """Attention and its cache entirely inside a compiler-disabled function (HY-WorldPlay's form)."""
    cache["k"] = torch.cat([cache["k"], k], dim=2)
    cache["v"] = torch.cat([cache["v"], v], dim=2)
    return F.scaled_dot_product_attention(q, cache["k"], cache["v"])


class _DisabledAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x, cache):
        q, k, v = self.proj(x).unflatten(-1, (3, 1, 16)).permute(2, 0, 3, 1, 4).unbind(0)
        return _sequence_parallel_attention(q, k, v, cache)


def test_explain_names_the_compiler_disabled_function_a_cache_hides_in():
    torch.manual_seed(0)
    cache = {"k": torch.randn(1, 1, 8, 16), "v": torch.randn(1, 1, 8, 16)}
    report = qvg_compile.explain(_DisabledAttention(), torch.randn(1, 8, 16), cache)
    assert not report.sites and cache["k"].shape == (1, 1, 8, 16)  # the caller's cache untouched
    # Named where it is defined (the first line of the decorated function).
    line = inspect.unwrap(_sequence_parallel_attention).__code__.co_firstlineno
    note = next(n for n in report.notes if "`_sequence_parallel_attention`" in n)
    assert "stays dense" in note and f"test_explain.py:{line}" in note
    assert any("torch.compiler.disable" in b for b in report.graph_breaks)
