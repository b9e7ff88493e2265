import json

import numpy as np
import pytest
from PIL import Image

from sd3fp8 import cli
from sd3fp8.errors import ConfigError
from sd3fp8.evalkit.configs import REGISTRY, check_configurations, parse_configuration, parse_configurations
from sd3fp8.evalkit.evaluation import evaluate, write_report
from sd3fp8.evalkit.metrics import psnr
from sd3fp8.miniature.bundled import default_model_path
from sd3fp8.miniature.world import heldout_prompts


def test_parse_configuration():
    assert parse_configuration("fp8").policy == {} and parse_configuration("fp8").runtime == {}
    c = parse_configuration("fp8-scaled-mm-row@bf16")
    assert c.runtime == {"force_fp8": True, "activation": "row", "dtype": "bf16"} and c.name == "fp8-scaled-mm-row@bf16"
    assert parse_configuration("bf16").policy == {"transformer": "bf16"}
    keep = parse_configuration("fp8-static-keep2.5")
    assert keep.keep_budget == 2.5 and keep.calibrated and keep.runtime == {"force_fp8": True}
    # bench's old spellings are the registry's names
    assert parse_configuration("plain-cast").name == "fp8-cast" and parse_configuration("plain-cast").route == "plain-cast"
    assert parse_configuration("sd3fp8@fp32").name == "fp8@fp32"
    assert [c.name for c in parse_configurations("fp8,sd3fp8,fp8-cast", "bf16")] == ["bf16", "fp8", "fp8-cast"]
    with pytest.raises(ConfigError, match="unknown configuration 'int8'"):
        parse_configuration("int8")
    with pytest.raises(ConfigError, match="unknown compute dtype 'fp64'"):
        parse_configuration("fp8@fp64")


def test_every_registry_entry_builds_a_valid_policy_and_runtime():
    from sd3fp8.evalkit.routes import ROUTES
    from sd3fp8.policy import Policy
    from sd3fp8.runtime import RuntimeConfig

    for name in REGISTRY:
        config = parse_configuration(name)
        Policy().replace(**config.policy), RuntimeConfig(**config.runtime)
        assert config.route is None or config.route in ROUTES


def test_calibration_needs_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="fp8-static-keep2 needs a calibration file"):
        check_configurations(parse_configurations("fp8,fp8-static-keep2"), None)
    path = unranked_calibration(tmp_path)
    check_configurations(parse_configurations("fp8-static"), path)  # static scales need no ranking
    with pytest.raises(ConfigError, match="no sensitivity ranking"):
        check_configurations(parse_configurations("fp8-static-keep2"), path)
    with pytest.raises(ConfigError, match="synthetic .* fp8-t5"):
        check_configurations(parse_configurations("fp8,fp8-t5"), None, synthetic=True)


@pytest.fixture(scope="module")
def world_report():
    """fp32 reference vs two FP8 candidates on the miniature model, compute dtype pinned (no host CPU dependence)."""
    prompts = heldout_prompts(1)
    return evaluate(None, prompts, [0], reference="fp32", candidates=("fp8@fp32", "fp8-cast@fp32"), steps=6, progress=False)


def test_eval_on_the_shape_world_model(world_report):
    from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline

    report = world_report
    assert report["judge"] == "shapes-v1" and report["note"] is None
    assert [r["name"] for r in report["configs"]] == ["fp32", "fp8@fp32", "fp8-cast@fp32"]
    ref, fp8, cast = report["configs"]
    # the reference row is the reference's own images; the candidates are measured against it:
    # measured 46-50 dB (fp8) and 45-47 dB (plain cast) over held-out prompts at 6 steps: 40 leaves a 5 dB margin
    assert ref["psnr"] == 100.0 and ref["ssim"] == pytest.approx(1.0)
    assert 40 < fp8["psnr"] < 100 and 0.98 < fp8["ssim"] < 1 and 40 < cast["psnr"] < 100
    assert fp8["backend"] == "weight-only" and cast["backend"] == "plain-cast"
    assert 0 <= fp8["adherence"] <= 1 and fp8["frechet_distance"] is None  # one image: no distribution
    # FP8 linears: 1 byte of fp32's 4; the embedders and final layer stay fp32 (measured 0.303 and 0.297)
    assert 0.25 < cast["transformer_bytes_vs_reference"] < fp8["transformer_bytes_vs_reference"] < 0.32
    # eval's images are what the engine generates for that prompt and seed (not, say, the reference twice)
    engine = SD3FP8Pipeline.from_pretrained(None, Policy(), RuntimeConfig(dtype="fp32"))
    alone = np.asarray(engine(report["prompts"][0], seed=0, steps=6).images[0])
    assert np.array_equal(report["_images"]["fp8@fp32"][0], alone)
    assert psnr(report["_images"]["fp32"][0], alone) == pytest.approx(fp8["psnr"])


