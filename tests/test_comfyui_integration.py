"""The pack inside a real headless ComfyUI server (runs only when COMFYUI_PATH points at a ComfyUI checkout).

    scripts/setup_comfyui.sh /work/comfy /work/comfy-venv
    COMFYUI_PATH=/work/comfy COMFYUI_PYTHON=/work/comfy-venv/bin/python \
        .venv/bin/python -m pytest -m comfyui tests/test_comfyui_integration.py

COMFYUI_PYTHON is the interpreter of ComfyUI's own venv (default: the one running pytest). The server is started
with ``--extra-model-paths-config``: the pack is loaded from a custom_nodes folder that links to this checkout
under a name other than ``qsched_pack`` (ComfyUI imports packs by location), and the models are random-weight files
in ComfyUI's own formats (tests/data/build_tiny_comfy_models.py; ~45 s to build, ~1.7 GB; set
QSCHED_TINY_MODELS=DIR to build them once and reuse). The example workflows are converted from UI to API format
with the server's ``/object_info`` input order, shrunk to 64x64 and run. T5-XXL cannot be made small, so in the
FLUX workflow DualCLIPLoader(clip_l, t5xxl, "flux") is replaced by CLIPLoader(clip_l, "sd3"), which yields the same
conditioning shapes (context 4096, pooled 2048 = the tiny FLUX model's vec_in_dim).

JAQ scorers are tiny random CLIPs saved in the users' formats (tests/jaq_fixtures.py) under the standard file names in
the server's models/qsched/. HPSv2.1 is loaded as open_clip "ViT-H-14", which cannot be made small: a test-only module
in the server's custom_nodes folder registers the tiny HPS config under that name (open_clip.add_model_config), the
same substitution as CLIP-L for T5. The calibration workflows run with 2 short prompts, a 3-value grid and 64x64.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from comfy_env import COMFYUI_PATH, COMFYUI_PYTHON, REPO, require_comfyui

pytestmark = pytest.mark.comfyui

DATA = Path(__file__).resolve().parent / "data"
WORKFLOWS = REPO / "workflows"
PACK_DIR_NAME = "ComfyUI-QSched"  # not the pip name: proves the pack's imports are relative
SIZE = 64

require_comfyui()

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_workflows import ui_to_api  # noqa: E402  (tests/ is on sys.path under pytest's default import mode)


def find(prompt: dict, class_type: str) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


# ------------------------------------------------------------------------------------------------------------------
# server
# ------------------------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, root: Path, models: Path, open_clip_configs: Path | None = None):
        self.root, self.models, self.open_clip_configs = root, models, open_clip_configs
        self.output = root / "output"
        self.log_path = root / "server.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        nodes_dir = self.root / "custom_nodes"
        for d in (nodes_dir, self.output, self.root / "temp", self.root / "user"):
            d.mkdir()
        (nodes_dir / PACK_DIR_NAME).symlink_to(REPO, target_is_directory=True)
        if self.open_clip_configs is not None:  # test-only: tiny architectures under the real open_clip names
            (nodes_dir / "qsched_test_open_clip_configs.py").write_text(
                "import open_clip\n"
                f"open_clip.add_model_config({str(self.open_clip_configs)!r})\n"
                "NODE_CLASS_MAPPINGS = {}\n")
        (self.models / "qsched").mkdir(exist_ok=True)
        yaml = self.root / "extra_model_paths.yaml"
        yaml.write_text("qsched_test:\n"
                        f"  base_path: {self.models}\n"
                        "  checkpoints: checkpoints\n  diffusion_models: diffusion_models\n"
                        "  text_encoders: text_encoders\n  vae: vae\n  qsched: qsched\n"
                        f"  custom_nodes: {nodes_dir}\n")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--extra-model-paths-config", str(yaml), "--output-directory", str(self.output),
             "--temp-directory", str(self.root / "temp"), "--user-directory", str(self.root / "user"),
             "--disable-metadata"],
            cwd=COMFYUI_PATH, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer in 300 s:\n{self.log_text()[-4000:]}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": prompt, "client_id": "qsched-test", "prompt_id": str(uuid.uuid4())})

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue, wait, return the /history entry; fails with the server's own error text."""
        status, body = self.queue(prompt)
        assert status == 200 and not body.get("node_errors"), f"prompt rejected ({status}): {json.dumps(body)[:3000]}"
        pid = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist:  # an entry appears once the prompt finished (success, error or interrupt)
                return hist[pid]
            time.sleep(0.25)
        raise AssertionError(f"prompt {pid} did not finish in {timeout} s; log tail:\n{self.log_text()[-3000:]}")

    def latent(self, entry: dict, node_id: str):
        files = entry["outputs"][node_id]["latents"]
        assert len(files) == 1
        f = files[0]
        path = self.output / f["subfolder"] / f["filename"]
        return safetensors_torch.load_file(str(path))["latent_tensor"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_message(entry: dict) -> str:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return data["exception_message"]
    raise AssertionError(f"no execution_error in {entry['status']}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    cached = os.environ.get("QSCHED_TINY_MODELS")
    models = Path(cached) if cached else tmp_path_factory.mktemp("models")
    marker = models / "diffusion_models" / "flux1-schnell.safetensors"
    if not marker.exists():
        subprocess.run([COMFYUI_PYTHON, str(DATA / "build_tiny_comfy_models.py"), str(models)], cwd=COMFYUI_PATH,
                       check=True, timeout=900)
    return models


@pytest.fixture(scope="session")
def jaq_weights(tmp_path_factory, tiny_models) -> Path:
    """Tiny scorer files under the standard names in models/qsched/; returns the open_clip config folder that makes
    'ViT-H-14' the tiny HPS architecture."""
    from jaq_fixtures import (TINY_HPS, register_tiny_hps_config, save_open_clip_checkpoint,
                              save_openai_torchscript)

    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    register_tiny_hps_config(cfg_dir)
    override = tmp_path_factory.mktemp("open_clip_override")
    (override / "ViT-H-14.json").write_text((cfg_dir / f"{TINY_HPS}.json").read_text())
    q = tiny_models / "qsched"
    q.mkdir(exist_ok=True)
    for name, build in (("RN50.pt", lambda p: save_openai_torchscript(p, "rn", seed=1)),
                        ("ViT-B-16.pt", lambda p: save_openai_torchscript(p, "vit", seed=2)),
                        ("ViT-L-14.pt", lambda p: save_openai_torchscript(p, "vit", seed=3)),
                        ("HPS_v2.1_compressed.pt", lambda p: save_open_clip_checkpoint(p, TINY_HPS, seed=4))):
        if not (q / name).is_file():
            build(q / name)
    return override


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_models, jaq_weights):
    srv = Server(tmp_path_factory.mktemp("comfy"), tiny_models, jaq_weights).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def object_info(server) -> dict:
    return server.get("/object_info")


def load_api(name: str, object_info: dict) -> dict:
    return ui_to_api(json.loads((WORKFLOWS / name).read_text()), object_info)


def add_save_latent(prompt: dict, src: str, slot: int = 0, prefix: str = "qs") -> str:
    nid = str(max(int(k) for k in prompt) + 1)
    prompt[nid] = {"class_type": "SaveLatent", "inputs": {"samples": [src, slot], "filename_prefix": f"{prefix}_{nid}"}}
    return nid


def set_identity(prompt: dict) -> None:
    c = prompt[find(prompt, "QSchedCoefficients")]["inputs"]
    c.update(c_x_start=1.0, c_x_end=1.0, c_eps_start=1.0, c_eps_end=1.0, c_x_override="", c_eps_override="")


# ------------------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------------------
def test_pack_imports_and_registers(server, object_info):
    log = server.log_text()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_DIR_NAME in line]
    assert not failed, "\n".join(failed) + "\n" + log[-4000:]
    assert re.search(rf"seconds: .*{re.escape(PACK_DIR_NAME)}", log), log[-4000:]
    from qsched_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    for name in NODE_CLASS_MAPPINGS:
        assert name in object_info, name
        assert object_info[name]["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[name]
    spec = object_info["QSchedCoefficients"]["input"]["required"]["c_eps_start"][1]
    assert (spec["min"], spec["max"], spec["step"], spec.get("display")) == (0.001, 10.0, 0.001, None)
    templates = server.get("/api/workflow_templates")
    assert sorted(templates[PACK_DIR_NAME]) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def test_v3_nodes_keep_every_declared_interface(object_info, folder_paths):
    """The server registers the pack's nodes through ``comfy_entrypoint`` (V3 schema: ``api_node`` is always present,
    classic nodes only send it when set) with exactly the declared interface: node id, display name, category,
    input names in order, types, defaults, ranges, tooltips, outputs and their names, output-node flag. So workflow
    JSON saved before the V3 port (the templates, users' files) loads unchanged; the workflow tests below run them."""
    from qsched_pack.nodes import NODE_CLASS_MAPPINGS

    for name, cls in NODE_CLASS_MAPPINGS.items():
        live = object_info[name]
        assert live.get("api_node") is False, f"{name} is not registered as a V3 node"
        assert (live["display_name"], live["category"]) == (cls.DISPLAY_NAME, cls.CATEGORY), name
        assert live["output"] == list(cls.RETURN_TYPES), name
        assert live["output_name"] == list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)), name
        assert live["output_node"] == bool(getattr(cls, "OUTPUT_NODE", False)), name
        declared = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            want, got = declared.get(section, {}), live["input"].get(section, {})
            assert list(got) == list(want), (name, section)
            for inp, spec in want.items():
                kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
                live_kind, live_opts = got[inp][0], got[inp][1]
                if isinstance(kind, list):  # file lists differ (the server's folders, this test's stand-in)
                    assert isinstance(live_kind, list), (name, inp)  # list-typed: ComfyUI checks the value
                else:
                    assert live_kind == kind, (name, inp)
                keys = [k for k in opts if not (isinstance(kind, list) and k == "default")]  # a file list's first file
                assert {k: live_opts.get(k) for k in keys} == {k: opts[k] for k in keys}, (name, inp)
        # hidden inputs are not part of a V3 node's /object_info; the graph-check tests show they still arrive


