"""bench's synthetic transformers and memory phases: FP8 models quantized layer by layer on the CPU
(never 16-bit on the device first), the peak-memory counter reset per phase on CUDA."""

import dataclasses

import torch

from sd3fp8.evalkit import bench, synthetic
from sd3fp8.evalkit.bench import BenchSpec
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.policy import Policy


def test_build_synthetic_quantizes_one_layer_at_a_time():
    keep = Policy().layer_filter("transformer")
    drawn = []

    def to_fp8(name, linear):  # each layer arrives alone, in float32 on the CPU, and leaves as FP8
        drawn.append((name, linear.weight.dtype, linear.weight.device.type))
        return FP8Linear.from_linear(linear, name=name)

    fp8 = synthetic.build_synthetic("medium", 1, 64, torch.bfloat16, to_fp8, keep)
    assert {(d, where) for _, d, where in drawn} == {(torch.float32, "cpu")}
    plain = synthetic.build_synthetic("medium", 1, 64, torch.float32)
    layers = {n: m for n, m in fp8.named_modules() if isinstance(m, FP8Linear)}
    assert sorted(layers) == sorted(n for n, _, _ in drawn) and all(keep(n) for n in layers)
    assert {t.device.type for t in fp8.state_dict().values()} == {"cpu"}
    assert all(t.dtype in (torch.bfloat16, torch.float32, torch.float8_e4m3fn) for t in fp8.state_dict().values())
    # the same seeded weights whatever the storage: the FP8 layer is the quantized float32 one
    name = "transformer_blocks.0.attn.to_q"
    w = plain.get_submodule(name).weight
    assert torch.allclose(layers[name].dequantized_weight(), w, atol=float(w.abs().max()) / 8)
    assert plain.get_submodule("transformer_blocks.0.ff.net.2").weight.dtype == torch.float32


def test_synthetic_run_resets_the_peak_per_phase(tmp_path, monkeypatch):
    phases = []
    monkeypatch.setattr(bench, "reset_peak_memory", lambda device: phases.append(len(phases)))
    monkeypatch.setattr(synthetic, "SYNTHETIC_HEADS", {**synthetic.SYNTHETIC_HEADS, "tiny": 2})
    spec = BenchSpec(None, (), None, 64, 64, 1, str(tmp_path), synthetic="tiny", blocks=1)
    result = synthetic.run_synthetic_config("sd3fp8", dataclasses.replace(spec))
    assert phases == [0, 1]  # load, run
    assert result["load_peak_memory_bytes"] > 0 and result["peak_memory_bytes"] > 0
    assert (tmp_path / "raw" / "sd3fp8.pt").is_file()


def test_reset_peak_memory_on_cuda_calls_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    bench.reset_peak_memory(torch.device("cuda"))
    bench.reset_peak_memory(torch.device("cpu"))
    assert calls == ["sync", "reset"]
