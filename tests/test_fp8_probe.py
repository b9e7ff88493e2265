"""Probe, choose, fall back: every configuration the engine can emit, through the strict CUDA
stand-in, for every claimed (GPU, torch) combination, on the CPU.

It must run an FP8 GEMM on SM89 + torch >= 2.7 and SM90 + torch >= 2.5, and fall back cleanly
(never an exception) everywhere else.
"""

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd3fp8.fp8 import probe
from sd3fp8.fp8.forms import Form, Plan
from sd3fp8.fp8.linear import Backend, FP8Linear, resolve_backend
from sd3fp8.fp8.numerics import FP8Format, amax_to_scale, quantize, sqnr
from sd3fp8.fp8.probe import ProbeKey, simulated_platform
from tests.cuda_scaled_mm import CLAIMED, ROWWISE, TENSORWISE, ScaledMMContract, patched_scaled_mm

FORMATS = ("e4m3", "e5m2")
GRANULARITIES = ("tensor", "channel")
ACTIVATIONS = ("static", "tensor", "row")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CONFIGS = list(itertools.product(FORMATS, GRANULARITIES, ACTIVATIONS, DTYPES, (True, False)))
MUST_RUN_FP8 = [c for c in CLAIMED if (c.arch == (8, 9) and c.torch_version >= (2, 7)) or (c.arch == (9, 0) and c.torch_version >= (2, 5))]


@pytest.fixture(autouse=True)
def fresh_probe_cache():
    probe.forget()
    yield
    probe.forget()


def make_layer(fmt, granularity, activation, bias, in_f=64, out_f=48):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.linspace(0.2, 3.0, out_f).unsqueeze(1))
    static = activation == "static"
    return FP8Linear.from_linear(linear, fmt, granularity, "auto", activation="tensor" if static else activation,
                                 input_scale=4.0 / 448 if static else None)


