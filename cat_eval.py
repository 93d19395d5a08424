"""cat_eval: how good and how fast a trained model is.

    python cat_diffusion.py eval --data DIR          # SWD against held-out faces, memorisation
    python cat_diffusion.py fit-landmarks --data DIR # the landmark finder that judges landmark models
    python cat_diffusion.py bench                    # training and sampling speed, FLOPs, utilisation

It consumes models through cat_diffusion's public API and is imported only when one of these
commands runs.
"""
import json
import math
import resource
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from cat_diffusion import (ALPHA_BAR, K, SAMPLERS, CatDataset, CheckpointError, DiffusionModel, TrainConfig,
                           atomic_write, autocast, autocast_dtype, claim_outputs, defaults_of, diffusion_loss,
                           draw_noise, epoch_order, group_norm, guidance_of, load_model, make_optimizer,
                           make_batch, model_device, model_path, pick_device, sample, sampler_of, save_model,
                           to_model_range)


# ----------------------------------------------------------------------------------------------
# Sample quality: sliced Wasserstein distance of Laplacian-pyramid patches; memorisation
# ----------------------------------------------------------------------------------------------

def laplacian_pyramid(images, levels):
    """Band-pass levels, finest first, and the coarsest Gaussian level last (Burt & Adelson 1983),
    with the 5-tap binomial filter used by Karras et al. 2018."""
    k = torch.tensor([1.0, 4, 6, 4, 1])
    kernel = (k[:, None] * k[None] / 256).expand(3, 1, 5, 5).to(images)
    pyramid, g = [], images
    for _ in range(levels - 1):
        small = F.conv2d(F.pad(g, (2, 2, 2, 2), mode="reflect"), kernel, stride=2, groups=3)
        up = F.conv_transpose2d(small, 4 * kernel, stride=2, padding=2, output_padding=1, groups=3)
        pyramid.append(g - up)
        g = small
    return pyramid + [g]


def patch_descriptors(level, per_image, generator):
    """`per_image` random 7x7 patches per image, each channel normalised over the set (appendix D).
    Patches are gathered at their positions, not unfolded everywhere: 1,000 images' metrics in seconds."""
    n, c, h, w = level.shape
    y = torch.randint(0, h - 6, (n, per_image, 1, 1), generator=generator) + torch.arange(7)[:, None]
    x = torch.randint(0, w - 6, (n, per_image, 1, 1), generator=generator) + torch.arange(7)
    desc = level.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None, None], y, x]  # (n, per_image, 7, 7, c)
    desc = desc.permute(0, 1, 4, 2, 3).reshape(-1, c, 49)
    desc = (desc - desc.mean((0, 2), keepdim=True)) / desc.std((0, 2), keepdim=True).clamp_min(1e-8)
    return desc.flatten(1)


def sliced_wasserstein(a, b, generator, projections=512):
    """Mean over random unit directions of the 1-D Wasserstein distance between projections
    (projections sorted along rows: sorting is the cost)."""
    dirs = F.normalize(torch.randn(projections, a.shape[1], generator=generator), dim=1)
    pa, pb = (dirs @ a.T).sort(1).values, (dirs @ b.T).sort(1).values
    return (pa - pb).abs().mean().item()


