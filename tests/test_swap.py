"""`swap`: the identity search that swaps a cache where the model's own dicts and lists
keep it (tuples inside them rebuilt), for sources Dynamo cannot assign through."""

import torch

from qvg_compile.swap import assign_by_identity, holders_by_identity, values_in_slot


def test_dict_of_tuples_and_lists_in_a_caller_frame():
    k, v = torch.zeros(1, 2, 4, 8), torch.ones(1, 2, 4, 8)
    kv_cache_dict = {0: (k, v), 1: (v, k)}
    history = [k, [v]]

    def model_call():
        return assign_by_identity(k, "swapped")

    places = model_call()
    assert kv_cache_dict == {0: ("swapped", v), 1: (v, "swapped")}
    assert history[0] == "swapped" and history[1][0] is v
    assert sorted(places) == ["history[0] in test_dict_of_tuples_and_lists_in_a_caller_frame",
                              "kv_cache_dict[0][0] in test_dict_of_tuples_and_lists_in_a_caller_frame",
                              "kv_cache_dict[1][1] in test_dict_of_tuples_and_lists_in_a_caller_frame"]


def test_a_tensor_held_only_by_a_local_or_a_bare_tuple_is_not_found():
    k = torch.zeros(3)
    pair = (k, k)
    assert assign_by_identity(k, "swapped") == []
    assert pair[0] is k


def test_equal_but_distinct_tensors_are_left_alone():
    k, twin = torch.zeros(3), torch.zeros(3)
    kept = {"k": twin}
    assert assign_by_identity(k, "swapped") == []
    assert kept["k"] is twin


def test_holders_name_the_per_layer_local_and_the_slot_of_the_cache():
    # Where a pending swap found a cache: the per-layer dict (or list) one level above its entry.
    layers = [(torch.zeros(1, 2, 4, 8), torch.ones(1, 2, 4, 8)) for _ in range(3)]
    kv_cache_dict = dict(enumerate(layers))
    by_name = [{"k": k, "v": v} for k, v in layers]
    nested = {"deeper": kv_cache_dict}

    def model_call():
        return holders_by_identity(layers[1][1])

    found = {(name, slot): layers_ for name, slot, layers_ in model_call()}
    # (Also found through the closure of ``model_call``; the nested dict is two levels up: not.)
    assert set(found) == {("layers", 1), ("kv_cache_dict", 1), ("by_name", "v")} and "deeper" in nested
    assert found[("kv_cache_dict", 1)] is kv_cache_dict
    assert {(name, slot) for name, slot, _ in holders_by_identity(by_name[2]["k"])} == {
        ("layers", 0), ("kv_cache_dict", 0), ("by_name", "k")}
    assert holders_by_identity(torch.zeros(3)) == []


def test_values_in_slot_keeps_layer_order_and_skips_entries_without_it():
    a, b = torch.zeros(2), torch.ones(2)
    assert values_in_slot({0: (a, b), 1: (b,), 2: None, 3: (b, a)}, 1) == [b, a]
    assert values_in_slot([{"k": a}, {"v": b}, {"k": b}], "k") == [a, b]
