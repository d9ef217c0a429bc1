"""The artist's view: the pack in the real ComfyUI web frontend, in a headless Chromium (marker ``comfyui``).

Runs only when COMFYUI_PATH points at a ComfyUI checkout (as tests/test_comfyui_integration.py, whose server and
tiny-model fixtures it reuses) and Chromium, chromedriver and selenium are installed (scripts/setup_browser.sh):

    scripts/setup_browser.sh
    COMFYUI_PATH=/work/comfy COMFYUI_PYTHON=/work/comfy-venv/bin/python QSCHED_TINY_MODELS=/tmp/qs_models \\
        .venv/bin/python -m pytest -m comfyui tests/test_comfyui_browser.py

The frontend is the one ComfyUI serves (pip ``comfyui-frontend-package``, 1.27.10 for ComfyUI 0.3.64). Every
template of the pack is loaded from the server as the template browser loads it; the tiny-model versions are queued
through the frontend itself (``app.queuePrompt``, so widget order and values are the frontend's), and what the
artist sees is checked in the page: each text result inside its node's box and fitting it, each bad input's message
once, on the node it concerns, no Python repr / long hash / source path in any node text, one screenshot per message.

Screenshots and thumbnails go to a temporary folder (printed at the end), never into the repository during a test
run. QSCHED_SCREENSHOTS=DIR writes them to DIR; scripts/update_screenshots.sh (QSCHED_UPDATE_SCREENSHOTS=1) writes
the README's pictures (docs/img/) and the templates' thumbnails (workflows/<name>.jpg).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from comfy_env import require_comfyui

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
require_comfyui()


def _missing_browser() -> str | None:
    if not (CHROMIUM and CHROMEDRIVER):
        return "chromium / chromedriver not installed (scripts/setup_browser.sh)"
    try:
        import selenium.webdriver  # noqa: F401
    except ImportError:
        return "selenium is not installed in the test venv (scripts/setup_browser.sh)"
    return None


if _missing_browser():  # CI (QSCHED_REQUIRE_BROWSER=1): the suite must run, a skip would hide it
    if os.environ.get("QSCHED_REQUIRE_BROWSER"):
        pytest.fail(f"{_missing_browser()}, and QSCHED_REQUIRE_BROWSER is set", pytrace=False)
    pytest.skip(_missing_browser(), allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
PIL_Image = pytest.importorskip("PIL.Image")

# The server and model fixtures of the integration test (a second server for this module; stopped at its end).
from test_comfyui_integration import (PACK_DIR_NAME, REF_PROMPTS, SIZE, Server, jaq_weights,  # noqa: E402,F401
                                      set_objective, tiny_models)
from node_texts import plain_words_problems  # noqa: E402

WORKFLOWS = REPO / "workflows"
TEMPLATES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
OUT = Path(os.environ.get("QSCHED_SCREENSHOTS") or tempfile.mkdtemp(prefix="qsched-browser-shots-"))
if os.environ.get("QSCHED_UPDATE_SCREENSHOTS") == "1":  # explicit opt-in: the tracked pictures
    SHOTS, THUMBS = REPO / "docs" / "img", WORKFLOWS
else:
    SHOTS = THUMBS = OUT
#: One screenshot per distinct message shown in a node's result box (never in the repository).
MESSAGES = OUT / "messages"
WINDOW = (2200, 1350)
#: The node a template's thumbnail centres on.
HERO = ("QSchedCalibrate", "QSchedKSampler", "QSchedSampler")
CALIB_PROMPTS = "a red fox in the snow\na bowl of fruit on a wooden table"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models, jaq_weights):  # noqa: F811
    for old in (tiny_models / "qsched").glob("browser_*.json"):  # QSCHED_TINY_MODELS may hold an earlier session's
        old.unlink()
    srv = Server(tmp_path_factory.mktemp("comfy_browser"), tiny_models, jaq_weights).start()
    yield srv
    srv.stop()


class Page:
    """One Chromium tab on the ComfyUI page, plus helpers that run in the page."""

    def __init__(self, driver, server):
        self.d, self.server = driver, server
        self.seen: dict[str, str] = {}  # every text shown on a node -> where its screenshot is

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def js_async(self, script: str, *args):
        """``script`` is the body of an async function; its return value comes back."""
        return self.d.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"(async (...args) => {{ {script} }})(...Array.from(arguments).slice(0, -1))"
            ".then(done, e => done({__error: String(e && e.stack || e)}));", *args)

    def wait(self, script: str, timeout: float = 60, what: str = ""):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.js(script)
            if v:
                return v
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what or script}")

    def open(self):
        self.d.get(self.server.url + "/")
        self.wait("return !!(window.app && window.app.graph && window.LiteGraph && window.app.canvas)", 180,
                  "the ComfyUI app")
        # the page's own record of execution events (queued runs are awaited through it)
        self.js("""
            window.__qs = {events: []};
            const api = window.comfyAPI.api.api;
            for (const t of ['execution_start', 'execution_success', 'execution_error', 'execution_interrupted'])
                api.addEventListener(t, e => window.__qs.events.push({type: t, detail: e.detail}));
            window.__qs.texts = []; window.__qs.alltexts = [];
            api.addEventListener('progress_text', e => { window.__qs.texts.push(e.detail);
                                                         window.__qs.alltexts.push(e.detail); });
        """)
        self.wait("return !!window.app.extensionManager?.setting", 60, "the settings")
        # screenshots: text drawn at every zoom they use, no minimap over the graph, no frame-rate counter
        self.js_async("const s = window.app.extensionManager.setting;"
                      "await s.set('Comfy.Minimap.Visible', false);"
                      "await s.set('Comfy.Graph.CanvasInfo', false);"
                      "await s.set('LiteGraph.Canvas.MinFontSizeForLOD', 0);"
                      "await s.set('Comfy.Workflow.WorkflowTabsPosition', 'Sidebar'); return true;")

    def close_dialogs(self):
        self.js("for (const b of document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')) b.click();")
        time.sleep(0.3)

    def load_template(self, name: str, mutate=None) -> dict:
        """Loads the template as the template browser does (its JSON from the server), optionally changed first."""
        self.close_dialogs()  # e.g. the first-visit template dialog
        wf = json.loads(self.js_async(
            f"const r = await fetch('/api/workflow_templates/{PACK_DIR_NAME}/' + args[0] + '.json');"
            "return await r.text();", name))
        if mutate is not None:
            mutate(wf)
        return self.load_graph(wf, name)

    def load_graph(self, wf: dict, name: str) -> dict:
        """Loads a workflow (UI format) as the frontend loads a file; reports node types it does not know."""
        res = self.js_async("""
            window.__qs.events = [];
            const missing = [];
            const dialogs = document.querySelectorAll('.p-dialog').length;
            await window.app.loadGraphData(args[0], true, true, args[1]);
            const LG = window.LiteGraph;
            for (const n of window.app.graph._nodes)
                if (!(n.type in LG.registered_node_types) || n.has_errors) missing.push(n.type);
            return {missing, dialogs: document.querySelectorAll('.p-dialog').length - dialogs};
        """, wf, name)
        assert "__error" not in res, res
        return {"workflow": wf, **res}

    def graph_problems(self) -> list[str]:
        """Links whose ends or types do not fit, and required inputs of our nodes left unconnected."""
        return self.js("""
            const g = window.app.graph, out = [];
            const links = g.links instanceof Map ? [...g.links.values()] : Object.values(g.links || {});
            for (const l of links) {
                if (!l) continue;
                const a = g.getNodeById(l.origin_id), b = g.getNodeById(l.target_id);
                if (!a || !b) { out.push(`link ${l.id}: missing node`); continue; }
                const o = a.outputs?.[l.origin_slot], i = b.inputs?.[l.target_slot];
                if (!o || !i) { out.push(`link ${l.id}: missing slot`); continue; }
                if (!window.LiteGraph.isValidConnection(o.type, i.type))
                    out.push(`link ${l.id}: ${a.type}.${o.name} (${o.type}) -> ${b.type}.${i.name} (${i.type})`);
            }
            for (const n of g._nodes) for (const i of n.inputs || [])
                if (i.link == null && !i.widget && !i.shape_optional && n.constructor?.nodeData?.input?.required?.[i.name])
                    out.push(`${n.type} #${n.id}: input ${i.name} not connected`);
            return out;
        """)

    def set_widgets(self, node_type: str, **values):
        n = self.js("""
            let count = 0;
            for (const n of window.app.graph._nodes) {
                if (n.type !== arguments[0]) continue;
                for (const [k, v] of Object.entries(arguments[1])) {
                    const w = n.widgets.find(w => w.name === k);
                    if (!w) throw new Error(`${n.type} has no widget ${k}`);
                    w.value = v; w.callback?.(v);
                }
                count++;
            }
            return count;
        """, node_type, values)
        assert n >= 1, node_type

    def queue(self, timeout: float = 900, fresh: bool = True) -> dict:
        """Queues the graph through the frontend and waits for the run to end; returns the final event.

        ``fresh``: empty ComfyUI's caches first (POST /free), so every node runs and sends its result. (ComfyUI does
        not send the result of a node it takes from its cache to a newly loaded graph; an artist sees the box after
        the node's next real run.)"""
        self.wait_idle()
        if fresh:
            self.server.post("/free", {"free_memory": True, "unload_models": True})
            time.sleep(1.5)
        self.js("window.__qs.events = []; window.__qs.queued = false;"
                "window.app.queuePrompt(0, 1).finally(() => window.__qs.queued = true);")
        deadline = time.time() + timeout
        while time.time() < deadline:
            ev = self.js("return window.__qs.events.find(e => e.type !== 'execution_start') || null")
            if ev:
                time.sleep(0.5)  # let the frontend draw the last results
                return ev
            if self.js("return window.__qs.queued && !!window.app.lastNodeErrors && "
                       "Object.keys(window.app.lastNodeErrors).length > 0"):
                time.sleep(0.5)
                errors = self.js("return window.app.lastNodeErrors")
                self.server.post("/interrupt", {})  # the valid rest of the graph may have been queued: stop it
                self.wait_idle()
                return {"type": "node_errors", "detail": errors}
            time.sleep(0.25)
        raise AssertionError(f"the run did not end in {timeout} s; log:\n{self.server.log_text()[-3000:]}")

    def wait_idle(self, timeout: float = 600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            q = self.server.get("/queue")
            if not q["queue_running"] and not q["queue_pending"]:
                return
            time.sleep(0.25)
        raise AssertionError("the server's queue did not empty")

    def result_boxes(self) -> dict:
        """Our nodes' result boxes: node id -> {type, text, state, visible, inside} (inside = drawn within the node).

        The whole graph is brought into view first: the frontend does not draw the boxes of nodes outside the
        visible canvas (an artist scrolls to them), and the view is whatever the last test left."""
        self.fit_view()
        return self.js("""
            const out = {}, c = window.app.canvas;
            for (const n of window.app.graph._nodes) {
                const w = n.widgets?.find(w => w.name === 'qsched_result');
                if (!w) continue;
                const el = w.qschedEl, r = el.getBoundingClientRect(), st = getComputedStyle(el);
                const [x, y] = c.ds.convertOffsetToCanvas ? c.ds.convertOffsetToCanvas([0, 0]) : [0, 0];
                const cr = c.canvas.getBoundingClientRect(), s = c.ds.scale, o = c.ds.offset;
                const nx = cr.left + (n.pos[0] + o[0]) * s, ny = cr.top + (n.pos[1] + o[1]) * s;
                const nw = n.size[0] * s, nh = n.size[1] * s;
                out[n.id] = {type: n.type, text: el.value, state: el.dataset.qschedState || '',
                    visible: st.display !== 'none' && st.visibility !== 'hidden' && r.width > 20 && r.height > 10,
                    inside: r.left >= nx - 2 && r.right <= nx + nw + 2 && r.top >= ny - 2 && r.bottom <= ny + nh + 2,
                    fits: el.scrollHeight <= el.clientHeight + 1, scroll: [el.scrollHeight, el.clientHeight]};
            }
            return out;
        """)

    def progress_texts(self) -> list[dict]:
        """The progress lines the server sent (``progress_text``) since the page opened: [{nodeId, text}]."""
        return self.js("return window.__qs.alltexts")

    def record_messages(self, boxes: dict | None = None):
        """Keeps every text shown on a node (result boxes and progress lines), with one screenshot per new message
        of a result box, centred on its node."""
        boxes = self.result_boxes() if boxes is None else boxes
        for nid, b in boxes.items():
            if b["text"] and b["text"] not in self.seen:
                self.center_on_id(nid, 1.0)
                shot = MESSAGES / f"{len(self.seen):03d}_{b['type']}.png"
                self.screenshot(shot)
                self.seen[b["text"]] = str(shot)
        for t in self.progress_texts():
            self.seen.setdefault(t["text"], "(progress line)")

    def overlaps(self) -> list[str]:
        """Pairs of nodes whose boxes (title bar included) overlap."""
        return self.js("""
            const ns = window.app.graph._nodes, out = [], T = window.LiteGraph.NODE_TITLE_HEIGHT;
            const box = n => [n.pos[0], n.pos[1] - T, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
            for (let i = 0; i < ns.length; i++) for (let j = i + 1; j < ns.length; j++) {
                const a = box(ns[i]), b = box(ns[j]);
                if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3])
                    out.push(`${ns[i].type} #${ns[i].id} / ${ns[j].type} #${ns[j].id}`);
            }
            return out;
        """)

    def notes_cut_off(self) -> list[str]:
        """Notes whose text is taller than their box (the artist would have to scroll to read it all)."""
        return self.js("""
            const out = [];
            for (const n of window.app.graph._nodes) {
                if (n.type !== 'Note' && n.type !== 'MarkdownNote') continue;
                const el = n.widgets?.[0]?.element ?? n.widgets?.[0]?.inputEl;
                if (!el || el.clientHeight < 20) out.push(`${n.type} #${n.id}: its text box is not drawn`);
                else if (el.scrollHeight > el.clientHeight + 1)
                    out.push(`${n.type} #${n.id}: text ${el.scrollHeight} px in a box of ${el.clientHeight} px`);
            }
            return out;
        """)

    def fit_view(self, zoom: float | None = None):
        self.js("""
            const ns = window.app.graph._nodes, c = window.app.canvas, T = window.LiteGraph.NODE_TITLE_HEIGHT;
            let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
            for (const n of ns) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - T);
                                  x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }
            const r = c.canvas.getBoundingClientRect();
            const s = arguments[0] || Math.min(1, 0.96 * Math.min(r.width / (x1 - x0), r.height / (y1 - y0)));
            c.ds.scale = s;
            c.ds.offset = [(r.width / s - (x1 - x0)) / 2 - x0, (r.height / s - (y1 - y0)) / 2 - y0];
            c.setDirty(true, true); c.draw(true, true);
        """, zoom)
        time.sleep(0.6)

    def center_on_id(self, nid, zoom: float):
        self.js("""
            const n = window.app.graph.getNodeById(Number(arguments[0])) ?? window.app.graph.getNodeById(arguments[0]);
            const c = window.app.canvas, r = c.canvas.getBoundingClientRect(), s = arguments[1];
            c.ds.scale = s;
            c.ds.offset = [r.width / s / 2 - (n.pos[0] + n.size[0] / 2), r.height / s / 2 - (n.pos[1] + n.size[1] / 2)];
            c.setDirty(true, true); c.draw(true, true);
        """, str(nid), zoom)
        time.sleep(0.4)

    def center_on(self, types: tuple, zoom: float):
        """Centres the view on the first node of the first type in ``types`` that the graph has."""
        self.js("""
            const ns = window.app.graph._nodes, c = window.app.canvas;
            const n = arguments[0].map(t => ns.find(n => n.type === t)).find(Boolean) || ns[0];
            const r = c.canvas.getBoundingClientRect(), s = arguments[1];
            c.ds.scale = s;
            c.ds.offset = [r.width / s / 2 - (n.pos[0] + n.size[0] / 2), r.height / s / 2 - (n.pos[1] + n.size[1] / 2)];
            c.setDirty(true, true); c.draw(true, true);
        """, list(types), zoom)
        time.sleep(0.6)

    def screenshot(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.d.save_screenshot(str(path))


@pytest.fixture(scope="module")
def page(server):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="qsched-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(600)
    try:
        p = Page(driver, server)
        p.open()
        yield p
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _resize(width: int, height: int, page: Page):
    page.d.set_window_size(width, height)
    time.sleep(0.5)


# ------------------------------------------------------------------------------------------------------------------
# templates
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_without_missing_nodes_or_broken_links(page, name):
    res = page.load_template(name)
    assert not res["missing"], f"{name}: missing node types {res['missing']}"
    assert page.graph_problems() == [], name
    assert page.overlaps() == [], f"{name}: overlapping nodes"
    # the frontend reads every widget value where the workflow has it (a shifted value would differ)
    got = page.js("return Object.fromEntries(window.app.graph._nodes.map(n => [n.id, "
                  "(n.widgets || []).filter(w => w.serialize !== false && w.name !== 'qsched_result')"
                  ".map(w => w.value)]))")
    for node in res["workflow"]["nodes"]:
        if node.get("widgets_values") and node["type"] not in ("Note", "MarkdownNote"):
            assert got[str(node["id"])] == node["widgets_values"], (name, node["type"])

    page.close_dialogs()
    page.fit_view()
    assert page.notes_cut_off() == [], f"{name}: a note does not show its whole text"
    page.screenshot(SHOTS / f"{name}.png")
    # the template's thumbnail: its main Q-Sched node and its neighbours at a readable zoom, square
    _resize(1100, 1100, page)
    page.center_on(HERO, 0.85)
    shot = PIL_Image.open(io.BytesIO(page.d.get_screenshot_as_png())).convert("RGB")
    cx, cy, side = shot.size[0] // 2, shot.size[1] // 2, 720
    THUMBS.mkdir(parents=True, exist_ok=True)
    shot.crop((cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)).resize(
        (512, 512), PIL_Image.LANCZOS).save(THUMBS / f"{name}.jpg", quality=88)
    _resize(*WINDOW, page)


def test_template_browser_shows_titles_descriptions_thumbnails(page):
    """Point 6: the pack's templates in the frontend's template browser, with their thumbnails (no 404), titles and
    descriptions from web/templates.json."""
    info = json.loads((REPO / "web" / "templates.json").read_text())
    assert sorted(info) == TEMPLATES
    listed = page.server.get("/api/workflow_templates")[PACK_DIR_NAME]
    assert sorted(listed) == TEMPLATES
    page.js("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.wait("return [...document.querySelectorAll('li, a, span, div')].some(e => e.textContent.trim() === arguments[0])"
              .replace("arguments[0]", json.dumps(PACK_DIR_NAME)), 30, "the pack's template category")
    page.js("""
        const items = [...document.querySelectorAll('.p-dialog li, .p-dialog [role=option], .p-dialog a')];
        const it = items.find(e => e.textContent.trim() === arguments[0]);
        if (it) it.click();
    """, PACK_DIR_NAME)
    # The dialog loads a card's thumbnail while the card is in view and may drop it again when it scrolls out (as the
    # artist scrolls): each card is scrolled into view in turn and its loaded thumbnail noted.
    page.js("window.__qs.thumbs = {};")
    cards = page.wait("""
        const cards = [...document.querySelectorAll('[data-testid^="template-workflow-qsched_"]')];
        if (cards.length < arguments[0]) return null;
        const seen = window.__qs.thumbs;
        for (const c of cards) {
            const img = c.querySelector('img');
            if (img?.naturalWidth > 0) seen[c.dataset.testid] = {img: img.src, w: img.naturalWidth};
        }
        const pending = cards.find(c => !seen[c.dataset.testid]);
        if (pending) { pending.scrollIntoView({block: 'center'}); return null; }
        return cards.map(c => ({name: c.dataset.testid.replace('template-workflow-', ''),
                                titles: [...c.querySelectorAll('[title]')].map(e => e.textContent.trim()),
                                ...seen[c.dataset.testid]}));
    """.replace("arguments[0]", str(len(TEMPLATES))), 60, "the template cards with loaded thumbnails")
    page.js("document.querySelector('[data-testid^=\"template-workflow-qsched_\"]').scrollIntoView({block: 'nearest'})")
    time.sleep(1.0)
    page.screenshot(SHOTS / "templates.png")
    by_name = {}
    for c in cards:
        by_name.setdefault(c["name"], c)
    assert sorted(by_name) == TEMPLATES
    for name, c in by_name.items():
        assert c["w"] > 0, f"{name}: thumbnail did not load ({c['img']})"
        assert c["titles"][:2] == [info[name]["title"], info[name]["description"]], (name, c["titles"])
    page.close_dialogs()



# ------------------------------------------------------------------------------------------------------------------
# tiny-model runs through the frontend
# ------------------------------------------------------------------------------------------------------------------
def _flux_text_encoder(wf: dict) -> None:
    """T5-XXL cannot be made small: DualCLIPLoader(clip_l, t5xxl, flux) -> CLIPLoader(clip_l, sd3), same shapes."""
    for n in wf["nodes"]:
        if n["type"] == "DualCLIPLoader":
            n["type"] = "CLIPLoader"
            n["widgets_values"] = ["clip_l.safetensors", "sd3", "default"]
            n["title"] = "CLIPLoader (test stand-in for DualCLIPLoader)"


TINY = {
    "qsched_sdxl_turbo_w4a8": ({"EmptyLatentImage": dict(width=SIZE, height=SIZE)}, None),
    "qsched_flux_schnell_w4a8": ({"EmptySD3LatentImage": dict(width=SIZE, height=SIZE)}, _flux_text_encoder),
    # the calibration templates in their JAQ mode (JAQ nodes unmuted and connected): two prompts and a tiny grid keep
    # the run short; the shipped objective (match full precision) runs in
    # test_shipped_calibration_matches_full_precision_on_the_node
    "qsched_sdxl_turbo_w4a8_calibrate": (
        {"QSchedCalibrate": dict(prompts=CALIB_PROMPTS, width=SIZE, height=SIZE, strategy="grid", points=2, budget=10,
                                 batch=2, preset_name="browser_sdxl"),
         "EmptyLatentImage": dict(width=SIZE, height=SIZE)}, set_objective),
    "qsched_flux_schnell_w4a8_calibrate": (
        {"QSchedCalibrate": dict(prompts=CALIB_PROMPTS, width=SIZE, height=SIZE, points=3, budget=4, batch=2,
                                 preset_name="browser_flux"),
         "QSchedJAQLoader": dict(preset="clip"), "EmptySD3LatentImage": dict(width=SIZE, height=SIZE)},
        lambda wf: _flux_text_encoder(set_objective(wf))),
}
#: What each node's result box must show after the run (point 1: every text result visible on its node).
EXPECTED_TEXT = {
    "QSchedCheckpointLoader": "ComfyUI size",  # w4a8 in the sampling templates, fp16 / bf16 in the calibration ones
    "QSchedDiffusionModelLoader": "ComfyUI size",
    "QSchedQuantizeModel": "w4a8",
    "QSchedJAQLoader": "JAQ",
    "QSchedCalibrate": "best JAQ",
    "QSchedJAQScore": "mean JAQ",
    "QSchedSavePreset": "saved",
    "QSchedLoadPreset": "2 steps",
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_tiny_run_shows_every_text_result_on_its_node(page, name):
    if name not in TINY:  # Qwen-Image / Wan / SD3.5 / FLUX-dev: text encoders and VAEs without a tiny stand-in
        pytest.skip(f"{name}: sampled in ComfyUI by tests/test_comfyui_families.py (tiny model, identity == core)")
    widgets, mutate = TINY[name]
    page.load_template(name, mutate)
    for node_type, values in widgets.items():
        page.set_widgets(node_type, **values)
    ev = page.queue()
    assert ev["type"] == "execution_success", (ev, page.server.log_text()[-3000:])
    boxes = page.result_boxes()
    shown = {b["type"] for b in boxes.values()}
    on_graph = set(page.js("return window.app.graph._nodes.filter(n => n.mode === 0).map(n => n.type)"))  # not muted
    for node_type, text in EXPECTED_TEXT.items():
        if node_type in on_graph:
            assert node_type in shown, f"{name}: no result box on {node_type}"
    for nid, b in boxes.items():
        assert b["state"] == "result" and b["visible"] and b["inside"], (name, b)
        assert b["fits"], (name, b["type"], b["scroll"], b["text"])  # the whole text shows: nothing to scroll
        want = EXPECTED_TEXT.get(b["type"])
        if want:
            assert want in b["text"], (name, b)
    assert page.overlaps() == [], f"{name}: a result box pushed a node over another"
    # images only through the standard preview outputs: our nodes send none themselves
    outputs = page.js_async("const r = await fetch('/history?max_items=1'); return await r.json();")
    entry = next(iter(outputs.values()))
    classes = {nid: n["class_type"] for nid, n in ((k, v) for k, v in entry["prompt"][2].items())}
    for nid, out in entry["outputs"].items():
        if classes[nid].startswith("QSched"):
            assert "images" not in out, f"{name}: {classes[nid]} draws its own images"
    page.record_messages(boxes)
    page.close_dialogs()
    page.fit_view()
    page.screenshot(SHOTS / f"{name}_run.png")


def test_shipped_calibration_matches_full_precision_on_the_node(page):
    """SDXL-Turbo's calibration template as shipped (objective 'match full precision', its JAQ nodes muted), shrunk
    to 10 prompts (5 fit, 5 held out) and 2 steps: Calibrate's box gives the verdict on the held-out images and the
    preset, every box shows its whole text, the muted JAQ nodes show nothing, and the preset is written."""
    name = "qsched_sdxl_turbo_w4a8_calibrate"
    page.load_template(name, None)
    page.set_widgets("QSchedCalibrate", prompts=REF_PROMPTS, width=SIZE, height=SIZE, steps=2, batch=5,
                     preset_name="browser_sdxl_reference")
    page.set_widgets("EmptyLatentImage", width=SIZE, height=SIZE)
    page.set_widgets("QSchedKSampler", steps=2)
    ev = page.queue()
    assert ev["type"] == "execution_success", (ev, page.server.log_text()[-3000:])
    boxes = page.result_boxes()
    muted = set(page.js("return window.app.graph._nodes.filter(n => n.mode !== 0).map(n => n.type)"))
    assert {"QSchedJAQLoader", "QSchedJAQScore"} <= muted
    assert not muted & {b["type"] for b in boxes.values()}, boxes
    cal = next(b for b in boxes.values() if b["type"] == "QSchedCalibrate")
    assert re.match(r"(kept: |identity kept \(no correction\): )on 5 held-out images", cal["text"]), cal["text"]
    assert "full-precision reference" in cal["text"] and "record:" not in cal["text"], cal["text"]
    for b in boxes.values():
        assert b["state"] == "result" and b["visible"] and b["inside"] and b["fits"], (b["type"], b)
    assert page.overlaps() == []
    assert (page.server.models / "qsched" / "browser_sdxl_reference.json").is_file()
    page.record_messages(boxes)
    page.close_dialogs()
    page.fit_view()
    page.screenshot(SHOTS / "calibrate_match_full_precision.png")


# ------------------------------------------------------------------------------------------------------------------
# bad input: one message, once, on the node it concerns
# ------------------------------------------------------------------------------------------------------------------
#: node type -> (template or None for a small graph, widget changes {node type: {widget: value}}, text the message
#: must contain, "queue" (refused on queue) or "run" (fails when it runs)).
BAD_INPUT = {
    "QSchedCheckpointLoader": ("qsched_sdxl_turbo_w4a8",
                               {"QSchedCheckpointLoader": {"ckpt_name": "no_such_model.safetensors"}},
                               "no_such_model.safetensors", "queue"),
    "QSchedDiffusionModelLoader": ("qsched_flux_schnell_w4a8",
                                   {"QSchedDiffusionModelLoader": {"unet_name": "no_such_flux.safetensors"}},
                                   "no_such_flux.safetensors", "queue"),
    "QSchedCoefficients": ("qsched_sdxl_turbo_w4a8", {"QSchedCoefficients": {"c_x_override": "1.0, abc"}},
                           "input 'c_x_override'", "queue"),
    "QSchedKSampler": ("qsched_sdxl_turbo_w4a8", {"QSchedKSampler": {"steps": 3}}, "input 'steps'", "queue"),
    #  (the KSampler's steps unlinked from the coefficients' steps output first: _unlink_steps; the graph check
    #  refuses it on queue, on the KSampler)
    "QSchedSampler": ("qsched_flux_schnell_w4a8", {"QSchedSampler": {"sampler_name": "tcd"}},
                      "input 'sampler_name'", "run"),
    "QSchedScheduler": ("qsched_flux_schnell_w4a8", {"QSchedScheduler": {"family": "lcm"}},
                        "input 'family'", "run"),
    "QSchedJAQLoader": ("qsched_sdxl_turbo_w4a8_calibrate", {"QSchedJAQLoader": {"tc_weights": "no_such_clip.pt"}},
                        "input 'tc_weights'", "queue"),
    "QSchedJAQScore": ("qsched_sdxl_turbo_w4a8_calibrate", {"QSchedJAQScore": {"prompts": "  "}},
                       "input 'prompts'", "queue"),
    "QSchedCalibrate": ("qsched_sdxl_turbo_w4a8_calibrate",
                        {"QSchedCalibrate": dict(prompts=CALIB_PROMPTS, strategy="grid", points=5, budget=10)},
                        "input 'budget'", "queue"),
    "QSchedLoadPreset": (None, {"QSchedLoadPreset": {"preset": "browser_broken.json"}}, "input 'preset'", "queue"),
    "QSchedQuantizeModel": ("quant", {"QSchedQuantizeModel": {"precision": "w2a2"}}, "precision", "queue"),
    "QSchedSaveQuantizedModel": ("quant", {"QSchedSaveQuantizedModel": {"filename": "../outside"}},
                                 "input 'filename'", "run"),
    "QSchedSavePreset": (None, {"QSchedSavePreset": {"name": "../outside"}}, "input 'name'", "queue"),
}


def _unlink_steps(wf: dict, node_type: str = "QSchedKSampler") -> None:
    """The node's steps as a plain widget again (not fed by the coefficients' steps output)."""
    ks = next(n for n in wf["nodes"] if n["type"] == node_type)
    inp = next(i for i in ks["inputs"] if i["name"] == "steps")
    wf["links"] = [link for link in wf["links"] if link[0] != inp["link"]]
    for n in wf["nodes"]:
        for out in n.get("outputs", []):
            out["links"] = [x for x in out.get("links") or [] if x != inp["link"]]
    ks["inputs"].remove(inp)


def _quant_graph(page: Page):
    """Core checkpoint loader -> Q-Sched Quantize Model -> Q-Sched Save Quantized Model."""
    page.js("""
        const LG = window.LiteGraph, g = window.app.graph;
        g.clear();
        const a = LG.createNode('CheckpointLoaderSimple'), b = LG.createNode('QSchedQuantizeModel'),
              c = LG.createNode('QSchedSaveQuantizedModel');
        a.pos = [100, 100]; b.pos = [500, 100]; c.pos = [900, 100];
        g.add(a); g.add(b); g.add(c);
        a.widgets.find(w => w.name === 'ckpt_name').value = 'sd_xl_turbo_1.0_fp16.safetensors';
        a.connect(0, b, 0);
        b.connect(0, c, 0);
        window.app.canvas.setDirty(true, true);
    """)


def _preset_graph(page: Page):
    page.js("""
        const LG = window.LiteGraph, g = window.app.graph;
        g.clear();
        const a = LG.createNode('QSchedLoadPreset'), b = LG.createNode('QSchedSavePreset');
        a.pos = [100, 100]; b.pos = [500, 100];
        g.add(a); g.add(b);
        a.widgets.find(w => w.name === 'preset').value = 'browser_good.json';
        a.connect(0, b, 0);
        window.app.canvas.setDirty(true, true);
    """)


@pytest.mark.parametrize("node_type", sorted(BAD_INPUT))
def test_bad_input_message_once_on_its_node(page, node_type):
    template, changes, text, when = BAD_INPUT[node_type]
    (page.server.models / "qsched" / "browser_broken.json").write_text('{"c_x": [1.0, 0.9], "c_eps": [1.0]}')
    (page.server.models / "qsched" / "browser_good.json").write_text(
        '{"format": "qsched-coefficients", "version": 1, "steps": 2, "c_x": [0.9, 1.0], "c_eps": [1.1, 1.0]}')
    if template is None:
        page.close_dialogs()
        _preset_graph(page)
    elif template == "quant":
        page.close_dialogs()
        _quant_graph(page)
    else:
        page.load_template(template, _unlink_steps if node_type == "QSchedKSampler" else TINY[template][1])
        for t, values in TINY[template][0].items():
            page.set_widgets(t, **values)
    for t, values in changes.items():
        page.set_widgets(t, **values)
    target = page.js("return window.app.graph._nodes.find(n => n.type === arguments[0]).id", node_type)
    ev = page.queue()
    if when == "queue":
        assert ev["type"] == "node_errors", (node_type, ev)
        errors = ev["detail"]
        assert list(errors) == [str(target)], (node_type, errors)  # only this node is blamed
        assert len(errors[str(target)]["errors"]) == 1, (node_type, errors)  # one message, not one per input
    else:
        assert ev["type"] == "execution_error", (node_type, ev)
        assert str(ev["detail"]["node_id"]) == str(target), (node_type, ev["detail"])
        assert ev["detail"]["exception_type"] == "qsched.NodeInputError", ev["detail"]["exception_type"]  # no path
    page.close_dialogs()
    boxes = page.result_boxes()
    box = boxes.get(str(target)) or boxes.get(target)
    assert box and box["state"] == "error" and box["visible"], (node_type, boxes)
    assert box["text"].count(text) == 1 and box["text"].count("⚠") == 1, (node_type, box["text"])
    assert box["fits"], (node_type, box["scroll"], box["text"])
    page.record_messages(boxes)
    others = [b for k, b in boxes.items() if str(k) != str(target) and b["state"] == "error"]
    assert not others, (node_type, others)
    assert page.overlaps() == [], f"{node_type}: the message pushed the node over another"
    if node_type == "QSchedCalibrate":
        page.center_on(("QSchedCalibrate",), 1.0)
        page.screenshot(SHOTS / "bad_input_calibrate.png")
    if node_type == "QSchedSampler":
        page.center_on(("QSchedSampler",), 1.0)
        page.screenshot(SHOTS / "bad_input_sampler_flux.png")


def test_calibration_progress_cancel_and_resume_on_the_node(page):
    """Point 4: a first line at once, point counts from the design and budget, and after Cancel the node says how
    many points are kept; queued again, the summary says they came from the record."""
    name = "qsched_sdxl_turbo_w4a8_calibrate"
    page.load_template(name, set_objective)  # the JAQ search: its record is what resumes
    prompts = "a red fox in the snow\na bowl of fruit on a wooden table\na lighthouse at dusk"
    page.set_widgets("QSchedCalibrate", prompts=prompts, width=SIZE, height=SIZE, strategy="grid", points=3, budget=27,
                     batch=3, preset_name="browser_interrupted")
    page.set_widgets("EmptyLatentImage", width=SIZE, height=SIZE)
    cal = page.js("return window.app.graph._nodes.find(n => n.type === 'QSchedCalibrate').id")
    page.server.post("/free", {"free_memory": True, "unload_models": True})
    time.sleep(1.5)
    page.js("window.__qs.events = []; window.__qs.texts = []; window.app.queuePrompt(0, 1);")
    texts = page.wait("const t = window.__qs.texts.filter(x => String(x.nodeId) === String(arguments[0]))"
                      ".map(x => x.text); return t.some(x => x.startsWith('[2/')) ? t : null"
                      .replace("arguments[0]", json.dumps(str(cal))), 900, "two calibration points")
    page.js_async("await window.comfyAPI.api.api.interrupt(); return true;")
    page.wait("return window.__qs.events.some(e => e.type === 'execution_interrupted' || e.type === 'execution_error')",
              300, "the interrupt")
    time.sleep(1.0)
    texts = page.js("return window.__qs.texts.filter(x => String(x.nodeId) === arguments[0]).map(x => x.text)", str(cal))
    assert texts[0].startswith("starting: 9 points x 3 prompts = 27 images (budget 27)"), texts
    assert any(t.startswith("[1/9 points]") for t in texts), texts  # a grid: exact, not "~65"
    last = texts[-1]
    assert last.startswith("interrupted — queue again to resume (") and "kept in the record " in last, texts
    shown = page.js("const n = window.app.graph.getNodeById(arguments[0]);"
                    "return n.widgets.find(w => w.name === '$$node-text-preview')?.value", cal)
    assert shown == last, (shown, last)
    kept = int(last.split("(")[1].split()[0])
    ev = page.queue(fresh=False)
    assert ev["type"] == "execution_success", ev
    box = next(b for b in page.result_boxes().values() if b["type"] == "QSchedCalibrate")
    assert f"({kept} from the record, {9 - kept} computed now)" in box["text"], box["text"]
    assert "preset: " in box["text"] and "record: " in box["text"] and box["fits"], box
    page.record_messages()

    # A new calibration (another seed) on the same node: the finished run's summary disappears when it starts, and
    # after Cancel the node shows only the points kept and the record.
    page.set_widgets("QSchedCalibrate", base_seed=7, preset_name="browser_interrupted_seed7")
    page.js("window.__qs.events = []; window.__qs.texts = []; window.app.queuePrompt(0, 1);")
    page.wait("return window.__qs.texts.some(x => String(x.nodeId) === arguments[0] && x.text.startsWith('[1/'))"
              .replace("arguments[0]", json.dumps(str(cal))), 900, "the first point of the new calibration")
    assert [b for b in page.result_boxes().values() if b["type"] == "QSchedCalibrate"] == [], "stale summary shown"
    page.js_async("await window.comfyAPI.api.api.interrupt(); return true;")
    page.wait("return window.__qs.events.some(e => e.type === 'execution_interrupted' || e.type === 'execution_error')",
              300, "the interrupt")
    time.sleep(1.0)
    assert [b for b in page.result_boxes().values() if b["type"] == "QSchedCalibrate"] == [], "stale summary shown"
    shown = page.js("const n = window.app.graph.getNodeById(arguments[0]);"
                    "return n.widgets.find(w => w.name === '$$node-text-preview')?.value", cal)
    assert shown.startswith("interrupted — queue again to resume (") and "kept in the record " in shown, shown
    page.center_on(("QSchedCalibrate",), 0.9)
    page.screenshot(SHOTS / "calibrate_interrupted.png")
    page.record_messages()


def test_preset_nodes_show_their_results(page):
    """Point 1 for the preset nodes: Save Preset shows the path it wrote, Load Preset what it loaded."""
    (page.server.models / "qsched" / "browser_good.json").write_text(
        '{"format": "qsched-coefficients", "version": 1, "steps": 2, "c_x": [0.9, 1.0], "c_eps": [1.1, 1.0]}')
    _preset_graph(page)
    page.set_widgets("QSchedSavePreset", name="browser_copy")
    ev = page.queue()
    assert ev["type"] == "execution_success", ev
    boxes = {b["type"]: b for b in page.result_boxes().values()}
    assert set(boxes) == {"QSchedLoadPreset", "QSchedSavePreset"}
    for node_type, b in boxes.items():
        assert b["visible"] and b["inside"] and EXPECTED_TEXT[node_type] in b["text"], b
    assert str(page.server.models / "qsched" / "browser_copy.json") in boxes["QSchedSavePreset"]["text"]
    # the new preset is in Load Preset's list at once (no 'r')
    options = page.js("return window.app.graph._nodes.find(n => n.type === 'QSchedLoadPreset')"
                      ".widgets.find(w => w.name === 'preset').options.values")
    assert "browser_copy.json" in options, options
    page.fit_view(1.0)
    page.screenshot(SHOTS / "presets_run.png")
    # what the calibration templates' note tells the artist: a Load Preset added afterwards (to another workflow)
    # lists the new preset too, and a preset file copied into models/qsched/ by hand appears after R (Refresh Node
    # Definitions) pressed on the canvas
    page.load_template("qsched_sdxl_turbo_w4a8")
    added = page.js("const n = window.LiteGraph.createNode('QSchedLoadPreset'); window.app.graph.add(n);"
                    "return n.widgets.find(w => w.name === 'preset').options.values")
    assert "browser_copy.json" in added, added
    (page.server.models / "qsched" / "browser_by_hand.json").write_text(
        '{"format": "qsched-coefficients", "version": 1, "steps": 4, "c_x": [1, 1, 1, 1], "c_eps": [1, 1, 1, 1]}')
    from selenium.webdriver.common.action_chains import ActionChains

    page.js("document.activeElement?.blur();")  # no text box selected: the key goes to the canvas's shortcuts
    ActionChains(page.d).send_keys("r").perform()
    page.wait("return window.app.graph._nodes.filter(n => n.type === 'QSchedLoadPreset').every(n => "
              "n.widgets.find(w => w.name === 'preset').options.values.includes('browser_by_hand.json'))", 60,
              "the hand-copied preset in Load Preset's list after R")



# ------------------------------------------------------------------------------------------------------------------
# the graph-wide steps check, preset compatibility, Calibrate's overwrite switch and cost gate
# ------------------------------------------------------------------------------------------------------------------
def _error_box(page: Page, node_type: str) -> dict:
    page.close_dialogs()
    box = next((b for b in page.result_boxes().values() if b["type"] == node_type), None)
    assert box and box["state"] == "error" and box["visible"] and box["fits"], (node_type, box)
    assert box["text"].count("⚠") == 1, box["text"]
    page.record_messages()
    return box


def test_flux_steps_mismatch_is_refused_on_queue_on_the_scheduler(page):
    """The coefficients make 4 steps, Q-Sched Scheduler is set to 3: refused when queued (before any model loads),
    on Q-Sched Scheduler's steps, with the fix named; no other node is blamed."""
    name = "qsched_flux_schnell_w4a8"
    page.load_template(name, lambda wf: (TINY[name][1](wf), _unlink_steps(wf, "QSchedScheduler")))
    for t, values in TINY[name][0].items():
        page.set_widgets(t, **values)
    page.set_widgets("QSchedScheduler", steps=3)
    target = page.js("return window.app.graph._nodes.find(n => n.type === 'QSchedScheduler').id")
    ev = page.queue()
    assert ev["type"] == "node_errors", ev
    assert list(ev["detail"]) == [str(target)], ev["detail"]
    assert len(ev["detail"][str(target)]["errors"]) == 1, ev["detail"]
    box = _error_box(page, "QSchedScheduler")
    assert "input 'steps': runs 3 steps" in box["text"] and "set steps to 4" in box["text"], box["text"]
    page.center_on(("QSchedScheduler",), 1.0)
    page.screenshot(SHOTS / "steps_mismatch_flux.png")


def _preset_instead_of_coefficients(wf: dict, preset: str) -> None:
    """The template's Q-Sched Coefficients replaced by Q-Sched Load Preset (same output slots, same links)."""
    n = next(n for n in wf["nodes"] if n["type"] == "QSchedCoefficients")
    n.update(type="QSchedLoadPreset", widgets_values=[preset], inputs=[], size=[340, 110])


def test_preset_made_for_another_precision_warns_on_load_preset(page):
    """A preset records what it was calibrated for; used with another precision and sampler, Load Preset says so once
    per difference, naming both values, and still runs. Also: CUDA Graph on the CPU says it does nothing."""
    meta = {"family": "BaseModel", "quant": "w8a8", "sampler": "euler", "steps": 4,
            "sampling": {"sampler": "euler", "width": 64, "height": 64, "model_class": "BaseModel"}}
    (page.server.models / "qsched" / "browser_w8a8.json").write_text(json.dumps(
        {"format": "qsched-coefficients", "version": 1, "steps": 4, "c_x": [0.97, 0.98, 0.99, 1.0],
         "c_eps": [1.03, 1.02, 1.01, 1.0], "metadata": meta}))
    page.server.post("/free", {"free_memory": True, "unload_models": True})
    page.js_async("await window.app.refreshComboInNodes(); return true;")
    name = "qsched_sdxl_turbo_w4a8"
    page.load_template(name, lambda wf: _preset_instead_of_coefficients(wf, "browser_w8a8.json"))
    for t, values in TINY[name][0].items():
        page.set_widgets(t, **values)
    page.js("""
        const LG = window.LiteGraph, g = window.app.graph;
        const loader = g._nodes.find(n => n.type === 'QSchedCheckpointLoader');
        const ks = g._nodes.find(n => n.type === 'QSchedKSampler');
        const cg = LG.createNode('QSchedCudaGraph');
        cg.pos = [loader.pos[0], loader.pos[1] - 160]; g.add(cg);
        loader.connect(0, cg, 0); cg.connect(0, ks, 0);
        window.app.canvas.setDirty(true, true);
    """)
    ev = page.queue()
    assert ev["type"] == "execution_success", (ev, page.server.log_text()[-3000:])
    boxes = {b["type"]: b for b in page.result_boxes().values()}
    lp = boxes["QSchedLoadPreset"]
    warnings = [ln for ln in lp["text"].splitlines() if ln.startswith("⚠")]
    assert len(warnings) == 2, lp["text"]
    assert any("precision w8a8" in w and "uses w4a8" in w for w in warnings), warnings
    assert any("sampler euler," in w and "uses euler_ancestral" in w for w in warnings), warnings
    assert lp["fits"] and boxes["QSchedCudaGraph"]["fits"], boxes
    assert boxes["QSchedCudaGraph"]["text"].startswith("no CUDA GPU"), boxes["QSchedCudaGraph"]
    page.record_messages()
    page.center_on(("QSchedLoadPreset",), 1.0)
    page.screenshot(SHOTS / "preset_warning.png")


def test_calibrate_refuses_to_overwrite_a_preset_it_did_not_make(page):
    (page.server.models / "qsched" / "browser_good.json").write_text(
        '{"format": "qsched-coefficients", "version": 1, "steps": 2, "c_x": [0.9, 1.0], "c_eps": [1.1, 1.0]}')
    name = "qsched_sdxl_turbo_w4a8_calibrate"
    page.load_template(name, TINY[name][1])  # the JAQ search, as in the tiny run
    for t, values in TINY[name][0].items():
        page.set_widgets(t, **values)
    page.set_widgets("QSchedCalibrate", preset_name="browser_good")
    target = page.js("return window.app.graph._nodes.find(n => n.type === 'QSchedCalibrate').id")
    ev = page.queue()
    assert ev["type"] == "execution_error" and str(ev["detail"]["node_id"]) == str(target), ev
    box = _error_box(page, "QSchedCalibrate")
    path = str(page.server.models / "qsched" / "browser_good.json")
    assert "input 'overwrite'" in box["text"] and path in box["text"] and "turn overwrite on" in box["text"].lower()
    assert json.loads(Path(path).read_text())["steps"] == 2  # untouched


def test_calibration_longer_than_max_minutes_stops_and_asks(page):
    """A grid of 1682 points (3364 images) with max_minutes 1: the node stops after its first point, says the
    estimate and the value to set; the point is kept."""
    name = "qsched_sdxl_turbo_w4a8_calibrate"
    page.load_template(name, TINY[name][1])  # the JAQ search, as in the tiny run
    for t, values in TINY[name][0].items():
        page.set_widgets(t, **values)
    page.set_widgets("QSchedCalibrate", strategy="grid", points=41, budget=4000, max_minutes=1,
                     preset_name="browser_gate")
    target = page.js("return window.app.graph._nodes.find(n => n.type === 'QSchedCalibrate').id")
    page.js("window.__qs.texts = [];")
    ev = page.queue()
    assert ev["type"] == "execution_error" and str(ev["detail"]["node_id"]) == str(target), ev
    box = _error_box(page, "QSchedCalibrate")
    assert "input 'max_minutes': this calibration needs about" in box["text"], box["text"]
    assert "set max_minutes to" in box["text"] and "1 point kept" in box["text"], box["text"]
    texts = [t["text"] for t in page.js("return window.__qs.texts") if str(t["nodeId"]) == str(target)]
    assert texts[-1].startswith("stopped before a long run — 1 point kept in the record "), texts
    page.center_on(("QSchedCalibrate",), 0.9)
    page.screenshot(SHOTS / "calibrate_cost_gate.png")


@pytest.mark.parametrize("path", sorted((REPO / "tests" / "data" / "workflows_saved_earlier").glob("*.json")),
                         ids=lambda p: p.stem)
def test_workflow_saved_before_new_inputs_loads_with_their_defaults(page, path):
    """Widget values are stored by position: a workflow saved before Calibrate had overwrite / max_minutes /
    objective loads every saved value where it was, and the new widgets at their defaults."""
    page.close_dialogs()
    wf = json.loads(path.read_text())
    res = page.load_graph(wf, path.stem)
    assert not res["missing"], res
    got = page.js("return Object.fromEntries(window.app.graph._nodes.map(n => [n.id, "
                  "(n.widgets || []).filter(w => w.serialize !== false && w.name !== 'qsched_result')"
                  ".map(w => w.value)]))")
    for node in wf["nodes"]:
        saved = node.get("widgets_values")
        if not saved or node["type"] in ("Note", "MarkdownNote"):
            continue
        have = got[str(node["id"])]
        assert have[:len(saved)] == saved, (path.stem, node["type"])
        # Calibrate's inputs added since: overwrite, max_minutes, objective ('auto': a saved JAQ graph stays JAQ)
        assert have[len(saved):] == ([False, 30, "auto"] if node["type"] == "QSchedCalibrate" else []), node["type"]


def test_help_pages_load_without_a_missing_file(page):
    """The frontend asks for docs/<node>/<locale>.md first: every node's page is there (no 404 before the help)."""
    from qsched_pack.nodes import NODE_CLASS_MAPPINGS

    status = page.js_async("const out = {}; for (const n of args[0]) { const r = await fetch("
                           f"'/extensions/{PACK_DIR_NAME}/docs/' + n + '/en.md'); "
                           "out[n] = [r.status, (await r.text()).slice(0, 2)]; } return out;",
                           sorted(NODE_CLASS_MAPPINGS))
    assert all(v == [200, "# "] for v in status.values()), status


def test_every_node_text_is_plain_words(page):
    """Every text the suite saw on a node (results, errors, progress lines; one screenshot each in
    SHOTS/messages): no Python repr, no hash longer than 12 characters, no source path. Runs last."""
    page.record_messages()
    assert len(page.seen) >= 10, sorted(page.seen)
    problems = {text: plain_words_problems(text) for text in page.seen}
    assert {t: p for t, p in problems.items() if p} == {}
    print(f"\nscreenshots: {SHOTS}; one per node message: {MESSAGES} ({len(page.seen)} node texts)")
