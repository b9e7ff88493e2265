"""The engine's first Euler step equals ComfyUI's, derived by hand from ComfyUI's documented math.

ComfyUI cannot run here, so its side is written out from the formulas of
/work/shared/reference/serving.md section 4 (measured against ComfyUI v0.8.0) and anchored to
ComfyUI's own numbers in tests/data/comfy_sigmas_noise.json (sigma lists, noise values and checksum):

  noise = torch.randn([B, 16, h, w], float32, generator=manual_seed(seed))   comfy/sample.py prepare_noise
  x0    = sigma0 * noise + (1 - sigma0) * latent   (an empty latent is not process_in'd)
  v     = model(cat[x0, x0], 1000 * sigma0, cat[negative, positive])   one batch, uncond first
  D     = x0 - v.float() * sigma0                  CONST.calculate_denoised, per conditioning
  D     = D_u + (D_c - D_u) * cfg                  cfg_function
  x1    = x0 + (x0 - D) / sigma0 * (sigma1 - sigma0)    sample_euler
  out   = (x1 / (1 - sigma_last)) / scale + shift  inverse_noise_scaling, process_latent_out

"The same weights" is the tiny model's transformer (the model function both sides call), "the same
conditioning mode" is ComfyUI's text conditioning (TextMode.COMFY, tested in
test_text_conditioning.py); the engine runs fp32 so nothing depends on the host's bf16 support.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import sd3fp8.engine.pipeline as pipeline_module
from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline
from sd3fp8.engine.request import GenerationRequest

REFERENCE = json.loads((Path(__file__).parent / "data" / "comfy_sigmas_noise.json").read_text())
PROMPT, NEGATIVE = "a small red circle in the top left", "blurry green square"


@pytest.fixture(scope="module")
def engine(tiny_model):
    return SD3FP8Pipeline.from_pretrained(tiny_model, Policy(transformer="fp32"), RuntimeConfig(dtype="fp32"))


def comfy_noise(seed: int, shape) -> torch.Tensor:
    """comfy/sample.py prepare_noise without batch_index: one float32 CPU draw of the whole batch
    (ComfyUI seeds the global generator; a private one gives the same stream, serving.md 4.4)."""
    return torch.randn(shape, dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(seed), device="cpu")


def test_the_hand_noise_rule_is_comfyuis():
    noise = comfy_noise(42, [2, 16, 128, 128])
    assert hashlib.sha256(noise.numpy().tobytes()).hexdigest() == REFERENCE["noise seed=42 sha256"]
    assert noise[1].flatten()[:5].tolist() == REFERENCE["noise seed=42 first5 of image1"]


def test_engine_noise_is_comfyuis_checksum(engine):
    f = engine.vae_scale_factor  # the tiny VAE downsamples by 2: 256 px -> a 128 latent
    request = GenerationRequest("x", seed=42, batch=2, width=128 * f, height=128 * f)
    noise = engine.initial_noise(request)
    assert list(noise.shape) == [2, 16, 128, 128] and noise.dtype == torch.float32
    assert hashlib.sha256(noise.numpy().tobytes()).hexdigest() == REFERENCE["noise seed=42 sha256"]
    # image 1 of that batch, alone (ComfyUI's batch_index), is the generator's second draw
    alone = engine.initial_noise(GenerationRequest("x", seed=42, batch_index=1, width=128 * f, height=128 * f))
    assert alone[0].flatten()[:5].tolist() == REFERENCE["noise seed=42 first5 of image1"]
    assert torch.equal(alone[0], noise[1])


def comfy_first_euler_step(engine, conditioning, noise, latent, sigma0, sigma1, cfg):
    """ComfyUI's KSampler with sampler euler over the sigmas [sigma0, sigma1] (a SplitSigmas-style
    truncated schedule), by hand: returns (D at sigma0, the latent it hands to VAEDecode)."""
    transformer = engine.component("transformer")
    fmt = engine.latent_format
    pos, neg = conditioning.positive[0], conditioning.negative[0]
    batch = noise.shape[0]
    if torch.count_nonzero(latent) > 0:  # an empty latent (txt2img) is not process_in'd
        latent = (latent - fmt.shift_factor) * fmt.scale_factor
    x = sigma0 * noise + (1.0 - sigma0) * latent

    def velocity(x_in, context, pooled):
        timestep = torch.full((x_in.shape[0],), 1.0, dtype=torch.float32) * (sigma0 * 1000.0)
        return transformer(
            hidden_states=x_in, timestep=timestep, encoder_hidden_states=context, pooled_projections=pooled, return_dict=False
        )[0].float()

    if cfg == 1.0:  # the negative is not evaluated at all
        d_c = x - velocity(x, pos.context.repeat(batch, 1, 1), pos.pooled.repeat(batch, 1)) * sigma0
        denoised = torch.zeros_like(x) + (d_c - torch.zeros_like(x)) * cfg
    else:  # calc_cond_batch: positive and negative in one model call, the negative's rows first
        context = torch.cat([neg.context.repeat(batch, 1, 1), pos.context.repeat(batch, 1, 1)])
        pooled = torch.cat([neg.pooled.repeat(batch, 1), pos.pooled.repeat(batch, 1)])
        x_in = torch.cat([x, x])
        d_u, d_c = (x_in - velocity(x_in, context, pooled) * sigma0).chunk(2)
        denoised = d_u + (d_c - d_u) * cfg
    d = (x - denoised) / sigma0
    x1 = x + d * (sigma1 - sigma0)
    return denoised, (x1 / (1.0 - sigma1)) / fmt.scale_factor + fmt.shift_factor


CASES = [  # (ComfyUI reference sigma list, scheduler, denoise, cfg, batch, img2img)
    ("normal/20", "normal", 1.0, 4.5, 2, False),
    ("sgm_uniform/20", "sgm_uniform", 1.0, 1.0, 1, False),
    ("ddim_uniform/20", "ddim_uniform", 1.0, 3.0, 1, False),  # starts below sigma 1
    ("KSampler simple steps=20 denoise=0.6", "simple", 0.6, 4.5, 2, True),  # img2img: starts at 0.822
]


@pytest.mark.parametrize(("key", "scheduler", "denoise", "cfg", "batch", "img2img"), CASES, ids=[c[0] for c in CASES])
def test_first_euler_step_equals_comfyuis(engine, monkeypatch, key, scheduler, denoise, cfg, batch, img2img):
    assert engine.flow_sampling().shift == 3.0  # the reference sigma lists are ComfyUI's at shift 3
    reference = torch.tensor(REFERENCE[key], dtype=torch.float32)
    sigma0, sigma1 = reference[0], reference[1]
    request = GenerationRequest(
        PROMPT,
        NEGATIVE,
        steps=20,
        cfg=cfg,
        seed=42,
        width=32,
        height=32,
        batch=batch,
        sampler="euler",
        scheduler=scheduler,
        denoise=denoise,
        text_mode="comfy",
    )
    # an init image's VAE latent (any non-zero latent: VAEEncode's output is what KSampler receives)
    latent = torch.randn([1, 16, 16, 16], generator=torch.Generator().manual_seed(7)) if img2img else None
    with torch.inference_mode():
        conditioning = engine.encode(PROMPT, NEGATIVE, "comfy")
        noise = engine.initial_noise(request)
        assert torch.equal(noise, comfy_noise(42, [batch, 16, 16, 16]))

        # the full schedule the engine samples is ComfyUI's, bit for bit
        schedules = []
        real_sigmas_for = pipeline_module.sigmas_for

        def first_step_only(*args, **kwargs):
            sigmas = real_sigmas_for(*args, **kwargs)
            schedules.append(sigmas)
            return sigmas[:2]

        monkeypatch.setattr(pipeline_module, "sigmas_for", first_step_only)
        seen = []
        ours = engine.denoise(request, conditioning, noise, latent, callback=seen.append)
        assert torch.equal(schedules[0], reference)
        assert [info["step"] for info in seen] == [1] and seen[0]["sigma"] == float(sigma0)

        empty = torch.zeros_like(noise)
        init = empty if latent is None else latent.expand_as(noise)
        comfy_d, comfy_out = comfy_first_euler_step(engine, conditioning, noise, init, sigma0, sigma1, cfg)
    for name, a, b in (("denoised", seen[0]["denoised"], comfy_d), ("latent", ours, comfy_out)):
        scale = float(b.abs().max())
        error = float((a - b).abs().max())
        assert error <= 1e-6 * scale, f"{name}: max |ours - ComfyUI's| = {error:.3g} at scale {scale:.3g}"
        # stronger: the same operations in the same order give the same bits (a diffusers-style step
        # x + v * dt is equal only to rounding, and this is what tells the two apart)
        assert torch.equal(a, b), f"{name}: equal to rounding ({error:.3g}) but not bit for bit"
