"""cat_studio: a local web page to pose a cat's landmarks, generate, inpaint and interpolate.

    python cat_diffusion.py serve --model LM.pth      # then open http://127.0.0.1:8000/

It consumes a trained model through cat_diffusion's public API and is imported only when `serve`
runs. The page is `cat_studio.html` beside this file; it reads the landmark names, regions and
limits from GET /api/info. One request uses the model at a time.
"""
import argparse
import base64
import http.server
import io
import json
import re
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cat_diffusion import (EARS, LANDMARKS, K, MAX_GUIDANCE, REGIONS, SYNTH_LANDMARKS, align_landmarks, guidance_of,
                           inpaint, load_model, model_device, model_path, morph, pick_device, read_checkpoint,
                           region_mask, sample, sampler_of, to_unit)

PAGE = Path(__file__).with_name("cat_studio.html")


def stored_layouts(name):
    """The landmark layouts a model file keeps (see cat_diffusion's `layout_stats`), or None."""
    layouts = read_checkpoint(model_path(name)).get("layouts")
    shapes = {"mean": (K, 2), "cov": (2 * K, 2 * K)}
    ok = isinstance(layouts, dict) and all(torch.is_tensor(layouts.get(k)) and layouts[k].shape == shape and
                                           torch.isfinite(layouts[k]).all() for k, shape in shapes.items())
    return {k: layouts[k].float() for k in ("mean", "cov")} if ok else None


