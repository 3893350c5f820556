"""x2vlm.precision: the one place that chooses fp32 or bf16 autocast."""
import pytest
import torch

from x2vlm.precision import autocast, cpu_has_bf16_matmul, resolve_precision


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_bf16_matmul() else "fp32")
    with pytest.raises(ValueError, match="config field 'precision': unknown value 'fp16'"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("keep", [True, False])
def test_autocast_runs_matmuls_in_bf16_and_keeps_casts_as_asked(keep):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.float32
    with autocast("bf16", torch.device("cpu"), keep_weight_casts=keep):
        assert torch.is_autocast_enabled("cpu") and torch.is_autocast_cache_enabled() == keep
        assert (a @ b).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="unknown precision 'auto'"):
        autocast("auto", "cpu")
