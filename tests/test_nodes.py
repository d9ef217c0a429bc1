"""Node classes without ComfyUI: schemas are well-formed, and the parts that need no model behave (coefficients,
presets, input checks). Sampling itself runs in tests/test_comfyui_integration.py against a real server."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from qsched_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from qsched_pack.nodes import sampling
from qsched_pack.nodes.common import COEFFICIENTS, JAQ_SCORER, NodeInputError
from qsched_pack.qsched.coefficients import C_MAX, Coefficients, check_coefficient


def _refused(validate, **kwargs) -> str:
    """VALIDATE_INPUTS refuses by raising NodeInputError (ComfyUI 0.3.64 then reports it once, on the node; a
    returned message would be repeated once per input of the signature). Returns the message."""
    with pytest.raises(NodeInputError) as exc:
        validate(**kwargs)
    return str(exc.value)

SOCKET_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "SAMPLER", "SIGMAS", COEFFICIENTS,
                JAQ_SCORER}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
NODES = sorted(NODE_CLASS_MAPPINGS)


def test_expected_nodes_are_registered():
    assert {"QSchedCoefficients", "QSchedLoadPreset", "QSchedSavePreset", "QSchedSampler", "QSchedScheduler",
            "QSchedKSampler", "QSchedCheckpointLoader", "QSchedDiffusionModelLoader",
            "QSchedQuantizeModel"} <= set(NODES)
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("name", NODES)
def test_schema_is_well_formed(name, folder_paths):
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
        all_inputs = {**it["required"], **it.get("optional", {}), **it.get("hidden", {})}
        assert set(vparams) <= set(all_inputs), set(vparams) - set(all_inputs)
        # a linked input arrives as None (its value is unknown at queue time); an unconnected optional socket input
        # does not arrive at all, so its default may be a marker for "not connected" (Calibrate's reference_model)
        for pname, p in vparams.items():
            kind = it.get("optional", {}).get(pname, (None,))[0]
            socket_only = isinstance(kind, str) and kind in SOCKET_TYPES
            assert p.default is None or socket_only, f"{name}.{pname}: a linked input arrives as None: default None"


def test_coefficient_sliders_reach_the_paper_range_start_at_identity_and_stay_valid():
    from qsched_pack.calibration.search import DEFAULT_RANGE

    req = sampling.QSchedCoefficients.INPUT_TYPES()["required"]
    names = ("c_x_start", "c_x_end", "c_eps_start", "c_eps_end")
    for name in names:
        kind, opts = req[name]
        assert kind == "FLOAT" and opts["default"] == 1.0, name  # untouched sliders = the stock sampler
        assert opts["min"] <= DEFAULT_RANGE[0] and opts["max"] >= DEFAULT_RANGE[1], name  # the paper's [0.8, 1.2]
        assert "display" not in opts and opts["step"] == 0.001, name  # no slider squeezing 0.8-1.2
        assert (opts["min"], opts["max"]) == (0.001, C_MAX), name  # the library's whole range
        check_coefficient(opts["min"], name)
    node = sampling.QSchedCoefficients()
    for end in ("min", "max"):  # every slider position is a coefficient the library accepts
        c, _, _ = node.build(4, *(req[n][1][end] for n in names))
        assert c.c_x[0] == req["c_x_start"][1][end] and c.c_eps[-1] == req["c_eps_end"][1][end]
    assert node.build(4, *(req[n][1]["default"] for n in names))[0].is_identity


def test_names_and_order_follow_core_ksampler():
    """Point 7: the inputs core's KSampler has carry its names, in its order; eta says which samplers use it."""
    core = json.loads((Path(__file__).resolve().parent / "data" / "object_info_core.json").read_text())["KSampler"]
    core_widgets = [n for n in core["input_order"]["required"] if n in ("seed", "steps", "cfg", "sampler_name",
                                                                           "scheduler", "denoise")]
    ours = list(sampling.QSchedKSampler.INPUT_TYPES()["required"])
    assert [n for n in ours if n in core_widgets] == core_widgets
    assert list(sampling.QSchedSampler.INPUT_TYPES()["required"]) == ["sampler_name", "eta"]
    from qsched_pack.nodes import calibration

    cal = calibration.QSchedCalibrate.INPUT_TYPES()["required"]
    assert "sampler_name" in cal and "scheduler" in cal and "sampler" not in cal and "schedule" not in cal
    # one kind of name per list: ComfyUI's schedulers on KSampler / Calibrate, the families on Q-Sched Scheduler
    assert sampling.QSchedKSampler.INPUT_TYPES()["required"]["scheduler"][0] == list(sampling.COMFY_SCHEDULERS)
    assert cal["scheduler"][0] == list(sampling.COMFY_SCHEDULERS)
    # ... and on Q-Sched Scheduler the input is called "family": "scheduler" always means ComfyUI's list
    assert sampling.QSchedScheduler.INPUT_TYPES()["required"]["family"][0] == list(sampling.FAMILY_SCHEDULES)
    assert "scheduler" not in sampling.QSchedScheduler.INPUT_TYPES()["required"]
    assert not set(sampling.COMFY_SCHEDULERS) & set(sampling.FAMILY_SCHEDULES)
    for cls in (sampling.QSchedKSampler, sampling.QSchedSampler, calibration.QSchedCalibrate):
        tip = cls.INPUT_TYPES()["required"]["eta"][1]["tooltip"]
        assert tip.startswith("Used only by euler_ancestral") and "ignore" in tip


