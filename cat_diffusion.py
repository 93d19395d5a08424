"""cat_diffusion: a small, real denoising diffusion model for cat faces (the CAT dataset).

    python cat_diffusion.py                     # train on data/ (synthetic cats if it is empty)
    python cat_diffusion.py --minutes 30        # train for a time instead of 50 epochs (on time, re-planned)
                                                # outputs/progress.png: the cats as they form; its first
                                                # quarter trains outputs/guide/, its autoguidance guide
    python cat_diffusion.py --resume            # continue outputs/checkpoint.pt's run
    python cat_diffusion.py sample -n 64        # generate from DiffusionModel.pth
    python cat_diffusion.py eval --data DIR     # sample quality against held-out faces (cat_eval.py)
    python cat_diffusion.py sample --like PHOTO # cats with that photo's face layout (its 9 landmarks)
    python cat_diffusion.py reconstruct|interpolate|inpaint PHOTO ...   # edit real faces
    python cat_diffusion.py distill --steps 4   # a student of DiffusionModel.pth that samples in 4 steps
    python cat_diffusion.py serve               # a web page: pose the landmarks, generate, edit (cat_studio.py)
    python cat_diffusion.py bench               # training and sampling speed (cat_eval.py)
    torchrun --nproc-per-node=N cat_diffusion.py train ...              # several GPUs or machines

    >>> from cat_diffusion import DiffusionModel, load_model
    >>> loaded_model = load_model(DiffusionModel(), "DiffusionModel")

Nothing that exists is replaced unless asked (--overwrite). Sections, in data-flow order: files ->
data -> model -> diffusion -> devices -> training -> sampling and plots -> editing -> save/load ->
distillation -> command line. What only consumes a trained model lives beside this file, imported
when its command runs: cat_eval.py (eval, fit-landmarks, bench) and cat_studio.py (serve).
"""
import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import inspect
import itertools
import io
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode, functional as TF
from torchvision.utils import draw_keypoints, make_grid, save_image
from tqdm import tqdm

HAS_DISPLAY = sys.platform in ("darwin", "win32") or any(os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY"))
if not HAS_DISPLAY:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, safe reads, and never replacing what a user did not ask to replace
# ----------------------------------------------------------------------------------------------

UMASK = os.umask(0o22)
os.umask(UMASK)


class CheckpointError(Exception):
    """A model or checkpoint file that cannot be used; the message names the file and the problem."""


class Refused(Exception):
    """Going on would replace or delete something the user did not ask to; the message says what
    and how to allow it."""


def atomic_write(path, write):
    """Write `path` all or nothing: serialise in memory with `write(file)`, then a temporary file
    in the same folder, fsync, rename, fsync the folder. On failure (a full disk, say) the old file
    is untouched."""
    path, buffer, tmp = Path(path), io.BytesIO(), None
    write(buffer)  # serialised first, so that a full disk fails as a plain OSError below
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it private; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if os.name == "posix":  # the rename made durable (elsewhere there is no folder to fsync)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); "
                               f"any earlier {path.name} is unchanged") from None


def file_digest(path, data=None):
    """sha256 of a file's bytes (or of `data`, the bytes about to be written there): how a run
    recognises the files it wrote when it resumes."""
    return hashlib.sha256(Path(path).read_bytes() if data is None else data).hexdigest()


def run_relative(path, folder):
    """`path` as a checkpoint keeps it: relative to the run's `folder` when inside it (so that a moved
    or copied run folder keeps its own files), else absolute; `folder / result` gives it back."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return str(path.relative_to(folder) if folder in path.parents else path)


def claim_outputs(paths, overwrite=False, ours=None, hint="pass --overwrite to replace it"):
    """Check, before any work, that every file in `paths` can be written without replacing
    anything the user did not ask to replace: an existing file is refused unless `overwrite` or it
    is one of `ours` ({resolved path: [digests]} of the files a resumed run wrote) with its bytes
    one of the digests; a folder in a file's place, or a file in a folder's place, is refused always."""
    ours = ours or {}
    for path in map(Path, paths):
        existing = next((p for p in (path, *path.parents) if p.exists()), path)
        if existing != path and not existing.is_dir():
            raise Refused(f"{existing} is a file, so {path} cannot be written")
        if path.is_dir():
            raise Refused(f"{path} is a folder, not a file")
        if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
            raise Refused(f"{path} cannot be written: {existing if existing.is_dir() else existing.parent} is read-only")
        # a file is the run's own while its digest is one the run recorded (only those files are read)
        if path.exists() and not overwrite and not ((key := str(path.resolve())) in ours and file_digest(path) in ours[key]):
            raise Refused(f"{path} already exists; {hint}")


def read_checkpoint(path, want="model"):
    """torch.load with weights_only=True (no code can run), turning every failure into one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if any(s in str(e).lower() for s in ("weights_only", "unsupported global")):
            raise CheckpointError(f"{path}: refused: it holds pickled code or objects, not just "
                                  f"weights (loading it could run that code)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (empty, truncated or another "
                              f"format: {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in ("model", "training"):
        raise CheckpointError(f"{path}: not a cat_diffusion checkpoint")
    if want == "training" and ckpt["kind"] != "training":
        raise CheckpointError(f"{path}: holds only model weights, not a training state to resume")
    return ckpt


# ----------------------------------------------------------------------------------------------
# Data: .cat files, face alignment, the preprocessing cache, CatDataset, synthetic cats, the
# data folder to train on
# ----------------------------------------------------------------------------------------------

# Past alignment, landmarks are in face coordinates: (x, y) as fractions of the aligned face's
# side, (0, 0) its top-left corner, so the same numbers fit a face at any size.
LANDMARKS = ("left eye", "right eye", "mouth", "left ear 1", "left ear 2", "left ear 3",
             "right ear 1", "right ear 2", "right ear 3")
# A mirror image swaps sides; ear points run around the head, so left ear 1 (outer base) becomes
# right ear 3 (outer base) and the tips (2) swap with each other.
K = len(LANDMARKS)  # landmarks per face
FLIP_ORDER = (1, 0, 2, 8, 7, 6, 5, 4, 3)
EARS = ((3, 4, 5), (6, 7, 8))  # each ear's points, from its outer base over the tip to its inner base
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ALIGN_VERSION = 3  # bump when alignment output changes: it is part of the cache key
MIN_FACE = 32  # faces whose box is narrower than this many photo pixels are dropped
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # larger photos are refused from their header (PIL's bomb limit)
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cat_diffusion"


class BadItem(Exception):
    """A photo or .cat file that cannot be used; the message is the reason, grouped in reports."""


def parse_cat_file(path):
    """Read a .cat file: `N x1 y1 ... xN yN` (integers) -> float32 array (9, 2) of (x, y)."""
    try:
        numbers = [float(tok) for tok in Path(path).read_text(errors="strict").split()]
    except (OSError, UnicodeDecodeError) as e:  # before ValueError, of which UnicodeDecodeError is one
        raise BadItem(f"unreadable .cat file ({type(e).__name__})") from None
    except ValueError:
        raise BadItem("non-numeric .cat contents") from None
    if not numbers:
        raise BadItem("empty .cat file")
    count, coords = numbers[0], numbers[1:]
    if not math.isfinite(count) or count != int(count) or len(coords) != 2 * count:
        raise BadItem(".cat point count does not match its numbers")
    if count < len(LANDMARKS):
        raise BadItem(f".cat file has fewer than {len(LANDMARKS)} points")
    points = np.asarray(coords, dtype=np.float32).reshape(-1, 2)[:len(LANDMARKS)]
    if not np.isfinite(points).all():
        raise BadItem("non-numeric .cat contents")
    return points


def sidecar(photo, required=False):
    """A photo's .cat file (`X.jpg.cat`, else `X.cat`), or None; when `required`, BadItem if none."""
    cat = next((c for c in (Path(f"{photo}.cat"), Path(photo).with_suffix(".cat")) if c.is_file()), None)
    if cat is None and required:
        raise BadItem(f"{photo}: no landmarks: expected {Path(photo).name}.cat beside it")
    return cat


def walk_files(root):
    """Every file under `root`, following links to folders once each. Iterative: Path.rglob and
    os.walk recurse, and a tree nested 1,000 deep ends them in a RecursionError."""
    stack, seen = [Path(root)], set()
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            continue  # unreadable or vanished: nothing in it can be used
        for entry in entries:
            if entry.is_dir():
                stack.append(Path(entry.path))
            elif entry.is_file():
                yield Path(entry.path)


def printable(path):
    """A path as text, with any bytes that are not UTF-8 shown as escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def find_annotated_photos(root):
    """All photos under `root` (any depth) with their .cat sidecar (`X.jpg.cat`, else `X.cat`).

    Returns (pairs, missing, unnamed): pairs of (photo, cat_file) sorted by path; photos without a
    sidecar; photos whose names are not valid UTF-8 (no name can be printed or stored for them).
    """
    pairs, missing, unnamed, root = [], [], [], Path(root)
    for photo in sorted(walk_files(root)):
        if photo.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            str(photo.relative_to(root)).encode()  # the name kept for it; the folder's own may be anything
        except UnicodeEncodeError:
            unnamed.append(photo)
            continue
        if cat := sidecar(photo):
            pairs.append((photo, cat))
        else:
            missing.append(photo)
    return pairs, missing, unnamed


def read_photo(path):
    """Decode any common photo to uint8 RGB (3, H, W).

    EXIF orientation is deliberately ignored: the CAT annotations are in the stored pixel grid.
    """
    try:
        data = Path(path).read_bytes()
        with warnings.catch_warnings():  # PIL warns above its limit and raises above twice that
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:  # reads the header, decodes nothing
                width, height = header.size
        if MAX_PIXELS and width * height > MAX_PIXELS:
            raise Image.DecompressionBombError
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Image.DecompressionBombError:
        raise BadItem(f"image over {MAX_PIXELS / 1e6:.0f} M pixels (a decompression bomb?)") from None
    except (Image.UnidentifiedImageError, RuntimeError, ValueError):  # the first is an OSError: before it
        raise BadItem("corrupt or truncated image") from None
    except OSError as e:
        raise BadItem(f"unreadable photo ({type(e).__name__})") from None
    return TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs come as uint16


def face_frame(points):
    """The face's eye midpoint, tilt (radians), box width (outer ear bases) and its landmarks
    relative to the eye midpoint with the eyes level, from its landmarks."""
    left_eye, right_eye = points[0], points[1]
    dx, dy = right_eye - left_eye
    if math.hypot(dx, dy) < 1:
        raise BadItem("degenerate landmarks (eyes on the same point)")
    angle, center = math.atan2(dy, dx), (left_eye + right_eye) / 2
    cos, sin = math.cos(angle), math.sin(angle)
    level = (points - center) @ np.array([[cos, -sin], [sin, cos]], dtype=np.float32)
    return center, angle, abs(level[8, 0] - level[3, 0]), level


def align_landmarks(points):
    """Where `align_face` puts a face's landmarks (face coordinates), from the points alone: for a
    .cat file without its photo (a photo's landmarks, or already a face crop's)."""
    _, _, width, level = face_frame(points)
    face = level / max(width, 1e-6) + np.float32([0.5, 0.4])
    if not np.isfinite(face).all() or np.abs(face - 0.5).max() > 4:  # real faces: within 1.5
        raise BadItem("landmarks far outside the face box (ear bases too close together?)")
    return torch.from_numpy(face).float()


def align_face(image, points, size, min_face=MIN_FACE):
    """Cut the face out of a photo the established way for this dataset.

    Rotate about the eye midpoint until the eyes are level; the square box is as wide as the outer
    ear bases (left ear 1 to right ear 3) with the eye midpoint at (0.5, 0.4) of it; where it leaves
    the photo the photo is padded (reflected, or edge-repeated when the pad exceeds the photo);
    then an antialiased bicubic resize to `size`. Landmarks travel with the pixels as KeyPoints.
    Returns (uint8 (3, size, size), float32 (9, 2) landmarks in face coordinates).
    """
    center, angle, width, _ = face_frame(points)
    height, photo_width = image.shape[-2:]
    if width < min_face:
        raise BadItem(f"face box under {min_face} px")
    if width > 2 * max(height, photo_width) or not (-photo_width < center[0] < 2 * photo_width
                                                   and -height < center[1] < 2 * height):
        raise BadItem("landmarks far outside the photo")  # a slip of the annotator, not a face
    # The box's corners in photo pixels give the region to keep, with a margin for interpolation.
    box = np.array([[-0.5, -0.4], [0.5, -0.4], [-0.5, 0.6], [0.5, 0.6]]) * width
    corners = center + box @ np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    (x0, y0), (x1, y1) = np.floor(corners.min(0)).astype(int) - 2, np.ceil(corners.max(0)).astype(int) + 2
    pad = [max(0, -x0), max(0, -y0), max(0, x1 - photo_width), max(0, y1 - height)]
    mode = "reflect" if max(pad[0], pad[2]) < photo_width and max(pad[1], pad[3]) < height else "edge"
    face = tv_tensors.Image(image)
    marks = tv_tensors.KeyPoints(torch.from_numpy(points), canvas_size=(height, photo_width))
    if any(pad):
        face, marks = TF.pad(face, pad, padding_mode=mode), TF.pad(marks, pad)
    top, left = y0 + pad[1], x0 + pad[0]
    face, marks = TF.crop(face, top, left, y1 - y0, x1 - x0), TF.crop(marks, top, left, y1 - y0, x1 - x0)
    cx, cy = float(center[0] - x0), float(center[1] - y0)
    face = TF.rotate(face, math.degrees(angle), InterpolationMode.BILINEAR, center=[cx, cy])
    marks = TF.rotate(marks, math.degrees(angle), center=[cx, cy])
    side = max(1, round(width))
    box_top, box_left = round(cy - 0.4 * width), round(cx - 0.5 * width)
    face, marks = TF.crop(face, box_top, box_left, side, side), TF.crop(marks, box_top, box_left, side, side)
    face = TF.resize(face, [size, size], InterpolationMode.BICUBIC, antialias=True)
    return face.as_subclass(torch.Tensor), marks.as_subclass(torch.Tensor).float() / side


def flip_faces(images, landmarks):
    """Mirror faces left-right; landmarks are mirrored, x -> 1 - x, and relabelled so the order
    keeps its meaning. Not torchvision's KeyPoints flip: it maps x -> S - 1 - x (pixel indices),
    where the other transforms in `align_face` move continuous coordinates, so flipped faces got
    their landmarks a pixel off (test_flip_mirrors_landmarks_and_keeps_their_meaning)."""
    marks = landmarks[..., FLIP_ORDER, :].clone()
    marks[..., 0] = 1 - marks[..., 0]
    return images.flip(-1), marks


def _align_item(args):
    """Pool worker: one (photo, cat) pair -> ("ok", face, landmarks) or ("bad", reason, photo)."""
    photo, cat, size, min_face = args
    try:
        points = parse_cat_file(cat)
        face, marks = align_face(read_photo(photo), points, size, min_face)
        return "ok", face.numpy(), marks.numpy()
    except BadItem as e:
        return "bad", str(e), str(photo)
    except Exception as e:  # noqa: BLE001 - bad data must never end a run with a traceback
        return "bad", f"unusable ({type(e).__name__}: {e})".splitlines()[0][:120], str(photo)


def align_all(pairs, size, min_face, workers=None):
    """Align every pair, in parallel over the cores for large sets, with a progress bar."""
    jobs = [(p, c, size, min_face) for p, c in pairs]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // 256))
    bar = dict(total=len(jobs), desc="aligning faces", unit="photo", disable=len(jobs) < 256)
    if workers == 1:
        return list(tqdm(map(_align_item, jobs), **bar))
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(tqdm(pool.imap(_align_item, jobs, chunksize=32), **bar))


def files_fingerprint(root, paths, size, min_face):
    """Cache key: alignment version, size, threshold and every file's path, size and mtime."""
    h = hashlib.sha256(f"{ALIGN_VERSION}|{size}|{min_face}".encode())
    for path in paths:
        st = path.stat()
        h.update(b"|" + os.fsencode(path.relative_to(root)) + f"|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_faces(cache, key, size):
    """The face cache's (faces, landmarks, names, bad) if it is for `key` and well-formed, else None.
    Never trusted: a stale, truncated or malformed cache is rebuilt (and a FIFO or folder in its
    place is not opened: reading one would hang or fail)."""
    if not Path(cache).is_file():
        return None
    try:
        data = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, truncated or not a cache at all
        return None
    data = data if isinstance(data, dict) and data.get("key") == key else {}  # another key's: not well-formed
    faces, marks, names, bad = (data.get(k) for k in ("faces", "landmarks", "names", "bad"))
    well_formed = (isinstance(names, list) and all(isinstance(n, str) for n in names) and isinstance(bad, list)
        and all(isinstance(b, list) and len(b) == 2 and all(isinstance(x, str) for x in b) for b in bad)
        and isinstance(faces, torch.Tensor) and faces.dtype == torch.uint8 and faces.shape == (len(names), 3, size, size)
        and isinstance(marks, torch.Tensor) and marks.dtype == torch.float32 and marks.shape == (len(names), K, 2)
        and bool(torch.isfinite(marks).all()))
    return (faces, marks, names, bad) if well_formed else None


def load_faces(root, size, min_face=MIN_FACE, cache_dir=None, quiet=False):
    """Aligned faces under `root`: uint8 (N, 3, S, S), float32 (N, 9, 2) landmarks, their
    relative names, and the skipped items as [reason, relative name] pairs.

    Served from one cache file per data folder and size (in `cache_dir`, default
    ~/.cache/cat_diffusion); rebuilt when anything in its key changes or it fails to load.
    """
    root, tic, source = Path(root).resolve(), time.perf_counter(), "cache"
    pairs, missing, unnamed = find_annotated_photos(root)
    key = files_fingerprint(root, [p for pair in pairs for p in pair] + missing + unnamed, size, min_face)
    cache = Path(cache_dir or CACHE_DIR) / f"faces-{size}px-{hashlib.sha256(os.fsencode(root)).hexdigest()[:12]}.pt"
    if cached := cached_faces(cache, key, size):
        faces, marks, names, bad = cached
    else:
        source, results = "aligned", align_all(pairs, size, min_face)
        good = [(p, r) for (p, _), r in zip(pairs, results) if r[0] == "ok"]
        faces = torch.from_numpy(np.array([r[1] for _, r in good], np.uint8).reshape(-1, 3, size, size))
        marks = torch.from_numpy(np.array([r[2] for _, r in good], np.float32).reshape(-1, K, 2))
        names = [str(p.relative_to(root)) for p, _ in good]
        bad = [[r[1], str(Path(r[2]).relative_to(root))] for r in results if r[0] == "bad"]
        bad += [["missing .cat file", str(p.relative_to(root))] for p in missing]
        bad += [["file name is not valid UTF-8", printable(p.relative_to(root))] for p in unnamed]
        payload = dict(key=key, faces=faces, landmarks=marks, names=names, bad=bad)
        try:
            atomic_write(cache, lambda f: torch.save(payload, f))
        except OSError as e:
            print(f"warning: face cache not saved: {e.strerror}", file=sys.stderr)
    if not quiet:
        print(f"{len(names)} faces of {printable(root)} at {size}px ({source}, {time.perf_counter() - tic:.1f} s; "
              f"cache {cache}); {len(bad)} skipped", file=sys.stderr)
        for reason, items in itertools.groupby(sorted(bad), key=lambda item: item[0]):  # a line per reason
            paths = [path for _, path in items]
            print(f"skipped {len(paths)} in {root}: {reason}: {', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}",
                  file=sys.stderr)
    return faces, marks, names, bad


def photo_id(name):
    """CAT photo id of a file name: `00000001_005.jpg` -> `00000001` (shots of one cat share it);
    any other name (`IMG_1234.jpg`) is its own id."""
    name = Path(name).name
    cat_style = re.match(r"(\d+)_\d+\.", name)
    return cat_style.group(1) if cat_style else name


def in_validation(name, percent):
    """Deterministic split by photo id: stable across machines and when files are added."""
    return zlib.crc32(photo_id(name).encode()) % 100 < percent


def to_model_range(images):
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1


def to_unit(images):
    """[-1, 1] (any float dtype, any device) -> float [0, 1] on the CPU."""
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


class CatDataset(torch.utils.data.Dataset):
    """Landmark-aligned cat faces from a folder in the CAT dataset's format.

    Photos are found at any depth (`CAT_00` ... `CAT_06`, one flat folder, or a folder of face
    crops), each with a `.cat` sidecar. Faces narrower than `min_face` (default 32) photo pixels are
    dropped, as are unreadable items; each reason is reported once with a count, and
    `skipped` lists them as [reason, relative path] pairs.
    `dataset[i]` is (image float (3, S, S) in [-1, 1], landmarks float (9, 2) in face coordinates).
    `split` is None (all), "train" or "val" (`val_percent` of photo ids, chosen by hash).
    """

    def __init__(self, image_dir, image_size=64, min_face=MIN_FACE, split=None, val_percent=5, cache_dir=None,
                 quiet=False):
        faces, marks, names, self.skipped = load_faces(image_dir, image_size, min_face, cache_dir, quiet)
        if len(names) == 0:
            raise SystemExit(f"error: no usable annotated cat photos in {Path(image_dir).resolve()} (looked for "
                             f".jpg/.jpeg/.png with .cat files at any depth). Get the CAT dataset (Kaggle: "
                             f"crawford/cat-dataset) and pass --data, or see data/README.md.")
        if split is not None:  # either side may be empty for a handful of photos
            keep = [i for i, n in enumerate(names) if in_validation(n, val_percent) == (split == "val")]
            faces, marks, names = faces[keep], marks[keep], [names[i] for i in keep]
        self.faces, self.landmarks, self.names = faces, marks, names

    def __len__(self):
        return len(self.faces)

    def __getitem__(self, i):
        return to_model_range(self.faces[i]), self.landmarks[i]


# Synthetic cats: drawn in a face frame where the box (outer ear bases) is 1 wide and the eye
# midpoint is the origin, then scaled, rotated and placed in a larger "photo".
SYNTH_LANDMARKS = np.array([[-0.2, 0], [0.2, 0], [0, 0.3], [-0.5, -0.2], [-0.46, -0.62],
                            [-0.16, -0.42], [0.16, -0.42], [0.46, -0.62], [0.5, -0.2]])
FUR = [(235, 140, 50), (120, 120, 125), (40, 38, 40), (245, 240, 230), (150, 100, 60),
       (205, 170, 120), (90, 70, 60), (230, 210, 180)]
EYES = [(90, 170, 60), (220, 190, 40), (90, 150, 220), (200, 130, 40)]


def ellipse(cx, cy, rx, ry, n=28):
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


def draw_synthetic_cat(rng, photo_size=(256, 192)):
    """One procedurally drawn cat photo and its true 9 landmarks (photo pixels)."""
    scale = 2  # drawn at twice the size, then shrunk, for smooth edges
    w, h = photo_size[0] * scale, photo_size[1] * scale
    # a plain, muted backdrop like a wall, shaded from top to bottom: bright or patterned backdrops came out as
    # confetti around the sampled faces (RESULTS.md)
    colour = np.clip(rng.uniform(50, 210) + rng.normal(0, 12, 3), 0, 255) * np.linspace(1.0, 0.8, h)[:, None, None]
    img = Image.fromarray(np.broadcast_to(colour, (h, w, 3)).round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    marks = SYNTH_LANDMARKS * rng.uniform(0.9, 1.1, SYNTH_LANDMARKS.shape)
    marks[3:] += rng.normal(0, 0.03, (6, 2))
    width, angle = rng.uniform(0.35, 0.75) * h, rng.uniform(-0.5, 0.5)  # box width in pixels, tilt (radians)
    rot = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    center = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.35, 0.65) * h])

    def place(p):
        return [tuple(q) for q in (np.asarray(p) * width) @ rot + center]

    fur = tuple(int(c) for c in np.clip(np.array(FUR[rng.integers(len(FUR))]) + rng.integers(-20, 21, 3), 0, 255))
    inner = tuple(int(c) for c in rng.integers(180, 256, 3) * np.array([1, 0.7, 0.75]))
    for ear in (marks[list(ear)] for ear in EARS):
        draw.polygon(place(ear), fill=fur)
        draw.polygon(place(ear.mean(0) + 0.6 * (ear - ear.mean(0))), fill=inner)
    draw.polygon(place(ellipse(0, 0.02, rng.uniform(0.54, 0.6), rng.uniform(0.48, 0.54))), fill=fur)
    if rng.random() < 1 / 3:  # a white muzzle and chest
        draw.polygon(place(ellipse(0, 0.3, 0.28, 0.2)), fill=(240, 238, 232))
    eye_colour, eye_r, pupil = EYES[rng.integers(len(EYES))], rng.uniform(0.06, 0.09), rng.uniform(0.015, 0.04)
    for eye in marks[:2]:
        draw.polygon(place(ellipse(eye[0], eye[1], eye_r, eye_r * 0.85)), fill=eye_colour)
        draw.polygon(place(ellipse(eye[0], eye[1], pupil, eye_r * 0.75)), fill=(10, 10, 10))
    mouth, line = marks[2], max(1, int(width * 0.012))
    draw.polygon(place([mouth + [-0.045, -0.09], mouth + [0.045, -0.09], mouth + [0, -0.04]]), fill=(230, 120, 130))
    draw.line(place([mouth + [-0.06, 0.03], mouth, mouth + [0, -0.04], mouth, mouth + [0.06, 0.03]]),
              fill=(50, 35, 30), width=line)
    for side, dy in itertools.product((-1, 1), (-0.04, 0, 0.04)):  # whiskers
        draw.line(place([mouth + [side * 0.08, -0.04], mouth + [side * 0.42, dy * 2 - 0.05]]), fill=(235, 235, 235),
                  width=line)
    return img.reduce(scale), np.asarray(place(marks)) / scale


