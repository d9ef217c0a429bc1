"""JAQ nodes: load a JAQ scorer (calibration.jaq.JAQ) from local weight files, and score IMAGE batches with it.

Thin adapters over ``calibration.jaq`` / ``calibration.metrics``: the metrics, their preprocessing and the offline
weight resolution live there. Weight files are looked up in ComfyUI's ``models/qsched/`` folder (and the ``qsched``
paths of extra_model_paths.yaml); nothing is ever downloaded. ComfyUI modules are imported inside functions only.
"""

from __future__ import annotations

import math
import os

from .common import (CATEGORY_SCORING, JAQ_SCORER, QSCHED_FOLDER, NodeInputError, check_combo, node_input,
                     qsched_folders, validation_result)

PRESETS = ("preference", "clip")
AUTO = "auto"
DEVICES = (AUTO, "cpu", "cuda")
DTYPES = (AUTO, "float32", "float16", "bfloat16")
#: Suffixes of scorer weight files (OpenAI CLIP .pt archives, open_clip checkpoints, safetensors).
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
LOADER = "Q-Sched JAQ Loader"
SCORE = "Q-Sched JAQ Score"


def preset_metrics(preset: str) -> tuple[str, str]:
    from ..calibration.jaq import PRESETS as JAQ_PRESETS

    return JAQ_PRESETS[preset]


def _qsched_folders() -> list[str]:
    return qsched_folders()


def _inside(root: str, rel: str) -> bool:
    from ..qsched._io import UnsafePath, confined

    try:
        confined(root, rel)
    except UnsafePath:
        return False
    return True


def weight_choices() -> list[str]:
    """``auto`` + weight files and transformers CLIP folders (``name/``) in models/qsched/ (entries that a
    symlink leads out of the folder are not listed: they would be refused)."""
    out = set()
    for root in _qsched_folders():
        if not os.path.isdir(root):
            continue
        seen = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            real = os.path.realpath(dirpath)
            if (rel != "." and not _inside(root, rel)) or real in seen:  # out of the folder, or a symlink loop
                dirnames[:] = []
                continue
            seen.add(real)
            if "config.json" in filenames and rel != ".":
                out.add(rel + "/")  # a transformers CLIP folder: its files are not listed one by one
                dirnames[:] = []
                continue
            for f in filenames:
                name = f if rel == "." else f"{rel}/{f}"
                if f.lower().endswith(WEIGHT_SUFFIXES) and _inside(root, name):
                    out.add(name)
    return [AUTO] + sorted(out)


def _choice_path(choice: str, input_name: str) -> str | None:
    """The file a combo value names, confined to the qsched folders: absolute names, '..' and symlinks out of
    the folder are refused (a shared workflow must not be able to make the pack read any other file)."""
    from ..qsched._io import UnsafePath, confined

    name = choice[:-1] if choice.endswith("/") else choice  # a transformers folder is listed as "name/"
    for root in _qsched_folders():
        try:
            p = confined(root, name)
        except UnsafePath as exc:
            raise NodeInputError(LOADER, input_name, (
                f"{exc}. Only files inside models/{QSCHED_FOLDER}/ (or the '{QSCHED_FOLDER}' paths of "
                "extra_model_paths.yaml) can be used: pick one from the list")) from None
        if p.is_dir() and not (p / "config.json").is_file():
            raise NodeInputError(LOADER, input_name, (
                f"{choice!r} is a folder, not a weight file (a transformers CLIP folder holds config.json): pick a "
                "file from the list"))
        if p.exists():
            return str(p)
    return None