class ApiError(Exception):
    """A request the studio refuses: its HTTP status and a one-line reason."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


STUDIO_LIMITS = dict(body_bytes=16_384, connections=32, n=32, steps=200, frames=24, versions=8, seed=2 ** 31 - 1,
                     guidance=MAX_GUIDANCE, wait_seconds=120)  # wait: how long a request queues for the model


def field(request, name, kind, low, high, default=None):
    """`request[name]` checked to be a `kind` (int or float) within [low, high] (so not NaN)."""
    value = request.get(name, default)
    if not (type(value) is kind or kind is float and type(value) is int) or not low <= value <= high:
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'} from {low} to {high}, "
                            f"got {value!r}")
    return value


def landmarks_field(request, name="landmarks"):
    """K (x, y) pairs (one per landmark) in face coordinates, finite and within half a face of it; None if absent."""
    value = request.get(name)
    if value is None:
        return None
    try:
        marks = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        marks = None
    if marks is None or marks.shape != (K, 2) or not torch.isfinite(marks).all() or (marks - 0.5).abs().max() > 1:
        raise ApiError(400, f"{name} must be {K} [x, y] pairs from -0.5 to 1.5 (face coordinates)")
    return marks.float()


def png_data_urls(images):
    """Images in [0, 1] as PNG data URLs for the page."""
    urls = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()).save(buffer, format="png")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls




class Studio:
    """What the page's requests run: one model, one request at a time (the CPU or GPU is the
    bottleneck; others queue for up to STUDIO_LIMITS["wait_seconds"], then get 503)."""

    def __init__(self, model, layouts=None):
        self.model, self.lock = model, threading.Lock()
        self.landmarks = model.config["landmarks"]
        self.mean = layouts["mean"] if layouts else align_landmarks(100 * SYNTH_LANDMARKS.astype(np.float32))
        self.scale = None  # the Cholesky factor of the layouts' covariance, when it has one
        if layouts:
            scale, problem = torch.linalg.cholesky_ex(layouts["cov"].double() + 1e-6 * torch.eye(2 * K, dtype=torch.float64))
            self.scale = scale if problem == 0 else None

    def info(self):
        sampler, steps = sampler_of(self.model)
        return dict(landmarks=self.landmarks, names=LANDMARKS, ears=EARS, regions=REGIONS, mean=self.mean.tolist(),
                    random_layout=self.scale
                    is not None, device=model_device(self.model).type, image_size=self.model.config["image_size"],
                    sampler=sampler, steps=steps, guidance=guidance_of(self.model),
                    limits=STUDIO_LIMITS)

    def layout(self, request):
        """A layout drawn from the training landmarks' Gaussian (mean, covariance)."""
        if self.scale is None:
            raise ApiError(400, "this model file stores no usable landmark layouts (none kept, or a covariance "
                                "that is not positive definite)")
        g = torch.Generator().manual_seed(field(request, "seed", int, 0, STUDIO_LIMITS["seed"], 0))
        marks = self.mean.double().reshape(2 * K) + self.scale @ torch.randn(2 * K, generator=g, dtype=torch.float64)
        return dict(landmarks=marks.clamp(-0.5, 1.5).reshape(K, 2).tolist())

    def cats(self, request):
        """The noises, condition and sampling settings of a request's cats: `n` from `seed`."""
        n = field(request, "n", int, 1, STUDIO_LIMITS["n"], 8)
        seed = field(request, "seed", int, 0, STUDIO_LIMITS["seed"], 0)
        _, steps = sampler_of(self.model)
        steps = field(request, "steps", int, 1, STUDIO_LIMITS["steps"], steps)
        marks = landmarks_field(request) if self.landmarks else None
        guidance = field(request, "guidance", float, 0.0, STUDIO_LIMITS["guidance"], guidance_of(self.model))
        size = self.model.config["image_size"]
        noise = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
        return noise, marks, steps, guidance

    def run(self, work):
        """`work()` with the model to itself; returns its result and the seconds it took."""
        if not self.lock.acquire(timeout=STUDIO_LIMITS["wait_seconds"]):
            raise ApiError(503, "busy: other requests are using the model; try again")
        try:
            tic = time.perf_counter()
            result = work()
            return result, time.perf_counter() - tic
        finally:
            self.lock.release()

    def sample(self, noise, marks, steps, guidance):
        return sample(self.model, len(noise), steps=steps, x=noise.to(model_device(self.model)), landmarks=marks,
                      guidance=guidance, progress=False).cpu()

    def generate(self, request):
        noise, marks, steps, guidance = self.cats(request)
        images, seconds = self.run(lambda: self.sample(noise, marks, steps, guidance))
        return dict(images=png_data_urls(to_unit(images)), seconds=seconds, steps=steps)

    def one_cat(self, request, key):
        """Cat `index` of the generate request `request[key]` (its noise, landmarks, settings)."""
        cat = request.get(key)
        if not isinstance(cat, dict):
            raise ApiError(400, f"{key} must be the generate request of a cat, with its index")
        noise, marks, steps, guidance = self.cats(cat)
        index = field(cat, "index", int, 0, len(noise) - 1)
        return noise[index:index + 1], marks, steps, guidance

    def inpaint(self, request):
        """`versions` of a generated cat with its eyes, ears or mouth regenerated (see `inpaint`)."""
        noise, marks, steps, guidance = self.one_cat(request, "cat")
        region = request.get("region")
        if region not in REGIONS:
            raise ApiError(400, f"region must be one of {', '.join(REGIONS)}, got {region!r}")
        versions = field(request, "versions", int, 1, STUDIO_LIMITS["versions"], 4)
        inpaint_steps = field(request, "inpaint_steps", int, 2, STUDIO_LIMITS["steps"], 25)
        mask = region_mask(self.mean if marks is None else marks, self.model.config["image_size"], region)
        g = torch.Generator(model_device(self.model)).manual_seed(field(request, "seed", int, 0, STUDIO_LIMITS["seed"], 0))

        def work():
            face = self.sample(noise, marks, steps, guidance)[0]
            return inpaint(self.model, face, mask, versions, inpaint_steps, generator=g, landmarks=marks,
                           progress=False).cpu()

        images, seconds = self.run(work)
        return dict(images=png_data_urls(to_unit(images)), seconds=seconds)

    def interpolate(self, request):
        """`frames` cats between two generated ones: their noises slerped, their landmarks lerped."""
        (noise_a, marks_a, steps, guidance), (noise_b, marks_b, _, _) = (self.one_cat(request, k) for k in "ab")
        frames = field(request, "frames", int, 2, STUDIO_LIMITS["frames"], 8)
        images, seconds = self.run(lambda: morph(self.model, noise_a[0], noise_b[0], frames, None, steps, marks_a, marks_b,
                                                 guidance).cpu())
        return dict(images=png_data_urls(to_unit(images)), seconds=seconds)