def write_synthetic_dataset(folder, count=700, seed=0):
    """A deterministic synthetic dataset in the CAT format: NNNNNNNN_000.jpg + .jpg.cat pairs."""
    folder, rng = Path(folder), np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(count), desc="drawing synthetic cats", unit="photo"):
        photo, marks = draw_synthetic_cat(rng)
        path = folder / f"{i:08d}_000.jpg"
        photo.save(path, quality=90)
        # N x1 y1 ... xN yN, as integers
        Path(f"{path}.cat").write_text(" ".join(str(int(round(v))) for v in [len(marks), *marks.reshape(-1)]) + " ")
    return folder


GET_THE_DATA = "get the CAT dataset (Kaggle: crawford/cat-dataset) as data/README.md says"
SYNTHETIC_STAMP = ".drawn-by-cat_diffusion"  # marks a synthetic set as the script's own to replace


def resolve_data(folder, synthetic_count, seed, default):
    """The folder to train on: `folder`, or, when it is the `default` data/ and holds no photos at
    all, its synthetic/ set, drawn there if need be. Only a folder holding the stamp file, which
    drawing writes first, is ever deleted: data/synthetic/ redrawn, or a partial draw retried."""
    pairs, missing, unnamed = find_annotated_photos(folder) if folder.is_dir() else ([], [], [])
    if not default:
        if pairs:
            return folder
        raise SystemExit(f"error: --data {folder}: no photos with .cat landmark files in it or below it "
                         f"({len(missing) + len(unnamed)} photos without one); {GET_THE_DATA}")
    synthetic, partial = folder / "synthetic", folder / ".synthetic.partial"
    real = [p for p, _ in pairs if synthetic not in p.parents]
    if real and len(real) < len(pairs):
        raise SystemExit(f"error: {folder} holds real photos and a synthetic/ set; delete "
                         f"{synthetic} or pass --data with the real folder")
    if real:
        return folder
    if unannotated := [p for p in missing + unnamed if synthetic not in p.parents]:
        raise SystemExit(f"error: {folder} holds {len(unannotated)} photos but none with its .cat landmark "
                         f"file (e.g. {printable(unannotated[0])}); {GET_THE_DATA}")
    stamp = f"{synthetic_count} photos, seed {seed}"
    for drawn in (synthetic, partial):
        if drawn.exists() and not (drawn / SYNTHETIC_STAMP).is_file():
            raise SystemExit(f"error: {drawn} exists but was not drawn by this script (no {SYNTHETIC_STAMP} "
                             f"in it), so it is left alone: move it, or pass --data")
    if synthetic.exists() and (synthetic / SYNTHETIC_STAMP).read_text() == stamp:
        return synthetic
    print(f"No annotated cat photos in {folder.resolve()} ({GET_THE_DATA}); drawing {synthetic_count} "
          f"synthetic cats into {synthetic}/")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / SYNTHETIC_STAMP).write_text(stamp)
    write_synthetic_dataset(partial, synthetic_count, seed)
    if synthetic.exists():
        shutil.rmtree(synthetic)
    partial.rename(synthetic)
    return synthetic


# ----------------------------------------------------------------------------------------------
# Model: the denoiser, a convolutional encoder-decoder (U-Net) conditioned on the noise level
# ----------------------------------------------------------------------------------------------

def timestep_embedding(t, dim):
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017; Ho et al. 2020)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def zero_init(layer):
    """Zero a layer's weights and bias, so the residual branch it ends starts as nothing."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels, affine=True):
    """GroupNorm with up to 32 groups of at least 4 channels, for any channel count."""
    return nn.GroupNorm(math.gcd(min(32, max(1, channels // 4)), channels), channels, affine=affine)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the time embedding scales and shifts the middle (FiLM)."""

    def __init__(self, c_in, c_out, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.dropout = group_norm(c_out), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))  # each block starts as the identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class Attention(nn.Module):
    """Multi-head self-attention over pixels, via PyTorch's fused SDPA; 4 heads, or as many as
    divide the channels."""

    def __init__(self, channels, heads=4):
        super().__init__()
        self.heads, self.norm = math.gcd(heads, channels), group_norm(channels)
        self.qkv, self.out = nn.Conv2d(channels, 3 * channels, 1), zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w))


class Stage(nn.Module):
    """Residual blocks at one resolution, with self-attention after each when `attention`."""

    def __init__(self, c_in, c_out, blocks, emb_dim, dropout, attention):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out, emb_dim, dropout) for i in range(blocks))
        self.attns = nn.ModuleList(Attention(c_out) if attention else nn.Identity() for _ in range(blocks))

    def forward(self, x, emb):
        for block, attn in zip(self.blocks, self.attns):
            x = attn(block(x, emb))
        return x


def landmark_heatmaps(landmarks, size):
    """Landmarks (B, 9, 2) in [0, 1] face coordinates -> (B, 9, size, size) Gaussian bumps of
    sigma 1/32 face; NaN landmarks (no condition) give empty maps."""
    centers = (torch.arange(size, device=landmarks.device) + 0.5) / size
    bumps = torch.exp(-(centers - landmarks[..., None]) ** 2 * (32 ** 2 / 2)).nan_to_num(0)  # (B, 9, 2, size)
    return bumps[:, :, 1, :, None] * bumps[:, :, 0, None, :]


class DiffusionModel(nn.Module):
    """Noise-conditioned convolutional encoder-decoder: `model(x_t, t)` predicts v (see `v_target`).

    The encoder halves the resolution in three stages (stride-2 convolutions); the decoder comes
    back up with transposed convolutions, concatenating the encoder's features at each resolution.
    Self-attention runs at resolutions <= `attention_below`. Width: `base_channels` times
    `channel_mults` per resolution; depth: `blocks` residual blocks per stage.

    With `landmarks=True`, `model(x_t, t, landmarks)` also sees the 9 landmarks ((B, 9, 2) in [0, 1]
    face coordinates; NaN or None: unconditional) as heatmap channels beside the image: samples followed
    them closer than an embedding, since a convolution sees where a heatmap is. On by default, since
    every CAT photo has them and even the unconditional samples of a model trained with them beat those
    of one trained without (30 minutes: SWD 19.0 against 24.1; RESULTS.md, Landmark-guided generation,
    "The default").

    `student_steps` N > 0 marks a distilled student (see `distill`), which samples in N steps of the
    "student" sampler by default. `guide`, where a model has one (`train` trains one first, or takes
    `--guide`): a shorter run of the same model, which sampling extrapolates away from (see
    `denoise`), saved and loaded with the model. EDM2's magnitude-preserving layers lost on this
    layout (RESULTS.md, EDM2's magnitude-preserving network).
    """
    # What a model file may ask for (see `checked_config`) and the command line may build: beyond
    # these a model takes hours a sample or gigabytes, never a better cat on this data.
    LIMITS = {"image_size": (8, 256), "base_channels": (1, 512), "channel_mults": (1, 16), "blocks": (1, 8),
              "attention_below": (0, 32), "dropout": (0, 1), "landmarks": (0, 1), "student_steps": (0, 32)}

    def __init__(self, image_size=64, base_channels=32, channel_mults=(1, 2, 2, 4), blocks=1,
                 attention_below=8, dropout=0.0, landmarks=True, student_steps=0):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be divisible by 8 (three halvings), got {image_size}")
        if len(channel_mults) != 4:
            raise ValueError("channel_mults needs 4 entries: three encoder stages and the middle")
        self.config = dict(image_size=image_size, base_channels=base_channels, channel_mults=list(channel_mults),
                           blocks=blocks, attention_below=attention_below, dropout=dropout, landmarks=landmarks,
                           student_steps=student_steps)
        ch, res = [base_channels * m for m in channel_mults], [image_size >> i for i in range(4)]
        emb_dim = 4 * base_channels
        self.freqs = base_channels + base_channels % 2  # sines and cosines come in pairs
        self.time_mlp = nn.Sequential(nn.Linear(self.freqs, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(3 + K * landmarks, ch[0], 3, padding=1)

        def stage(c_in, c_out, r):
            return Stage(c_in, c_out, blocks, emb_dim, dropout, attention=r <= attention_below)

        self.encoder = nn.ModuleList(stage(ch[max(i - 1, 0)], ch[i], res[i]) for i in range(3))
        self.down = nn.ModuleList(nn.Conv2d(ch[i], ch[i], 3, stride=2, padding=1) for i in range(3))
        self.middle = stage(ch[2], ch[3], res[3])
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[i + 1], ch[i], 4, stride=2, padding=1) for i in range(3))
        self.decoder = nn.ModuleList(stage(2 * ch[i], ch[i], res[i]) for i in range(3))
        self.head = nn.Sequential(group_norm(ch[0]), nn.SiLU(), zero_init(nn.Conv2d(ch[0], 3, 3, padding=1)))

    def encode(self, x, t, landmarks=None):
        """The encoder's features at each of its resolutions, the middle's last, and the time embedding."""
        emb = self.time_mlp(timestep_embedding(t, self.freqs))
        if self.config["landmarks"]:
            landmarks = x.new_full((len(x), K, 2), math.nan) if landmarks is None else landmarks
            x = torch.cat([x, landmark_heatmaps(landmarks.float(), x.shape[-1]).to(x.dtype)], dim=1)
        h, features = self.stem(x), []
        for stage, down in zip(self.encoder, self.down):
            features.append(stage(h, emb))
            h = down(features[-1])
        return features + [self.middle(h, emb)], emb

    def forward(self, x, t, landmarks=None):
        (*skips, h), emb = self.encode(x, t, landmarks)
        for i in reversed(range(3)):
            h = self.decoder[i](torch.cat([self.up[i](h), skips[i]], dim=1), emb)
        return self.head(h)