def resolve_weight(metric: str, choice: str, input_name: str) -> str:
    """Local path of ``metric``'s weights for a combo value; errors name the input, the file and where to get it."""
    from ..calibration.metrics import SPECS, WeightFileError, resolve

    if not isinstance(choice, str) or not choice:
        raise NodeInputError(LOADER, input_name, f"must be '{AUTO}' or a file in models/{QSCHED_FOLDER}/, "
                                                 f"got {choice!r}")
    if choice == AUTO:
        try:
            return str(resolve(metric, None, folders=_qsched_folders()))
        except WeightFileError as exc:
            raise NodeInputError(LOADER, input_name, f"{exc} (put it in ComfyUI's models/{QSCHED_FOLDER}/ and "
                                                     "press 'r', or pick a file in this list)") from None
    path = _choice_path(choice, input_name)
    if path is None:
        raise NodeInputError(LOADER, input_name, (
            f"{choice!r} not found in models/{QSCHED_FOLDER}/ (or the '{QSCHED_FOLDER}' paths of "
            f"extra_model_paths.yaml). {metric} needs {SPECS[metric].what}; get it from: {SPECS[metric].source}"))
    return path


class ComfyJAQ:
    """A ``calibration.jaq.JAQ`` plus ``config``: what identifies it in a calibration record and preset
    (preset, metrics, k, weight file names and sha256). Same protocol as JAQ: components / combine / score."""

    def __init__(self, jaq, config: dict):
        self.jaq, self.config = jaq, config

    def components(self, images, prompts):
        return self.jaq.components(images, prompts)

    def combine(self, tc, iq):
        return self.jaq.combine(tc, iq)

    def aggregate(self, tc, iq):
        return self.jaq.aggregate(tc, iq)

    def score(self, images, prompts):
        return self.jaq.score(images, prompts)

    def describe(self) -> str:
        c = self.config
        w = ", ".join(f"{m}: {f}" for m, f in c["weights"].items())
        term = f"{c['tc']} + {c['k']:g}·{c['iq']}" if c["k_on"] == "iq" else f"{c['iq']} + {c['k']:g}·{c['tc']}"
        return f"JAQ '{c['preset']}' = {term} | {w} | {c['device']} {c['dtype']}"


def _device_dtype(device: str, dtype: str):
    import torch

    if device not in DEVICES:
        raise NodeInputError(LOADER, "device", f"{device!r} is not one of {', '.join(DEVICES)}")
    if dtype not in DTYPES:
        raise NodeInputError(LOADER, "dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    if device == AUTO:
        import comfy.model_management

        dev = comfy.model_management.get_torch_device()  # follows --cpu and the GPU ComfyUI uses
    else:
        if device == "cuda" and not torch.cuda.is_available():
            raise NodeInputError(LOADER, "device", "'cuda' was chosen but this ComfyUI has no CUDA device: use "
                                                   "'auto' or 'cpu'")
        dev = torch.device(device)
    if dtype == AUTO:
        dt = torch.float16 if dev.type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype)
        if dev.type == "cpu" and dt is torch.float16:
            raise NodeInputError(LOADER, "dtype", "float16 is not supported on the CPU: use 'auto' (float32) or "
                                                  "bfloat16")
    return dev, dt


def load_jaq(preset: str, k: float, tc_weights: str, iq_weights: str, device: str = AUTO,
             dtype: str = AUTO) -> ComfyJAQ:
    from ..calibration.jaq import JAQ
    from ..calibration.metrics import get_metric_class
    from ..calibration.metrics.weights import weights_digest

    if preset not in PRESETS:
        raise NodeInputError(LOADER, "preset", f"{preset!r} is not one of {', '.join(PRESETS)}")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
        raise NodeInputError(LOADER, "k", f"must be a finite number >= 0, got {k!r}")
    tc, iq = preset_metrics(preset)
    paths = {tc: resolve_weight(tc, tc_weights, "tc_weights"), iq: resolve_weight(iq, iq_weights, "iq_weights")}
    dev, dt = _device_dtype(device, dtype)
    metrics = {}
    for metric, input_name in ((tc, "tc_weights"), (iq, "iq_weights")):
        with node_input(LOADER, input_name):  # one metric at a time, so a bad file is blamed on its own input
            metrics[metric] = get_metric_class(metric)(paths[metric], device=dev, dtype=dt, batch_size=16)
    jaq = JAQ(tc=metrics[tc], iq=metrics[iq], k=float(k))  # Eq. 5: TC + k·IQ
    config = {"preset": preset, "tc": tc, "iq": iq, "k": float(k), "k_on": jaq.k_on,
              "tc_transform": jaq.tc_transform, "score_rule": jaq.score_rule,
              "weights": {m: os.path.basename(p.rstrip("/\\")) for m, p in paths.items()},
              "weights_sha256": {m: weights_digest(p) for m, p in paths.items()},
              "device": str(dev), "dtype": str(dt).replace("torch.", "")}
    return ComfyJAQ(jaq, config)


