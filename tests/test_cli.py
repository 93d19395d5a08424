"""The command line: the default run from an empty folder, the README's REPL snippet on what it
saved, train and sample writing their pictures, and bad arguments refused before any work."""
import pytest
import torch

import cat_diffusion as cd
from helpers import SHARED_DATA, assert_png, assert_same_weights, distinct_model, grid_side, needs_shared, run_main

FIGURES = ("loss_curve.png", "progress.png", "reconstructions.png", "samples.png", "denoising.png")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python cat_diffusion.py --epochs 1 --synthetic-count 40 --batch-size 16` in an empty
    folder: default data path, default model (64 px, width 32), default name. The default
    DPM-Solver++ step count is cut to 2 so that the 64 samples drawn at the end stay cheap."""
    folder = tmp_path_factory.mktemp("default-run")
    run_main(["--epochs", "1", "--synthetic-count", "40", "--batch-size", "16"],
             folder.parent / f"{folder.name}-face-cache", cwd=folder)
    return folder


def test_default_data_path_draws_a_synthetic_set_and_trains(default_run):
    synthetic = default_run / "data" / "synthetic"
    photos = sorted(p.name for p in synthetic.glob("*.jpg"))
    assert len(photos) == 40
    assert sorted(p.name for p in synthetic.glob("*.jpg.cat")) == [f"{p}.cat" for p in photos]
    assert not (default_run / "data" / ".synthetic.partial").exists()
    assert (default_run / "DiffusionModel.pth").is_file()
    for name in FIGURES:
        assert_png(default_run / "outputs" / name)
    assert (default_run / "outputs" / "progress.gif").read_bytes()[:6] == b"GIF89a"
    ckpt = cd.read_checkpoint(default_run / "outputs" / "checkpoint.pt", want="training")
    steps = 36 // 16  # 36 of the 40 photo ids fall in the training split
    assert ckpt["step"] == steps and len(ckpt["history"]["loss"]) == steps


def test_repl_snippet_loads_the_model_a_default_cli_run_saved(default_run, monkeypatch):
    monkeypatch.chdir(default_run)
    snippet = [line.strip()[4:] for line in cd.__doc__.splitlines() if line.strip().startswith(">>> ")]
    assert snippet == ["from cat_diffusion import DiffusionModel, load_model",
                       'loaded_model = load_model(DiffusionModel(), "DiffusionModel")']
    namespace = {}
    exec("\n".join(snippet), namespace)  # exactly what the docstring tells users to type
    loaded_model = namespace["loaded_model"]
    assert isinstance(loaded_model, cd.DiffusionModel) and not loaded_model.training
    assert loaded_model.config == cd.DiffusionModel().config
    saved = torch.load("DiffusionModel.pth", weights_only=True)["state_dict"]
    for k, v in loaded_model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    images = cd.generate(loaded_model, 2, steps=2, seed=0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


@needs_shared("cat-photos")
def test_a_kaggle_style_folder_goes_to_trained_cats_as_the_readme_says(tmp_path, monkeypatch, capsys):
    """The README's three steps on real CAT photos laid out as the Kaggle download (data/CAT_00/),
    with a small model: check the folder, train, sample."""
    folder = tmp_path / "data" / "CAT_00"
    folder.mkdir(parents=True)
    for f in (SHARED_DATA / "cat-photos").iterdir():
        (folder / f.name).symlink_to(f)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(cd.SAMPLERS, "dpm++", 2)
    faces = len(cd.CatDataset("data"))
    assert faces >= 65 and f"{faces} faces of" in capsys.readouterr().err
    cd.main(["--epochs", "1", "--image-size", "16", "--width", "8", "--batch-size", "16"])
    cd.main(["sample", "-n", "4"])
    assert_png(tmp_path / "outputs" / "sample" / "samples.png")
    assert (tmp_path / "DiffusionModel.pth").is_file() and not (tmp_path / "data" / "synthetic").exists()


def test_train_command_writes_model_and_pictures(photos, tmp_path):
    out, name = tmp_path / "out", tmp_path / "M"
    cd.main(["train", "--data", str(photos), "--epochs", "1", "--image-size", "16", "--batch-size", "8",
             "--width", "8", "--out", str(out), "--name", str(name), "--precision", "fp32"])
    model = cd.load_model(None, name)
    assert model.config["image_size"] == 16 and model.config["base_channels"] == 8
    assert_png(out / "loss_curve.png")
    assert_png(out / "reconstructions.png")
    assert_png(out / "samples.png", size=(grid_side(8, 16),) * 2)  # 64 samples, 8 a row
    assert_png(out / "denoising.png", size=(grid_side(8, 16), grid_side(6, 16)))  # 6 samples x 8 states
    ckpt = cd.read_checkpoint(out / "checkpoint.pt", want="training")
    assert ckpt["step"] == 36 // 8  # one epoch of the 36 training faces
    assert not (tmp_path / "DiffusionModel.pth").exists()


def test_train_keeps_its_guide_in_the_model_file_and_refuses_one_for_other_faces(photos, tmp_path):
    guide = distinct_model(landmarks=True)  # the settings of the model trained below
    path, small = cd.save_model(guide, tmp_path / "G"), cd.save_model(cd.DiffusionModel(8, 8), tmp_path / "G8")

    def train(guide, name):
        cd.main(["train", "--data", str(photos), "--epochs", "1", "--image-size", "16", "--batch-size", "8", "--width", "8",
                 "--out", str(tmp_path / name), "--name", str(tmp_path / name), "--precision", "fp32", "--guide", str(guide)])

    train(path, "M")
    assert_same_weights(cd.load_model(None, tmp_path / "M").guide, guide)
    with pytest.raises(SystemExit, match="G8.pth: a guide is a model of the same settings .* not one with image_size=8"):
        train(small, "M2")
    assert not (tmp_path / "M2.pth").exists()


def test_a_run_trains_its_guide_first_on_its_guide_share_as_the_two_commands_would(photos, tmp_path):
    """`--epochs 4` (--guide-share 0.25): a 1-epoch guide in OUT/guide, then 3 epochs guided by it, the
    very weights of `--epochs 1 --guide-share 0` followed by `--epochs 3 --guide` that guide."""
    def train(name, *extra):
        cd.main(["train", "--data", str(photos), "--image-size", "16", "--batch-size", "8", "--width", "8",
                 "--precision", "fp32", "--out", str(tmp_path / name), "--name", str(tmp_path / name / "M"), *extra])

    train("split", "--epochs", "4")
    train("guide", "--epochs", "1", "--guide-share", "0")
    train("guided", "--epochs", "3", "--guide", str(tmp_path / "guide" / "M.pth"))
    steps = 36 // 8  # an epoch of the 36 training faces
    assert cd.read_checkpoint(tmp_path / "split" / "guide" / "checkpoint.pt", "training")["step"] == steps
    assert cd.read_checkpoint(tmp_path / "split" / "checkpoint.pt", "training")["step"] == 3 * steps
    split, guided = cd.load_model(None, tmp_path / "split" / "M"), cd.load_model(None, tmp_path / "guided" / "M")
    assert_same_weights(split.guide, cd.load_model(None, tmp_path / "guide" / "M"))
    assert_same_weights(split.guide, cd.load_model(None, tmp_path / "split" / "guide" / "Guide"))
    assert_same_weights(split, guided)  # the guide's weights included
    assert_png(tmp_path / "split" / "guide" / "samples.png")
    assert cd.load_model(None, tmp_path / "guide" / "M").guide is None, "--guide-share 0: no guide"


def test_a_timed_runs_guide_takes_its_share_of_the_minutes_up_to_guide_max_minutes(photos, tmp_path, monkeypatch):
    """`--minutes 0.1 --guide-share 0.5` with the cap at 0.02 minutes: the guide trains 0.02, the model the rest."""
    monkeypatch.setattr(cd, "GUIDE_MAX_MINUTES", 0.02)
    cd.main(["train", "--data", str(photos), "--image-size", "16", "--batch-size", "8", "--width", "8", "--precision",
             "fp32", "--minutes", "0.1", "--guide-share", "0.5", "--out", str(tmp_path), "--name", str(tmp_path / "M")])
    minutes = [cd.read_checkpoint(path, "training")["train_config"]["minutes"]
               for path in (tmp_path / "guide" / "checkpoint.pt", tmp_path / "checkpoint.pt")]
    assert minutes == [0.02, pytest.approx(0.08)]
    assert cd.load_model(None, tmp_path / "M").guide is not None


def test_sample_command_writes_a_grid_and_single_images(tmp_path):
    path = cd.save_model(distinct_model(), tmp_path / "M")
    out = tmp_path / "samples"
    cd.main(["sample", "--model", str(path), "-n", "4", "--sampler", "ddim", "--steps", "3",
             "--out", str(out), "--precision", "fp32"])
    assert_png(out / "samples.png", size=(grid_side(4, 16), grid_side(1, 16)))
    for i in range(4):
        assert_png(out / f"sample_{i:04d}.png", size=(16, 16))
    assert sorted(p.name for p in out.iterdir()) == sorted(["samples.png"] + [f"sample_{i:04d}.png" for i in range(4)])


def test_sample_command_is_reproducible_for_a_seed(tmp_path):
    path = cd.save_model(distinct_model(), tmp_path / "M")
    for out in ("a", "b"):
        cd.main(["sample", "--model", str(path), "-n", "2", "--steps", "2", "--seed", "3",
                 "--out", str(tmp_path / out), "--precision", "fp32"])
    assert (tmp_path / "a" / "samples.png").read_bytes() == (tmp_path / "b" / "samples.png").read_bytes()


@pytest.mark.parametrize("argv,option", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["--image-size", "20"], "--image-size"),
    (["--lr", "nan"], "--lr"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["train", "--data", "no-such-folder"], "--data"),
    (["train", "--resume", "no-such-checkpoint.pt"], "--resume"),
    (["sample", "--model", "no-such-model.pth"], "--model"),
    (["sample", "-n", "0"], "-n"),
    (["sample", "--sampler", "euler"], "--sampler"),
])
def test_bad_arguments_exit_with_code_2_before_any_work(argv, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        cd.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err, err
    assert sorted(tmp_path.iterdir()) == before, "nothing may be written before the arguments are checked"


def test_sample_command_with_an_unusable_model_file_exits_with_its_name(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_text("not a model")
    with pytest.raises(SystemExit) as exit_info:
        cd.main(["sample", "--model", str(path), "--out", str(tmp_path / "out")])
    assert isinstance(exit_info.value.code, str) and exit_info.value.code.startswith("error:")
    assert str(path) in exit_info.value.code
    assert not (tmp_path / "out").exists()


def test_train_command_reports_a_diverging_run_as_an_error_exit(photos, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cd.main(["train", "--data", str(photos), "--epochs", "3", "--image-size", "16", "--batch-size", "8",
                 "--width", "8", "--lr", "1e3", "--warmup-steps", "1", "--precision", "fp32",
                 "--out", str(tmp_path / "out"), "--name", str(tmp_path / "M")])
    assert str(exit_info.value.code).startswith("error: loss became")
    assert not (tmp_path / "M.pth").exists(), "no model is saved from a diverged run"


def test_train_takes_the_gpu_recipe_on_cuda_only_when_no_batch_size_is_given(capsys):
    args = cd.parse_args(["train"])
    assert args.batch_size is None and args.epochs is None and not args.compile
    assert cd.training_recipe(args, torch.device("cpu")) == (cd.TrainConfig.batch_size, False, cd.TrainConfig.epochs, 32)
    assert capsys.readouterr().out == ""
    assert cd.training_recipe(args, torch.device("cuda")) == (256, True, 300, 64)
    assert "the GPU recipe, --batch-size 256 --compile --width 64 --epochs 300" in capsys.readouterr().out
    assert cd.training_recipe(cd.parse_args(["train", "--epochs", "7", "--width", "48"]),
                              torch.device("cuda")) == (256, True, 7, 48)
    timed = cd.parse_args(["train", "--minutes", "5"])
    assert cd.training_recipe(timed, torch.device("cuda"))[:2] == (256, True)
    assert "--epochs" not in capsys.readouterr().out, "a timed run has no epochs to announce"
    given = cd.parse_args(["train", "--batch-size", "64"])
    assert cd.training_recipe(given, torch.device("cuda")) == (64, False, cd.TrainConfig.epochs, 32)


@pytest.mark.skipif(cd.torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_without_a_gpu_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        cd.main(["train", "--device", "cuda"])
    assert e.value.code == 2 and "this machine has 0 CUDA GPUs" in capsys.readouterr().err


def test_training_options_take_their_defaults_from_train_config():
    """One place for each hyper-parameter: an option named after a TrainConfig field defaults to
    that field (or to None where the recipe decides), and the config is built from the options."""
    fields = {f.name: f.default for f in cd.dataclasses.fields(cd.TrainConfig)}
    train = cd.build_parser("train").commands["train"]
    shared = [a for a in train._actions if a.dest in fields]
    assert {a.dest for a in shared} >= {"epochs", "minutes", "batch_size", "lr", "warmup_steps", "ema_decay",
                                        "augment", "seed", "device", "precision", "checkpoint_every", "grad_accum",
                                        "compile"}
    for action in shared:
        assert action.default in (fields[action.dest], None), action.dest
    args = cd.parse_args(["train", "--lr", "0.001", "--no-flip", "--grad-accum", "2", "--batch-size", "8"])
    cfg = cd.config_of(args)
    assert (cfg.lr, cfg.augment, cfg.grad_accum, cfg.batch_size, cfg.betas) == (0.001, False, 2, 8, (0.9, 0.99))
