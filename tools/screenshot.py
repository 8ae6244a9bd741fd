"""Open a report page in headless Chromium as a person would: a screenshot at a given window width, the
page's console messages (errors included, e.g. a plot that cannot be decoded) and the DOM after scripts ran.

    python tools/screenshot.py runs/sweep/report.html docs/img/sweep-report.png --width 1280
    python tools/screenshot.py runs/cls/report.html phone.png --width 390

Used by the `browser` tests (tests/compress/evaluate/test_browser.py); needs `chromium` on the PATH.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

CONSOLE = re.compile(r':CONSOLE[^\]]*\] "(.*)", source: (\S*)')
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
         "--force-device-scale-factor=1"]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _run(chromium: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="compress-chromium-") as profile:
        return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)


def console_messages(stderr: str) -> list[str]:
    return [match.group(1) for match in CONSOLE.finditer(stderr)]


def trim(png: Path, background: int = 250) -> None:
    """Crop the blank rows below the page's content (the window is taller than most pages)."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    grey = image.convert("L").point(lambda v: 255 if v < background else 0)
    box = grey.getbbox()
    if box:
        image.crop((0, 0, image.width, min(image.height, box[3] + 24))).save(png, optimize=True)


def render(page: str | Path, shot: str | Path | None = None, width: int = 1280, height: int = 4000,
           chromium: str | None = None, timeout: float = 120, fragment: str = "") -> dict:
    """{"console": [messages], "dom": str} of `page` (with `#fragment` in its URL if given); with `shot`, also
    its screenshot at `width` (trimmed)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed")
    url = Path(page).resolve().as_uri() + (f"#{quote(fragment)}" if fragment else "")
    size = f"--window-size={width},{height}"
    if shot is not None:  # one page load gives both: the screenshot file and the DOM on stdout
        done = _run(chromium, [size, f"--screenshot={Path(shot).resolve()}", "--dump-dom", url], timeout)
        if done.returncode != 0 or not Path(shot).is_file():
            raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-500:]}")
        trim(Path(shot))
    else:
        done = _run(chromium, [size, "--dump-dom", url], timeout)
        if done.returncode != 0:
            raise RuntimeError(f"chromium --dump-dom failed ({done.returncode}): {done.stderr[-500:]}")
    return {"console": list(dict.fromkeys(console_messages(done.stderr))), "dom": done.stdout}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page")
    parser.add_argument("shot")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args()
    result = render(args.page, args.shot, args.width, args.height)
    for message in result["console"]:
        print(f"console: {message}", file=sys.stderr)
    print(args.shot)
    return 1 if result["console"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
