"""Landmark-guided generation and editing: conditioning, guidance, the landmark net, DDIM inversion,
interpolation, inpainting and their commands."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cat_diffusion as cd
import cat_eval as ce
from helpers import GaussianOracle, gaussian_oracle, live_model, run_main


def layout(n=1, seed=0):
    """Plausible landmarks (face coordinates): the synthetic cats' face layout, jittered."""
    base = torch.tensor(cd.SYNTH_LANDMARKS, dtype=torch.float32) + torch.tensor([0.5, 0.4])
    g = torch.Generator().manual_seed(seed)
    return (base + 0.03 * torch.randn(n, 9, 2, generator=g)).clamp(0.05, 0.95)


class GaussianOracleWithLandmarks(GaussianOracle):
    """The Gaussian oracle as a landmark model that ignores its landmarks."""

    def __init__(self, oracle):
        super().__init__(oracle.mu, oracle.s)
        self.config = dict(oracle.config, landmarks=True)


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def test_align_landmarks_puts_points_where_align_face_puts_them():
    rng = np.random.default_rng(0)
    for _ in range(5):
        photo, points = cd.draw_synthetic_cat(rng)
        points = points.astype(np.float32)
        image = torch.from_numpy(np.array(photo.convert("RGB"))).permute(2, 0, 1).contiguous()
        _, aligned = cd.align_face(image, points, 64, min_face=1)
        assert (cd.align_landmarks(points) - aligned).abs().max() * 64 < 1.0  # crop rounding only


def test_landmark_heatmaps_peak_at_the_landmarks_and_are_empty_without_them():
    marks = torch.tensor([[[0.25, 0.75]] * 9, [[math.nan, math.nan]] * 9])
    maps = cd.landmark_heatmaps(marks, 16)
    assert maps.shape == (2, 9, 16, 16)
    peak = (maps[0, 0] == maps[0, 0].max()).nonzero()
    assert set(peak[:, 1].tolist()) == {3, 4} and set(peak[:, 0].tolist()) == {11, 12}  # x = 4, y = 12 px
    assert maps[1].abs().sum() == 0


def test_region_masks_cover_their_landmarks_and_nothing_far_away():
    marks = layout()[0]
    eyes, mouth, ears = (cd.region_mask(marks, 64, r) for r in ("eyes", "mouth", "ears"))
    px = (marks * 64).round().long()
    assert eyes[px[0, 1], px[0, 0]] and eyes[px[1, 1], px[1, 0]] and not eyes[px[2, 1], px[2, 0]]
    assert mouth[px[2, 1], px[2, 0]] and not mouth[px[0, 1], px[0, 0]]
    assert all(ears[y, x] for x, y in px[3:].tolist()) and not ears[px[2, 1], px[2, 0]]
    box = cd.region_mask(marks, 64, "box:10,20,30,40")
    assert box.sum() == 21 * 21 and box[20, 10] and box[40, 30] and not box[41, 30]
    with pytest.raises(ValueError, match="unknown region"):
        cd.region_mask(marks, 64, "nose")


# ----------------------------------------------------------------------------------------------
# Conditioning and guidance
# ----------------------------------------------------------------------------------------------

def test_landmark_model_samples_with_and_without_landmarks_reproducibly():
    model = live_model(landmarks=True)
    marks = layout(4)

    def run(landmarks, seed=0):
        return cd.sample(model, 4, "ddim", 4, generator=torch.Generator().manual_seed(seed),
                         landmarks=landmarks, guidance=2.0, progress=False)

    cond, uncond = run(marks), run(None)
    assert cond.shape == uncond.shape == (4, 3, 16, 16)
    assert torch.equal(cond, run(marks)), "the same seed must give the same samples"
    assert not torch.allclose(cond, uncond), "landmarks must change the samples"
    assert not torch.allclose(run(marks), run(marks, seed=1))
    nan_marks = torch.full_like(marks, math.nan)  # NaN landmarks are the unconditional model
    x = torch.randn(4, 3, 16, 16)
    t = torch.full((4,), 500)
    assert torch.equal(model(x, t), model(x, t, nan_marks))


def test_classifier_free_guidance_extrapolates_from_unconditional_to_conditional():
    model = live_model(landmarks=True)
    x, t, ab = torch.randn(3, 3, 16, 16), torch.tensor(600), cd.ALPHA_BAR[600]
    marks = layout(3)
    with torch.no_grad():
        v_c, v_u = model(x, t.expand(3), marks), model(x, t.expand(3))
        for w in (1.0, 3.0):
            x0, _ = cd.denoise(model, x, t, ab, None, marks, guidance=w)
            expected = cd.predict_x0_eps(v_u + w * (v_c - v_u), x, ab)[0].clamp(-1, 1)
            assert torch.allclose(x0, expected, atol=1e-5)


def test_a_model_without_landmarks_refuses_them():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="without landmarks"):
        cd.sample(cd.DiffusionModel(16, 8, landmarks=False), 2, "ddim", 2, landmarks=layout(2), progress=False)


