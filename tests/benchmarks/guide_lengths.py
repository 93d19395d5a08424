"""One trained model sampled with other runs' models as its autoguidance guide: which guide helps.

    python tests/benchmarks/guide_lengths.py --model M60.pth --guides own none G3.pth M9.pth --data DIR [-n 361]

Each row samples the same noises (DPM-Solver++ 20 steps, `--seed`) with the model's guide replaced by
another model file ("own": the guide saved with it; "none": unguided, w = 1), so the rows differ by
the guide alone. Prints a Markdown table of SWD (x 1e3, levels 64 px / 32 px / low-pass), its ratio
to the real-vs-real floor, the SWD of each set of samples it averages (sets as large as the held-out
faces), and the memorisation ratio.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cat_diffusion as cd  # noqa: E402
import cat_eval as ce  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("DiffusionModel.pth"))
    p.add_argument("--guides", nargs="+", default=["own", "none"], help="model files, 'own' or 'none'")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("-n", type=int, default=361, help="samples per row (361: the held-out faces' count)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = cd.pick_device()
    model = cd.load_model(None, args.model, device)
    own = model.guide
    size = model.config["image_size"]
    train = cd.CatDataset(args.data, size, split="train", quiet=True).faces
    val = cd.CatDataset(args.data, size, split="val", quiet=True).faces
    print(f"{args.model} on {args.data}: {args.n} samples per row, seed {args.seed}\n")
    print("| guide | SWD x 1e3 (64 / 32 px / low-pass) | SWD / floor | each set's SWD | memorisation | seconds |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for name in args.guides:
        if name in ("own", "none"):
            model.guide = own if name == "own" else None
        else:
            model.guide = cd.load_model(None, name, device)
            model.guide.guide = None  # a guide samples alone
        tic = time.perf_counter()
        r = ce.evaluate(model, train, val, args.n, "dpm++", 20, args.seed)
        levels = " / ".join(f"{v:.1f}" for v in r["swd"])
        sets = ", ".join(f"{v:.1f}" for v in r["swd_sets"])
        print(f"| {name} | {r['swd_mean']:.1f} ({levels}) | {r['swd_mean'] / r['floor_mean']:.2f} | {sets} | "
              f"{r['memorisation']:.3f} | {time.perf_counter() - tic:.0f} |", flush=True)
    print(f"\nreal-vs-real floor: {r['floor_mean']:.2f} ({r['m']} faces each)")


if __name__ == "__main__":
    main()
