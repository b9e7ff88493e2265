"""Calibration: statistics over denoising runs, static scales in the engine, the clipping counter,
sensitivity ranking, budgeted policies, calibration stored in checkpoints, refusal for other models."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from sd3fp8 import Policy
from sd3fp8.cli import main
from sd3fp8.engine.calibrate import calibrate, layer_sensitivity
from sd3fp8.engine.pipeline import SD3FP8Pipeline
from sd3fp8.errors import ConfigError
from sd3fp8.fp8.calibration import Calibration, CalibrationError, apply_calibration, model_fingerprint
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.miniature.tiny import TinySpec, write_tiny_model
from sd3fp8.policy import budget_policy
from sd3fp8.runtime import RuntimeConfig

FP32 = RuntimeConfig(device="cpu", dtype="fp32")
STATIC = RuntimeConfig(device="cpu", dtype="fp32", force_fp8=True)
PROMPTS = ["a red circle", "a blue square on the left"]
STEPS = 3


# Sensitivity runs one denoising per layer: ranked over the last block's layers only (half the runs)
RANKED = Policy(exclude=Policy().exclude + ("transformer_blocks.0",))


@pytest.fixture(scope="module")
def calibration(tiny_model):
    engine = SD3FP8Pipeline.from_pretrained(tiny_model, Policy(transformer="fp32"), FP32)
    cal = calibrate(engine, PROMPTS, [0], steps=STEPS, cfg=2.0)
    ranking = layer_sensitivity(engine, cal, RANKED, PROMPTS[:1], [0], steps=2)
    return dataclasses.replace(cal, sensitivity=tuple(ranking)), engine


def test_statistics_cover_every_linear_and_step(calibration):
    cal, engine = calibration
    linears = [n for n, m in engine.component("transformer").named_modules() if isinstance(m, nn.Linear)]
    assert sorted(cal.stats) == sorted(linears)
    assert len(cal.timesteps) == STEPS and cal.prompts == tuple(PROMPTS)
    for stats in cal.stats.values():
        assert len(stats["amax"]) == STEPS
        # percentiles never exceed the max, and the max is what static scales cover
        assert all(p <= a + 1e-6 for p, a in zip(stats["p99.99"], stats["amax"]))
    name = linears[0]
    assert cal.input_scales()[name] == pytest.approx(max(cal.stats[name]["amax"]) / 448)
    pct = cal.with_method("percentile", 99.9)
    assert pct.input_scales()[name] == pytest.approx(max(cal.stats[name]["p99.9"]) / 448)
    with pytest.raises(CalibrationError, match="percentile must be one of"):
        cal.with_method("percentile", 42.0)


def test_file_round_trip_and_bad_files(calibration, tmp_path):
    cal, _ = calibration
    path = cal.save(tmp_path / "cal.json")
    assert Calibration.load(path) == cal
    assert json.loads(path.read_text())["input_scales"] == pytest.approx(cal.input_scales())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        Calibration.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(CalibrationError, match="not an sd3fp8 calibration file"):
        Calibration.load(tmp_path / "other.json")


def fused_scale(scales: dict, name: str) -> float:
    """A layer's calibrated scale; a fused q/k/v layer (scaled-mm fuses them) takes its parts' largest."""
    parent, _, leaf = name.rpartition(".")
    parts = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}.get(leaf)
    return max(scales[f"{parent}.{p}"] for p in parts) if parts else scales[name]


def test_static_scales_are_used_when_present_and_dynamic_otherwise(calibration, tiny_model, tmp_path):
    cal, _ = calibration
    path = cal.save(tmp_path / "cal.json")
    static = SD3FP8Pipeline.from_pretrained(tiny_model, runtime=STATIC, calibration=path)
    dynamic = SD3FP8Pipeline.from_pretrained(tiny_model, runtime=STATIC)
    scales = cal.input_scales()
    for name, layer in static.component("transformer").named_modules():
        if isinstance(layer, FP8Linear):
            assert float(layer.input_scale) == pytest.approx(fused_scale(scales, name)) and layer.describe()["activation"] == "static"
    assert all(m.input_scale is None for m in dynamic.component("transformer").modules() if isinstance(m, FP8Linear))
    a = static.latents("a red circle", steps=2)
    b = dynamic.latents("a red circle", steps=2)
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.2)  # different scales, same picture


def test_clipping_counter_counts(calibration, tiny_model, tmp_path):
    cal, _ = calibration
    watch = dataclasses.replace(STATIC, watch_clipping=True)
    fitting = SD3FP8Pipeline.from_pretrained(tiny_model, runtime=watch, calibration=cal.save(tmp_path / "cal.json"))
    fitting.latents(PROMPTS[0], steps=STEPS, cfg=2.0)  # a calibrated prompt: inside its ranges (up to FP8 noise)
    assert all(r["worst_ratio"] < 1.05 for r in fitting.clip_counter.report())
    assert sum(fitting.clip_counter.calls.values()) > 0
    tiny = dataclasses.replace(cal, stats={n: {**s, "amax": [a * 0.25 for a in s["amax"]]} for n, s in cal.stats.items()})
    clipped = SD3FP8Pipeline.from_pretrained(tiny_model, runtime=watch, calibration=tiny.save(tmp_path / "small.json"))
    clipped.latents(PROMPTS[0], steps=STEPS, cfg=2.0)
    rows = clipped.clip_counter.report()
    fp8 = [n for n, m in clipped.component("transformer").named_modules() if isinstance(m, FP8Linear)]
    assert {r["name"] for r in rows} == set(fp8)
    # ranges shrunk 4x: every call clips (by less downstream of clipped layers, whose outputs shrink)
    assert all(r["clipped_calls"] == r["calls"] == STEPS and 2.0 < r["worst_ratio"] < 4.5 for r in rows)


def test_sensitivity_ranking_is_deterministic_and_covers_the_fp8_layers(calibration):
    cal, engine = calibration
    ranking = list(cal.sensitivity)
    keep = RANKED.layer_filter("transformer")
    assert {r["name"] for r in ranking} == {n for n in cal.stats if keep(n)}
    assert [r["error"] for r in ranking] == sorted((r["error"] for r in ranking), reverse=True)
    # the last block's context queries only feed its discarded context output: no effect at all
    errors = {r["name"]: r["error"] for r in ranking}
    assert errors.pop("transformer_blocks.1.attn.add_q_proj") == 0.0 and min(errors.values()) > 0
    # deterministic: the same layers measured again (a few, each measured alone) give the same errors
    again = layer_sensitivity(engine, cal, Policy(include=("transformer_blocks.1.ff",)), PROMPTS[:1], [0], steps=2)
    assert again and again == [r for r in ranking if r["name"].startswith("transformer_blocks.1.ff.")]
    # the model under test is left as it was: no FP8 layer remains
    assert not any(isinstance(m, FP8Linear) for m in engine.component("transformer").modules())


def test_budget_keeps_exactly_the_chosen_layers():
    ranking = [{"name": "a", "error": 3.0, "params": 50}, {"name": "b", "error": 2.0, "params": 30},
               {"name": "c", "error": 1.0, "params": 10}, {"name": "d", "error": 0.5, "params": 40}]
    assert budget_policy(Policy(), ranking, 1000, 0)[1] == []
    assert budget_policy(Policy(), ranking, 1000, 5)[1] == ["a"]
    assert budget_policy(Policy(), ranking, 1000, 6)[1] == ["a", "c"]  # b does not fit beside a; c does
    policy, kept = budget_policy(Policy(), ranking, 1000, 100)
    assert kept == ["a", "b", "c", "d"] and policy.exclude[-4:] == ("a", "b", "c", "d")
    with pytest.raises(ConfigError, match="0..100"):
        budget_policy(Policy(), ranking, 1000, 101)
    with pytest.raises(ConfigError, match="no sensitivity ranking"):
        budget_policy(Policy(), [], 1000, 1)


def test_budgeted_policy_runs_those_layers_in_16_bit(calibration, tiny_model):
    cal, _ = calibration
    policy, kept = budget_policy(RANKED, cal.sensitivity, cal.transformer_params, 10)
    assert kept
    engine = SD3FP8Pipeline.from_pretrained(tiny_model, policy, FP32)
    modules = dict(engine.component("transformer").named_modules())
    assert all(type(modules[n]) is nn.Linear for n in kept)
    assert set(engine.fp8_layers["transformer"]) == {r["name"] for r in cal.sensitivity} - set(kept)


def test_calibration_for_another_model_is_refused(calibration, tmp_path):
    cal, _ = calibration
    other = write_tiny_model(tmp_path / "other", TinySpec(seed=7))
    with pytest.raises(CalibrationError, match="does not match"):
        SD3FP8Pipeline.from_pretrained(other, runtime=STATIC, calibration=cal.save(tmp_path / "cal.json"))
    engine = SD3FP8Pipeline.from_pretrained(other, runtime=STATIC)
    with pytest.raises(CalibrationError, match="fingerprint"):
        apply_calibration(engine.component("transformer"), cal)


def test_fingerprint_survives_fp8_storage(calibration, tiny_model):
    cal, engine = calibration
    fp8 = SD3FP8Pipeline.from_pretrained(tiny_model, runtime=FP32)
    assert model_fingerprint(fp8.component("transformer")) == model_fingerprint(engine.component("transformer")) == cal.fingerprint


def test_cli_calibrate_and_policy(tiny_model, tmp_path, capsys):
    out = tmp_path / "cal.json"
    # the sensitivity runs over block 1's feed-forward layers only (--exclude narrows the FP8 set): a few runs
    assert main(["calibrate", "--model", str(tiny_model), "--count", "2", "--steps", "2", "--sensitivity", "--sensitivity-count", "1",
                 "--keep-budget", "20", "--out", str(out), "-q", "--dtype", "fp32", "--exclude", "transformer_blocks.0",
                 "--exclude", "transformer_blocks.1.attn", "--exclude", "transformer_blocks.1.norm*"]) == 0
    cal = Calibration.load(out)
    assert len(cal.prompts) == 2 and cal.sensitivity
    policy = Policy.load(out.with_suffix(".policy.json"))
    assert set(policy.exclude) > set(Policy().exclude)
    assert main(["policy", "--calibration", str(out), "--keep-budget", "0", "--out", str(tmp_path / "p0.json")]) == 0
    assert Policy.load(tmp_path / "p0.json") == Policy()
    assert main(["calibrate", "--model", str(tiny_model), "--keep-budget", "2"]) == 2
    assert "needs the sensitivity ranking" in capsys.readouterr().err


@pytest.mark.parametrize("fmt,granularity,suffix", [("sd3fp8", "channel", "input_scale"), ("comfy", "tensor", "scale_input")])
def test_calibration_travels_with_the_checkpoint(calibration, tmp_path, fmt, granularity, suffix):
    from safetensors.torch import load_file, save_file

    from sd3fp8.io.quantize import QuantizeOptions, quantize_file
    from sd3fp8.io.singlefile import load_mmdit
    from tests.test_layouts import original_from_diffusers

    cal, engine = calibration
    src = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in original_from_diffusers(engine.component("transformer")).items()}, str(src))
    out = quantize_file(src, tmp_path / f"{fmt}.safetensors", QuantizeOptions(format=fmt, granularity=granularity, calibration=cal))
    tensors = load_file(str(out))
    scales = cal.input_scales()
    qkv = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv." + suffix
    fused = max(scales[f"transformer_blocks.0.attn.to_{p}"] for p in "qkv")
    assert float(tensors[qkv]) == pytest.approx(fused)  # one input, one scale for the fused projection
    loaded, names, _ = load_mmdit(out, Policy(), torch.float32, backend="scaled-mm", force_fp8=True)
    layers = dict(loaded.named_modules())
    groups = {}  # a fused qkv in the file = q, k and v (or the context's add_*_proj) here
    for n in names:
        parent, _, leaf = n.rpartition(".")
        fused_part = leaf in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
        groups.setdefault((parent, leaf.startswith("add_")) if fused_part else n, []).append(n)
    for members in groups.values():
        for n in members:
            assert float(layers[n].input_scale) == pytest.approx(max(scales[m] for m in members)), n
    other = dataclasses.replace(cal, fingerprint="0" * 16)
    with pytest.raises(CalibrationError, match="does not match"):
        quantize_file(src, tmp_path / "x.safetensors", QuantizeOptions(format=fmt, granularity=granularity, calibration=other))
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_generate_with_calibration_reports_clipping(calibration, tiny_model, tmp_path, capsys):
    cal, _ = calibration
    path = cal.save(tmp_path / "cal.json")
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(tiny_model), "--steps", "2", "--dtype", "fp32", "--force-fp8",
                 "--calibration", str(path), "--watch-clipping", "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "clipping:" in text
    (tmp_path / "broken.json").write_text("[]")
    assert main(["generate", "x", "--model", str(tiny_model), "--calibration", str(tmp_path / "broken.json")]) == 2
    assert "not an sd3fp8 calibration file" in capsys.readouterr().err
