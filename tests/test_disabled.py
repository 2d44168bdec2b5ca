"""`disabled`: caches created and read inside compiler-disabled functions (idiom L) are swapped
for every layer of a per-layer list at once and at the return of the call that made them, so
compiled frames see each cache change type once."""

from __future__ import annotations

import torch

from qvg_compile.disabled import _returned_entries, _sibling_paths


def test_sibling_paths_cover_every_layer_of_the_first_list_on_the_path():
    t = torch.zeros(1, 2, 4, 8)
    args = {"kv_cache": [{"k": t, "v": t}, {"k": t.clone()}, {"k": None}, {"k": torch.zeros(2, 4)},
                         {"k": t.half()}, {"x": t}],
            "block_idx": 0}
    # Layer 2 holds None, layer 3 another rank, layer 4 another dtype, layer 5 no such entry.
    assert _sibling_paths(args, ("kv_cache", 1, "k")) == [("kv_cache", 1, "k"), ("kv_cache", 0, "k")]
    # A path through a dict or a tuple only has no siblings.
    assert _sibling_paths({"c": {"a": {"k": t}}}, ("c", "a", "k")) == [("c", "a", "k")]
    assert _sibling_paths({"c": ({"k": t}, {"k": t})}, ("c", 0, "k")) == [("c", 0, "k")]


def test_returned_entries_finds_named_entries_in_nested_returns():
    t = torch.zeros(2)
    inner = {"k_vision": t, "other": t}
    value = (t, [inner], {"v_vision": t, "nested": {"k_vision": t}})
    found = _returned_entries(value, {"k_vision", "v_vision"})
    assert {(id(d), k) for d, k in found} == {(id(inner), "k_vision"), (id(value[2]), "v_vision"),
                                              (id(value[2]["nested"]), "k_vision")}
    assert _returned_entries((t, {"k_vision": t}), {"k_vision"}, depth=0) == []
