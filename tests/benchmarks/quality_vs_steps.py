"""Sample quality against the number of sampling steps, for one trained model.

    python tests/benchmarks/quality_vs_steps.py --model DiffusionModel.pth --data DIR [-n 128]

Prints a Markdown table of SWD (x 1e3, mean over pyramid levels; lower is better) and the
memorisation ratio for DDPM 1000, DDIM 50 and 100, DPM-Solver++ 10, 15, 20 and 25 steps, all from
the same seed and against the same held-out faces, with the real-vs-real floor.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cat_diffusion as cd  # noqa: E402
import cat_eval as ce  # noqa: E402

GRID = [("ddpm", 1000), ("ddim", 50), ("ddim", 100), ("dpm++", 10), ("dpm++", 15), ("dpm++", 20), ("dpm++", 25)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("DiffusionModel.pth"))
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("-n", type=int, default=128, help="samples per row")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = cd.load_model(None, args.model, cd.pick_device())
    size = model.config["image_size"]
    train = cd.CatDataset(args.data, size, split="train", quiet=True).faces
    val = cd.CatDataset(args.data, size, split="val", quiet=True).faces
    print(f"{args.model} on {args.data}: {args.n} samples per row, seed {args.seed}\n")
    print("| sampler | steps | SWD x 1e3 | SWD / floor | memorisation | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for sampler, steps in GRID:
        tic = time.perf_counter()
        r = ce.evaluate(model, train, val, args.n, sampler, steps, args.seed)
        print(f"| {sampler} | {steps} | {r['swd_mean']:.2f} | {r['swd_mean'] / r['floor_mean']:.2f} | "
              f"{r['memorisation']:.3f} | {time.perf_counter() - tic:.0f} |", flush=True)
    print(f"\nreal-vs-real floor: {r['floor_mean']:.2f} ({r['m']} faces each)")


if __name__ == "__main__":
    main()
