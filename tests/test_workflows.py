"""The example workflows (UI format) reference only node types and inputs that exist, with in-range widget values.

Our nodes are checked against their classes, core nodes against tests/data/object_info_core.json (a recorded
``/object_info`` of ComfyUI v0.3.64; tests/test_comfyui_integration.py checks it still matches a live server).
No ComfyUI needed. ``ui_to_api`` is also what the integration test uses to queue the workflows.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
CORE = json.loads((Path(__file__).resolve().parent / "data" / "object_info_core.json").read_text())
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: Combo inputs whose options are the files in a model folder (they differ per install).
FILE_LIST_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name",
                    "lora_name", "preset"}


def is_widget(spec) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput", False)


def _opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def has_control_widget(name: str, spec) -> bool:
    """The frontend adds a "control after generate" widget (one extra widget value) when the spec asks for it, and
    -- legacy convention, comfyui-frontend 1.27 ``controlAfterGenerate = spec.control_after_generate ?? name in
    (seed, noise_seed)`` -- to every INT input named ``seed`` or ``noise_seed`` whose spec does not say."""
    flag = _opts(spec).get("control_after_generate")
    if flag is None:
        return spec[0] == "INT" and name in ("seed", "noise_seed")
    return bool(flag)


def ui_to_api(workflow: dict, object_info: dict, saved_earlier: bool = False) -> dict:
    """UI-format workflow -> API prompt, as the frontend does: widget values are positional in input order, with one
    extra frontend-only value after every widget with a control widget (``has_control_widget``); links override
    widgets. ``saved_earlier``: a workflow saved before inputs were added at the end has fewer values; the frontend
    then keeps the new widgets' defaults (comfyui-frontend 1.27 ``LGraphNode.configure`` sets widget i from
    ``widgets_values[i]`` while there is one)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        order = info["input_order"]["required"] + info["input_order"].get("optional", [])
        specs = {**info["input"]["required"], **info["input"].get("optional", {})}
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name in order:
            spec = specs[name]
            if is_widget(spec):
                if not values and saved_earlier and "default" in _opts(spec):
                    inputs[name] = _opts(spec)["default"]
                elif not values:
                    raise AssertionError(f"node {node['id']} ({node['type']}): no widget value left for {name!r}")
                else:
                    inputs[name] = values.pop(0)
                    if has_control_widget(name, spec):
                        values.pop(0)
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        if values:
            raise AssertionError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over: {values}")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def our_object_info() -> dict:
    """/object_info-like entries for the pack's nodes, built from the classes."""
    from qsched_pack.nodes import NODE_CLASS_MAPPINGS

    info = {}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        it = cls.INPUT_TYPES()
        info[name] = {"input": {k: it.get(k, {}) for k in ("required", "optional")},
                      "input_order": {k: list(it.get(k, {})) for k in ("required", "optional")},
                      "output": list(cls.RETURN_TYPES)}
    return info


@pytest.fixture()
def object_info(folder_paths):
    return {**CORE, **our_object_info()}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_sampling_workflows_for_both_families():
    names = {p.stem for p in WORKFLOWS}
    assert {"qsched_sdxl_turbo_w4a8", "qsched_flux_schnell_w4a8"} <= names


#: Words that belong in a negative prompt: a positive prompt made of them means the prompts are swapped.
NEGATIVE_WORDS = ("watermark", "blurry", "lowres", "low quality", "worst quality", "jpeg artifacts")


