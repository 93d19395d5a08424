"""The studio in a real browser (headless Chromium through Selenium): the page loads, a landmark
drags, Generate fills the grid with N cats; a screenshot is saved beside the test's files."""
import shutil
import threading

import pytest

import cat_studio as cs
from helpers import live_model

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not CHROMIUM or not DRIVER:
        pytest.skip("no headless Chromium with chromedriver here (Debian: apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def test_the_page_drags_a_landmark_and_generates_n_cats_at_twice_their_size(browser, tmp_path):
    server = cs.serve(live_model(landmarks=True), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.execute_script("return window.studio.info !== null"))
        canvas = browser.find_element(By.ID, "face")
        assert canvas.is_displayed()  # a landmark model shows the editor
        before = browser.execute_script("return window.studio.landmarks[2]")  # the mouth
        lo, span = browser.execute_script("return [window.studio.view.lo, window.studio.view.span]")
        x, y = ((v - lo) / span * 320 for v in before)  # canvas pixels
        ActionChains(browser).move_to_element_with_offset(canvas, x - 160, y - 160).click_and_hold() \
            .move_by_offset(24, 30).release().perform()
        after = browser.execute_script("return window.studio.landmarks[2]")
        assert after[0] - before[0] == pytest.approx(24 / 320 * span, abs=0.02)
        assert after[1] - before[1] == pytest.approx(30 / 320 * span, abs=0.02)
        for field, value in (("n", "5"), ("steps", "2")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.execute_script(
            "const imgs = [...document.querySelectorAll('#grid img')];"
            "return imgs.length === 5 && imgs.every((im) => im.complete && im.naturalWidth === 16)"))
        assert "/api/generate" in browser.find_element(By.ID, "status").text
        # cats at twice their pixel size; the region buttons and landmark names come from /api/info
        assert browser.execute_script("return document.querySelector('#grid img').clientWidth") == 32
        assert browser.execute_script("return [...document.querySelectorAll('#regions button')]"
                                      ".map((b) => b.textContent)") == list(cs.REGIONS)
        assert browser.execute_script("return window.studio.info.names") == list(cs.LANDMARKS)
        assert browser.find_element(By.ID, "error").text == ""
        browser.save_screenshot(str(tmp_path / "studio.png"))
        assert (tmp_path / "studio.png").stat().st_size > 1000
    finally:
        server.shutdown()
        server.server_close()
