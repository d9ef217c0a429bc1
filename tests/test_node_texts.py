"""What the artist reads and is asked on the canvas, without ComfyUI: graph-wide steps check (on the node whose input
is wrong, at queue time), preset compatibility warnings, Calibrate's overwrite refusal and cost gate, plain words in
node texts, and workflows saved before inputs were added."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from node_texts import plain_words_problems
from qsched_pack.calibration.runner import ProgressInfo
from qsched_pack.nodes import calibration, graph, sampling
from qsched_pack.nodes.common import NodeInputError
from qsched_pack.qsched.coefficients import Coefficients
from test_families import USER_KEYS
from test_workflows import CORE, our_object_info, ui_to_api

REPO = Path(__file__).resolve().parents[1]
SAVED_EARLIER = Path(__file__).resolve().parent / "data" / "workflows_saved_earlier"


def _prompt(name: str, folder_paths, saved_earlier=False, path=None) -> dict:
    wf = json.loads((path or REPO / "workflows" / f"{name}.json").read_text())
    return ui_to_api(wf, {**CORE, **our_object_info()}, saved_earlier=saved_earlier)


def _id(prompt: dict, class_type: str) -> str:
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return nid


def _write_preset(folder_paths, name: str, c: Coefficients) -> None:
    folder = Path(folder_paths.get_folder_paths("qsched")[0])
    folder.mkdir(parents=True, exist_ok=True)
    c.save(str(folder / name))


# ---- steps: coefficients vs the sampler that uses them, on the node whose input is wrong ------------------------
@pytest.mark.parametrize("name", ["qsched_flux_schnell_w4a8", "qsched_sdxl_turbo_w4a8",
                                  "qsched_flux_schnell_w4a8_calibrate", "qsched_sdxl_turbo_w4a8_calibrate"])
def test_templates_have_no_steps_problem(name, folder_paths):
    assert graph.steps_problems(_prompt(name, folder_paths)) == {}


def test_flux_steps_mismatch_is_blamed_on_the_scheduler_with_the_fix(folder_paths):
    prompt = _prompt("qsched_flux_schnell_w4a8", folder_paths)
    sched, coef = _id(prompt, "QSchedScheduler"), _id(prompt, "QSchedCoefficients")
    assert graph.link(prompt[sched]["inputs"]["steps"]) == coef  # the template links them
    prompt[sched]["inputs"]["steps"] = 6  # the artist typed another count
    problems = graph.steps_problems(prompt)
    assert list(problems) == [sched]
    input_name, message = problems[sched]
    assert input_name == "steps"
    assert "runs 6 steps" in message and "for 4 steps" in message and f"Q-Sched Coefficients (#{coef})" in message
    assert "set steps to 4" in message and "connect" in message  # the fix, named
    # on queue: the handler puts it on that node, whose VALIDATE_INPUTS raises it (one message, this node, this input)
    data = graph.on_prompt({"prompt": prompt})
    assert prompt[sched]["inputs"][graph.GRAPH_CHECK]["input"] == "steps"
    with pytest.raises(NodeInputError, match=r"^Q-Sched Scheduler: input 'steps': runs 6 steps"):
        sampling.QSchedScheduler.VALIDATE_INPUTS(qsched_graph_check=prompt[sched]["inputs"][graph.GRAPH_CHECK])
    # fixed and queued again: the stale problem is gone
    prompt[sched]["inputs"]["steps"] = 4
    graph.on_prompt(data)
    assert graph.GRAPH_CHECK not in prompt[sched]["inputs"]
    assert sampling.QSchedScheduler.VALIDATE_INPUTS(qsched_graph_check=None) is True


def test_preset_with_other_steps_is_refused_on_load_preset(folder_paths):
    _write_preset(folder_paths, "six.json", Coefficients.ramp(6, 0.9, 1.0, 1.1, 1.0))
    prompt = _prompt("qsched_flux_schnell_w4a8", folder_paths)
    coef, sched, samp = (_id(prompt, t) for t in ("QSchedCoefficients", "QSchedScheduler", "QSchedSampler"))
    prompt[coef] = {"class_type": "QSchedLoadPreset", "inputs": {"preset": "six.json"}}
    prompt[sched]["inputs"]["steps"] = 4
    problems = graph.steps_problems(prompt)
    assert list(problems) == [coef], problems
    assert problems[coef][0] == "preset"
    assert "for 6 steps" in problems[coef][1] and "runs 4 steps" in problems[coef][1]
    # linked from the preset's own steps output: nothing to refuse
    prompt[sched]["inputs"]["steps"] = [coef, 1]
    assert graph.steps_problems(prompt) == {}
    del samp


def test_ksampler_steps_mismatch_is_caught_on_queue(folder_paths):
    prompt = _prompt("qsched_sdxl_turbo_w4a8", folder_paths)
    ks = _id(prompt, "QSchedKSampler")
    prompt[ks]["inputs"]["steps"] = 3
    assert graph.steps_problems(prompt) == {ks: ("steps", graph.steps_problems(prompt)[ks][1])}
    assert "runs 3 steps" in graph.steps_problems(prompt)[ks][1]


# ---- preset compatibility ---------------------------------------------------------------------------------------
def _safetensors_header(path: Path, keys, metadata=None) -> None:
    header = {k: {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]} for k in keys}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0\0")


CALIBRATED = {"family": "Flux", "quant": "w4a8", "sampler": "euler", "steps": 4,
              "sampling": {"sampler": "euler", "width": 1024, "height": 1024, "model_class": "Flux"},
              "jaq": {"weights": {"aqmap": ["ViT-B-16.pt", "ab" * 32]}},
              "scores": {"best": {"jaq": 0.61}, "identity": {"jaq": 0.58}}}


def test_load_preset_warns_once_naming_both_values(folder_paths):
    _safetensors_header(Path(folder_paths.get_folder_paths("diffusion_models")[0]) / "flux1-schnell.safetensors",
                        ["double_blocks.0.img_attn.qkv.weight"])
    _write_preset(folder_paths, "flux_cal.json", Coefficients.ramp(4, 0.96, 1.0, 1.04, 1.0).with_metadata(**CALIBRATED))
    prompt = _prompt("qsched_flux_schnell_w4a8", folder_paths)
    coef, loader, samp = (_id(prompt, t) for t in ("QSchedCoefficients", "QSchedDiffusionModelLoader",
                                                   "QSchedSampler"))
    prompt[coef] = {"class_type": "QSchedLoadPreset", "inputs": {"preset": "flux_cal.json"}}
    graph.on_prompt({"prompt": prompt})
    check = prompt[coef]["inputs"][graph.GRAPH_CHECK]
    assert len(check["uses"]) == 1
    assert {k: v for k, v in check["uses"][0].items() if k != "flow"} == {
        "node": f"Q-Sched Sampler (#{samp})", "sampler": "euler", "family": "flux", "file": "flux1-schnell.safetensors",
        "precision": "w4a8"}
    out = sampling.QSchedLoadPreset().load("flux_cal.json", qsched_graph_check=check)["ui"]["text"][0]
    assert "⚠" not in out  # made for exactly this
    prompt[loader]["inputs"]["precision"] = "w8a8"
    prompt[samp]["inputs"]["sampler_name"] = "euler_ancestral"
    graph.on_prompt({"prompt": prompt})
    check = prompt[coef]["inputs"][graph.GRAPH_CHECK]
    out = sampling.QSchedLoadPreset().load("flux_cal.json", qsched_graph_check=check)["ui"]["text"][0]
    warnings = [ln for ln in out.splitlines() if ln.startswith("⚠")]
    assert len(warnings) == 2, out
    assert any("precision w4a8" in w and "uses w8a8" in w for w in warnings), out
    assert any("sampler euler," in w and "uses euler_ancestral" in w for w in warnings), out
    assert plain_words_problems(out) == [], out


def test_reference_of_another_family_is_refused_on_queue(folder_paths):
    """The calibration template with a FLUX file as the reference of the SDXL checkpoint: the on_prompt handler
    reads both loaders' file headers and puts the problem on Calibrate, whose VALIDATE_INPUTS raises it naming
    reference_model; the shipped wiring (one file, Quantize Model) and a quantized reference are told apart."""
    _safetensors_header(Path(folder_paths.get_folder_paths("diffusion_models")[0]) / "flux1-schnell.safetensors",
                        ["double_blocks.0.img_attn.qkv.weight"])
    _safetensors_header(Path(folder_paths.get_folder_paths("checkpoints")[0]) / "sd_xl_turbo_1.0_fp16.safetensors",
                        ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight"])
    prompt = _prompt("qsched_sdxl_turbo_w4a8_calibrate", folder_paths)
    cal, loader = _id(prompt, "QSchedCalibrate"), _id(prompt, "QSchedCheckpointLoader")
    graph.on_prompt({"prompt": prompt})
    assert graph.GRAPH_CHECK not in prompt[cal]["inputs"]  # as shipped: the reference is the quantized model's source
    prompt["900"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-schnell.safetensors",
                                                            "weight_dtype": "default"}}
    prompt[cal]["inputs"]["reference_model"] = ["900", 0]
    graph.on_prompt({"prompt": prompt})
    check = prompt[cal]["inputs"][graph.GRAPH_CHECK]
    with pytest.raises(NodeInputError) as exc:
        calibration.QSchedCalibrate.VALIDATE_INPUTS(reference_model=None, qsched_graph_check=check)
    msg = str(exc.value)
    assert msg.startswith("Q-Sched Calibrate: input 'reference_model': is a FLUX model (flux1-schnell.safetensors)")
    assert "'model' is SDXL (sd_xl_turbo_1.0_fp16.safetensors)" in msg and plain_words_problems(msg) == [], msg
    prompt[cal]["inputs"]["reference_model"] = [loader, 0]
    prompt[loader]["inputs"]["precision"] = "w8a8"
    graph.on_prompt({"prompt": prompt})
    assert "is quantized (w8a8" in prompt[cal]["inputs"][graph.GRAPH_CHECK]["message"]


def test_family_from_file_and_from_preset_agree():
    flux = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]
    sdxl = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight"]
    sd15 = ["model.diffusion_model.input_blocks.0.0.weight"]
    assert [graph.family_of_keys(k) for k in (flux, sdxl, sd15, ["x"])] == ["flux", "sdxl", "sd1", None]
    assert [graph.family_of_name(n) for n in ("Flux", "FluxSchnell", "flux_schnell", "SDXL", "sdxl_turbo",
                                              "BaseModel", "SD3", "Wan22", "Chroma", "QwenImage", "HunyuanVideo",
                                              None)] == \
        ["flux", "flux", "flux", "sdxl", "sdxl", "sd1", "sd3", "wan", "chroma", "qwen_image", None, None]
    # one layout rule (qsched.quant.families): each family's users' keys, and ComfyUI's model class of that family
    for family, keys in USER_KEYS.items():
        assert graph.family_of_keys(keys) == (family if family != "sd_unet" else "sd1"), family
    for cls, family in (("Flux", "flux"), ("Chroma", "chroma"), ("SD3", "sd3"), ("SDXL", "sdxl"),
                        ("BaseModel", "sd1"), ("WAN22", "wan"), ("WAN21", "wan"), ("QwenImage", "qwen_image")):
        assert graph.family_of_name(cls) == family and family in graph.FAMILY_WORDS, cls
    assert graph.compat_warnings({"family": "Flux"}, [{"node": "n", "family": graph.family_of_keys(
        USER_KEYS["chroma"])}]) == ["calibrated for family FLUX, but n uses Chroma: the coefficients may not fit; "
                                    "calibrate for Chroma (or use a preset made for it)"]
    warn = graph.compat_warnings({"family": "SDXL"}, [{"node": "Q-Sched KSampler (#3)", "family": "sd1"}])
    assert warn == ["calibrated for family SDXL, but Q-Sched KSampler (#3) uses SD 1.x/2.x: the coefficients may "
                    "not fit; calibrate for SD 1.x/2.x (or use a preset made for it)"]


def test_preset_summary_is_plain_words():
    c = Coefficients.ramp(4, 0.96, 1.0, 1.04, 1.0).with_metadata(**CALIBRATED, model_hash="f" * 64)
    text = sampling.preset_summary(c)
    assert "calibrated for: FLUX, w4a8, euler, 1024x1024" in text
    assert "JAQ 0.6100 vs 0.5800 for the stock sampler (+0.0300)" in text
    assert plain_words_problems(text) == [], text


# ---- Calibrate: overwrite, cost gate --------------------------------------------------------------------------------
def test_calibrate_new_inputs_are_at_the_end_with_safe_defaults():
    required = calibration.QSchedCalibrate.INPUT_TYPES()["required"]
    assert list(required)[-2:] == ["overwrite", "max_minutes"]
    assert required["overwrite"][1]["default"] is False
    assert required["max_minutes"][1]["default"] == 30


def test_calibrate_refuses_to_overwrite_a_preset_it_did_not_make(tmp_path):
    path = tmp_path / "mine.json"
    calibration.check_overwrite(str(path), "abc123", False)  # no file: fine
    Coefficients.ramp(4, 0.9, 1.0, 1.1, 1.0).save(str(path))
    with pytest.raises(NodeInputError, match=r"input 'overwrite': the preset .*mine\.json already exists") as e:
        calibration.check_overwrite(str(path), "abc123", False)
    assert "turn overwrite on" in str(e.value).lower() and "preset_name" in str(e.value)
    calibration.check_overwrite(str(path), "abc123", True)
    Coefficients.ramp(4, 0.9, 1.0, 1.1, 1.0).with_metadata(record="abc123").save(str(path))
    calibration.check_overwrite(str(path), "abc123", False)  # its own result: rewriting gives the same file
    with pytest.raises(NodeInputError):
        calibration.check_overwrite(str(path), "other", False)


def _info(eta, cached=False, done=1, spent=20, total=29_282):
    return ProgressInfo(done, total // 20, spent, total, 0.5, 0.5, 10.0, eta, cached)


def test_cost_gate_stops_a_long_calibration_after_its_first_point():
    gate = calibration.CostGate(30)
    gate(_info(None, cached=True))  # points from the record say nothing about the speed
    with pytest.raises(NodeInputError, match=r"input 'max_minutes': this calibration needs about 84\.0 h more") as e:
        gate(_info(84 * 3600))
    msg = str(e.value)
    assert "29262 images" in msg and "max_minutes = 30" in msg and "set max_minutes to 5040 or more" in msg
    assert "1 point kept" in msg and gate.stopped
    assert plain_words_problems(msg) == [], msg


def test_cost_gate_lets_short_and_confirmed_runs_go():
    calibration.CostGate(30)(_info(29 * 60))
    calibration.CostGate(0)(_info(84 * 3600))  # 0 = no limit
    calibration.CostGate(5040)(_info(84 * 3600))  # confirmed by raising max_minutes
    gate = calibration.CostGate(30)
    gate(_info(10 * 60))
    gate(_info(84 * 3600))  # checked once, before the long part: a later, slower estimate does not stop it


# ---- plain words ----------------------------------------------------------------------------------------------------
def test_plain_words_check_catches_what_it_should():
    assert plain_words_problems("{'dequant': 45}") and plain_words_problems("sha " + "a" * 64)
    assert plain_words_problems("see clip/clip.py") and plain_words_problems("len(c_x) = 4")
    assert plain_words_problems("record: 1a2b3c4d5e6f7a8b9c0d.jsonl")
    assert plain_words_problems("record: 1a2b3c4d5e6f.jsonl; 4 steps; w4a8") == []


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises((NodeInputError, ValueError)) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_node_messages_are_plain_words(folder_paths):
    from qsched_pack.calibration.metrics.weights import SPECS
    from qsched_pack.qsched.quant import QuantSpec
    from qsched_pack.qsched.quant.swap import QuantReport

    texts = [
        _message(sampling.build_coefficients, 4, 1, 1, 1, 1, "1.0, abc"),
        _message(sampling.build_coefficients, 4, 1, 1, 1, 1, "1.0, 0"),
        _message(Coefficients.ramp(4, 1, 1).check_steps, 3, "input 'steps'"),
        _message(Coefficients.from_dict, {"c_x": [1, 1], "c_eps": [1, 1], "steps": 3}),
        _message(calibration.check_settings, range_min=1.2, range_max=0.8),
        str(QuantReport(QuantSpec.parse("w4a8"), "auto", "comfy (quantized while loading)",
                        {"a": "dequant", "b": "int8_mm"}, {"c": "kept"}, seconds=0.0,
                        native={"a": "float8_e4m3fn", "b": "int8_tensorwise"})),
        *(spec.source for spec in SPECS.values()),
    ]
    assert "value 2 of c_x_override" in texts[0]  # counted from 1, as the artist counts
    assert "range_min must be smaller than range_max" in texts[4]
    for text in texts:
        assert plain_words_problems(text) == [], text


# ---- workflows saved before the new inputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(SAVED_EARLIER.glob("*.json")), ids=lambda p: p.stem)
def test_workflows_saved_earlier_load_with_the_new_defaults(path, folder_paths):
    old = _prompt(path.stem, folder_paths, saved_earlier=True, path=path)
    new = _prompt(path.stem, folder_paths)
    if not path.stem.endswith("_calibrate"):  # the calibration templates were rewired (full-precision reference)
        assert old.keys() == new.keys()
        for nid in new:
            assert old[nid]["inputs"] == new[nid]["inputs"], (path.stem, new[nid]["class_type"])
    for nid, node in old.items():
        if node["class_type"] == "QSchedCalibrate":
            assert node["inputs"]["overwrite"] is False and node["inputs"]["max_minutes"] == 30
            # objective 'auto' with the JAQ Loader linked and no reference_model: the JAQ search it always was
            assert node["inputs"]["objective"] == "auto" and "reference_model" not in node["inputs"]
            linked = {k: None for k, v in node["inputs"].items() if isinstance(v, list) and k == "scorer"}
            assert calibration.QSchedCalibrate.VALIDATE_INPUTS(**linked, objective="auto", **{
                k: v for k, v in node["inputs"].items() if k in ("prompts", "steps", "space", "strategy",
                "range_min", "range_max", "points", "budget", "base_seed", "width", "height", "batch",
                "preset_name")}) is True
            assert calibration.resolve_objective("auto", False, True) == "jaq"