def test_coefficients_node_ramp_and_override():
    c, steps, summary = sampling.QSchedCoefficients().build(4, 0.9, 1.0, 1.2, 1.0)
    assert steps == 4  # the 'steps' output (same slot as Q-Sched Load Preset's)
    assert isinstance(c, Coefficients)
    assert c.c_x == pytest.approx((0.9, 0.9333333, 0.9666667, 1.0))
    assert c.c_eps == pytest.approx((1.2, 1.1333333, 1.0666667, 1.0))
    assert "c_eps" in summary and "4 steps" in summary
    c, _, _ = sampling.QSchedCoefficients().build(4, 0.9, 1.0, 1.2, 1.0, c_x_override="1, 0.99; 0.98 0.97")
    assert c.c_x == (1.0, 0.99, 0.98, 0.97) and c.c_eps[0] == 1.2
    c, _, _ = sampling.QSchedCoefficients().build(3, 1.0, 1.0, 1.0, 1.0, c_eps_override="1.05")
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
    msg = _refused(v, steps=4, c_x_override="1, 2, three")
    assert "c_x_override" in msg and "three" in msg
    msg = _refused(v, steps=4, c_eps_override="1, 1, 1")
    assert "c_eps_override" in msg and "3 values" in msg
    msg = _refused(v, steps=101)
    assert "steps" in msg


def _write_preset(folder_paths, name, text):
    from qsched_pack.nodes.common import register_qsched_folder

    register_qsched_folder()
    d = folder_paths.get_folder_paths("qsched")[0]
    import os

    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        f.write(text)


def test_presets_round_trip(folder_paths):
    c = Coefficients.ramp(4, 0.95, 1.0, 1.05, 1.0)
    text, = sampling.QSchedSavePreset().save(c, "sdxl/turbo_w4a8", True)["ui"]["text"]
    assert "saved" in text
    assert sampling.QSchedLoadPreset.INPUT_TYPES()["required"]["preset"][0] == ["sdxl/turbo_w4a8.json"]
    assert sampling.QSchedLoadPreset.VALIDATE_INPUTS(preset="sdxl/turbo_w4a8.json") is True
    out = sampling.QSchedLoadPreset().load("sdxl/turbo_w4a8.json")
    loaded, steps, summary = out["result"]
    assert out["ui"]["text"] == [summary]  # shown on the node
    assert loaded == c and steps == 4 and "c_x" in summary
    with pytest.raises(NodeInputError, match="input 'overwrite'"):
        sampling.QSchedSavePreset().save(c, "sdxl/turbo_w4a8", False)


