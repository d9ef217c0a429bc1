"""Helpers shared by the node modules: socket types, shared widgets (eta, steps, preset names), folder registration,
and the one way a node reports bad input: ``node_input`` turns the library validators' ``ValueError``
into a ``NodeInputError`` naming the node input (the rules themselves live in the library, never here).

ComfyUI (``comfy``, ``folder_paths``) is imported inside functions only: this module is imported by the pack's
``__init__.py`` before anything else and by the unit tests, where ComfyUI is absent.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

from ..calibration.metrics.weights import COMFY_FOLDER, register_comfy_folder

#: ComfyUI socket type of a ``qsched.coefficients.Coefficients`` value.
COEFFICIENTS = "QSCHED_COEFFICIENTS"

#: ComfyUI socket type of a JAQ scorer (``nodes.scoring.ComfyJAQ``), made by Q-Sched JAQ Loader.
JAQ_SCORER = "QSCHED_JAQ"

#: ComfyUI folder key (``models/qsched/``) for presets and scorer weights (shared with calibration.metrics.weights).
QSCHED_FOLDER = COMFY_FOLDER
PRESET_EXT = ".json"

CATEGORY_SAMPLING = "sampling/qsched"
CATEGORY_LOADERS = "loaders/qsched"
CATEGORY_SCORING = "sampling/qsched/scoring"
CATEGORY_CALIBRATION = "sampling/qsched/calibration"


#: Largest step count the widgets offer (the library allows up to ``qsched.coefficients.MAX_STEPS``).
MAX_UI_STEPS = 100


class NodeInputError(ValueError):
    """Bad value of one node input; the message starts with the node and the input name."""

    def __init__(self, node: str, input_name: str, message: str):
        self.node, self.input_name = node, input_name
        super().__init__(f"{node}: input '{input_name}': {message}")


# ComfyUI shows an error's type as ``module.qualname``; under ComfyUI the module is the pack's folder path
# ("/home/me/ComfyUI/custom_nodes/ComfyUI-QSched.nodes.common.NodeInputError"). A short, stable name instead.
NodeInputError.__module__ = "qsched"


@contextmanager
def node_input(node: str, input_name: str, hint: str = ""):
    """``with node_input(NODE, "steps"): check_steps(steps)``: a ``ValueError`` (or a missing file) raised inside by
    the library becomes a ``NodeInputError`` naming the input; ``hint`` is appended (what to do in the UI)."""
    try:
        yield
    except NodeInputError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise NodeInputError(node, input_name, f"{exc}{hint}") from None


def validation_result(check, *args, **kwargs):
    """For ``VALIDATE_INPUTS``: True when ``check(*args, **kwargs)`` passes; otherwise its error is RAISED.

    Why raise instead of returning the message: ComfyUI 0.3.64 (execution.py ``validate_inputs``) files a returned
    message once per input named in ``VALIDATE_INPUTS``' signature (26 copies on Q-Sched Calibrate, each labelled
    "Custom validation failed for node: <input> - ..."), but a raised exception once, on this node ("Exception when
    validating node: <message>"). Our messages name the input they concern ("Q-Sched X: input 'budget': ...")."""
    check(*args, **kwargs)
    return True


def check_combo(node: str, input_name: str, value, choices) -> None:
    """ComfyUI's combo check, redone by hand for inputs named in ``VALIDATE_INPUTS`` (which turns it off)."""
    if value not in choices:
        raise NodeInputError(node, input_name, f"{value!r} is not one of {', '.join(map(str, choices))}")


def check_int(node: str, input_name: str, value, lo: int, hi: int) -> int:
    """ComfyUI's INT widget min/max check, redone by hand for inputs named in ``VALIDATE_INPUTS``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise NodeInputError(node, input_name, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# shared widgets
# ---------------------------------------------------------------------------------------------------------------
ETA = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                 "Stochasticity. euler_ancestral: ancestral noise (1 = SDXL-Turbo's EulerAncestral). tcd: gamma "
                 "(0.3 is the TCD default; 0 = deterministic). Ignored by euler and lcm."})


def steps_input(tooltip: str) -> tuple:
    """The INT widget for a step count (1..MAX_UI_STEPS, default 4)."""
    return ("INT", {"default": 4, "min": 1, "max": MAX_UI_STEPS, "tooltip": tooltip})


def register_qsched_folder():
    """Make sure ``models/qsched/`` (plus extra_model_paths.yaml entries) is known to ComfyUI; returns folder_paths."""
    import folder_paths

    register_comfy_folder(folder_paths)
    return folder_paths


def qsched_folders() -> list[str]:
    """ComfyUI's ``qsched`` folders (``models/qsched/`` plus extra_model_paths.yaml entries), first = where presets
    are written."""
    return list(register_qsched_folder().get_folder_paths(QSCHED_FOLDER))


def preset_names() -> list[str]:
    """The preset files in ``models/qsched/`` (the choices of a preset widget): names Load Preset would load
    (hidden/temporary files and symlinks out of the folder are not offered)."""
    folder_paths = register_qsched_folder()
    names = [n.replace(os.sep, "/") for n in folder_paths.get_filename_list(QSCHED_FOLDER)]
    return sorted(n for n in names if n.lower().endswith(PRESET_EXT) and _findable(n))


def _findable(name: str) -> bool:
    try:
        return find_preset(name) is not None
    except NodeInputError:
        return False


def _confined(root: str, rel: str, node: str, input_name: str) -> str:
    from ..qsched._io import UnsafePath, confined

    try:
        return str(confined(root, rel))
    except UnsafePath as exc:
        raise NodeInputError(node, input_name, f"{exc}") from None


def preset_file(name, node: str = "Q-Sched Save Preset", input_name: str = "name") -> str:
    """Where a preset named by the user is written: ``models/qsched/<name>.json`` (``.json`` added), refused
    (NodeInputError naming the input) unless a plain name (letters, digits, '-', '_', '.', '/' between folder
    names) that stays inside the folder (``qsched._io.confined``) and, if the file exists, is a preset."""
    from ..qsched.coefficients import check_replaceable

    if not isinstance(name, str) or not name.strip():
        raise NodeInputError(node, input_name, "is empty: give a file name such as 'sdxl_turbo_w4a8'")
    rel = name.strip()
    if not rel.lower().endswith(PRESET_EXT):
        rel += PRESET_EXT
    if not all(re.fullmatch(r"[A-Za-z0-9_.\-]*", p) for p in rel.split("/")):
        from ..qsched._io import brief

        raise NodeInputError(node, input_name, (
            f"{brief(name)} is not a plain file name: use letters, digits, '-', '_', '.' and '/' between folder "
            "names"))
    path = _confined(qsched_folders()[0], rel, node, input_name)
    with node_input(node, input_name):
        check_replaceable(path)
    return path


def find_preset(name, node: str = "Q-Sched Load Preset", input_name: str = "preset") -> str | None:
    """The preset file a widget value names, in the first ``qsched`` folder holding it (None: not found); names
    that lead out of the folder are refused (NodeInputError), like every name (``qsched._io.confined``)."""
    if not isinstance(name, str) or not name.lower().endswith(PRESET_EXT):
        from ..qsched._io import brief

        raise NodeInputError(node, input_name, f"must name a *{PRESET_EXT} file in models/{QSCHED_FOLDER}/, got "
                                               f"{brief(name)}")
    for root in qsched_folders():
        path = _confined(root, name, node, input_name)
        if os.path.isfile(path):
            return path
    return None


def load_preset(name: str):
    """The Coefficients of preset ``name`` (Q-Sched Load Preset's reader); errors name that node's input."""
    from ..qsched.coefficients import Coefficients

    node = "Q-Sched Load Preset"
    path = find_preset(name, node, "preset")
    if path is None:
        raise NodeInputError(node, "preset", f"file {name!r} not found in models/{QSCHED_FOLDER}/ (or the extra "
                                             f"'{QSCHED_FOLDER}' paths of extra_model_paths.yaml)")
    with node_input(node, "preset"):
        try:
            return Coefficients.load(path)
        except ValueError as exc:
            raise ValueError(f"malformed preset: {exc}") from None


def model_sampling_of(model):
    """The ``model_sampling`` object of a ComfyUI MODEL (ModelPatcher; object patches included)."""
    return model.get_model_object("model_sampling")


def is_flow(model_sampling) -> bool:
    """CONST parameterisation = rectified flow (FLUX, SD3): ``x = (1 - sigma)·x0 + sigma·noise``."""
    import comfy.model_sampling

    return isinstance(model_sampling, comfy.model_sampling.CONST)
