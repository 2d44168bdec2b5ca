import pickle

import pytest

from qvg_compile import QVGConfig
from qvg_compile.quant.config import PRESETS


def test_presets_and_overrides():
    qvg = QVGConfig.preset("qvg")
    assert (qvg.stages, qvg.group_size, qvg.centroids, qvg.key_bits) == (1, 64, 256, 2)
    pro = QVGConfig.preset("qvg_pro")
    assert (pro.stages, pro.group_size) == (4, 16)
    assert QVGConfig.preset("kivi").residual_window == 128
    assert QVGConfig.preset("qvg", key_bits=4).key_bits == 4
    for name in PRESETS:
        assert QVGConfig.preset(name).method in ("qvg", "rtn", "kivi", "quarot")


def test_immutable_hashable_picklable():
    cfg = QVGConfig()
    with pytest.raises(Exception):
        cfg.stages = 3
    assert hash(cfg) == hash(QVGConfig())
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert cfg.replace(stages=2).stages == 2


@pytest.mark.parametrize("field,value", [
    ("key_bits", 5), ("value_bits", 1), ("group_size", 0), ("stages", -1), ("centroids", 300),
    ("init", "zeros"), ("scale_dtype", "fp32"), ("code_mode", "nf4"), ("clip_ratio", 0.0),
    ("method", "gptq"), ("kmeans_iters", -1),
])
def test_invalid_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QVGConfig(**{field: value})


def test_preset_errors():
    with pytest.raises(ValueError, match="preset"):
        QVGConfig.preset("nope")
    with pytest.raises(TypeError, match="unknown"):
        QVGConfig.preset("qvg", bitz=2)
    with pytest.raises(ValueError, match="stages"):
        QVGConfig.preset("kivi", stages=1)
