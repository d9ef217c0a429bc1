"""Helpers shared by the node modules: the coefficient type name, folder registration, input checks.

ComfyUI (``comfy``, ``folder_paths``) is imported inside functions only: this module is imported by the pack's
``__init__.py`` before anything else and by the unit tests, where ComfyUI is absent.
"""

from __future__ import annotations

import os

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


class NodeInputError(ValueError):
    """Bad value of one node input; the message starts with the node and the input name."""

    def __init__(self, node: str, input_name: str, message: str):
        self.node, self.input_name = node, input_name
        super().__init__(f"{node}: input '{input_name}': {message}")


def register_qsched_folder():
    """Make sure ``models/qsched/`` (plus extra_model_paths.yaml entries) is known to ComfyUI; returns folder_paths."""
    import folder_paths

    register_comfy_folder(folder_paths)
    return folder_paths


def preset_names() -> list[str]:
    folder_paths = register_qsched_folder()
    return sorted(n for n in folder_paths.get_filename_list(QSCHED_FOLDER) if n.lower().endswith(PRESET_EXT))


def model_sampling_of(model):
    """The ``model_sampling`` object of a ComfyUI MODEL (ModelPatcher; object patches included)."""
    return model.get_model_object("model_sampling")


def is_flow(model_sampling) -> bool:
    """CONST parameterisation = rectified flow (FLUX, SD3): ``x = (1 - sigma)·x0 + sigma·noise``."""
    import comfy.model_sampling

    return isinstance(model_sampling, comfy.model_sampling.CONST)
