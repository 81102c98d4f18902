"""Render a `spo compare` report in headless Chromium and save a full-page PNG screenshot.

Why: report.html must stand alone (plots and samples embedded, no links, scripts or fonts).
The page is copied alone into an empty folder and rendered with name resolution and the proxy
pointed nowhere, so anything it would fetch from beside it or from the network shows as broken
in the screenshot. Needs Debian's `chromium` package (`apt-get install chromium`).

Usage: python scripts/screenshot_report.py REPORT.html OUT.png [--width 1400]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FIRST_HEIGHT = 4000  # the window's first height; doubled while the page fills it
MAX_HEIGHT = 64000
MARGIN = 24  # blank pixels kept below the last content


def screenshot(page: Path, out: Path, width: int = 1400) -> Path:
    """`page` rendered alone in headless Chromium, the whole page (cropped below its
    content), saved to `out`."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        alone = Path(tmp) / "page" / page.name
        alone.parent.mkdir()
        shutil.copyfile(page, alone)
        height = FIRST_HEIGHT
        while True:
            image = _render(browser, alone, Path(tmp), width, height)
            ink = np.flatnonzero((np.asarray(image.convert("L")) < 250).any(axis=1))
            bottom = int(ink[-1]) + MARGIN if ink.size else height  # blank: kept whole
            if bottom < height or height >= MAX_HEIGHT:
                break
            height *= 2
        out.parent.mkdir(parents=True, exist_ok=True)
        image.crop((0, 0, width, min(bottom, height))).save(out)
    return out


def _render(browser: str, page: Path, tmp: Path, width: int, height: int) -> Image.Image:
    """One screenshot of `page` in a `width` x `height` window, name resolution and the proxy
    pointed nowhere."""
    raw = tmp / "raw.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=http://127.0.0.1:9",
            f"--user-data-dir={tmp / 'profile'}",
            f"--window-size={width},{height}",
            f"--screenshot={raw}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return Image.open(raw).convert("RGB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1400)
    args = ap.parse_args()
    try:
        print(screenshot(args.page.resolve(), args.out, args.width))
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
