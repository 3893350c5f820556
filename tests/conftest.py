from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PARITY = Path(__file__).parent / "data" / "parity"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY


@pytest.fixture(scope="session")
def tiny_state() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / "tiny_state_dict.safetensors"))


@pytest.fixture(scope="session")
def tiny_inputs() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / "tiny_inputs.safetensors"))


@pytest.fixture(scope="session")
def tiny_outputs() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / "tiny_outputs.safetensors"))


def build_tiny(task: str, tiny_state):
    from x2vlm.checkpoint import load_official
    from x2vlm.config import preset
    from x2vlm.models.x2vlm import X2VLM

    model = X2VLM(preset("x2vlm-tiny", task=task))
    new = load_official(model, tiny_state)
    assert new == []
    return model.eval()