# ----------------------------------------------------------------------------------------------
# Diffusion: DDPM forward process, cosine schedule, v-prediction
# ----------------------------------------------------------------------------------------------

T = 1000  # diffusion steps


def cosine_alpha_bar(steps=T, s=0.008):
    """alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2) (Nichol & Dhariwal 2021,
    eq. 17), with beta_t capped at 0.999; index t = 0 .. T-1 is step t+1 of the paper."""
    x = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
    beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - beta, 0).float()


def q_sample(x0, alpha_bar_t, eps):
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (Ho et al. 2020, eq. 4)."""
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps


def v_target(x0, alpha_bar_t, eps):
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, section 4).

    Why v: its MSE weights x0-errors by SNR + 1, so it stays finite and informative at both ends
    of the cosine schedule, where eps-prediction turns ill-posed at high noise (SNR -> 0); measured,
    SWD 77.9 for v against 89.6 for eps (RESULTS.md).
    """
    return alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0


def predict_x0_eps(v, x_t, alpha_bar_t):
    """Invert the v parametrisation: x0 = sqrt(ab) x_t - sqrt(1-ab) v, eps = sqrt(1-ab) x_t + sqrt(ab) v."""
    a, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    return a * x_t - s * v, s * x_t + a * v


def draw_noise(x0, generator):
    """t uniform over the schedule and eps ~ N(0, I), one of each per image (Ho et al. 2020, algorithm 1);
    EDM's log-normal noise levels did worse here, SWD 65.8 against 33.9 (RESULTS.md)."""
    return (torch.randint(0, T, (len(x0),), device=x0.device, generator=generator),
            torch.randn(x0.shape, device=x0.device, generator=generator).to(memory_format=torch.channels_last))


def loss_weight(snr):
    """(min(SNR, 5) + 1) / (SNR + 1) on the v error: v's own weight up to SNR 5 and min-SNR-5's above
    it (Hang et al. 2023), so the nearly clean levels weigh less and the noisy ones that set the
    layout keep their weight; it beat plain v-MSE with two seeds and min-SNR-5 itself by far (RESULTS.md)."""
    return (snr.clamp(max=5) + 1) / (snr + 1)


def diffusion_loss(model, x0, t, eps, alpha_bar, landmarks=None):
    """MSE between the predicted and the true v of x_t, weighted per level by `loss_weight`."""
    ab = alpha_bar[t][:, None, None, None]
    v_pred = model(q_sample(x0, ab, eps), t, landmarks)
    return (loss_weight(ab / (1 - ab)) * (v_pred.float() - v_target(x0, ab, eps)) ** 2).mean()


def half_resolution(x0, eps, alpha_bar):
    """The same problem at half the image size (Hoogeboom et al. 2023, simple diffusion): x0 and eps averaged
    over 2x2 pixels (eps x 2: unit variance again) and alpha_bar shifted to SNR x 4, so that x_t is the
    full-size x_t averaged (and rescaled), and each t keeps the noise level it has at full size."""
    return F.avg_pool2d(x0, 2), 2 * F.avg_pool2d(eps, 2), 4 * alpha_bar / (1 + 3 * alpha_bar)


ALPHA_BAR = cosine_alpha_bar()


# ----------------------------------------------------------------------------------------------
# Devices: CPU or CUDA, bf16 where it runs fast, torchrun's processes
# ----------------------------------------------------------------------------------------------

def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # torchrun: one GPU per process
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def rank_and_world():
    """(this process's rank, number of processes): (0, 1) unless started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def barrier():
    if rank_and_world()[1] > 1:
        dist.barrier()


def cpu_has_fast_bf16():
    """AMX or AVX512-BF16: bf16 convolutions run several times faster than fp32 there."""
    try:
        return re.search("amx_bf16|avx512_bf16", Path("/proc/cpuinfo").read_text()) is not None
    except OSError:
        return False


def autocast_dtype(device, precision="auto"):
    """bf16 where the hardware runs it fast (or when forced), else None for plain fp32."""
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_fast_bf16()
    return torch.bfloat16 if precision == "bf16" or precision == "auto" and fast else None


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def model_device(model):
    return next(model.parameters()).device


def seeded_generator(model, seed):
    """A random generator on `model`'s device, seeded with `seed`."""
    return torch.Generator(model_device(model)).manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    """The training recipe; each measured choice is recorded in tests/benchmarks/RESULTS.md
    ("Choices recorded in the code", "Optimiser settings")."""
    epochs: int = 50
    minutes: float | None = None  # train for this wall-clock time instead (see plan_steps); epochs then unused
    preview_every: float | None = None  # minutes between previews (see preview_interval); None: a tenth of the run
    batch_size: int = 32  # at full size; the half-size steps take half of it (see low_res_share)
    lr: float = 2e-3
    warmup_steps: int = 200
    betas: tuple = (0.9, 0.99)  # AdamW's; beta2 0.99 follows the fast-moving early loss better than 0.999
    muon: bool = True  # Muon for the hidden weights (see MuonAdamW); distillation's too (DISTILL)
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # make_ema's cap; the EMA window is not what limits hour-long runs
    augment: bool = True  # random horizontal flips
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto | bf16 | fp32
    checkpoint_every: int = 500  # steps; a checkpoint is also written after an epoch (see EPOCH_CHECKPOINT_GAP)
    grad_accum: int = 1  # micro-batches per step; batch_size is the global batch per step
    compile: bool = False  # torch.compile the model for training
    landmark_dropout: float = 0.15  # share of faces trained unconditionally (landmark models)
    # The first share of the steps trains at half the image size (see half_resolution) and half the batch, faster by
    # HALF_SIZE_SPEEDUP: at 12 minutes it beat full size throughout, and batch 16 throughout, in two seeds each
    # (RESULTS.md, Progressive resolution).
    low_res_share: float = 0.4


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the message says why and what was kept."""


def make_ema(model, decay, k=10):
    """EMA of the weights via torch.optim.swa_utils.AveragedModel, with the decay warmed up as
    min(decay, (1 + n) / (k + n)) after n updates, so that a short run is not dominated by its
    random start: until the cap, an average over the last ~n / (k - 1) steps (Karras et al. 2024's
    power EMA with sigma_rel ~0.09 at k = 10, the best of the five k measured: RESULTS.md, EMA length)."""
    def ema_update(ema_params, params, num_averaged):
        d = min(decay, (1 + float(num_averaged)) / (k + float(num_averaged)))
        torch._foreach_lerp_(ema_params, params, 1 - d)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


class MuonAdamW(torch.optim.AdamW):
    """AdamW, but Muon (Jordan et al. 2024) for the param groups marked `muon`: each weight's Nesterov
    momentum (0.95), viewed as a matrix (out, in x k x k), is orthogonalised by torch.optim.Muon's
    Newton-Schulz iteration and applied at the learning rate scaled by 0.2 sqrt(max(out, in)), AdamW's
    update size (Liu et al. 2025); torch.optim.Muon itself takes 2-D weights only, not a convolution's.
    Though its iterations cost a quarter of the steps on a 2-core CPU, it beat AdamW alone at 12 minutes (SWD 31.2 and
    34.3 against 33.4 and 43.0, two seeds), and with its cosine decay it beat schedule-free AdamW (26.2 against 36.4;
    RESULTS.md, Optimiser settings, "Muon", "Schedule-free AdamW")."""

    @torch.no_grad()
    def step(self):
        muon = torch.optim._muon
        for group, p in ((g, p) for g in self.param_groups if g["muon"] for p in g["params"] if p.grad is not None):
            self.state[p].setdefault("step", torch.tensor(0.0)).add_(1)  # AdamW's loading expects every state to count
            momentum = self.state[p].setdefault("momentum", torch.zeros_like(p)).lerp_(p.grad, 0.05)
            update = p.grad.lerp_(momentum, 0.95).flatten(1)
            ortho = muon._zeropower_via_newtonschulz(update, (muon.DEFAULT_A, muon.DEFAULT_B, muon.DEFAULT_C),
                                                     muon.DEFAULT_NS_STEPS, muon.EPS)
            p.add_(ortho.view_as(p), alpha=-muon._adjust_lr(group["lr"], "match_rms_adamw", update.shape))
            p.grad = None  # done: AdamW's step below skips it
        super().step()


def make_optimizer(model, cfg):
    """`cfg`'s optimizer for `model`: with `cfg.muon`, Muon for the hidden weights and AdamW for the first and
    last convolutions, the biases and the norms; else AdamW for all."""
    hidden = [cfg.muon and p.ndim > 1 and not n.startswith(("stem.", "head.")) for n, p in model.named_parameters()]
    groups = [dict(params=[p for p, h in zip(model.parameters(), hidden) if h == muon], muon=muon) for muon in (True, False)]
    return MuonAdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)


def warmup_cosine(step, warmup, total):
    """Learning-rate factor: linear warm-up, then cosine decay to 10% at step `total` (None: a
    timed run whose length is not planned yet holds the peak)."""
    if step < warmup or total is None:
        return min(1.0, (step + 1) / max(1, warmup))  # the warm-up, then the peak
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# A run of --minutes times its steps over each twentieth of its time (after its first step, which compiles)
# and moves its end to what the rest of the time holds: a few dozen steps misjudge a GPU's speed, and a
# plan fixed once, while another program ran, left a distillation with a tenth of the steps it had time for.
TIMED_SHARE = 1 / 20
REPLAN_NOTE = 0.05  # a plan this much off the last one said is said in the log
MAX_MINUTES = 7 * 24 * 60  # a week: the longest --minutes (a larger one would never plan its steps)
# An epoch's end writes a checkpoint only this many seconds after the last one: a GPU runs an epoch in under
# a second, and a write after each slowed its loop by a tenth.
EPOCH_CHECKPOINT_GAP = 60


HALF_SIZE_SPEEDUP = 5.0  # a half-size step's speed over a full-size one's on a 2-core CPU: 2.5 x 2 for its half batch


def plan_steps(minutes, step, elapsed, seconds_per_step, low_res_share=0.0):
    """The step total that ends a run of `minutes` on time: the steps done, and as many more as
    the rest of the time holds at the measured speed. A run timed at half size (`low_res_share` > 0)
    counts the steps after low_res_share x total at HALF_SIZE_SPEEDUP times the measured cost."""
    rest, full_size = 60 * minutes - elapsed, seconds_per_step * HALF_SIZE_SPEEDUP
    if low_res_share:  # (share x total - step) x seconds_per_step + (1 - share) x total x full_size = rest
        total = (rest + step * seconds_per_step) / (low_res_share * seconds_per_step + (1 - low_res_share) * full_size)
        return int(total) if low_res_share * total > step else step + max(0, int(rest / full_size))
    return step + max(0, int(rest / seconds_per_step))


PREVIEWS = 10  # a run's previews unless --preview-every says otherwise
PREVIEW_FACES, PREVIEW_STEPS = 16, 10  # a preview: 16 fixed noises, DPM-Solver++ 10 steps (a student: its own)
PREVIEW_SHARE = 0.02  # the most of a run's compute its previews take


def preview_interval(steps, batch_size):
    """Steps between previews: `steps`, but never so few that a preview's PREVIEW_FACES x
    PREVIEW_STEPS forward passes exceed PREVIEW_SHARE of the training's (a step of `batch_size`
    full-size faces, on average: a forward and a backward pass, about 3 forward passes, for each)."""
    return max(steps, math.ceil(PREVIEW_FACES * PREVIEW_STEPS / (3 * batch_size) / PREVIEW_SHARE))


def epoch_order(n, seed, epoch):
    """The epoch's shuffled order and flip flags, a pure function of (seed, epoch) so that a
    resumed run sees exactly the batches the uninterrupted one would have."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g), torch.rand(n, generator=g) < 0.5


def make_batch(faces, landmarks, idx, flips, device):
    """Faces `idx` as a model-ready batch in [-1, 1] with their landmarks, `flips` mirrored."""
    x0, marks = to_model_range(faces[idx].to(device)), landmarks[idx].to(device)
    if flips is not None:
        x0[flips], marks[flips] = flip_faces(x0[flips], marks[flips])
    return x0.contiguous(memory_format=torch.channels_last), marks


@torch.no_grad()
def validation_loss(model, dataset, device, dtype, batch_size=64):
    """Mean loss on `dataset` with fixed t and noise, so epochs compare like with like."""
    g, alpha_bar, total = torch.Generator(device).manual_seed(1234), ALPHA_BAR.to(device), 0.0
    for i in range(0, len(dataset), batch_size):
        x0, marks = make_batch(dataset.faces, dataset.landmarks, slice(i, i + batch_size), None, device)
        cond = marks if model.config["landmarks"] else None
        with autocast(device, dtype):
            total += diffusion_loss(model, x0, *draw_noise(x0, g), alpha_bar, cond).item() * len(x0)
    return total / len(dataset)


RUN_SETTINGS = ("batch_size", "seed", "warmup_steps", "ema_decay", "augment", "muon", "grad_clip",
                "landmark_dropout", "low_res_share")  # with the model and the data, what a resumed run must keep


