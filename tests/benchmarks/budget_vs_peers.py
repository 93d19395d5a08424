"""Equal budget, equal data, one judge: cat_diffusion against the codebases people would otherwise use.

    python -m pip install denoising-diffusion-pytorch diffusers   # for this benchmark only
    python tests/benchmarks/budget_vs_peers.py --data DIR --minutes 10 [--minutes 30] [--json budget.json]

Every contender trains on the same aligned training faces (CatDataset's uint8 tensors at 64x64,
random horizontal flips) for the same wall-clock minutes, run alone on the machine, then samples
the same number of faces with its fast sampler; all are scored by cat_diffusion's `sample_quality`
against the held-out faces (SWD per level, its ratio to the real-vs-real floor, memorisation).

    ours                       DiffusionModel() and the default recipe, train(..., minutes=M), DPM-Solver++ 20
    lucidrains-dimD-lrL        denoising-diffusion-pytorch: GaussianDiffusion(Unet(dim=D, dim_mults=(1, 2, 4, 8)))
                               with its own defaults (pred_v, sigmoid schedule) and its Trainer's (batch 16,
                               Adam betas (0.9, 0.99), EMA 0.995 every 10 steps, gradient clipping 1), DDIM 50
    diffusers-small-lrL        diffusers' UNet2DModel + DDPMScheduler as its train_unconditional.py example trains
                               them (epsilon, linear betas, AdamW betas (0.95, 0.999), weight decay 1e-6, cosine
                               schedule after 500 warm-up steps, EMAModel power 3/4, batch 16), with small
                               block_out_channels (32, 64, 64, 128); DDIM 50

Each finished run is appended to the JSON file and skipped when the script runs again, so the table
can be made in parts (--only NAME to run one contender). Writes quality_vs_time.png beside the JSON.
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cat_diffusion as cd  # noqa: E402
import cat_eval as ce  # noqa: E402


def batches(data, batch):
    """Endless batches in [0, 1], shuffled and flipped as cat_diffusion's own training does
    (epoch_order, make_batch)."""
    for epoch in itertools.count():
        order, flips = cd.epoch_order(len(data), 0, epoch)
        for idx in order[:len(order) // batch * batch].split(batch):
            yield (cd.make_batch(data.faces, data.landmarks, idx, flips[idx], "cpu")[0] + 1) / 2


def train_for(seconds, step, plan=None):
    """Call `step()` until `seconds` of wall clock are spent; `plan(total_steps)` is told, after 10
    steps, how many steps the budget holds at the speed so far (for a learning-rate schedule)."""
    tic, steps = time.perf_counter(), 0
    while time.perf_counter() - tic < seconds:
        step()
        steps += 1
        if steps == 10 and plan:
            plan(int(seconds / ((time.perf_counter() - tic) / steps)))
    return steps


def ours(train_set, minutes, n, out):
    torch.manual_seed(0)
    model = cd.DiffusionModel()
    cfg = cd.TrainConfig(minutes=minutes, device="cpu", checkpoint_every=10 ** 9)
    ema, history = cd.train(model, train_set, cfg, out)
    tic = time.perf_counter()
    samples = cd.sample(ema, n, generator=torch.Generator().manual_seed(0))
    return dict(steps=len(history["loss"]), batch=cfg.batch_size, params=count(model),
                sample_seconds=time.perf_counter() - tic), samples


def lucidrains(train_set, minutes, n, out, dim, lr):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA
    torch.manual_seed(0)
    unet = Unet(dim=dim, dim_mults=(1, 2, 4, 8))
    diffusion = GaussianDiffusion(unet, image_size=64, timesteps=1000, sampling_timesteps=50)
    opt = torch.optim.Adam(diffusion.parameters(), lr=lr, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10)
    data = batches(train_set, 16)

    def step():
        loss = diffusion(next(data))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        ema.update()

    steps = train_for(60 * minutes, step)
    tic = time.perf_counter()
    with torch.no_grad():
        samples = torch.cat([ema.ema_model.sample(batch_size=len(c)) for c in torch.arange(n).split(64)])
    return dict(steps=steps, batch=16, params=count(unet), sample_seconds=time.perf_counter() - tic), samples * 2 - 1


def diffusers_small(train_set, minutes, n, out, lr):
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(32, 64, 64, 128),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    sched = [None]
    ema = EMAModel(unet.parameters(), inv_gamma=1.0, power=0.75, decay=0.9999, use_ema_warmup=True)
    data = batches(train_set, 16)
    g = torch.Generator().manual_seed(0)

    def plan(total):
        sched[0] = get_cosine_schedule_with_warmup(opt, num_warmup_steps=500, num_training_steps=total)
        for _ in range(10):  # the steps already taken
            sched[0].step()

    def step():
        x0 = next(data) * 2 - 1
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        loss = torch.nn.functional.mse_loss(unet(noise_scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if sched[0]:
            sched[0].step()
        ema.step(unet.parameters())

    steps = train_for(60 * minutes, step, plan)
    ema.copy_to(unet.parameters())
    ddim = DDIMScheduler.from_config(noise_scheduler.config)
    ddim.set_timesteps(50)
    tic = time.perf_counter()
    out_images = []
    with torch.no_grad():
        for chunk in torch.arange(n).split(64):
            x = torch.randn(len(chunk), 3, 64, 64, generator=g)
            for t in ddim.timesteps:
                x = ddim.step(unet(x, t).sample, t, x).prev_sample
            out_images.append(x.clamp(-1, 1))
    return dict(steps=steps, batch=16, params=count(unet), sample_seconds=time.perf_counter() - tic), torch.cat(out_images)


def count(model):
    return sum(p.numel() for p in model.parameters())


CONTENDERS = {
    "ours": ours,
    **{f"lucidrains-dim{d}-lr{lr:g}": (lambda d, lr: lambda *a: lucidrains(*a, dim=d, lr=lr))(d, lr)
       for d in (16, 64) for lr in (1e-4, 1e-3)},
    **{f"diffusers-small-lr{lr:g}": (lambda lr: lambda *a: diffusers_small(*a, lr=lr))(lr) for lr in (1e-4, 1e-3)},
}


def plot(rows, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["contender"] for r in rows):
        pts = sorted((r["minutes"], r["swd_mean"] / r["floor_mean"]) for r in rows if r["contender"] == name)
        ax.plot(*zip(*pts), "o-", label=name, lw=2.5 if name == "ours" else 1.2)
    ax.set(xlabel="training minutes (2 CPU cores)", ylabel="SWD / real-vs-real floor (lower is better)",
           yscale="log", title="Cat faces at an equal budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="CAT-format folder (the aligned faces' source)")
    parser.add_argument("--minutes", type=float, action="append", required=True, help="budget; repeat for several")
    parser.add_argument("-n", type=int, default=361, help="samples per contender (the same for all)")
    parser.add_argument("--json", type=Path, default=Path("budget_vs_peers.json"))
    parser.add_argument("--only", choices=list(CONTENDERS), action="append", help="run only these contenders")
    args = parser.parse_args()
    train_set = cd.CatDataset(args.data, 64, split="train")
    val_set = cd.CatDataset(args.data, 64, split="val", quiet=True)
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    for minutes in args.minutes:
        for name in args.only or CONTENDERS:
            if any(r["contender"] == name and r["minutes"] == minutes and r["n"] == args.n for r in rows):
                continue
            print(f"{name}: {minutes:g} minutes", file=sys.stderr)
            out = args.json.parent / f"budget-{name}-{minutes:g}min"
            info, samples = CONTENDERS[name](train_set, minutes, args.n, out)
            quality = ce.sample_quality(samples.float().cpu(), train_set.faces, val_set.faces)
            rows.append(dict(contender=name, minutes=minutes, **info, **quality))
            ce.write_json(args.json, rows)  # after every run: the table can be made in parts
    print(f"{'contender':<26}{'min':>5}{'params':>9}{'steps':>8}{'SWD':>8}{'/floor':>8}{'memo':>7}{'sample s':>10}")
    for r in sorted(rows, key=lambda r: (r["minutes"], r["swd_mean"])):
        print(f"{r['contender']:<26}{r['minutes']:>5g}{r['params'] / 1e6:>8.2f}M{r['steps']:>8}{r['swd_mean']:>8.1f}"
              f"{r['swd_mean'] / r['floor_mean']:>8.2f}{r['memorisation']:>7.2f}{r['sample_seconds']:>10.0f}")
    plot(rows, args.json.with_name("quality_vs_time.png"))


if __name__ == "__main__":
    main()
