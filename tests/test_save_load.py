"""Model files: save_model and load_model round trips, mismatches named, and every unusable or
hostile file (damaged, code-running pickles, hostile configs) refused with CheckpointError."""
import pickle
import re
from pathlib import Path

import pytest
import torch

import cat_diffusion as cd
from helpers import assert_same_weights, distinct_model, hostile_model


def test_save_model_writes_name_pth_and_load_model_round_trips_exactly(tmp_path):
    model = distinct_model()
    path = cd.save_model(model, tmp_path / "M")
    assert path == tmp_path / "M.pth" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M.pth"], "no temporary files left behind"
    fresh = distinct_model(seed=1).train()
    loaded = cd.load_model(fresh, tmp_path / "M")
    assert loaded is fresh
    assert not loaded.training, "load_model returns the model in eval mode"
    assert_same_weights(loaded, model)
    assert_same_weights(cd.load_model(distinct_model(seed=2), str(path)), model)  # NAME.pth works too


def test_a_models_guide_is_saved_and_loaded_with_it(tmp_path):
    model = distinct_model()
    model.guide = distinct_model(seed=1)
    cd.save_model(model, tmp_path / "M")
    for given in (None, distinct_model(seed=2)):
        loaded = cd.load_model(given, tmp_path / "M")
        assert_same_weights(loaded.guide, model.guide)
        assert_same_weights(loaded, model)
    cd.save_model(distinct_model(), tmp_path / "N")
    given = distinct_model(seed=2)
    given.guide = distinct_model(seed=3)
    assert cd.load_model(given, tmp_path / "N").guide is None  # a file without a guide: the model has none


def test_load_model_given_a_model_of_another_width_returns_the_files_and_says_so(tmp_path, capsys):
    saved = distinct_model(width=8)
    cd.save_model(saved, tmp_path / "M")
    given = cd.DiffusionModel(16, base_channels=16)
    before = {k: v.clone() for k, v in given.state_dict().items()}
    loaded = cd.load_model(given, tmp_path / "M")
    assert loaded is not given and loaded.config == saved.config
    assert_same_weights(loaded, saved)
    assert all(torch.equal(v, before[k]) for k, v in given.state_dict().items()), "the model given is left alone"
    err = capsys.readouterr().err
    assert str(tmp_path / "M.pth") in err and "base_channels=8" in err and len(err.splitlines()) == 1


def test_load_model_none_builds_the_saved_architecture(tmp_path):
    model = distinct_model(size=24, width=8)
    cd.save_model(model, tmp_path / "M")
    loaded = cd.load_model(None, tmp_path / "M")
    assert isinstance(loaded, cd.DiffusionModel)
    assert loaded.config == model.config
    assert not loaded.training
    assert_same_weights(loaded, model)


def write_missing(path):
    pass


def write_empty(path):
    path.write_bytes(b"")


def write_truncated(path):
    cd.save_model(distinct_model(), path.with_name("whole"))
    data = path.with_name("whole.pth").read_bytes()
    path.write_bytes(data[:len(data) // 2])


def write_text(path):
    path.write_text("this is not a model\n")


def write_foreign_dict(path):
    torch.save({"weights": torch.zeros(3)}, path)


@pytest.mark.parametrize("write", [write_missing, write_empty, write_truncated, write_text, write_foreign_dict],
                         ids=["missing", "empty", "truncated", "text", "foreign dict"])
def test_load_model_of_an_unusable_file_raises_checkpoint_error_naming_it(tmp_path, write):
    path = tmp_path / "bad.pth"
    write(path)
    with pytest.raises(cd.CheckpointError) as err:
        cd.load_model(cd.DiffusionModel(16, base_channels=8), path)
    assert str(path) in str(err.value)


class MakesMarker:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, fmt):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    payload = {"kind": "model", "config": {}, "state_dict": MakesMarker(marker)}
    if fmt == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(cd.CheckpointError, match="refused") as err:
        cd.load_model(None, path)
    assert str(path) in str(err.value)
    assert not marker.exists(), "loading the file ran its code"
    # The payload is live: an unsafe load does run it (so the test above can fail).
    torch.load(path, weights_only=False) if fmt == "torch.save" else pickle.loads(path.read_bytes())
    assert marker.exists()



@pytest.mark.parametrize("config,problem", [
    ({"base_channels": 512}, "describe a model of"),  # within the limits, but not in a weightless file
    ({"base_channels": 4096}, "base_channels=4096 is not valid"),  # building it would take 23 GB
    ({"image_size": 1024, "attention_below": 1024}, "image_size=1024 is not valid"),  # hours a sample
    ({"image_size": 7}, "image_size=7 is not valid"),
    ({"image_size": 12}, "do not describe a model"),
    ({"image_size": "64"}, "image_size='64' is not valid"),
    ({"base_channels": -8}, "base_channels=-8 is not valid"),
    ({"blocks": [1, 2]}, "blocks=[1, 2] is not valid"),
    ({"channel_mults": [1, 2]}, "do not describe a model"),
    ({"channel_mults": 4}, "channel_mults=4 is not valid"),
    ({"dropout": float("nan")}, "dropout=nan is not valid"),
    ({"landmarks": 1}, "landmarks=1 is not valid"),
    ({"evil": 1}, "unknown model settings"),
    (["not", "a", "dict"], "unknown model settings"),
])
def test_a_hostile_model_config_is_refused_with_checkpoint_error(tmp_path, config, problem):
    path = hostile_model(tmp_path / "hostile.pth", config)
    with pytest.raises(cd.CheckpointError, match=re.escape(problem)) as e:
        cd.load_model(None, path)
    assert str(path) in str(e.value)


def test_a_valid_model_file_still_loads_after_the_checks(tmp_path):
    model = cd.DiffusionModel(24, base_channels=6, channel_mults=(1, 2, 3, 4), blocks=2, landmarks=True)
    cd.save_model(model, tmp_path / "M")
    assert cd.load_model(None, tmp_path / "M").config == model.config