def test_preset_list_shows_only_json(folder_paths):
    _write_preset(folder_paths, "a.json", Coefficients.identity(2).to_json())
    _write_preset(folder_paths, "weights.pt", "")
    assert sampling.QSchedLoadPreset.INPUT_TYPES()["required"]["preset"][0] == ["a.json"]


@pytest.mark.parametrize("content, expected", [
    ('{"c_x": [1.0, 0.9], "c_eps": [1.0]}', "same length"),
    ("not json", "not valid JSON"),
    ('{"c_x": [1.0], "c_eps": [NaN]}', "NaN"),
    ('{"c_x": [1.0], "c_eps": [1.0], "extra": 1}', "unknown preset field"),
])
def test_malformed_preset_is_reported_on_the_preset_input(folder_paths, content, expected):
    _write_preset(folder_paths, "bad.json", content)
    msg = _refused(sampling.QSchedLoadPreset.VALIDATE_INPUTS, preset="bad.json")
    assert "input 'preset'" in msg and expected in msg, msg
    with pytest.raises(NodeInputError, match=expected):
        sampling.QSchedLoadPreset().load("bad.json")


def test_missing_preset_is_reported(folder_paths):
    msg = _refused(sampling.QSchedLoadPreset.VALIDATE_INPUTS, preset="gone.json")
    assert "input 'preset'" in msg and "not found" in msg
    msg = _refused(sampling.QSchedLoadPreset.VALIDATE_INPUTS, preset="weights.pt")
    assert ".json" in msg


@pytest.mark.parametrize("name", ["", "  ", "../escape", "a/../b", "bad name!"])
def test_save_preset_rejects_bad_names(name, folder_paths):
    msg = _refused(sampling.QSchedSavePreset.VALIDATE_INPUTS, name=name)
    assert "input 'name'" in msg
    with pytest.raises(NodeInputError, match="input 'name'"):
        sampling.QSchedSavePreset().save(Coefficients.identity(1), name, True)


def test_save_preset_checks_its_coefficients(folder_paths):
    with pytest.raises(NodeInputError, match="input 'coefficients'"):
        sampling.QSchedSavePreset().save({"c_x": [1.0]}, "x", True)


def test_loader_precision_and_backend_errors_name_the_input():
    from qsched_pack.nodes import loaders

    q = loaders.QSchedQuantizeModel()
    with pytest.raises(NodeInputError, match="input 'precision'"):
        q.quantize(object(), "w3a3", "auto")
    with pytest.raises(NodeInputError, match="input 'backend'"):
        q.quantize(object(), "w4a8", "cuda-magic")
    with pytest.raises(NodeInputError, match="input 'backend'"):
        loaders.QSchedDiffusionModelLoader()._check("w4a8", "bitsandbytes")
    assert loaders.resolve_precision("w4a8") == "w4a8" and "w8a8-fp8" in loaders.QUANT_PRECISIONS


def test_loader_combos_list_model_folders(folder_paths, tmp_path):
    from qsched_pack.nodes import loaders

    ck = tmp_path / "models" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "sd_xl_turbo_1.0_fp16.safetensors").write_bytes(b"")
    req = loaders.QSchedCheckpointLoader.INPUT_TYPES()["required"]
    assert req["ckpt_name"][0] == ["sd_xl_turbo_1.0_fp16.safetensors"]
    assert req["precision"][0] == list(loaders.PRECISIONS) and req["precision"][1]["default"] == "w4a8"
    with pytest.raises(NodeInputError, match="input 'unet_name'.*not found"):
        loaders.QSchedDiffusionModelLoader().load("flux1-schnell.safetensors", "w4a8", "auto")


def test_save_quantized_refuses_paths_and_existing_files(folder_paths, tmp_path):  # noqa: F811
    from qsched_pack.nodes import loaders

    dm = tmp_path / "models" / "diffusion_models"
    dm.mkdir(parents=True, exist_ok=True)
    (dm / "taken.safetensors").write_bytes(b"x")
    node = loaders.QSchedSaveQuantizedModel()
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(NodeInputError, match="input 'filename'"):
            node.save(object(), bad, False)
    with pytest.raises(NodeInputError, match="input 'filename'.*exists"):
        node.save(object(), "taken", False)
    with pytest.raises(NodeInputError, match="input 'model'.*no Q-Sched quantized layers"):
        node.save(_FakePatcher(), "new", False)
    assert (dm / "taken.safetensors").read_bytes() == b"x" and not (dm / "new.safetensors").exists()


