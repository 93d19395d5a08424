"""Where training spends its noise levels: the default recipe for M minutes with one change, scored by `eval`.

    python tests/benchmarks/noise_levels.py --data DIR --minutes 10 --change lognormal [--seed 0]

    none        cat_diffusion's own draw_noise and diffusion_loss: t uniform over the schedule, v-MSE
                weighted by (min(SNR, 5) + 1) / (SNR + 1) (v's weights up to SNR 5, min-SNR's above)
    v-mse       unweighted v-MSE (the default before that weighting)
    lognormal   EDM's noise levels (Karras et al. 2022): ln sigma ~ N(-1.2, 1.2^2), lambda = -ln sigma, nearest t
    min-snr     v-MSE weighted by min(SNR, 5) / (SNR + 1) (Hang et al. 2023: min-SNR-5 on the x0 error)

Run it alone on the machine: the run plans its steps from the speed of its first ones.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cat_diffusion as cd  # noqa: E402

LAMBDA = cd.half_log_snr(cd.ALPHA_BAR.double())
UNIFORM = cd.draw_noise


def lognormal_noise(x0, generator):
    t, eps = UNIFORM(x0, generator)  # eps, and a t replaced below
    lam = 1.2 - 1.2 * torch.randn(len(x0), generator=generator, dtype=torch.float64)  # -ln sigma
    return (LAMBDA[None] - lam[:, None]).abs().argmin(1).to(t.device), eps


CHANGES = {"none": {}, "v-mse": {"loss_weight": torch.ones_like}, "lognormal": {"draw_noise": lognormal_noise},
           "min-snr": {"loss_weight": lambda snr: snr.clamp(max=5) / (snr + 1)}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--change", choices=CHANGES, default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/noise_levels"))
    args = p.parse_args()
    train_set = cd.CatDataset(args.data, 64, split="train")
    val_set = cd.CatDataset(args.data, 64, split="val", quiet=True)
    for name, fn in CHANGES[args.change].items():
        setattr(cd, name, fn)
    torch.manual_seed(args.seed)
    ema, history = cd.train(cd.DiffusionModel(), train_set, cd.TrainConfig(
        minutes=args.minutes, seed=args.seed, device="cpu", checkpoint_every=10 ** 9), args.out)
    r = cd.evaluate(ema, train_set.faces, val_set.faces, 1000)
    levels = " / ".join(f"{v:.1f}" for v in r["swd"])
    print(f"{args.change}, {args.minutes:g} minutes, seed {args.seed}: {len(history['loss'])} steps, SWD "
          f"{r['swd_mean']:.1f} ({levels}), / floor {r['swd_mean'] / r['floor_mean']:.2f}, "
          f"memorisation {r['memorisation']:.2f}")


if __name__ == "__main__":
    main()
