"""The default recipe for M minutes with one change, scored by `eval`; optionally with several EMA
profiles kept through the same run (EDM2's post-hoc EMA idea, Karras et al. 2024).

    python tests/benchmarks/recipe_changes.py --data DIR --minutes 12 --change none [--seed 0] \
        [--ema-k 3 5 10 20 40] [--ema-cap 0.999 1]

Changes (none is cat_diffusion's default):
    none        t uniform over the schedule, v-MSE weighted by (min(SNR, 5) + 1) / (SNR + 1), Muon for the
                hidden weights and AdamW for the rest (cat_diffusion.MuonAdamW), betas (0.9, 0.99),
                peak learning rate 2e-3, the first 40% of the steps at half size and batch 16, then 32,
                conditioned on the landmarks (dropped for 15% of the faces), scored unconditionally
    no-landmarks  trained without the landmarks (the default before them)
    adamw       AdamW for all weights (the default before Muon)
    v-mse       unweighted v-MSE (the default before that weighting)
    lognormal   EDM's noise levels (Karras et al. 2022): ln sigma ~ N(-1.2, 1.2^2), lambda = -ln sigma, nearest t
    min-snr     v-MSE weighted by min(SNR, 5) / (SNR + 1) (Hang et al. 2023: min-SNR-5 on the x0 error)
    beta2-0.999 AdamW betas (0.9, 0.999) (the default before (0.9, 0.99))
    warmup-50   50 steps of learning-rate warm-up instead of 200
    batch-16    batch 16 at full size (8 at half size): 16 throughout was the default before the batch grew
    mults-1124  channels per resolution x (1, 1, 2, 4) instead of (1, 2, 2, 4): 32 rather than 64 at 32x32
    progressive the first --low-share of the steps at half size and batch (TrainConfig.low_res_share, see
                cat_diffusion.half_resolution) instead of 40%; 0: full size throughout
    schedule-free  schedule-free AdamW (Defazio et al. 2024, the `schedulefree` package: pip install schedulefree)
                for all weights, warm-up then a constant learning rate; scored both as the run's EMA of its
                training point y and as its own average x (the weights the method evaluates)
    edm2-mp     EDM2's magnitude-preserving network (Karras et al. 2024, config G) on the default's layout:
                forced weight normalisation, no biases or norms but pixel norm, MP SiLU, sums and
                concatenation, Fourier noise embedding, average-pool down and nearest up (MPDiffusionModel)

--lr: the peak learning rate instead of the change's (2e-3; edm2-mp: 6e-2, the best of the four in RESULTS.md).

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
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cat_diffusion as cd  # noqa: E402
import cat_eval as ce  # noqa: E402

LAMBDA = cd.half_log_snr(cd.ALPHA_BAR.double())
UNIFORM, MAKE_EMA = cd.draw_noise, cd.make_ema


def lognormal_noise(x0, generator):
    t, eps = UNIFORM(x0, generator)  # eps, and a t replaced below
    lam = 1.2 - 1.2 * torch.randn(len(x0), generator=generator, dtype=torch.float64)  # -ln sigma
    return (LAMBDA[None] - lam[:, None]).abs().argmin(1).to(t.device), eps


OPTIMIZERS = []  # the schedule-free run's optimizer, to read its average x after the run


def schedule_free_optimizer(model, cfg):
    import schedulefree  # not a project dependency
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
    opt.train()  # the parameters hold y, where gradients are taken, until eval() moves them to x
    OPTIMIZERS.append(opt)
    return opt


def warmup_only(step, warmup, total):
    """warmup_cosine without its decay: schedule-free averaging replaces the schedule."""
    return min(1.0, (step + 1) / warmup)


def timed(preview, seconds):
    """A preview that adds the seconds it takes to `seconds` (a list)."""
    def timed_preview(*args):
        tic = time.perf_counter()
        result = preview(*args)
        seconds.append(time.perf_counter() - tic)
        return result
    return timed_preview


def normalize(x, dim=None, eps=1e-4):
    """x over its RMS along `dim` (default: all but the first), so each slice has unit RMS."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    return x / (eps + norm * math.sqrt(norm.numel() / x.numel())).to(x.dtype)