class _FakePatcher:
    class model:  # noqa: N801
        diffusion_model = torch.nn.Sequential(torch.nn.Linear(2, 2))


def test_help_pages_exist_for_every_node(folder_paths):
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "web" / "docs"
    for name in NODES:
        page = docs / name / "en.md"  # the frontend asks for docs/<node>/<locale>.md first
        assert page.is_file(), page
        text = page.read_text()
        assert text.startswith("# ") and NODE_DISPLAY_NAME_MAPPINGS[name] in text.splitlines()[0]
        it = NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        for inp in list(it["required"]) + list(it.get("optional", {})):
            assert f"`{inp}`" in text, f"{page.name} does not document {inp}"


def test_preset_json_format_is_the_core_format(folder_paths):
    c = Coefficients([0.9, 1.0], [1.1, 1.0])
    sampling.QSchedSavePreset().save(c, "fmt", True)
    d = json.loads(open(folder_paths.get_full_path("qsched", "fmt.json")).read())
    assert d["format"] == "qsched-coefficients" and d["c_x"] == [0.9, 1.0]


# ---- JAQ nodes ---------------------------------------------------------------------------------------------------
def test_errors_name_the_node_by_the_display_name_it_registers():
    from qsched_pack.nodes import calibration, scoring

    assert {"QSchedJAQLoader", "QSchedJAQScore", "QSchedCalibrate"} <= set(NODES)
    assert len(set(NODE_DISPLAY_NAME_MAPPINGS.values())) == len(NODE_DISPLAY_NAME_MAPPINGS)
    cases = {"QSchedCoefficients": lambda: sampling.QSchedCoefficients().build(0, 1.0, 1.0, 1.0, 1.0),
             "QSchedJAQScore": lambda: scoring.QSchedJAQScore().score(None, object(), "a"),
             "QSchedCalibrate": lambda: calibration.check_settings(steps=0)}
    for key, call in cases.items():
        with pytest.raises(NodeInputError) as exc:
            call()
        assert exc.value.node == NODE_DISPLAY_NAME_MAPPINGS[key] == NODE_CLASS_MAPPINGS[key].DISPLAY_NAME, key
    assert calibration.QSchedCalibrate.OUTPUT_NODE  # it writes a preset even with no output connected


@pytest.fixture(scope="module")
def tiny_scorer_files(tmp_path_factory):
    from jaq_fixtures import save_hf_clip, save_openai_torchscript

    d = tmp_path_factory.mktemp("scorers")
    save_openai_torchscript(d / "RN50.pt", "rn", seed=1)
    save_openai_torchscript(d / "ViT-L-14.pt", "vit", seed=3)
    save_hf_clip(d / "clip-vit-large-patch14", seed=8)
    return d


def _qsched_dir(folder_paths):
    from pathlib import Path

    from qsched_pack.nodes.common import register_qsched_folder

    register_qsched_folder()
    d = Path(folder_paths.get_folder_paths("qsched")[0])
    d.mkdir(parents=True, exist_ok=True)
    return d


def _install(files, folder_paths, names=("RN50.pt", "ViT-L-14.pt", "clip-vit-large-patch14")):
    import shutil

    d = _qsched_dir(folder_paths)
    for n in names:
        src = files / n
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / n)
    return d


def test_jaq_loader_lists_weight_files_not_presets(folder_paths, tiny_scorer_files):
    from qsched_pack.nodes import scoring

    d = _install(tiny_scorer_files, folder_paths)
    (d / "a_preset.json").write_text("{}")
    (d / "sub").mkdir()
    (d / "sub" / "HPS_v2.1_compressed.pt").write_bytes(b"")
    choices = scoring.QSchedJAQLoader.INPUT_TYPES()["required"]["tc_weights"][0]
    assert choices == ["auto", "RN50.pt", "ViT-L-14.pt", "clip-vit-large-patch14/", "sub/HPS_v2.1_compressed.pt"]