def _prompt_text(prompt: dict, ref, seen=()) -> str:
    """The text of the CLIPTextEncode that a conditioning input comes from (through guidance/conditioning nodes)."""
    node_id = ref[0]
    assert node_id not in seen, f"conditioning cycle at node {node_id}"
    node = prompt[node_id]
    if "text" in node["inputs"]:
        return node["inputs"]["text"]
    ups = [v for k, v in node["inputs"].items() if k in ("conditioning", "positive") and isinstance(v, list)]
    assert ups, f"node {node_id} ({node['class_type']}) is not a text encoder and has no conditioning input"
    return _prompt_text(prompt, ups[0], (*seen, node_id))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_positive_and_negative_prompts_are_not_swapped(path, object_info):
    """Every sampler/guider's positive conditioning is the subject prompt, never a negative-style prompt, and the
    negative one (where there is one) comes from another text node."""
    p = ui_to_api(_load(path), object_info)
    checked = 0
    for node in p.values():
        ins = node["inputs"]
        pos = ins.get("positive", ins.get("conditioning") if node["class_type"].endswith("Guider") else None)
        if not isinstance(pos, list):
            continue
        text = _prompt_text(p, pos).lower()
        assert text.strip() and not any(w in text for w in NEGATIVE_WORDS), (node["class_type"], text)
        if isinstance(ins.get("negative"), list):
            assert ins["negative"] != pos, node["class_type"]
        checked += 1
    sampling = any(n["class_type"] in ("QSchedKSampler", "KSampler", "SamplerCustomAdvanced") for n in p.values())
    assert checked or not sampling, f"{path.name}: a sampler whose conditioning was not traced"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_structure(path, object_info):
    wf = _load(path)
    assert wf.get("version") == 0.4 and {"nodes", "links", "last_node_id", "last_link_id"} <= set(wf)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and max(ids) <= wf["last_node_id"]
    assert max(link[0] for link in wf["links"]) <= wf["last_link_id"]
    by_id = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        assert n["type"] in object_info or n["type"] in VIRTUAL_NODES, f"unknown node type {n['type']!r}"
    assert any(n["type"] == "Note" and len(n["widgets_values"][0]) > 80 for n in wf["nodes"]), "needs explaining Notes"
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        s, d = by_id[src], by_id[dst]
        assert s["outputs"][src_slot]["type"] == typ and link_id in s["outputs"][src_slot]["links"]
        assert object_info[s["type"]]["output"][src_slot] == typ, (s["type"], src_slot, typ)
        inp = d["inputs"][dst_slot]
        assert inp["link"] == link_id
        specs = {**object_info[d["type"]]["input"]["required"], **object_info[d["type"]]["input"].get("optional", {})}
        assert inp["name"] in specs, f"{d['type']} has no input {inp['name']!r}"
        assert specs[inp["name"]][0] == typ, (d["type"], inp["name"], specs[inp["name"]][0], typ)
    for n in wf["nodes"]:
        if n["type"] in VIRTUAL_NODES:
            continue
        info = object_info[n["type"]]
        required = info["input"]["required"]
        connected = {i["name"] for i in n["inputs"] if i["link"] is not None}
        for name, spec in required.items():
            assert is_widget(spec) or name in connected, f"node {n['id']} {n['type']}: required {name!r} not connected"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_in_range(path, object_info):
    prompt = ui_to_api(_load(path), object_info)
    for nid, node in prompt.items():
        info = object_info[node["class_type"]]
        specs = {**info["input"]["required"], **info["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            spec = specs[name]
            if not is_widget(spec) or isinstance(value, list):
                continue
            kind, opts = spec[0], _opts(spec)
            where = f"node {nid} {node['class_type']}.{name}={value!r}"
            if isinstance(kind, list):
                if name not in FILE_LIST_INPUTS:
                    assert value in kind, where
                else:
                    assert isinstance(value, str) and value, where
            elif kind == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), where
                assert opts.get("min", value) <= value <= opts.get("max", value), where
            elif kind == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), where
                assert opts.get("min", value) <= value <= opts.get("max", value), where
            elif kind == "STRING":
                assert isinstance(value, str), where
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), where


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_our_nodes_accept_the_workflow_values(path, object_info, folder_paths):
    """VALIDATE_INPUTS of our nodes says yes, and coefficient steps equal the sampler's steps."""
    from qsched_pack.nodes import NODE_CLASS_MAPPINGS

    from qsched_pack.calibration.metrics import SPECS

    qsched = Path(folder_paths.get_folder_paths("qsched")[0])  # "auto" scorer weights must exist: empty stand-ins
    qsched.mkdir(parents=True, exist_ok=True)
    for spec in SPECS.values():
        (qsched / spec.filenames[0]).write_bytes(b"")
    prompt = ui_to_api(_load(path), object_info)
    steps = {}
    for nid, node in prompt.items():
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            continue
        validate = getattr(cls, "VALIDATE_INPUTS", None)
        if validate is not None:
            # as ComfyUI calls it: a linked input named in the signature arrives as None (unknown before the run)
            args = {k: None if isinstance(v, list) else v for k, v in node["inputs"].items()
                    if k in inspect.signature(validate).parameters}
            assert validate(**args) is True, (nid, node)
        if "steps" in node["inputs"]:
            steps[nid] = node["inputs"]["steps"]
    for nid, v in steps.items():  # a linked steps input takes the steps of the node it comes from
        while isinstance(v, list):
            v = prompt[v[0]]["inputs"]["steps"]
        steps[nid] = v
    split = [nid for nid, n in prompt.items() if n["class_type"] == "SplitSigmas"]
    if split:  # one schedule split between samplers (two experts): each part's coefficients have that part's steps
        assert _split_steps(prompt) == {k: v for k, v in steps.items() if prompt[k]["class_type"] == "QSchedCoefficients"}
        return
    assert len(set(steps.values())) == 1, f"steps differ between nodes: {steps}"


