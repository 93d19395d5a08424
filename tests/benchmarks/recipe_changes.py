"""The default recipe for M minutes with one change, scored by `eval`; optionally with several EMA
profiles kept through the same run (EDM2's post-hoc EMA idea, Karras et al. 2024).

    python tests/benchmarks/recipe_changes.py --data DIR --minutes 12 --change none [--seed 0] \
        [--ema-k 3 5 10 20 40] [--ema-cap 0.999 1]

Changes (none is cat_diffusion's default):
    none        t uniform over the schedule, v-MSE weighted by (min(SNR, 5) + 1) / (SNR + 1), Muon for the
                hidden weights and AdamW for the rest (cat_diffusion.MuonAdamW), betas (0.9, 0.99),
                peak learning rate 2e-3, the first 40% of the steps at half size and batch 16, then 32
    adamw       AdamW for all weights (the default before Muon)
    v-mse       unweighted v-MSE (the default before that weighting)
    lognormal   EDM's noise levels (Karras et al. 2022): ln sigma ~ N(-1.2, 1.2^2), lambda = -ln sigma, nearest t
    min-snr     v-MSE weighted by min(SNR, 5) / (SNR + 1) (Hang et al. 2023: min-SNR-5 on the x0 error)
    beta2-0.999 AdamW betas (0.9, 0.999) (the default before (0.9, 0.99))
    lr-3e-3     peak learning rate 3e-3 instead of 2e-3
    warmup-50   50 steps of learning-rate warm-up instead of 200
    batch-16    batch 16 at full size (8 at half size): 16 throughout was the default before the batch grew
    mults-1124  channels per resolution x (1, 1, 2, 4) instead of (1, 2, 2, 4): 32 rather than 64 at 32x32
    progressive the first --low-share of the steps at half size and batch (TrainConfig.low_res_share, see
                cat_diffusion.half_resolution) instead of 40%; 0: full size throughout

--ema-k: an EMA profile k has the decay min(cap, (1 + n) / (k + n)) after n updates
(cat_diffusion.make_ema, default k = 10, cap = the run's ema_decay, 0.999): an average over the
last ~n / (k - 1) steps until the cap, sigma_rel ~0.24 / 0.16 / 0.09 / 0.05 / 0.02 for
k = 3 / 5 / 10 / 20 / 40. --ema-cap: the caps to keep (each with each k; 1 = never capped).
All profiles see the same steps, so they compare without the seed-to-seed spread of separate
runs; each is scored.

Every run previews as `train` does (cat_diffusion.previewer) and prints what its previews cost:
their count and seconds against the run's. The frames go to OUT/progress.gif.

Run it alone on the machine: the run plans its steps from its measured speed.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cat_diffusion as cd  # noqa: E402
import cat_eval as ce  # noqa: E402

LAMBDA = cd.half_log_snr(cd.ALPHA_BAR.double())
UNIFORM, MAKE_EMA = cd.draw_noise, cd.make_ema


def lognormal_noise(x0, generator):
    t, eps = UNIFORM(x0, generator)  # eps, and a t replaced below
    lam = 1.2 - 1.2 * torch.randn(len(x0), generator=generator, dtype=torch.float64)  # -ln sigma
    return (LAMBDA[None] - lam[:, None]).abs().argmin(1).to(t.device), eps


def timed(preview, seconds):
    """A preview that adds the seconds it takes to `seconds` (a list)."""
    def timed_preview(*args):
        tic = time.perf_counter()
        result = preview(*args)
        seconds.append(time.perf_counter() - tic)
        return result
    return timed_preview


# change -> (cat_diffusion names to replace, TrainConfig fields to set, DiffusionModel arguments)
CHANGES = {"none": ({}, {}, {}),
           "adamw": ({}, {"muon": False}, {}),
           "v-mse": ({"loss_weight": torch.ones_like}, {}, {}),
           "lognormal": ({"draw_noise": lognormal_noise}, {}, {}),
           "min-snr": ({"loss_weight": lambda snr: snr.clamp(max=5) / (snr + 1)}, {}, {}),
           "beta2-0.999": ({}, {"betas": (0.9, 0.999)}, {}),
           "lr-3e-3": ({}, {"lr": 3e-3}, {}),
           "warmup-50": ({}, {"warmup_steps": 50}, {}),
           "batch-16": ({}, {"batch_size": 16}, {}),
           "mults-1124": ({}, {}, {"channel_mults": (1, 1, 2, 4)}),
           "progressive": ({}, {}, {})}  # low_res_share: --low-share


def keep_profiles(ks, caps, profiles):
    """A make_ema for train() that also updates one extra EMA per (k, cap), kept in `profiles`
    (no caps: the run's own decay)."""
    def make_ema(model, decay):
        ema = MAKE_EMA(model, decay)  # the default profile: what train() checkpoints and returns
        profiles.update({(k, cap): MAKE_EMA(model, cap, k) for k in ks for cap in caps or [decay]})
        update = ema.update_parameters

        def update_all(m):
            update(m)
            for extra in profiles.values():
                extra.update_parameters(m)
        ema.update_parameters = update_all
        return ema
    return make_ema


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--change", choices=CHANGES, default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--low-share", type=float, default=0.0,
                   help="progressive: the share of the steps at half size (0: full size throughout)")
    p.add_argument("--ema-k", type=int, nargs="+", default=[], metavar="K")
    p.add_argument("--ema-cap", type=float, nargs="+", default=[], metavar="DECAY")
    p.add_argument("--out", type=Path, default=Path("outputs/recipe_changes"))
    args = p.parse_args()
    if args.ema_cap and not args.ema_k:
        p.error("--ema-cap needs --ema-k (the profiles' k)")
    train_set = cd.CatDataset(args.data, 64, split="train")
    val_set = cd.CatDataset(args.data, 64, split="val", quiet=True)
    names, fields, model_args = CHANGES[args.change]
    fields = {**fields, "low_res_share": args.low_share} if args.change == "progressive" else fields
    for name, fn in names.items():
        setattr(cd, name, fn)
    profiles = {}
    if args.ema_k:
        cd.make_ema = keep_profiles(args.ema_k, args.ema_cap, profiles)
    torch.manual_seed(args.seed)
    previews, tic = [], time.perf_counter()
    cfg = cd.TrainConfig(minutes=args.minutes, seed=args.seed, device="cpu", checkpoint_every=10 ** 9, **fields)
    ema, history = cd.train(cd.DiffusionModel(**model_args), train_set, cfg, args.out,
                            preview=timed(cd.previewer(args.out, args.seed, 64), previews))
    seconds = time.perf_counter() - tic
    cd.write_timeline(history, args.out / "progress.gif")
    print(f"previews: {len(previews)} in {sum(previews):.1f} s of the run's {seconds:.0f} s "
          f"({sum(previews) / seconds:.1%}); {history['faces'] / seconds:.1f} training images/s",
          flush=True)
    for label, model in [(args.change, ema)] if not profiles else \
            [(f"{args.change}, EMA k {k} cap {cap:g}", e.module.eval()) for (k, cap), e in profiles.items()]:
        r = ce.evaluate(model, train_set.faces, val_set.faces, 1000)
        levels = " / ".join(f"{v:.1f}" for v in r["swd"])
        print(f"{label}, {args.minutes:g} minutes, seed {args.seed}: {len(history['loss'])} steps, SWD "
              f"{r['swd_mean']:.1f} ({levels}), / floor {r['swd_mean'] / r['floor_mean']:.2f}, "
              f"memorisation {r['memorisation']:.2f}", flush=True)


if __name__ == "__main__":
    main()
