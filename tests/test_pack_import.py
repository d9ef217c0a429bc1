"""The pack imports the way ComfyUI loads it: by file location, under an arbitrary folder name, with ComfyUI's own
top-level ``nodes`` module already in ``sys.modules``."""

import os
import shutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imports_under_any_folder_name(tmp_path):
    dest = tmp_path / "custom_nodes" / "ComfyUI-Q.Sched main"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info",
                                                              "qsched-demo", ".hypothesis", ".pytest_cache",
                                                              ".pyshim", ".dev-*", ".dev", ".pp"))
    script = textwrap.dedent(f"""
        import importlib.util, sys, types
        sys.modules["nodes"] = types.ModuleType("nodes")   # ComfyUI's own module
        sys.modules["qsched_pack"] = None                  # the pip name must not be needed
        path = {str(dest)!r}
        name = path.replace(".", "_x_")                    # what ComfyUI's load_custom_node does
        spec = importlib.util.spec_from_file_location(name, path + "/__init__.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        assert isinstance(mod.NODE_CLASS_MAPPINGS, dict)
        samplers = importlib.import_module(name + ".qsched.samplers")
        c = importlib.import_module(name + ".qsched.coefficients").Coefficients.identity(2)
        print("OK", len(mod.NODE_CLASS_MAPPINGS), samplers.SAMPLERS["tcd"].__name__, c.steps)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout and "sample_tcd 2" in out.stdout
