"""Q-Sched for ComfyUI: quantized few-step diffusion with per-step scheduler coefficients.

ComfyUI imports this file by location under whatever folder name the pack was cloned into, so every
import inside the pack is relative. For pip (CLI, tests) the same tree is the package ``qsched_pack``.
"""

import sys


def _comfy_has_v3() -> bool:
    """Inside ComfyUI 0.3.64 and later (it imports its V3 node API before loading packs)."""
    return "comfy_api.latest" in sys.modules


def __getattr__(name: str):
    """The node tables are imported when ComfyUI first asks for them, so ``qsched`` (the command line) starts
    without importing torch and ComfyUI's node modules: Ctrl-C in its first seconds is handled by its ``main``.
    Inside ComfyUI the nodes are V3 nodes (``comfy_entrypoint``, nodes/v3.py); ComfyUI registers classic mappings
    first when a pack has both, so there the classic tables are not offered. (ComfyUI and pip import this file as a
    package; pytest may import it alone from a checkout whose folder name is no identifier: then there is no
    package and no node table.)"""
    if __package__ and name == "comfy_entrypoint" and _comfy_has_v3():
        from .nodes.v3 import comfy_entrypoint

        return comfy_entrypoint
    if __package__ and name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS") and not _comfy_has_v3():
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


WEB_DIRECTORY = "./web"
__version__ = "0.1.0"

__all__ = ["WEB_DIRECTORY"]
