import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for a hub


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A complete tiny SD3 folder (random weights), written once per test session."""
    from sd3fp8._env import quiet_libraries
    from sd3fp8.miniature.tiny import write_tiny_model

    quiet_libraries()
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_files(tiny_model, tmp_path_factory):
    """The tiny model's components as single files (all-in-one, MMDiT, CLIP-L/G, T5, VAE; bf16)."""
    from tests.hostile_helpers import build_tiny_files

    return build_tiny_files(tiny_model, tmp_path_factory.mktemp("tiny-files"))