def test_jaq_loader_missing_weights_name_the_input_at_queue_time(folder_paths, tiny_scorer_files):
    from qsched_pack.nodes import scoring

    v = scoring.QSchedJAQLoader.VALIDATE_INPUTS
    msg = _refused(v, preset="clip", tc_weights="auto", iq_weights="auto")
    assert "input 'tc_weights'" in msg and "ViT-L-14.pt" in msg and "openai/CLIP" in msg
    _install(tiny_scorer_files, folder_paths, names=("ViT-L-14.pt",))
    msg = _refused(v, preset="clip", tc_weights="auto", iq_weights="auto")
    assert "input 'iq_weights'" in msg and "RN50.pt" in msg
    msg = _refused(v, preset="clip", tc_weights="gone.pt", iq_weights="auto")
    assert "input 'tc_weights'" in msg and "gone.pt" in msg
    msg = _refused(v, preset="best", tc_weights="auto", iq_weights="auto")
    assert "input 'preset'" in msg
    _install(tiny_scorer_files, folder_paths, names=("RN50.pt",))
    assert v(preset="clip", tc_weights="auto", iq_weights="auto") is True
    assert v(preset="clip", tc_weights=None, iq_weights=None) is True  # linked: checked at run time


def test_jaq_loader_refuses_a_file_of_the_wrong_architecture(folder_paths, tiny_scorer_files):
    from qsched_pack.nodes import scoring

    _install(tiny_scorer_files, folder_paths)
    with pytest.raises(NodeInputError, match="input 'iq_weights'.*ViT") as exc:
        scoring.load_jaq("clip", 2.0, "auto", "ViT-L-14.pt", device="cpu")
    assert exc.value.input_name == "iq_weights"
    with pytest.raises(NodeInputError, match="input 'dtype'"):
        scoring.load_jaq("clip", 2.0, "auto", "auto", device="cpu", dtype="float16")
    with pytest.raises(NodeInputError, match="input 'k'"):
        scoring.load_jaq("clip", float("inf"), "auto", "auto", device="cpu")


@pytest.mark.parametrize("tc_choice", ["auto", "clip-vit-large-patch14/"])
def test_jaq_score_node_equals_the_library(folder_paths, tiny_scorer_files, tc_choice):
    from jaq_fixtures import planted_images

    from qsched_pack.calibration.jaq import JAQ
    from qsched_pack.nodes import scoring

    d = _install(tiny_scorer_files, folder_paths)
    out = scoring.QSchedJAQLoader().load("clip", 1.5, tc_choice, "auto", "cpu", "auto")
    scorer, summary = out["result"]
    tc_file = "ViT-L-14.pt" if tc_choice == "auto" else "clip-vit-large-patch14"
    assert scorer.config["weights"] == {"clipscore": tc_file, "clipiqa": "RN50.pt"}
    assert scorer.config["k"] == 1.5 and len(scorer.config["weights_sha256"]["clipscore"]) == 64
    assert tc_file in summary and out["ui"]["text"] == [summary]
    imgs = planted_images(3, 48, 64, seed=5)
    prompts = ["a red car", "two cats", "a blue lake"]
    res = scoring.QSchedJAQScore().score(imgs, scorer, "\n".join(prompts[:1] + ["# note"] + prompts[1:]))
    mean, report = res["result"]
    want = JAQ(preset="clip", k=1.5, device="cpu",
               weights={"clipscore": d / tc_file, "clipiqa": d / "RN50.pt"}).score(imgs, prompts)
    assert mean == pytest.approx(float(want.mean()), rel=1e-6)
    assert res["ui"]["text"] == [report]
    lines = report.splitlines()
    assert lines[1].startswith("image 1: JAQ=") and "two cats" in lines[2] and lines[-1].startswith("mean JAQ over 3")
    for i, line in enumerate(lines[1:4]):
        assert float(line.split("JAQ=")[1].split()[0]) == pytest.approx(float(want[i]), rel=1e-4)
    mean_one, _ = scoring.QSchedJAQScore().score(imgs, scorer, "a red car")["result"]  # one prompt for all
    assert mean_one == pytest.approx(float(JAQ(preset="clip", k=1.5, device="cpu", weights={
        "clipscore": d / tc_file, "clipiqa": d / "RN50.pt"}).score(imgs, "a red car").mean()), rel=1e-6)