def _split_steps(prompt: dict) -> dict:
    """{Q-Sched Coefficients id: the steps of the SplitSigmas part its sampler runs} for every SamplerCustom whose
    sigmas come from a SplitSigmas of a BasicScheduler (high part: the split step; low part: the rest)."""
    out = {}
    for node in prompt.values():
        sig = node["inputs"].get("sigmas")
        if node["class_type"] != "SamplerCustom" or prompt[sig[0]]["class_type"] != "SplitSigmas":
            continue
        split = prompt[sig[0]]["inputs"]
        total = prompt[split["sigmas"][0]]["inputs"]["steps"]
        coeffs = prompt[node["inputs"]["sampler"][0]]["inputs"]["coefficients"][0]
        out[coeffs] = split["step"] if sig[1] == 0 else total - split["step"]
    return out


def _id_of(prompt: dict, class_type: str) -> str:
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return nid


def test_sdxl_turbo_workflow_settings(object_info):
    p = ui_to_api(_load(REPO / "workflows" / "qsched_sdxl_turbo_w4a8.json"), object_info)
    by_type = {v["class_type"]: v["inputs"] for v in p.values()}
    assert by_type["QSchedCheckpointLoader"]["precision"] == "w4a8"
    ks = by_type["QSchedKSampler"]
    assert (ks["sampler_name"], ks["scheduler"], ks["cfg"]) == ("euler_ancestral", "simple", 1.0)
    assert ks["steps"] == [_id_of(p, "QSchedCoefficients"), 1]  # steps come from the coefficients node
    assert isinstance(ks["coefficients"], list)
    lat = by_type["EmptyLatentImage"]
    assert (lat["width"], lat["height"]) == (512, 512)


def test_flux_schnell_workflow_settings(object_info):
    p = ui_to_api(_load(REPO / "workflows" / "qsched_flux_schnell_w4a8.json"), object_info)
    by_type = {v["class_type"]: v["inputs"] for v in p.values()}
    assert by_type["QSchedDiffusionModelLoader"]["precision"] == "w4a8"
    assert by_type["QSchedSampler"]["sampler_name"] == "euler"
    assert isinstance(by_type["QSchedSampler"]["coefficients"], list)
    assert by_type["QSchedScheduler"]["family"] == "flux_schnell"
    assert by_type["QSchedScheduler"]["steps"] == [_id_of(p, "QSchedCoefficients"), 1]
    lat = by_type["EmptySD3LatentImage"]
    assert (lat["width"], lat["height"]) == (1024, 1024)
    assert by_type["DualCLIPLoader"]["type"] == "flux"


def test_ui_to_api_rejects_missing_and_extra_widget_values(object_info):
    wf = _load(REPO / "workflows" / "qsched_sdxl_turbo_w4a8.json")
    node = next(n for n in wf["nodes"] if n["type"] == "EmptyLatentImage")
    node["widgets_values"].append(3)
    with pytest.raises(AssertionError, match="left over"):
        ui_to_api(wf, object_info)
    node["widgets_values"] = node["widgets_values"][:1]
    with pytest.raises(AssertionError, match="no widget value left"):
        ui_to_api(wf, object_info)


def test_there_are_calibration_workflows_for_both_families():
    names = {p.stem for p in WORKFLOWS}
    assert {"qsched_sdxl_turbo_w4a8_calibrate", "qsched_flux_schnell_w4a8_calibrate"} <= names


def _calibration(name: str, object_info) -> dict:
    p = ui_to_api(_load(REPO / "workflows" / f"{name}.json"), object_info)
    return {v["class_type"]: v["inputs"] for v in p.values()}


