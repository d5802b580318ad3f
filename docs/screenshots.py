"""Builds the site, screenshots four pages in headless Chromium and checks that they rendered.

    python docs/screenshots.py [--out DIR] [--site DIR]

Needs the `docs` extra, `selenium`, and Chromium with its driver (Debian: `apt-get install
chromium chromium-driver`). Pages: Home, the Curvature guide, notebook 04 and the API entry of
`jhvp.curvature.eigh`. Each is checked for its title, the navigation, no raw `:::` directive
text, highlighted code and images that loaded; the script prints what it found and exits 1 if a
check failed. CI does not run it (no browser there); it is run before a docs change lands.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (file name, path in the site, text the title must hold, element that must exist, images needed)
PAGES = [
    ("home", "", "jhvp", "#ten-lines", 0),
    ("curvature-guide", "curvature/", "Curvature guide", "h1", 0),
    ("notebook-04", "notebooks/04_curvature/", "Curvature", ".jp-Notebook, .jupyter-wrapper", 1),
    ("api-eigh", "api/curvature/#jhvp.curvature.eigh", "jhvp.curvature",
     '[id="jhvp.curvature.eigh"]', 0),
]

# Evaluated in the page: what rendered. `sel` is the page's required element.
PROBE = """
const sel = arguments[0];
const text = document.body.innerText;
const imgs = Array.from(document.images);
const nav = document.querySelectorAll('nav.md-nav--primary a.md-nav__link');
const target = document.querySelector(sel);
const box = target ? target.getBoundingClientRect() : null;
return {
  title: document.title,
  nav_links: nav.length,
  raw_directives: (text.match(/^\\s*:::/gm) || []).length,
  highlighted_spans: document.querySelectorAll(
    '.highlight span[class], .highlight-ipynb span[class]').length,
  code_blocks: document.querySelectorAll('pre code, .highlight pre, .highlight-ipynb pre').length,
  images: imgs.length,
  images_broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80)),
  target_found: !!target,
  target_visible: !!box && box.bottom > 0 && box.top < window.innerHeight,
};
"""


def build(site: pathlib.Path) -> None:
    """Builds the site strictly into `site`."""
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                   cwd=ROOT, check=True)


@contextlib.contextmanager
def serve(site: pathlib.Path):
    """Serves `site` over HTTP on a free localhost port; yields the base URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def browser():
    """Headless Chromium through Selenium, 1280 x 1600."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600",
                 "--hide-scrollbars"):
        options.add_argument(flag)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        options.binary_location = chromium
    driver = shutil.which("chromedriver")
    return webdriver.Chrome(options=options, service=Service(driver) if driver else None)


def check(name: str, found: dict, title: str, min_images: int) -> list[str]:
    """Returns the failed checks of one page."""
    failures = []
    if title not in found["title"]:
        failures.append(f"title {found['title']!r} lacks {title!r}")
    if found["nav_links"] < 5:
        failures.append(f"navigation has {found['nav_links']} links")
    if found["raw_directives"]:
        failures.append(f"{found['raw_directives']} raw ':::' directive lines")
    if found["code_blocks"] and not found["highlighted_spans"]:
        failures.append("code blocks are not highlighted")
    if found["images"] < min_images:
        failures.append(f"{found['images']} images, expected at least {min_images}")
    if found["images_broken"]:
        failures.append(f"images that did not load: {found['images_broken']}")
    if not found["target_found"]:
        failures.append("the page's main element is missing")
    elif not found["target_visible"]:
        failures.append("the page's main element is not in view")
    return failures


def main() -> int:
    """Builds (or takes) the site, checks each page; returns 1 if any check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "jhvp-screenshots")
    parser.add_argument("--site", type=pathlib.Path, help="a built site (default: build one)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        site = args.site
        if site is None:
            site = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory())) / "site"
            build(site)
        base = stack.enter_context(serve(site))
        driver = browser()
        stack.callback(driver.quit)
        failed = 0
        for name, path, title, selector, min_images in PAGES:
            driver.get(base + path)
            driver.execute_script("return document.fonts.ready")
            found = driver.execute_script(PROBE, selector)
            shot = args.out / f"{name}.png"
            driver.save_screenshot(str(shot))
            failures = check(name, found, title, min_images)
            failed += bool(failures)
            status = "ok" if not failures else "FAILED: " + "; ".join(failures)
            print(f"{name}: {status}\n  {base + path}\n  title {found['title']!r}, "
                  f"{found['nav_links']} nav links, {found['code_blocks']} code blocks "
                  f"({found['highlighted_spans']} highlighted spans), {found['images']} images, "
                  f"screenshot {shot}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