class StudioHandler(http.server.BaseHTTPRequestHandler):
    """GET / (the page), GET /api/info, POST /api/{layout,generate,inpaint,interpolate} with JSON
    bodies; every answer is JSON (or the page), errors included: 400 bad request, 404, 411/413
    body missing or over STUDIO_LIMITS["body_bytes"], 503 busy, 500 a failure (the server stays up)."""

    studio = None  # set by `serve`
    server_version = "cat_diffusion"
    timeout = 10  # seconds a connection may take to send its headers and body (a slow client holds no thread)

    def send(self, status, body, kind="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        try:
            self.check_host()
            if self.path in ("/", "/index.html"):
                self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/api/info":
                self.send(200, self.studio.info())
            else:
                raise ApiError(404, f"no such page: {self.path}")
        except ApiError as e:
            self.send(e.status, {"error": str(e)})

    def do_POST(self):
        routes = {"/api/layout": self.studio.layout, "/api/generate": self.studio.generate,
                  "/api/inpaint": self.studio.inpaint, "/api/interpolate": self.studio.interpolate}
        try:
            self.check_host()
            if self.path not in routes:
                raise ApiError(404, f"no such endpoint: {self.path}")
            if self.headers.get_content_type() != "application/json":  # a cross-site form cannot send JSON
                raise ApiError(415, "the body must be JSON, sent as Content-Type: application/json")
            length = self.headers.get("Content-Length")
            if length is None or not re.fullmatch(r"[0-9]{1,9}", length):
                raise ApiError(411, "a JSON body with a Content-Length is needed")
            if int(length) > STUDIO_LIMITS["body_bytes"]:
                self.close_connection = True  # the unread body must not be taken for the next request
                raise ApiError(413, f"the body is {length} bytes; the limit is {STUDIO_LIMITS['body_bytes']}")
            try:
                body = self.rfile.read(int(length))  # the socket timeout ends a body that never comes
            except TimeoutError:
                body = b""
            if len(body) < int(length):
                self.close_connection = True
                raise ApiError(400, f"the body did not arrive in full ({length} bytes) within {self.timeout} s")
            try:
                request = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise ApiError(400, "the body is not valid JSON (or nests too deeply)") from None
            if not isinstance(request, dict):
                raise ApiError(400, "the body must be a JSON object")
            self.send(200, routes[self.path](request))
        except ApiError as e:
            self.send(e.status, {"error": str(e)})
        except Exception as e:  # a failed request is answered and logged; the server goes on
            traceback.print_exc()
            self.send(500, {"error": f"{type(e).__name__}: {e}"})

    def check_host(self):
        """Refuse a Host header that names neither the bound address nor this computer: a page of
        another site whose name now points here (DNS rebinding) must not reach the model."""
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in ("localhost", "127.0.0.1", "::1", self.server.server_address[0]) and \
                self.server.server_address[0] not in ("0.0.0.0", "::"):
            raise ApiError(421, f"requests must name this server (Host {host!r} is another name)")

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, an unknown method) as JSON, like the rest."""
        self.close_connection = True
        try:
            self.send(code, {"error": message or self.responses.get(code, ("error",))[0]})
        except OSError:
            pass

    def log_message(self, format, *args):
        """One line per request on stderr, control characters escaped (a request must not drive
        the operator's terminal)."""
        text = (format % args).encode("unicode_escape").decode("ascii")
        print(f"{self.address_string()} {text}", file=sys.stderr)


class Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with at most STUDIO_LIMITS["connections"] connections at once: others
    wait in the listen queue, so many idle clients cannot take a thread each."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(STUDIO_LIMITS["connections"])

    def process_request(self, request, client_address):
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve(model, layouts=None, host="127.0.0.1", port=8000):
    """The studio's server (not yet serving: call `serve_forever()`; port 0 picks a free one)."""
    handler = type("Handler", (StudioHandler,), {"studio": Studio(model.eval(), layouts)})
    return Server((host, port), handler)


def run_serve(args):
    model = load_model(None, args.model, pick_device(args.device))
    try:
        server = serve(model, stored_layouts(args.model), args.host, args.port)
    except OSError as e:
        raise SystemExit(f"error: --host {args.host} --port {args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    print(f"cat studio for {args.model} at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: --host {args.host}: anyone who can reach this computer on port {port} can use the "
              f"studio; it has no authentication", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


def port_arg(text):
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return int(text)


OPTIONS = {"serve": ("model_file",)}  # cat_diffusion's shared option groups each command takes
COMMANDS = {"serve": run_serve}


def add_arguments(command, parser):
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (the default: this computer only)")
    parser.add_argument("--port", type=port_arg, default=8000, help="port to listen on (0: any free one)")