def swd(images_a, images_b, seed=0, per_image=128, min_size=16):
    """SWD x 1e3 per pyramid level (finest first) between two equal-size sets in [-1, 1]
    (Karras et al. 2018, "Progressive Growing of GANs", appendix D)."""
    g = torch.Generator().manual_seed(seed)
    levels = int(math.log2(images_a.shape[-1] // min_size)) + 1
    pyr_a, pyr_b = laplacian_pyramid(images_a.float().cpu(), levels), laplacian_pyramid(images_b.float().cpu(), levels)
    return [1e3 * sliced_wasserstein(patch_descriptors(la, per_image, g), patch_descriptors(lb, per_image, g), g)
            for la, lb in zip(pyr_a, pyr_b)]


def nearest_distance(queries, references, size=32):
    """Mean L2 distance from each query to its nearest reference, at `size` px."""
    def flat(x):
        return F.interpolate(x.float().cpu(), size=size, mode="area").flatten(1)
    q, r = flat(queries), flat(references)
    return torch.cat([torch.cdist(chunk, r).min(1).values for chunk in q.split(256)]).mean().item()


def windows(x, m):
    """The ceil(len(x) / m) sets of `m` consecutive items that tile `x`, evenly spaced (the last ends at its end)."""
    k = -(-len(x) // m)
    return [x[round(i * (len(x) - m) / max(k - 1, 1)):][:m] for i in range(k)]


def sample_quality(samples, train_faces, val_faces, seed=0):
    """How close `samples` ([-1, 1]) come to held-out faces: SWD per level, the real-vs-real floor,
    memorisation. Faces are uint8 (N, 3, S, S). SWD compares sets of one size m = min(len(samples),
    len(val)), so it is the mean over the sets of m samples that tile all of them (`windows`), and the
    floor the mean over as many training faces against the validation faces: for one model, one set
    of 361 scored 18.4 to 22.8 with three sampling seeds, mostly at the low-pass level (RESULTS.md)."""
    m = min(len(samples), len(val_faces))
    if len(train_faces) < m:
        raise ValueError(f"need at least {m} training faces for the real-vs-real floor")
    val, train = to_model_range(val_faces[:m]), to_model_range(train_faces)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:len(samples)]

    def mean_swd(sets):
        per_set = [swd(s, val, seed) for s in sets]
        return [sum(v) / len(per_set) for v in zip(*per_set)], [sum(v) / len(v) for v in per_set]
    (fake, sets), (floor, _) = mean_swd(windows(samples, m)), mean_swd(windows(train[order], m))
    memorisation = nearest_distance(samples, train) / nearest_distance(val, train)
    return dict(n=len(samples), m=m, swd=fake, swd_mean=sum(fake) / len(fake), swd_sets=sets, floor=floor,
                floor_mean=sum(floor) / len(floor), memorisation=memorisation)


def quality_line(r):
    """A `sample_quality` result in one line, as the benchmarks print it."""
    levels = " / ".join(f"{v:.1f}" for v in r["swd"])
    return f"SWD {r['swd_mean']:.1f} ({levels}), / floor {r['swd_mean'] / r['floor_mean']:.2f}, memorisation {r['memorisation']:.2f}"


def evaluate(model, train_faces, val_faces, n=1000, sampler=None, steps=None, seed=0):
    """`sample_quality` of `n` samples of `model`."""
    g = torch.Generator(model_device(model)).manual_seed(seed)
    samples = sample(model, n, sampler, steps, generator=g).cpu()
    sampler, steps = sampler_of(model, sampler, steps)
    return dict(sample_quality(samples, train_faces, val_faces, seed), sampler=sampler, steps=steps)


# ----------------------------------------------------------------------------------------------
# The landmark finder: judges whether landmark-guided samples follow their landmarks
# ----------------------------------------------------------------------------------------------

class LandmarkNet(nn.Module):
    """A small CNN that finds the 9 landmarks in an aligned face ([-1, 1] images -> (B, 9, 2) in
    [0, 1] face coordinates): the judge of whether landmark-guided samples follow their landmarks."""

    LIMITS = {"image_size": (8, 256), "width": (1, 512)}  # what a model file may ask for (see checked_config)

    def __init__(self, image_size=64, width=32):
        super().__init__()
        self.config = dict(image_size=image_size, width=width)
        layers, c = [], 3
        for i in range(4):  # four halvings, then a linear read-out that keeps where features are
            layers += [nn.Conv2d(c, width << i, 3, stride=2, padding=1), group_norm(width << i), nn.SiLU(),
                       nn.Conv2d(width << i, width << i, 3, padding=1), group_norm(width << i), nn.SiLU()]
            c = width << i
        self.features = nn.Sequential(*layers, nn.Flatten())
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2  # a stride-2 convolution with padding 1 rounds up
        self.head = nn.Linear(c * side ** 2, 2 * K)

    def forward(self, x):
        return self.head(self.features(x)).view(-1, K, 2) + 0.5


def landmark_error(net, images, landmarks, batch_size=256):
    """Mean distance in pixels between the landmarks `net` finds in `images` ([-1, 1]) and
    `landmarks`."""
    device = model_device(net)
    dtype = autocast_dtype(device)
    net.eval()
    found = []
    with torch.no_grad(), autocast(device, dtype):
        for chunk in images.split(batch_size):
            found.append(net(chunk.to(device, memory_format=torch.channels_last)).float().cpu())
    return ((torch.cat(found) - landmarks.cpu()) * images.shape[-1]).norm(dim=-1).mean().item()


def fit_landmarks(net, data, val_data, epochs=15, batch_size=64, lr=2e-3, seed=0, device="auto"):
    """Train `net` on `data` (a CatDataset or anything with .faces and .landmarks; flipped at random)
    with an L1 loss; returns the validation error in pixels after each epoch."""
    device = pick_device(device)
    dtype = autocast_dtype(device)
    net.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n = len(data.faces)
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    errors = []
    for epoch in tqdm(range(epochs), desc="landmark net", unit="epoch"):
        net.train()
        order, flips = epoch_order(n, seed, epoch)
        for idx in order[:steps_per_epoch * batch_size].split(batch_size):
            x, marks = make_batch(data.faces, data.landmarks, idx, flips[idx], device)
            with autocast(device, dtype):
                loss = F.l1_loss(net(x).float(), marks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        errors.append(landmark_error(net, to_model_range(val_data.faces), val_data.landmarks))
    return errors


def evaluate_landmarks(model, net, val_faces, val_landmarks, n=256, sampler=None, steps=None,
                       guidance=1.0, seed=0):
    """The landmark net's mean error (pixels) on held-out real faces, on samples conditioned on those
    faces' landmarks (against the requested landmarks), and on unconditional samples (against the
    same landmarks): conditioning works when the middle one is near the first and far below the last.
    Also the SWD of the conditioned samples against those faces (guidance trades it for adherence)."""
    m = min(n, len(val_faces))
    marks = val_landmarks[:m]
    g = torch.Generator(model_device(model)).manual_seed(seed)
    conditioned = sample(model, m, sampler, steps, generator=g, landmarks=marks, guidance=guidance)
    unconditional = sample(model, m, sampler, steps, generator=g)
    real = to_model_range(val_faces[:m])
    swd_conditioned = swd(conditioned, real, seed)
    return dict(n=m, guidance=guidance, real=landmark_error(net, real, marks),
                conditioned=landmark_error(net, conditioned, marks),
                unconditional=landmark_error(net, unconditional, marks),
                swd_conditioned=sum(swd_conditioned) / len(swd_conditioned))


# ----------------------------------------------------------------------------------------------
# Benchmark: throughput, FLOPs, utilisation of the measured peak, memory
# ----------------------------------------------------------------------------------------------

def timed(fn, repeats, warmup=1, device=None):
    """Seconds per call of `fn`, after `warmup` calls; `repeats` grows until the timed calls span
    0.2 s, so that a fast GPU step is not lost in launch and timer noise."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    while True:
        sync()
        tic = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        elapsed = time.perf_counter() - tic
        if elapsed >= 0.2:
            return elapsed / repeats
        repeats = max(2 * repeats, math.ceil(repeats * 0.25 / max(elapsed, 1e-9)))


def peak_matmul_tflops(device, dtype):
    """The machine's dense matmul rate in `dtype`, measured: the roof for model FLOP utilisation."""
    n = 8192 if device.type == "cuda" else 2048  # a GPU needs a big product to reach its peak
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul = torch.backends.cuda.matmul
    tf32, matmul.allow_tf32 = matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # cuDNN runs fp32 convs as TF32
    try:
        return 2 * n ** 3 / timed(lambda: a @ b, repeats=10, warmup=3, device=device) / 1e12
    finally:
        matmul.allow_tf32 = tf32


def training_flops_per_image(model, device):
    """Forward + backward FLOPs of one training image (convolutions and matmuls), counted."""
    size = model.config["image_size"]
    x, t = torch.randn(2, 3, size, size, device=device), torch.tensor([10, 500], device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, t).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def benchmark(model, batch_size, device, precision, train_steps=5, sample_steps=3, dataset_size=10_000,
              compile=False):
    """Throughput figures for one config; sampling rates are per-step times scaled to each
    sampler's default number of steps, and to distilled students' 4, 2 and 1 (every step is one
    network evaluation). `compile`: training through torch.compile."""
    dtype = autocast_dtype(device, precision)
    model.to(device, memory_format=torch.channels_last).train()
    size = model.config["image_size"]
    opt = make_optimizer(model, TrainConfig(lr=1e-4))  # the training loop's: Muon's iterations cost time
    g = torch.Generator(device).manual_seed(0)
    faces = torch.randint(0, 256, (dataset_size, 3, size, size), dtype=torch.uint8, device=device)
    marks = torch.zeros(dataset_size, 9, 2, device=device)
    x0 = make_batch(faces, marks, torch.arange(batch_size), None, device)[0]
    alpha_bar = ALPHA_BAR.to(device)

    net = torch.compile(model) if compile else model

    def train_step():
        with autocast(device, dtype):
            loss = diffusion_loss(net, x0, *draw_noise(x0, g), alpha_bar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_rate = batch_size / timed(train_step, train_steps, warmup=2, device=device)
    model.eval()
    step_time = timed(lambda: sample(model, batch_size, "ddim", sample_steps, generator=g, precision=precision,
                                     progress=False), 1, device=device) / sample_steps
    order, flips = epoch_order(dataset_size, 0, 0)
    loader_rate = dataset_size / timed(lambda: [make_batch(faces, marks, idx, flips[idx], device)
                                                for idx in order.split(batch_size)], 1, warmup=0, device=device)
    flops = training_flops_per_image(model, device)
    peak = {p: peak_matmul_tflops(device, d) for p, d in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    achieved = flops * train_rate / 1e12
    return dict(
        device=str(device), precision="bf16" if dtype else "fp32", config=model.config, batch_size=batch_size,
        parameters=sum(p.numel() for p in model.parameters()), train_images_per_s=train_rate,
        sample_images_per_s={f"{k} {v}": batch_size / (step_time * v) for k, v in
                             [*((k, v) for k, v in SAMPLERS.items() if k != "student"), *(("student", v) for v in (4, 2, 1))]},
        loader_images_per_s=loader_rate, gflops_per_train_image=flops / 1e9, achieved_tflops=achieved,
        peak_tflops=peak, utilisation=achieved / peak["bf16" if dtype else "fp32"],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        torch=torch.__version__, threads=torch.get_num_threads(), compiled=compile)


# ----------------------------------------------------------------------------------------------
# Commands: eval, fit-landmarks, bench
# ----------------------------------------------------------------------------------------------

def write_json(path, result):
    atomic_write(path, lambda f: f.write(json.dumps(result, indent=2).encode()))


def run_eval(args):
    if args.json:
        claim_outputs([args.json], args.overwrite)
    model = load_model(None, args.model, pick_device(args.device))
    size, net = model.config["image_size"], None
    if args.landmark_net:  # every input is opened before the work
        if not model.config["landmarks"]:
            raise CheckpointError(f"{args.model}: trained without landmarks; --landmark-net measures landmark models")
        net = load_model(LandmarkNet, args.landmark_net, model_device(model))
        if net.config["image_size"] != size:
            raise CheckpointError(f"{args.landmark_net}: finds landmarks in {net.config['image_size']} px faces, "
                                  f"but {args.model} makes {size} px faces")
    train_set = CatDataset(args.data, size, split="train", quiet=True)
    val_set = CatDataset(args.data, size, split="val", quiet=True)
    if len(val_set) == 0 or len(train_set) < min(args.n, len(val_set)):
        raise SystemExit(f"error: {args.data}: {len(val_set)} validation and {len(train_set)} training faces; "
                         f"eval needs validation faces and at least as many training faces")
    r = evaluate(model, train_set.faces, val_set.faces, args.n, args.sampler, args.steps, args.seed)
    levels = [f"{size >> i}px" for i in range(len(r["swd"]) - 1)] + ["low-pass"]
    print(f"{args.model}: {r['n']} samples ({len(r['swd_sets'])} sets of {r['m']} in the SWD, all in memorisation), "
          f"{r['sampler']} {r['steps']} steps, against {r['m']} validation faces of {args.data}")
    print(f"{'SWD x 1e3':<22}" + "".join(f"{lv:>10}" for lv in levels) + f"{'mean':>10}")
    print(f"{'  samples vs real':<22}" + "".join(f"{v:10.2f}" for v in r["swd"]) + f"{r['swd_mean']:10.2f}")
    print(f"{'  real vs real (floor)':<22}" + "".join(f"{v:10.2f}" for v in r["floor"]) + f"{r['floor_mean']:10.2f}")
    if len(r["swd_sets"]) > 1:  # how far one set of samples would have strayed from their mean
        print(f"SWD of each set of {r['m']} samples: " + ", ".join(f"{v:.2f}" for v in r["swd_sets"]))
    print(f"SWD / floor: {r['swd_mean'] / r['floor_mean']:.2f}    memorisation ratio (nearest training "
          f"face, samples / held-out real; well below 1 = copying): {r['memorisation']:.3f}")
    if net is not None:
        r["landmarks"] = lm = evaluate_landmarks(model, net, val_set.faces, val_set.landmarks, args.n, args.sampler,
                                                 args.steps, guidance_of(model, args.guidance), args.seed)
        print(f"landmark error (mean px at {size}px, {lm['n']} faces, {args.landmark_net}): real faces "
              f"{lm['real']:.2f}; samples conditioned on them (guidance {lm['guidance']}) {lm['conditioned']:.2f} "
              f"({lm['conditioned'] / lm['real']:.2f}x real); unconditional samples {lm['unconditional']:.2f}; "
              f"SWD of the conditioned samples {lm['swd_conditioned']:.2f}")
    if args.json:
        write_json(args.json, dict(r, model=str(args.model), data=str(args.data)))


def run_fit_landmarks(args):
    claim_outputs([model_path(args.name)], args.overwrite, hint="pass --overwrite to replace it, or another --name")
    torch.manual_seed(args.seed)
    train_set = CatDataset(args.data, args.image_size, split="train", quiet=True)
    val_set = CatDataset(args.data, args.image_size, split="val", quiet=True)
    if len(val_set) == 0:
        raise SystemExit(f"error: {args.data} has too few photo ids to hold some out for validation")
    net = LandmarkNet(args.image_size)
    errors = fit_landmarks(net, train_set, val_set, args.epochs, seed=args.seed, device=args.device)
    path = save_model(net, args.name)
    print(f"saved {path}: mean landmark error on {len(val_set)} validation faces {errors[-1]:.2f} px "
          f"at {args.image_size}px (per epoch: {', '.join(f'{e:.2f}' for e in errors)})")


def run_bench(args):
    if args.json:
        claim_outputs([args.json], args.overwrite)
    torch.manual_seed(args.seed)
    args.width = args.width or defaults_of(DiffusionModel)["base_channels"]
    model = DiffusionModel(args.image_size, base_channels=args.width, blocks=args.blocks)
    r = benchmark(model, args.batch_size or TrainConfig.batch_size, pick_device(args.device), args.precision,
                  compile=args.compile)
    rows = [("device / precision", f"{r['device']} ({r['threads']} threads) / {r['precision']}, torch {r['torch']}"),
            ("model", f"{r['parameters'] / 1e6:.2f} M parameters, {args.image_size}px, width {args.width}, "
                      f"blocks {args.blocks}, batch {r['batch_size']}"),
            ("training", f"{r['train_images_per_s']:.1f} images/s" + (" (torch.compile)" if args.compile else "")),
            *((f"sampling, {k} steps", f"{v:.2f} images/s") for k, v in r["sample_images_per_s"].items()),
            ("cached data loader", f"{r['loader_images_per_s']:.0f} images/s "
                                   f"({r['loader_images_per_s'] / r['train_images_per_s']:.0f}x training)"),
            ("FLOPs per training image", f"{r['gflops_per_train_image']:.2f} GFLOP (forward + backward)"),
            ("achieved", f"{r['achieved_tflops']:.3f} TFLOP/s"),
            ("measured matmul peak", f"bf16 {r['peak_tflops']['bf16']:.2f}, fp32 {r['peak_tflops']['fp32']:.2f} TFLOP/s"),
            ("model FLOP utilisation", f"{100 * r['utilisation']:.1f}% of the {r['precision']} peak"),
            ("peak RSS", f"{r['peak_rss_mb']:.0f} MB")]
    for name, value in rows:
        print(f"{name:<28} {value}")
    if args.json:
        write_json(args.json, r)


OPTIONS = {"eval": ("model_file", "sampling", "json_out"), "fit-landmarks": ("size",),
           "bench": ("size", "width", "batch", "json_out")}  # cat_diffusion's shared option groups
COMMANDS = {"eval": run_eval, "fit-landmarks": run_fit_landmarks, "bench": run_bench}


def add_arguments(command, parser):
    from cat_diffusion import existing_dir, existing_file, name_arg, positive_int
    if command == "eval":
        parser.add_argument("--data", type=existing_dir, default=Path("data"), help="the data the model was trained on")
        parser.add_argument("-n", type=positive_int, default=defaults_of(evaluate)["n"],
                            help="number of samples (the SWD takes the first as many as there are validation faces)")
        parser.add_argument("--landmark-net", type=existing_file, default=None, metavar="PATH",
                            help="with a landmark model: also measure how well samples follow their landmarks, "
                                 "with this net from fit-landmarks")
    elif command == "fit-landmarks":
        parser.add_argument("--data", type=existing_dir, default=Path("data"), help="CAT-format folder")
        parser.add_argument("--epochs", type=positive_int, default=defaults_of(fit_landmarks)["epochs"],
                            help="passes over the training faces")
        parser.add_argument("--name", type=name_arg, default="LandmarkNet", help="the weights go to NAME.pth")
    else:
        parser.add_argument("--compile", action="store_true", help="time training through torch.compile")
