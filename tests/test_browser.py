"""The notebooks as people use them: JupyterLab in headless Chromium, driven by Playwright.

One JupyterLab (the ``make lab`` command on a copy of notebooks 02 and 05) runs both notebooks
at their default (tiny) parameters, cell by cell as Run > Run All does; then a person's moves:
notebook 02's λ slider must redraw the label explorer, notebook 05's image slider must redraw
the sphere explorer, whose WebGL canvas must hold drawn (non-blank) pixels that change. The run
folder the notebooks made then gets its report.html, opened from ``file://`` with every
network request refused: no console error, every plotly figure drawn. Screenshots go to
``runs/browser-test/screenshots/`` (CI artefacts).

WebGL here is SwiftShader, in software (``--use-angle=swiftshader --enable-unsafe-swiftshader``
select it explicitly; Chromium 156 also falls back to it without them): drawing notebook 05's
eight static 3D
scenes took minutes, so the kernels get ``PLOTLY_RENDERER=json`` and show those figures as
plotly JSON; the explorer under test builds its plotly MIME bundle itself and draws with WebGL.

The browser is Debian's Chromium (``/usr/bin/chromium``, or ``CRYOSPHERE_CHROMIUM``; ``.ci/run``
installs it with apt-get); nothing is downloaded. Without it the test is skipped, except where
``CRYOSPHERE_BROWSER_TEST=required`` (CI) makes that a failure.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from lab_server import lab_server

from cryosphere import io as cryosphere_io
from cryosphere.runs import execution, lab, report
from cryosphere.runs.reproducibility import reproducibility_record

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "runs" / "browser-test" / "screenshots"
CHROMIUM = os.environ.get("CRYOSPHERE_CHROMIUM", "/usr/bin/chromium")
#: Headless, no GPU (WebGL through SwiftShader, software), nothing fetched in the background.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NOTEBOOKS = ("02_labels.ipynb", "05_so3_heatmaps.ipynb")
NOTEBOOK_TIMEOUT_MS = 600_000  # a loaded 2-core machine; ~1 min each when it is idle
CURRENT = "window.jupyterapp.shell.currentWidget"
#: plotly's default renderer in the kernels (the explorer's figure is the plotly MIME bundle)
STATIC_FIGURES = {"PLOTLY_RENDERER": "json"}

pytest.importorskip("jupyterlab", reason="JupyterLab is in the notebooks extra")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright: the test extra")
if not Path(CHROMIUM).is_file():
    message = f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)"
    if os.environ.get("CRYOSPHERE_BROWSER_TEST") == "required":
        raise RuntimeError(message)
    pytest.skip(message, allow_module_level=True)


def _png_pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def drawn_fraction(png: bytes) -> float:
    """Share of the pixels that differ (by > 8 of 255) from the image's most common colour."""
    pixels = _png_pixels(png).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[np.argmax(counts)]
    return float(np.mean(np.abs(pixels - background).max(axis=1) > 8))


def changed_fraction(before: bytes, after: bytes) -> float:
    a, b = _png_pixels(before), _png_pixels(after)
    if a.shape != b.shape:
        return 1.0
    return float(np.mean(np.abs(a - b).max(axis=2) > 8))


def _lab_settings(home: Path) -> None:
    """Every cell in the page (no windowing), no news prompt."""
    settings = home / "settings" / "@jupyterlab"
    for extension, name, values in [
        ("notebook-extension", "tracker", {"windowingMode": "none"}),
        ("apputils-extension", "notification", {"fetchNews": "false"}),
    ]:
        (settings / extension).mkdir(parents=True, exist_ok=True)
        (settings / extension / f"{name}.jupyterlab-settings").write_text(json.dumps(values))


