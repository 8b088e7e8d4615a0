"""Config validation at the edge: every bad input fails with a message naming the key and the file."""
from pathlib import Path

import pytest
import yaml

from pagoda_dist.cli import main
from pagoda_dist.config import Config, ConfigError, describe_keys, from_dict, load_config, to_dict, to_yaml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert from_dict(to_dict(cfg)) == cfg  # round trip through the copy a checkpoint stores


def test_overrides_are_typed_and_applied(tmp_path: Path) -> None:
    path = write(tmp_path, {"model": {"channels": 32}})
    cfg = load_config(path, ["model.channels=64", "model.channel_mult=[1,2]", "teacher.train.optimizer.lr=1e-3",
                             "storage.endpoint_url=http://127.0.0.1:9000"])
    assert cfg.model.channels == 64 and cfg.model.channel_mult == [1, 2]
    assert cfg.teacher.train.optimizer.lr == pytest.approx(1e-3)
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize("data, key, words", [
    ({"model": {"chanels": 32}}, "model.chanels", "did you mean model.channels"),
    ({"modle": {}}, "modle", "did you mean model"),
    ({"model": {"channels": "wide"}}, "model.channels", "expected an integer"),
    ({"model": {"dropout": 1.5}}, "model.dropout", "[0, 1)"),
    ({"runtime": {"zero_stage": 4}}, "runtime.zero_stage", "must be 0, 1, 2 or 3"),
    ({"runtime": {"precision": "fp8"}}, "runtime.precision", "not one of"),
    ({"runtime": {"num_workers": 3}}, "teacher.train.batch_size", "not divisible"),
    ({"grow": {"resolutions": [64]}, "model": {"resolution": 16}}, "grow.resolutions[0]", "expected 32"),
    ({"grow": {"resolutions": [32, 64]}, "data": {"resolution": 32}}, "data.resolution", "below the final"),
    ({"model": {"num_classes": 10, "text_dim": 512}}, "model.text_dim", "not both"),
    ({"model": {"text_dim": 512}}, "precompute.clip_weights", "local path"),
    ({"storage": {"aws_secret_access_key": "x"}}, "storage.aws_secret_access_key", "secrets never go in a config"),
    ({"logging": {"keep_checkpoints": 1}}, "logging.keep_checkpoints", ">= 2"),
])
def test_bad_values_name_key_and_file(tmp_path: Path, data: dict, key: str, words: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and key in message and words in message


def test_bad_override_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="override 'model.channels': expected KEY=VALUE"):
        load_config(None, ["model.channels"])
    with pytest.raises(ConfigError, match="overrides: runtime.zero_stage"):
        load_config(None, ["runtime.zero_stage=7"])


def test_base_inheritance_and_cycles(tmp_path: Path) -> None:
    write(tmp_path, {"model": {"channels": 48, "num_classes": 10}}, "base.yaml")
    child = write(tmp_path, {"base": "base.yaml", "model": {"channels": 96}}, "child.yaml")
    cfg = load_config(child)
    assert cfg.model.channels == 96 and cfg.model.num_classes == 10
    write(tmp_path, {"base": "b.yaml"}, "a.yaml")
    write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_config_prints_resolved_and_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, {"run": {"name": "x", "root": str(tmp_path / "out")}})
    assert main(["config", str(path), "model.channels=40"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["channels"] == 40
    assert main(["config", str(path), "model.channels=41"]) == 2
    assert "model.channels: must be a positive multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # validation happens before anything is written


def test_reference_lists_every_leaf_with_help() -> None:
    rows = describe_keys()
    keys = {key for key, _, _ in rows}
    assert {"model.channels", "runtime.zero_stage", "distill.adversarial.discriminator.optimizer.lr"} <= keys
    assert all(help_text for _, _, help_text in rows)
    assert "secret" not in to_yaml(Config()).lower()
