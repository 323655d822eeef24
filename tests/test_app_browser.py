"""demo/app.py in a real browser: the test serves the page on 127.0.0.1 with a tiny checkpoint
and drives headless Chromium through Selenium, as a person would: pick a class by its name,
generate; upload a picture, paint over part of it, complete; upload bad files. The images
on the page are fetched and checked (size, known pixels unchanged, equal to generate()).

It needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver)
and selenium (requirements.txt). Run as root on a machine with apt-get (a CI container, such as
the one `.ci/run` runs in), it installs the two packages first, unless
FRACTALGEN_BROWSER_INSTALL=0; elsewhere, without the browser, it skips saying how to get it. Set
FRACTALGEN_SCREENSHOTS=DIR to keep its screenshots.
"""
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from models import load_model
from util.visualize import make_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROWSER_PACKAGES = ("chromium", "chromium-driver")
# as root on a machine without a network: no sandbox, no GPU, no background connections
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1800")
JOB_TIMEOUT_S = 180  # a job of the tiny model takes about a second; the margin is for a loaded machine


def browser_paths():
    return shutil.which("chromium"), shutil.which("chromedriver")


def install_browser():
    """apt-get install the browser: returns why it could not, or None."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get (or a parallel test run) may hold the lock
    for cmd in (["apt-get", *lock, "update", "-qq"], ["apt-get", *lock, "install", "-y", "-qq", *BROWSER_PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            return f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return None


def may_install_browser():
    """Root with apt-get (what CI containers are), unless FRACTALGEN_BROWSER_INSTALL=0. Not tied to
    a CI variable: CI services differ in what they set, and the browser test must run in ours."""
    if os.environ.get("FRACTALGEN_BROWSER_INSTALL", "1") == "0":
        return False
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


@pytest.fixture(scope="module")
def browser():
    """(chromium, chromedriver) paths, or a skip with the reason."""
    pytest.importorskip("selenium", reason="needs selenium: pip install -r requirements.txt")
    if None in browser_paths() and may_install_browser():
        problem = install_browser()
        if problem:
            pytest.fail(problem)
    chromium, driver = browser_paths()
    if chromium is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver "
                    "(as root with apt-get the test installs them itself)")
    return chromium, driver


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(imagenet_tiny_ckpt):
    """Random fractalar_tiny weights with the 1,000 ImageNet classes (names on the page)."""
    return imagenet_tiny_ckpt


@pytest.fixture(scope="module")
def server(browser, ckpt, tmp_path_factory):
    """`python demo/app.py --ckpt CKPT` on a free port of 127.0.0.1; yields its address."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "demo/app.py", "--ckpt", ckpt, "--port", str(port),
                                 "--threads", "1"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"demo/app.py did not serve {url}: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    # a browser closed while an upload still streams makes starlette log ClientDisconnect: not a server fault
    tracebacks = [part for part in log.split("Traceback")[1:] if "ClientDisconnect" not in part]
    assert not tracebacks, log[-3000:]


@pytest.fixture
def page(browser, server, tmp_path, request):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    chromium, driver_path = browser
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(server)
        wait_for(driver, lambda: "1000 classes" in text(driver, "model-info"), "the model info")
        yield driver
    finally:
        screenshot(driver, tmp_path / f"{request.node.name}.png")
        driver.quit()


def screenshot(driver, path):
    """The page as the test left it; copied to FRACTALGEN_SCREENSHOTS when that is set."""
    driver.save_screenshot(str(path))
    keep = os.environ.get("FRACTALGEN_SCREENSHOTS")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(path, keep)


def wait_for(driver, condition, what, timeout=JOB_TIMEOUT_S):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def text(driver, elem_id):
    """The text of an element ('' while the page has not drawn it yet)."""
    from selenium.webdriver.common.by import By
    found = driver.find_elements(By.ID, elem_id)
    return found[0].text.strip() if found else ""


def finished(driver, elem_id):
    """Wait until the status line of a job says done or error; return it."""
    wait_for(driver, lambda: text(driver, elem_id).startswith(("done", "error")), f"#{elem_id}")
    return text(driver, elem_id)


def image_on_page(driver, elem_id):
    """The picture an output shows, fetched from the page's own address -> uint8 (3, H, W)."""
    from selenium.webdriver.common.by import By
    img = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} img")
    wait_for(driver, lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img),
             f"#{elem_id} img to load")
    with urllib.request.urlopen(img.get_attribute("src"), timeout=30) as response:
        data = response.read()
    with Image.open(io.BytesIO(data)) as pil:
        assert pil.format == "PNG"  # lossless: the pixels are the model's
        natural = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
        assert list(pil.size) == natural
        return torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1)


