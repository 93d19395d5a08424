"""The studio's server: every endpoint answers with the right cats, bad requests get a clear JSON
error with the right status, concurrent requests are all answered, and a failing request never
takes the server down."""
import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import cat_diffusion as cd
import cat_studio as cs
from helpers import live_model


@pytest.fixture(scope="module")
def layouts():
    g = torch.Generator().manual_seed(0)
    return cd.layout_stats(cd.align_landmarks(100 * cd.SYNTH_LANDMARKS.astype(np.float32)) +
                           0.02 * torch.randn(200, 9, 2, generator=g))


@pytest.fixture(scope="module")
def url(layouts):
    server = cs.serve(live_model(landmarks=True), layouts, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def call(url, path, body=None, raw=None, headers=None):
    """(status, JSON answer) of a GET, or of a POST of `body` as JSON (or `raw` bytes)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def decode(urls):
    """PNG data URLs -> float images (N, 3, S, S) in [0, 1]."""
    images = []
    for u in urls:
        assert u.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) as im:
            images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) / 255)
    return torch.stack(images)


CAT = dict(n=4, seed=3, steps=2, guidance=1.5)


def test_the_page_and_the_model_info_are_served(url):
    with urllib.request.urlopen(url + "/") as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    assert "cat_diffusion studio" in page and "/api/generate" in page and "http" not in page.split("<script>")[1]
    status, info = call(url, "/api/info")
    assert status == 200 and info["landmarks"] is True and info["random_layout"] is True
    assert info["device"] == "cpu" and len(info["mean"]) == 9 and info["names"] == list(cd.LANDMARKS)


def test_generate_returns_n_cats_the_same_for_a_seed_and_following_the_landmarks(url, layouts):
    mean = layouts["mean"].tolist()
    status, first = call(url, "/api/generate", dict(CAT, landmarks=mean))
    assert status == 200 and first["seconds"] > 0 and first["steps"] == 2
    images = decode(first["images"])
    assert images.shape == (4, 3, 16, 16)
    assert torch.equal(decode(call(url, "/api/generate", dict(CAT, landmarks=mean))[1]["images"]), images)
    assert not torch.equal(decode(call(url, "/api/generate", dict(CAT, landmarks=mean, seed=4))[1]["images"]), images)
    moved = [[x + 0.2, y] for x, y in mean]
    assert not torch.equal(decode(call(url, "/api/generate", dict(CAT, landmarks=moved))[1]["images"]), images)


def test_random_layouts_come_from_the_training_distribution(url, layouts):
    draws = torch.tensor([call(url, "/api/layout", {"seed": s})[1]["landmarks"] for s in range(40)])
    assert draws.shape == (40, 9, 2) and len({tuple(d.flatten().tolist()) for d in draws}) == 40
    assert (draws.mean(0) - layouts["mean"]).abs().max() < 0.02  # std 0.02 each, 40 draws


def test_inpaint_changes_only_the_region(url, layouts):
    mean = layouts["mean"].tolist()
    cat = decode(call(url, "/api/generate", dict(CAT, landmarks=mean))[1]["images"])[1]
    status, answer = call(url, "/api/inpaint", {"cat": dict(CAT, landmarks=mean, index=1), "region": "eyes",
                                                "versions": 2, "inpaint_steps": 3})
    assert status == 200
    versions = decode(answer["images"])
    mask = cd.region_mask(layouts["mean"], 16, "eyes")
    assert versions.shape == (2, 3, 16, 16)
    assert (versions - cat)[:, :, ~mask].abs().max() <= 1.5 / 255  # kept (a batch of 1 rounds alike)
    assert (versions - cat)[:, :, mask].abs().mean() > 0.02  # regenerated


def test_interpolate_runs_from_one_cat_to_the_other(url, layouts):
    mean = layouts["mean"].tolist()
    cats = decode(call(url, "/api/generate", dict(CAT, landmarks=mean))[1]["images"])
    status, answer = call(url, "/api/interpolate", {"a": dict(CAT, landmarks=mean, index=0),
                                                    "b": dict(CAT, landmarks=mean, index=2), "frames": 5})
    frames = decode(answer["images"])
    assert status == 200 and frames.shape == (5, 3, 16, 16)
    assert (frames[0] - cats[0]).abs().max() <= 1.5 / 255 and (frames[-1] - cats[2]).abs().max() <= 1.5 / 255
    assert (frames[2] - cats[0]).abs().mean() > 0.01 and (frames[2] - cats[2]).abs().mean() > 0.01


@pytest.mark.parametrize("path,body,status,message", [
    ("/api/generate", dict(CAT, n=0), 400, "n must be an integer from 1 to 32"),
    ("/api/generate", dict(CAT, n=10 ** 6), 400, "n must be"),
    ("/api/generate", dict(CAT, steps="many"), 400, "steps must be"),
    ("/api/generate", dict(CAT, seed=-1), 400, "seed must be"),
    ("/api/generate", dict(CAT, guidance=float("inf")), 400, "guidance must be"),
    ("/api/generate", dict(CAT, landmarks=[[0.5, 0.5]] * 8), 400, "landmarks must be 9"),
    ("/api/generate", dict(CAT, landmarks=[[9.0, 0.5]] * 9), 400, "landmarks must be 9"),
    ("/api/generate", dict(CAT, landmarks=[["x", 0.5]] * 9), 400, "landmarks must be 9"),
    ("/api/inpaint", {"cat": dict(CAT, index=9), "region": "eyes"}, 400, "index must be"),
    ("/api/inpaint", {"cat": dict(CAT, index=0), "region": "../etc/passwd"}, 400, "region must be"),
    ("/api/inpaint", {"cat": "photo.jpg", "region": "eyes"}, 400, "cat must be"),
    ("/api/interpolate", {"a": dict(CAT, index=0), "b": dict(CAT, index=1), "frames": 500}, 400, "frames must be"),
    ("/api/nothing", {}, 404, "no such endpoint"),
])
def test_bad_requests_get_one_clear_json_error(url, path, body, status, message):
    got, answer = call(url, path, body)
    assert got == status and message in answer["error"]


def test_malformed_missing_and_oversized_bodies_are_refused(url):
    assert call(url, "/api/generate", raw=b"{not json")[0] == 400
    assert call(url, "/api/generate", raw=b"[1, 2]")[1]["error"] == "the body must be a JSON object"
    assert call(url, "/api/generate", raw=b"\xff\xfe")[0] == 400
    status, answer = call(url, "/api/generate", raw=b" " * (cs.STUDIO_LIMITS["body_bytes"] + 1))
    assert status == 413 and str(cs.STUDIO_LIMITS["body_bytes"]) in answer["error"]
    assert call(url, "/nowhere")[0] == 404
    assert call(url, "/api/info")[0] == 200  # still up


def test_concurrent_requests_are_all_answered_one_model_call_at_a_time(url, monkeypatch):
    inside, most, results = [0], [0], []
    real = cs.Studio.sample

    def counted(self, *args):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            return real(self, *args)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(cs.Studio, "sample", counted)
    threads = [threading.Thread(target=lambda s=s: results.append(call(url, "/api/generate", dict(CAT, seed=s))))
               for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(status for status, _ in results) == [200] * 8 and most[0] == 1


def test_a_failing_request_is_answered_and_the_server_stays_up(url, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cs.Studio, "sample", broken)
    status, answer = call(url, "/api/generate", CAT)
    assert status == 500 and answer["error"] == "RuntimeError: out of memory"
    monkeypatch.undo()
    assert call(url, "/api/generate", CAT)[0] == 200


def test_a_busy_model_answers_503_after_the_wait(url, monkeypatch):
    monkeypatch.setitem(cs.STUDIO_LIMITS, "wait_seconds", 0.1)
    studio = cs.Studio(live_model(landmarks=True))
    with studio.lock:
        with pytest.raises(cs.ApiError) as e:
            studio.generate(CAT)
    assert e.value.status == 503


def test_a_model_without_landmarks_samples_unconditionally_and_hides_the_editor():
    studio = cs.Studio(live_model())
    assert studio.info()["landmarks"] is False and studio.info()["random_layout"] is False
    images = decode(studio.generate(dict(CAT, landmarks=[[9, 9]] * 9))["images"])  # landmarks are not read
    assert images.shape == (4, 3, 16, 16)


def test_training_with_landmarks_stores_layouts_that_serve_reads(tmp_path, photos):
    cd.main(["train", "--data", str(photos), "--epochs", "1", "--image-size", "16", "--width", "8",
             "--batch-size", "8", "--precision", "fp32", "--out", str(tmp_path / "run"), "--name", str(tmp_path / "M")])
    stored = cs.stored_layouts(tmp_path / "M")
    faces = cd.CatDataset(photos, 16, split="train", quiet=True)
    torch.testing.assert_close(stored["mean"], faces.landmarks.mean(0))
    assert stored["cov"].shape == (18, 18) and torch.linalg.eigvalsh(stored["cov"].double()).min() > -1e-6


def test_serve_on_a_taken_port_fails_in_one_line(tmp_path):
    cd.save_model(live_model(landmarks=True), tmp_path / "M")
    server = cs.serve(live_model(landmarks=True), port=0)
    try:
        with pytest.raises(SystemExit) as e:
            cd.main(["serve", "--model", str(tmp_path / "M.pth"), "--port", str(server.server_address[1])])
        assert f"--port {server.server_address[1]}" in str(e.value) and "\n" not in str(e.value)
    finally:
        server.server_close()


def test_ctrl_c_stops_serve_cleanly(tmp_path, monkeypatch, capsys):
    cd.save_model(live_model(landmarks=True), tmp_path / "M")

    def interrupted(self, poll_interval=0.5):
        raise KeyboardInterrupt

    monkeypatch.setattr(cs.http.server.ThreadingHTTPServer, "serve_forever", interrupted)
    cd.main(["serve", "--model", str(tmp_path / "M.pth"), "--port", "0"])
    out = capsys.readouterr().out
    assert "cat studio for" in out and "http://127.0.0.1:" in out and out.rstrip().endswith("stopped")
    cd.main(["serve", "--model", str(tmp_path / "M.pth"), "--port", "0", "--host", "0.0.0.0"])
    assert "anyone who can reach this computer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Hostile clients: slow bodies, odd headers, terminal escapes
# ----------------------------------------------------------------------------------------------

def raw_request(url, data, wait=5.0):
    """Send `data` on a fresh connection; (the answer's status line, seconds until it came)."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        tic = time.perf_counter()
        sock.sendall(data)
        answer = sock.makefile("rb").readline().decode()
        return answer.strip(), time.perf_counter() - tic


def test_a_slow_client_is_cut_off_and_its_truncated_body_never_runs(url, monkeypatch):
    monkeypatch.setattr(cs.StudioHandler, "timeout", 1)
    ran = []
    monkeypatch.setattr(cs.Studio, "generate", lambda self, request: ran.append(request) or {})
    body = b'{"n": 1}'
    status, seconds = raw_request(url, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + body)
    assert " 400 " in f" {status} " and seconds < 4 and ran == []
    assert threading.active_count() < 20  # the connection's thread has ended
    assert call(url, "/api/info")[0] == 200  # and the server answers the next client


def test_many_idle_connections_do_not_take_a_thread_each(url, monkeypatch):
    monkeypatch.setattr(cs.StudioHandler, "timeout", 1)
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(cs.STUDIO_LIMITS["connections"] + 20)]
    time.sleep(0.3)
    assert threading.active_count() <= cs.STUDIO_LIMITS["connections"] + 5
    for sock in idle:
        sock.close()
    assert call(url, "/api/info")[0] == 200


def test_control_characters_in_a_request_are_escaped_in_the_log(url, capsys):
    raw_request(url, b"GET /\x1b[2J\x07 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b[2J" in err


@pytest.mark.parametrize("request_bytes,status", [
    (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: "
     + b"10240\r\n\r\n" + b"[" * 10240, "400"),  # nested too deeply for json
    ("POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: "
     "\u00b2\r\n\r\n{}".encode(), "411"),  # a digit to isdigit, not to int
    (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}",
     "415"),  # what a cross-site form can send
    (b"GET /api/info HTTP/1.1\r\nHost: evil.example:8000\r\n\r\n", "421"),  # DNS rebinding
    (b"PUT /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "501"),
])
def test_odd_requests_get_a_status_not_a_500(url, request_bytes, status):
    answer, _ = raw_request(url, request_bytes)
    assert answer.split()[1] == status, answer


def test_unknown_methods_are_answered_in_json(url):
    request = urllib.request.Request(url + "/api/generate", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 501 and "error" in json.loads(e.value.read())


def test_layout_fields_are_optional_and_a_bad_covariance_disables_random_layouts(url, layouts):
    status, answer = call(url, "/api/layout", {})
    assert status == 200 and len(answer["landmarks"]) == len(cd.LANDMARKS)
    broken = dict(layouts, cov=-torch.eye(18))
    studio = cs.Studio(live_model(landmarks=True), broken)
    assert studio.info()["random_layout"] is False
    with pytest.raises(cs.ApiError) as e:
        studio.layout({})
    assert e.value.status == 400
