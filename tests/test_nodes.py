"""Node classes without ComfyUI: schemas are well-formed, and the parts that need no model behave (coefficients,
presets, input checks). Sampling itself runs in tests/test_comfyui_integration.py against a real server."""

from __future__ import annotations

import inspect
import json

import pytest

from qsched_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from qsched_pack.nodes import sampling
from qsched_pack.nodes.common import COEFFICIENTS, NodeInputError
from qsched_pack.qsched.coefficients import Coefficients
from test_workflows import folder_paths  # noqa: F401  (fixture)

SOCKET_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "SAMPLER", "SIGMAS", COEFFICIENTS}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
NODES = sorted(NODE_CLASS_MAPPINGS)


def test_expected_nodes_are_registered():
    assert {"QSchedCoefficients", "QSchedLoadPreset", "QSchedSavePreset", "QSchedSampler", "QSchedScheduler",
            "QSchedKSampler", "QSchedCheckpointLoader", "QSchedDiffusionModelLoader",
            "QSchedQuantizeModel"} <= set(NODES)
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("name", NODES)
def test_schema_is_well_formed(name, folder_paths):  # noqa: F811
    cls = NODE_CLASS_MAPPINGS[name]
    assert NODE_DISPLAY_NAME_MAPPINGS[name].startswith("Q-Sched ")
    assert cls.CATEGORY.split("/")[0] in ("sampling", "loaders") and "/qsched" in cls.CATEGORY
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if hasattr(cls, attr):
            assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES), attr
    it = cls.INPUT_TYPES()
    assert set(it) <= {"required", "optional", "hidden"} and it["required"]
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for section in ("required", "optional"):
        for inp, spec in it.get(section, {}).items():
            assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (inp, spec)
            kind, opts = spec[0], (spec[1] if len(spec) == 2 else {})
            assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, f"{name}.{inp}: no tooltip"
            assert inp in params, f"{name}.{inp} is not a parameter of {cls.FUNCTION}"
            if section == "optional":
                assert params[inp].default is not inspect.Parameter.empty, f"{name}.{inp}: optional needs a default"
            if isinstance(kind, list):
                assert all(isinstance(o, str) for o in kind)
                if "default" in opts:
                    assert opts["default"] in kind
            else:
                assert kind in SOCKET_TYPES | WIDGET_TYPES, (inp, kind)
            if kind in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], (inp, opts)
    required_params = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty]
    assert set(required_params) <= set(it["required"])
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    if validate is not None:
        vparams = inspect.signature(validate).parameters
        assert not any(p.kind == p.VAR_KEYWORD for p in vparams.values()), "**kwargs would disable all built-in checks"
        all_inputs = {**it["required"], **it.get("optional", {})}
        assert set(vparams) <= set(all_inputs), set(vparams) - set(all_inputs)
        assert all(p.default is None for p in vparams.values()), "linked inputs arrive as missing: default None"


def test_coefficient_sliders():
    req = sampling.QSchedCoefficients.INPUT_TYPES()["required"]
    for name in ("c_x_start", "c_x_end", "c_eps_start", "c_eps_end"):
        kind, opts = req[name]
        assert kind == "FLOAT"
        assert (opts["min"], opts["max"], opts["step"], opts["default"], opts["display"]) == (0.5, 1.5, 0.001, 1.0, "slider")


def test_coefficients_node_ramp_and_override():
    c, summary = sampling.QSchedCoefficients().build(4, 0.9, 1.0, 1.2, 1.0)
    assert isinstance(c, Coefficients)
    assert c.c_x == pytest.approx((0.9, 0.9333333, 0.9666667, 1.0))
    assert c.c_eps == pytest.approx((1.2, 1.1333333, 1.0666667, 1.0))
    assert "c_eps" in summary and "4 steps" in summary
    c, _ = sampling.QSchedCoefficients().build(4, 0.9, 1.0, 1.2, 1.0, c_x_override="1, 0.99; 0.98 0.97")
    assert c.c_x == (1.0, 0.99, 0.98, 0.97) and c.c_eps[0] == 1.2
    c, _ = sampling.QSchedCoefficients().build(3, 1.0, 1.0, 1.0, 1.0, c_eps_override="1.05")
    assert c.c_eps == (1.05, 1.05, 1.05)
    assert sampling.QSchedCoefficients().build(2, 1.0, 1.0, 1.0, 1.0)[0].is_identity


