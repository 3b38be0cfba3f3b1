"""Check that a report really renders, in a real headless Chromium.

Two passes: ``--dump-dom`` on a copy of the page with a small probe script (the report itself
has no scripts) reads every <img>'s naturalWidth after load and the page height; then a
full-page ``--screenshot`` of the unmodified page is analysed with PIL. The embedded PNGs are
also decoded independently with PIL.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from mechsink.report.manifest import ReportError

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
_PROBE_ID = "mechsink-render-probe"
_PROBE = f"""<script>
window.addEventListener("load", () => {{
  const probe = document.createElement("pre");
  probe.id = "{_PROBE_ID}";
  probe.textContent = JSON.stringify({{
    images: Array.from(document.images).map(i => ({{width: i.naturalWidth, height: i.naturalHeight, complete: i.complete}})),
    tables: Array.from(document.querySelectorAll("table")).map(t => t.rows.length),
    table_widths: Array.from(document.querySelectorAll("table")).map(t => Math.ceil(t.getBoundingClientRect().right)),
    page_width: Math.floor(document.querySelector("main") ? document.querySelector("main").getBoundingClientRect().right
                                                          : document.documentElement.clientWidth),
    view_width: document.documentElement.clientWidth,
    scroll_width: document.documentElement.scrollWidth,
    figures: Array.from(document.querySelectorAll("figure")).map(f => {{
      const c = f.querySelector("figcaption"); return c ? c.textContent.trim() : ""; }}),
    first_screen: (() => {{ const out = []; for (const e of document.querySelectorAll("td, p, h2")) {{
      const r = e.getBoundingClientRect(); if (r.top < window.innerHeight) out.push(e.textContent.trim()); }}
      return out.join("\\n"); }})(),
    height: Math.ceil(document.documentElement.scrollHeight),
  }});
  document.body.appendChild(probe);
}});
</script>"""
_DATA_URI = re.compile(r'<img[^>]*\ssrc="data:image/png;base64,([A-Za-z0-9+/=]+)"')


class BrowserUnavailable(ReportError):
    """No Chromium/Chrome binary was found."""


def find_chromium() -> str | None:
    """Path of a Chromium-family browser: $MECHSINK_CHROMIUM, else the first on PATH."""
    env = os.environ.get("MECHSINK_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(browser: str, args: list[str], profile: Path, timeout: float) -> str:
    cmd = [browser, *_FLAGS, f"--user-data-dir={profile}", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ReportError(f"{Path(browser).name} did not finish within {timeout:g} s") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ReportError(f"{Path(browser).name} exited with {proc.returncode}: {last}")
    return proc.stdout


def decode_embedded_images(page: str) -> list[tuple[int, int]]:
    """(width, height) of every base64 PNG <img> in the page, decoded with PIL (raises if corrupt)."""
    sizes = []
    for i, b64 in enumerate(_DATA_URI.findall(page)):
        try:
            with Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) as im:
                im.load()
                sizes.append(im.size)
        except Exception as e:  # any decoding failure means a broken figure
            raise ReportError(f"embedded image {i + 1} does not decode as PNG: {e}") from e
    return sizes


def colour_pixels(png: str | os.PathLike | Image.Image, colour: Sequence[int] | str, tolerance: int = 12) -> int:
    """How many pixels lie within `tolerance` (per channel) of an RGB colour ('#rrggbb' or a triple)."""
    rgb = _rgb(colour)
    im = png if isinstance(png, Image.Image) else Image.open(png)
    pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
    return int(np.count_nonzero(np.all(np.abs(pixels - np.array(rgb)) <= tolerance, axis=-1)))


def _rgb(colour: Sequence[int] | str) -> tuple[int, int, int]:
    if isinstance(colour, str):
        c = colour.lstrip("#")
        if len(c) != 6:
            raise ReportError(f"colour {colour!r} must be '#rrggbb'")
        return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    r, g, b = colour
    return int(r), int(g), int(b)


def check_rendered(
    index_html: str | os.PathLike,
    *,
    screenshot: str | os.PathLike | None = None,
    colours: Iterable[Sequence[int] | str] = (),
    tolerance: int = 12,
    width: int = 1200,
    max_height: int = 16000,
    timeout: float = 120.0,
) -> dict:
    """Render a report page in headless Chromium and report what actually showed up.

    Returns a JSON-safe dict: ``images`` (naturalWidth/Height per <img> after load),
    ``all_images_rendered`` (every <img> has naturalWidth > 0 and matches its PIL decoding),
    ``table_rows`` (rendered row count per <table>), ``tables_fit`` (no table reaches past the
    page's main column and nothing scrolls sideways), ``figure_captions`` (the text of each
    <figcaption>), ``first_screen`` (the text of the paragraphs, headings and cells on the first
    screen, window ``width`` x 1000),
    ``decoded_sizes``, ``page_height``, ``screenshot`` (path of the full-page PNG),
    ``screenshot_size``, ``ink_fraction`` (share of pixels that differ from the background),
    ``distinct_colours``, ``non_blank`` and ``colour_pixels`` (pixel count per requested colour,
    keyed as given). Raises BrowserUnavailable when no browser is installed.
    """
    page_path = Path(index_html).resolve()
    if not page_path.is_file():
        raise ReportError(f"no report page at {page_path}")
    browser = find_chromium()
    if browser is None:
        raise BrowserUnavailable("no Chromium found; install it (apt-get install chromium) or set MECHSINK_CHROMIUM")
    page = page_path.read_text(encoding="utf-8")
    decoded = decode_embedded_images(page)

    with tempfile.TemporaryDirectory(prefix="mechsink-browser-") as tmp:
        tmp = Path(tmp)
        probed = tmp / "probe.html"
        probed.write_text(page.replace("</body>", _PROBE + "\n</body>", 1), encoding="utf-8")
        dom = _run(browser, [f"--window-size={width},1000", "--dump-dom", probed.as_uri()], tmp / "profile", timeout)
        found = re.search(rf'<pre id="{_PROBE_ID}">(.*?)</pre>', dom, re.S)
        if found is None:
            raise ReportError("the page did not finish loading in the browser (no probe output)")
        probe = json.loads(html.unescape(found.group(1)))

        height = max(200, min(int(probe["height"]), max_height))
        shot = Path(screenshot) if screenshot else tmp / "screenshot.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        _run(browser, [f"--window-size={width},{height}", f"--screenshot={shot}", page_path.as_uri()], tmp / "profile", timeout)
        if not shot.is_file():
            raise ReportError("the browser wrote no screenshot")
        with Image.open(shot) as im:
            rgb = im.convert("RGB")
        pixels = np.asarray(rgb, dtype=np.int32).reshape(-1, 3)
        packed = (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]  # one int per colour: fast unique
        values, counts = np.unique(packed, return_counts=True)
        ink = float(np.mean(packed != values[np.argmax(counts)]))  # background = the most common colour
        found_colours = {str(c) if isinstance(c, str) else "#%02x%02x%02x" % _rgb(c): colour_pixels(rgb, c, tolerance)
                         for c in colours}

    images = probe["images"]
    rendered = (
        len(images) == len(decoded)
        and all(i["width"] > 0 and i["complete"] for i in images)
        and all((i["width"], i["height"]) == tuple(d) for i, d in zip(images, decoded))
    )
    return {
        "browser": browser,
        "images": images,
        "decoded_sizes": [list(d) for d in decoded],
        "all_images_rendered": bool(rendered),
        "table_rows": probe["tables"],
        "tables_fit": bool(all(w <= probe["page_width"] + 1 for w in probe["table_widths"])
                           and probe["scroll_width"] <= probe["view_width"]),
        "table_right_edges": probe["table_widths"],
        "page_width": probe["page_width"],
        "figure_captions": probe["figures"],
        "first_screen": probe["first_screen"],
        "page_height": int(probe["height"]),
        "screenshot": str(shot) if screenshot else None,
        "screenshot_size": list(rgb.size),
        "ink_fraction": ink,
        "distinct_colours": int(len(values)),
        "non_blank": bool(ink > 0.01 and len(values) > 16),
        "colour_pixels": found_colours,
    }