def run_all_cells(page, name: str) -> None:
    """Open notebook ``name``, wait for its kernel, Run All; return when every cell ran, or
    fail with the first error output."""
    page.evaluate(
        "(n) => { window.jupyterapp.commands.execute('docmanager:open', {path: n}); }", name
    )
    page.wait_for_function(
        f"""(n) => {{ const w = {CURRENT};
            const k = w && w.context && w.context.path === n && w.sessionContext.session
                && w.sessionContext.session.kernel;
            return k && k.status === 'idle' && w.node.querySelector('.jp-CodeCell'); }}""",
        arg=name,
        timeout=180_000,
    )
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    done = f"""() => {{ const w = {CURRENT};
        const cells = w.content.widgets.filter(c => c.model.type === 'code');
        const error = cells.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
        const ran = cells.every(c => c.model.executionCount !== null
            && !c.node.querySelector('.jp-InputPrompt').textContent.includes('*'));
        return error || (ran && w.sessionContext.session.kernel.status === 'idle'); }}"""
    try:
        page.wait_for_function(done, timeout=NOTEBOOK_TIMEOUT_MS, polling=2000)
    except playwright_api.TimeoutError:
        page.screenshot(path=SCREENSHOTS / f"timeout_{name}.png")
        raise
    errors = page.evaluate(
        f"""() => {CURRENT}.content.widgets.flatMap(c => c.model.type !== 'code' ? [] :
            c.model.outputs.toJSON().filter(o => o.output_type === 'error')
            .map(o => o.ename + ': ' + o.evalue))"""
    )
    assert not errors, f"{name} failed in JupyterLab: {errors}"


def drag_slider(page, slider, pixels: float) -> None:
    """Drag a widget slider's handle by ``pixels`` to the right, as a mouse does."""
    handle = slider.locator(".noUi-handle")
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + pixels, y, steps=8)
    page.mouse.up()


def wait_for_new_screenshot(
    locator, before: bytes, threshold: float, timeout_s: float = 120.0
) -> bytes:
    """Screenshots of ``locator`` until one differs from ``before`` in more than ``threshold``
    of its pixels (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = locator.screenshot()
        if changed_fraction(before, after) > threshold or time.monotonic() > deadline:
            return after
        time.sleep(1.0)


#: What the interface test needs of notebook 05's streamed model: a few steps, not the
#: 1,000 that the tiny profile trains so that notebooks 03 and 06 can assert it learned (the
#: browser runs its kernel beside pytest; a user sets ``config`` the same way).
BROWSER_CONFIG = {"stream_steps": 12, "stream_batch_size": 8}


def _override_parameters(notebook: Path, config: dict) -> None:
    """Set ``config = {...}`` in the notebook's ``parameters`` cell (it must hold ``config = {}``)."""
    document = json.loads(notebook.read_text())
    cell = next(c for c in document["cells"] if "parameters" in c["metadata"].get("tags", []))
    source = "".join(cell["source"])
    assert "config = {}" in source, source
    cell["source"] = source.replace("config = {}", f"config = {config!r}", 1).splitlines(True)
    notebook.write_text(json.dumps(document, indent=1))


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def notebooks_in_lab(tmp_path_factory, browser):
    """JupyterLab with notebooks 02 and 05 run in it; yields (page, run folder)."""
    base = tmp_path_factory.mktemp("lab")
    folder = base / "notebooks"  # the notebooks' run_dir ../runs/default is base/runs/default
    folder.mkdir()
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / name, folder / name)
    _override_parameters(folder / "05_so3_heatmaps.ipynb", BROWSER_CONFIG)
    _lab_settings(base / "jupyter")
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    SCREENSHOTS.mkdir(parents=True)
    command = lab.lab_command(folder, ["--LabApp.expose_app_in_browser=True"])
    # Software WebGL is slow: the notebooks' static figures come as plotly JSON (JupyterLab's
    # JSON viewer); the sphere explorer under test draws its figure with WebGL as always.
    with lab_server(base / "jupyter", command=command, environment=STATIC_FIGURES) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(f"{server.url}/lab?token={server.token}")
        page.wait_for_function("() => window.jupyterapp", timeout=180_000)
        page.evaluate("() => window.jupyterapp.restored.then(() => true)")  # commands ready
        yield page, server, base / "runs" / "default"
        page.close()