@pytest.mark.parametrize("kwargs, input_name", [
    ({"c_x_override": "1, x, 1, 1"}, "c_x_override"),
    ({"c_eps_override": "1, 1"}, "c_eps_override"),
    ({"c_eps_override": "1, 1, 1, -2"}, "c_eps_override"),
    ({"c_x_start": float("nan")}, "c_x_start"),
    ({"steps": 0}, "steps"),
])
def test_coefficients_node_errors_name_the_input(kwargs, input_name):
    args = {"steps": 4, "c_x_start": 1.0, "c_x_end": 1.0, "c_eps_start": 1.0, "c_eps_end": 1.0, **kwargs}
    with pytest.raises(NodeInputError, match=f"input '{input_name}'") as exc:
        sampling.QSchedCoefficients().build(**args)
    assert exc.value.input_name == input_name


def test_coefficients_validate_inputs():
    v = sampling.QSchedCoefficients.VALIDATE_INPUTS
    assert v(steps=4, c_x_override="", c_eps_override="") is True
    assert v(steps=4, c_x_override="1,1,1,0.9") is True
    assert v(steps=None) is True  # steps linked from another node: checked at run time
    msg = v(steps=4, c_x_override="1, 2, three")
    assert isinstance(msg, str) and "c_x_override" in msg and "three" in msg
    msg = v(steps=4, c_eps_override="1, 1, 1")
    assert isinstance(msg, str) and "c_eps_override" in msg and "3 values" in msg
    msg = v(steps=101)
    assert isinstance(msg, str) and "steps" in msg


def _write_preset(folder_paths, name, text):  # noqa: F811
    from qsched_pack.nodes.common import register_qsched_folder

    register_qsched_folder()
    d = folder_paths.get_folder_paths("qsched")[0]
    import os

    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        f.write(text)


def test_presets_round_trip(folder_paths):  # noqa: F811
    c = Coefficients.ramp(4, 0.95, 1.0, 1.05, 1.0)
    text, = sampling.QSchedSavePreset().save(c, "sdxl/turbo_w4a8", True)["ui"]["text"]
    assert "saved" in text
    assert sampling.QSchedLoadPreset.INPUT_TYPES()["required"]["preset"][0] == ["sdxl/turbo_w4a8.json"]
    assert sampling.QSchedLoadPreset.VALIDATE_INPUTS(preset="sdxl/turbo_w4a8.json") is True
    loaded, steps, summary = sampling.QSchedLoadPreset().load("sdxl/turbo_w4a8.json")
    assert loaded == c and steps == 4 and "c_x" in summary
    with pytest.raises(NodeInputError, match="input 'overwrite'"):
        sampling.QSchedSavePreset().save(c, "sdxl/turbo_w4a8", False)


def test_preset_list_shows_only_json(folder_paths):  # noqa: F811
    _write_preset(folder_paths, "a.json", Coefficients.identity(2).to_json())
    _write_preset(folder_paths, "weights.pt", "")
    assert sampling.QSchedLoadPreset.INPUT_TYPES()["required"]["preset"][0] == ["a.json"]


