"""The diffusion maths and the samplers of cat_diffusion.py: schedule, forward process,
v-parametrisation, a loss that falls, and DDPM / DDIM / DPM-Solver++ checked against oracle
denoisers whose answers are known in closed form."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cat_diffusion as cd
from helpers import gaussian_oracle, live_model


@pytest.mark.parametrize("sampler", list(cd.SAMPLERS))
def test_time_grid_runs_down_from_t_start_to_zero_without_repeats(sampler):
    for steps in (5, 10, 20, 50):
        grid = cd.time_grid(sampler, steps)
        last = round((cd.T - 1) / steps) if sampler == "student" else 0  # its last step goes to the clean image
        assert grid[0] == cd.T - 1 and grid[-1] == last and (grid[1:] < grid[:-1]).all()
        assert len(grid) == steps or sampler == "dpm++"
    if sampler == "dpm++":  # evenly spaced in log-SNR after the capped start
        lam = cd.half_log_snr(cd.ALPHA_BAR.double())[cd.time_grid(sampler, 10)]
        assert lam[1:].diff().std() < 0.2 * lam[1:].diff().mean()
    assert cd.time_grid(sampler, 10, t_start=400)[0] == 400


class PointOracle(nn.Module):
    """The exact v-prediction when all data is one image x_star: x_t = sqrt(ab) x_star +
    sqrt(1-ab) eps, so eps = (x_t - sqrt(ab) x_star) / sqrt(1-ab) and v = sqrt(ab) eps -
    sqrt(1-ab) x_star."""

    def __init__(self, x_star):
        super().__init__()
        self.config = {"image_size": x_star.shape[-1]}
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the samplers a device
        self.x_star = x_star.double()

    def forward(self, x, t, landmarks=None):
        ab = cd.ALPHA_BAR[t].double()[:, None, None, None]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = (x.double() - a * self.x_star) / s
        return (a * eps - s * self.x_star).float()


# ----------------------------------------------------------------------------------------------
# Schedule, forward process, v-parametrisation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha_bar", [cd.ALPHA_BAR, cd.cosine_alpha_bar()], ids=["ALPHA_BAR", "cosine_alpha_bar()"])
def test_cosine_schedule_falls_strictly_from_one_to_zero(alpha_bar):
    assert alpha_bar.shape == (cd.T,)
    assert torch.all(alpha_bar > 0) and torch.all(alpha_bar <= 1)
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1]), "alpha_bar must fall strictly"
    assert alpha_bar[0] > 0.999
    assert alpha_bar[-1] < 1e-3


def test_cosine_schedule_follows_nichol_dhariwal_formula():
    """Away from the beta cap, alpha_bar(t) = f(t+1)/f(0) with f the squared cosine."""
    steps, s = 100, 0.008
    alpha_bar = cd.cosine_alpha_bar(steps, s).double()
    f = lambda t: math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 50, 90):
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)


@pytest.mark.parametrize("t", [0, 250, 500, 900])
def test_q_sample_has_the_forward_process_mean_and_std(t):
    c, n = 0.7, 200_000
    ab = cd.ALPHA_BAR[t]
    eps = torch.randn(n, generator=torch.Generator().manual_seed(t))
    x_t = cd.q_sample(torch.full((n,), c), ab, eps)
    mean, std = math.sqrt(ab) * c, math.sqrt(1 - ab)
    assert x_t.mean().item() == pytest.approx(mean, abs=5 * std / math.sqrt(n) + 1e-6)
    assert x_t.std().item() == pytest.approx(std, rel=0.01, abs=1e-6)


@pytest.mark.parametrize("t", [0, 1, 300, 700, 998, 999])
def test_v_target_inverts_to_the_true_x0_and_eps(t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=g)
    ab = cd.ALPHA_BAR[t]
    x_t = cd.q_sample(x0, ab, eps)
    x0_hat, eps_hat = cd.predict_x0_eps(cd.v_target(x0, ab, eps), x_t, ab)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [0, 300, 700, 999])
def test_half_resolution_is_the_full_size_x_t_averaged_over_2x2_pixels_at_four_times_the_snr(t):
    g = torch.Generator().manual_seed(t)
    x0, eps = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(2, 3, 8, 8, generator=g)
    x0_half, eps_half, alpha_bar = cd.half_resolution(x0, eps.double(), cd.ALPHA_BAR.double())
    ab, ab_half = cd.ALPHA_BAR.double()[t], alpha_bar[t]
    assert x0_half.shape == eps_half.shape == (2, 3, 4, 4)
    assert (ab_half / (1 - ab_half)).item() == pytest.approx((4 * ab / (1 - ab)).item(), rel=1e-9)
    averaged = F.avg_pool2d(cd.q_sample(x0, ab, eps.double()), 2) / (ab + (1 - ab) / 4).sqrt()
    torch.testing.assert_close(cd.q_sample(x0_half, ab_half, eps_half), averaged, rtol=0, atol=1e-12)
    noise = cd.half_resolution(x0, torch.randn(1, 1, 512, 512, generator=g), cd.ALPHA_BAR)[1]
    assert noise.std().item() == pytest.approx(1, abs=0.01)  # unit noise, as the full size's


def test_v_target_is_minus_x0_at_pure_noise_and_eps_at_no_noise():
    x0, eps = torch.full((5,), 0.3), torch.full((5,), -1.2)
    torch.testing.assert_close(cd.v_target(x0, torch.tensor(0.0), eps), -x0)
    torch.testing.assert_close(cd.v_target(x0, torch.tensor(1.0), eps), eps)


# ----------------------------------------------------------------------------------------------
# Training signal
# ----------------------------------------------------------------------------------------------

def pattern_images(size=16):
    """8 simple, distinct images in [-1, 1]: ramps, stripes, a checkerboard and a disc."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    planes = [x, y, -x, -y, torch.sign(torch.sin(4 * x)), torch.sign(torch.sin(4 * y)),
              torch.sign(torch.sin(4 * x) * torch.sin(4 * y)), (x * x + y * y < 0.5).float() * 2 - 1]
    colours = torch.tensor([[1.0, 0.5, -0.5], [0.5, -1.0, 1.0]])
    return torch.stack([p[None] * colours[k % 2][:, None, None] for k, p in enumerate(planes)])


