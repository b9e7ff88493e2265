"""--compile on the CPU (inductor): FP8 layers of every kind compile and compute what eager does.

One small compile (inductor builds C++ kernels: tens of seconds on this machine); the full
transformer is measured in benchmarks/compile_cpu.py (docs/gpu.md)."""

import torch
from torch import nn

from sd3fp8.fp8.compiled import compile_module, is_compiled
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.fp8.numerics import sqnr


def test_compiled_fp8_layers_match_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        FP8Linear.from_linear(nn.Linear(64, 64), backend="weight-only"),
        nn.GELU(),
        FP8Linear.from_linear(nn.Linear(64, 64), backend="emulated", activation="row"),
        nn.GELU(),
        FP8Linear.from_linear(nn.Linear(64, 32), backend="scaled-mm", force_fp8=True),  # CPU _scaled_mm inside the graph
    )
    x = torch.randn(16, 64)
    with torch.inference_mode():
        eager = model(x)
        compile_module(model, "cpu", torch.float32)
        assert is_compiled(model) and [m.plan.form.value for m in model if isinstance(m, FP8Linear)] == [
            "weight-only", "emulated", "rowwise"]
        compiled = model(x)
    assert sqnr(eager, compiled) > 50