@pytest.mark.parametrize("content, expected", [
    ('{"c_x": [1.0, 0.9], "c_eps": [1.0]}', "same length"),
    ("not json", "not valid JSON"),
    ('{"c_x": [1.0], "c_eps": [NaN]}', "NaN"),
    ('{"c_x": [1.0], "c_eps": [1.0], "extra": 1}', "unknown preset field"),
])
def test_malformed_preset_is_reported_on_the_preset_input(folder_paths, content, expected):  # noqa: F811
    _write_preset(folder_paths, "bad.json", content)
    msg = sampling.QSchedLoadPreset.VALIDATE_INPUTS(preset="bad.json")
    assert isinstance(msg, str) and "input 'preset'" in msg and expected in msg, msg
    with pytest.raises(NodeInputError, match=expected):
        sampling.QSchedLoadPreset().load("bad.json")


def test_missing_preset_is_reported(folder_paths):  # noqa: F811
    msg = sampling.QSchedLoadPreset.VALIDATE_INPUTS(preset="gone.json")
    assert isinstance(msg, str) and "input 'preset'" in msg and "not found" in msg
    msg = sampling.QSchedLoadPreset.VALIDATE_INPUTS(preset="weights.pt")
    assert isinstance(msg, str) and ".json" in msg


@pytest.mark.parametrize("name", ["", "  ", "../escape", "a/../b", "bad name!"])
def test_save_preset_rejects_bad_names(name, folder_paths):  # noqa: F811
    msg = sampling.QSchedSavePreset.VALIDATE_INPUTS(name=name)
    assert isinstance(msg, str) and "input 'name'" in msg
    with pytest.raises(NodeInputError, match="input 'name'"):
        sampling.QSchedSavePreset().save(Coefficients.identity(1), name, True)


def test_save_preset_checks_its_coefficients(folder_paths):  # noqa: F811
    with pytest.raises(NodeInputError, match="input 'coefficients'"):
        sampling.QSchedSavePreset().save({"c_x": [1.0]}, "x", True)


def test_loader_precision_and_backend_errors_name_the_input():
    from qsched_pack.nodes import loaders

    with pytest.raises(NodeInputError, match="input 'precision'"):
        loaders._quantize(object(), "w3a3", "auto", "Q-Sched Quantize Model")
    with pytest.raises(NodeInputError, match="input 'backend'"):
        loaders._quantize(object(), "w4a8", "cuda-magic", "Q-Sched Quantize Model")
    model = object()
    assert loaders._quantize(model, "fp16", "auto", "Q-Sched Quantize Model")[0] is model


def test_loader_combos_list_model_folders(folder_paths, tmp_path):  # noqa: F811
    from qsched_pack.nodes import loaders

    ck = tmp_path / "models" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "sd_xl_turbo_1.0_fp16.safetensors").write_bytes(b"")
    req = loaders.QSchedCheckpointLoader.INPUT_TYPES()["required"]
    assert req["ckpt_name"][0] == ["sd_xl_turbo_1.0_fp16.safetensors"]
    assert req["precision"][0] == list(loaders.PRECISIONS) and req["precision"][1]["default"] == "w4a8"
    with pytest.raises(NodeInputError, match="input 'unet_name'.*not found"):
        loaders._full_path("diffusion_models", "flux1-schnell.safetensors", "Q-Sched Diffusion Model Loader",
                           "unet_name")


def test_help_pages_exist_for_every_node(folder_paths):  # noqa: F811
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "web" / "docs"
    for name in NODES:
        page = docs / f"{name}.md"
        assert page.is_file(), page
        text = page.read_text()
        assert text.startswith("# ") and NODE_DISPLAY_NAME_MAPPINGS[name] in text.splitlines()[0]
        it = NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        for inp in list(it["required"]) + list(it.get("optional", {})):
            assert f"`{inp}`" in text, f"{page.name} does not document {inp}"


def test_preset_json_format_is_the_core_format(folder_paths):  # noqa: F811
    c = Coefficients([0.9, 1.0], [1.1, 1.0])
    sampling.QSchedSavePreset().save(c, "fmt", True)
    d = json.loads(open(folder_paths.get_full_path("qsched", "fmt.json")).read())
    assert d["format"] == "qsched-coefficients" and d["c_x"] == [0.9, 1.0]