def test_jaq_score_errors_name_the_input(folder_paths, tiny_scorer_files):
    from jaq_fixtures import planted_images

    from qsched_pack.nodes import scoring

    _install(tiny_scorer_files, folder_paths)
    scorer = scoring.load_jaq("clip", 2.0, "auto", "auto", device="cpu")
    imgs = planted_images(2, 64, 64)
    node = scoring.QSchedJAQScore()
    with pytest.raises(NodeInputError, match="input 'prompts'.*3 prompt lines for 2 images"):
        node.score(imgs, scorer, "a\nb\nc")
    with pytest.raises(NodeInputError, match="input 'prompts'.*is empty"):
        node.score(imgs, scorer, " \n# only a comment\n")
    assert "input 'prompts'" in _refused(scoring.QSchedJAQScore.VALIDATE_INPUTS, prompts="")
    assert scoring.QSchedJAQScore.VALIDATE_INPUTS(prompts=None) is True
    with pytest.raises(NodeInputError, match="input 'images'.*0..1"):
        node.score(imgs * 255, scorer, "a")
    with pytest.raises(NodeInputError, match="input 'images'.*32"):
        node.score(planted_images(2, 16, 16), scorer, "a")
    with pytest.raises(NodeInputError, match="input 'scorer'"):
        node.score(imgs, object(), "a")


# ---- calibration node --------------------------------------------------------------------------------------------
GOOD = dict(prompts="a\nb", steps=4, space="start", strategy="pattern", range_min=0.8, range_max=1.2, points=11,
            budget=100, base_seed=42, width=512, height=512, batch=4, preset_name="x")


def test_calibrate_default_prompts_are_the_20_calibration_prompts():
    from qsched_pack.calibration.prompts import default_prompts
    from qsched_pack.nodes import calibration, scoring

    spec = calibration.QSchedCalibrate.INPUT_TYPES()["required"]["prompts"]
    assert spec[1]["multiline"] is True
    assert scoring.parse_prompt_lines(spec[1]["default"], "n") == default_prompts() and len(default_prompts()) == 20


@pytest.mark.parametrize("change, input_name, text", [
    (dict(prompts="\n   \n# just a comment"), "prompts", "is empty"),
    (dict(strategy="grid", points=5, budget=49), "budget", "25 points (5^2 grid) x 2 prompts = 50 images"),
    (dict(strategy="grid", points=4, budget=33), "budget", "17 points (4^2 grid + identity) x 2 prompts = 34"),
    (dict(strategy="zoom", budget=10), "budget", "needs at least 26 points"),
    (dict(range_min=1.2, range_max=0.8), "range_min", "must be smaller than range_max"),
    (dict(range_min=1.0, range_max=1.0), "range_min", "must be smaller than range_max"),
    (dict(range_max=11.0), "range_max", "(0, 10]"),
    (dict(points=1), "points", "[2, 101]"),
    (dict(budget=0), "budget", "[1, 10000000]"),
    (dict(width=520), "width", "multiple of 16"),
    (dict(height=32), "height", "[64, 4096]"),
    (dict(batch=0), "batch", "[1, 64]"),
    (dict(space="start_end", steps=1), "space", "steps >= 2"),
    (dict(space="cube"), "space", "not one of"),
    (dict(strategy="random"), "strategy", "not one of"),
    (dict(preset_name="../escape"), "preset_name", "must be a name inside the folder"),
    (dict(preset_name=""), "preset_name", "is empty"),
    (dict(base_seed=-1), "base_seed", "[0, 4294967295]"),
])
def test_calibrate_bad_settings_name_the_input(change, input_name, text, folder_paths):
    from qsched_pack.nodes import calibration

    with pytest.raises(NodeInputError) as exc:
        calibration.check_settings(**{**GOOD, **change})
    assert exc.value.input_name == input_name and text in str(exc.value), str(exc.value)
    msg = _refused(calibration.QSchedCalibrate.VALIDATE_INPUTS, **{**GOOD, **change})
    assert msg.startswith(f"Q-Sched Calibrate: input '{input_name}'") and text in msg


