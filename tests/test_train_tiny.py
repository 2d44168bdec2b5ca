"""examples/train_tiny.py: --model picks a named config and its defaults; --time-limit stops the
loop early and says so in the recipe; procedural data stands in for the photos."""

import dataclasses
import json

import pytest

from examples import train_tiny
from qvg_compile.tiny import zoo
from qvg_compile.tiny.checkpoint import load_checkpoint


@pytest.fixture
def small_proxy(monkeypatch):
    spec = zoo.MODELS["proxy"]
    small = dataclasses.replace(spec, config=dataclasses.replace(spec.config, size=8, layers=1),
                                train={**spec.train, "photo_side": 16})
    monkeypatch.setitem(zoo.MODELS, "proxy", small)
    return small


def test_options_default_to_the_named_model():
    args = train_tiny.parse_args(["--model", "proxy", "--out", "x", "--batch", "2"])
    assert (args.frames, args.batch, args.steps, args.photo_side) == (12, 2, 1200, 320)
    assert train_tiny.parse_args(["--out", "x"]).frames == 24
    with pytest.raises(SystemExit):
        train_tiny.parse_args(["--out", "x", "--time-limit", "0"])


def test_a_few_steps_write_a_loadable_checkpoint(small_proxy, tmp_path):
    recipe = train_tiny.main(["--model", "proxy", "--out", str(tmp_path), "--steps", "3", "--batch", "1",
                              "--frames", "6", "--prompts", "1", "--data", "procedural", "--device", "cpu",
                              "--log-every", "1"])
    assert recipe["steps_done"] == 3 and recipe["stopped"] == "steps" and recipe["data"] == "procedural"
    ckpt = load_checkpoint(tmp_path / small_proxy.checkpoint)
    assert ckpt.model.cfg == small_proxy.config and ckpt.recipe["model"] == "proxy"
    assert ckpt.prompts.shape == (1, 3, 3, 8, 8)
    assert len(json.loads((tmp_path / "log.json").read_text())["log"]) == 3


def test_the_time_limit_stops_and_anneals(small_proxy, tmp_path, capsys):
    recipe = train_tiny.main(["--model", "proxy", "--out", str(tmp_path), "--steps", "1000", "--batch", "1",
                              "--frames", "3", "--prompts", "1", "--data", "procedural", "--device", "cpu",
                              "--time-limit", "0.5", "--warmup", "1"])
    assert recipe["stopped"] == "time_limit" and 1 <= recipe["steps_done"] < 1000
    assert "stopped at step" in capsys.readouterr().out
    args = train_tiny.parse_args(["--out", "x", "--steps", "100", "--lr", "1e-3", "--warmup", "1", "--time-limit", "10"])
    assert train_tiny.schedule(args, 1, 10.0) == (1.0, pytest.approx(1e-4))
    assert train_tiny.schedule(args, 50, 0.0)[0] == 0.5
