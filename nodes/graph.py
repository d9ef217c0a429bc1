"""Checks that need the whole graph (ComfyUI's API-format prompt), made before anything runs.

ComfyUI validates each node on its own: ``VALIDATE_INPUTS`` sees the node's own inputs, never the graph (its hidden
PROMPT is empty at queue time in 0.3.64). Two rules need the graph:

* **steps**: coefficients (Q-Sched Coefficients / Q-Sched Load Preset) must have as many steps as the sampler that
  uses them runs (Q-Sched KSampler's ``steps``; for Q-Sched Sampler, the ``steps`` of the SIGMAS node feeding the same
  SamplerCustom(Advanced)). Without the graph the mismatch only shows inside SamplerCustomAdvanced, after loading.
* **preset compatibility** (Q-Sched Load Preset): the model family, precision and sampler the preset was calibrated
  for, against the loader and sampler of the graph that uses it.
* **calibration reference** (Q-Sched Calibrate): ``reference_model`` must come from a model file of the same family
  as ``model`` (read from the two loaders' file headers) and not be quantized.

The queue-time check runs in an ``on_prompt`` handler (``PromptServer.add_on_prompt_handler``, called with every
POST /prompt before validation): it writes each problem into the hidden input ``GRAPH_CHECK`` of the node to blame,
whose ``VALIDATE_INPUTS`` raises it, so ComfyUI shows one message on that node; for Load Preset it also writes what
the graph's samplers use (``uses``), which the node compares with the preset when it runs. Being an input, that
value is part of ComfyUI's cache key: another loader or sampler makes Load Preset run (and warn) again. Pure
functions on the prompt dict (no ComfyUI import) except the file lookups, which use ``folder_paths`` when present.
"""

from __future__ import annotations

import json
import struct

from ..qsched.quant import families
from .common import NodeInputError, load_preset

#: Hidden input that carries a graph problem to the node it concerns ({"input": name, "message": text}).
GRAPH_CHECK = "qsched_graph_check"
GRAPH_CHECK_INPUT = {GRAPH_CHECK: "QSCHED_GRAPH_CHECK"}

NAMES = {"QSchedCoefficients": "Q-Sched Coefficients", "QSchedLoadPreset": "Q-Sched Load Preset",
         "QSchedKSampler": "Q-Sched KSampler", "QSchedSampler": "Q-Sched Sampler",
         "QSchedScheduler": "Q-Sched Scheduler", "QSchedCalibrate": "Q-Sched Calibrate"}
#: Nodes that make coefficients: output 0 = coefficients, output 1 = their steps.
SOURCES = ("QSchedCoefficients", "QSchedLoadPreset")
#: Nodes whose hidden GRAPH_CHECK input may carry a problem.
CHECKED = ("QSchedLoadPreset", "QSchedKSampler", "QSchedSampler", "QSchedScheduler")
#: Loader nodes: class -> (file input, ComfyUI folder, has a precision input).
LOADERS = {"QSchedDiffusionModelLoader": ("unet_name", "diffusion_models", True),
           "QSchedCheckpointLoader": ("ckpt_name", "checkpoints", True),
           "UNETLoader": ("unet_name", "diffusion_models", False),
           "CheckpointLoaderSimple": ("ckpt_name", "checkpoints", False)}
#: How messages name the families of ``family_of_keys``.
FAMILY_WORDS = {"flux": "FLUX", "chroma": "Chroma", "sd3": "SD3", "sdxl": "SDXL", "sd1": "SD 1.x/2.x",
                "qwen_image": "Qwen-Image", "wan": "Wan"}


def link(v):
    """The source node id of a linked input, else None."""
    return str(v[0]) if isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) else None


def _slot(v):
    return v[1] if isinstance(v, list) and len(v) == 2 else None


def _title(prompt: dict, nid: str) -> str:
    ct = prompt.get(nid, {}).get("class_type", "?")
    return f"{NAMES.get(ct, ct)} (#{nid})"


def users(prompt: dict, nid: str, slot: int):
    """(node id, input name) of every input linked to output ``slot`` of node ``nid``."""
    for uid, node in prompt.items():
        for name, v in (node.get("inputs") or {}).items():
            if link(v) == str(nid) and _slot(v) == slot:
                yield str(uid), name


# ---------------------------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------------------------
def _preset_steps(name) -> int | None:
    try:  # the one preset reader; its errors belong to Load Preset's own check
        return load_preset(name).steps
    except (NodeInputError, ImportError, OSError):
        return None