def test_calibrate_validation_accepts_good_and_linked_settings(folder_paths):
    from qsched_pack.nodes import calibration

    v = calibration.QSchedCalibrate.VALIDATE_INPUTS
    assert v(**GOOD) is True
    assert v(**{**GOOD, "strategy": "grid", "points": 5, "budget": 50}) is True  # exactly fits
    assert "input 'budget'" in _refused(v, **{**GOOD, "strategy": "grid", "points": 5, "budget": 49})
    assert v(**{**GOOD, "budget": None, "strategy": "grid", "points": 50}) is True  # budget linked: run-time check
    assert v(**{k: None for k in GOOD}) is True
    assert calibration.check_settings(**GOOD) == ["a", "b"]


TEN = "\n".join("abcdefghij")


@pytest.mark.parametrize("extra, input_name, text", [
    (dict(objective="match full precision"), "reference_model", "connect the MODEL you quantized"),
    (dict(objective="hybrid", reference_model=None), "scorer", "connect a Q-Sched JAQ Loader"),
    (dict(objective="hybrid", scorer=None), "reference_model", "objective 'hybrid'"),
    (dict(objective="JAQ (paper)", reference_model=None), "scorer", "or choose 'match full precision'"),
    (dict(objective="auto"), "reference_model", "nothing to calibrate against"),
    (dict(objective="fit it", scorer=None), "objective", "not one of"),
    (dict(objective="match full precision", reference_model=None, prompts="a\nb\nc"), "prompts",
     "at least 10 prompts"),
])
def test_calibrate_objective_needs_its_inputs_at_queue_time(extra, input_name, text, folder_paths):
    """ComfyUI hands VALIDATE_INPUTS a linked input as None and leaves an unconnected optional one out."""
    from qsched_pack.nodes import calibration

    msg = _refused(calibration.QSchedCalibrate.VALIDATE_INPUTS, **{**GOOD, "prompts": TEN, **extra})
    assert msg.startswith(f"Q-Sched Calibrate: input '{input_name}'") and text in msg, msg


def test_calibrate_objective_accepts_what_it_needs(folder_paths):
    from qsched_pack.nodes import calibration

    v = calibration.QSchedCalibrate.VALIDATE_INPUTS
    good = {**GOOD, "prompts": TEN}
    assert v(**good, reference_model=None) is True  # auto -> match full precision
    assert v(**good, scorer=None) is True  # auto -> JAQ
    assert v(**good, objective="hybrid", scorer=None, reference_model=None) is True
    # no search for 'match full precision': a grid budget that could never fit is not its concern
    assert v(**{**good, "strategy": "grid", "points": 50, "budget": 1}, reference_model=None,
             objective="match full precision") is True
    assert "input 'budget'" in _refused(v, **{**good, "strategy": "grid", "points": 50, "budget": 1}, scorer=None)
    assert v(**good, objective=None) is True  # a linked objective: checked when the node runs
    res = calibration.resolve_objective
    assert (res("auto", True, False), res("auto", False, True), res("auto", None, True)) == ("reference", "jaq", None)


