"""`ferkit serve`: the JSON endpoint, its input checks (size, type by content), and the page in headless Chromium."""
from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from PIL import Image

from ferkit.inference import Predictor
from ferkit.inference.serve import ServeConfig, make_server, sniff_image_type

from test_inference import blank_image, haar_detected_faces, make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def face_png() -> bytes:
    return _png(haar_detected_faces(1, size=200)[0])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.safetensors")
    predictor = Predictor.from_checkpoint(ckpt, faces="detect", detector="haar")
    srv = make_server(predictor, "127.0.0.1", 0, ServeConfig(max_bytes=300_000, max_pixels=1_000_000))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), data


def _post(server, body: bytes, ctype: str = "image/png"):
    status, ctype_out, data = _request(server, "POST", "/api/predict", body, {"Content-Type": ctype})
    assert ctype_out == "application/json"
    return status, json.loads(data)


# ------------------------------------------------------------------------------------------------------ endpoint
def test_binds_loopback_by_default(server):
    assert server.server_address[0] == "127.0.0.1"


def test_predict_returns_faces_with_boxes_and_probabilities(server, face_png):
    status, out = _post(server, face_png)
    assert status == 200 and (out["width"], out["height"]) == (200, 200)
    assert len(out["faces"]) == 1
    face = out["faces"][0]
    x0, y0, x1, y1 = face["box"]
    assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 200
    assert set(face["probs"]) == set(out["class_names"]) and face["label"] == max(face["probs"], key=face["probs"].get)
    assert sum(face["probs"].values()) == pytest.approx(1, abs=1e-3)


def test_multipart_upload_gives_the_same_answer(server, face_png):
    boundary = "ferkitboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + face_png + f"\r\n--{boundary}--\r\n".encode()
    status, out = _post(server, body, f"multipart/form-data; boundary={boundary}")
    assert status == 200
    _, raw = _post(server, face_png)
    assert out["faces"][0]["probs"] == raw["faces"][0]["probs"]


def test_no_face_is_an_answer_not_an_error(server):
    status, out = _post(server, _png(blank_image()))
    assert status == 200 and out["faces"] == [] and "no face" in out["message"]


def test_too_large_upload_is_413_before_reading(server):
    big = b"\x89PNG\r\n\x1a\n" + bytes(400_000)
    status, out = _post(server, big)
    assert status == 413 and "over the limit of 0.3 MiB" in out["error"]


def test_too_many_pixels_is_413(server):
    wide = Image.new("RGB", (2000, 1000))  # 2 MP > 1 MP, but a tiny PNG
    status, out = _post(server, _png(wide))
    assert status == 413 and "2000x1000" in out["error"]


def test_wrong_declared_type_is_415(server, face_png):
    status, out = _post(server, face_png, "text/plain")
    assert status == 415 and "text/plain" in out["error"]


def test_content_is_sniffed_not_trusted(server):
    status, out = _post(server, b"<html><body>hello</body></html>", "image/png")
    assert status == 415 and "text" in out["error"] and "not an image" in out["error"]
    status, out = _post(server, b"%PDF-1.7 ...", "application/octet-stream")
    assert status == 415 and "PDF" in out["error"]


def test_corrupt_image_is_400(server, face_png):
    status, out = _post(server, face_png[:200])  # PNG magic, truncated data
    assert status == 400 and "corrupt PNG" in out["error"]


def test_missing_length_is_411(server):
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\r\n")
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 411") and "Content-Length" in head


def test_pages_and_unknown_paths(server):
    status, ctype, html = _request(server, "GET", "/")
    assert status == 200 and ctype.startswith("text/html") and b'type="file"' in html
    assert _request(server, "GET", "/static/app.js")[0] == 200
    status, _, info = _request(server, "GET", "/api/info")
    assert status == 200 and json.loads(info)["detector"] == "haar"
    assert _request(server, "GET", "/../../etc/passwd")[0] == 404
    assert _request(server, "POST", "/api/other", b"x", {"Content-Type": "image/png"})[0] == 404


@pytest.mark.parametrize("data,fmt", [(b"\xff\xd8\xff\xe0", "jpeg"), (b"\x89PNG\r\n\x1a\n..", "png"),
                                      (b"GIF89a", "gif"), (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
                                      (b"II*\x00", "tiff"), (b"BM....", "bmp"), (b"hello", None), (b"", None)])
def test_sniffing(data, fmt):
    assert sniff_image_type(data) == fmt


# ------------------------------------------------------------------------------------------------------ the page
_CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,860")


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver; installs the Debian packages when absent (root + apt), else skips."""
    pytest.importorskip("selenium", reason="selenium not installed (pip install selenium)")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if None in found and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], env=env,
                       capture_output=True, timeout=900)
        found = shutil.which("chromium"), shutil.which("chromedriver")
    if None in found:
        pytest.skip("chromium / chromedriver not available (Debian: apt-get install chromium chromium-driver)")
    return found


def test_page_uploads_a_photo_and_shows_faces_and_bars(server, chromium, tmp_path, face_png):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for flag in (*_CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromium[1]), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        WebDriverWait(driver, 20).until(lambda d: "resnet18" in d.find_element(By.ID, "model-info").text)
        photo = tmp_path / "face.png"
        photo.write_bytes(face_png)
        driver.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                        in ("done", "error"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
        cards = driver.find_elements(By.CSS_SELECTOR, "#faces .face")
        assert len(cards) == 1
        bars = cards[0].find_elements(By.CSS_SELECTOR, ".bar")
        assert len(bars) == 7
        shown = {b.get_attribute("data-label"): float(b.find_element(By.CLASS_NAME, "value").text.rstrip("%"))
                 for b in bars}
        _, api = _post(server, face_png)  # the page shows what the endpoint answers
        for label, p in api["faces"][0]["probs"].items():
            assert shown[label] == pytest.approx(100 * p, abs=0.06)
        assert cards[0].find_element(By.CLASS_NAME, "label").text == api["faces"][0]["label"]
        assert "1 face" in driver.find_element(By.ID, "status").text
        # the canvas holds the photo with a box drawn: not a blank canvas
        size = driver.execute_script("const c = document.getElementById('canvas'); return [c.width, c.height];")
        assert size == [200, 200]
        shot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
        if os.environ.get("FERKIT_UPDATE_DOCS") == "1":  # tests write nothing into the checkout unless asked
            shutil.copyfile(shot, REPO / "docs" / "serve_screenshot.png")
        # an upload the server refuses shows its message
        bad = tmp_path / "notes.png"
        bad.write_text("just text")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                        == "error")
        assert "415" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