def test_object_info_snapshot_matches_server(object_info):
    """tests/data/object_info_core.json (used by the CI workflow checks) must describe this ComfyUI's core nodes."""
    snapshot = json.loads((DATA / "object_info_core.json").read_text())
    for name, info in snapshot.items():
        live = object_info[name]
        assert live["input_order"] == info["input_order"], name
        assert live["output"] == info["output"], name


def test_ksampler_identity_matches_core_ksampler(server):
    """Q-Sched KSampler with identity coefficients == core KSampler (same sampler, 'simple' schedule), bit for bit."""
    for sampler in ("euler_ancestral", "euler", "lcm"):
        p = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_turbo_1.0_fp16.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 2}},
            "5": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7,
                "steps": 4, "cfg": 1.5, "sampler_name": sampler, "scheduler": "simple", "denoise": 1.0}},
            "6": {"class_type": "QSchedCoefficients", "inputs": {
                "steps": 4, "c_x_start": 1.0, "c_x_end": 1.0, "c_eps_start": 1.0, "c_eps_end": 1.0}},
            "7": {"class_type": "QSchedKSampler", "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7,
                "steps": 4, "cfg": 1.5, "sampler_name": sampler, "scheduler": "simple", "eta": 1.0,
                "denoise": 1.0,
                "coefficients": ["6", 0]}},
            "8": {"class_type": "QSchedCoefficients", "inputs": {
                "steps": 4, "c_x_start": 0.95, "c_x_end": 1.0, "c_eps_start": 1.05, "c_eps_end": 1.0}},
            "9": {"class_type": "QSchedKSampler", "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7,
                "steps": 4, "cfg": 1.5, "sampler_name": sampler, "scheduler": "simple", "eta": 1.0,
                "denoise": 1.0,
                "coefficients": ["8", 0]}},
        }
        core, ident, qs = (add_save_latent(p, n, prefix=f"parity_{sampler}") for n in ("5", "7", "9"))
        entry = server.run(p)
        assert entry["status"]["status_str"] == "success", entry["status"]
        a, b, c = (server.latent(entry, n) for n in (core, ident, qs))
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), f"{sampler}: max |diff| {(a - b).abs().max()}"
        assert not torch.allclose(a, c), sampler


