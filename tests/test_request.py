"""A model's generation defaults (sd3fp8.json): read and checked, unknown keys never dropped quietly."""

import json
import logging

import pytest

from sd3fp8.engine.request import Recipe, read_recipe
from sd3fp8.errors import ConfigError


def write(folder, content):
    (folder / "sd3fp8.json").write_text(json.dumps(content) if not isinstance(content, str) else content)
    return folder


def test_defaults_fill_the_recipe(tmp_path):
    assert read_recipe(tmp_path, 512) == Recipe(width=512, height=512)  # no file: SD3.5's usual defaults at the model's size
    recipe = read_recipe(write(tmp_path, {"defaults": {"steps": 20, "cfg": 3.0, "max_sequence_length": 24}, "world": "w"}), 64)
    assert (recipe.steps, recipe.cfg, recipe.width, recipe.max_sequence_length) == (20, 3.0, 64, 24)


def test_unknown_defaults_are_errors_and_unknown_sections_warnings(tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"sd3fp8.json: unknown default\(s\) sampler, stpes: expected some of"):
        read_recipe(write(tmp_path, {"defaults": {"stpes": 20, "sampler": "euler"}}), 64)
    with caplog.at_level(logging.WARNING):
        read_recipe(write(tmp_path, {"defaults": {}, "lora": {}}), 64)
    assert "ignoring unknown section(s) lora" in caplog.text


@pytest.mark.parametrize("content,message", [
    ("{not json", "sd3fp8.json is not valid JSON"),
    ([1, 2], "sd3fp8.json: expected a JSON object, got a list"),
    ({"defaults": {"steps": 0}}, r"field 'defaults.steps' must be an integer in 1..1000, got 0"),
    ({"defaults": {"width": 100}}, "sd3fp8.json: width must be a multiple of 16"),
    ({"defaults": {"max_sequence_length": "long"}}, r"field 'defaults.max_sequence_length' must be an integer in 1..512, got 'long'"),
])
def test_bad_recipe_files_are_refused(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        read_recipe(write(tmp_path, content), 64)
