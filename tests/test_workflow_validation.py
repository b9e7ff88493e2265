"""API-prompt validation: ComfyUI's rules and its error shape."""

import copy
import json
from pathlib import Path

import pytest

from sd3fp8.workflow import Folders, build_registry, validate_prompt
from tests.fake_backend import FakeBackend

DATA = Path(__file__).parent / "data" / "comfyui"
SIMPLE = json.loads((DATA / "sd3.5_simple_example.api.json").read_text())


@pytest.fixture
def registry(tmp_path):
    folders = Folders.under(tmp_path)
    for p in (folders.input, folders.output, folders.temp):
        p.mkdir(parents=True)
    return build_registry(FakeBackend(), folders)


def prompt(**changes):
    p = copy.deepcopy(SIMPLE)
    for node_id, inputs in changes.items():
        p[node_id]["inputs"].update(inputs)
    return p


def only_error(result, node_id):
    assert not result.ok
    (error,) = result.node_errors[node_id]["errors"]
    return error


def test_the_reference_prompt_validates(registry):
    result = validate_prompt(registry, SIMPLE)
    assert result.ok and result.outputs == ["9"] and result.node_errors == {}
    assert result.prompt["3"]["inputs"]["cfg"] == 4.01 and isinstance(result.prompt["3"]["inputs"]["denoise"], float)


def test_value_smaller_than_min_has_comfyuis_shape(registry):
    result = validate_prompt(registry, prompt(**{"53": {"height": 8}}))
    assert result.error == {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                            "details": "", "extra_info": {}}
    assert result.node_errors == {"53": {"errors": [{
        "type": "value_smaller_than_min", "message": "Value 8 smaller than min of 16", "details": "height",
        "extra_info": {"input_name": "height", "input_config": ["INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}],
                       "received_value": 8}}], "dependent_outputs": ["9"], "class_type": "EmptySD3LatentImage"}}


def test_step_is_not_checked(registry):  # ComfyUI checks min and max only
    assert validate_prompt(registry, prompt(**{"53": {"width": 1000}})).ok


def test_value_bigger_than_max_and_conversion(registry):
    error = only_error(validate_prompt(registry, prompt(**{"3": {"denoise": "1.5"}})), "3")
    assert error["type"] == "value_bigger_than_max" and error["extra_info"]["received_value"] == 1.5
    assert validate_prompt(registry, prompt(**{"3": {"steps": "20"}})).prompt["3"]["inputs"]["steps"] == 20
    error = only_error(validate_prompt(registry, prompt(**{"3": {"steps": "many"}})), "3")
    assert error["type"] == "invalid_input_type" and error["extra_info"]["input_name"] == "steps"


def test_combo_values(registry):
    error = only_error(validate_prompt(registry, prompt(**{"3": {"sampler_name": "nope"}})), "3")
    assert error["type"] == "value_not_in_list"
    assert error["details"] == "sampler_name: 'nope' not in ['euler', 'euler_ancestral', 'dpmpp_2m', 'dpmpp_2m_sde']"
    error = only_error(validate_prompt(registry, prompt(**{"4": {"ckpt_name": "missing.safetensors"}})), "4")
    assert error["type"] == "value_not_in_list" and error["extra_info"]["input_name"] == "ckpt_name"


def test_long_combo_lists_are_left_out(tmp_path):
    folders = Folders.under(tmp_path)
    backend = FakeBackend(files={"checkpoints": [f"m{i}.safetensors" for i in range(30)]})
    error = only_error(validate_prompt(build_registry(backend, folders), SIMPLE), "4")
    assert error["details"].endswith("(list of length 30)") and error["extra_info"]["input_config"] is None


def test_required_input_missing(registry):
    p = prompt()
    del p["3"]["inputs"]["positive"]
    error = only_error(validate_prompt(registry, p), "3")
    assert error == {"type": "required_input_missing", "message": "Required input is missing", "details": "positive",
                     "extra_info": {"input_name": "positive"}}


def test_links_must_reach_existing_nodes_outputs_of_the_right_type(registry):
    error = only_error(validate_prompt(registry, prompt(**{"3": {"positive": ["99", 0]}})), "3")
    assert error["type"] == "bad_linked_input" and error["extra_info"]["input_name"] == "positive"
    error = only_error(validate_prompt(registry, prompt(**{"3": {"positive": ["16", 3]}})), "3")
    assert error["type"] == "bad_linked_input" and "no output 3" in error["details"]
    error = only_error(validate_prompt(registry, prompt(**{"3": {"positive": ["4", 0]}})), "3")
    assert error["type"] == "return_type_mismatch"
    assert error["details"] == "positive, received_type(MODEL) mismatch input_type(CONDITIONING)"
    error = only_error(validate_prompt(registry, prompt(**{"3": {"positive": ["16", 0, 1]}})), "3")
    assert error["type"] == "bad_linked_input"
    error = only_error(validate_prompt(registry, prompt(**{"3": {"model": "a value"}})), "3")
    assert error["type"] == "bad_linked_input" and error["extra_info"]["input_name"] == "model"


def test_upstream_errors_are_reported_on_the_upstream_node_only(registry):
    result = validate_prompt(registry, prompt(**{"16": {"clip": ["53", 0]}}))
    assert list(result.node_errors) == ["16"]
    assert result.node_errors["16"]["dependent_outputs"] == ["9"]


def test_unknown_class_names_the_node(registry):
    p = prompt()
    p["7"] = {"class_type": "ControlNetLoader", "inputs": {}}
    result = validate_prompt(registry, p)
    assert result.error == {"type": "invalid_prompt", "message": "Cannot execute because node ControlNetLoader does not exist.",
                            "details": "Node ID '#7'", "extra_info": {}}
    result = validate_prompt(registry, {"1": {"inputs": {}}})
    assert result.error["message"] == "Cannot execute because a node is missing the class_type property."


def test_no_output_node(registry):
    p = prompt()
    del p["9"]
    assert validate_prompt(registry, p).error == {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                                                  "extra_info": {}}


def test_one_good_output_is_enough_and_partial_targets(registry):
    p = prompt()
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["99", 0]}}
    result = validate_prompt(registry, p)
    assert result.ok and result.outputs == ["9"] and result.node_errors["10"]["dependent_outputs"] == ["10"]
    assert validate_prompt(registry, p, partial_targets=["10"]).ok is False
    assert validate_prompt(registry, p, partial_targets=["9"]).outputs == ["9"]