@pytest.mark.parametrize("name, loader, fp, sampler, size", [
    ("qsched_sdxl_turbo_w4a8_calibrate", "QSchedCheckpointLoader", "fp16", "euler_ancestral", 512),
    ("qsched_flux_schnell_w4a8_calibrate", "QSchedDiffusionModelLoader", "bf16", "euler", 1024),
])
def test_calibration_workflow_settings(name, loader, fp, sampler, size, object_info):
    """Small, artist-sized defaults that match the sampling workflow of the same family (so its preset fits it).
    The reference objective with no extra files: the one model file loaded in full precision is the reference,
    Q-Sched Quantize Model makes the W4A8 model from it, and no scorer is needed (the JAQ nodes are muted)."""
    from qsched_pack.calibration.prompts import default_prompts
    from qsched_pack.calibration.search import SearchSpace, check_budget, estimate_points
    from qsched_pack.nodes.scoring import parse_prompt_lines

    p = ui_to_api(_load(REPO / "workflows" / f"{name}.json"), object_info)
    by_type = {v["class_type"]: v["inputs"] for v in p.values()}
    assert by_type[loader]["precision"] == fp and by_type["QSchedQuantizeModel"]["precision"] == "w4a8"
    cal = by_type["QSchedCalibrate"]
    assert cal["model"] == [_id_of(p, "QSchedQuantizeModel"), 0] and cal["reference_model"] == [_id_of(p, loader), 0]
    assert by_type["QSchedQuantizeModel"]["model"] == [_id_of(p, loader), 0]
    assert cal["objective"] == "match full precision" and "scorer" not in cal
    assert not {"QSchedJAQLoader", "QSchedJAQScore"} & set(by_type)  # muted: they need scorer files
    wf = _load(REPO / "workflows" / f"{name}.json")
    assert {n["type"]: n["mode"] for n in wf["nodes"] if n["type"].startswith("QSchedJAQ")} == {
        "QSchedJAQLoader": 2, "QSchedJAQScore": 2}
    assert parse_prompt_lines(cal["prompts"], "test") == default_prompts()
    assert (cal["steps"], cal["sampler_name"], cal["scheduler"], cal["cfg"]) == (4, sampler, "simple", 1.0)
    assert (cal["width"], cal["height"]) == (size, size)
    assert (cal["space"], cal["strategy"], cal["range_min"], cal["range_max"]) == ("start", "pattern", 0.8, 1.2)
    assert "qsched_" + cal["preset_name"] == name.replace("_calibrate", "_calibrated")
    jaq = next(n for n in wf["nodes"] if n["type"] == "QSchedJAQLoader")
    assert jaq["widgets_values"][0] == "preference"  # the paper's JAQ for SDXL-Turbo and FLUX, when unmuted
    space = SearchSpace(cal["space"], cal["steps"], cal["range_min"], cal["range_max"])
    check_budget(space, cal["strategy"], cal["points"], 20, cal["budget"])
    assert 1.0 in space.axis(cal["points"])  # identity is a grid point, so the pattern search starts on it
    # a budget an artist can wait for, yet room for a full pattern search of typical length
    assert 300 <= cal["budget"] <= 800 and cal["budget"] // 20 >= 20
    assert estimate_points(space, "pattern", cal["points"]) > 20
    # the sampling workflow of the same family samples the same way (steps, sampler, size)
    sampling = ui_to_api(_load(REPO / "workflows" / f"{name.replace('_calibrate', '')}.json"), object_info)
    st = {v["class_type"]: v["inputs"] for v in sampling.values()}
    assert st["QSchedCoefficients"]["steps"] == cal["steps"]  # the sampler's steps are linked to it
    if "QSchedKSampler" in st:
        assert st["QSchedKSampler"]["sampler_name"] == cal["sampler_name"]
        assert st["QSchedKSampler"]["eta"] == cal["eta"]
        lat = st["EmptyLatentImage"]
    else:
        assert st["QSchedSampler"]["sampler_name"] == cal["sampler_name"]
        lat = st["EmptySD3LatentImage"]
    assert (lat["width"], lat["height"]) == (cal["width"], cal["height"])


@pytest.mark.parametrize("name, sampler", [("qsched_sdxl_turbo_w4a8_calibrate", "QSchedKSampler"),
                                           ("qsched_flux_schnell_w4a8_calibrate", "QSchedSampler")])