def test_record_key_follows_every_part_of_the_fingerprint():
    from qsched_pack.nodes.calibration import record_key

    base = dict(gen_fp={"model_hash": "m", "sampler": "euler"}, scorer_config={"preset": "clip", "k": 2.0},
                prompts=["a", "b"], seeds=[1, 2], space={"kind": "start", "steps": 4, "low": 0.8, "high": 1.2},
                strategy="pattern", points=11)
    key = record_key(**base)
    assert key == record_key(**json.loads(json.dumps(base)))  # stable across processes (plain JSON)
    changes = [("gen_fp", {"model_hash": "m2", "sampler": "euler"}), ("scorer_config", {"preset": "clip", "k": 3.0}),
               ("prompts", ["a", "c"]), ("seeds", [1, 3]), ("space", {**base["space"], "high": 1.3}),
               ("strategy", "zoom"), ("points", 9)]
    keys = {record_key(**{**base, k: v}) for k, v in changes}
    assert len(keys) == len(changes) and key not in keys
    assert key == record_key(**base, objective="jaq", reference_fp={"model_hash": "fp"})  # JAQ records keep resuming
    hybrid = record_key(**base, objective="hybrid", reference_fp={"model_hash": "fp"})
    assert hybrid not in keys | {key} and hybrid != record_key(**base, objective="hybrid",
                                                               reference_fp={"model_hash": "fp2"})


def test_module_digest_sees_weights_and_patch_backups():
    import torch

    from qsched_pack.nodes.comfy_generator import module_digest

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 3))
    d0 = module_digest(m)
    assert d0 == module_digest(m) and len(d0) == 64
    original = m[1].weight.detach().clone()
    with torch.no_grad():
        m[1].weight[0, 0] += 1.0  # one of the sampled values (the first)
    assert module_digest(m) != d0
    backup = {"dm.1.weight": type("B", (), {"weight": original})()}  # as ModelPatcher.backup holds it
    assert module_digest(m, backup, "dm.") == d0  # a model patched in place digests as its original


def test_prompts_of_equal_shape_share_a_batch_in_prompt_order():
    import torch

    from qsched_pack.nodes.comfy_generator import _batchable, _concat

    def cond(v, n=77):
        return [[torch.full((1, n, 8), float(v)), {"pooled_output": torch.full((1, 4), float(v))}]]

    a, b, long = cond(1), cond(2), cond(3, 154)
    assert _batchable(a, b) and not _batchable(a, long)
    assert not _batchable(a, [[a[0][0], {}]])  # different keys
    (t, d), = _concat([a, b, a])
    assert t.shape == (3, 77, 8) and t[:, 0, 0].tolist() == [1.0, 2.0, 1.0]
    assert d["pooled_output"][:, 0].tolist() == [1.0, 2.0, 1.0]
    assert _concat([a]) is a


def test_qsched_folder_keeps_extra_model_paths_and_adds_the_default(folder_paths, tmp_path):
    """extra_model_paths.yaml may define `qsched:` before the pack loads: the default folder is still added."""
    from qsched_pack.nodes.common import register_qsched_folder

    folder_paths.folder_names_and_paths["qsched"] = ([str(tmp_path / "shared_presets")], set())
    register_qsched_folder()
    register_qsched_folder()
    assert folder_paths.get_folder_paths("qsched") == [str(tmp_path / "shared_presets"),
                                                        str(tmp_path / "models" / "qsched")]


def test_errors_name_each_node_as_displayed(folder_paths):  # noqa: F811
    """One node-name convention: every node name the node modules write is a display name, and a loader's error
    starts with its display name (``(quantized)`` included)."""
    import re

    from qsched_pack.nodes import loaders

    shown = set(NODE_DISPLAY_NAME_MAPPINGS.values())
    root = Path(__file__).resolve().parents[1] / "nodes"
    written = {m for f in root.glob("*.py") for m in re.findall(r'"(Q-Sched [A-Za-z ()]+)"', f.read_text())}
    assert written and written <= shown, sorted(written - shown)
    with pytest.raises(NodeInputError) as exc:
        loaders.QSchedDiffusionModelLoader().load("missing.safetensors", "w4a8", "auto")
    assert str(exc.value).startswith("Q-Sched Diffusion Model Loader (quantized): input 'unet_name'")
    with pytest.raises(NodeInputError) as exc:
        loaders.QSchedQuantizeModel().quantize(object(), "w9a9", "auto")
    assert str(exc.value).startswith("Q-Sched Quantize Model: input 'precision': 'w9a9' is not one of")