def test_list_values_unwrap_and_unknown_inputs_are_ignored(registry):
    p = prompt(**{"16": {"text": {"__value__": "wrapped"}, "upload": "image"}})
    result = validate_prompt(registry, p)
    assert result.ok and result.prompt["16"]["inputs"]["text"] == "wrapped"
    assert p["16"]["inputs"]["text"] == {"__value__": "wrapped"}  # the caller's prompt is untouched


def test_cycles_are_refused(registry):
    p = prompt()
    p["20"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["21", 0], "conditioning_2": ["16", 0]}}
    p["21"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["20", 0], "conditioning_2": ["16", 0]}}
    p["3"]["inputs"]["positive"] = ["20", 0]
    result = validate_prompt(registry, p)
    assert not result.ok
    assert any(e["type"] == "dependency_cycle" for errs in result.node_errors.values() for e in errs["errors"])


def test_custom_validation_load_image_and_clip_type(registry):
    p = {"1": {"class_type": "LoadImage", "inputs": {"image": "absent.png"}},
         "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    error = only_error(validate_prompt(registry, p), "1")
    assert error == {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                     "details": "image - Invalid image file: absent.png", "extra_info": {"input_name": "image"}}
    p["1"]["inputs"]["image"] = "../../etc/passwd"
    assert only_error(validate_prompt(registry, p), "1")["type"] == "custom_validation_failed"
    p = prompt()
    p["16"]["inputs"]["clip"] = ["30", 0]
    p["30"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "flux"}}
    error = only_error(validate_prompt(registry, p), "30")
    assert error["type"] == "custom_validation_failed" and "type 'flux' is not supported" in error["details"]
    p["30"]["inputs"]["type"] = "sd3"
    assert validate_prompt(registry, p).ok