def test_eval_report_files(world_report, tmp_path):
    paths = write_report(world_report, tmp_path / "out")
    data = json.loads(paths[0].read_text())
    assert [r["name"] for r in data["configs"]] == ["fp32", "fp8@fp32", "fp8-cast@fp32"] and "_images" not in data
    md = paths[1].read_text()
    fp8 = world_report["configs"][1]
    assert f"| fp8@fp32 | weight-only | {fp8['adherence']:.3f} | n/a | {fp8['psnr']:.1f} |" in md and "| fp32 | none |" in md
    grid = Image.open(paths[2])
    assert grid.size == (5 * 128, 1 * 128)  # reference + 2 x (image, heatmap); one prompt x one seed


def test_eval_on_a_non_world_model_reports_image_metrics_only(tiny_model):
    report = evaluate(tiny_model, ["a cat"], [0, 1], reference="fp32", candidates=("fp8@fp32",), steps=2, progress=False)
    assert report["judge"] is None and "not a shape-world model" in report["note"]
    row = report["configs"][1]
    assert "adherence" not in row and 50 < row["psnr"] < 100  # measured 57.0 and 58.0 dB on two prompts


@pytest.mark.parametrize("argv,message", [
    (["--candidates", "fp8,fp4"], "unknown configuration 'fp4'"),
    (["--candidates", "fp8-static-keep2"], "needs a calibration file"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--prompts", "/nonexistent.txt"], "cannot read prompts file"),
])
def test_eval_cli_checks_its_inputs_before_loading_anything(tmp_path, capsys, monkeypatch, argv, message):
    import sd3fp8.evalkit.evaluation as evaluation

    monkeypatch.setattr(evaluation, "load_configuration", lambda *a, **k: pytest.fail("a model was loaded"))
    code = cli.main(["eval", *argv, "--out", str(tmp_path / "o")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_cli_refuses_a_calibration_without_ranking_at_once(calibration_file, tmp_path, capsys, monkeypatch):
    import sd3fp8.evalkit.evaluation as evaluation

    monkeypatch.setattr(evaluation, "load_configuration", lambda *a, **k: pytest.fail("a model was loaded"))
    code = cli.main(["eval", "--candidates", "fp8-static-keep2", "--calibration", str(calibration_file), "--out", str(tmp_path / "o")])
    assert code == 2 and "no sensitivity ranking" in capsys.readouterr().err


def unranked_calibration(folder):
    """A calibration file without a sensitivity ranking (``calibrate`` without --sensitivity)."""
    from sd3fp8.fp8.calibration import Calibration

    cal = Calibration(fingerprint="0" * 16, model="m", prompts=("p",), seeds=(0,), steps=2, cfg=1.0, size=(32, 32),
                      timesteps=(1.0, 0.5), stats={}, transformer_params=100)
    return cal.save(folder / "cal.json")


@pytest.fixture
def calibration_file(tmp_path):
    return unranked_calibration(tmp_path)


def test_eval_takes_every_model_option(tmp_path, capsys):
    """eval and bench take the model options generate takes (a single file, --checkpoint, --tokenizers ...)."""
    from sd3fp8.cli import make_parser

    parser = make_parser()
    for command in ("eval", "bench", "generate", "calibrate", "inspect"):
        args = parser.parse_args([command, "--model", "m.safetensors", "--checkpoint", "c", "--text-encoders", "t", "--vae", "v",
                                  "--tokenizers", "k", "--transformer", "x.safetensors"])
        assert (str(args.model), args.checkpoint, [str(p) for p in args.text_encoders], str(args.tokenizers)) == (
            "m.safetensors", "c", ["t"], "k"), command


def test_default_model_is_the_bundled_miniature():
    path = default_model_path()
    assert (path / "model_index.json").is_file()
    recipe = json.loads((path / "sd3fp8.json").read_text())
    assert recipe["world"] == "shapes-v1" and recipe["defaults"]["width"] == 64


@pytest.mark.parametrize("precision,dtype", [("bf16", "auto"), ("fp8", "fp32"), ("fp8", "bf16")])
def test_bundled_model_draws_a_heldout_prompt_right(precision, dtype):
    """The miniature model, offline, at its default settings: a held-out caption is judged right."""
    from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline
    from sd3fp8.miniature.judge import adherence

    prompt = "a small blue circle at the bottom on a black background"
    assert prompt in heldout_prompts()  # training never saw it
    engine = SD3FP8Pipeline.from_pretrained(None, Policy(transformer=precision), RuntimeConfig(dtype=dtype))
    image = np.asarray(engine(prompt, seed=0).images[0])
    assert adherence(image, prompt) == 1.0
