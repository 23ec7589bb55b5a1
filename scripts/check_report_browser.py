"""Open a report.html (probe_dist/report/html.py) in a real headless browser, take a full-page screenshot, and fail
if the page logs a console error or raises, loads anything but its own file and data URIs, or shows an image that
did not decode (naturalWidth 0).

    python scripts/check_report_browser.py OUT_DIR/report.html [--screenshot shot.png] [--browser /usr/bin/chromium]

Needs the playwright package (pip install playwright; not a project dependency) and a Chromium: playwright's own
(python -m playwright install chromium) or a system one (Debian: apt-get install chromium), found on PATH or given
with --browser. Exit status: 0 the page passed, 1 it failed a check (each failure printed), 2 no browser could be
started (the reason printed) or the file does not exist.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

SYSTEM_BROWSERS = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome",
                   "google-chrome-stable")

_IMAGES = """() => Array.from(document.images).map((img, i) => ({
    index: i, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
    src: (img.getAttribute('src') || '').slice(0, 40)}))"""


def _executables(explicit: str | None) -> list[str | None]:
    """Browsers to try in order: the one given, playwright's own (None), then system ones on PATH."""
    if explicit:
        return [explicit]
    found = [shutil.which(name) for name in SYSTEM_BROWSERS]
    return [None] + [path for path in dict.fromkeys(found) if path]


def check(report: Path, screenshot: Path, browser: str | None = None) -> int:
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("no browser: the playwright package is not installed (pip install playwright)", file=sys.stderr)
        return 2
    url = report.resolve().as_uri()
    problems: list[str] = []
    with sync_playwright() as pw:
        instance, tried = None, []
        for executable in _executables(browser):
            try:
                instance = pw.chromium.launch(headless=True, executable_path=executable)
                break
            except PlaywrightError as exc:
                tried.append(f"{executable or 'playwright chromium'}: {str(exc).splitlines()[0]}")
        if instance is None:
            print("no browser could be started:\n  " + "\n  ".join(tried), file=sys.stderr)
            return 2
        print(f"browser: {instance.browser_type.name} {instance.version}")
        try:
            page = instance.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
                    if msg.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url[:80]} {req.failure}"))

            def request(req):
                if req.url != url and not req.url.startswith("data:"):
                    problems.append(f"external request: {req.url[:120]}")

            page.on("request", request)
            page.goto(url, wait_until="load")
            images = page.evaluate(_IMAGES)
            for img in images:
                if not img["complete"] or img["width"] == 0:
                    problems.append(f"image {img['index']} did not decode ({img['src']}…)")
            print(f"images: {len(images)}, sizes " + ", ".join(f"{i['width']}x{i['height']}" for i in images))
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot: {screenshot}")
        finally:
            instance.close()
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the report.html to open")
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG to write (default: next to the report)")
    parser.add_argument("--browser", default=None, help="a Chromium executable (default: playwright's, then PATH)")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"no such file: {args.report}", file=sys.stderr)
        return 2
    screenshot = args.screenshot or args.report.with_name(args.report.stem + ".screenshot.png")
    return check(args.report, screenshot, args.browser)


if __name__ == "__main__":
    sys.exit(main())
