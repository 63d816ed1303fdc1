"""Render a report page in headless Chromium and save a small PNG, as a person would see it.

    python tests/privacy/report/screenshot_report.py RUN_DIR/report.html docs/report.png [--height 2400]

For the docs, not for the test suite (which must not need a browser): Debian's
``chromium`` package is required. Chromium runs with networking, sync and updates off, so
the screenshot also shows that the page renders offline. The PNG is quantized to 256
colours (Pillow, installed with matplotlib) to keep it well under 400 KB.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image


def screenshot(page: Path, out: Path, height: int) -> Path:
    browser = shutil.which("chromium")
    if browser is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryDirectory() as work:
        raw = Path(work) / "raw.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={raw}", f"--window-size=1200,{height}",
                        page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
        image = Image.open(raw).convert("RGB")
        image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(out, optimize=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    path = screenshot(args.page, args.out, args.height)
    print(f"{path}: {path.stat().st_size // 1024} KB")
