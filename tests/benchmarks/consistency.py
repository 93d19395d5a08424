"""One-step students by consistency instead of `distill`'s regression, scored by `eval`.

    python tests/benchmarks/consistency.py --model TEACHER --data DIR --method ect|cd --minutes 12 [--seed 0] [-n 1000]

Both start from the teacher's weights, as distill's students do, and train with `cat_diffusion.train`
on distill's recipe (`DISTILL`) for `--minutes`. The student is the consistency function
f(x_t, t) = the x0 its v-prediction gives, which tends to x_t as t -> 0 (the boundary condition);
it samples in one step from pure noise at T_MAX, sigma 71, near EDM's sigma_max = 80 (the top
timestep's sigma, 20,291, is an artefact of the schedule's capped beta: ECT's noise levels never reach it).

Each training step pairs a noise level sigma_t with a nearer one sigma_r (sigma = sqrt((1 - alpha_bar)
/ alpha_bar), EDM's; each mapped to the nearest timestep) and pulls f(x_t, t) towards f(x_r, r) of the
student itself without gradient (Song et al. 2023; iCT, Song and Dhariwal 2023):
    ect  easy consistency tuning (Geng et al. 2024): x_r is x_t's x0 and noise at level r, no teacher;
    cd   consistency distillation: x_r is the teacher's DDIM step from x_t to r (its first-order
         DPM-Solver++ step).
ECT's recipe: ln sigma_t ~ N(-1.1, 2^2), capped at T_MAX's; sigma_r = sigma_t (1 - n(sigma_t) / 2^stage) with
n(sigma) = 1 + 8 sigmoid(-sigma), floored at the clean image, the stage counting STAGES equal parts of
the run's minutes (stage 0: r is the clean image, the diffusion loss in x0); the pseudo-Huber
distance with c = 0.00054 sqrt(3 S^2) weighted by 1 / (sigma_t - sigma_r).

Run it alone on the machine: the run plans its steps, and its stages, from the clock.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cat_diffusion as cd  # noqa: E402
import cat_eval as ce  # noqa: E402

STAGES = 8
T_MAX = 990
SIGMA = ((1 - cd.ALPHA_BAR) / cd.ALPHA_BAR).sqrt()  # EDM's sigma of each timestep, rising with t


def nearest_t(sigma):
    """The timestep whose sigma is nearest in log (-1: the clean image, for sigma below t = 0's)."""
    t = (SIGMA.log()[None] - sigma.log()[:, None]).abs().argmin(1)
    return torch.where(sigma < SIGMA[0], -1, t)


def consistency_loss(method, teacher, minutes, dtype, guidance):
    """The student's loss, `diffusion_loss`'s signature: `t` is replaced by ECT's draw, `eps` kept."""
    start = []  # the first call's time: the stages follow the clock, as the run's plan does

    def f(model, x, t, landmarks):
        """The consistency function: the x0 of the model's v at timestep t; x itself at the clean image (t = -1)."""
        ab = cd.ALPHA_BAR.to(x.device)[t.clamp(min=0)][:, None, None, None]
        x0 = cd.predict_x0_eps(model(x, t.clamp(min=0), landmarks).float(), x, ab)[0]
        return torch.where((t < 0)[:, None, None, None], x, x0)

    def loss(model, x0, t, eps, alpha_bar, landmarks=None):
        start[:] = start or [time.perf_counter()]
        stage = min(STAGES - 1, int(STAGES * (time.perf_counter() - start[0]) / (60 * minutes)))
        sigma = (-1.1 + 2.0 * torch.randn(len(x0), dtype=torch.float64)).exp().float().clamp(max=float(SIGMA[T_MAX]))
        t = nearest_t(sigma).clamp(min=0).to(x0.device)  # the nearest timestep, 0 below t = 0's
        sigma_t = SIGMA.to(x0.device)[t]
        r = nearest_t((sigma_t * (1 - (1 + 8 * torch.sigmoid(-sigma_t)) / 2 ** stage)).clamp(min=0).cpu())
        r = torch.minimum(r.to(x0.device), t - 1)  # r < t always
        ab_t = alpha_bar[t][:, None, None, None]
        ab_r = torch.cat([alpha_bar, alpha_bar.new_ones(1)])[r][:, None, None, None]  # index -1: the clean image
        x_t = cd.q_sample(x0, ab_t, eps)
        with torch.no_grad():
            if method == "ect":
                x_r = cd.q_sample(x0, ab_r, eps)
            else:
                x0_teacher, eps_teacher = cd.denoise(teacher, x_t, t, ab_t, dtype, landmarks, guidance)
                x_r = cd.ddim_step(x0_teacher, eps_teacher, ab_r)
            target = f(model, x_r, r, landmarks)
        c = 0.00054 * math.sqrt(x0[0].numel())
        distance = ((f(model, x_t, t, landmarks) - target).square().flatten(1).sum(1) + c ** 2).sqrt() - c
        sigma_r = torch.where(r < 0, 0.0, SIGMA.to(x0.device)[r.clamp(min=0)])
        return (distance / (sigma_t - sigma_r)).mean()

    return loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the teacher: a trained model or its checkpoint.pt")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--method", choices=("ect", "cd"), required=True)
    p.add_argument("--minutes", type=float, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-n", type=int, default=1000, help="samples to score")
    p.add_argument("--out", type=Path, default=Path("outputs/consistency"))
    args = p.parse_args()
    teacher = cd.load_model(None, args.model)
    train_set = cd.CatDataset(args.data, teacher.config["image_size"], split="train")
    val_set = cd.CatDataset(args.data, teacher.config["image_size"], split="val", quiet=True)
    torch.manual_seed(args.seed)
    cfg = cd.TrainConfig(**{**cd.DISTILL, "minutes": args.minutes, "seed": args.seed, "device": "cpu",
                            "checkpoint_every": 10 ** 9})
    args.out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    ema, history = cd.distill(teacher, train_set, 1, cfg, args.out,
                              preview=cd.previewer(args.out, args.seed, teacher.config["image_size"]),
                              objective=lambda teacher, steps, dtype, guidance:
                              consistency_loss(args.method, teacher, args.minutes, dtype, guidance))
    seconds = time.perf_counter() - tic
    cd.save_model(ema, args.out / f"{args.method}")
    cd.write_timeline(history, args.out / "progress.gif")
    g = torch.Generator().manual_seed(args.seed)  # as eval draws its noise
    samples = cd.sample(ema, args.n, "student", 1, t_start=T_MAX, generator=g).cpu()
    r = ce.sample_quality(samples, train_set.faces, val_set.faces, args.seed)
    print(f"{args.method}, {args.minutes:g} minutes, seed {args.seed}: {len(history['loss'])} steps "
          f"({history['faces'] / seconds:.1f} faces/s), 1 step: {ce.quality_line(r)}", flush=True)


if __name__ == "__main__":
    main()
