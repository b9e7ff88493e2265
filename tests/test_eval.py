import json

import numpy as np
import pytest
from PIL import Image

from sd3fp8 import cli
from sd3fp8.errors import ConfigError
from sd3fp8.evalkit.evaluation import default_prompts, evaluate, parse_config, write_report
from sd3fp8.miniature.bundled import default_model_path
from sd3fp8.miniature.world import heldout_prompts, parse_caption


def test_parse_config():
    assert parse_config("fp8").policy == {} and parse_config("fp8").runtime == {}
    c = parse_config("fp8-scaled-mm-row@bf16")
    assert c.runtime == {"force_fp8": True, "activation": "row", "dtype": "bf16"} and c.name == "fp8-scaled-mm-row@bf16"
    assert parse_config("bf16").policy == {"transformer": "bf16"}
    with pytest.raises(ConfigError, match="unknown configuration 'int8'"):
        parse_config("int8")
    with pytest.raises(ConfigError, match="unknown compute dtype"):
        parse_config("fp8@fp64")


def test_eval_on_the_shape_world_model_writes_well_formed_files(tmp_path):
    prompts = heldout_prompts(1)
    report = evaluate(None, prompts, [0], reference="fp32", candidates=("fp8", "fp8-tensor"), steps=6, progress=False)
    assert report["judge"] == "shapes-v1" and report["note"] is None
    names = [r["name"] for r in report["configs"]]
    assert names == ["fp32", "fp8", "fp8-tensor"]
    ref, fp8 = report["configs"][0], report["configs"][1]
    assert ref["psnr"] == 100.0 and ref["ssim"] == pytest.approx(1.0)  # identical to itself (PSNR capped)
    assert 20 < fp8["psnr"] < 100 and 0 < fp8["ssim"] <= 1
    assert 0 <= fp8["adherence"] <= 1 and fp8["frechet_distance"] is None  # one image: no distribution
    assert fp8["transformer_bytes_vs_reference"] < 0.7 and fp8["backend"] == "weight-only"
    paths = write_report(report, tmp_path / "out")
    data = json.loads(paths[0].read_text())
    assert [r["name"] for r in data["configs"]] == names and "_images" not in data
    md = paths[1].read_text()
    assert "| fp8 | weight-only |" in md and "| fp32 |" in md
    grid = Image.open(paths[2])
    assert grid.size == (5 * 128, 1 * 128)  # reference + 2 x (image, heatmap); one prompt x one seed


def test_eval_takes_partial_captions_and_comfy_text_mode():
    prompts = default_prompts(default_model_path(), 2, "partial")
    assert prompts == heldout_prompts(2, kind="partial") and not any(parse_caption(p).full for p in prompts)
    assert default_prompts(default_model_path(), 2) == heldout_prompts(2, kind="full")
    report = evaluate(None, prompts[:1], [0], reference="bf16", candidates=("fp8",), steps=3, progress=False, text_mode="comfy")
    assert report["text_mode"] == "comfy" and 0 <= report["configs"][1]["adherence"] <= 1


def test_eval_cli_checks_text_mode_and_captions(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--text-mode", "a1111"])
    with pytest.raises(SystemExit):
        cli.main(["eval", "--captions", "some"])
    assert "invalid choice" in capsys.readouterr().err


def test_eval_on_a_non_world_model_reports_image_metrics_only(tiny_model):
    report = evaluate(tiny_model, ["a cat"], [0, 1], reference="fp32", candidates=("fp8",), steps=2, progress=False)
    assert report["judge"] is None and "not a shape-world model" in report["note"]
    assert "adherence" not in report["configs"][1] and np.isfinite(report["configs"][1]["psnr"])


def test_eval_cli_rejects_unknown_candidates_before_generating(tmp_path, capsys):
    code = cli.main(["eval", "--candidates", "fp8,fp4", "--out", str(tmp_path / "o")])
    assert code == 2 and "unknown configuration 'fp4'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_default_model_is_the_bundled_miniature():
    path = default_model_path()
    assert (path / "model_index.json").is_file()
    recipe = json.loads((path / "sd3fp8.json").read_text())
    assert recipe["world"] == "shapes-v1" and recipe["defaults"]["width"] == 64


@pytest.mark.parametrize("precision,dtype", [("bf16", "auto"), ("fp8", "auto"), ("fp8", "bf16")])
def test_bundled_model_draws_a_heldout_prompt_right(precision, dtype):
    """The miniature model, offline, at its default settings: a held-out caption is judged right."""
    from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline
    from sd3fp8.miniature.judge import adherence

    prompt = "a small blue circle at the bottom on a black background"
    assert prompt in heldout_prompts()  # training never saw it
    engine = SD3FP8Pipeline.from_pretrained(None, Policy(transformer=precision), RuntimeConfig(dtype=dtype))
    image = np.asarray(engine(prompt, seed=0).images[0])
    assert adherence(image, prompt) == 1.0