def test_sdxl_turbo_workflow(server, object_info):
    latents = {}
    for mode in ("qsched", "identity"):
        p = load_api("qsched_sdxl_turbo_w4a8.json", object_info)
        lat = p[find(p, "EmptyLatentImage")]["inputs"]
        lat.update(width=SIZE, height=SIZE)
        p[find(p, "SaveImage")]["inputs"]["filename_prefix"] = f"sdxl_{mode}"
        if mode == "identity":
            set_identity(p)
        sl = add_save_latent(p, find(p, "QSchedKSampler"), prefix=f"sdxl_{mode}")
        entry = server.run(p)
        assert entry["status"]["status_str"] == "success", entry["status"]
        images = entry["outputs"][find(p, "SaveImage")]["images"]
        assert len(images) == 1 and (server.output / images[0]["subfolder"] / images[0]["filename"]).is_file()
        assert "w4a8" in entry["outputs"][find(p, "QSchedCheckpointLoader")]["text"][0]
        latents[mode] = server.latent(entry, sl)
    assert latents["qsched"].shape == (1, 4, SIZE // 8, SIZE // 8)
    assert torch.isfinite(latents["qsched"]).all()
    assert not torch.allclose(latents["qsched"], latents["identity"])


def flux_prompt(object_info, mode: str) -> dict:
    p = load_api("qsched_flux_schnell_w4a8.json", object_info)
    dual = find(p, "DualCLIPLoader")
    p[dual] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "sd3"}}
    p[find(p, "EmptySD3LatentImage")]["inputs"].update(width=SIZE, height=SIZE)
    p[find(p, "SaveImage")]["inputs"]["filename_prefix"] = f"flux_{mode}"
    if mode == "identity":
        set_identity(p)
    return p


