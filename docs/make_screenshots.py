"""Regenerate ``docs/explore-cp2.png`` and ``docs/explore-cp4.png``: the explorer page in a real browser.

Run from anywhere: ``python docs/make_screenshots.py`` builds the page for the bundled example
(``cpinspect explore examples/qwen3vl_packed.pt --cp N``) and photographs it with the system's
headless Chromium through Selenium (Debian: ``apt-get install chromium chromium-driver``; ``pip
install selenium``). ``tests/process/test_explore_browser.py`` drives the browser the same way, through
:func:`start_browser` here, and takes the same screenshots into a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "qwen3vl_packed.pt"
SHOTS = {2: ROOT / "docs" / "explore-cp2.png", 4: ROOT / "docs" / "explore-cp4.png"}
WIDTH, HEIGHT = 1200, 1500
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> tuple[str, str] | str:
    """``(browser, chromedriver)`` paths of the system's Chromium, or the reason there is none."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium, or pip install -e '.[test]')"
    browser = os.environ.get("CPINSPECT_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = os.environ.get("CPINSPECT_CHROMEDRIVER") or shutil.which("chromedriver")
    for name, path in (("browser", browser), ("chromedriver", driver)):
        if path and not os.access(path, os.X_OK):
            return f"the {name} {path} is not an executable file"
    if not browser or not driver:
        return ("no headless Chromium found (apt-get install chromium chromium-driver, or set CPINSPECT_CHROMIUM "
                "and CPINSPECT_CHROMEDRIVER)")
    return browser, driver


def start_browser(width: int = WIDTH, height: int = HEIGHT) -> Any:
    """A headless Chromium driven by Selenium, using the system's chromedriver (no download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    if isinstance(found, str):
        raise RuntimeError(found)
    options = Options()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(found[1]), options=options)


def write_page(cp: int, out: Path) -> Path:
    """``cpinspect explore examples/qwen3vl_packed.pt --cp N -o out`` (in process); exit code must be 0."""
    from typer.testing import CliRunner

    from cpinspect.cli.app import app

    here = os.getcwd()
    os.chdir(ROOT)  # so the page names the example as a reader types it: examples/qwen3vl_packed.pt
    try:
        result = CliRunner().invoke(app, ["explore", str(EXAMPLE.relative_to(ROOT)), "--cp", str(cp), "-o", str(out)])
    finally:
        os.chdir(here)
    if result.exit_code:
        raise RuntimeError(f"cpinspect explore failed ({result.exit_code}): {result.output}")
    return out


def screenshot(driver: Any, page: Path, target: Path, hover: int | None = None) -> Path:
    """Open ``page``, point at token ``hover`` (so the linked highlight shows), save a PNG of the whole page."""
    driver.get(page.resolve().as_uri())
    if hover is not None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        cell = driver.find_element(By.CSS_SELECTOR, f'#cpx-row [data-g="{hover}"]')
        ActionChains(driver).move_to_element(cell).perform()
    size = driver.get_window_size()
    driver.set_window_size(size["width"], driver.execute_script(
        "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight"))
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(target))
    driver.set_window_size(size["width"], size["height"])
    return target


def make_all(out_dir: Path | None = None, driver: Any = None) -> list[Path]:
    """Both screenshots, into ``docs/`` (or ``out_dir``); starts a browser unless one is given."""
    own = driver is None
    driver = driver or start_browser()
    written = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for cp, target in SHOTS.items():
                page = write_page(cp, Path(tmp) / f"explore-cp{cp}.html")
                written.append(screenshot(driver, page, (out_dir / target.name) if out_dir else target, hover=20))
    finally:
        if own:
            driver.quit()
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for path in make_all():
        print(f"wrote {path.relative_to(ROOT)}")