def test_diffusion_loss_falls_when_training_a_tiny_model():
    x0 = pattern_images()
    torch.manual_seed(0)
    model = cd.DiffusionModel(image_size=16, base_channels=8, blocks=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        loss = cd.diffusion_loss(model, x0, *cd.draw_noise(x0, g), cd.ALPHA_BAR)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, f"loss went from {first:.3f} to {last:.3f}"


def test_diffusion_loss_is_the_error_of_v_weighted_down_only_above_snr_5():
    """With the output layer zeroed the model predicts v = 0, so the loss is E[w v^2] over the
    given t and eps (v, not eps or x0, is the target): w = 1 where SNR <= 5, 6 / (SNR + 1) above."""
    torch.manual_seed(0)
    model = cd.DiffusionModel(image_size=16, base_channels=8, blocks=1)
    with torch.no_grad():
        model.head[-1].bias.zero_()  # the weight is zero-initialised, the bias is not
    x0 = pattern_images()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    snr = cd.ALPHA_BAR / (1 - cd.ALPHA_BAR)
    noisy, clean = int((snr <= 5).nonzero()[0]), 0  # the cleanest level with SNR <= 5, and t = 1
    for t, weight in ((noisy, 1.0), (clean, 6 / (snr[clean].item() + 1))):
        ts = torch.full((len(x0),), t)
        loss = cd.diffusion_loss(model, x0, ts, eps, cd.ALPHA_BAR)
        v = cd.v_target(x0, cd.ALPHA_BAR[t], eps)
        assert loss.item() == pytest.approx(weight * v.pow(2).mean().item(), rel=1e-5), t
    assert 6 / (snr[clean].item() + 1) < 0.01, "the cleanest level weighs a hundredth of plain v-MSE or less"


# ----------------------------------------------------------------------------------------------
# Samplers on a real (untrained) network
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,steps", [("ddpm", 20), ("ddim", 5), ("dpm++", 5)])
def test_each_sampler_returns_finite_images_in_range(sampler, steps):
    model = live_model(16)
    out = cd.sample(model, 3, sampler, steps, generator=torch.Generator().manual_seed(0),
                    precision="fp32", progress=False)
    assert out.shape == (3, 3, 16, 16)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
    assert out.std() > 0.01, "the sample should not be a constant image"


def test_sampler_calls_on_step_once_per_step_with_the_final_image_last():
    model, seen = live_model(16), []
    out = cd.sample(model, 2, "dpm++", 4, generator=torch.Generator().manual_seed(0), precision="fp32",
                    progress=False, on_step=lambda i, x, x0: seen.append((i, x.clone())))
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    torch.testing.assert_close(seen[-1][1].clamp(-1, 1), out)


def test_ddim_is_deterministic_for_a_seed():
    model = live_model(16)

    def run(seed):
        return cd.sample(model, 2, "ddim", 4, generator=torch.Generator().manual_seed(seed),
                         precision="fp32", progress=False)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2), atol=1e-3)