def reddish(seed=0, size=16):
    """A picture that is never grey (the checkerboard that marks unknown pixels is)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(200, 256, (size, size)), rng.integers(0, 60, (size, size)),
                     rng.integers(0, 256, (size, size))], -1).astype(np.uint8)


def upload(driver, path):
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))


def open_tab(driver, name):
    from selenium.webdriver.common.by import By
    driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']").click()


def test_sample_a_class_picked_by_name(page, ckpt):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    page.find_element(By.CSS_SELECTOR, "#classes .remove-all").click()
    box = page.find_element(By.CSS_SELECTOR, "#classes input")
    box.send_keys("golden retriever")
    box.send_keys(Keys.ENTER)
    wait_for(page, lambda: "207: golden retriever" in text(page, "classes"), "the class to be picked")
    box.send_keys(Keys.ESCAPE)  # close the list of classes
    wait_for(page, lambda: not page.find_elements(By.CSS_SELECTOR, "[data-testid=dropdown-option]"),
             "the list to close")
    page.find_element(By.ID, "generate").click()
    status = finished(page, "sample-status")
    assert status.startswith("done in") and "2 image(s) with cfg 2, temperature 2, iterations 16,16, seed 0" in status
    shown = image_on_page(page, "samples")
    assert shown.shape == (3, 16 + 2 * 2, 2 * 16 + 3 * 2)  # one row of two 16x16 samples, 2-pixel gaps
    model = load_model(ckpt)
    torch.manual_seed(0)  # the page's seed: the same images as generate() (and demo/sample.py)
    assert torch.equal(shown, make_grid(model.generate([207, 207]), nrow=2))


def test_paint_a_region_and_complete_it(page, ckpt, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    open_tab(page, "Complete")
    original = reddish()
    Image.fromarray(original).save(tmp_path / "in.png")
    upload(page, tmp_path / "in.png")
    wait_for(page, lambda: page.find_elements(By.CSS_SELECTOR, "#editor canvas"), "the painting canvas")
    canvas = page.find_elements(By.CSS_SELECTOR, "#editor canvas")[-1]
    time.sleep(1)  # the canvas draws the picture
    # a brush stroke across the middle of the picture (offsets from the canvas centre)
    ActionChains(page).move_to_element_with_offset(canvas, -60, 0).click_and_hold() \
        .move_by_offset(40, 0).move_by_offset(40, 0).move_by_offset(40, 10).release().perform()
    page.find_element(By.ID, "complete").click()
    status = finished(page, "complete-status")
    assert status.startswith("done in"), status
    shown, completed = image_on_page(page, "model-input"), image_on_page(page, "completion")
    assert shown.shape == completed.shape == (3, 16, 16)
    unknown = (shown[0] == shown[1]) & (shown[1] == shown[2])  # the checkerboard: what the stroke covered
    assert 0 < unknown.sum() < 16 * 16 / 2
    assert unknown[7:10, 4:12].any() and not unknown[:3].any() and not unknown[-3:].any()
    known = ~unknown
    original = torch.from_numpy(original).permute(2, 0, 1)
    assert torch.equal(completed[:, known], original[:, known])  # every unpainted pixel kept exactly
    model = load_model(ckpt)
    torch.manual_seed(0)
    expected = model.generate([0], known=original[None], known_mask=known)[0]
    assert torch.equal(completed, expected)  # the page's class 0 (tench), seed 0: generate() itself


def test_bad_uploads_get_one_line_on_the_page(page, tmp_path):
    from selenium.webdriver.common.by import By
    open_tab(page, "Complete")
    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("RGB", (8200, 8200)).save(tmp_path / "huge.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    for name, message in (("notes.png", "error: notes.png is not a picture this demo can read; upload a PNG or JPEG"),
                          ("huge.png", "error: huge.png is 8200x8200 pixels; upload a picture at most 8192"),
                          ("small.png", "error: small.png is 8x8 pixels, smaller than the model's 16x16")):
        clear = page.find_elements(By.CSS_SELECTOR, "#upload button[aria-label='Clear']")
        if clear:  # the file before: its error line goes with it
            clear[0].click()
            wait_for(page, lambda: not text(page, "complete-status"), "the upload to clear")
        upload(page, tmp_path / name)
        wait_for(page, lambda: text(page, "complete-status").startswith("error"), f"the error about {name}")
        status = text(page, "complete-status")
        assert status.startswith(message) and "\n" not in status
        assert "Traceback" not in page.page_source
