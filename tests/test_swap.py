"""`swap`: the identity search that swaps a cache where the model's own dicts and lists
keep it (tuples inside them rebuilt), for sources Dynamo cannot assign through."""

import torch

from qvg_compile.swap import assign_by_identity


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
