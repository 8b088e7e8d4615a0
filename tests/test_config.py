"""Config validation at the edge: every bad input fails with a message naming the key and the file."""
from pathlib import Path

import pytest
import yaml

from pagoda_dist.chain import chain, stage_spec
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
    ({"data": {"source_kind": "webdataset", "limit": 100}}, "data.limit", "not applied to webdataset"),
    ({"model": {"text_dim": 512}}, "precompute.clip_weights", "local path"),
    ({"storage": {"aws_secret_access_key": "x"}}, "storage.aws_secret_access_key", "secrets never go in a config"),
    ({"logging": {"keep_checkpoints": 1}}, "logging.keep_checkpoints", ">= 2"),
    ({"distill": {"adversarial": {"rec_loss": "feature"}}}, "distill.adversarial.rec_loss", "backbone"),
    ({"grow": {"resolutions": [32, 64], "batch_sizes": [64]}, "data": {"resolution": 64}}, "grow.batch_sizes",
     "one batch size per grow.resolutions entry"),
    ({"grow": {"resolutions": [32, 64], "batch_sizes": [64, 90]}, "data": {"resolution": 64},
      "runtime": {"num_workers": 4}, "teacher": {"train": {"batch_size": 64}},
      "distill": {"train": {"batch_size": 64}}}, "grow.batch_sizes[1]", "not divisible"),
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


def test_growth_stages_take_their_own_batch_sizes(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS[0].parent / "imagenet-512.yaml")
    specs = chain(cfg)
    assert [(s.name, s.kind, s.resolution, s.start_from) for s in specs] == [
        ("teacher", "teacher", 64, None), ("distill", "distill", 64, "teacher"), ("grow-128", "grow", 128, "distill"),
        ("grow-256", "grow", 256, "grow-128"), ("grow-512", "grow", 512, "grow-256")]
    assert [s.train.batch_size for s in specs[2:]] == [256, 360, 512]
    assert specs[3].train.optimizer == cfg.grow.train.optimizer  # only the batch differs
    assert specs[3].batch_key == "grow.batch_sizes[1]"
    with pytest.raises(ValueError, match="'grow-1024': not a stage of this run; its stages are teacher, distill, "
                                         "grow-128, grow-256, grow-512"):
        stage_spec(cfg, "grow-1024")
    with pytest.raises(ConfigError, match=r"grow.batch_sizes\[1\]: 360 is not divisible"):
        load_config(CONFIGS[0].parent / "imagenet-512.yaml", ["runtime.num_workers=16"])


@pytest.mark.parametrize("name", ["imagenet-512.yaml", "t2i-512.yaml"])
def test_paper_scale_configs_dry_run(name: str, capsys: pytest.CaptureFixture) -> None:
    """The paper-scale configs lay themselves out on this CPU (meta-device networks): the teacher is EDM's ADM
    ImageNet-64 UNet (296M parameters in EDM's table), every batch splits evenly over the ranks, and training it at
    64 px instead of 512 px saves the pixel ratio's worth of FLOPs (64x pixels; attention kept at the same
    resolutions makes it a little less)."""
    assert main(["run", str(CONFIGS[0].parent / name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if line.startswith("  ")]
    rows = {parts[0]: parts for parts in table if len(parts) == 10 and parts[1].isdigit()}
    teacher_params = float(rows["teacher"][6].rstrip("M"))
    if name == "imagenet-512.yaml":
        assert 295.0 <= teacher_params <= 297.0, rows["teacher"]
    assert [rows[s][3:5] for s in ("teacher", "distill", "grow-128", "grow-256", "grow-512")] == \
        [["4096", "64"], ["96", "12"], ["256", "32"], ["360", "45"], ["512", "64"]]
    trainable = [float(rows[s][7].rstrip("M")) for s in ("grow-128", "grow-512")]
    assert all(t < 0.15 * teacher_params for t in trainable)  # growth trains a small part: the base is frozen
    ratio = float(out.split("saved by")[0].rsplit(":", 1)[1].strip().rstrip("x"))
    assert 45 < ratio < 64


def test_memory_format_follows_the_device_unless_set() -> None:
    """channels-last pays on the CPU and costs on CUDA (GroupNorm copies): left unset, the device decides; a set
    value wins, and the resolved bool is what the config (and so every architecture record) holds."""
    assert load_config(None, []).model.channels_last is True
    assert load_config(None, ["runtime.use_gpu=true"]).model.channels_last is False
    assert load_config(None, ["runtime.use_gpu=true", "model.channels_last=true"]).model.channels_last is True
    assert load_config(None, ["model.channels_last=false"]).model.channels_last is False
    assert "channels_last: null" not in to_yaml(load_config(None, []))
