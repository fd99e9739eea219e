import pytest
import torch

from maskrcnn import precision
from maskrcnn.precision import bf16_autocast, check_bf16


def test_a_cpu_without_bf16_instructions_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="AVX512-BF16 or AMX.*run without bf16"):
        check_bf16("cpu")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    check_bf16("cpu")


def test_the_mode_lowers_matrix_products_and_when_off_leaves_an_outer_autocast_alone():
    a = torch.randn(4, 4)
    with bf16_autocast("cpu", True):
        assert (a @ a).dtype == torch.bfloat16
    with bf16_autocast("cpu", False):
        assert (a @ a).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), bf16_autocast("cpu", False):
        assert (a @ a).dtype == torch.bfloat16
