"""Data: .cat files parsed strictly, faces aligned the established way with their landmarks (also
under rotation and flips), the split by photo id, the face cache (reused, rebuilt, never trusted),
and messy folders reported one reason at a time."""
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cat_diffusion as cd
from helpers import SHARED_DATA, needs_shared, write_cat

S = 32


def synthetic_photo(seed=0):
    photo, marks = cd.draw_synthetic_cat(np.random.default_rng(seed))
    return photo, marks.astype(np.float32)


def as_tensor(photo):
    return torch.from_numpy(np.array(photo.convert("RGB"))).permute(2, 0, 1).contiguous()


def rotate_photo(photo, marks, degrees):
    """Rotate a photo counter-clockwise about its centre; landmarks move with it."""
    w, h = photo.size
    rotated = photo.rotate(degrees, resample=Image.BICUBIC, center=(w / 2, h / 2))
    a, c = math.radians(degrees), np.array([w / 2, h / 2])
    q = marks - c  # image y points down: a counter-clockwise turn on screen is this matrix
    moved = np.stack([q[:, 0] * math.cos(a) + q[:, 1] * math.sin(a),
                      -q[:, 0] * math.sin(a) + q[:, 1] * math.cos(a)], 1) + c
    return rotated, moved.astype(np.float32)


# ---- .cat parsing ------------------------------------------------------------------------------

def test_cat_file_parses_dataset_format_with_negative_points(tmp_path):
    f = tmp_path / "a.jpg.cat"
    f.write_text("9 175 160 239 162 199 199 149 121 137 78 166 93 281 101 312 96 296 -133 ")
    points = cd.parse_cat_file(f)
    assert points.shape == (9, 2) and points.dtype == np.float32
    assert points[0].tolist() == [175, 160] and points[8].tolist() == [296, -133]


@pytest.mark.parametrize("text, reason", [
    ("", "empty .cat file"),
    ("   ", "empty .cat file"),
    ("9 1 2 3 four 5 6 7 8 9 10 11 12 13 14 15 16 17 18", "non-numeric .cat contents"),
    ("9 1 2 3 4 5 6", ".cat point count does not match its numbers"),
    ("3 1 2 3 4 5 6", ".cat file has fewer than 9 points"),
    ("9 nan 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18", "non-numeric .cat contents"),
])
def test_malformed_cat_file_is_a_bad_item_with_its_reason(tmp_path, text, reason):
    f = tmp_path / "a.jpg.cat"
    f.write_text(text)
    with pytest.raises(cd.BadItem, match=reason.replace(".", r"\.")):
        cd.parse_cat_file(f)