def tensors_fingerprint(tensors):
    """A hash of tensors' bytes: how a resumed run recognises its data, and a distillation its teacher."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_resume(path, ckpt, model, cfg, fingerprint, total):
    """Refuse to resume a checkpoint's run as another run: the model, the data and RUN_SETTINGS
    must be the checkpoint's. The learning rate may change, and more epochs extend the run.
    Returns the changes to report."""
    step, saved = ckpt.get("step"), ckpt.get("train_config")
    if type(step) is not int or step < 0 or not isinstance(saved, dict) or not isinstance(ckpt.get("model_config"), dict):
        raise CheckpointError(f"{path}: damaged training state (step {step!r})")
    timed = saved.get("minutes") is not None
    length, other = ("minutes", "epochs") if timed else ("epochs", "minutes")  # what the run's length is counted in
    if timed != (cfg.minutes is not None) or timed and cfg.epochs != saved.get("epochs"):  # would do nothing
        raise CheckpointError(f"{path}: a run of {length} is extended with a larger --{length}, not with --{other}")
    differ = [f"{k} {was!r} -> {now!r}" for k, was, now in [
        *((k, ckpt["model_config"].get(k), v) for k, v in model.config.items()),
        *((k, ckpt["train_config"].get(k), getattr(cfg, k)) for k in RUN_SETTINGS),
        ("data", ckpt.get("data", fingerprint), fingerprint)] if was != now]
    if differ:
        raise CheckpointError(f"{path}: the checkpoint's run had other settings: {', '.join(differ)} "
                              f"(resume with the run's own, or start a new run)")
    if total is not None and total < step:
        raise CheckpointError(f"{path}: the run has trained {step} steps already; {getattr(cfg, length)} {length} "
                              f"are only {total}")
    changes = [f"learning rate {saved['lr']} -> {cfg.lr} from step {step + 1}"] if cfg.lr != saved["lr"] else []
    if getattr(cfg, length) != saved.get(length):
        changes.append(f"{length} {saved.get(length)} -> {getattr(cfg, length)}: the cosine decay is re-planned over "
                       f"{total or 'newly timed'} steps")
    return changes


def restore(path, ckpt, model, ema, opt, sched, noise_gen, lr):
    """Load a training checkpoint into the run's parts; the learning rate is `lr` from here on."""
    try:
        for part, key in ((model, "model"), (ema, "ema"), (opt, "optimizer"), (sched, "scheduler")):
            part.load_state_dict(ckpt[key])
        noise_gen.set_state(ckpt["noise_rng"].to("cpu"))
        torch.set_rng_state(ckpt["torch_rng"])  # dropout draws from the global generator
        history, step = ckpt["history"], int(ckpt["step"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged training state ({type(e).__name__})") from None
    sched.base_lrs = [lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)
    return history, step


def agree(value, device, world):
    """Rank 0's `value` (an integer) on every process, so that all plan the same run."""
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.broadcast(t, 0)
    return int(t.item())


def mean_losses(pending, world):
    """The pending steps' losses as floats, in one host sync, averaged over torchrun's processes so
    that every process sees the same numbers and all stop together on a non-finite one."""
    losses = torch.stack(pending)
    if world > 1:
        dist.all_reduce(losses)
        losses /= world
    return losses.tolist()


def kept_note(step, out_dir):
    """What a stopped run leaves to resume: the last checkpoint, written after `step`, if any."""
    return (f"{Path(out_dir) / 'checkpoint.pt'} (step {step}) is kept: resume it with a lower --lr" if step
            else f"no checkpoint was written to {out_dir}")


@torch.no_grad()
def worth_keeping(model, ema, opt, loss_of):
    """Whether the current training state may be checkpointed: finite weights, EMA and optimizer
    moments, and a finite loss of the current weights, `loss_of(model)`. The losses the loop checks
    were computed before the last update, so they cannot vouch for the weights after it."""
    tensors = [*model.parameters(), *ema.parameters(),
               *(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))]
    if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        return False
    loss = loss_of(model.eval()).item()
    model.train()
    return math.isfinite(loss)


def training_batch(faces, landmarks, idx, flips, cfg, conditioned, noise_gen):
    """A step's (x0, t, eps, landmarks): faces `idx` (`flips` mirrored), their noise levels and
    noise, and for a `conditioned` model their landmarks, NaN for a `cfg.landmark_dropout` share
    of them (condition dropout: one model, with and without landmarks), else None."""
    x0, marks = make_batch(faces, landmarks, idx, flips, faces.device)
    t, eps = draw_noise(x0, noise_gen)
    if not conditioned:
        return x0, t, eps, None
    dropped = torch.rand(len(x0), device=x0.device, generator=noise_gen) < cfg.landmark_dropout
    return x0, t, eps, torch.where(dropped[:, None, None], math.nan, marks)


def accumulate(net, objective, parts, alpha_bar, dtype, world):
    """Forward and backward over this process's micro-batches `parts` ((x0, t, eps, landmarks)
    each), DDP averaging the gradients over processes on the last only; returns the step's loss."""
    loss = torch.zeros((), device=alpha_bar.device)
    for k, (x0, t, eps, cond) in enumerate(parts):
        with net.no_sync() if world > 1 and k < len(parts) - 1 else contextlib.nullcontext():
            with autocast(x0.device, dtype):
                micro_loss = objective(net, x0, t, eps, alpha_bar, cond) / len(parts)
            micro_loss.backward()
        loss += micro_loss.detach()
    return loss


def train(model, data, cfg, out_dir, val_data=None, resume=None, settings=None, objective=None, preview=None):
    """Train `model` on `data` (a CatDataset) to minimise `objective` (by default `diffusion_loss`;
    or a distillation loss, with its signature); returns (ema_model, history).

    Writes `out_dir/checkpoint.pt` every `cfg.checkpoint_every` steps, at the end, and after an epoch
    that ends EPOCH_CHECKPOINT_GAP seconds or more after the last write, each time from a state
    checked to be finite (`worth_keeping`); `resume` (a checkpoint path) continues that run exactly
    where it stopped (see `check_resume`), and `settings` (the command line's) are kept in the
    checkpoint for it. `preview(ema_model, history, caption)` (see `previewer`), when given, renders
    the run's progress every `cfg.preview_every` minutes (see `preview_interval`) as
    (frame, {path: PNG bytes}); the frames are kept in `history["frames"]`, and the pictures are
    written once a checkpoint that knows their digests is. Under torchrun each of the N processes computes 1/N
    of every global batch (DistributedDataParallel averages the gradients) and rank 0 alone
    writes; the result matches a single process up to float rounding.
    """
    rank, world = rank_and_world()
    objective, device = objective or diffusion_loss, pick_device(cfg.device)
    dtype = autocast_dtype(device, cfg.precision)
    model.to(device, memory_format=torch.channels_last).train()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net, dynamic=False) if cfg.compile else net  # a static graph for each image size
    ema, opt = make_ema(model, cfg.ema_decay), make_optimizer(model, cfg)
    # at half size and half the batch until step low_res_share x total, where the half size still halves three times
    low = cfg.low_res_share > 0 and model.config["image_size"] % 16 == 0
    batch = min(cfg.batch_size, len(data))
    half, splits = max(1, batch // 2), world * cfg.grad_accum  # half: the half-size steps' batch
    if batch % splits or low and half % splits:
        raise TrainingError(f"batch {batch} (half size: {half}) does not split into {world} processes x {cfg.grad_accum}")
    # step_cost: a step's mean cost over the run, in full-size steps (preview_interval keeps the previews' share of it)
    steps_per_epoch, step_cost = len(data) // batch, 1 - cfg.low_res_share * (1 - 1 / HALF_SIZE_SPEEDUP) if low else 1
    total = steps_per_epoch * cfg.epochs if cfg.minutes is None else None  # a timed run plans it below
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup_steps, total))
    # Every rank draws the whole batch's noise from one generator and uses its share, so the
    # numbers seen do not depend on the number of processes.
    noise_gen, alpha_bar = torch.Generator(device).manual_seed(cfg.seed), ALPHA_BAR.to(device)
    # The uint8 set, its order and flips live on the device: no per-step host copies or syncs.
    faces, landmarks = data.faces.to(device), data.landmarks.to(device)
    history = {"loss": [], "val": [], "frames": [], "preview_every": None, "faces": 0}
    # spent: seconds of earlier processes
    step, fingerprint, outputs, spent = 0, tensors_fingerprint([data.faces, data.landmarks.float()]), {}, 0.0
    if resume:
        ckpt = read_checkpoint(resume, want="training")
        outputs = ckpt.get("outputs", {})  # the files an earlier end of this run wrote (see record_outputs)
        if cfg.minutes is not None and ckpt.get("total") is not None:  # planned already: scale it
            total = round(ckpt["total"] * cfg.minutes / (ckpt["train_config"].get("minutes") or cfg.minutes))
        changes = check_resume(resume, ckpt, model, cfg, fingerprint, total)
        restored, step = restore(resume, ckpt, model, ema, opt, sched, noise_gen, cfg.lr)
        history, spent = {**history, **restored}, ckpt.get("seconds", 0.0)
        if ckpt.get("objective"):  # a distillation's kept targets and critic (see distillation_loss)
            objective.load_state_dict(ckpt["objective"])
        if cfg.preview_every != ckpt["train_config"].get("preview_every"):  # a new --preview-every: planned anew
            history["preview_every"] = None
        if rank == 0:
            print(f"resuming {resume} at step {step}" + "".join(f"; {c}" for c in changes), file=sys.stderr)
    if rank == 0:
        for stale in Path(out_dir).glob(".checkpoint.pt.*.tmp"):  # left by a run killed mid-write
            stale.unlink()
    kept = step

    def checkpoint(step, loss_of):
        """Write the state after `step` if `worth_keeping` it, else stop; returns the step kept."""
        with autocast(device, dtype):
            if not worth_keeping(model, ema, opt, loss_of):
                raise TrainingError(f"the weights after step {step} give a non-finite loss (learning rate "
                                    f"{cfg.lr} may be too high); {kept_note(kept, out_dir)}")
        state = dict(kind="training", model_config=model.config, train_config=dataclasses.asdict(cfg),
                     model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                     scheduler=sched.state_dict(), noise_rng=noise_gen.get_state(), torch_rng=torch.get_rng_state(),
                     step=step, total=total, history=history, data=fingerprint, settings=settings or {},
                     outputs=outputs, seconds=spent + time.perf_counter() - tic, objective=getattr(objective, "state_dict", dict)())
        atomic_write(Path(out_dir) / "checkpoint.pt", lambda f: torch.save(state, f))
        return step

    pending, tic, first, order, timer, pace, said, pictures = [], time.perf_counter(), history["faces"], *[None] * 4, {}
    previews = preview is not None and cfg.preview_every != 0
    written = tic  # when the last checkpoint was written (or the run started)
    with tqdm(total=total, initial=step, desc="training", unit="step", dynamic_ncols=True, disable=rank > 0) as bar:
        while total is None or step < total:
            step += 1  # `step` counts the steps done
            epoch, i = divmod(step - 1, steps_per_epoch)
            if order is None or i == 0:
                order, flips = (t.to(device) for t in epoch_order(len(data), cfg.seed, epoch))
            if low and total is not None and step > cfg.low_res_share * total:  # once at full size, it stays there
                low, timer, pace = False, None, None  # and its slower steps are timed afresh
            idx = order[i * batch:(i + 1) * batch][:half if low else batch]
            x0, t, eps, cond = training_batch(faces, landmarks, idx, flips[idx] if cfg.augment else None, cfg,
                                              model.config["landmarks"], noise_gen)
            x0, eps, ab = half_resolution(x0, eps, alpha_bar) if low else (x0, eps, alpha_bar)
            mine = torch.arange(len(idx), device=device).chunk(world)[rank]  # this process's equal share
            parts = [[None if v is None else v[part] for v in (x0, t, eps, cond)] for part in mine.chunk(cfg.grad_accum)]
            history["faces"] += len(idx)
            opt.zero_grad(set_to_none=True)
            pending.append(accumulate(net, objective, parts, ab, dtype, world))
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            ema.update_parameters(model)
            # The speed is timed after this process's first step (which compiles), each window anew: a timed
            # run plans its total from it (its previews come a tenth of the latest plan apart), and previews set
            # in minutes their interval. Rank 0 decides for every process, every 10th step and the last (a
            # decision syncs the processes).
            timer, now, every = timer or (step, time.perf_counter()), time.perf_counter(), history["preview_every"]
            window = TIMED_SHARE * 60 * (cfg.minutes or cfg.preview_every or 0)
            if (cfg.minutes is not None or previews and not every) and (step % 10 == 0 or step == total) \
                    and step > timer[0] and agree(int(now - timer[1] >= window), device, world):
                per_step, timer, elapsed = (now - timer[1]) / (step - timer[0]), (step, now), spent + now - tic
                pace = per_step if pace is None else (pace + per_step) / 2  # windows scatter by 10% (RESULTS.md)
                if cfg.minutes is not None:
                    planned = agree(plan_steps(cfg.minutes, step, elapsed, pace, low and cfg.low_res_share), device, world)
                    if rank == 0 and (said is None or abs(planned - said) > REPLAN_NOTE * said):
                        end = datetime.datetime.now() + datetime.timedelta(seconds=60 * cfg.minutes - elapsed)
                        tqdm.write(f"{cfg.minutes:g} minutes: {planned} steps {'re-' * (said is not None)}planned at "
                                   f"{pace:.3f} s a step; training ends at about {end:%H:%M}", file=sys.stderr)
                        said = planned
                    total = bar.total = planned
                if previews and (not every or cfg.minutes is not None and cfg.preview_every is None):
                    wanted = round(60 * cfg.preview_every / pace) if cfg.preview_every else total // PREVIEWS
                    history["preview_every"] = every = agree(preview_interval(wanted, batch * step_cost), device, world)
            end_of_epoch = step % steps_per_epoch == 0
            # the last frame is the finished model's, instead of one less than `every` steps before it
            at_preview = previews and every and (step == total or step % every == 0 and step + every <= total)
            at_checkpoint = at_preview or step % cfg.checkpoint_every == 0 or step == total or \
                (end_of_epoch and agree(int(time.perf_counter() - written >= EPOCH_CHECKPOINT_GAP), device, world))
            if len(pending) == 10 or at_checkpoint:  # one host sync per 10 steps; checked before saving
                losses = mean_losses(pending, world)
                pending.clear()
                if not all(map(math.isfinite, losses)):
                    raise TrainingError(f"loss became {losses[-1]} at step {step} (learning rate {cfg.lr} may be "
                                        f"too high); {kept_note(kept, out_dir)}")
                history["loss"] += losses
                bar.update(len(losses))
                bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=epoch + 1,
                                img_s=f"{(history['faces'] - first) / (time.perf_counter() - tic):.0f}")
            if rank == 0 and end_of_epoch and val_data is not None:
                history["val"].append((step, validation_loss(ema.module, val_data, device, dtype)))
            if rank == 0 and at_preview:  # a picture's digests: the one the run wrote last, and this one
                caption = f"step {step:,}\n{history['faces']:,} faces seen\nloss {history['loss'][-1]:.4f}"
                frame, pictures = preview(ema.module, history, f"{caption}, {(spent + now - tic) / 60:.1f} min")
                history["frames"].append((caption, frame))
                for key, path, png in ((run_relative(path, out_dir), path, png) for path, png in pictures.items()):
                    outputs[key] = [*outputs.get(key, [])[-1:], file_digest(path, png)]
            if rank == 0 and at_checkpoint:  # the weights are checked on this step's first micro-batch
                x0, t, eps, cond = parts[0]
                kept = checkpoint(step, lambda m: objective(m, x0, t, eps, ab, cond))
                for path, png in pictures.items():
                    atomic_write(path, lambda f: f.write(png))
                pictures = {}
            if at_checkpoint:
                barrier()
                written = time.perf_counter()
    return ema.module.eval(), history


# ----------------------------------------------------------------------------------------------
# Sampling: DDPM, DDIM and DPM-Solver++(2M) over one time grid, SDEdit; pictures
# ----------------------------------------------------------------------------------------------

SAMPLERS = {"ddpm": 1000, "ddim": 50, "dpm++": 20, "student": 4}  # name -> default number of steps (a student: its own)
MAX_GUIDANCE = 10.0  # beyond it samples saturate; the studio's slider and API stop here too
# the guidance w of denoise: with landmarks the least that keeps landmark error <= 1.5x real, with a guide better than 2
GUIDANCE = 1.5  # (RESULTS.md, Landmark-guided generation and Autoguidance)
GUIDE_MIN_SNR = 1 / 9  # autoguidance's interval: SNR alpha_bar / (1 - alpha_bar) at least this (EDM's sigma <= 3)


def guidance_of(model, guidance=None):
    """The guidance to sample a model with (see `denoise`): as given, else GUIDANCE, or 1 for a
    distilled student, which has its teacher's built in (see `teacher_target`)."""
    return guidance if guidance is not None else 1.0 if model.config.get("student_steps") else GUIDANCE


def landmarks_for(model, landmarks, n, device):
    """Landmarks ((9, 2) or (n, 9, 2), [0, 1] face coordinates) for `n` images, or None."""
    if landmarks is None:
        return None
    if not model.config["landmarks"]:
        raise ValueError("this model was trained without landmarks")
    return landmarks.float().to(device).expand(n, K, 2)


def denoise(model, x, t, ab, dtype, landmarks=None, guidance=1.0):
    """The model's clean-image estimate x0 (clipped to [-1, 1]) and the eps consistent with it.
    With guidance w != 1, v = v_0 + w (v - v_0), away from a weaker prediction v_0: for a face with
    landmarks the model's without them (classifier-free guidance, Ho & Salimans 2022), for one
    without them its guide's, where it has one (see `train_guide`): the same kind of model trained for
    less time (autoguidance, Karras et al. 2024), at SNR >= GUIDE_MIN_SNR only (a guidance interval,
    Kynkaanniemi et al. 2024), since guided at every step the noisy steps spoiled the faces' layout; a
    12-minute guide took a 60-minute model from SWD 19.9 to 17.5 (RESULTS.md, Autoguidance). `t`: one
    timestep, or one per image, as `ab`."""
    t = t.expand(len(x))
    free = x.new_ones(len(x), dtype=torch.bool) if landmarks is None else landmarks.isnan().flatten(1).any(1)
    near = free & (ab / (1 - ab)).reshape(-1).expand(len(x)).ge(GUIDE_MIN_SNR)  # the guide's interval
    with autocast(x.device, dtype):
        v = model(x, t, landmarks).float()
        v_0 = v.clone()
        if guidance != 1 and not free.all():
            v_0[~free] = model(x[~free], t[~free], torch.full_like(landmarks[~free], math.nan)).float()
        if guidance != 1 and getattr(model, "guide", None) is not None and near.any():
            v_0[near] = model.guide(x[near], t[near]).float()
    x0 = predict_x0_eps(v_0 + guidance * (v - v_0), x, ab)[0].clamp(-1, 1)
    return x0, (x - ab.sqrt() * x0) / (1 - ab).sqrt()


