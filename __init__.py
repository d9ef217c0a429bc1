"""Q-Sched for ComfyUI: quantized few-step diffusion with per-step scheduler coefficients.

ComfyUI imports this file by location under whatever folder name the pack was cloned into, so every
import inside the pack is relative. For pip (CLI, tests) the same tree is the package ``qsched_pack``.
"""

if __package__:  # ComfyUI and pip import this file as a package; pytest may import it alone from a checkout
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # whose folder name is no identifier

WEB_DIRECTORY = "./web"
__version__ = "0.1.0"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
