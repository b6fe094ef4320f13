"""Writing figures to files, each atomically (:func:`cryosphere.io.atomic_path`): matplotlib
figures as PNG/PDF (:func:`save_figure`), plotly figures as standalone HTML
(:func:`export_html`) or PNG through kaleido (:func:`export_png`), and the display bundle that
shows a plotly figure inside ipywidgets (:func:`plotly_mimebundle`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryosphere import io

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from matplotlib.figure import Figure

__all__ = ["save_figure", "export_html", "png_export_problem", "export_png", "plotly_mimebundle"]


def save_figure(
    fig: Figure,
    path: str | os.PathLike[str],
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 300,
) -> list[Path]:
    """Save a matplotlib figure once per format, each written atomically.

    Args:
        fig: ``matplotlib.figure.Figure``.
        path: target path; its suffix (if any) is replaced by each format's
            (``figures/label.png`` and ``figures/label.pdf`` from ``figures/label``).
        formats: file formats matplotlib knows (default PNG and PDF).
        dpi: resolution of raster formats.

    Returns:
        The written paths, in the order of ``formats``.
    """
    target = Path(path)
    written = []
    for fmt in formats:
        out = target.with_suffix(f".{fmt}")
        with io.atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
        written.append(out)
    return written


def export_html(fig: go.Figure, path: str | os.PathLike[str], div_id: str | None = None) -> Path:
    """Write a plotly figure as a standalone HTML page (plotly.js embedded: opens offline),
    atomically. ``div_id`` names the figure's ``<div>`` (default: a random id)."""
    target = Path(path)
    with io.atomic_path(target) as tmp:
        fig.write_html(tmp, include_plotlyjs=True, full_html=True, div_id=div_id)
    return target


_CHROME_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _find_chromium() -> str | None:
    """Path of a Chrome/Chromium kaleido (>= 1) can drive, or None."""
    try:
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
        if found:
            return str(found)
    except Exception:  # noqa: BLE001 - fall back to a plain PATH search
        pass
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    for name in _CHROME_NAMES:
        if found := shutil.which(name):
            return found
    return None


def _kaleido_version() -> str | None:
    if importlib.util.find_spec("kaleido") is None:
        return None
    try:
        return importlib.metadata.version("kaleido")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def png_export_problem() -> str | None:
    """Why :func:`export_png` cannot work here, or None when it can.

    PNG export needs the ``kaleido`` package; kaleido 1.x also needs a Chrome or Chromium
    browser (kaleido 0.2 bundles its own).
    """
    version = _kaleido_version()
    if version is None:
        return (
            "PNG export needs the kaleido package, which is not installed: "
            "pip install kaleido (or pip install 'cryosphere-pose[export]')"
        )
    if int(version.split(".")[0]) >= 1 and _find_chromium() is None:
        return (
            f"PNG export with kaleido {version} needs a Chrome or Chromium browser and none was "
            "found: install one (apt install chromium on Debian/Ubuntu, or plotly_get_chrome to "
            "download one) or set BROWSER_PATH to its executable; export_html needs neither"
        )
    return None


def _use_bundled_plotlyjs() -> None:
    """Point kaleido (>= 1) at the plotly.js that ships inside the plotly package, so that
    rendering needs no network (kaleido otherwise fetches plotly.js from a CDN, and without
    network access the page fails with ``ReferenceError: Plotly is not defined``)."""
    import plotly
    import plotly.io as pio

    defaults = getattr(pio, "defaults", None)
    bundled = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if defaults is not None and getattr(defaults, "plotlyjs", None) is None and bundled.is_file():
        defaults.plotlyjs = str(bundled)


def export_png(
    fig: go.Figure,
    path: str | os.PathLike[str],
    width: int | None = None,
    height: int | None = None,
    scale: float = 2.0,
) -> Path:
    """Render a plotly figure to PNG with kaleido, atomically.

    Raises:
        RuntimeError: kaleido or a Chrome/Chromium browser is missing (the message says which
            and how to install it; see :func:`png_export_problem`), or rendering failed.
    """
    problem = png_export_problem()
    if problem is not None:
        raise RuntimeError(problem)
    target = Path(path)
    try:
        _use_bundled_plotlyjs()
        with io.atomic_path(target) as tmp:
            fig.write_image(tmp, format="png", width=width, height=height, scale=scale)
    except Exception as error:
        raise RuntimeError(
            f"kaleido could not render {target.name}: {error}; check that the Chrome/Chromium "
            f"at {_find_chromium()} starts (apt install chromium), or use export_html"
        ) from error
    return target


def plotly_mimebundle(fig: go.Figure) -> dict[str, Any]:
    """A display bundle for a plotly figure: the plotly JSON MIME type (rendered by JupyterLab,
    Notebook 7 and VS Code) and a plain-text fallback; used to show figures in ipywidgets."""
    title = fig.layout.title.text or "plotly figure"
    return {
        "application/vnd.plotly.v1+json": {
            **json.loads(fig.to_json()),
            "config": {"displaylogo": False, "responsive": True},
        },
        "text/plain": f"<plotly figure: {title}>",
    }