def ddpm_step(x, x0, ab, ab_next, noise):
    """Ancestral step from the posterior q(x_s | x_t, x0) (Ho et al. 2020, eqs. 6-7), for any gap t > s."""
    alpha = ab / ab_next
    mean = (ab_next.sqrt() * (1 - alpha) * x0 + alpha.sqrt() * (1 - ab_next) * x) / (1 - ab)
    return mean + ((1 - ab_next) / (1 - ab) * (1 - alpha)).sqrt() * noise


def ddim_step(x0, eps, ab_next):
    """Deterministic DDIM step, eta = 0 (Song et al. 2021, eq. 12)."""
    return ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps


def half_log_snr(ab):
    """lambda = log(alpha / sigma) = log(alpha_bar / (1 - alpha_bar)) / 2."""
    return 0.5 * torch.log(ab / (1 - ab))


def dpmpp_2m_step(x, x0, x0_prev, ab, ab_next, h_prev):
    """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2) in log-SNR lambda = log(alpha / sigma).
    Returns (x_next, h); the first step has no history and is first order."""
    h = half_log_snr(ab_next) - half_log_snr(ab)
    d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)  # 1 / (2 r), r = h_prev / h
    return ((1 - ab_next) / (1 - ab)).sqrt() * x - ab_next.sqrt() * torch.expm1(-h) * d, h


def log_snr_grid(t_start, t_end, n):
    """`n` timesteps from `t_start` to `t_end`, evenly spaced in log-SNR from max(lambda, -6)."""
    lam = half_log_snr(ALPHA_BAR.double())
    targets = torch.linspace(max(float(lam[t_start]), -6.0), float(lam[t_end]), n, dtype=torch.float64)
    ts = (lam[None] - targets[:, None]).abs().argmin(1)
    ts[0] = t_start
    return ts


def time_grid(sampler, steps, t_start=T - 1):
    """Timesteps from `t_start` down to 0: evenly spaced in t for DDPM and DDIM, evenly spaced in
    log-SNR for DPM-Solver++ (Lu et al. 2022, section 3.3), starting at lambda = -6 at the latest
    so that no steps are spent on near-pure noise; repeated timesteps are dropped (even log-SNR
    halved DPM-Solver++ 10's SWD against even t: RESULTS.md).

    "student": t_start k/N for k = N .. 1 (the last step goes from t_start/N to the clean image),
    the grid of progressive distillation (Salimans & Ho 2022): the grid of N steps is every r-th
    point of the grid of r N, so a student's one step can learn r of a distilled teacher's."""
    if sampler == "dpm++":
        return torch.unique_consecutive(log_snr_grid(t_start, 0, steps))
    return torch.linspace(t_start, 0, steps + (sampler == "student"))[:steps].round().long()  # a student: not 0


def sampler_of(model, sampler=None, steps=None):
    """The sampler and step count to use: as given, else a distilled student's own ("student",
    its N steps), else DPM-Solver++ 20 steps."""
    native = model.config.get("student_steps", 0)
    sampler = sampler or ("student" if native else "dpm++")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    return sampler, steps or (native if sampler == "student" and native else SAMPLERS[sampler])


def schedule(sampler, steps, device, t_start=T - 1):
    """`time_grid`'s timesteps on `device`, alpha_bar at each, and at the next (1: the clean image)."""
    ts = time_grid(sampler, steps, t_start).to(device)
    alpha_bar = ALPHA_BAR.to(device)[ts]
    return ts, alpha_bar, torch.cat([alpha_bar[1:], torch.ones(1, device=device)])


@torch.no_grad()
def sample(model, n=64, sampler=None, steps=None, x=None, t_start=T - 1, generator=None,
           precision="auto", on_step=None, progress=True, landmarks=None, guidance=None):
    """Generate `n` images in [-1, 1] from noise `x` at step `t_start` (pure noise by default).

    The time grid runs from `t_start` to 0 (see `time_grid`), and each sampler ends with a step
    to the clean image; `sampler` and `steps` default to the model's own (see `sampler_of`).
    `on_step(i, x, x0)` sees every intermediate state. A landmark model takes `landmarks` ((9, 2)
    or (n, 9, 2) in [0, 1] face coordinates). `guidance`: see `denoise`; by default the model's own
    (see `guidance_of`).
    """
    sampler, steps, guidance = *sampler_of(model, sampler, steps), guidance_of(model, guidance)
    device, size, dtype = model_device(model), model.config["image_size"], autocast_dtype(model_device(model), precision)
    if x is None:
        x = torch.randn(n, 3, size, size, device=device, generator=generator)
    x = x.to(device, memory_format=torch.channels_last)
    landmarks = landmarks_for(model, landmarks, len(x), device)
    ts, alpha_bar, alpha_bar_next = schedule(sampler, steps, device, t_start)
    steps, x0_prev, h_prev = len(ts), None, None
    for i in tqdm(range(steps), desc=f"sampling ({sampler})", unit="step", disable=not progress, leave=False):
        ab, ab_next = alpha_bar[i], alpha_bar_next[i]
        x0, eps = denoise(model, x, ts[i], ab, dtype, landmarks, guidance)
        if i == steps - 1:
            x = x0  # every sampler's last step lands on its clean estimate (alpha_bar = 1)
        elif sampler == "ddpm":
            x = ddpm_step(x, x0, ab, ab_next, torch.randn(x.shape, device=device, generator=generator))
        elif sampler in ("ddim", "student"):
            x = ddim_step(x0, eps, ab_next)
        else:
            x, h_prev = dpmpp_2m_step(x, x0, x0_prev, ab, ab_next, h_prev)
            x0_prev = x0
        if on_step:
            on_step(i, x, x0)
    return x.clamp(-1, 1).contiguous()


def generate(model, n=64, steps=None, sampler=None, seed=None):
    """REPL helper: `n` new faces as a float tensor (n, 3, S, S) in [0, 1] on the CPU."""
    g = seeded_generator(model, torch.Generator().seed() if seed is None else seed)  # no seed: a random one
    return to_unit(sample(model.eval(), n, sampler, steps, generator=g))


def sdedit(model, faces, strength, generator, landmarks=None, steps=50):
    """Noise faces ([-1, 1]) to `strength` of the schedule and denoise them with DDIM (Meng et al.
    2022, SDEdit): low strength keeps the face, high strength keeps only its broad layout.
    Returns (noised, denoised)."""
    t = round(strength * (T - 1))
    faces = faces.to(model_device(model))
    x = q_sample(faces, ALPHA_BAR[t].to(faces.device), torch.randn(faces.shape, generator=generator, device=faces.device))
    return x, sample(model, len(faces), "ddim", max(2, round(steps * strength)), x=x, t_start=t,
                     landmarks=landmarks, guidance=1.0, progress=False)


def write_png(images, path, nrow=8):
    """A grid of images in [0, 1] as a PNG, written atomically."""
    atomic_write(path, lambda f: save_image(images, f, format="png", nrow=nrow, padding=1))


def write_gif(frames, path, ms_per_frame):
    """PIL images as a looping GIF, written atomically; `ms_per_frame`: one duration, or one per frame."""
    atomic_write(path, lambda f: frames[0].save(f, format="gif", save_all=True, append_images=frames[1:],
                                                duration=ms_per_frame, loop=0))


def png_bytes(picture):
    """A PIL image or a matplotlib figure as PNG bytes."""
    buffer = io.BytesIO()
    picture.save(buffer, format="png") if isinstance(picture, Image.Image) else \
        picture.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def captioned(grid, text):
    """A uint8 image grid (3, H, W) as a PIL image with the lines of `text` below it."""
    image = Image.new("RGB", (grid.shape[2], grid.shape[1] + 16 * (text.count("\n") + 1) + 4), "white")
    image.paste(TF.to_pil_image(grid))
    ImageDraw.Draw(image).multiline_text((3, grid.shape[1] + 2), text, "black", ImageFont.load_default(13), spacing=3)
    return image


def draw_landmarks(images, landmarks):
    """Images in [0, 1] with their landmarks (one set for all, or one per image) as red dots."""
    uint8 = images.mul(255).round().byte()
    marks = landmarks.expand(len(images), K, 2) * images.shape[-1]
    return torch.stack([draw_keypoints(im, m[None], colors="red", radius=1) for im, m in zip(uint8, marks)]) / 255


