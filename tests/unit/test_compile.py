"""Where compile is refused: the decision function, for every combination that matters."""

import pytest

from trainer.config import ConfigError, JobConfig
from trainer.parallel.compile import check_compile_supported, maybe_compile_loss
from trainer.train import cross_entropy_loss


def _cfg(enable=True, components=("model", "loss"), tp=1, backend="inductor") -> JobConfig:
    cfg = JobConfig()
    cfg.compile.enable, cfg.compile.components, cfg.compile.backend = enable, list(components), backend
    cfg.parallelism.tensor_parallel_degree = tp
    return cfg


REFUSED = "compile.enable = true with parallelism.tensor_parallel_degree = 2 is not supported on CPU"
CASES = [  # (config, the device type the run trains on, expected one-line error or None)
    (_cfg(tp=2), "cpu", REFUSED),
    (_cfg(tp=2, components=["loss"]), "cpu", REFUSED),
    (_cfg(tp=2), "cuda", None),
    (_cfg(tp=2, enable=False), "cpu", None),
    (_cfg(tp=2, components=[]), "cpu", None),  # enabled but nothing to compile
    (_cfg(tp=1), "cpu", None),
    (_cfg(backend="inductr"), "cuda", "compile.backend = 'inductr' is not a torch.compile backend"),
    (_cfg(backend="aot_eager"), "cpu", None),
]


@pytest.mark.parametrize("cfg,device_type,error", CASES)
def test_check_compile_supported(cfg, device_type, error):
    if error is None:
        check_compile_supported(cfg, device_type)
    else:
        with pytest.raises(ConfigError, match=error) as info:
            check_compile_supported(cfg, device_type)
        assert "\n" not in str(info.value)


def test_loss_compiled_only_when_asked():
    assert maybe_compile_loss(cross_entropy_loss, _cfg(enable=False)) is cross_entropy_loss
    assert maybe_compile_loss(cross_entropy_loss, _cfg(components=["model"])) is cross_entropy_loss
    assert maybe_compile_loss(cross_entropy_loss, _cfg(components=["loss"])) is not cross_entropy_loss
