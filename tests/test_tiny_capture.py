"""capture-kv: K/V and queries of a rollout saved as safetensors, read back by quant-bench."""

import dataclasses
import json

import pytest
import torch

from qvg_compile.bench.compare import load_kv
from qvg_compile.cli import main
from qvg_compile.tiny.capture import capture_kv
from qvg_compile.tiny.checkpoint import Checkpoint, save_checkpoint
from qvg_compile.tiny.data import from_uint8
from qvg_compile.tiny.evaluate import rollout
from qvg_compile.tiny.model import TinyVideoModel
from qvg_compile.tiny.zoo import get_model_spec


@pytest.fixture(scope="module")
def ckpt():
    torch.manual_seed(0)
    m = TinyVideoModel(dataclasses.replace(get_model_spec("proxy").config, size=8, layers=2)).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    return Checkpoint(m, torch.randint(0, 256, (1, 3, 3, 8, 8), dtype=torch.uint8))


def test_capture_holds_the_history_of_the_chosen_layers_and_heads(ckpt):
    out = capture_kv(ckpt, chunks=2, frames=4, layers=(0, -1), heads=(1,), queries=8, dtype=torch.float32)
    assert sorted(out) == ["k.0", "k.1", "q.0", "q.1", "v.0", "v.1"]
    assert out["k.1"].shape == (1, 1, 4 * 16, 128) and out["q.0"].shape == (1, 1, 8, 128)
    again = capture_kv(ckpt, chunks=2, frames=4, layers=(0, -1), heads=(1,), queries=8, dtype=torch.float32)
    assert all(torch.equal(out[n], again[n]) for n in out)
    _, cache, _ = rollout(ckpt.model, 2, from_uint8(ckpt.prompts[:1]), seed=0)
    assert torch.equal(out["v.1"], cache[1]["v"][:, 2 * 16:, [1]].transpose(1, 2))
    with pytest.raises(ValueError, match="layers"):
        capture_kv(ckpt, chunks=2, layers=(5,), queries=8)
    with pytest.raises(ValueError, match="frames"):
        capture_kv(ckpt, chunks=2, frames=7, queries=8)


def test_cli_capture_round_trip_into_quant_bench(ckpt, tmp_path, capsys):
    path = save_checkpoint(ckpt.model, tmp_path / "p.safetensors", ckpt.prompts)
    kv = tmp_path / "kv.safetensors"
    assert main(["capture-kv", "--checkpoint", str(path), "--out", str(kv), "--chunks", "2", "--frames", "3",
                 "--layers", "0,1", "--heads", "0,2", "--queries", "16"]) == 0
    assert "k.0 [1, 2, 48, 128]" in capsys.readouterr().out
    both = load_kv(str(kv))
    assert both["k"].shape == (1, 4, 48, 128) and both["k"].dtype == torch.bfloat16 and both["q"].shape[2] == 16
    assert torch.equal(load_kv(str(kv), layer=1)["v"], both["v"][:, 2:])
    with pytest.raises(ValueError, match="layer"):
        load_kv(str(kv), layer=3)
    assert main(["quant-bench", "--kv", str(kv), "--layer", "0", "--methods", "rtn,quarot", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in records] == ["rtn", "quarot"]
    assert all(0 < r["k_rel_mse"] < 1 and 0 < r["attn_rel_err"] < 1 for r in records), records