def plot_loss(history, path=None):
    """Per-step training loss (raw and smoothed) and the validation loss per epoch; written to `path`
    when given."""
    loss = np.asarray(history["loss"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(np.arange(1, len(loss) + 1), loss, color="tab:blue", alpha=0.25, lw=0.8, label="loss per step")
    if len(loss):
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(loss) + 1), smooth, color="tab:blue", lw=2, label=f"mean of {k} steps")
    if history["val"]:
        ax.plot(*zip(*history["val"]), "o-", color="tab:orange", label="validation (EMA weights)")
    ax.set(xlabel="step", ylabel="MSE (v-prediction)", yscale="log", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path:
        atomic_write(path, lambda f: f.write(png_bytes(fig)))
    return fig


def plot_reconstructions(model, images, path, strength=0.5, seed=0, landmarks=None):
    """Real faces, the same faces noised to `strength` of the schedule, and the model's DDIM
    reconstructions from there (`sdedit`)."""
    noisy, recon = sdedit(model, images, strength, seeded_generator(model, seed), landmarks)
    fig, axes = plt.subplots(3, 1, figsize=(1.1 * len(images), 4))
    titles = ("real", f"noised (t = {round(strength * (T - 1))})", "denoised")
    for ax, row, title in zip(axes, (images, noisy, recon), titles):
        ax.imshow(make_grid(to_unit(row), nrow=len(images), padding=1).permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda f: f.write(png_bytes(fig)))
    return fig


def plot_denoising(model, path, n=6, snapshots=8, sampler=None, steps=None, seed=0):
    """A few samples from noise to image: the state x at evenly spaced steps, then the result."""
    states = []
    sample(model, n, sampler, steps, generator=seeded_generator(model, seed), progress=False,
           on_step=lambda i, x, x0: states.append(x.clamp(-1, 1).cpu()))
    keep = np.linspace(0, len(states) - 1, snapshots).round().astype(int)
    # a row per sample, a column per snapshot
    write_png(to_unit(torch.stack([states[i] for i in keep], 1).flatten(0, 1)), path, nrow=len(keep))


def previewer(out, seed, size):
    """A run's `preview(model, history, caption)` (see `train`): the model's samples from
    PREVIEW_FACES noises fixed by `seed` (the same at every preview, and after a resume) as a uint8
    grid, and the PNG bytes of OUT/progress.png (the grid, captioned) and OUT/loss_curve.png."""
    noise = torch.randn(PREVIEW_FACES, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def preview(model, history, caption):
        steps = None if model.config["student_steps"] else PREVIEW_STEPS
        faces = sample(model, x=noise.clone(), steps=steps, progress=False)
        grid = make_grid(to_unit(faces), nrow=4, padding=1).mul(255).round().byte()
        curve = plot_loss(history)
        pictures = {out / "progress.png": png_bytes(captioned(grid, caption)), out / "loss_curve.png": png_bytes(curve)}
        plt.close(curve)
        return grid, pictures

    return preview


def write_timeline(history, path):
    """A run's preview frames (`history["frames"]`) as a GIF that holds its last frame, if it has any."""
    if frames := [captioned(grid, caption) for caption, grid in history["frames"]]:
        write_gif(frames, path, [600] * (len(frames) - 1) + [3000])


# ----------------------------------------------------------------------------------------------
# Editing real faces: DDIM inversion, interpolation, inpainting
# ----------------------------------------------------------------------------------------------

def face_of_photo(photo, model):
    """A photo and its .cat sidecar -> its face aligned at the model's size (uint8 (3, S, S)), its
    landmarks, and them again as the condition of a landmark model (else None)."""
    cat = sidecar(photo, required=True)
    try:
        face, marks = align_face(read_photo(photo), parse_cat_file(cat), model.config["image_size"], min_face=1)
    except BadItem as e:
        raise BadItem(f"{photo}: {e}") from None
    return face, marks, marks if model.config["landmarks"] else None


@torch.no_grad()
def invert(model, faces, steps=50, landmarks=None, precision="auto"):
    """DDIM inversion (Song et al. 2021, section 4.3): the deterministic sampler's steps run
    backwards, from clean faces to the noise that `sample(..., "ddim", steps, x=noise)` maps back
    onto them."""
    device, dtype = model_device(model), autocast_dtype(model_device(model), precision)
    ts, alpha_bar, _ = (v.flip(0) for v in schedule("ddim", steps, device))
    x = faces.to(device, memory_format=torch.channels_last)
    landmarks = landmarks_for(model, landmarks, len(x), device)
    for i in range(len(ts) - 1):
        x = ddim_step(*denoise(model, x, ts[i], alpha_bar[i], dtype, landmarks), alpha_bar[i + 1])  # (x0, eps)
    return x


def slerp(a, b, w):
    """Spherical interpolation: keeps the norm a Gaussian noise image has, unlike a straight line."""
    omega = torch.arccos(F.cosine_similarity(a.flatten(), b.flatten(), dim=0).clamp(-1, 1))
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


def morph(model, noise_a, noise_b, frames, sampler=None, steps=None, landmarks_a=None, landmarks_b=None, guidance=1.0):
    """`frames` samples from noise a to noise b: the noises slerped, the landmarks (if both) lerped."""
    w = torch.linspace(0, 1, frames)
    x = torch.stack([slerp(noise_a, noise_b, float(wi)) for wi in w])
    marks = None if landmarks_a is None or landmarks_b is None else \
        torch.lerp(landmarks_a, landmarks_b, w[:, None, None].to(landmarks_a))
    return sample(model, frames, sampler, steps, x=x, landmarks=marks, guidance=guidance, progress=False)


def interpolate(model, face_a, face_b, frames=8, steps=50, landmarks_a=None, landmarks_b=None):
    """`frames` faces from a to b: DDIM-invert both, then `morph` between their noises with DDIM."""
    noise = invert(model, torch.stack([face_a, face_b]), steps,
                   None if landmarks_a is None else torch.stack([landmarks_a, landmarks_b]))
    return morph(model, noise[0], noise[1], frames, "ddim", steps, landmarks_a, landmarks_b)


REGIONS = ("eyes", "ears", "mouth")  # the face regions that `region_mask` draws from landmarks


def region_mask(landmarks, size, region):
    """Boolean (size, size) mask of a face region from its landmarks: one of REGIONS, or a box
    "box:x0,y0,x1,y1" in face pixels."""
    canvas = Image.new("L", (size, size))
    draw = ImageDraw.Draw(canvas)
    p = [tuple(xy) for xy in (landmarks * size).tolist()]
    iod = math.dist(p[0], p[1])  # inter-ocular distance sets the scale
    if region.startswith("box:"):
        draw.rectangle([float(v) for v in region[4:].split(",")], fill=1)
    elif region in ("eyes", "mouth"):
        r = 0.3 * iod if region == "eyes" else 0.45 * iod
        for x, y in (p[:2] if region == "eyes" else p[2:3]):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=1)
    elif region == "ears":
        for ear in ([p[i] for i in ear] for ear in EARS):  # the triangle of its three points, with a margin
            draw.polygon(ear, fill=1)
            draw.line(ear + ear[:2], fill=1, width=max(1, round(0.3 * iod)), joint="curve")
    else:
        raise ValueError(f"unknown region {region!r}: use {', '.join(REGIONS)} or box:x0,y0,x1,y1")
    return torch.from_numpy(np.array(canvas) > 0)


@torch.no_grad()
def inpaint(model, face, mask, n=8, steps=50, resample=5, generator=None, landmarks=None, precision="auto",
            progress=True):
    """`n` versions of `face` ([-1, 1], (3, S, S)) regenerated where `mask` is True, identical
    elsewhere (RePaint, Lugmayr et al. 2022): a DDPM chain whose known part is the real face noised
    to each step, every step redone `resample` times by re-noising so the two parts agree."""
    device, dtype = model_device(model), autocast_dtype(model_device(model), precision)
    face, keep = face.to(device).expand(n, -1, -1, -1), ~mask.to(device)
    ts, alpha_bar, alpha_bar_next = schedule("ddpm", steps, device)
    landmarks = landmarks_for(model, landmarks, n, device)

    def noise():
        return torch.randn(face.shape, device=device, generator=generator)

    x = noise()
    for i in tqdm(range(len(ts)), desc="inpainting", unit="step", leave=False, disable=not progress):
        ab, ab_next, last = alpha_bar[i], alpha_bar_next[i], i == len(ts) - 1
        for r in range(1 if last else resample):
            x = torch.where(keep, q_sample(face, ab, noise()), x)
            x0, _ = denoise(model, x, ts[i], ab, dtype, landmarks)
            x = x0 if last else ddpm_step(x, x0, ab, ab_next, noise())
            if not last and r < resample - 1:  # back to step i: x_t ~ q(x_t | x_s)
                x = (ab / ab_next).sqrt() * x + (1 - ab / ab_next).sqrt() * noise()
    return torch.where(keep, face, x.clamp(-1, 1))


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    return (10 * torch.log10(4 / F.mse_loss(a.float().cpu(), b.float().cpu()))).item()


# ----------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------

def layout_stats(landmarks):
    """Mean (K, 2) and covariance (2K, 2K) of aligned landmarks: the distribution the studio's
    "random layout" draws from, stored in a landmark model's file (the faces are not)."""
    flat = landmarks.reshape(len(landmarks), 2 * K).double()
    return {"mean": flat.mean(0).reshape(K, 2).float(), "cov": torch.cov(flat.T).float()}


def model_path(name):
    """The file of a model `name`: as given when it ends in .pth (a model) or .pt (a training
    checkpoint, whose EMA weights load), else name + ".pth"."""
    path = Path(name)
    return path if path.suffix in (".pth", ".pt") else path.with_name(path.name + ".pth")


def save_model(model, name, layouts=None):
    """Write `name.pth` atomically: {"class": "DiffusionModel", "config": model.config, "state_dict": weights},
    with a landmark model's `layouts` (see `layout_stats`; cat_studio's `stored_layouts` reads them)."""
    path, state = model_path(name), {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save({"kind": "model", "class": type(model).__name__, "config": model.config,
                                             "state_dict": state, **({"layouts": layouts} if layouts else {})}, f))
    return path


def defaults_of(fn):
    """The default of each parameter of a function or class."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def checked_config(cls, config, path):
    """A model file's config, checked before anything is built from it: known keys, each of its
    default's type and within the class's LIMITS, and a model whose weights fit in the file (counted
    on the meta device, which allocates nothing), so that loading costs at most about the file's
    own size in memory."""
    defaults = defaults_of(cls)
    if not isinstance(config, dict) or not set(config) <= set(defaults):
        unknown = sorted(map(str, set(config) - set(defaults))) if isinstance(config, dict) else config
        raise CheckpointError(f"{path}: unknown model settings {unknown!r}")
    config = {**defaults, **config}
    for key, value in config.items():
        kind, (low, high) = type(defaults[key]), cls.LIMITS[key]
        values = value if isinstance(value, (list, tuple)) and kind is tuple else [value]
        ok = isinstance(value, (list, tuple)) == (kind is tuple) and len(values) > 0 and all(
            type(v) is (int if kind is tuple else kind) or (kind is float and type(v) is int) for v in values)
        if not ok or not all(low <= v <= high for v in values):
            raise CheckpointError(f"{path}: model setting {key}={value!r} is not valid")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    try:
        with torch.device("meta"):
            weights = sum(t.numel() * 4 for t in cls(**config).state_dict().values())  # saved as fp32
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the model settings do not describe a model ({e})") from None
    if weights > path.stat().st_size:
        raise CheckpointError(f"{path}: its settings describe a model of {weights / 1e6:.1f} MB of weights, "
                              f"more than the file's {path.stat().st_size / 1e6:.1f} MB")
    return config


def load_model(model, name, device="cpu"):
    """The model that `name.pth` (a saved model, or a training checkpoint's EMA weights) describes.

    Loaded into `model` when that was built the same way; else a new one, built from the file's
    config, is returned, with a line saying how it differs (`model`: an instance, a class, or None
    for a DiffusionModel), so `loaded_model = load_model(DiffusionModel(), name)` loads any size.
    """
    path = model_path(name)
    ckpt = read_checkpoint(path)
    cls = DiffusionModel if model is None else model if isinstance(model, type) else type(model)
    if ckpt.get("class", "DiffusionModel") != cls.__name__:
        raise CheckpointError(f"{path}: holds a {str(ckpt.get('class'))[:40]}, not a {cls.__name__}")
    config = checked_config(cls, ckpt.get("config" if ckpt["kind"] == "model" else "model_config"), path)
    loaded = cls(**config)  # loaded apart, so that a refused file leaves `model` as it was
    try:
        weights = ckpt["state_dict"] if ckpt["kind"] == "model" else {
            k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
        loaded.guide = cls(**config) if any(k.startswith("guide.") for k in weights) else None
        loaded.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        reason = str(e).splitlines()[1:2] or type(e).__name__
        raise CheckpointError(f"{path}: weights do not fit the model: {reason}") from None
    if isinstance(model, nn.Module):
        given = {**model.config, "student_steps": config["student_steps"]}  # it changes no weight: the file's
        if given == config:
            model.config.update(config)
            model.guide = getattr(loaded, "guide", None)
            model.load_state_dict(loaded.state_dict())
            loaded = model
        else:
            differs = ", ".join(f"{k}={v!r}" for k, v in config.items() if given.get(k) != v)
            print(f"{path}: a {cls.__name__} with {differs} (the model given differs): load_model returns it",
                  file=sys.stderr)
    return loaded.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Distillation: a student that samples in a few steps
# ----------------------------------------------------------------------------------------------

DISTILL_SUBSTEPS = 4  # a trained teacher's DPM-Solver++ steps per student step, spread over the ODE (see `teacher_grid`)
STUDENT_MAX = DiffusionModel.LIMITS["student_steps"][1]


def teacher_grid(teacher, steps):
    """Where the teacher steps within each of its student's `steps` steps: (steps, S + 1) tables of
    timesteps and alpha_bar, row k from the student's grid point k to point k + 1 (see `time_grid`,
    "student"; the last row ends on the clean image, alpha_bar = 1); a row of fewer steps repeats its
    end. A distilled teacher of r `steps` steps takes its own grid's r steps, the only times it knows
    (r = 2 is progressive distillation, Salimans & Ho 2022). A trained teacher takes DPM-Solver++ steps
    evenly spaced in log-SNR (from lambda = -6, as `time_grid`'s), DISTILL_SUBSTEPS x `steps` over the
    whole ODE (at least 16), at least 2 a row: for 4 steps 7, 2, 2, 6, whose 12-minute students scored
    SWD 21.2 against 26.2 for 7, 1, 1 and 4 coarser in the last row. A 1- or 2-step student's last row
    keeps DISTILL_SUBSTEPS coarse ones, which it learns better than finer ones (RESULTS.md, Distillation,
    "The finer substeps adopted", "Two steps straight from the teacher")."""
    native = teacher.config.get("student_steps", 0)
    grid = time_grid("student", steps).tolist() + [-1]  # -1: the clean image
    if native:
        r, own = native // steps, time_grid("student", native).tolist() + [-1]
        rows = [own[k * r:(k + 1) * r + 1] for k in range(steps)]
    else:
        lam = half_log_snr(ALPHA_BAR).clamp(min=-6)
        h, rows = (lam[0] - lam[-1]) / (DISTILL_SUBSTEPS * max(steps, 4)), []  # h: the log-SNR step
        for a, b in zip(grid, grid[1:]):  # b = -1: the last row, n steps from a to the clean image
            n = max(2, round(float((lam[max(b, 0)] - lam[a]) / h))) if b >= 0 or steps > 2 else DISTILL_SUBSTEPS
            rows.append(torch.unique_consecutive(log_snr_grid(a, max(b, 0), n + (b >= 0))).tolist() + [-1] * (b < 0))
    ts = torch.tensor([row + row[-1:] * (max(map(len, rows)) - len(row)) for row in rows])
    return ts, torch.cat([ALPHA_BAR, torch.ones(1)])[ts]


@torch.no_grad()
def teacher_target(teacher, z, k, steps, dtype, landmarks=None, guidance=GUIDANCE):
    """The target of a `steps`-step student at its `k`-th grid point z (one k per image): the
    teacher solves the probability-flow ODE to point k + 1 along `teacher_grid` (DDIM for a distilled
    teacher, DPM-Solver++(2M) for a trained one) to z'; the x~ whose one DDIM step from z lands on z'
    is x~ = (z' - (sigma'/sigma) z) / (alpha' - (sigma'/sigma) alpha) (Salimans & Ho 2022, algorithm
    2). Returns the v of x~ (v-MSE on it is the paper's SNR + 1 weighting). A landmark teacher steps
    with classifier-free `guidance` where faces have landmarks, so the student learns the guided map.
    """
    k = torch.as_tensor(k, device=z.device).expand(len(z))
    ts, abs_ = (table.to(z.device)[k] for table in teacher_grid(teacher, steps))
    abs_ = abs_[:, :, None, None, None]
    x, x0_prev, h_prev = z.clone(), torch.zeros_like(z), torch.zeros_like(abs_[:, 0])
    for j in range(int((ts[:, 1:] != ts[:, :-1]).sum(1).max())):  # the batch's longest row
        on = ts[:, j] != ts[:, j + 1]  # a row of fewer steps repeats its end: done
        ab, ab_next = abs_[on, j], abs_[on, j + 1]
        x0 = denoise(teacher, x[on], ts[on, j], ab, dtype, None if landmarks is None else landmarks[on], guidance)[0]
        first = j == 0 or teacher.config.get("student_steps")  # first order is DDIM: a distilled teacher's own steps
        x_next, h = dpmpp_2m_step(x[on], x0, None if first else x0_prev[on], ab, ab_next.clamp(max=1 - 1e-7), h_prev[on])
        x0_prev[on], h_prev[on] = x0, h
        x[on] = torch.where(ab_next < 1, x_next, x0)  # a step to the clean image lands on x0, as the samplers' do
    ab, ab_end = abs_[:, 0], abs_[:, -1]
    ratio = ((1 - ab_end) / (1 - ab)).sqrt()
    x_tilde = (x - ratio * z) / (ab_end.sqrt() - ratio * ab.sqrt())
    return (ab.sqrt() * z - x_tilde) / (1 - ab).sqrt()  # x = sqrt(ab) z - sqrt(1 - ab) v


CRITIC_NOISE = 200  # the critic's timesteps: low, where the detail the students miss is still visible


class Critic(nn.Module):
    """A discriminator of a student's images from real faces (adversarial distillation, ADD, Sauer et
    al. 2023), on a frozen diffusion model's features, as LADD (Sauer et al. 2024): `net`'s encoder
    sees the image noised to a timestep below CRITIC_NOISE, and a small head per resolution scores
    each place in its features. Its layers are spectrally normalised (Miyato et al. 2018), its inputs
    group-normalised, so its scores stay bounded while the student learns from them."""

    def __init__(self, net):
        super().__init__()
        self.net, sn = [net], nn.utils.parametrizations.spectral_norm  # a list: the frozen net is not its state
        widths = (net.config["base_channels"] * m for m in net.config["channel_mults"])  # as `encode`'s features
        self.heads = nn.ModuleList(nn.Sequential(group_norm(c, False), sn(nn.Conv2d(c, 64, 3, padding=1)), nn.LeakyReLU(0.2),
                                                 sn(nn.Conv2d(64, 1, 1))) for c in widths)

    def features(self, x):
        """The frozen network's features of images x (model range) at a random low noise level."""
        s = torch.randint(0, CRITIC_NOISE, (len(x),), device=x.device)
        return self.net[0].encode(q_sample(x, ALPHA_BAR.to(x.device)[s][:, None, None, None], torch.randn_like(x)), s)[0]

    def forward(self, features):
        """Scores, one map per resolution: high for a real face, low for a student's image."""
        return [head(f.float()) for head, f in zip(self.heads, features)]


def distillation_loss(teacher, steps, dtype, guidance, reuse=2, detail=16, detail_1_step=64, adversarial=0.2,
                      critic_warmup=60):
    """The student's loss (`diffusion_loss`'s signature): v-MSE against `teacher_target` at the
    student's step k = t steps / T, so the uniform t of `draw_noise` picks its steps uniformly.
    `guidance`: the teacher's (see `guidance_of`: a student teacher has it built in already).
    The teacher solves for every `reuse`-th image of a batch, and the loss takes these targets with
    those of the `reuse` - 1 training calls before (in `loss.state_dict()`, which checkpoints keep), so
    each teaches `reuse` steps at a fraction of the teacher's cost: at 2, 6-minute 4-step students took
    272-279 steps instead of 189-195 and scored level or better ("Each target for two steps").
    The loss adds `detail` (for one step `detail_1_step`) times the squared error's detail, what a
    half-size copy of the error loses: a student that matches its target minimises either loss, so the
    weight only puts first the 64 px detail where students trailed most (6-minute 4-step students: SWD
    23.1, 22.0 and 22.1 against 24.1, 24.0 and 23.3; "The detail weighted").
    A 2-step student's last step misses its target more than its first, so it takes 3/4 of the images
    (12-minute students: 21.4, 21.2 and 21.1 against 22.3 and 22.1 for half; "The last of two steps").
    A 1-step student's regression can only blur where the student cannot follow its target, so it
    also learns from a `Critic` of real faces on its teacher's features, at `adversarial` times the
    regression's gradient norm once the critic has had `critic_warmup` steps alone, its weight then
    ramping up over as many (6 + 6-minute students: 24.8, 22.4 and 23.4 against 29.6 and 31.1; "A critic
    for one step"; it lost for 2 steps). Sections of RESULTS.md, Distillation."""
    grid, state = time_grid("student", steps), dict(targets=[], updates=0, scale=None)
    critic = Critic(teacher).to(model_device(teacher)) if adversarial and steps == 1 else None
    critic_opt = critic and torch.optim.Adam(critic.parameters(), lr=2e-3, betas=(0.0, 0.99))

    def adversarial_term(rec, v, x, x_real):
        """The critic's own step on real faces and the student's images x (from its prediction v), then
        `adversarial` times its score of x, in proportion to the regression `rec` (VQGAN's adaptive
        weight, Esser et al. 2021: the ratio of their gradients' norms, taken every 25 steps), its
        weight ramping up over `critic_warmup` steps after the critic's first `critic_warmup`."""
        fake, real = critic.features(x), critic.features(x_real)  # real: no gradient, the net being frozen
        hinge = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean()  # hinge loss (Lim & Ye 2017), on the features alone
                    for r, f in zip(critic(real), critic([f.detach() for f in fake])))
        critic_opt.zero_grad(set_to_none=True)
        hinge.backward()
        critic_opt.step()
        state["updates"] += 1
        ramp = min(1.0, max(0.0, state["updates"] / critic_warmup - 1))
        if not ramp:
            return rec
        fool = -sum(score.mean() for score in critic(fake))
        if state["scale"] is None or state["updates"] % 25 == 0:
            g_rec, g_fool = (torch.autograd.grad(part, v, retain_graph=True)[0].norm() for part in (rec, fool))
            state["scale"] = float(g_rec / g_fool.clamp(min=1e-8))
        term = adversarial * ramp * state["scale"] * fool
        return rec + (term - term.detach())  # its value stays the regression's, for the loss curve

    def loss(model, x0, t, eps, alpha_bar, landmarks=None):
        real = x0
        x0, t, eps, landmarks = (v if v is None else v[::reuse] for v in (x0, t, eps, landmarks))
        k = t * steps // T if steps != 2 else (t * 4 // T).clamp(max=1)  # 2 steps: the last for 3/4 of the images
        t_k = grid.to(x0.device)[k]
        z = q_sample(x0, alpha_bar[t_k][:, None, None, None], eps)
        target = teacher_target(teacher, z, k, steps, dtype, landmarks, guidance)
        kept = [[z, t_k, landmarks, target], *state["targets"]]
        kept = [part for part in kept if part[0].shape[1:] == z.shape[1:]]  # none from a half-size start
        state["targets"] = kept[:reuse - 1] if model.training else kept[1:]  # a checkpoint's check leaves them
        z, t_k, landmarks, target = (v[0] if v[0] is None else torch.cat(v) for v in zip(*kept[:reuse]))
        v = model(z, t_k, landmarks).float()
        err = v - target
        fine = err - F.interpolate(F.avg_pool2d(err, 2), scale_factor=2)  # the detail a half-size copy loses
        rec = err.square().mean() + (detail_1_step if steps == 1 else detail) * fine.square().mean()
        if critic is None or not model.training:
            return rec
        n = len(x0)  # this call's images (a 1-step student's are its samples)
        return adversarial_term(rec, v, predict_x0_eps(v[:n], z[:n], alpha_bar[t_k[:n]][:, None, None, None])[0], real[:n])

    def load_state_dict(saved):
        state.update(updates=saved["updates"], scale=saved["scale"],
                     targets=[[v if v is None else v.to(model_device(teacher)) for v in kept] for kept in saved["targets"]])
        if critic:
            critic.load_state_dict(saved["critic"])
            critic_opt.load_state_dict(saved["critic_opt"])

    loss.load_state_dict, loss.critic = load_state_dict, critic
    loss.state_dict = lambda: dict(state, **dict(critic=critic.state_dict(), critic_opt=critic_opt.state_dict()) if critic else {})
    return loss


