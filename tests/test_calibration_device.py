"""Calibration statistics stay on the activation's device (torch.quantile's q tensor included)."""

import pytest
import torch

from sd3fp8.fp8.calibration import activation_stats, activation_stats_tensor


def test_quantiles_run_on_the_activations_device():
    """A CUDA activation with a CPU q tensor fails ("q tensor must be on the same device as the
    input tensor"): the meta device stands in for CUDA here, and fails the same way."""
    x = torch.empty(4, 1000, device="meta")
    stats = activation_stats_tensor(x)
    assert stats.device.type == "meta" and stats.shape == (4,)


def test_stats_values():
    x = torch.linspace(-1, 1, 20001)
    stats = activation_stats(x)
    assert stats["amax"] == 1.0
    assert stats["p99"] == pytest.approx(0.99, abs=1e-3) and stats["p99.9"] == pytest.approx(0.999, abs=1e-3)
    assert activation_stats(torch.empty(0)) == {"amax": 0.0, "p99": 0.0, "p99.9": 0.0, "p99.99": 0.0}