def int_value(prompt: dict, v, seen=None) -> int | None:
    """A steps value: a literal, or the steps output (slot 1) of a coefficient source; None when unknown."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    src = link(v)
    if src is None or _slot(v) != 1:
        return None
    return source_steps(prompt, src, seen)


def source_steps(prompt: dict, nid: str, seen=None) -> int | None:
    """The number of steps of the coefficients made by node ``nid`` (Coefficients or Load Preset)."""
    seen = set() if seen is None else seen
    node = prompt.get(nid) or {}
    if nid in seen:
        return None
    seen.add(nid)
    ct, inputs = node.get("class_type"), node.get("inputs") or {}
    if ct == "QSchedCoefficients":
        return int_value(prompt, inputs.get("steps"), seen)
    if ct == "QSchedLoadPreset" and isinstance(inputs.get("preset"), str):
        return _preset_steps(inputs["preset"])
    return None


def _sigmas_node(prompt: dict, sampler_id: str):
    """The SIGMAS node of the SamplerCustom(Advanced) that uses the SAMPLER made by ``sampler_id``."""
    for uid, name in users(prompt, sampler_id, 0):
        if name == "sampler":
            sig = link((prompt[uid].get("inputs") or {}).get("sigmas"))
            if sig is not None:
                return sig
    return None


def steps_problems(prompt: dict) -> dict[str, tuple[str, str]]:
    """node id -> (input name, message) for every coefficients/sampler step mismatch of the graph."""
    out: dict[str, tuple[str, str]] = {}
    if not isinstance(prompt, dict):
        return out
    for nid, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") not in ("QSchedKSampler", "QSchedSampler"):
            continue
        inputs = node.get("inputs") or {}
        src = link(inputs.get("coefficients"))
        if src is None or prompt.get(src, {}).get("class_type") not in SOURCES:
            continue
        have = source_steps(prompt, src)
        if node["class_type"] == "QSchedKSampler":
            runner, steps_in = nid, inputs.get("steps")
        else:
            runner = _sigmas_node(prompt, nid)
            steps_in = None if runner is None else (prompt[runner].get("inputs") or {}).get("steps")
        runs = None if runner is None else int_value(prompt, steps_in)
        if have is None or runs is None or have == runs:
            continue
        where = _title(prompt, runner)
        if prompt[src]["class_type"] == "QSchedLoadPreset":
            out[src] = ("preset", f"this preset is for {have} steps, but {where} runs {runs} steps: pick a preset "
                                  f"calibrated for {runs} steps, or set steps to {have} there (connect this node's "
                                  "'steps' output to it so the two always match)")
        elif prompt[runner].get("class_type") in CHECKED and link(steps_in) is None:
            out[runner] = ("steps", f"runs {runs} steps, but {_title(prompt, src)} makes coefficients for {have} "
                                    f"steps: set steps to {have}, or connect that node's 'steps' output here so the "
                                    "two always match")
        else:
            out[nid] = ("coefficients", f"{_title(prompt, src)} makes coefficients for {have} steps, but {where} "
                                        f"runs {runs} steps: make the two step counts equal (connect the 'steps' "
                                        "output of the coefficients to the steps input)")
    return out


def reference_problems(prompt: dict) -> dict[str, tuple[str, str]]:
    """node id -> (input name, message) for each Q-Sched Calibrate whose ``reference_model`` comes from a model file
    of another family than its ``model`` (read from the two loaders' file headers), or from a quantized one."""
    out: dict[str, tuple[str, str]] = {}
    for nid, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") != "QSchedCalibrate":
            continue
        inputs = node.get("inputs") or {}
        ref_src, model_src = link(inputs.get("reference_model")), link(inputs.get("model"))
        if ref_src is None or model_src is None:
            continue
        ref = model_facts(prompt, loader_of(prompt, ref_src))
        model = model_facts(prompt, loader_of(prompt, model_src))
        fr, fm = ref.get("family"), model.get("family")
        if fr and fm and fr != fm:
            out[str(nid)] = ("reference_model", (
                f"is a {FAMILY_WORDS.get(fr, fr)} model ({ref.get('file', '?')}), but 'model' is "
                f"{FAMILY_WORDS.get(fm, fm)} ({model.get('file', '?')}): another architecture and latent format. "
                "Connect the full-precision version of the model being calibrated (the MODEL you quantized)"))
        elif ref.get("precision") not in (None, "16-bit"):
            out[str(nid)] = ("reference_model", (
                f"is quantized ({ref['precision']}, {_title(prompt, loader_of(prompt, ref_src))}): connect the "
                "full-precision MODEL (a loader at fp16 / bf16, Load Checkpoint, or the input of Q-Sched Quantize "
                "Model)"))
    return out


def on_prompt(json_data):
    """ComfyUI ``on_prompt`` handler: puts each graph problem into the hidden input of the node to blame (and clears
    what an earlier queue of the same graph left there)."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    for node in prompt.values():
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict):
            node["inputs"].pop(GRAPH_CHECK, None)
    checks: dict[str, dict] = {}
    for nid, node in prompt.items():
        if isinstance(node, dict) and node.get("class_type") == "QSchedLoadPreset":
            uses = sampler_facts(prompt, str(nid))
            if uses:  # part of the node's inputs, so a change of loader or sampler runs Load Preset again
                checks[str(nid)] = {"uses": uses}
    for nid, (input_name, message) in {**steps_problems(prompt), **reference_problems(prompt)}.items():
        checks.setdefault(nid, {}).update({"input": input_name, "message": message})
    for nid, check in checks.items():
        prompt[nid]["inputs"][GRAPH_CHECK] = check
    return json_data


def raise_graph_problem(node_name: str, check) -> None:
    """In VALIDATE_INPUTS: raises the problem the ``on_prompt`` handler found for this node, if any."""
    if isinstance(check, dict) and check.get("message"):
        raise NodeInputError(node_name, str(check.get("input", "?")), str(check["message"]))


def register_on_prompt() -> bool:
    """Installs ``on_prompt`` in the running ComfyUI server (no-op without one, e.g. in unit tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None or not hasattr(server, "add_on_prompt_handler"):
        return False
    if on_prompt not in getattr(server, "on_prompt_handlers", []):
        server.add_on_prompt_handler(on_prompt)
    return True


# ---------------------------------------------------------------------------------------------------------------
# preset compatibility (run time: Load Preset's hidden PROMPT)
# ---------------------------------------------------------------------------------------------------------------
def family_of_keys(keys) -> str | None:
    """Model family from a diffusion model's tensor names: the layout ``qsched.quant.families`` recognises (flux,
    chroma, sd3, qwen_image, wan), its SD UNet told apart as sdxl (which has the pooled-text embedder ``label_emb``)
    or sd1 (SD 1.x / 2.x); None if unknown."""
    layout = families.family_of_keys(keys)
    if layout is None or layout.name != "sd_unet":
        return None if layout is None else layout.name
    return "sdxl" if any(k.startswith("label_emb.") for k in families.strip_model_prefix(keys)) else "sd1"


#: What a preset records (ComfyUI's model class, e.g. Flux, SDXL, BaseModel, WAN22, QwenImage, or the command line's
#: family), normalised, by prefix -> the family names of ``family_of_keys``.
_NAME_PREFIXES = (("chroma", "chroma"), ("flux", "flux"), ("sd3", "sd3"), ("sdxl", "sdxl"), ("basemodel", "sd1"),
                  ("sd1", "sd1"), ("sd2", "sd1"), ("qwenimage", "qwen_image"), ("wan", "wan"))


def family_of_name(name) -> str | None:
    """The same families from what a preset records; None if unknown."""
    if not isinstance(name, str):
        return None
    n = name.lower().replace("-", "").replace("_", "").replace(".", "")
    return next((fam for prefix, fam in _NAME_PREFIXES if n.startswith(prefix)), None)


def safetensors_header(path: str) -> dict | None:
    """The JSON header of a safetensors file (tensor names -> dtype/shape, and ``__metadata__``); None when it cannot
    be read. No tensor data is read, nothing is executed."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 0 < n <= 100_000_000:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    return header if isinstance(header, dict) else None


def safetensors_is_flow(path: str) -> bool | None:
    """True for a flow model's file (FLUX, Chroma, SD3, Qwen-Image, Wan), False for another recognised layout, None
    when the header cannot be read or the layout is not one of ``qsched.quant.families``. Reads only the JSON
    header (no tensor data, no code)."""
    header = safetensors_header(path)
    layout = None if header is None else families.family_of_keys(header)
    return None if layout is None else layout.flow


def loader_of(prompt: dict, nid: str | None, seen=None):
    """Follows MODEL links (through LoRA loaders and other pass-through nodes) to the node that made the model."""
    seen = set() if seen is None else seen
    while nid is not None and nid not in seen and nid in prompt:
        seen.add(nid)
        node = prompt[nid]
        if node.get("class_type") in LOADERS or node.get("class_type") == "QSchedQuantizeModel":
            return nid
        nid = link((node.get("inputs") or {}).get("model"))
    return None


def model_facts(prompt: dict, loader_id: str | None) -> dict:
    """What the graph says about the model: {"family", "precision", "file"} (keys only where known)."""
    facts: dict = {}
    precision_node = None
    nid = loader_id
    if nid is not None and prompt[nid].get("class_type") == "QSchedQuantizeModel":
        precision_node = nid
        nid = loader_of(prompt, link((prompt[nid].get("inputs") or {}).get("model")))
    if nid is not None and prompt[nid].get("class_type") in LOADERS:
        file_input, folder, has_precision = LOADERS[prompt[nid]["class_type"]]
        if has_precision and precision_node is None:
            precision_node = nid
        elif precision_node is None:
            facts["precision"] = "16-bit"
        name = (prompt[nid].get("inputs") or {}).get(file_input)
        if isinstance(name, str):
            facts["file"] = name
            path = None
            try:
                import folder_paths

                path = folder_paths.get_full_path(folder, name)
            except ImportError:
                pass
            header = safetensors_header(path) if path else None
            if header is not None:
                facts["family"] = family_of_keys(header)
                layout = families.family_of_keys(header)  # the quantization families' table says flow or eps
                if layout is not None:
                    facts["flow"] = layout.flow
                meta = header.get("__metadata__") or {}
                if isinstance(meta, dict) and meta.get("qsched.spec"):  # a pre-quantized file keeps its format
                    facts["precision"] = str(meta["qsched.spec"])
                    precision_node = None if precision_node == nid else precision_node
    if precision_node is not None:
        p = (prompt[precision_node].get("inputs") or {}).get("precision")
        if isinstance(p, str):
            facts["precision"] = "16-bit" if p in ("fp16", "bf16") else _resolve_precision(p)
    return {k: v for k, v in facts.items() if v is not None}


def sampler_model_is_flow(prompt: dict, sampler_id: str) -> bool | None:
    """Whether the MODEL that reaches the SAMPLER made by node ``sampler_id`` (through SamplerCustom(Advanced), a
    guider and MODEL pass-through nodes such as LoRA loaders) is a flow model (``qsched.quant.families``: FLUX, Chroma,
    SD3, Qwen-Image, Wan), read from its loader's file header; None when the graph does not say (a linked file name, an unknown loader, a file that is not safetensors)."""
    if not isinstance(prompt, dict):
        return None
    for node in prompt.values():
        inputs = (node.get("inputs") or {}) if isinstance(node, dict) else {}
        if link(inputs.get("sampler")) != str(sampler_id):
            continue
        src = link(inputs.get("model"))  # SamplerCustom
        if src is None and link(inputs.get("guider")) is not None:  # SamplerCustomAdvanced -> guider -> model
            src = link(((prompt.get(link(inputs["guider"])) or {}).get("inputs") or {}).get("model"))
        flow = model_facts(prompt, loader_of(prompt, src)).get("flow")
        if flow is not None:
            return flow
    return None


def _resolve_precision(p: str) -> str:
    try:
        from .loaders import resolve_precision

        return resolve_precision(p)
    except ImportError:
        return p


def sampler_facts(prompt: dict, preset_id: str) -> list[dict]:
    """For each sampler node using the coefficients of ``preset_id``: {"node", "sampler", "family", "precision"}."""
    out = []
    for uid, name in users(prompt, preset_id, 0):
        node = prompt[uid]
        ct, inputs = node.get("class_type"), node.get("inputs") or {}
        if ct not in ("QSchedKSampler", "QSchedSampler") or name != "coefficients":
            continue
        facts = {"node": _title(prompt, uid)}
        if isinstance(inputs.get("sampler_name"), str):
            facts["sampler"] = inputs["sampler_name"]
        model = link(inputs.get("model"))
        if ct == "QSchedSampler":
            for cid, cname in users(prompt, uid, 0):
                cin = prompt[cid].get("inputs") or {}
                model = link(cin.get("model")) or link((prompt.get(link(cin.get("guider")) or "", {})
                                                        .get("inputs") or {}).get("model"))
                if model:
                    break
        facts.update(model_facts(prompt, loader_of(prompt, model)))
        out.append(facts)
    return out


def compat_warnings(metadata: dict, uses: list[dict]) -> list[str]:
    """Where a preset was calibrated for another model family, precision or sampler than the graph uses it with:
    one line per difference, naming both values."""
    if not isinstance(metadata, dict):
        return []
    made = {"family": family_of_name(metadata.get("family") or (metadata.get("sampling") or {}).get("model_class")),
            "precision": metadata.get("quant") if metadata.get("quant") else ("16-bit" if "quant" in metadata
                                                                               else None),
            "sampler": metadata.get("sampler") or (metadata.get("sampling") or {}).get("sampler")}
    lines = []
    for use in uses:
        for what in ("family", "precision", "sampler"):
            a, b = made.get(what), use.get(what)
            if a and b and a != b:
                show = (lambda v: FAMILY_WORDS.get(v, v)) if what == "family" else str
                lines.append(f"calibrated for {what} {show(a)}, but {use['node']} uses {show(b)}: the coefficients "
                             f"may not fit; calibrate for {show(b)} (or use a preset made for it)")
    return list(dict.fromkeys(lines))