def fp8_math(layer: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    """dequant(quant(x)) @ dequant(w).T + bias in float64: what every FP8 GEMM form computes."""
    if layer.input_scale is not None:
        scale = layer.input_scale
    elif layer.activation.value == "row":
        scale = amax_to_scale(x.float().abs().amax(dim=1, keepdim=True), FP8Format.E4M3)
    else:
        scale = amax_to_scale(x.float().abs().amax(), FP8Format.E4M3)
    x_hat = quantize(x, scale, FP8Format.E4M3).double() * scale.double()
    bias = layer.bias.double() if layer.bias is not None else None
    return F.linear(x_hat, layer.dequantized_weight(torch.float64), bias)


def expected_form(contract: ScaledMMContract, fmt: str, granularity: str, activation: str) -> Form:
    """What the contract table says the engine should run (the probe must find the same)."""
    if not contract.fp8_supported():
        return Form.WEIGHT_ONLY
    if granularity == "channel" or activation == "row":
        return Form.ROWWISE if contract.rowwise_supported() and fmt == "e4m3" else Form.RESCALED
    return Form.TENSORWISE


@pytest.mark.parametrize("contract", CLAIMED, ids=str)
def test_every_configuration_under_every_claimed_contract(contract):
    x = torch.randn(2, 7, 64) * 3
    with simulated_platform(contract.arch, contract.torch_version), patched_scaled_mm(contract) as fake:
        for fmt, granularity, activation, dtype, bias in CONFIGS:
            layer = make_layer(fmt, granularity, activation, bias).to(dtype)
            assert layer.backend is Backend.SCALED_MM  # auto picks it on every FP8-capable arch
            layer.prepare("cpu", dtype)  # the probe's own tiny calls happen here (once per platform and form)
            before = len(fake.calls)
            y = layer(x.to(dtype))  # never raises
            config = (fmt, granularity, activation, dtype, bias)
            assert y.shape == (2, 7, 48) and y.dtype == dtype, config
            form = expected_form(contract, fmt, granularity, activation)
            assert layer.plan.form is form, (config, layer.plan)
            if form is Form.WEIGHT_ONLY:
                assert sqnr(F.linear(x.to(dtype).double(), layer.dequantized_weight(torch.float64),
                                     None if layer.bias is None else layer.bias.double()), y) > 35, config
                continue
            assert fake.calls[before:] == [ROWWISE if form is Form.ROWWISE else TENSORWISE], config
            # bf16 output of the row-wise kernel, or the compute dtype's own rounding: > 40 dB from exact FP8 math
            assert sqnr(fp8_math(layer, x.reshape(-1, 64).to(dtype)).reshape(2, 7, 48), y) > 40, config


@pytest.mark.parametrize("contract", MUST_RUN_FP8, ids=str)
def test_fp8_gemm_on_sm89_2_7_and_sm90_2_5(contract):
    with simulated_platform(contract.arch, contract.torch_version), patched_scaled_mm(contract):
        for fmt, granularity, activation, dtype, bias in CONFIGS:
            layer = make_layer(fmt, granularity, activation, bias).to(dtype)
            layer(torch.randn(5, 64, dtype=dtype))
            assert layer.plan.form in (Form.ROWWISE, Form.TENSORWISE, Form.RESCALED)
            # the default (e4m3, per-channel) runs the row-wise kernel, bf16 out, bias fused, fast accumulation
            if (fmt, granularity, activation) == ("e4m3", "channel", "tensor"):
                assert layer.plan.form is Form.ROWWISE and layer.plan.out_dtype == torch.bfloat16
                assert layer.plan.fused_bias == bias and layer.plan.key.fast_accum


def test_fast_accum_is_switchable():
    contract = ScaledMMContract((9, 0), (2, 7))
    with simulated_platform(contract.arch, contract.torch_version), patched_scaled_mm(contract):
        layer = make_layer("e4m3", "channel", "tensor", True)
        layer.fast_accum = False
        layer(torch.randn(5, 64))
        assert layer.plan.key.fast_accum is False


def test_rowwise_output_follows_the_probe_not_the_tensor_device():
    """On the CPU (not simulated) the row-wise kernel takes an fp32 output; under SM90's contract it
    must be bf16, although the tensors are CPU tensors (it used to depend on x.is_cuda)."""
    layer = make_layer("e4m3", "channel", "tensor", True)
    layer.backend = Backend.SCALED_MM
    assert layer.prepare("cpu", torch.float32).out_dtype == torch.float32
    contract = ScaledMMContract((9, 0), (2, 7))
    with simulated_platform(contract.arch, contract.torch_version), patched_scaled_mm(contract):
        assert layer.prepare("cpu", torch.float32).out_dtype == torch.bfloat16


def test_torch_2_4_tuple_is_unwrapped():
    """torch 2.4 returns (out, amax): the engine used to fail on 'tuple' has no attribute 'to'."""
    contract = ScaledMMContract((9, 0), (2, 4))
    with simulated_platform(contract.arch, contract.torch_version), patched_scaled_mm(contract) as fake:
        layer = make_layer("e4m3", "tensor", "tensor", True).to(torch.bfloat16)
        y = layer(torch.randn(5, 64, dtype=torch.bfloat16))
    assert isinstance(y, torch.Tensor) and layer.plan.form is Form.TENSORWISE and TENSORWISE in fake.calls


def test_runtime_refusal_falls_back_once_and_logs_once(caplog):
    """A form the probe accepted but CUDA refuses at run time moves the layer down one form."""
    planned = ScaledMMContract((9, 0), (2, 7))
    with simulated_platform(planned.arch, planned.torch_version), patched_scaled_mm(planned):
        layers = [make_layer("e4m3", "channel", "tensor", True) for _ in range(3)]
        for layer in layers:
            layer.prepare("cpu", torch.float32)
            assert layer.plan.form is Form.ROWWISE
    x = torch.randn(5, 64)
    running = ScaledMMContract((8, 9), (2, 5))  # no row-wise kernel there
    with caplog.at_level(logging.WARNING, logger="sd3fp8.fp8.linear"), \
            simulated_platform(planned.arch, planned.torch_version), patched_scaled_mm(running):
        for layer in layers:
            y = layer(x)
            assert layer.plan.form is Form.RESCALED
            assert sqnr(fp8_math(layer, x), y) > 40
    warnings = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and "tensorwise+rescale" in warnings[0].getMessage()


def test_value_error_falls_back_too():
    """torch >= 2.10 raises some refusals as ValueError."""
    contract = ScaledMMContract((9, 0), (2, 10))
    layer = make_layer("e4m3", "channel", "tensor", False).to(torch.float16)
    layer.backend = Backend.SCALED_MM
    layer.plan = Plan(Form.ROWWISE, torch.float16, False, ProbeKey(ROWWISE, torch.float8_e4m3fn, torch.float16, False, True))
    layer._planned_for = (torch.device("cpu"), torch.float16)
    with simulated_platform(contract.arch, contract.torch_version), patched_scaled_mm(contract):
        y = layer(torch.randn(5, 64, dtype=torch.float16))
    assert layer.plan.form is Form.ROWWISE and layer.plan.out_dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_everything_refused_at_run_time_ends_weight_only():
    contract = ScaledMMContract((9, 0), (2, 7))
    with simulated_platform(contract.arch, contract.torch_version), patched_scaled_mm(contract):
        layer = make_layer("e4m3", "channel", "tensor", True)
        layer.prepare("cpu", torch.float32)
    with simulated_platform(contract.arch, contract.torch_version), patched_scaled_mm(ScaledMMContract((10, 0), (2, 5))):
        y = layer(torch.randn(5, 64))
    assert layer.plan.form is Form.WEIGHT_ONLY and torch.isfinite(y).all()


def test_probe_is_cached_per_platform():
    contract = ScaledMMContract((8, 9), (2, 7))
    with simulated_platform(contract.arch, contract.torch_version), patched_scaled_mm(contract) as fake:
        for _ in range(3):
            make_layer("e4m3", "channel", "tensor", True)(torch.randn(5, 64))
        assert len(fake.calls) - 3 == 1  # one GEMM per forward, one accepted probe call in all
        probed = probe.probed("cpu")  # fp32 compute: row-wise into fp32 first (refused), then bf16
        assert list(probed.values())[0].startswith("CudaScaledMMError: Only bf16") and list(probed.values())[1] == "runs"
    assert probe.probed("cpu") == {}  # the simulated platform's entries go with it


def test_no_fp8_cores_and_force_fp8_runs_emulated():
    """Below CC 8.9 _scaled_mm refuses everything: --force-fp8 runs emulated W8A8 (calibration,
    sensitivity and bench's W8A8 configurations on an A100 or RTX 3090)."""
    contract = ScaledMMContract((8, 0), (2, 7))
    with simulated_platform(contract.arch, contract.torch_version), patched_scaled_mm(contract) as fake:
        assert resolve_backend("auto", "cpu") is Backend.WEIGHT_ONLY
        assert resolve_backend("auto", "cpu", force_fp8=True) is Backend.EMULATED
        for activation in ("tensor", "row", "static"):
            linear = nn.Linear(64, 48)
            layer = FP8Linear.from_linear(linear, backend="scaled-mm", force_fp8=True, activation="tensor" if activation == "static" else activation,
                                          input_scale=4.0 / 448 if activation == "static" else None)
            x = torch.randn(5, 64) * 3
            assert sqnr(fp8_math(layer, x), layer(x)) > 60  # the same numbers as the FP8 GEMM
        assert fake.calls == []