def test_guidance_extrapolates_from_the_guide_without_landmarks_and_from_no_landmarks_with_them():
    model = live_model(landmarks=True)
    model.guide = live_model(landmarks=True, seed=1)
    x, t, ab, w = torch.randn(4, 3, 16, 16), torch.tensor(600), cd.ALPHA_BAR[600], 3.0
    marks = torch.rand(4, 9, 2)
    marks[2:] = float("nan")  # faces 0-1 have landmarks, 2-3 none
    with torch.no_grad():
        v, v_u, v_g = model(x, t.expand(4), marks), model(x, t.expand(4)), model.guide(x, t.expand(4))
        v_0 = torch.cat([v_u[:2], v_g[2:]])  # classifier-free guidance, then autoguidance
        x0, _ = cd.denoise(model, x, t, ab, None, marks, guidance=w)
        torch.testing.assert_close(x0, cd.predict_x0_eps(v_0 + w * (v - v_0), x, ab)[0].clamp(-1, 1), atol=1e-5, rtol=0)
        x0, _ = cd.denoise(model, x, t, ab, None, marks, guidance=1.0)
        torch.testing.assert_close(x0, cd.predict_x0_eps(v, x, ab)[0].clamp(-1, 1), atol=1e-5, rtol=0)


def test_the_guide_acts_only_at_snr_guide_min_snr_and_above_and_landmarks_guide_at_every_noise_level():
    model = live_model(landmarks=True)
    model.guide = live_model(landmarks=True, seed=1)
    t = torch.tensor([600, 900, 600, 900])  # SNR 0.51 and 0.02, either side of GUIDE_MIN_SNR = 1 / 9
    assert cd.ALPHA_BAR[900] / (1 - cd.ALPHA_BAR[900]) < cd.GUIDE_MIN_SNR < cd.ALPHA_BAR[600] / (1 - cd.ALPHA_BAR[600])
    x, ab, w = torch.randn(4, 3, 16, 16), cd.ALPHA_BAR[t][:, None, None, None], 3.0  # one t per image
    marks = torch.rand(4, 9, 2)
    marks[2:] = float("nan")  # faces 0-1 have landmarks, 2-3 none
    with torch.no_grad():
        v, v_u, v_g = model(x, t, marks), model(x, t), model.guide(x, t)
        v_0 = torch.cat([v_u[:2], v_g[2:3], v[3:]])  # face 3, at SNR 0.02 without landmarks, is not guided
        x0, _ = cd.denoise(model, x, t, ab, None, marks, guidance=w)
        torch.testing.assert_close(x0, cd.predict_x0_eps(v_0 + w * (v - v_0), x, ab)[0].clamp(-1, 1), atol=1e-5, rtol=0)


def test_sampling_follows_the_models_guide_unless_told_guidance_1():
    model = live_model(landmarks=True)

    def run(**options):
        return cd.sample(model, 2, "dpm++", 4, generator=torch.Generator().manual_seed(0), precision="fp32",
                         progress=False, **options)

    alone = run()
    model.guide = copy.deepcopy(model)
    torch.testing.assert_close(run(), alone)  # a guide that predicts what the model does changes nothing
    model.guide = live_model(landmarks=True, seed=1)
    assert not torch.allclose(run(), alone, atol=1e-3)
    torch.testing.assert_close(run(guidance=1.0), alone)


@pytest.mark.parametrize("steps", [3, None], ids=["steps=3", "default steps"])
def test_unknown_sampler_name_raises_value_error(steps):
    with pytest.raises(ValueError, match="unknown sampler"):
        cd.sample(live_model(16), 1, "euler", steps, precision="fp32", progress=False)


def test_generate_returns_cpu_images_in_unit_range_reproducibly():
    model = live_model(16)
    model.train()
    images = cd.generate(model, 3, steps=3, sampler="dpm++", seed=7)
    assert not model.training, "generate puts the model in eval mode"
    assert images.shape == (3, 3, 16, 16)
    assert images.device.type == "cpu" and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, cd.generate(model, 3, steps=3, sampler="dpm++", seed=7))
    assert not torch.equal(images, cd.generate(model, 3, steps=3, sampler="dpm++", seed=8))


# ----------------------------------------------------------------------------------------------
# Samplers against oracles: the sampler maths, independent of any training
# ----------------------------------------------------------------------------------------------