def test_flux_schnell_workflow(server, object_info):
    latents = {}
    for mode in ("qsched", "identity"):
        p = flux_prompt(object_info, mode)
        sl = add_save_latent(p, find(p, "SamplerCustomAdvanced"), prefix=f"flux_{mode}")
        entry = server.run(p)
        assert entry["status"]["status_str"] == "success", entry["status"]
        images = entry["outputs"][find(p, "SaveImage")]["images"]
        assert len(images) == 1 and (server.output / images[0]["subfolder"] / images[0]["filename"]).is_file()
        latents[mode] = server.latent(entry, sl)
    assert latents["qsched"].shape == (1, 16, SIZE // 8, SIZE // 8)
    assert torch.isfinite(latents["qsched"]).all()
    assert not torch.allclose(latents["qsched"], latents["identity"])


# ---- bad input inside a graph: the error names the node input ----------------------------------------------------
def _rejected(server, prompt) -> str:
    """Queues a prompt that must be refused; each refused node carries ONE message (not one per input)."""
    status, body = server.queue(prompt)
    assert status == 400, body
    for nid, err in body["node_errors"].items():
        assert len(err["errors"]) == 1, (nid, err["errors"])
    return json.dumps(body["node_errors"])


def test_malformed_preset_is_rejected_naming_the_input(server):
    (server.models / "qsched" / "broken.json").write_text('{"c_x": [1.0, 0.9], "c_eps": [1.0]}')
    (server.models / "qsched" / "good.json").write_text(
        '{"format": "qsched-coefficients", "version": 1, "steps": 2, "c_x": [0.9, 1.0], "c_eps": [1.1, 1.0]}')
    p = {"1": {"class_type": "QSchedLoadPreset", "inputs": {"preset": "broken.json"}},
         "2": {"class_type": "QSchedSavePreset", "inputs": {"coefficients": ["1", 0], "name": "copy", "overwrite": True}}}
    errors = _rejected(server, p)
    assert "preset" in errors and "same length" in errors, errors
    p["1"]["inputs"]["preset"] = "missing.json"
    errors = _rejected(server, p)
    assert "preset" in errors and "not found" in errors, errors
    p["1"]["inputs"]["preset"] = "good.json"
    entry = server.run(p)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = json.loads((server.models / "qsched" / "copy.json").read_text())
    assert saved["c_x"] == [0.9, 1.0] and saved["c_eps"] == [1.1, 1.0]


def test_preset_names_stay_in_their_folder_on_a_live_server(server, tmp_path):
    """A queued workflow cannot make Save Preset overwrite a scorer's config.json, write through a symlinked
    subfolder, or Load Preset read through a symlink out of models/qsched/."""
    q = server.models / "qsched"
    clip = q / "it-clip-folder"
    clip.mkdir(exist_ok=True)
    (clip / "config.json").write_text('{"model_type": "clip"}')
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.json").write_text('{"c_x": [1.0], "c_eps": [1.0], "metadata": {"secret": "from outside"}}')
    for name, target in (("it_linked_dir", outside), ("it_linked.json", outside / "x.json")):
        (q / name).unlink(missing_ok=True)
        (q / name).symlink_to(target)

    def save(name):
        return {"1": {"class_type": "QSchedCoefficients", "inputs": {
                    "steps": 1, "c_x_start": 1.0, "c_x_end": 1.0, "c_eps_start": 1.0, "c_eps_end": 1.0}},
                "2": {"class_type": "QSchedSavePreset", "inputs": {"coefficients": ["1", 0], "name": name,
                                                                   "overwrite": True}}}

    errors = _rejected(server, save("it-clip-folder/config"))
    assert "name" in errors and "not a Q-Sched preset" in errors, errors
    errors = _rejected(server, save("it_linked_dir/p"))
    assert "name" in errors and "leads out" in errors, errors
    errors = _rejected(server, {"1": {"class_type": "QSchedLoadPreset", "inputs": {"preset": "it_linked.json"}},
                                "2": {"class_type": "QSchedSavePreset", "inputs": {
                                    "coefficients": ["1", 0], "name": "it_copy", "overwrite": True}}})
    assert "preset" in errors and "leads out" in errors and "from outside" not in errors, errors
    assert (clip / "config.json").read_text() == '{"model_type": "clip"}' and list(outside.iterdir()) == [
        outside / "x.json"]
    for name in ("it_linked_dir", "it_linked.json"):
        (q / name).unlink()


def test_missing_weight_file_is_rejected_naming_the_input(server):
    p = {"1": {"class_type": "QSchedCheckpointLoader", "inputs": {
              "ckpt_name": "no_such_model.safetensors", "precision": "w4a8", "backend": "auto"}},
         "2": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
         "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
         "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    errors = _rejected(server, p)
    assert "ckpt_name" in errors and "no_such_model.safetensors" in errors, errors


def test_jaq_loader_confines_names_and_never_runs_archive_code(server, tmp_path):
    """A workflow cannot name a scorer file outside models/qsched/ (.., absolute, symlink out): refused at queue
    time. A TorchScript archive whose __setstate__ writes a file, placed as a scorer weight, never runs."""
    from test_security import _malicious_archive

    target = tmp_path / "pwned"
    outside = server.root / "outside"
    outside.mkdir(exist_ok=True)
    evil = _malicious_archive(outside / "evil.pt", target)
    q = server.models / "qsched"
    link = q / "it_linked_evil.pt"
    link.unlink(missing_ok=True)
    link.symlink_to(evil)

    def loader(iq):
        return {"1": {"class_type": "QSchedJAQLoader", "inputs": {
                    "preset": "clip", "k": 2.0, "tc_weights": "auto", "iq_weights": iq, "device": "auto",
                    "dtype": "auto"}},
                "2": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1,
                                                             "color": 0}},
                "3": {"class_type": "QSchedJAQScore", "inputs": {"images": ["2", 0], "scorer": ["1", 0],
                                                                 "prompts": "a square"}}}

    for name in (os.path.relpath(evil, q), str(evil), "it_linked_evil.pt"):
        errors = _rejected(server, loader(name))
        assert "iq_weights" in errors and ("inside" in errors or "leads out" in errors), (name, errors)
    shutil.copy(evil, q / "it_evil_RN50.pt")
    entry = server.run(loader("it_evil_RN50.pt"))
    assert entry["status"]["status_str"] == "error", entry["status"]
    msg = _error_message(entry)
    assert "iq_weights" in msg and "it_evil_RN50.pt" in msg, msg
    assert not target.exists()
    link.unlink()
    (q / "it_evil_RN50.pt").unlink()


def test_bad_override_is_rejected_naming_the_input(server):
    p = {"1": {"class_type": "QSchedCoefficients", "inputs": {
              "steps": 4, "c_x_start": 1.0, "c_x_end": 1.0, "c_eps_start": 1.0, "c_eps_end": 1.0,
              "c_x_override": "1.0, abc"}},
         "2": {"class_type": "QSchedSavePreset", "inputs": {"coefficients": ["1", 0], "name": "x", "overwrite": True}}}
    errors = _rejected(server, p)
    assert "c_x_override" in errors and "abc" in errors, errors