def test_lambda_slider_redraws_the_label_explorer(notebooks_in_lab):
    page, _, _ = notebooks_in_lab
    run_all_cells(page, "02_labels.ipynb")
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    lam = notebook.locator(".widget-slider", has_text="λ")
    figure = notebook.locator("img.widget-image").first
    figure.scroll_into_view_if_needed()
    readout = lam.locator(".widget-readout").inner_text()
    before = figure.screenshot(path=SCREENSHOTS / "02_label_explorer_before.png")
    assert drawn_fraction(before) > 0.05
    drag_slider(page, lam, 80)
    page.wait_for_function(
        "(r) => [...document.querySelectorAll('.widget-slider')].some(s => "
        "s.textContent.includes('λ') && !s.textContent.includes(r))",
        arg=readout,
        timeout=30_000,
    )
    # the soft map's title ("64 % of mass within 15°" -> "100 %"), colours and colour bar:
    # about 1 % of the figure's pixels
    after = wait_for_new_screenshot(figure, before, threshold=0.002, timeout_s=60)
    (SCREENSHOTS / "02_label_explorer_after.png").write_bytes(after)
    assert changed_fraction(before, after) > 0.002, (
        f"moving λ ({readout} -> {lam.locator('.widget-readout').inner_text()}) left the "
        "label explorer's figure as it was"
    )


def test_image_slider_redraws_the_sphere_explorer(notebooks_in_lab):
    page, _, _ = notebooks_in_lab
    run_all_cells(page, "05_so3_heatmaps.ipynb")
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    explorer = notebook.locator(".widget-vbox", has=page.locator(".widget-dropdown")).last
    explorer.scroll_into_view_if_needed()
    plot = explorer.locator(".js-plotly-plot")
    plot.locator(".gl-container canvas").first.wait_for(timeout=120_000)
    title = plot.locator(".gtitle")
    assert title.text_content().endswith("image 0")
    canvas = plot.locator(".gl-container canvas").first
    page.wait_for_timeout(1000)
    before = canvas.screenshot(path=SCREENSHOTS / "05_sphere_explorer_before.png")
    assert drawn_fraction(before) > 0.02, "the sphere explorer's WebGL canvas is blank"
    drag_slider(page, explorer.locator(".widget-slider", has_text="image"), 60)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
        ".some(t => / image [1-9][0-9]*$/.test(t.textContent))",
        timeout=60_000,
    )
    canvas = plot.locator(".gl-container canvas").first
    after = wait_for_new_screenshot(canvas, before, threshold=0.01)
    (SCREENSHOTS / "05_sphere_explorer_after.png").write_bytes(after)
    explorer.screenshot(path=SCREENSHOTS / "05_sphere_explorer.png")
    assert drawn_fraction(after) > 0.02, "the redrawn sphere explorer's WebGL canvas is blank"
    assert changed_fraction(before, after) > 0.01, "the image slider left the spheres as they were"


def test_report_opens_offline_and_draws_every_figure(notebooks_in_lab, browser):
    _, _, run_dir = notebooks_in_lab
    assert (run_dir / "stream" / "model" / "predictions.npz").is_file(), "notebook 05 first"
    summary = execution.collect_summary(run_dir, reproducibility_record({"seed": 0}, 1))
    cryosphere_io.write_json(run_dir / "summary.json", summary)
    path = report.write_report(run_dir)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    refused: list[str] = []

    def refuse(route):
        refused.append(route.request.url)
        route.abort()

    context.route(lambda url: not url.startswith("file://"), refuse)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(path.as_uri())
    figures = page.locator(".report-figure")
    count = figures.count()
    assert count == len(report.DEFAULT_PARTICLES) + 1  # spheres of 3 particles, the curves
    page.wait_for_function(
        "() => [...document.querySelectorAll('.report-figure')].every(f => {"
        " const p = f.querySelector('.js-plotly-plot');"
        " return p && p._fullLayout && p.querySelector('.main-svg'); })",
        timeout=180_000,
    )
    for i in range(count):
        figure = figures.nth(i)
        figure.scroll_into_view_if_needed()
        name = figure.get_attribute("data-figure")
        canvases = figure.locator(".gl-container canvas")
        if name.startswith("sphere"):
            assert canvases.count() >= 1, f"{name}: no WebGL canvas"
            shot = canvases.first.screenshot(path=SCREENSHOTS / f"report_{name}.png")
            assert drawn_fraction(shot) > 0.02, f"{name}: the WebGL canvas is blank"
        else:
            shot = figure.screenshot(path=SCREENSHOTS / f"report_{name}.png")
            assert drawn_fraction(shot) > 0.02, f"{name}: nothing drawn"
    page.screenshot(path=SCREENSHOTS / "report.png")
    context.close()
    assert not problems, f"console errors in report.html: {problems}"
    assert not refused, f"report.html asked the network for {refused}"