def point_oracle(size=8):
    x_star = torch.rand(3, size, size, generator=torch.Generator().manual_seed(5)) * 1.8 - 0.9
    return PointOracle(x_star), x_star


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("dpm++", 10), ("ddpm", 50), ("dpm++", 3)])
def test_every_sampler_lands_on_the_single_training_image(sampler, steps):
    oracle, x_star = point_oracle()
    out = cd.sample(oracle, 4, sampler, steps, generator=torch.Generator().manual_seed(0),
                    precision="fp32", progress=False)
    torch.testing.assert_close(out, x_star.expand(4, -1, -1, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_deterministic_samplers_follow_the_exact_trajectory_for_a_single_image(sampler):
    """With x0 known exactly the probability-flow ODE is solved exactly by DDIM and by
    DPM-Solver++: each state is sqrt(ab) x_star + sqrt(1 - ab) eps with the starting eps."""
    oracle, x_star = point_oracle()
    steps = 10
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ab = cd.ALPHA_BAR[cd.time_grid(sampler, steps)]
    eps0 = (x_T - ab[0].sqrt() * x_star) / (1 - ab[0]).sqrt()
    states = {}
    cd.sample(oracle, 4, sampler, steps, x=x_T.clone(), precision="fp32", progress=False,
              on_step=lambda i, x, x0: states.__setitem__(i, x.clone()))
    for i in range(len(ab) - 1):
        expected = ab[i + 1].sqrt() * x_star + (1 - ab[i + 1]).sqrt() * eps0
        torch.testing.assert_close(states[i], expected, atol=2e-4, rtol=0, msg=f"{sampler} step {i}")


def test_ddpm_keeps_the_exact_noise_marginal_for_a_single_image():
    """With x0 known, each ancestral step draws from q(x_s | x_t, x0), so every state must be
    distributed as N(sqrt(ab_s) x_star, (1 - ab_s) I): the implied eps is standard normal."""
    oracle, x_star = point_oracle()
    steps, n = 25, 64
    ab = cd.ALPHA_BAR[cd.time_grid("ddpm", steps)]
    implied = {}

    def on_step(i, x, x0):
        if i < steps - 1:
            implied[i] = (x.double() - ab[i + 1].sqrt() * x_star) / (1 - ab[i + 1]).sqrt()

    cd.sample(oracle, n, "ddpm", steps, generator=torch.Generator().manual_seed(2), precision="fp32",
              progress=False, on_step=on_step)
    for i, eps in implied.items():
        assert abs(eps.mean().item()) < 0.05, f"step {i}: mean {eps.mean().item():.3f}"
        assert eps.std().item() == pytest.approx(1, abs=0.04), f"step {i}: std {eps.std().item():.3f}"


def sample_error(oracle, sampler, steps, x_start, t_start=cd.T - 1):
    out = cd.sample(oracle, len(x_start), sampler, steps, x=x_start.clone(), t_start=t_start,
                    precision="fp32", progress=False)
    return (out.double() - oracle.ode_endpoint(x_start, t_start)).abs().max().item(), out


def test_ddim_and_dpm_solver_converge_to_the_probability_flow_ode_solution():
    """Gaussian data: the exact ODE solution is known; both samplers must converge to it, and
    DPM-Solver++(2M), second order on a log-SNR grid, with a tenth of DDIM's steps."""
    oracle = gaussian_oracle()
    x_T = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ddim_100, _ = sample_error(oracle, "ddim", 100, x_T)
    ddim_500, ddim_out = sample_error(oracle, "ddim", 500, x_T)
    dpm_50, _ = sample_error(oracle, "dpm++", 50, x_T)
    dpm_500, dpm_out = sample_error(oracle, "dpm++", 500, x_T)
    assert ddim_500 < 0.01 and dpm_500 < 0.003
    assert ddim_500 < ddim_100 / 3, "DDIM error must fall about in proportion to 1 / steps"
    assert dpm_50 < ddim_500 / 2, "DPM-Solver++(2M) at 50 steps must beat DDIM at 500"
    torch.testing.assert_close(dpm_out, ddim_out, atol=0.01, rtol=0)


def test_partial_denoising_from_t_start_lands_on_the_ode_solution():
    """The reconstruction path: start from a noised image at t_start < T - 1."""
    oracle, t_start = gaussian_oracle(), 500
    g = torch.Generator().manual_seed(4)
    x0 = oracle.mu + oracle.s * torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64)
    x_t = cd.q_sample(x0, cd.ALPHA_BAR[t_start].double(), torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()
    error, _ = sample_error(oracle, "dpm++", 200, x_t, t_start)
    assert error < 0.003


def test_ddpm_samples_have_the_data_mean_and_std():
    oracle = gaussian_oracle()
    out = cd.sample(oracle, 64, "ddpm", 1000, generator=torch.Generator().manual_seed(2),
                    precision="fp32", progress=False)
    z = (out.double() - oracle.mu) / oracle.s
    assert abs(z.mean().item()) < 0.05
    assert z.std().item() == pytest.approx(1, abs=0.05)


def test_odd_widths_build_a_working_model():
    for size, width in ((32, 3), (16, 5), (64, 7)):
        model = cd.DiffusionModel(size, base_channels=width)
        assert model(torch.randn(2, 3, size, size), torch.tensor([1, 500])).shape == (2, 3, size, size)