def test_flow_model_with_eps_only_sampler_names_the_input(server, object_info):
    p = flux_prompt(object_info, "tcd")
    p[find(p, "QSchedSampler")]["inputs"]["sampler_name"] = "tcd"
    entry = server.run(p)
    assert entry["status"]["status_str"] == "error"
    msg = _error_message(entry)
    assert "Q-Sched Sampler: input 'sampler_name'" in msg and "flow model" in msg, msg
    # blamed on Q-Sched Sampler itself (found from the graph and the file header), not on SamplerCustomAdvanced
    err = next(d for kind, d in entry["status"]["messages"] if kind == "execution_error")
    assert err["node_type"] == "QSchedSampler", err["node_type"]


def test_steps_mismatch_names_the_input(server, object_info):
    p = load_api("qsched_sdxl_turbo_w4a8.json", object_info)
    p[find(p, "EmptyLatentImage")]["inputs"].update(width=SIZE, height=SIZE)
    p[find(p, "QSchedCoefficients")]["inputs"]["steps"] = 3
    p[find(p, "QSchedKSampler")]["inputs"]["steps"] = 4  # unlinked from the coefficients' steps output
    status, body = server.queue(p)  # refused on queue, on the node whose input is wrong (nodes/graph.py)
    ks = find(p, "QSchedKSampler")
    msg = json.dumps(body.get("node_errors", {}).get(ks, {}))
    assert status == 400 and "input 'steps'" in msg and "3 steps" in msg, (status, json.dumps(body)[:2000])



# ---- JAQ and calibration ------------------------------------------------------------------------------------------
CALIB_PROMPTS = "a red fox in the snow\na bowl of fruit on a wooden table"


def _ui_text(entry: dict, node_id: str) -> str:
    texts = entry["outputs"][node_id]["text"]
    assert len(texts) == 1
    return texts[0]


def test_jaq_score_node_matches_the_library(server):
    """JAQ Score in the server == calibration.jaq.JAQ on the same pixels and files, per image; errors name inputs."""
    from qsched_pack.calibration.jaq import JAQ

    colors = (0x3366CC, 0xE0A020)
    p = {"1": {"class_type": "QSchedJAQLoader", "inputs": {
              "preset": "clip", "k": 2.0, "tc_weights": "auto", "iq_weights": "RN50.pt", "device": "auto",
              "dtype": "auto"}},
         "2": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1,
                                                      "color": colors[0]}},
         "3": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1,
                                                      "color": colors[1]}},
         "4": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["3", 0]}},
         "5": {"class_type": "QSchedJAQScore", "inputs": {"images": ["4", 0], "scorer": ["1", 0],
                                                          "prompts": "a blue square\n# comment\nan orange square"}}}
    entry = server.run(p)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = _ui_text(entry, "5")
    got = [float(m) for m in re.findall(r"image \d+: JAQ=([-\d.e+]+)", report)]
    mean = float(re.search(r"mean JAQ over 2 images: ([-\d.e+]+)", report).group(1))
    assert "clipscore=" in report and "clipiqa=" in report and "RN50.pt" in _ui_text(entry, "1")
    imgs = torch.stack([torch.tensor([(c >> 16) & 255, (c >> 8) & 255, c & 255], dtype=torch.float32)
                        .div(255).expand(SIZE, SIZE, 3) for c in colors])
    q = server.models / "qsched"
    want = JAQ(preset="clip", k=2.0, device="cpu",
               weights={"clipscore": q / "ViT-L-14.pt", "clipiqa": q / "RN50.pt"}).score(
        imgs, ["a blue square", "an orange square"]).tolist()
    assert got == pytest.approx(want, rel=1e-3, abs=1e-4), (got, want)
    assert mean == pytest.approx(sum(want) / 2, rel=1e-3, abs=1e-4)

    bad = json.loads(json.dumps(p))
    bad["5"]["inputs"]["prompts"] = "one\ntwo\nthree"
    entry = server.run(bad)
    assert entry["status"]["status_str"] == "error"
    msg = _error_message(entry)
    assert "Q-Sched JAQ Score: input 'prompts'" in msg and "3 prompt lines for 2 images" in msg, msg
    bad["5"]["inputs"]["prompts"] = "  \n# only a comment"
    errors = _rejected(server, bad)
    assert "prompts" in errors and "is empty" in errors, errors
    bad = json.loads(json.dumps(p))
    bad["1"]["inputs"]["tc_weights"] = "no_such_clip.pt"
    errors = _rejected(server, bad)
    assert "tc_weights" in errors and "no_such_clip.pt" in errors, errors


def set_objective(wf: dict, objective: str = "JAQ (paper)") -> dict:
    """A calibration template (UI form) switched to another objective. The templates calibrate against the
    full-precision model with their JAQ nodes muted; 'JAQ (paper)' / 'hybrid' unmutes them and connects the JAQ
    Loader to Calibrate's 'scorer', as an artist with the scorer files would."""
    cal = next(n for n in wf["nodes"] if n["type"] == "QSchedCalibrate")
    cal["widgets_values"][-1] = objective
    if objective != "match full precision":
        for n in wf["nodes"]:
            n["mode"] = 0
        jaq = next(n for n in wf["nodes"] if n["type"] == "QSchedJAQLoader")
        wf["last_link_id"] += 1
        wf["links"].append([wf["last_link_id"], jaq["id"], 0, cal["id"], 3, "QSCHED_JAQ"])
        jaq["outputs"][0]["links"].append(wf["last_link_id"])
        next(i for i in cal["inputs"] if i["name"] == "scorer")["link"] = wf["last_link_id"]
    return wf


