"""Side by side: cat_diffusion against lucidrains' denoising-diffusion-pytorch, in one process.

    python -m pip install denoising-diffusion-pytorch   # not a project dependency
    python tests/benchmarks/bench_vs_denoising_diffusion_pytorch.py [--rounds 3] [--batch-size 16]

Contenders, timed in alternating rounds at the same batch size and 64x64:
  reference   Unet(dim=64, dim_mults=(1, 2, 4, 8)) in GaussianDiffusion(timesteps=1000,
              sampling_timesteps=50), fp32 as it runs on a CPU;
  matched     our DiffusionModel at about the reference's parameter count;
  default     our DiffusionModel() as `python cat_diffusion.py` trains it.
Sampling is timed per denoising step and scaled to each contender's default sampler (reference:
DDIM 50; ours: DPM-Solver++ 20). Peak RSS comes from a fresh child process per contender doing the
same training steps, since one process's peak covers everything it ever ran (Linux only).
"""
import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cat_diffusion as cd  # noqa: E402

MATCHED = dict(base_channels=64, channel_mults=(1, 2, 4, 12), blocks=2, attention_below=8)


def reference(batch):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    unet = Unet(dim=64, dim_mults=(1, 2, 4, 8))
    diffusion = GaussianDiffusion(unet, image_size=64, timesteps=1000, sampling_timesteps=50)
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, 64, 64)

    def train_step():
        loss = diffusion(images)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sample_step():  # one U-Net evaluation, as one DDIM step costs
        with torch.no_grad():
            unet(torch.randn(batch, 3, 64, 64), torch.full((batch,), 500))

    return unet, train_step, sample_step, 50


def ours(batch, **config):
    model = cd.DiffusionModel(64, **config)
    device = torch.device("cpu")
    dtype = cd.autocast_dtype(device)
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last) * 2 - 1

    def train_step():
        with cd.autocast(device, dtype):
            loss = cd.diffusion_loss(model, x0, *cd.draw_noise(x0, g), cd.ALPHA_BAR)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sample_step():
        with torch.no_grad():
            cd.denoise(model, torch.randn(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last),
                       torch.tensor(500), cd.ALPHA_BAR[500], dtype)

    return model, train_step, sample_step, cd.SAMPLERS["dpm++"]


CONTENDERS = {"reference": reference, "matched": lambda b: ours(b, **MATCHED), "default": ours}


def child_peak_rss(name, batch, steps):
    """Peak RSS (MB) of a fresh process that builds one contender and trains `steps` steps."""
    cmd = [sys.executable, __file__, "--child", name, "--batch-size", str(batch), "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed training steps per round")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _, train_step, _, _ = CONTENDERS[args.child](args.batch_size)
        for _ in range(args.steps + 1):
            train_step()
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forking parent.
        status = Path("/proc/self/status").read_text()
        print(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024)
        return
    if importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        raise SystemExit("denoising-diffusion-pytorch is not installed: "
                         "python -m pip install denoising-diffusion-pytorch")
    built = {name: make(args.batch_size) for name, make in CONTENDERS.items()}
    train_s = {name: [] for name in built}
    step_s = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (_, train_step, sample_step, _) in built.items():
            train_step()  # warm-up
            tic = time.perf_counter()
            for _ in range(args.steps):
                train_step()
            train_s[name].append((time.perf_counter() - tic) / args.steps)
            sample_step()
            tic = time.perf_counter()
            sample_step()
            step_s[name].append(time.perf_counter() - tic)
    rows = {}
    for name, (model, _, _, sampler_steps) in built.items():
        rows[name] = dict(
            parameters=sum(p.numel() for p in model.parameters()),
            train_images_per_s=args.batch_size / min(train_s[name]),
            sample_images_per_s=args.batch_size / (min(step_s[name]) * sampler_steps),
            sampler_steps=sampler_steps, peak_rss_mb=child_peak_rss(name, args.batch_size, args.steps))
    ref = rows["reference"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, 64x64, "
          f"best of {args.rounds} alternating rounds")
    print(f"{'':<10}{'params':>9}{'train img/s':>13}{'x ref':>7}{'sample img/s':>14}{'x ref':>7}{'peak RSS MB':>13}")
    for name, r in rows.items():
        print(f"{name:<10}{r['parameters'] / 1e6:8.1f}M{r['train_images_per_s']:13.2f}"
              f"{r['train_images_per_s'] / ref['train_images_per_s']:7.1f}{r['sample_images_per_s']:14.2f}"
              f"{r['sample_images_per_s'] / ref['sample_images_per_s']:7.1f}{r['peak_rss_mb']:13.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
