import numpy as np
import pytest
import torch

from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline
from sd3fp8.engine.inspection import inspect_pipeline
from sd3fp8.errors import ConfigError, ModelLoadError
from sd3fp8.evalkit.metrics import psnr, sqnr
from sd3fp8.fp8.linear import FP8Linear

FAST = dict(steps=3, cfg=4.0, width=32, height=32)


def pixels(result, i=0):
    return np.asarray(result.images[i], dtype=np.float64)


SEEDS = (0, 7)  # every case is checked on two seeds: no bound tuned to one


@pytest.fixture(scope="module")
def fp32_references(tiny_model):
    """fp32 images per seed, with and without T5 (dropping T5 changes the conditioning itself)."""
    out = {}
    for t5 in ("auto", "off"):
        engine = SD3FP8Pipeline.from_pretrained(tiny_model, Policy(transformer="fp32", text_encoder_3=t5), RuntimeConfig(dtype="fp32"))
        out[t5] = {seed: pixels(engine("a small red circle", seed=seed, **FAST)) for seed in SEEDS}
    return out


# Minimum PSNR vs fp32 measured over seeds 0-5 x 2 prompts on the tiny model; each bound is 5 dB below it.
# (compute dtypes are pinned: "auto" would depend on the host CPU's bf16 units)
CASES = {
    "fp8-fp32": (Policy(), RuntimeConfig(dtype="fp32"), 57.6),
    "fp8-bf16": (Policy(), RuntimeConfig(dtype="bf16"), 48.0),
    "fp8-tensor": (Policy(granularity="tensor"), RuntimeConfig(dtype="fp32", backend="weight-only"), 57.8),
    "scaled-mm": (Policy(), RuntimeConfig(dtype="fp32", force_fp8=True), 53.6),
    "scaled-mm-row-bf16": (Policy(), RuntimeConfig(dtype="bf16", force_fp8=True, activation="row"), 47.4),
    "e5m2": (Policy(transformer="fp8-e5m2"), RuntimeConfig(dtype="fp32"), 54.3),
    "bf16": (Policy(transformer="bf16"), RuntimeConfig(), 47.8),
    "fp16-no-t5": (Policy(transformer="fp16", text_encoder_3="off"), RuntimeConfig(), 58.4),  # vs fp32 without T5
    "t5-fp8": (Policy(text_encoder_3="fp8"), RuntimeConfig(dtype="fp32"), 57.2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_precision_and_backend_generates_close_to_fp32(tiny_model, fp32_references, case):
    policy, runtime, measured = CASES[case]
    engine = SD3FP8Pipeline.from_pretrained(tiny_model, policy, runtime)
    references = fp32_references["off" if policy.text_encoder_3.value == "off" else "auto"]
    for seed in SEEDS:
        image = pixels(engine("a small red circle", seed=seed, **FAST))
        assert image.std() > 1  # not a blank image (NaN latents decode to one flat colour)
        assert measured - 5 < psnr(image, references[seed]) < 100  # close, and really computed in this configuration


@pytest.fixture(scope="module")
def fp8_engine(tiny_model):
    """The default FP8 engine in fp32 compute, shared by the tests that only drive it."""
    return SD3FP8Pipeline.from_pretrained(tiny_model, runtime=RuntimeConfig(dtype="fp32"))


def test_same_seed_same_image_and_batch_seeds(fp8_engine):
    engine = fp8_engine
    a = engine("a blue square", seed=3, batch=2, **FAST)
    b = engine("a blue square", seed=3, **FAST)
    c = engine("a blue square", seed=3, batch_index=1, **FAST)
    d = engine("a blue square", seed=4, **FAST)
    assert [(p["seed"], p["batch_index"]) for p in a.parameters] == [(3, 0), (3, 1)]
    np.testing.assert_allclose(pixels(a, 0), pixels(b), atol=1)
    np.testing.assert_allclose(pixels(a, 1), pixels(c), atol=1)  # image 1 of a batch = draw 1 of its seed, alone
    assert np.abs(pixels(a, 0).astype(int) - pixels(a, 1)).max() > 10
    assert np.abs(pixels(b).astype(int) - pixels(d)).max() > 10


def test_fp8_transformer_output_close_to_bf16(tiny_model):
    """One denoiser call on identical inputs: FP8 weights only add FP8-sized error."""
    ref = SD3FP8Pipeline.from_pretrained(tiny_model, Policy(transformer="fp32"), RuntimeConfig(dtype="fp32"))
    fp8 = SD3FP8Pipeline.from_pretrained(tiny_model, Policy(), RuntimeConfig(dtype="fp32"))
    torch.manual_seed(0)
    t = ref.component("transformer").config
    inputs = dict(
        hidden_states=torch.randn(2, t.in_channels, 16, 16),
        encoder_hidden_states=torch.randn(2, 20, t.joint_attention_dim),
        pooled_projections=torch.randn(2, t.pooled_projection_dim),
        timestep=torch.tensor([500.0, 20.0]),
    )
    with torch.no_grad():
        y_ref = ref.component("transformer")(**inputs).sample
        y_fp8 = fp8.component("transformer")(**inputs).sample
    assert 43 < sqnr(y_ref, y_fp8) < 80  # FP8 error is there, and small: measured 48.1-50.2 dB over input seeds 0-3


def test_inspect_shows_fp8_exactly_where_the_policy_says(tiny_model):
    policy = Policy(exclude=Policy().exclude + ("*.ff_context",))
    engine = SD3FP8Pipeline.from_pretrained(tiny_model, policy, RuntimeConfig(dtype="fp32"))
    report = inspect_pipeline(engine, layers=True)
    transformer = report["components"]["transformer"]
    fp8_rows = {r["name"] for r in transformer["layers"] if r["dtype"].startswith("float8")}
    linears = {r["name"] for r in transformer["layers"] if r["type"] in ("Linear", "FP8Linear")}
    keep = policy.layer_filter("transformer")
    assert fp8_rows == {n for n in linears if keep(n)}
    assert fp8_rows and all(".ff_context." not in n for n in fp8_rows)
    assert transformer["fp8_layers"] == len(fp8_rows) == len(engine.fp8_layers["transformer"])
    assert transformer["dtypes"]["float8_e4m3fn"] > 0
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert "float8_e4m3fn" not in report["components"][component]["dtypes"]


def test_fp8_transformer_bytes_about_half_of_bf16(tiny_model):
    fp8 = inspect_pipeline(SD3FP8Pipeline.from_pretrained(tiny_model, Policy(), RuntimeConfig(dtype="bf16")))
    bf16 = inspect_pipeline(SD3FP8Pipeline.from_pretrained(tiny_model, Policy(transformer="bf16"), RuntimeConfig()))
    ratio = fp8["components"]["transformer"]["bytes"] / bf16["components"]["transformer"]["bytes"]
    # tiny model: embedders and final layer (16-bit) are a large share; SD3.5 sizes are in docs/
    assert 0.5 < ratio < 0.75


def test_t5_off_drops_the_encoder(tiny_model):
    engine = SD3FP8Pipeline.from_pretrained(tiny_model, Policy(text_encoder_3="off"), RuntimeConfig(dtype="fp32"))
    assert engine.component("text_encoder_3") is None
    assert inspect_pipeline(engine)["components"]["text_encoder_3"] is None


def test_t5_fp8_quantizes_t5_linears_but_not_wo(tiny_model):
    engine = SD3FP8Pipeline.from_pretrained(tiny_model, Policy(text_encoder_3="fp8"), RuntimeConfig(dtype="fp32"))
    names = engine.fp8_layers["text_encoder_3"]
    assert names and not any(n.endswith(".wo") for n in names)
    assert isinstance(engine.component("text_encoder_3").get_submodule(names[0]), FP8Linear)


def test_callback_reports_every_step(fp8_engine):
    seen = []
    fp8_engine("a cat", seed=1, callback=seen.append, **FAST)
    assert [s["step"] for s in seen] == [1, 2, 3] and seen[-1]["total"] == 3


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(width=30), "multiple of 16"),
        (dict(height=8192), "multiple of 16 in 16..4096"),
        (dict(steps=0), "steps must be"),
        (dict(batch=0), "batch must be"),
        (dict(cfg=float("nan")), "cfg must be"),
    ],
)
def test_bad_requests(fp8_engine, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        fp8_engine("x", **{**FAST, **kwargs})


def test_bad_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        SD3FP8Pipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=r"neither a diffusers folder \(model_index.json\) nor a ComfyUI tree"):
        SD3FP8Pipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ModelLoadError, match="not a StableDiffusion3Pipeline"):
        SD3FP8Pipeline.from_pretrained(tmp_path)


def test_offload_on_cpu_is_a_clear_error(tiny_model):
    with pytest.raises(ConfigError, match="needs a GPU"):
        SD3FP8Pipeline.from_pretrained(tiny_model, runtime=RuntimeConfig(device="cpu", offload="model"))


def test_scaled_mm_without_tensor_cores_needs_force(tiny_model):
    with pytest.raises(ConfigError, match="--force-fp8"):
        SD3FP8Pipeline.from_pretrained(tiny_model, runtime=RuntimeConfig(device="cpu", backend="scaled-mm"))