def test_landmark_training_drops_the_condition_for_a_share_of_faces(cat_folder, tmp_path, monkeypatch):
    seen = []
    real = cd.diffusion_loss

    def spy(model, x0, t, eps, alpha_bar, landmarks=None):
        seen.append(landmarks.clone())
        return real(model, x0, t, eps, alpha_bar, landmarks)

    monkeypatch.setattr(cd, "diffusion_loss", spy)
    data = cd.CatDataset(cat_folder, 16, quiet=True)
    cfg = cd.TrainConfig(epochs=4, batch_size=6, precision="fp32", landmark_dropout=0.5, checkpoint_every=100)
    cd.train(cd.DiffusionModel(16, 8, landmarks=True), data, cfg, tmp_path)
    marks = torch.cat(seen)
    dropped = marks.isnan().all(-1).all(-1)
    assert 0.2 < dropped.float().mean() < 0.8
    kept = marks[~dropped]
    assert not kept.isnan().any() and kept.min() > -0.5 and kept.max() < 1.5  # normalised face coordinates


# ----------------------------------------------------------------------------------------------
# Inversion, interpolation, inpainting (against the Gaussian oracle: the maths, not training)
# ----------------------------------------------------------------------------------------------

def oracle_faces(oracle, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (oracle.mu + oracle.s * torch.randn(n, *oracle.mu.shape, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("landmarks", [False, True], ids=["unconditional", "landmark model"])
def test_ddim_inversion_then_ddim_sampling_reconstructs_the_face(landmarks):
    oracle = gaussian_oracle()
    if landmarks:
        oracle = GaussianOracleWithLandmarks(oracle)
    faces = oracle_faces(oracle, 3)
    marks = layout(3) if landmarks else None
    noise = cd.invert(oracle, faces, 50, marks, precision="fp32")
    assert noise.std() > 0.5, "the inverted face should look like noise"
    back = cd.sample(oracle, 3, "ddim", 50, x=noise, landmarks=marks, precision="fp32", progress=False)
    assert cd.psnr(back, faces) > 35
    coarse = cd.sample(oracle, 3, "ddim", 50, x=torch.randn_like(noise), precision="fp32", progress=False)
    assert cd.psnr(coarse, faces) < 30, "an unrelated noise must not reconstruct the face"


def test_interpolation_starts_and_ends_at_the_two_faces():
    oracle = gaussian_oracle()
    a, b = oracle_faces(oracle, 2)
    frames = cd.interpolate(oracle, a, b, frames=5, steps=50)
    assert frames.shape == (5, 3, 8, 8)
    assert cd.psnr(frames[0], a) > 35 and cd.psnr(frames[-1], b) > 35
    middle = frames[2]
    assert cd.psnr(middle, a) < cd.psnr(frames[1], a) and cd.psnr(middle, b) < cd.psnr(frames[3], b)


def test_slerp_keeps_the_norm_of_noise_images():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 32, 32, generator=g), torch.randn(3, 32, 32, generator=g)
    mid = cd.slerp(a, b, 0.5)
    assert mid.norm() == pytest.approx(a.norm().item(), rel=0.03)
    assert torch.allclose(cd.slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(cd.slerp(a, b, 1.0), b, atol=1e-5)


def test_inpainting_preserves_unmasked_pixels_exactly_and_regenerates_the_rest():
    model = live_model(landmarks=True)
    face = cd.to_model_range(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8))
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:10, 3:12] = True
    out = cd.inpaint(model, face, mask, n=3, steps=5, resample=2, generator=torch.Generator().manual_seed(0),
                     landmarks=layout()[0])
    assert out.shape == (3, 3, 16, 16)
    assert torch.equal(out[:, :, ~mask], face[:, ~mask].expand(3, -1, -1))
    assert (out[:, :, mask] - face[:, mask]).abs().mean() > 0.05
    assert not torch.equal(out[0], out[1]), "each version is a new sample"


def test_inpainting_with_the_oracle_fills_the_hole_with_data_like_pixels():
    oracle = gaussian_oracle()
    face = oracle_faces(oracle, 1)[0]
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True
    out = cd.inpaint(oracle, face, mask, n=16, steps=50, resample=2, generator=torch.Generator().manual_seed(0),
                     precision="fp32")
    z = (out - oracle.mu.float()) / oracle.s
    assert z[:, :, mask].abs().mean() < 1.2  # |N(0, 1)| has mean 0.8; noise or mush would not


# ----------------------------------------------------------------------------------------------
# The landmark net
# ----------------------------------------------------------------------------------------------

def shifted(dataset, seed, max_shift=4):
    """Faces moved by random whole pixels (wrapping round), landmarks with them: aligned faces
    alone vary too little for the mean layout to be a weak guess."""
    g = torch.Generator().manual_seed(seed)
    shifts = torch.randint(-max_shift, max_shift + 1, (len(dataset), 2), generator=g)
    faces = torch.stack([f.roll((int(dy), int(dx)), dims=(1, 2)) for f, (dx, dy) in zip(dataset.faces, shifts)])
    return SimpleNamespace(faces=faces, landmarks=dataset.landmarks + shifts[:, None].float() / faces.shape[-1])


def test_landmark_net_learns_to_find_landmarks(tmp_path):
    photos = cd.write_synthetic_dataset(tmp_path / "photos", count=150, seed=0)
    train, val = (shifted(cd.CatDataset(photos, 32, split=s, val_percent=20, quiet=True), seed)
                  for seed, s in enumerate(("train", "val")))
    torch.manual_seed(0)
    net = ce.LandmarkNet(32, width=8)
    errors = ce.fit_landmarks(net, train, val, epochs=30, batch_size=8, device="cpu")
    guess = 32 * (val.landmarks - train.landmarks.mean(0)).norm(dim=-1).mean().item()  # the mean layout, in px
    assert errors[-1] < 0.7 * guess and errors[-1] < 0.3 * errors[0], (guess, errors)
    path = cd.save_model(net, tmp_path / "net")
    assert isinstance(cd.load_model(ce.LandmarkNet, path), ce.LandmarkNet)
    with pytest.raises(cd.CheckpointError, match="holds a LandmarkNet"):
        cd.load_model(cd.DiffusionModel(32, 8), path)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def landmark_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("landmark-run")
    photos = cd.write_synthetic_dataset(tmp / "photos", count=40, seed=0)
    run_main(["train", "--data", str(photos), "--image-size", "16", "--width", "8", "--epochs", "1",
              "--batch-size", "8", "--out", str(tmp / "out"), "--name", str(tmp / "M")], tmp / "cache")
    return tmp, photos, sorted(photos.glob("*.jpg"))


def test_training_takes_the_landmarks_unless_told_not_to_and_a_resumed_run_keeps_its_choice(landmark_run):
    tmp, photos, _ = landmark_run
    assert cd.load_model(None, tmp / "M.pth").config["landmarks"]  # the fixture's run gave no option
    plain = ["--image-size", "16", "--width", "8", "--batch-size", "8", "--out", str(tmp / "plain"),
             "--name", str(tmp / "P")]
    run_main(["train", "--data", str(photos), "--no-landmarks", "--epochs", "1", *plain], tmp / "cache")
    assert not cd.load_model(None, tmp / "P.pth").config["landmarks"]
    checkpoint = tmp / "plain" / "checkpoint.pt"
    first = cd.read_checkpoint(checkpoint, want="training")["step"]
    run_main(["train", "--resume", str(checkpoint), "--epochs", "2"], tmp / "cache")  # saved: landmarks False
    assert cd.read_checkpoint(checkpoint, want="training")["step"] > first
    assert not cd.load_model(None, tmp / "P.pth").config["landmarks"]


def test_sample_like_a_photo_writes_samples_and_a_copy_with_its_landmarks(landmark_run, capsys):
    tmp, _, photos = landmark_run
    out = tmp / "like"
    cd.main(["sample", "--model", str(tmp / "M.pth"), "--like", str(photos[0]), "-n", "4", "--steps", "3",
             "--out", str(out)])
    assert (out / "samples.png").is_file() and (out / "samples_landmarks.png").is_file()
    cd.main(["sample", "--model", str(tmp / "M.pth"), "--landmarks", f"{photos[1]}.cat", "-n", "2",
             "--steps", "2", "--out", str(tmp / "from-cat")])
    assert (tmp / "from-cat" / "samples_landmarks.png").is_file()


def test_editing_commands_write_their_pictures(landmark_run, capsys):
    tmp, _, photos = landmark_run
    model = str(tmp / "M.pth")
    cd.main(["reconstruct", str(photos[0]), "--model", model, "--invert", "--steps", "4", "--out", str(tmp / "e")])
    assert "PSNR" in capsys.readouterr().out
    cd.main(["interpolate", str(photos[0]), str(photos[1]), "--model", model, "--frames", "3", "--steps", "3",
             "--out", str(tmp / "e")])
    cd.main(["inpaint", str(photos[0]), "--region", "eyes", "--model", model, "-n", "2", "--steps", "2",
             "--out", str(tmp / "e")])
    for name in ("reconstruct.png", "interpolation.png", "interpolation.gif", "inpaint.png"):
        assert (tmp / "e" / name).stat().st_size > 100


def test_a_photo_without_landmarks_is_an_error_naming_it(landmark_run, tmp_path):
    tmp, _, photos = landmark_run
    lonely = tmp_path / "lonely.jpg"
    lonely.write_bytes(photos[0].read_bytes())
    with pytest.raises(SystemExit, match="lonely.jpg: no landmarks"):
        cd.main(["reconstruct", str(lonely), "--model", str(tmp / "M.pth"), "--out", str(tmp_path)])


def test_landmark_options_with_a_model_trained_without_them_are_an_error(tmp_path, cat_folder):
    path = cd.save_model(cd.DiffusionModel(16, 8, landmarks=False), tmp_path / "plain")
    photo = sorted(cat_folder.glob("*.jpg"))[0]
    with pytest.raises(SystemExit, match="trained without landmarks"):
        cd.main(["sample", "--model", str(path), "--like", str(photo), "--out", str(tmp_path)])
