import re
from pathlib import Path

import pytest
import yaml

from stainmil.config import (
    Config,
    config_from_dict,
    config_reference_markdown,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from stainmil.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_match_the_old_pipeline():
    c = Config()
    assert (c.data.per_slice_cap, c.data.max_slices_per_stain) == (500, 5)
    assert c.train.optimizer == "adam" and c.train.class_weights == "auto"
    assert c.train.scheduler_factor == 0.3 and c.train.early_stopping_patience == 8
    assert (c.model.embed_dim, c.model.attention_hidden_dim) == (512, 128)


def test_yaml_round_trip(tmp_path):
    config = load_config(None, ["train.lr=0.003", "data.exclude_cases=[91]", "model.attention=gated"])
    dump_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(config)
    assert again.data.exclude_cases == ["91"]


def test_set_overrides_parse_types(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("train:\n  lr: 0.01\n  max_epochs: 3\n")
    config = load_config(path, ["train.lr=1e-3", "train.class_weights=[1.0, 2]", "eval.threshold=youden",
                                "model.standardize_features=false"])
    assert config.train.lr == pytest.approx(1e-3)
    assert config.train.max_epochs == 3
    assert config.train.class_weights == [1.0, 2.0]
    assert config.eval.threshold == "youden"
    assert config.model.standardize_features is False


@pytest.mark.parametrize("values, key", [
    ({"train": {"lrr": 0.1}}, "train.lrr"),
    ({"trian": {}}, "trian"),
    ({"train": {"max_epochs": "ten"}}, "train.max_epochs"),
    ({"train": {"max_epochs": 2.5}}, "train.max_epochs"),
    ({"model": {"standardize_features": "yes"}}, "model.standardize_features"),
    ({"split": {"method": "random"}}, "split.method"),
    ({"data": {"label_values": {"benign": "zero"}}}, "data.label_values.benign"),
])
def test_unknown_keys_and_wrong_types_name_the_key(values, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        config_from_dict(values)


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")


def test_missing_config_file_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.patches_dir=patches", "output_dir=out"])
    assert config.data.patches_dir == str(tmp_path / "patches")
    assert Path(config.output_dir).is_absolute()


def test_reference_lists_every_key():
    table = config_reference_markdown()
    flat = []

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("stain_aliases", "label_values"):
                walk(v, prefix + k + ".")
            else:
                flat.append(prefix + k)

    walk(yaml.safe_load(yaml.safe_dump(config_to_dict(Config()))))
    for key in flat:
        assert f"`{key}`" in table


@pytest.mark.parametrize("name, stain", [
    ("he", "he"), ("HE", "he"), ("H&E", "he"), ("h_e", "he"), (" HnE ", "he"),
    ("MelanA", "melan"), ("Melan-A", "melan"), ("melan a", "melan"), ("MART-1", "melan"), ("MELAN", "melan"),
    ("SOX10", "sox10"), ("Sox-10", "sox10"), ("sox_10", "sox10"),
    ("CD3", None), ("", None), ("HEX", None),
])
def test_every_stain_name_goes_through_one_rule(name, stain):
    assert load_config(None).data.canonical_stain(name) == stain


def test_user_aliases_and_canonical_names_both_count():
    data = load_config(None, ["data.stain_aliases={PRAME: melan}"]).data
    assert data.canonical_stain("prame") == "melan" and data.canonical_stain("Sox10") == "sox10"
    assert data.canonical_stain("Melan-A") is None  # not an alias any more, nor a canonical name


def test_every_path_valued_setting_is_written_absolute(tmp_path, monkeypatch):
    """A run folder's config.yaml read from another working directory (a SLURM job, a colleague) finds the same
    files: every path-valued setting is absolute; names, URLs and encoder files keep their form."""
    import yaml

    from stainmil.config import PATH_FIELDS, config_from_dict, dump_config

    monkeypatch.chdir(tmp_path)
    values = {"output_dir": "out", "register": {"out_dir": "reg"},
              "tile": {"include_annotations": "annotations/{stem}.geojson", "exclude_annotations": "pen",
                       "slices_dir": "slides", "out_dir": "tiles"},
              "data": {"patches_dir": "patches", "labels_csv": "labels.csv"},
              "features": {"store_dir": "store", "weights": "weights/enc.pth",
                           "backbone": "file:encoders/mine.py:build"},
              "train": {"runs_dir": "runs", "split_file": "s.npz"},
              "tune": {"dir": "tune", "storage": "tune/study.journal"},
              "analysis": {"truth": "qupath/{case}_{stain}.geojson"}}
    config = config_from_dict(values)  # built in code, never through load_config: dump_config resolves too
    written = yaml.safe_load(dump_config(config, tmp_path / "config.yaml").read_text())
    for section, *key in sorted(PATH_FIELDS):
        value = written[section] if not key else written[section][key[0]]
        assert value.startswith(str(tmp_path)), (section, key, value)
    assert written["tile"]["include_annotations"] == str(tmp_path / "annotations" / "{stem}.geojson")
    assert written["analysis"]["truth"] == str(tmp_path / "qupath" / "{case}_{stain}.geojson")
    assert written["features"]["weights"] == str(tmp_path / "weights" / "enc.pth")
    assert written["features"]["backbone"] == f"file:{tmp_path / 'encoders' / 'mine.py'}:build"
    assert written["tune"]["storage"] == str(tmp_path / "tune" / "study.journal")
    assert config.output_dir == "out"  # dumping left the caller's config alone
    values["features"]["weights"], values["tune"]["storage"] = "pretrained", "sqlite:///study.db"
    config = config_from_dict(values)
    written = yaml.safe_load(dump_config(config, tmp_path / "config.yaml").read_text())
    assert written["features"]["weights"] == "pretrained" and written["tune"]["storage"] == "sqlite:///study.db"


def test_a_config_is_frozen_and_overrides_make_a_new_one(tmp_path):
    import dataclasses

    config = load_config(None, [f"output_dir={tmp_path}"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 0.1  # type: ignore[misc]
    changed = config.with_overrides({"train.lr": 0.1, "model.architecture": "abmil"})
    assert (changed.train.lr, changed.model.architecture) == (0.1, "abmil")
    assert (config.train.lr, config.model.architecture) == (Config().train.lr, "hierarchical")  # left as it was
    assert config.with_overrides(["train.max_epochs=3", "train.runs_dir=runs"]).paths.runs_dir \
        == Path("runs").resolve()  # the --set spelling; paths absolute like a loaded config's
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        config.with_overrides({"train.lrr": 0.1})
    with pytest.raises(ConfigError, match="'train.max_epochs' must be an integer"):
        config.with_overrides({"train.max_epochs": "many"})
    three = config.with_overrides({"data.label_values": {"nevus": 0, "dysplastic": 1, "melanoma": 2}})
    assert three.model.n_classes == 3 and three.data.class_names == ["nevus", "dysplastic", "melanoma"]


def test_paths_come_from_the_config_alone(tmp_path, monkeypatch):
    """Derived locations never look at the disk: an imported store that appears later changes nothing in a loaded
    config; the next load records it (and a run's config.yaml then names it)."""
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["output_dir=out", "features.backbone=densenet121", "features.weights=random",
                                "tile.out_dir=tiles"])
    paths = config.paths
    assert paths.store == tmp_path / "out" / "features" / "densenet121-random-224px"
    assert (paths.index_dir, paths.manifest) == (tmp_path / "out" / "index", tmp_path / "out" / "index" /
                                                 "manifest.parquet")
    assert (paths.split_file, paths.runs_dir) == (tmp_path / "out" / "splits" / "data_splits.npz",
                                                  tmp_path / "out" / "runs")
    assert paths.registration_dir == tmp_path / "tiles" / "registration"  # <tile.out_dir>/registration
    (paths.imported_store).mkdir(parents=True)
    (paths.imported_store / "store.json").write_text("{}")
    assert config.paths.store == paths.store  # the loaded config did not change its mind
    again = load_config(None, ["output_dir=out", "features.backbone=densenet121", "features.weights=random"])
    assert again.paths.store == paths.imported_store and again.features.store_dir == str(paths.imported_store)
    mine = load_config(None, ["output_dir=out", "features.store_dir=elsewhere"])
    assert mine.paths.store == tmp_path / "elsewhere"  # a store the user names always wins