def calib_prompt(object_info, name: str, preset_name: str, objective: str = "match full precision",
                 **settings) -> dict:
    """A calibration template in API form with this objective (:func:`set_objective`), shrunk."""
    p = ui_to_api(set_objective(json.loads((WORKFLOWS / name).read_text()), objective), object_info)
    if "flux" in name:
        p[find(p, "DualCLIPLoader")] = {"class_type": "CLIPLoader",
                                        "inputs": {"clip_name": "clip_l.safetensors", "type": "sd3"}}
    cal = p[find(p, "QSchedCalibrate")]["inputs"]
    # overwrite: QSCHED_TINY_MODELS may hold a preset of that name from an earlier session (the refusal itself is
    # checked in the browser suite and tests/test_node_texts.py)
    cal.update(prompts=CALIB_PROMPTS, width=SIZE, height=SIZE, points=3, batch=2, preset_name=preset_name,
               overwrite=True)
    cal.update(settings)
    for nid, node in p.items():
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            node["inputs"].update(width=SIZE, height=SIZE)
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = preset_name
    return p


def _preview_pngs(server, entry, p) -> list[bytes]:
    """The PNGs the PreviewImage nodes show, fetched as the frontend does (/view)."""
    out = []
    for nid, node in p.items():
        if node["class_type"] == "PreviewImage":
            imgs = entry["outputs"][nid]["images"]
            assert len(imgs) == 1
            f = imgs[0]
            query = urllib.parse.urlencode({"filename": f["filename"], "subfolder": f["subfolder"], "type": f["type"]})
            with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=60) as r:
                out.append(r.read())
    assert len(out) == 2
    return out


def _summary(entry, p) -> dict:
    text = _ui_text(entry, find(p, "QSchedCalibrate"))
    m = re.search(r"(\d+) points? \((\d+) from the record, (\d+) computed now\)", text)
    assert m, text
    return {"text": text, "points": int(m.group(1)), "from_record": int(m.group(2)), "computed": int(m.group(3)),
            "record": Path(re.search(r"^record: (.+)$", text, re.M).group(1)),
            "preset": Path(re.search(r"^preset: (.+)$", text, re.M).group(1))}


def interrupt_when(server, pid: str, ready, timeout: float, settle: float = 0.0) -> dict:
    """Wait until ``ready()`` while prompt ``pid`` runs, POST /interrupt (after ``settle`` s), wait for it to end;
    it must end interrupted. Returns its /history entry."""
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, server.log_text()[-3000:]
        assert pid not in server.get(f"/history/{pid}"), "the run ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(settle)
    status, _ = server.post("/interrupt", {})
    assert status == 200
    while pid not in server.get(f"/history/{pid}"):
        assert time.time() < deadline, server.log_text()[-3000:]
        time.sleep(0.1)
    entry = server.get(f"/history/{pid}")[pid]
    assert entry["status"]["status_str"] == "error", entry["status"]
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"]), entry["status"]
    return entry


def _record_points(path: Path) -> int:
    return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0


def _without_test_render(p: dict) -> dict:
    """The calibration part of the SDXL calibration workflow only (drops the sample-and-score part)."""
    keep = {"QSchedCheckpointLoader", "QSchedQuantizeModel", "QSchedJAQLoader", "QSchedCalibrate", "PreviewImage"}
    return {k: v for k, v in p.items() if v["class_type"] in keep}