def test_photos_are_found_at_any_depth_with_either_sidecar_name(tmp_path):
    photo, marks = synthetic_photo()
    for rel in ["CAT_00/00000001_000.jpg", "CAT_01/sub/00000002_000.JPEG", "flat.png"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        photo.save(p, format="PNG" if p.suffix == ".png" else "JPEG")
    write_cat(tmp_path / "CAT_00/00000001_000.jpg.cat", marks)
    write_cat(tmp_path / "CAT_01/sub/00000002_000.cat", marks)  # the X.cat spelling
    (tmp_path / "notes.txt").write_text("not a photo")
    pairs, missing, unnamed = cd.find_annotated_photos(tmp_path)
    assert [p.name for p, _ in pairs] == ["00000001_000.jpg", "00000002_000.JPEG"]
    assert [p.name for p in missing] == ["flat.png"] and unnamed == []


# ---- alignment geometry ---------------------------------------------------------------------

def check_aligned(marks, size, tol=1.0):
    """Landmarks in face coordinates sit where the recipe puts them, within `tol` pixels at `size`."""
    marks = marks * size
    left_eye, right_eye = marks[0], marks[1]
    assert abs(left_eye[1] - right_eye[1]) < tol, "eyes are not level"
    mid = (left_eye + right_eye) / 2
    assert abs(mid[0] - 0.5 * size) < tol and abs(mid[1] - 0.4 * size) < tol, "eye midpoint is off (0.5, 0.4)"
    assert abs((marks[8, 0] - marks[3, 0]) - size) < 2 * tol, "box is not as wide as the outer ear bases"


@pytest.mark.parametrize("seed", range(6))
def test_alignment_levels_eyes_and_places_them_at_half_and_four_tenths(seed):
    photo, marks = synthetic_photo(seed)
    face, aligned = cd.align_face(as_tensor(photo), marks, 64)
    assert face.shape == (3, 64, 64) and face.dtype == torch.uint8
    assert aligned.shape == (9, 2) and aligned.dtype == torch.float32
    check_aligned(aligned.numpy(), 64)


@pytest.mark.parametrize("degrees", [-40, 25, 90])
def test_photo_rotated_by_known_angle_comes_back_level_and_alike(degrees):
    photo, marks = synthetic_photo(3)
    big = Image.new("RGB", (512, 512))  # room to rotate without cutting the face
    big.paste(photo, (128, 160))
    marks = marks + np.array([128, 160], dtype=np.float32)
    turned, turned_marks = rotate_photo(big, marks, degrees)
    face_a, marks_a = cd.align_face(as_tensor(big), marks, 64)
    face_b, marks_b = cd.align_face(as_tensor(turned), turned_marks, 64)
    check_aligned(marks_b.numpy(), 64)
    assert torch.allclose(marks_a, marks_b, atol=1.0 / 64)
    assert (face_a.float() - face_b.float()).abs().mean() < 12  # same face, resampled twice


def test_box_leaving_the_photo_is_padded_not_shrunk():
    photo, marks = synthetic_photo(2)
    marks = marks - marks[0] + np.array([5, 5], dtype=np.float32)  # left eye in the corner
    face, aligned = cd.align_face(as_tensor(photo), marks, 48)
    assert face.shape == (3, 48, 48)
    check_aligned(aligned.numpy(), 48)
    assert face.float().std() > 5  # reflected photo content, not a constant fill


def test_degenerate_and_tiny_faces_are_rejected_with_reasons():
    photo, marks = synthetic_photo()
    same_eyes = marks.copy()
    same_eyes[1] = same_eyes[0]
    with pytest.raises(cd.BadItem, match="eyes on the same point"):
        cd.align_face(as_tensor(photo), same_eyes, S)
    tiny = (marks - marks[0]) * 0.05 + marks[0]
    with pytest.raises(cd.BadItem, match="face box under 32 px"):
        cd.align_face(as_tensor(photo), tiny, S)
    cd.align_face(as_tensor(photo), tiny, S, min_face=1)  # the threshold is configurable
    far = marks.copy()
    far[8, 0] = 1e9  # a typo in a .cat file must not make a billion-pixel pad
    with pytest.raises(cd.BadItem, match="far outside the photo"):
        cd.align_face(as_tensor(photo), far, S)


# ---- flips ------------------------------------------------------------------------------------

def test_flip_mirrors_landmarks_and_keeps_their_meaning():
    photo, marks = synthetic_photo(4)
    face, aligned = cd.align_face(as_tensor(photo), marks, 64)
    flipped, flipped_marks = cd.flip_faces(face, aligned)
    assert torch.equal(flipped, face.flip(-1))
    assert flipped_marks[0, 0] < flipped_marks[1, 0]  # the left eye is still on the left
    assert flipped_marks[3, 0] < flipped_marks[8, 0]  # so is left ear 1
    twice = cd.flip_faces(flipped, flipped_marks)
    assert torch.equal(twice[0], face) and torch.allclose(twice[1], aligned)
    # Aligning the mirrored photo gives the mirrored face.
    w = photo.size[0]
    mirrored_marks = np.stack([w - 1 - marks[:, 0], marks[:, 1]], 1)[list(cd.FLIP_ORDER)]
    mirror_face, mirror_marks = cd.align_face(as_tensor(photo.transpose(Image.FLIP_LEFT_RIGHT)),
                                              mirrored_marks.astype(np.float32), 64)
    assert torch.allclose(mirror_marks, flipped_marks, atol=1.0 / 64)
    assert (mirror_face.float() - flipped.float()).abs().mean() < 12


def test_training_batches_mirror_the_faces_their_epoch_order_flags(cat_folder):
    ds = cd.CatDataset(cat_folder, S, quiet=True)
    order, flips = cd.epoch_order(len(ds), seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(len(ds))) and 0 < flips.sum() < len(ds)
    x0, marks = cd.make_batch(ds.faces, ds.landmarks, order, flips[order], "cpu")
    for k, i in enumerate(order.tolist()):
        face, face_marks = ds[i]
        if flips[i]:
            face, face_marks = cd.flip_faces(face, face_marks)
        assert torch.equal(x0[k], face) and torch.equal(marks[k], face_marks)
    assert torch.equal(cd.epoch_order(len(ds), 0, 0)[1], flips) and not torch.equal(cd.epoch_order(len(ds), 0, 1)[0], order)


# ---- CatDataset and its cache -----------------------------------------------------------------

def test_dataset_items_are_images_in_minus_one_one_and_landmarks(cat_folder):
    ds = cd.CatDataset(cat_folder, S)
    assert len(ds) == 12
    image, marks = ds[3]
    assert image.shape == (3, S, S) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.1
    assert marks.shape == (9, 2)
    check_aligned(marks.numpy(), S)


def count_alignments(monkeypatch):
    calls = []
    real = cd.align_all

    def counting(pairs, *args, **kwargs):
        calls.append(len(pairs))
        return real(pairs, *args, **kwargs)

    monkeypatch.setattr(cd, "align_all", counting)
    return calls


def test_cache_is_reused_and_gives_identical_faces(cat_folder, monkeypatch, private_cache):
    first = cd.CatDataset(cat_folder, S)
    calls = count_alignments(monkeypatch)
    second = cd.CatDataset(cat_folder, S)
    assert calls == []
    assert torch.equal(first.faces, second.faces) and torch.equal(first.landmarks, second.landmarks)
    assert first.names == second.names
    assert [p.name for p in private_cache.iterdir()] == [f"faces-{S}px-{p.name.split('-')[-1]}"
                                                        for p in private_cache.iterdir()]
    assert not list(private_cache.glob(".*tmp"))  # written atomically, nothing left behind


@pytest.mark.parametrize("change", ["image_size", "version", "added", "removed", "modified", "threshold"])
def test_cache_is_rebuilt_when_its_inputs_change(cat_folder, monkeypatch, change):
    cd.CatDataset(cat_folder, S)
    calls = count_alignments(monkeypatch)
    size, kwargs = S, {}
    if change == "image_size":
        size = 40
    elif change == "version":
        monkeypatch.setattr(cd, "ALIGN_VERSION", cd.ALIGN_VERSION + 1)
    elif change == "added":
        photo, marks = synthetic_photo(9)
        photo.save(cat_folder / "99999999_000.jpg")
        write_cat(cat_folder / "99999999_000.jpg.cat", marks)
    elif change == "removed":
        (cat_folder / "00000000_000.jpg.cat").unlink()
    elif change == "modified":
        cat = cat_folder / "00000001_000.jpg.cat"
        cat.write_text(cat.read_text().replace("9 ", "9  ", 1))
    elif change == "threshold":
        kwargs = dict(min_face=8)
    ds = cd.CatDataset(cat_folder, size, **kwargs)
    assert calls == [len(cd.find_annotated_photos(cat_folder)[0])]
    assert len(ds) == {"added": 13, "removed": 11}.get(change, 12)


def test_a_fifo_in_the_caches_place_is_not_opened(cat_folder, private_cache):
    """Reading a FIFO blocks until someone writes to it: the cache must be a regular file."""
    good = cd.CatDataset(cat_folder, S)
    (cache,) = private_cache.iterdir()
    cache.unlink()
    os.mkfifo(cache)
    loaded = []
    worker = threading.Thread(target=lambda: loaded.append(cd.CatDataset(cat_folder, S)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert loaded and torch.equal(loaded[0].faces, good.faces), "loading hung on the FIFO"
    assert cache.is_file()  # rebuilt in its place


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong contents", "wrong dtype",
                                    "wrong types", "not a dict"])
def test_damaged_cache_is_rebuilt_never_trusted(cat_folder, private_cache, monkeypatch, damage):
    good = cd.CatDataset(cat_folder, S)
    (cache,) = private_cache.iterdir()
    data = cache.read_bytes()
    if damage == "garbage":
        cache.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":
        cache.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        cache.write_bytes(b"")
    elif damage == "not a dict":
        torch.save([1, 2, 3], cache)
    else:  # a loadable file whose key matches but whose contents do not
        payload = torch.load(cache, weights_only=True)
        if damage == "wrong contents":
            payload["faces"] = payload["faces"][:3]
        elif damage == "wrong dtype":
            payload["faces"] = payload["faces"].float()
        else:
            payload["names"], payload["bad"] = list(range(len(payload["names"]))), [[1, 2, 3]]
        torch.save(payload, cache)
    calls = count_alignments(monkeypatch)
    again = cd.CatDataset(cat_folder, S)
    assert calls == [12]
    assert torch.equal(good.faces, again.faces)


def test_unwritable_cache_folder_still_loads(cat_folder, monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    ds = cd.CatDataset(cat_folder, S, cache_dir=blocker / "cache")
    assert len(ds) == 12
    assert "face cache not saved" in capsys.readouterr().err


def test_split_is_by_photo_id_deterministic_and_disjoint(tmp_path):
    photo, marks = synthetic_photo()
    for pid in range(40):
        for shot in range(2):
            p = tmp_path / f"{pid:08d}_{shot:03d}.jpg"
            photo.save(p)
            write_cat(f"{p}.cat", marks)
    train = cd.CatDataset(tmp_path, S, split="train", val_percent=20, quiet=True)
    val = cd.CatDataset(tmp_path, S, split="val", val_percent=20, quiet=True)
    assert len(train) + len(val) == 80 and 0 < len(val) < 40
    ids = lambda ds: {cd.photo_id(n) for n in ds.names}  # noqa: E731
    assert not ids(train) & ids(val)  # both shots of a cat land on one side
    assert val.names == cd.CatDataset(tmp_path, S, split="val", val_percent=20, quiet=True).names


def test_names_that_are_not_cat_style_are_each_their_own_photo_id(tmp_path):
    assert cd.photo_id("CAT_00/00000001_005.jpg") == "00000001"
    assert cd.photo_id("IMG_1234.jpg") == "IMG_1234.jpg" != cd.photo_id("IMG_1235.jpg")
    photo, marks = synthetic_photo()
    for i in range(60):
        p = tmp_path / f"IMG_{i:04d}.jpg"
        photo.save(p)
        write_cat(f"{p}.cat", marks)
    val = cd.CatDataset(tmp_path, S, split="val", val_percent=20, quiet=True)
    assert 0 < len(val) < 60, "phone-style names must spread over both sides of the split"


def test_empty_folder_is_a_clear_error_naming_the_folder(tmp_path):
    with pytest.raises(SystemExit) as e:
        cd.CatDataset(tmp_path, S)
    assert str(tmp_path) in str(e.value) and "crawford/cat-dataset" in str(e.value)


# ---- messy input ----------------------------------------------------------------------------

def messy_folder(root):
    """Good photos in every colour format plus one file for each kind of damage."""
    photo, marks = synthetic_photo(5)
    rgb = np.array(photo)
    good = {
        "grayscale.jpg": Image.fromarray(rgb[..., 0]),
        "cmyk.jpg": photo.convert("CMYK"),
        "rgba.png": photo.convert("RGBA"),
        "palette.png": photo.convert("P"),
        "sixteen_bit.png": Image.fromarray(rgb[..., 1].astype(np.uint16) * 257),
        "plain.jpg": photo,
    }
    for name, im in good.items():
        im.save(root / name)
        write_cat(root / f"{name}.cat", marks)
    bad = {}

    def add(name, reason, cat_text=None, photo_bytes=None):
        path = root / name
        if photo_bytes is None:
            photo.save(path, format="JPEG")
        else:
            path.write_bytes(photo_bytes)
        if cat_text is not None:
            (root / f"{name}.cat").write_text(cat_text)
        bad[name] = reason

    cat_text = (root / "plain.jpg.cat").read_text()
    jpeg = (root / "plain.jpg").read_bytes()
    add("no_cat.jpg", "missing .cat file")
    add("empty_cat.jpg", "empty .cat file", "")
    add("words.jpg", "non-numeric .cat contents", "9 left eye is here")
    add("count.jpg", ".cat point count does not match its numbers", "9 1 2 3 4 ")
    add("few.jpg", ".cat file has fewer than 9 points", "2 1 2 3 4 ")
    add("truncated.jpg", "corrupt or truncated image", cat_text, jpeg[: len(jpeg) // 2])
    add("text.jpg", "corrupt or truncated image", cat_text, b"this is a text file, not a JPEG\n" * 20)
    same = marks.copy()
    same[1] = same[0]
    add("same_eyes.jpg", "degenerate landmarks (eyes on the same point)",
        " ".join(["9"] + [str(int(v)) for v in same.reshape(-1)]) + " ")
    Image.fromarray(rgb[:10, :12]).save(root / "tiny.jpg")
    write_cat(root / "tiny.jpg.cat", np.array([[3, 5], [8, 5], [5, 8], [1, 2], [1, 0], [3, 1],
                                               [8, 1], [10, 0], [11, 2]]))
    bad["tiny.jpg"] = "face box under 32 px"
    add("locked.jpg", "unreadable photo (PermissionError)", cat_text)
    return good, bad


def test_messy_files_are_skipped_with_one_line_per_reason(tmp_path, monkeypatch, capsys):
    good, bad = messy_folder(tmp_path)
    real_read = Path.read_bytes

    def read_bytes(self):  # root can read anything, so refuse one file the way the OS would
        if self.name == "locked.jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    ds = cd.CatDataset(tmp_path, S)
    assert sorted(Path(n).name for n in ds.names) == sorted(good)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped ")]
    reasons = {}
    for name, reason in bad.items():
        reasons.setdefault(reason, []).append(name)
    assert len(err) == len(reasons)
    for reason, names in reasons.items():
        (line,) = [line for line in err if f": {reason}: " in line]
        assert line.startswith(f"skipped {len(names)} in {tmp_path}")
        for name in names:
            assert name in line


def test_every_colour_format_gives_the_same_face(tmp_path):
    good, _ = messy_folder(tmp_path)
    ds = cd.CatDataset(tmp_path, S, quiet=True)
    faces = {Path(n).name: ds.faces[i].float() for i, n in enumerate(ds.names)}
    gray = faces["plain.jpg"][0]  # the grayscale and 16-bit files hold channel 0 or 1
    for name in ("cmyk.jpg", "rgba.png", "palette.png"):
        assert (faces[name] - faces["plain.jpg"]).abs().mean() < 12, name
    assert (faces["grayscale.jpg"][0] - gray).abs().mean() < 8
    assert (faces["sixteen_bit.png"][0] - faces["plain.jpg"][1]).abs().mean() < 8
    for name in ("grayscale.jpg", "sixteen_bit.png"):  # grey: all three channels equal
        assert torch.equal(faces[name][0], faces[name][2])


def test_exif_orientation_is_ignored_because_landmarks_use_the_stored_pixels(tmp_path):
    photo, marks = synthetic_photo(6)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    photo.save(tmp_path / "exif.jpg", exif=exif.tobytes(), quality=95)
    photo.save(tmp_path / "plain.jpg", quality=95)
    for name in ("exif.jpg", "plain.jpg"):
        write_cat(tmp_path / f"{name}.cat", marks)
    ds = cd.CatDataset(tmp_path, S, quiet=True)
    assert torch.equal(ds.faces[0], ds.faces[1])


# ---- real data (skipped where ../shared/data is absent) ---------------------------------------

@needs_shared("cat-photos")
def test_real_cat_photos_align_with_level_eyes():
    ds = cd.CatDataset(SHARED_DATA / "cat-photos", 64, quiet=True)
    assert len(ds) >= 65  # 71 photos; only faces under 32 px may be dropped
    for marks in ds.landmarks.numpy():
        check_aligned(marks, 64)


@needs_shared("cat-faces")
def test_real_face_crops_realign_to_themselves(tmp_path):
    for photo in sorted((SHARED_DATA / "cat-faces").glob("*.jpg"))[:60]:
        for f in (photo, Path(f"{photo}.cat")):
            (tmp_path / f.name).symlink_to(f)
    ds = cd.CatDataset(tmp_path, 64, quiet=True)
    assert len(ds) == 60
    originals = []
    for name in ds.names:  # the crops were made by the same recipe, so alignment is ~ a resize
        im = Image.open(tmp_path / name).convert("RGB")
        if im.size[0] == im.size[1]:
            originals.append((name, torch.from_numpy(np.array(im.resize((64, 64), Image.BICUBIC)))))
    index = {n: i for i, n in enumerate(ds.names)}
    diffs = [(ds.faces[index[n]].permute(1, 2, 0).float() - o.float()).abs().mean() for n, o in originals]
    assert len(diffs) >= 30 and float(np.median(diffs)) < 10