# distill's recipe, TrainConfig's otherwise: Muon at lr 2e-3 learns the students' 64 px detail faster than AdamW alone
# (SWD 25.7 and 26.2 against 29.1 and 29.2), and an EMA of about the last 20 steps beat 0.99's in five of five pairs
# (RESULTS.md, Distillation, "Muon in the student", "The student's EMA shortened"; for one step, "The 1-step student's
# learning rate, EMA and critic updates").
DISTILL = dict(epochs=4, batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=0.95, betas=(0.9, 0.999), muon=True,
               low_res_share=0.0)


def check_student_steps(teacher, steps, path="the teacher"):
    """Refuse (CheckpointError, naming `path`) a student of `steps` steps that this teacher cannot teach."""
    native = teacher.config["student_steps"]
    if native and (steps >= native or native % steps):
        choices = ", ".join(str(d) for d in range(1, native) if native % d == 0)
        raise CheckpointError(f"{path}: samples in {native} steps, so it distils into {choices} steps, not {steps}"
                              if choices else f"{path}: samples in 1 step already: it distils no further")
    if not 1 <= steps <= STUDENT_MAX:
        raise CheckpointError(f"{path}: a student takes 1 to {STUDENT_MAX} steps, not {steps}")


def distill(teacher, data, steps, cfg, out_dir, resume=None, settings=None, preview=None, objective=distillation_loss):
    """Distil `teacher` into a student that samples in `steps` steps: the student starts from the
    teacher's weights and learns, with `train`, one step of the "student" sampler for each of the
    teacher's ODE solves along `teacher_grid`. One round straight to `steps`: the fewer rounds,
    the less error compounds (TRACT, Berthelot et al. 2023), though a 1-step student learns best from
    a 4-step one ("Fewer than 4 steps"). This regression beat consistency training (ECT, Geng et al.
    2024) and consistency distillation for one step, SWD 57.2 against 91.7 and 88.3 in 12 minutes, and
    distribution matching (DMD, Yin et al. 2024) added to it lost too (RESULTS.md, Distillation, "one
    step by consistency", "Distribution matching for one step").
    `resume`: out_dir's checkpoint.pt; `preview`: as `train`'s; `objective`: a loss maker with
    `distillation_loss`'s signature. Returns the (EMA) student and its training history."""
    check_student_steps(teacher, steps)
    student = DiffusionModel(**{**teacher.config, "student_steps": steps})
    student.load_state_dict({k: v for k, v in teacher.state_dict().items() if not k.startswith("guide.")})
    teacher.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    loss = objective(teacher, steps, autocast_dtype(model_device(teacher), cfg.precision), guidance_of(teacher))
    return train(student, data, cfg, out_dir, resume=resume, settings=settings, preview=preview, objective=loss)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def in_range(kind, low, high, multiple=1):
    """An argparse type: a `kind` (int or float) from `low` to `high` (NaN is not), and for an int
    a multiple of `multiple`; the error names the range."""
    def parse(text):
        value = None
        with contextlib.suppress(ValueError):
            value = kind(text)
        if value is None or not low <= value <= high or kind is int and value % multiple:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} from {low:,} to {high:,}"
                                             + (f", a multiple of {multiple}" if multiple > 1 else "") + f", got {text}")
        return value
    return parse


positive_int = in_range(int, 1, 1_000_000)  # the largest count any option takes (epochs, steps, faces, batch size, ...)


def region_arg(text):
    box = re.fullmatch(r"box:" + ",".join([r"(-?[0-9]+(?:\.[0-9]*)?)"] * 4), text)
    if text in REGIONS or box and float(box[1]) < float(box[3]) and float(box[2]) < float(box[4]):
        return text
    raise argparse.ArgumentTypeError(f"must be {', '.join(REGIONS)} or box:x0,y0,x1,y1 with x0 < x1, y0 < y1; got {text}")


def device_arg(text):
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N")
    if text.startswith("cuda") and int(text[5:] or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    return text


def name_arg(text):
    if Path(text).name in ("", ".", "..") or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"must name a file, got {text!r}")
    return text


def existing(test, what):
    """An argparse type: a path for which `test` (Path.is_file or Path.is_dir) holds, else "no such `what`"."""
    def parse(text):
        if not test(Path(text)):
            raise argparse.ArgumentTypeError(f"no such {what}: {text}")
        return Path(text)
    return parse


existing_file, existing_dir = existing(Path.is_file, "file"), existing(Path.is_dir, "folder")


# The default model is too small to fill a GPU at the CPU's batch: batch 256, compiled, runs 9x the images a
# second on one H200, and width 64 reached 1.17x the floor in 3 H100 minutes where width 32 reached 1.32x (RESULTS.md).
GPU_RECIPE = dict(batch_size=256, compile=True, epochs=300, width=64)


def training_recipe(args, device):
    """Batch size, compiling, epochs and width for `train`: as given, else GPU_RECIPE's on CUDA (said
    in one line) and the defaults on a CPU. The recipe's epochs apply only to its own batch size."""
    width = args.width or defaults_of(DiffusionModel)["base_channels"]
    if args.batch_size is not None or device.type != "cuda":
        return args.batch_size or TrainConfig.batch_size, args.compile, args.epochs or TrainConfig.epochs, width
    epochs, width = args.epochs or GPU_RECIPE["epochs"], args.width or GPU_RECIPE["width"]
    print(f"on {device}: the GPU recipe, --batch-size {GPU_RECIPE['batch_size']} --compile --width {width}"
          + (f" --epochs {epochs}" if args.epochs is None and args.minutes is None else "")
          + " (give --batch-size to choose yourself)")
    return GPU_RECIPE["batch_size"], True, epochs, width


def record_outputs(checkpoint, paths):
    """Note in `checkpoint` the digest of each file the run wrote, so that a resumed run replaces
    those files only while they are the ones it wrote (see `claim_outputs`). Paths in the run's
    folder are kept relative to it, so that a moved or copied run folder still knows its files."""
    ckpt = read_checkpoint(checkpoint, want="training")
    ckpt["outputs"] = {run_relative(p, Path(checkpoint).parent): [file_digest(p)] for p in paths if Path(p).is_file()}
    atomic_write(checkpoint, lambda f: torch.save(ckpt, f))


RESUME_HINT = "pass --resume to continue that run, --overwrite to start over, or another --out/--name"


def settings_of(args, folder=None, **paths):
    """A resumable command's settings for its checkpoint (what --resume takes back as defaults):
    its options, with `paths` as `run_relative` paths (to `folder`, the checkpoint's, default OUT)."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k not in ("command", "resume", "overwrite", "run_settings", "run_outputs", "out")}
    return {**settings, **{k: run_relative(v, folder or args.out) for k, v in paths.items() if v is not None}}


TRAIN_OUTPUTS = ("checkpoint.pt", "loss_curve.png", "progress.png", "progress.gif", "reconstructions.png", "samples.png",
                 "denoising.png")


def config_of(args, recipe=None):
    """The TrainConfig of a command: each field its option sets (the option of the same name), else a
    resumed run's own (`args.run_config`: its RUN_SETTINGS that no option sets, as an earlier default),
    else `recipe`'s (a dict), else TrainConfig's default."""
    given = {f.name: v for f in dataclasses.fields(TrainConfig) if (v := getattr(args, f.name, None)) is not None}
    return TrainConfig(**{**(recipe or {}), **getattr(args, "run_config", {}), **given})


GUIDE_MAX_MINUTES = 10  # a guide helps most well short of its model: 10 minutes beat 15 for two 60-minute models


def train_guide(args, budget, path):
    """Autoguidance's guide for a new run without `--guide` (or one resumed in its guide): a run of the
    same settings for `budget` ({"minutes" or "epochs": its part}), trained first into `path` in
    OUT/guide, whose checkpoint keeps the whole run's settings, so that `--resume` goes on from it."""
    guide = argparse.Namespace(**{**vars(args), "out": path.parent, "name": str(path), "guide_share": 0, **budget})
    run_train(guide, {**settings_of(args, path.parent, data=args.data, name=model_path(args.name)), "guide_of_run": True})
    return path


def run_train(args, settings=None):
    rank, world = rank_and_world()
    args.batch_size, args.compile, args.epochs, args.width = training_recipe(args, pick_device(args.device))
    model_file, outputs = model_path(args.name), [args.out / f for f in TRAIN_OUTPUTS]
    claim_outputs(outputs + [model_file], args.overwrite, args.run_outputs, hint=RESUME_HINT)
    own, key = args.out / "guide" / "Guide.pth", "minutes" if args.minutes else "epochs"  # the budget the guide shares
    part = min(args.minutes * args.guide_share, GUIDE_MAX_MINUTES) if args.minutes else int(args.epochs * args.guide_share)
    if part and not args.guide and (args.resume is None or args.run_settings.get("guide_of_run")):
        args.guide, args.resume, args.run_outputs = train_guide(args, {key: part}, own), None, {}
    rest = {key: getattr(args, key) - part} if part and args.guide and Path(args.guide).resolve() == own.resolve() else {}
    torch.manual_seed(args.seed)
    if rank > 0:
        barrier()  # rank 0 draws any synthetic set, builds the face cache and writes any guide of its own first
    data_dir = resolve_data(args.data or Path("data"), args.synthetic_count, args.seed, default=args.data is None)
    train_set = CatDataset(data_dir, args.image_size, split="train", quiet=rank > 0)
    val_set = CatDataset(data_dir, args.image_size, split="val", quiet=True)
    if rank == 0:
        barrier()
        print(f"{len(train_set)} training and {len(val_set)} validation faces from {data_dir}"
              + (f"; {world} processes, {args.batch_size // world} faces each per step" if world > 1 else "")
              + (f"; first the guide (autoguidance), {getattr(args, key):g} {key}, in {args.out}" if settings else ""))
    if len(train_set) == 0 or len(val_set) == 0:
        train_set, val_set = CatDataset(data_dir, args.image_size, quiet=True), None
        if rank == 0:
            print("too few photo ids to hold some out: training on all faces, no validation loss")
    model = DiffusionModel(args.image_size, base_channels=args.width, blocks=args.blocks, landmarks=args.landmarks)
    guide = load_model(None, args.guide) if args.guide else None
    if guide and guide.config != model.config:
        raise CheckpointError(f"{args.guide}: a guide is a model of the same settings (trained for less time), not one "
                              f"with " + ", ".join(f"{k}={v!r}" for k, v in guide.config.items() if model.config[k] != v))
    settings = settings or settings_of(args, data=data_dir, name=model_file, guide=args.guide)
    ema, history = train(model, train_set, dataclasses.replace(config_of(args), **rest), args.out, val_set,
                         resume=args.resume, settings=settings, preview=previewer(args.out, args.seed, args.image_size))
    if rank > 0:
        return
    write_timeline(history, args.out / "progress.gif")
    if guide:
        ema.guide, guide.guide = guide.to(model_device(ema)), None  # a guide's own guide is not kept
    path = save_model(ema, model_file, layout_stats(train_set.landmarks) if args.landmarks else None)
    print(f"saved {path}")
    plot_loss(history, args.out / "loss_curve.png")
    shown = val_set or train_set
    plot_reconstructions(ema, to_model_range(shown.faces[:8]), args.out / "reconstructions.png",
                         landmarks=shown.landmarks[:8] if args.landmarks else None)
    write_png(to_unit(sample(ema, 64, generator=seeded_generator(ema, args.seed))), args.out / "samples.png", nrow=8)
    plot_denoising(ema, args.out / "denoising.png")
    record_outputs(args.out / "checkpoint.pt", [model_file, *outputs[1:]])
    print("wrote " + ", ".join(map(str, outputs[1:])))
    if HAS_DISPLAY:
        plt.show()
    plt.close("all")


def open_model(args, *outputs):
    """A command's model (`--model` on `--device`), once its `outputs` (file names in `--out`) are
    known to be writable without replacing anything; returns the model and the outputs' paths."""
    paths = [args.out / name for name in outputs]
    claim_outputs(paths, args.overwrite)
    return load_model(None, args.model, pick_device(args.device)), paths


def run_distill(args):
    torch.manual_seed(args.seed)
    teacher = load_model(None, args.model, pick_device(args.device))
    layouts = read_checkpoint(model_path(args.model)).get("layouts")  # the studio checks them when it loads
    check_student_steps(teacher, args.steps, args.model)
    model_file = model_path(args.name)
    outputs = [args.out / f for f in ("checkpoint.pt", "steps.png", "loss_curve.png", "progress.png", "progress.gif")]
    claim_outputs(outputs + [model_file], args.overwrite, args.run_outputs, hint=RESUME_HINT)
    fingerprint = tensors_fingerprint(v.float() for v in teacher.state_dict().values())
    if args.resume and args.run_settings.get("teacher") != fingerprint:
        raise CheckpointError(f"{args.resume}: that run distils another teacher than {args.model}")
    train_set = CatDataset(args.data, teacher.config["image_size"], split="train")
    if len(train_set) == 0:
        raise SystemExit(f"error: --data {args.data}: no faces to distil on (the teacher's training data)")
    settings = dict(settings_of(args, model=args.model, data=args.data, name=model_file), teacher=fingerprint)
    student, history = distill(teacher, train_set, args.steps, config_of(args, DISTILL), args.out, resume=args.resume,
                               settings=settings, preview=previewer(args.out, args.seed, teacher.config["image_size"]))
    path = save_model(student, model_file, layouts)
    write_timeline(history, args.out / "progress.gif")
    print(f"saved {path}: samples in {args.steps} steps (sample, eval and generate() use them by default)")
    noise = torch.randn(8, 3, *[teacher.config["image_size"]] * 2, device=model_device(teacher),
                        generator=seeded_generator(teacher, args.seed))
    own = sampler_of(teacher)
    rows = [sample(m, 8, sampler, steps, x=noise.clone(), progress=False)  # the same noises, row by row
            for m, sampler, steps in ((teacher, *own), (teacher, own[0], args.steps), (student, None, None))]
    write_png(to_unit(torch.cat(rows)), args.out / "steps.png", nrow=8)
    record_outputs(args.out / "checkpoint.pt", [model_file, *outputs[1:]])
    print(f"wrote {args.out / 'steps.png'}: rows from the teacher in {own[1]} and in {args.steps} steps of its "
          f"{own[0]}, then the student in {args.steps}")


def run_sample(args):
    layout = args.landmarks or args.like
    model, (grid, *singles) = open_model(args, "samples.png", *(f"sample_{i:04d}.png" for i in range(args.n)),
                                         *(["samples_landmarks.png"] if layout else []))
    marked, marks = (singles.pop() if layout else None), None
    if layout:
        if not model.config["landmarks"]:
            raise CheckpointError(f"{args.model}: trained without landmarks, so it takes no --landmarks/--like")
        cat = layout if args.landmarks else sidecar(layout, required=True)
        try:
            marks = align_landmarks(parse_cat_file(cat))
        except BadItem as e:
            raise BadItem(f"{cat}: {e}") from None
    images = to_unit(sample(model, args.n, args.sampler, args.steps, generator=seeded_generator(model, args.seed),
                            precision=args.precision, landmarks=marks, guidance=guidance_of(model, args.guidance)))
    write_png(images, grid, nrow=8)
    for image, path in zip(images, singles):
        write_png(image, path)
    if marked:
        write_png(draw_landmarks(images, marks), marked, nrow=8)
    print(f"wrote {grid}{f' and {marked}' if marked else ''} and {len(images)} single images in {args.out}")


def run_reconstruct(args):
    model, (path,) = open_model(args, "reconstruct.png")
    face, _, cond = face_of_photo(args.photo, model)
    x0 = to_model_range(face)[None].to(model_device(model))
    if args.invert:
        noise = invert(model, x0, args.steps, cond, args.precision)
        result = sample(model, 1, "ddim", args.steps, x=noise, landmarks=cond, guidance=1.0, precision=args.precision,
                        progress=False)
        what = f"DDIM inversion and back, {args.steps} steps"
    else:
        noise, result = sdedit(model, x0, args.strength, seeded_generator(model, args.seed), cond, args.steps)
        what = f"SDEdit from strength {args.strength}"
    write_png(to_unit(torch.cat([x0, noise.clamp(-1, 1), result])), path, nrow=3)
    print(f"{args.photo}: {what}: PSNR {psnr(result, x0):.2f} dB; wrote {path} (face, noise, result)")