def test_calibration_workflow_samples_with_the_calibrated_coefficients(name, sampler, object_info):
    """Both calibration templates render an image with the coefficients they found, on the quantized model (point
    9); Q-Sched JAQ Score (muted until the scorer files are there) is wired to score it."""
    wf = _load(REPO / "workflows" / f"{name}.json")
    p = ui_to_api(wf, object_info)
    cal = next(k for k, v in p.items() if v["class_type"] == "QSchedCalibrate")
    ks = next(v for v in p.values() if v["class_type"] == sampler)
    assert ks["inputs"]["coefficients"] == [cal, 0]
    assert any(v["class_type"] == "SaveImage" for v in p.values())
    quantized = [_id_of(p, "QSchedQuantizeModel"), 0]
    assert quantized in [v["inputs"].get("model") for v in p.values() if v["class_type"] != "QSchedCalibrate"]
    for n in wf["nodes"]:  # unmuted, as an artist with the scorer files would
        n["mode"] = 0
    p = ui_to_api(wf, object_info)
    score = next(v for v in p.values() if v["class_type"] == "QSchedJAQScore")
    text = next(v for v in p.values() if v["class_type"] == "CLIPTextEncode" and v["inputs"]["text"])
    assert score["inputs"]["prompts"] == text["inputs"]["text"]  # scored against the prompt it was made from
    notes = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note")
    for knob in ("budget", "strategy", "space", "range_min", "points", "preset_name", "resume", "Load Preset", "k:",
                 "objective", "match full precision", "held-out", "Ctrl+M", "overwrite", "max_minutes"):
        assert knob in notes, knob


def test_control_widget_rule_follows_the_frontend():
    assert has_control_widget("seed", ("INT", {"min": 0}))  # legacy name rule
    assert has_control_widget("noise_seed", ("INT", {}))
    assert not has_control_widget("seed", ("INT", {"control_after_generate": False}))
    assert has_control_widget("count", ("INT", {"control_after_generate": True}))
    assert not has_control_widget("base_seed", ("INT", {}))
    assert not has_control_widget("seed", ("STRING", {}))


def test_no_node_of_ours_gets_an_unintended_control_widget(folder_paths):
    """An INT input named seed/noise_seed gets a randomize-after-queue widget unless its spec says otherwise: ours
    either ask for it explicitly or are named differently (Q-Sched Calibrate's base_seed must stay fixed)."""
    for name, info in our_object_info().items():
        for section in ("required", "optional"):
            for inp, spec in info["input"][section].items():
                if spec[0] == "INT" and inp in ("seed", "noise_seed"):
                    assert "control_after_generate" in _opts(spec), (name, inp)
    calib = our_object_info()["QSchedCalibrate"]["input"]["required"]
    assert "base_seed" in calib and not has_control_widget("base_seed", calib["base_seed"])


def test_templates_carry_thumbnails_titles_and_model_metadata():
    """Point 6: what the template browser and the missing-model dialog need (core templates carry the same)."""
    info = json.loads((REPO / "web" / "templates.json").read_text())
    assert sorted(info) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:
        meta = info[path.stem]
        assert meta["title"] and meta["title"] != path.stem and len(meta["description"]) > 40, path.stem
        assert path.stem.replace("_", " ") not in meta["description"], path.stem  # not the file name again
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name}: missing or not a JPEG"
        wf = _load(path)
        for node in wf["nodes"]:
            files = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.endswith(".safetensors")]
            models = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
            for f in files:
                m = models.get(f)
                assert m, f"{path.stem}: {node['type']} names {f} without model metadata"
                assert m["url"].startswith("https://huggingface.co/") and m["url"].split("?")[0].endswith("/" + f)
                assert m["directory"] in ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras")


def test_notes_point_to_the_calibration_templates():
    """Point 8: the sampling templates send the artist to the bundled calibration templates, not to the CLI."""
    for name in ("qsched_sdxl_turbo_w4a8", "qsched_flux_schnell_w4a8"):
        notes = " ".join(n["widgets_values"][0] for n in _load(REPO / "workflows" / f"{name}.json")["nodes"]
                         if n["type"] == "Note")
        assert f"{name}_calibrate" in notes and "qsched calibrate" not in notes, name
