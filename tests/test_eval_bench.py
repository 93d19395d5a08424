"""The quality metrics (SWD of Laplacian-pyramid patches, memorisation) and the eval / bench commands."""
import json

import pytest
import torch

import cat_diffusion as cd
import cat_eval as ce


def smooth_images(n, size=32, seed=0):
    """Random smooth colour fields in [-1, 1]: a stand-in image distribution."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


def test_laplacian_pyramid_reconstructs_the_image_exactly():
    x = smooth_images(4) + 0.1 * torch.randn(4, 3, 32, 32)
    levels = ce.laplacian_pyramid(x, 3)
    assert [lv.shape[-1] for lv in levels] == [32, 16, 8]
    k = torch.tensor([1.0, 4, 6, 4, 1])
    kernel = (k[:, None] * k[None] / 256).expand(3, 1, 5, 5)
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        up = torch.nn.functional.conv_transpose2d(rebuilt, 4 * kernel, stride=2, padding=2, output_padding=1, groups=3)
        rebuilt = band + up
    assert torch.allclose(rebuilt, x, atol=1e-5)


def test_swd_is_smaller_between_samples_of_one_distribution_than_against_another():
    a, b = smooth_images(64, seed=1), smooth_images(64, seed=2)
    noise = torch.rand(64, 3, 32, 32) * 2 - 1
    same, different = ce.swd(a, b), ce.swd(a, noise)
    assert len(same) == 2  # 32 px: one band-pass level and the low-pass
    assert different[0] > 4 * same[0] and different[1] > 1.5 * same[1]


def test_nearest_distance_is_zero_for_copies_and_memorisation_shows():
    train = smooth_images(20, seed=3)
    assert ce.nearest_distance(train[:5], train) < 1e-4
    assert ce.nearest_distance(smooth_images(5, seed=4), train) > 0.1


def test_windows_tile_the_items_with_sets_of_m_evenly_spaced():
    assert [w.tolist() for w in ce.windows(torch.arange(8), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [w[0].item() for w in ce.windows(torch.arange(10), 4)] == [0, 3, 6]  # the last ends at 9
    assert [w.tolist() for w in ce.windows(torch.arange(4), 4)] == [[0, 1, 2, 3]]


def test_sample_quality_averages_the_swd_of_every_set_of_m_samples_and_of_as_many_real_faces():
    """Ten validation faces and 25 samples: the SWD is the mean over the samples' three sets of 10
    (0-9, 8-17, 15-24), the floor over three such sets of 25 shuffled training faces."""
    to_uint8 = lambda x: ((x + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    samples = smooth_images(25, seed=5)
    val, train = to_uint8(smooth_images(10, seed=6)), to_uint8(smooth_images(40, seed=7))
    r = ce.sample_quality(samples, train, val, seed=3)
    real = ce.to_model_range(val)
    per_set = [ce.swd(samples[i:i + 10], real, 3) for i in (0, 8, 15)]
    assert r["swd"] == pytest.approx([sum(v) / 3 for v in zip(*per_set)], rel=1e-6)
    assert r["swd_sets"] == pytest.approx([sum(v) / len(v) for v in per_set], rel=1e-6)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:25]
    floor = [ce.swd(ce.to_model_range(train[order][i:i + 10]), real, 3) for i in (0, 8, 15)]
    assert r["floor"] == pytest.approx([sum(v) / 3 for v in zip(*floor)], rel=1e-6)
    one = ce.sample_quality(samples[:10], train, val, seed=3)  # as many samples as faces: one set, as before
    assert one["swd"] == pytest.approx(per_set[0], rel=1e-6) and len(one["swd_sets"]) == 1


def test_eval_command_prints_and_writes_finite_metrics(tmp_path, capsys):
    photos = cd.write_synthetic_dataset(tmp_path / "photos", count=60, seed=0)
    torch.manual_seed(0)
    model_path = cd.save_model(cd.DiffusionModel(16, 8), tmp_path / "M")
    out = tmp_path / "eval.json"
    cd.main(["eval", "--model", str(model_path), "--data", str(photos), "-n", "6", "--sampler", "ddim",
             "--steps", "2", "--json", str(out)])
    r = json.loads(out.read_text())
    val = cd.CatDataset(photos, 16, split="val", quiet=True)
    assert len(val) > 0 and r["m"] == min(6, len(val)) and r["n"] == 6
    assert len(r["swd"]) == len(r["floor"]) == 1  # 16 px: the low-pass level only
    assert all(v > 0 for v in r["swd"] + r["floor"]) and r["memorisation"] > 0
    assert "real vs real (floor)" in capsys.readouterr().out


def test_bench_command_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cd.main(["bench", "--image-size", "16", "--width", "8", "--batch-size", "4", "--precision", "fp32",
             "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["parameters"] == sum(p.numel() for p in cd.DiffusionModel(16, 8).parameters())
    for key in ("train_images_per_s", "loader_images_per_s", "gflops_per_train_image", "achieved_tflops",
                "utilisation", "peak_rss_mb"):
        assert r[key] > 0, key
    assert set(r["sample_images_per_s"]) == {"ddpm 1000", "ddim 50", "dpm++ 20", "student 4", "student 2", "student 1"}
    assert all(rate > 0 for rate in r["sample_images_per_s"].values()) and r["peak_tflops"]["fp32"] > 0
    assert "model FLOP utilisation" in capsys.readouterr().out
