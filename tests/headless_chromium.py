"""Headless Chromium for the tests that look at pages: Debian's ``chromium`` + ``chromium-driver`` driven by Selenium
(Playwright's own browser download cannot work on these machines; ``.ci/run`` installs the Debian packages)."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Optional

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1600")


def missing() -> Optional[str]:
    """Why a browser test cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install -y chromium chromium-driver; .ci/run does it)"
    return None


class Browser:
    """A headless Chromium with its own fresh profile folder, closed (and the folder removed) on exit."""

    def __enter__(self) -> Any:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="sdloop-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        self.driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        self.driver.set_page_load_timeout(60)
        return self.driver

    def __exit__(self, *exc: Any) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def full_page_screenshot(driver: Any, path: str) -> None:
    """Resize the window to the page's height and save a PNG of all of it."""
    height = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    driver.set_window_size(1280, min(int(height) + 40, 8000))
    driver.save_screenshot(path)