def test_sdxl_turbo_calibration_workflow_interrupt_and_resume(server, object_info):
    """The SDXL-Turbo calibration workflow (preference JAQ, 'start' space), shrunk to 2 prompts and a 2-value grid
    (+ identity = 5 points). Its preset feeds the sampling workflow through Q-Sched Load Preset. Then the same
    settings again, interrupted with POST /interrupt after 2 recorded points and queued once more: the recorded points
    are not recomputed, and the preset equals the uninterrupted run's."""
    settings = dict(strategy="grid", points=2, budget=10, objective="JAQ (paper)")
    p = calib_prompt(object_info, "qsched_sdxl_turbo_w4a8_calibrate.json", "it_sdxl_calibrated", **settings)
    entry = server.run(p)
    assert entry["status"]["status_str"] == "success", entry["status"]
    s = _summary(entry, p)
    assert s["preset"] == server.models / "qsched" / "it_sdxl_calibrated.json" and s["preset"].is_file()
    reference = json.loads(s["preset"].read_text())
    meta = reference["metadata"]
    assert reference["steps"] == 4 and meta["kind"] == "qsched-calibration" and meta["jaq"]["preset"] == "preference"
    assert meta["quant"] == "w4a8" and meta["sampler"] == "euler_ancestral" and meta["images_spent"] == 10
    assert (s["points"], s["computed"], s["from_record"]) == (5, 5, 0) and meta["points_evaluated"] == 5
    assert "best JAQ" in s["text"] and _record_points(s["record"]) == 5
    for png in _preview_pngs(server, entry, p):  # landscape + identity-vs-best grid
        assert png.startswith(b"\x89PNG")
    assert "images" not in entry["outputs"][find(p, "QSchedCalibrate")]  # shown once, by the Preview Image nodes
    images = entry["outputs"][find(p, "SaveImage")]["images"]  # sampled with the calibrated coefficients
    assert (server.output / images[0]["subfolder"] / images[0]["filename"]).is_file()
    report = _ui_text(entry, find(p, "QSchedJAQScore"))
    assert "aqmap=" in report and "hpsv2=" in report and "mean JAQ over 1 image" in report, report

    # the sampling workflow, with Q-Sched Load Preset in place of Q-Sched Coefficients
    q = load_api("qsched_sdxl_turbo_w4a8.json", object_info)
    q[find(q, "EmptyLatentImage")]["inputs"].update(width=SIZE, height=SIZE)
    q[find(q, "QSchedCoefficients")] = {"class_type": "QSchedLoadPreset",
                                        "inputs": {"preset": "it_sdxl_calibrated.json"}}
    entry = server.run(q)
    assert entry["status"]["status_str"] == "success", entry["status"]

    # interrupt and resume
    record = s["record"]
    record.unlink()  # same settings = same record file: start from nothing
    resumed_preset = server.models / "qsched" / "it_sdxl_resumed.json"
    resumed_preset.unlink(missing_ok=True)  # QSCHED_TINY_MODELS may hold one from an earlier session
    p = _without_test_render(calib_prompt(object_info, "qsched_sdxl_turbo_w4a8_calibrate.json", "it_sdxl_resumed",
                                          **settings))
    status, body = server.queue(p)
    assert status == 200 and not body.get("node_errors"), body
    interrupt_when(server, body["prompt_id"], lambda: _record_points(record) >= 2, 900)
    done = _record_points(record)
    assert 2 <= done < 5, done
    assert not resumed_preset.exists()
    assert "queue the same settings again to resume" in server.log_text()

    entry = server.run(p)
    assert entry["status"]["status_str"] == "success", entry["status"]
    s = _summary(entry, p)
    assert (s["points"], s["from_record"], s["computed"]) == (5, done, 5 - done), s["text"]
    assert _record_points(record) == 5
    assert json.loads(s["preset"].read_text()) == reference


def test_flux_schnell_calibration_workflow(server, object_info):
    """The FLUX calibration workflow (flow Euler), shrunk, with the 'clip' JAQ preset (the other files)."""
    p = calib_prompt(object_info, "qsched_flux_schnell_w4a8_calibrate.json", "it_flux_calibrated", budget=4,
                     objective="JAQ (paper)")
    p[find(p, "QSchedJAQLoader")]["inputs"]["preset"] = "clip"
    entry = server.run(p)
    assert entry["status"]["status_str"] == "success", entry["status"]
    s = _summary(entry, p)
    preset = json.loads(s["preset"].read_text())
    assert preset["steps"] == 4 and preset["metadata"]["sampler"] == "euler"
    assert preset["metadata"]["jaq"]["preset"] == "clip" and preset["metadata"]["images_spent"] <= 4
    assert "stopped by the budget" in s["text"]
    assert all(png.startswith(b"\x89PNG") for png in _preview_pngs(server, entry, p))
    images = entry["outputs"][find(p, "SaveImage")]["images"]  # rendered with the calibrated coefficients
    assert (server.output / images[0]["subfolder"] / images[0]["filename"]).is_file()
    assert "mean JAQ over 1 image" in _ui_text(entry, find(p, "QSchedJAQScore"))


def test_calibration_bad_input_names_the_input(server, object_info):
    cases = [(dict(prompts="\n  \n"), "prompts", "is empty"),
             (dict(strategy="grid", points=5, budget=10), "budget", "budget too small: the grid evaluates"),
             (dict(range_min=1.2, range_max=0.8), "range_min", "must be smaller than range_max"),
             (dict(preset_name="../x"), "preset_name", "must be a name inside the folder"),
             (dict(preset_name="a b"), "preset_name", "not a plain file name")]
    for settings, name, text in cases:
        p = calib_prompt(object_info, "qsched_sdxl_turbo_w4a8_calibrate.json", "it_bad", budget=12,
                         objective="JAQ (paper)")
        p[find(p, "QSchedCalibrate")]["inputs"].update(settings)
        errors = _rejected(server, p)
        assert f"input '{name}'" in errors and text in errors, (settings, errors)
    p = calib_prompt(object_info, "qsched_flux_schnell_w4a8_calibrate.json", "it_bad", budget=6, sampler_name="tcd",
                     objective="JAQ (paper)")
    p[find(p, "QSchedSampler")]["inputs"]["sampler_name"] = "euler"  # the render part: only Calibrate is wrong
    entry = server.run(p)
    assert entry["status"]["status_str"] == "error"
    msg = _error_message(entry)
    assert "Q-Sched Calibrate: input 'sampler_name'" in msg and "flow model" in msg, msg


# ---- calibration against the full-precision model (the templates' objective) -------------------------------------
REF_PROMPTS = "\n".join(f"a {c} {t}" for c, t in zip(("red", "blue", "green", "white", "black", "yellow", "grey",
                                                         "pink", "brown", "orange"),
                                                        ("fox", "house", "boat", "cat", "car", "bird", "tree", "cup",
                                                         "dog", "hat")))


