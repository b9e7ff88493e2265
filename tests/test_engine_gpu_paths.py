"""The engine's GPU paths on the CPU: a simulated GPU behind the strict _scaled_mm stand-in, which
forms ran (inspect, PNG metadata), fused q/k/v, --offload model placement, --compile's checks."""

import pytest
import torch

from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline
from sd3fp8.engine import loader
from sd3fp8.engine.inspection import format_report, inspect_pipeline
from sd3fp8.errors import ConfigError
from sd3fp8.fp8 import compiled, probe
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.fp8.probe import simulated_platform
from tests.cuda_scaled_mm import ScaledMMContract, patched_scaled_mm

FAST = dict(steps=2, cfg=4.0, width=32, height=32)


@pytest.fixture(autouse=True)
def fresh_probe_cache():
    probe.forget()
    yield
    probe.forget()


@pytest.mark.parametrize("arch,version,form", [((9, 0), (2, 5), "rowwise"), ((8, 9), (2, 5), "tensorwise+rescale"),
                                                ((12, 0), (2, 4), "weight-only")])
def test_simulated_gpu_generates_and_reports_its_forms(tiny_model, arch, version, form):
    contract = ScaledMMContract(arch, version)
    with simulated_platform(arch, version), patched_scaled_mm(contract) as fake:
        engine = SD3FP8Pipeline.from_pretrained(tiny_model, runtime=RuntimeConfig(dtype="bf16"))
        result = engine("a small red circle", seed=1, **FAST)
    forms = result.parameters[0]["fp8_forms"]
    assert set(forms) == {form} and sum(forms.values()) > 0
    assert result.parameters[0]["backend"] == "scaled-mm" and result.parameters[0]["fast_accum"] is True
    assert (len(fake.calls) > 0) == (form != "weight-only")
    report = inspect_pipeline(engine, layers=True)
    assert report["components"]["transformer"]["fp8_forms"] == forms
    rows = [r for r in report["components"]["transformer"]["layers"] if "form" in r]
    assert {r["form"] for r in rows} == {form}
    # q/k/v fused: the layers are scaled-mm (weight-only is the probe's fallback form, not the backend)
    assert any(r["name"].endswith("attn.to_qkv") for r in rows)  # auto picks scaled-mm on any FP8 GPU
    assert f"fp8 forms  transformer: {sum(forms.values())} {form}" in format_report(report)


def test_fused_qkv_is_switchable_and_close(tiny_model):
    run = dict(dtype="fp32", force_fp8=True)
    fused = SD3FP8Pipeline.from_pretrained(tiny_model, runtime=RuntimeConfig(**run))
    plain = SD3FP8Pipeline.from_pretrained(tiny_model, runtime=RuntimeConfig(**run, fuse_qkv="off"))
    names = lambda e: [n for n, m in e.component("transformer").named_modules() if isinstance(m, FP8Linear)]  # noqa: E731
    assert any(n.endswith("to_qkv") for n in names(fused)) and not any(n.endswith("to_qkv") for n in names(plain))
    a, b = (e.latents("a blue square", seed=2, steps=2) for e in (fused, plain))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_weight_only_layers_are_not_fused_by_default(tiny_model):
    engine = SD3FP8Pipeline.from_pretrained(tiny_model, runtime=RuntimeConfig(dtype="fp32"))
    assert not any(n.endswith("to_qkv") for n in engine.fp8_layers["transformer"])
    assert engine.fp8_layers["transformer"] == list(
        n for n, m in engine.component("transformer").named_modules() if isinstance(m, FP8Linear))


def test_offload_model_loads_every_component_to_the_cpu(tiny_model, monkeypatch):
    """--offload model used to place every component on the GPU first (19.5 GB for Large), then
    offload. Now they load to the CPU and diffusers' hooks move one at a time."""
    offloaded = []
    monkeypatch.setattr(loader, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr("diffusers.StableDiffusion3Pipeline.enable_model_cpu_offload",
                        lambda self, device=None, **kw: offloaded.append(torch.device(device)))
    engine = SD3FP8Pipeline.from_pretrained(tiny_model, runtime=RuntimeConfig(offload="model", dtype="fp32"))
    assert offloaded == [torch.device("cuda")]
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = engine.component(name)
        devices = {t.device.type for t in list(module.parameters()) + list(module.buffers())}
        assert devices == {"cpu"}, name


def test_compile_with_staged_offload_is_refused():
    with pytest.raises(ConfigError, match="recompile"):
        RuntimeConfig(compile=True, offload="stages")


def test_compile_without_a_compiler_is_one_clear_error(tiny_model, monkeypatch):
    monkeypatch.setattr(compiled, "compile_problem", lambda device: "inductor finds no C++ compiler for CPU kernels: install g++")
    with pytest.raises(ConfigError, match="--compile cannot work here: inductor finds no C\\+\\+ compiler"):
        SD3FP8Pipeline.from_pretrained(tiny_model, Policy(text_encoder_3="off"), RuntimeConfig(dtype="fp32", compile=True))


def test_compile_problem_sees_this_machine():
    assert compiled.compile_problem("cpu") is None  # g++ and Python.h are installed here
    assert "not set up" in compiled.compile_problem("meta")