def run_interpolate(args):
    model, (strip, gif) = open_model(args, "interpolation.png", "interpolation.gif")
    (face_a, _, cond_a), (face_b, _, cond_b) = (face_of_photo(p, model) for p in args.photos)
    faces = interpolate(model, to_model_range(face_a), to_model_range(face_b), args.frames, args.steps, cond_a, cond_b)
    write_png(to_unit(faces), strip, nrow=args.frames)
    frames = [TF.to_pil_image(face) for face in to_unit(faces)]
    write_gif(frames + frames[-2:0:-1], gif, 150)  # forwards, then back
    print(f"wrote {strip} and {gif}")


def run_inpaint(args):
    model, (path,) = open_model(args, "inpaint.png")
    face, marks, cond = face_of_photo(args.photo, model)
    mask = region_mask(marks, model.config["image_size"], args.region)
    x0 = to_model_range(face)
    results = inpaint(model, x0, mask, args.n, args.steps, generator=seeded_generator(model, args.seed), landmarks=cond,
                      precision=args.precision)
    shown = torch.cat([x0[None], torch.where(mask, 0.0, x0)[None], results.cpu()])
    write_png(to_unit(shown), path, nrow=len(shown))
    print(f"wrote {path} (face, the region to regenerate in grey, {args.n} versions)")


COMMANDS = {"train": run_train, "distill": run_distill, "sample": run_sample, "reconstruct": run_reconstruct,
            "interpolate": run_interpolate, "inpaint": run_inpaint}
# Commands of the satellites beside this file, which consume a trained model: (module, description).
SATELLITES = {"eval": ("cat_eval", "measure sample quality against held-out faces"),
              "fit-landmarks": ("cat_eval", "train the landmark net that eval uses to check landmark-guided samples"),
              "bench": ("cat_eval", "measure training and sampling speed"),
              "serve": ("cat_studio", "a local web page to pose the landmarks, generate, inpaint and interpolate")}


class Parser(argparse.ArgumentParser):
    """argparse with each error on one line: what is wrong, and where the options are listed;
    `raise_error(message)`, when given, makes the exception to raise instead."""

    def __init__(self, *args, raise_error=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.raise_error = raise_error

    def error(self, message):
        if self.raise_error:
            raise self.raise_error(message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def shared_options():
    """Options that several commands take, each written once (argparse parent parsers), with the
    defaults of the code they feed."""
    model, cfg, limits = defaults_of(DiffusionModel), TrainConfig, DiffusionModel.LIMITS
    groups = {g: Parser(add_help=False) for g in ("common", "size", "width", "batch", "checkpoints", "model_file",
                                                  "sampling", "json_out")}
    common, size, width, batch, checkpoints, model_file, sampling, json_out = groups.values()
    common.add_argument("--device", type=device_arg, default=cfg.device, help="auto (CUDA when present), cpu, cuda, cuda:1")
    common.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=cfg.precision,
                        help="auto: bf16 autocast on CUDA and on CPUs with AMX/AVX512-BF16, else fp32")
    common.add_argument("--seed", type=in_range(int, 0, 2 ** 32 - 1), default=cfg.seed, help="the same seed, the same run")
    common.add_argument("--overwrite", action="store_true", help="replace files that exist (else the command refuses)")
    size.add_argument("--image-size", type=in_range(int, *limits["image_size"], multiple=8), default=model["image_size"],
                      help="face size in pixels")
    width.add_argument("--width", type=in_range(int, *limits["base_channels"]), default=None, help=f"base channels "
                       f"of the model (default {model['base_channels']}; train on a GPU {GPU_RECIPE['width']})")
    width.add_argument("--blocks", type=in_range(int, *limits["blocks"]), default=model["blocks"],
                       help="residual blocks per stage")
    batch.add_argument("--batch-size", type=positive_int, default=None,
                       help=f"faces a step (all processes), half in train's half-size steps (default {cfg.batch_size};"
                            f" train on a GPU {GPU_RECIPE['batch_size']}, compiled; distill {DISTILL['batch_size']})")
    model_file.add_argument("--model", type=existing_file, default=Path("DiffusionModel.pth"), help="model file")
    sampling.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                          help="DDPM, DDIM, DPM-Solver++(2M), or a student's own grid (default: a student's, else dpm++)")
    sampling.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: a student's own, "
                          "else " + ", ".join(f"{k} {v}" for k, v in SAMPLERS.items() if k != "student") + ")")
    sampling.add_argument("--guidance", type=in_range(float, 0.0, MAX_GUIDANCE), default=None,
                          help=f"toward the landmarks, else away from the model's guide (1: none; default {GUIDANCE})")
    json_out.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    checkpoints.add_argument("--checkpoint-every", type=positive_int, default=cfg.checkpoint_every,
                             help="steps between checkpoints (and after an epoch a minute after the last)")
    checkpoints.add_argument("--preview-every", type=in_range(float, 0, MAX_MINUTES), default=cfg.preview_every,
                             metavar="MINUTES", help="minutes between previews: OUT/progress.png and loss_curve.png, "
                             "and progress.gif at the end (default a tenth of the run; 0: none)")
    return groups


def build_parser(wanted=None, resumed=None, error=None):
    """The command line, with the options of command `wanted` (a satellite's are added only for it);
    `resumed`, (command, a checkpoint's settings), become that command's defaults; `error(message)`
    makes the exception a bad option raises (default: exit with the message)."""
    parser = Parser(prog="cat_diffusion.py", description="Train a diffusion model on cat faces and sample "
                    "from it. With no command, `train` runs.", raise_error=error)
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join([*COMMANDS, *SATELLITES]) + "}")
    parser.commands, groups = commands.choices, shared_options()  # {name: its parser}, {name: a group of options}
    common, size, width, batch, checkpoints, model_file, sampling, json_out = groups.values()
    cfg, minutes, lr = TrainConfig, in_range(float, 0.01, MAX_MINUTES), in_range(float, 1e-8, 1e3)

    def command(name, description, *parents):
        return commands.add_parser(name, help=description, description=description, parents=[*parents, common],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter, raise_error=error)

    tr = command("train", "train on a CAT-format folder (the default command)", size, width, batch, checkpoints)
    tr.add_argument("--data", type=existing_dir, default=None, help="folder of CAT photos with .cat files, at any depth "
                    "(default data/; when it holds none, synthetic cats are drawn into data/synthetic/)")
    tr.add_argument("--epochs", type=positive_int, default=None,
                    help=f"passes over the faces (default {cfg.epochs}; {GPU_RECIPE['epochs']} with the GPU recipe)")
    tr.add_argument("--minutes", type=minutes, default=cfg.minutes, help="train this long instead: the steps are "
                    f"planned from the speed over the first {TIMED_SHARE:.0%}%, and the schedule ends on time")
    tr.add_argument("--lr", type=lr, default=cfg.lr, help="peak learning rate (Muon's scaled per weight)")
    tr.add_argument("--warmup-steps", type=positive_int, default=cfg.warmup_steps,
                    help="steps of linear learning-rate warm-up (then cosine decay to 10%%)")
    tr.add_argument("--ema-decay", type=in_range(float, 0.0, 0.99999), default=cfg.ema_decay,
                    help="EMA decay of the sampling weights (warmed up from 0.1)")
    tr.add_argument("--no-flip", dest="augment", action="store_false", help="no horizontal-flip augmentation")
    tr.add_argument("--no-landmarks", dest="landmarks", action="store_false", help="train without the "
                    f"{len(LANDMARKS)} landmarks (the model then takes none: no sample --landmarks/--like or --guidance)")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model (a minute; pays off on GPUs)")
    tr.add_argument("--grad-accum", type=positive_int, default=cfg.grad_accum, metavar="K",
                    help="split each batch into K micro-batches (same result, less memory)")
    tr.add_argument("--synthetic-count", type=positive_int, default=defaults_of(write_synthetic_dataset)["count"],
                    help="photos in the synthetic set drawn when there is no data")
    tr.add_argument("--name", type=name_arg, default="DiffusionModel", help="the final weights go to NAME.pth")
    tr.add_argument("--guide", type=existing_file, metavar="MODEL.pth", help="a shorter run's model: autoguidance")
    # A quarter for the guide: at 12 minutes 9 + 3 scored SWD 16.6, 19.8 and 18.9 (three seeds) against 24.1-25.8
    # unguided (RESULTS.md, Autoguidance, "In `train` itself"; longer runs: GUIDE_MAX_MINUTES).
    tr.add_argument("--guide-share", type=in_range(float, 0.0, 0.5), default=0.25, metavar="SHARE", help="without --guide,"
                    f" the share of --minutes (<= {GUIDE_MAX_MINUTES}) or --epochs to train a guide in OUT/guide (0: none)")
    di = command("distill", "distil a trained model into a student that samples in a few steps", model_file, batch,
                 checkpoints)
    di.add_argument("--data", type=existing_dir, default=Path("data"), help="the faces the teacher was trained on")
    di.add_argument("--steps", type=positive_int, default=4,
                    help=f"the student's steps: 1 to {STUDENT_MAX}, or for a student a divisor of its own")
    di.add_argument("--epochs", type=positive_int, default=DISTILL["epochs"], help="passes over the faces")
    di.add_argument("--minutes", type=minutes, default=None, help="distil this long instead (as train's --minutes)")
    di.add_argument("--lr", type=lr, default=DISTILL["lr"], help="peak learning rate (Muon's scaled per weight)")
    di.add_argument("--name", type=name_arg, default="DistilledModel", help="the student goes to NAME.pth")
    for p in (tr, di):
        p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH", help="continue the run of a "
                       "checkpoint (default OUT/checkpoint.pt) with its settings; more --epochs or --minutes extend it")
    sa = command("sample", "generate faces with a trained model", model_file, sampling)
    sa.add_argument("-n", type=positive_int, default=64, help="number of faces")
    layout = sa.add_mutually_exclusive_group()
    layout.add_argument("--landmarks", type=existing_file, metavar="FILE.cat",
                        help="cats with the face layout of a .cat file")
    layout.add_argument("--like", type=existing_file, metavar="PHOTO", help="cats with the face layout of PHOTO")
    rc = command("reconstruct", "noise a real face and denoise it (SDEdit), or invert it", model_file)
    rc.add_argument("photo", type=existing_file, help="a photo with its .cat file")
    rc.add_argument("--strength", type=in_range(float, 0.001, 1.0), default=0.5, help="how far to noise (1: all the way)")
    rc.add_argument("--invert", action="store_true", help="DDIM inversion instead, and back")
    ip = command("interpolate", "morph between two real faces through the model's noise space", model_file)
    ip.add_argument("photos", type=existing_file, nargs=2, metavar="PHOTO", help="two photos with .cat files")
    ip.add_argument("--frames", type=positive_int, default=8, help="faces in the strip and the GIF")
    inp = command("inpaint", "regenerate a region of a real face, keeping the rest exactly", model_file)
    inp.add_argument("photo", type=existing_file, help="a photo with its .cat file")
    inp.add_argument("--region", required=True, type=region_arg, metavar="REGION",
                     help=f"{', '.join(REGIONS)}, or box:x0,y0,x1,y1 in the aligned face's pixels")
    inp.add_argument("-n", type=positive_int, default=8, help="number of versions")
    for p in (rc, ip):
        p.add_argument("--steps", type=positive_int, default=100, help="DDIM steps: more invert more exactly")
    inp.add_argument("--steps", type=positive_int, default=defaults_of(inpaint)["steps"], help="DDPM steps")
    for p, folder in ((tr, "outputs"), (di, "outputs/distill"), (sa, "outputs/sample"), (rc, "outputs/reconstruct"),
                      (ip, "outputs/interpolate"), (inp, "outputs/inpaint")):
        p.add_argument("--out", type=Path, default=Path(folder), help="folder for the pictures (and checkpoints)")
    for name, (module, description) in SATELLITES.items():  # imported only to parse their own command
        if name == wanted:
            try:
                satellite = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
                parser.error(f"{name} needs {module}.py beside cat_diffusion.py")
            satellite.add_arguments(name, command(name, description, *(groups[g] for g in satellite.OPTIONS[name])))
        else:
            command(name, description)
    if resumed:
        parser.commands[resumed[0]].set_defaults(**resumed[1])
    return parser


def saved_argv(parser, command, saved):
    """A checkpoint's saved settings as the command line that gives them, so that they are checked
    as typed options are."""
    argv = []
    for action in parser.commands[command]._actions:
        value = saved.get(action.dest)
        if not action.option_strings or value is None or action.dest in ("resume", "overwrite", "out"):
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            argv += [action.option_strings[0]] if value is action.const else []
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def parse_args(argv):
    """Parse the command line. `train --resume` and `distill --resume` take the checkpoint's settings
    as their defaults (with OUT its folder), so that only what changes needs saying; the settings
    are parsed as options, so a crafted checkpoint gets the same checks as a typed command line."""
    argv = list(argv) if argv and argv[0] in (*COMMANDS, *SATELLITES, "-h", "--help") else ["train", *argv]
    parser = build_parser(argv[0])
    args = parser.parse_args(argv)
    args.run_settings, args.run_outputs, args.run_config = None, {}, {}
    if args.command in ("train", "distill") and args.resume is not None:
        # by default the run's checkpoint, else its guide's (a run stopped while it trained its guide)
        resume = Path(args.resume or max((args.out / "checkpoint.pt", args.out / "guide" / "checkpoint.pt"), key=Path.is_file))
        if not resume.is_file():
            parser.error(f"argument --resume: no such file: {resume}")
        ckpt = read_checkpoint(resume, want="training")
        saved, outputs = ckpt.get("settings"), ckpt.get("outputs", {})
        if isinstance(outputs, dict):  # an output's digests: a list (an older checkpoint kept one string)
            outputs = {k: [v] if isinstance(v, str) else v for k, v in outputs.items()}
        if not isinstance(saved, dict) or not isinstance(outputs, dict) or not all(isinstance(k, str) and isinstance(
                v, list) and all(isinstance(d, str) for d in v) for k, v in outputs.items()):
            raise CheckpointError(f"{resume}: damaged run settings")
        if ("teacher" in saved) != (args.command == "distill"):
            other = "distill" if "teacher" in saved else "train"
            raise CheckpointError(f"{resume}: a checkpoint of a {other} run: resume it with {other} --resume")
        checker = build_parser(args.command, error=lambda message: CheckpointError(f"{resume}: saved setting {message}"))
        folder = resume.parent.resolve()
        saved = {k: str(folder / v) if k in ("data", "name", "model", "guide") and isinstance(v, str) else v
                 for k, v in saved.items()}
        defaults = vars(checker.parse_args([args.command, *saved_argv(checker, args.command, saved)]))
        out = resume.parents[1 if saved.get("guide_of_run") else 0]  # a guide's run sits in its run's folder
        args = build_parser(args.command, (args.command, {**defaults, "out": out})).parse_args(argv)
        args.resume, args.run_settings = resume, saved
        recipe = ckpt["train_config"] if isinstance(ckpt.get("train_config"), dict) else {}
        args.run_config = {k: v for k, v in recipe.items() if k in RUN_SETTINGS and type(v) is type(getattr(TrainConfig, k))}
        args.run_outputs = {**{str(folder / k): v for k, v in outputs.items()},
                            str(resume.resolve()): [file_digest(resume)]}
    return args


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 prints escaped, not as a crash
        getattr(stream, "reconfigure", lambda **_: None)(errors="backslashreplace")
    distributed, where = int(os.environ.get("WORLD_SIZE", "1")) > 1, ""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if distributed:  # under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, Gloo on CPUs)
            if args.command != "train":
                raise SystemExit(f"error: only train runs under torchrun, not {args.command}")
            device = pick_device(args.device)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
            where = f"rank {dist.get_rank()} of {dist.get_world_size()}: "
        run = COMMANDS.get(args.command) or importlib.import_module(SATELLITES[args.command][0]).COMMANDS[args.command]
        run(args)
    except (CheckpointError, TrainingError, BadItem, Refused) as e:
        raise SystemExit(f"error: {where}{e}") from None
    except OSError as e:  # a full disk, a read-only folder: say so in one line, naming the file
        path = f"{printable(e.filename)}: " if e.filename else ""
        raise SystemExit(f"error: {where}{path}{e.strerror or e}") from None
    except Exception as e:
        if not distributed:
            raise
        traceback.print_exc()  # torchrun stops the other ranks when this one exits: say which failed
        raise SystemExit(f"error: {where}{type(e).__name__}: {e}") from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    import cat_diffusion  # this file again as a module, the one the satellites import: one copy of each class
    cat_diffusion.main()