def test_sdxl_turbo_reference_calibration_interrupt_and_run_again(server, object_info):
    """The SDXL-Turbo calibration template as shipped (full-precision loader -> Quantize Model -> Calibrate with both
    models, no scorer), shrunk to 10 prompts (5 fit, 5 held out). The node says whether the fit was kept and why;
    the preset names the objective, the reference's fingerprint and the held-out numbers; the preview has the
    full-precision row. Then the same settings under another preset name, interrupted with POST /interrupt while it
    runs: nothing is written, the node says so, and queueing again gives the uninterrupted run's preset."""
    settings = dict(prompts=REF_PROMPTS, batch=5, steps=2)  # 2 steps: the CPU test's cost (84 model evaluations)
    p = _without_test_render(calib_prompt(object_info, "qsched_sdxl_turbo_w4a8_calibrate.json", "it_sdxl_ref",
                                          **settings))
    entry = server.run(p, timeout=1800)
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = _ui_text(entry, find(p, "QSchedCalibrate"))
    assert re.match(r"(kept: |identity kept \(no correction\): )on 5 held-out images", text), text  # the verdict
    assert "on 5 held-out images" in text and "cost: quantized " in text and "full-precision reference" in text
    assert "record:" not in text  # the fit keeps no record
    preset_path = Path(re.search(r"^preset: (.+)$", text, re.M).group(1))
    preset = json.loads(preset_path.read_text())
    meta = preset["metadata"]
    assert meta["objective"] == "reference" and isinstance(meta["accepted"], bool) and meta["acceptance"]
    assert meta["reference"]["quant"] is None and meta["model"]["quant"] == "w4a8"
    assert meta["reference"]["model_hash"] != meta["model"]["model_hash"]
    from qsched_pack.calibration.reference import images_per_fit_prompt

    assert meta["heldout"]["pairs"] == 5 and meta["images_spent"] == images_per_fit_prompt() * 5 + 3 * 5
    if not meta["accepted"]:
        assert preset["c_x"] == [1.0] * 2 and preset["c_eps"] == [1.0] * 2
    landscape, preview = _preview_pngs(server, entry, p)
    from PIL import Image
    import io

    w, h = Image.open(io.BytesIO(preview)).size
    assert (w, h) == (4 * SIZE, 3 * SIZE), (w, h)  # full precision, stock, calibrated; first 4 prompts
    assert Image.open(io.BytesIO(landscape)).size[0] > 0

    # the same settings again, interrupted mid-run, then queued once more
    again = server.models / "qsched" / "it_sdxl_ref_again.json"
    again.unlink(missing_ok=True)
    p = _without_test_render(calib_prompt(object_info, "qsched_sdxl_turbo_w4a8_calibrate.json", "it_sdxl_ref_again",
                                          **settings))
    mark = len(server.log_text())
    status, body = server.queue(p)
    assert status == 200 and not body.get("node_errors"), body
    started = "fitting the coefficients to the full-precision model"
    interrupt_when(server, body["prompt_id"], lambda: started in server.log_text()[mark:], 1800, settle=1.0)
    assert not again.exists()
    assert "interrupted — nothing written; queue again" in server.log_text()[mark:]
    entry = server.run(p, timeout=1800)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert json.loads(again.read_text()) == preset


def test_calibration_objective_needs_its_inputs_on_queue(server, object_info):
    """What an objective needs is checked when the prompt is queued (HTTP 400), naming the missing input."""
    p = calib_prompt(object_info, "qsched_sdxl_turbo_w4a8_calibrate.json", "it_bad_obj", prompts=REF_PROMPTS)
    cal = p[find(p, "QSchedCalibrate")]["inputs"]
    del cal["reference_model"]
    errors = _rejected(server, p)
    assert "input 'reference_model'" in errors and "match full precision" in errors, errors
    cal["objective"] = "JAQ (paper)"
    errors = _rejected(server, p)
    assert "input 'scorer'" in errors and "Q-Sched JAQ Loader" in errors, errors
    cal["objective"] = "auto"
    errors = _rejected(server, p)
    assert "input 'reference_model'" in errors and "nothing to calibrate against" in errors, errors
    p = calib_prompt(object_info, "qsched_sdxl_turbo_w4a8_calibrate.json", "it_bad_obj", prompts="a\nb\nc")
    errors = _rejected(server, p)
    assert "input 'prompts'" in errors and "at least 10 prompts" in errors, errors


def test_reference_of_another_architecture_is_refused_naming_the_input(server, object_info):
    """A FLUX file (core UNETLoader) as the reference of the SDXL-type checkpoint: refused on queue, from the two
    loaders' file headers, naming reference_model and both files; nothing runs, nothing is written."""
    p = calib_prompt(object_info, "qsched_sdxl_turbo_w4a8_calibrate.json", "it_bad_ref", prompts=REF_PROMPTS)
    p["900"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-schnell.safetensors",
                                                        "weight_dtype": "default"}}
    p[find(p, "QSchedCalibrate")]["inputs"]["reference_model"] = ["900", 0]
    errors = _rejected(server, p)
    assert "input 'reference_model'" in errors and "is a FLUX model (flux1-schnell.safetensors)" in errors, errors
    assert "another architecture" in errors, errors
    assert not (server.models / "qsched" / "it_bad_ref.json").exists()
