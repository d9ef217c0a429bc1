"""ComfyUI node classes (classic V1 API). Each module is a thin adapter over qsched/ and calibration/;
ComfyUI itself (``comfy``, ``folder_paths``) is imported inside functions only, so the classes can be
inspected and unit-tested without a ComfyUI install. A node class carries its display name (``DISPLAY_NAME``).
"""

from . import calibration, fastpath, graph, loaders, sampling, scoring

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (sampling, loaders, scoring, calibration, fastpath):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

# The graph-wide checks (steps of coefficients vs sampler, preset compatibility) run on every queued prompt.
graph.register_on_prompt()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