def mp_silu(x):
    return F.silu(x) / 0.596  # SiLU of a unit normal has RMS 0.596


def mp_sum(a, b, t=0.3):
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, t=0.5):
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=1)


class MPConv(nn.Module):
    """A convolution (kernel given) or linear layer whose weights are renormalised to unit RMS per output
    before each training step (forced weight normalisation) and used at unit norm per output."""

    def __init__(self, c_in, c_out, kernel=()):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, *kernel))

    def forward(self, x, gain=1.0):
        w = self.weight.float()
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        if w.ndim == 2:
            return x @ w.t().to(x.dtype)
        return F.conv2d(x, w.to(x.dtype), padding=w.shape[-1] // 2)


class MPBlock(nn.Module):
    """EDM2's block: encoder flavour (channel change, pixel norm, residual) or decoder flavour (residual,
    channel change), the noise embedding scaling the middle, self-attention after when `attention`."""

    def __init__(self, c_in, c_out, emb_dim, flavor, attention):
        super().__init__()
        self.flavor, self.heads = flavor, math.gcd(4, c_out)
        self.skip = MPConv(c_in, c_out, (1, 1)) if c_in != c_out else None
        self.res0 = MPConv(c_out if flavor == "enc" else c_in, c_out, (3, 3))
        self.emb, self.emb_gain = MPConv(emb_dim, c_out), nn.Parameter(torch.zeros([]))
        self.res1 = MPConv(c_out, c_out, (3, 3))
        self.qkv = MPConv(c_out, 3 * c_out, (1, 1)) if attention else None
        self.proj = MPConv(c_out, c_out, (1, 1)) if attention else None

    def forward(self, x, emb):
        if self.flavor == "enc":
            x = normalize(self.skip(x) if self.skip else x, dim=1)
        y = self.res0(mp_silu(x))
        y = mp_silu(y * (self.emb(emb, gain=self.emb_gain) + 1)[:, :, None, None].to(y.dtype))
        y = self.res1(y)
        if self.flavor == "dec" and self.skip:
            x = self.skip(x)
        x = mp_sum(x, y)
        if self.qkv:
            b, c, h, w = x.shape
            q, k, v = normalize(self.qkv(x).reshape(b, self.heads, c // self.heads, 3, h * w), dim=2).unbind(3)
            y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            x = mp_sum(x, self.proj(y.transpose(-1, -2).reshape(b, c, h, w)))
        return x.clip(-256, 256)


class MPDiffusionModel(cd.DiffusionModel):
    """cat_diffusion.DiffusionModel's layout (stages, widths, attention) built from EDM2's magnitude-preserving
    layers: the stem sees a constant channel, the head's output gain starts at 0."""

    def __init__(self, image_size=64, base_channels=32, channel_mults=(1, 2, 2, 4), blocks=1, attention_below=8,
                 dropout=0.0, landmarks=False, student_steps=0):
        nn.Module.__init__(self)
        self.config = dict(image_size=image_size, base_channels=base_channels, channel_mults=list(channel_mults),
                           blocks=blocks, attention_below=attention_below, dropout=dropout, landmarks=landmarks,
                           student_steps=student_steps)
        ch, res, emb_dim = [base_channels * m for m in channel_mults], [image_size >> i for i in range(4)], 4 * base_channels
        self.register_buffer("c_noise", -LAMBDA.float() / 4)  # ln(sigma) / 4, EDM2's noise input
        self.register_buffer("freqs", 2 * math.pi * torch.randn(base_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(base_channels))
        self.noise_emb = MPConv(base_channels, emb_dim)
        self.stem = MPConv(4, ch[0], (3, 3))

        def stage(c_in, c_out, r, flavor):
            return nn.ModuleList(MPBlock(c_in if j == 0 else c_out, c_out, emb_dim, flavor, r <= attention_below)
                                 for j in range(blocks))

        self.encoder = nn.ModuleList(stage(ch[max(i - 1, 0)], ch[i], res[i], "enc") for i in range(3))
        self.middle = stage(ch[2], ch[3], res[3], "enc")
        self.decoder = nn.ModuleList(stage(ch[i + 1] + ch[i], ch[i], res[i], "dec") for i in range(3))
        self.head, self.out_gain = MPConv(ch[0], 3, (3, 3)), nn.Parameter(torch.zeros([]))

    def forward(self, x, t, landmarks=None):
        fourier = torch.cos(self.c_noise[t][:, None] * self.freqs + self.phases) * math.sqrt(2)
        emb = mp_silu(self.noise_emb(fourier))
        h, skips = self.stem(torch.cat([x, torch.ones_like(x[:, :1])], dim=1)), []
        for i, stage in enumerate(self.encoder):
            for block in stage:
                h = block(F.avg_pool2d(h, 2) if i and block is stage[0] else h, emb)
            skips.append(h)
        h = F.avg_pool2d(h, 2)
        for block in self.middle:
            h = block(h, emb)
        for i in reversed(range(3)):
            h = mp_cat(F.interpolate(h, scale_factor=2, mode="nearest"), skips[i])
            for block in self.decoder[i]:
                h = block(h, emb)
        return self.head(h, gain=self.out_gain)


# change -> (cat_diffusion names to replace, TrainConfig fields to set, DiffusionModel arguments)
CHANGES = {"none": ({}, {}, {}),
           "no-landmarks": ({}, {}, {"landmarks": False}),
           "adamw": ({}, {"muon": False}, {}),
           "v-mse": ({"loss_weight": torch.ones_like}, {}, {}),
           "lognormal": ({"draw_noise": lognormal_noise}, {}, {}),
           "min-snr": ({"loss_weight": lambda snr: snr.clamp(max=5) / (snr + 1)}, {}, {}),
           "beta2-0.999": ({}, {"betas": (0.9, 0.999)}, {}),
           "warmup-50": ({}, {"warmup_steps": 50}, {}),
           "batch-16": ({}, {"batch_size": 16}, {}),
           "mults-1124": ({}, {}, {"channel_mults": (1, 1, 2, 4)}),
           "progressive": ({}, {}, {}),  # low_res_share: --low-share
           "schedule-free": ({"make_optimizer": schedule_free_optimizer, "warmup_cosine": warmup_only}, {}, {}),
           "edm2-mp": ({}, {"lr": 6e-2}, {})}
MODELS = {"edm2-mp": MPDiffusionModel}


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
    p.add_argument("-n", type=int, default=1000, help="samples to score")
    p.add_argument("--lr", type=float, help="the peak learning rate instead of the change's")
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
    fields = {**fields, "lr": args.lr} if args.lr else fields
    for name, fn in names.items():
        setattr(cd, name, fn)
    profiles = {}
    if args.ema_k:
        cd.make_ema = keep_profiles(args.ema_k, args.ema_cap, profiles)
    torch.manual_seed(args.seed)
    previews, tic = [], time.perf_counter()
    cfg = cd.TrainConfig(minutes=args.minutes, seed=args.seed, device="cpu", checkpoint_every=10 ** 9, **fields)
    model = MODELS.get(args.change, cd.DiffusionModel)(**model_args)
    ema, history = cd.train(model, train_set, cfg, args.out, preview=timed(cd.previewer(args.out, args.seed, 64), previews))
    seconds = time.perf_counter() - tic
    cd.write_timeline(history, args.out / "progress.gif")
    print(f"previews: {len(previews)} in {sum(previews):.1f} s of the run's {seconds:.0f} s "
          f"({sum(previews) / seconds:.1%}); {history['faces'] / seconds:.1f} training images/s",
          flush=True)
    scored = [(args.change, ema)] if not profiles else \
        [(f"{args.change}, EMA k {k} cap {cap:g}", e.module.eval()) for (k, cap), e in profiles.items()]
    for opt in OPTIMIZERS:
        opt.eval()  # the model's parameters become schedule-free's average x
        scored.append((f"{args.change}, its average x", model.eval()))
    for label, model in scored:
        r = ce.evaluate(model, train_set.faces, val_set.faces, args.n)
        print(f"{label}, {args.minutes:g} minutes, seed {args.seed}: {len(history['loss'])} steps, "
              f"{ce.quality_line(r)}", flush=True)


if __name__ == "__main__":
    main()