def check_scorer(scorer, node: str, input_name: str = "scorer") -> ComfyJAQ:
    if not isinstance(scorer, ComfyJAQ):
        raise NodeInputError(node, input_name, f"expected a {JAQ_SCORER} from Q-Sched JAQ Loader, got "
                                               f"{type(scorer).__name__}")
    return scorer


def parse_prompt_lines(text, node: str, input_name: str = "prompts") -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped (as in a prompt .txt file)."""
    if not isinstance(text, str):
        raise NodeInputError(node, input_name, f"must be text, got {type(text).__name__}")
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise NodeInputError(node, input_name, "is empty: write at least one prompt (one per line; lines starting "
                                               "with '#' are comments)")
    return prompts


def score_report(scorer: ComfyJAQ, images, prompts: list[str]) -> tuple[float, str, list[float]]:
    """-> (mean JAQ, per-image report text, per-image JAQ)."""
    from ..calibration.runner import point_score, score_images

    jaq, comps = score_images(scorer, images, prompts)
    c = scorer.config
    lines = [scorer.describe()]
    for i, v in enumerate(jaq):
        parts = [f"{c['tc']}={comps[c['tc']][i]:.5g}", f"{c['iq']}={comps[c['iq']][i]:.5g}"]
        p = prompts[i]
        lines.append(f"image {i + 1}: JAQ={v:.5g} ({', '.join(parts)}) | {p[:60]}{'…' if len(p) > 60 else ''}")
    mean = point_score(scorer, jaq, comps)
    lines.append(f"mean JAQ over {len(jaq)} image{'s' if len(jaq) != 1 else ''}: {mean:.6g}")
    return mean, "\n".join(lines), jaq


# ---------------------------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------------------------
_WEIGHTS_TIP = ("'auto' finds the standard file name in models/qsched/ ({names}). Or pick a file in models/qsched/ "
                "(press 'r' to refresh the list). Nothing is downloaded.")


class QSchedJAQLoader:
    DISPLAY_NAME = LOADER
    DESCRIPTION = ("Loads the JAQ scorer (JAQ = TC + k·IQ, the Q-Sched calibration objective) from local weight files "
                   "in models/qsched/. 'preference' = AQ-MAP + k·HPSv2.1 (SDXL-Turbo, FLUX in the paper); 'clip' = "
                   "CLIPScore + k·CLIP-IQA (LCM, PCM). Feeds Q-Sched Calibrate and Q-Sched JAQ Score.")
    CATEGORY = CATEGORY_SCORING
    RETURN_TYPES = (JAQ_SCORER, "STRING")
    RETURN_NAMES = ("scorer", "summary")
    OUTPUT_TOOLTIPS = ("The JAQ scorer, for Q-Sched Calibrate and Q-Sched JAQ Score.",
                       "Which metrics, k, weight files and device.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        choices = weight_choices()
        return {"required": {
            "preset": (list(PRESETS), {"default": "preference", "tooltip":
                       "preference: TC = AQ-MAP (ViT-B-16.pt), IQ = HPSv2.1 (HPS_v2.1_compressed.pt): the paper's "
                       "choice for SDXL-Turbo and FLUX. clip: TC = CLIPScore (ViT-L-14.pt), IQ = CLIP-IQA (RN50.pt): "
                       "LCM and PCM."}),
            "k": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                  "Weight of the image-quality term (paper: 2). Higher favours the IQ metric's taste over prompt "
                  "alignment. Scales differ: CLIPScore is 0-100, CLIP-IQA and AQ-MAP 0-1, HPSv2 about 0.27."}),
            "tc_weights": (choices, {"default": AUTO, "tooltip":
                           "Weights of the text-compatibility metric: ViT-B-16.pt (preference, AQ-MAP) or ViT-L-14.pt "
                           "/ folder clip-vit-large-patch14 (clip, CLIPScore). " + _WEIGHTS_TIP.format(
                               names="ViT-B-16.pt or ViT-L-14.pt")}),
            "iq_weights": (choices, {"default": AUTO, "tooltip":
                           "Weights of the image-quality metric: HPS_v2.1_compressed.pt (preference, HPSv2.1) or "
                           "RN50.pt (clip, CLIP-IQA). " + _WEIGHTS_TIP.format(
                               names="HPS_v2.1_compressed.pt or RN50.pt")}),
            "device": (list(DEVICES), {"default": AUTO, "tooltip":
                       "auto: the device ComfyUI samples on (CPU with --cpu). The scorer stays loaded while "
                       "ComfyUI caches this node (about 0.6 GB for clip, 2.6 GB for preference in fp16)."}),
            "dtype": (list(DTYPES), {"default": AUTO, "tooltip":
                      "auto: float16 on CUDA, float32 on CPU. Scores differ from float32 by ~1e-3 at most."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, preset=None, tc_weights=None, iq_weights=None):
        # Naming these turns off ComfyUI's combo checks for them: membership and file existence are checked here.
        if preset is None:
            return True
        check_combo(LOADER, "preset", preset, PRESETS)
        tc, iq = preset_metrics(preset)
        for metric, name, choice in ((tc, "tc_weights", tc_weights), (iq, "iq_weights", iq_weights)):
            if choice is not None:
                validation_result(resolve_weight, metric, choice, name)
        return True

    def load(self, preset, k, tc_weights, iq_weights, device, dtype):
        scorer = load_jaq(preset, k, tc_weights, iq_weights, device, dtype)
        text = scorer.describe()
        return {"ui": {"text": [text]}, "result": (scorer, text)}


class QSchedJAQScore:
    DISPLAY_NAME = SCORE
    DESCRIPTION = ("Scores images with JAQ (higher is better) and shows a per-image report on the node: JAQ and its "
                   "two metrics for every image, and the mean. Use it to compare coefficients or presets.")
    CATEGORY = CATEGORY_SCORING
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("mean_jaq", "report")
    OUTPUT_TOOLTIPS = ("Mean JAQ over the images.", "The per-image report shown on the node.")
    FUNCTION = "score"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images to score (e.g. from VAE Decode); at least 32×32 pixels."}),
            "scorer": (JAQ_SCORER, {"tooltip": "The JAQ scorer from Q-Sched JAQ Loader."}),
            "prompts": ("STRING", {"default": "", "multiline": True, "tooltip":
                        "The prompt the images were made from: one line for all images, or one line per image (in "
                        "batch order). Lines starting with '#' are ignored."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, prompts=None):
        return True if prompts is None else validation_result(parse_prompt_lines, prompts, SCORE)

    def score(self, images, scorer, prompts):
        import torch

        scorer = check_scorer(scorer, SCORE)
        lines = parse_prompt_lines(prompts, SCORE)
        if not torch.is_tensor(images) or images.ndim != 4:
            raise NodeInputError(SCORE, "images", f"expected an IMAGE batch [B, H, W, 3], got "
                                                  f"{getattr(images, 'shape', type(images).__name__)}")
        n = images.shape[0]
        if len(lines) == 1:
            lines = lines * n
        if len(lines) != n:
            raise NodeInputError(SCORE, "prompts", f"{len(lines)} prompt lines for {n} images: give one line for all "
                                                   "images or one line per image")
        with node_input(SCORE, "images"):  # image layout / range / size problems found by the metrics
            mean, report, _ = score_report(scorer, images, lines)
        return {"ui": {"text": [report]}, "result": (mean, report)}


NODE_CLASS_MAPPINGS = {"QSchedJAQLoader": QSchedJAQLoader, "QSchedJAQScore": QSchedJAQScore}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}
