"""teacher.init_from: starting a run from a published teacher instead of training one.

The ADM layout of EDM's ImageNet-64 teacher (edm_imagenet64_ema.pt) is checked against the reference implementation
itself: tests/fixtures/adm_reference.pt holds a small random network built with sony/pagoda's own UNet, and the
denoiser outputs of its own EDM preconditioning (tests/fixtures/README.md says how it was made). Converted onto our
UNet, the weights must give the same outputs (fp32, atol 1e-5); every mapped module must reach those outputs, so a
wrong mapping cannot pass; and weights that do not fit the config are refused naming the model.* key.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pagoda_dist import storage
from pagoda_dist.config import ConfigError, ModelConfig, load_config
from pagoda_dist.diffusion.edm import EDMPrecond
from pagoda_dist.eval.report import teacher_origin
from pagoda_dist.interfaces import Condition
from pagoda_dist.models.adm_convert import ADMLayoutError, adm_key_map, adm_to_unet_state
from pagoda_dist.models.unet import UNet
from pagoda_dist.pipeline import plan, run_pipeline
from pagoda_dist.precompute.teacher import TeacherError, commit_teacher, import_teacher, load_teacher
from pagoda_dist.runtime import CheckpointStore

pytestmark = pytest.mark.timeout(600)

FIXTURES = Path(__file__).parent / "fixtures"
# fp32: ours reproduces the reference to ~2e-6 (summation order); ADM's GroupNorm eps alone moves it by 5e-5.
ATOL = 1e-5
# The reference network's configuration (tests/fixtures/adm_make_reference.py).
SMALL = {"resolution": 16, "channels": 32, "channel_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [8],
         "head_channels": 16, "num_classes": 10, "adm_compatible": True}
SMALL_OVERRIDES = [f"model.{k}={json.dumps(v)}" for k, v in SMALL.items()]


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The fixture's tensors and the reference network's ADM state dict (float32, exactly as the reference ran)."""
    fixture = torch.load(FIXTURES / "adm_reference.pt", weights_only=True)
    state = {k: q.float() * fixture["step"][k] for k, q in fixture["state_dict_int8"].items()}
    return fixture, state


def raw_output(net: UNet, fixture: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our raw network F(c_in x, c_noise, y) at the fixture's inputs."""
    x, sigma = fixture["x"], fixture["sigma"]
    with torch.no_grad():
        return net.eval()(x * (sigma**2 + 0.25).rsqrt()[:, None, None, None], sigma.log() / 4,
                          Condition(class_labels=fixture["class_labels"]))


def outputs(net: UNet, fixture: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our denoiser D(x; sigma, y) through EDMPrecond, and the raw network at the same inputs."""
    with torch.no_grad():
        denoised = EDMPrecond(net.eval(), 0.5)(fixture["x"], fixture["sigma"],
                                               Condition(class_labels=fixture["class_labels"]))
    return denoised, raw_output(net, fixture)


def converted(state: dict[str, torch.Tensor], cfg: ModelConfig) -> UNet:
    net = UNet(cfg)
    net.load_state_dict(adm_to_unet_state(state, cfg), strict=True)
    return net


def assert_matches(net: UNet, fixture: dict[str, torch.Tensor]) -> None:
    denoised, raw = outputs(net, fixture)
    torch.testing.assert_close(denoised, fixture["denoised"], atol=ATOL, rtol=0)
    torch.testing.assert_close(raw, fixture["raw"], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("channels_last", [True, False])
def test_converted_adm_weights_give_the_reference_denoiser(reference, channels_last: bool) -> None:
    fixture, state = reference
    assert_matches(converted(state, ModelConfig(**SMALL, channels_last=channels_last)), fixture)


def test_every_mapped_module_reaches_the_compared_outputs(reference) -> None:
    """Shuffling the values of any one mapped module's tensors (what a wrong mapping does: the converter maps whole
    modules, weight and bias together) moves the outputs past the tolerance, so the comparison above catches a
    mapping error anywhere; the converter maps every ADM tensor to exactly one of ours and refuses leftovers on
    either side. (Per tensor, some biases are unobservable: one added right before a GroupNorm of one channel per
    group is removed by it, in ADM as in ours.)"""
    fixture, state = reference
    cfg, gen = ModelConfig(**SMALL), torch.Generator().manual_seed(1)
    net = converted(state, cfg).eval()
    ours = {k: v.clone() for k, v in net.state_dict().items()}
    modules = sorted({key.rpartition(".")[0] for key in adm_key_map(net)})
    assert len(modules) == 72
    for module in modules:
        shuffled = {k: v.flatten()[torch.randperm(v.numel(), generator=gen)].view_as(v)
                    for k, v in ours.items() if k.rpartition(".")[0] == module}
        net.load_state_dict({**ours, **shuffled})
        moved = (raw_output(net, fixture) - fixture["raw"]).abs().max()
        assert moved > 10 * ATOL, f"{module} does not reach the outputs"


def test_adm_numerics_are_needed(reference) -> None:
    """Without model.adm_compatible the same weights are refused; with our own noise embedding they do not match."""
    fixture, state = reference
    with pytest.raises(ADMLayoutError, match="model.adm_compatible"):
        adm_to_unet_state(state, ModelConfig(**{**SMALL, "adm_compatible": False}))
    net = converted(state, ModelConfig(**SMALL))
    net.emb_noise = UNet(ModelConfig(**{**SMALL, "adm_compatible": False})).emb_noise
    assert (raw_output(net, fixture) - fixture["raw"]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ mismatches
@pytest.mark.parametrize("change, key", [
    ({"num_res_blocks": 2}, "model.num_res_blocks"),
    ({"channels": 64}, "model.channels"),
    ({"channel_mult": [1, 2]}, "model.channel_mult"),
    ({"attn_resolutions": [16]}, "model.attn_resolutions"),
    ({"num_classes": 0}, "model.num_classes"),
])
def test_adm_weights_that_do_not_fit_name_the_config_key(reference, change: dict, key: str) -> None:
    _, state = reference
    with pytest.raises(ADMLayoutError, match=key) as err:
        adm_to_unet_state(state, ModelConfig(**{**SMALL, **change}), where="edm.pt")
    assert "model section" in str(err.value)


def test_adm_weights_without_a_counterpart_are_refused(reference) -> None:
    _, state = reference
    cfg = ModelConfig(**SMALL)
    learned_sigma = {**state, "out.2.weight": torch.cat([state["out.2.weight"]] * 2)}  # 6 output channels
    with pytest.raises(ADMLayoutError, match=r"out\.2\.weight: shape \(6, 32, 3, 3\)"):
        adm_to_unet_state(learned_sigma, cfg)
    conv_resampling = {**state, "input_blocks.2.0.op.weight": torch.zeros(32, 32, 3, 3)}
    with pytest.raises(ADMLayoutError, match=r"no counterpart in the UNet: input_blocks\.2\.0\.op\.weight"):
        adm_to_unet_state(conv_resampling, cfg)


def test_imagenet_512_model_section_takes_the_edm_imagenet64_layout() -> None:
    """configs/imagenet-512.yaml's model section (with model.adm_compatible) fits every tensor of the released
    teacher's layout, recorded from the reference's UNet with its settings; ours has one more class row."""
    shapes = json.loads((FIXTURES / "adm_imagenet64_shapes.json").read_text())
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    cfg = load_config("configs/imagenet-512.yaml", ["model.adm_compatible=true"]).model
    ours = adm_to_unet_state(state, cfg, where="edm_imagenet64_ema.pt")
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in state.values()) + 4 * cfg.channels
    with pytest.raises(ADMLayoutError, match="model.attn_resolutions"):
        adm_to_unet_state(state, dataclasses.replace(cfg, attn_resolutions=[16, 8]))


# ------------------------------------------------------------------------------------- import into a run
@pytest.mark.parametrize("value", ["s3://bucket/models/", " s3://bucket/edm.pt"])
def test_init_from_must_name_one_file(value: str) -> None:
    with pytest.raises(ConfigError, match="teacher.init_from: must be the URL of one file"):
        load_config(None, [f"teacher.init_from='{value}'"])


def small_run(root: Path, name: str, init_from: str, *extra: str):
    return load_config(None, [*SMALL_OVERRIDES, f"run.root={root}", f"run.name={name}",
                              f"teacher.init_from={init_from}", "data.source=builtin:fashion-mnist", *extra])


def test_import_commits_the_teacher_and_records_its_origin(reference, tmp_path: Path) -> None:
    fixture, state = reference
    adm_url = str(tmp_path / "edm.pt")
    torch.save(state, adm_url)
    cfg = small_run(tmp_path / "root", "adm", adm_url)
    assert [s.name for s in plan(cfg)][:2] == ["teacher", "prepare"]  # before any work
    assert not plan(cfg)[0].is_done()

    ref = import_teacher(cfg)
    assert plan(cfg)[0].is_done()
    export_url, nimg = CheckpointStore(cfg.run_url, "teacher").latest_export()
    assert ref.url in export_url and nimg == 0  # no teacher images in this run
    teacher, arch = load_teacher(export_url)  # what precompute loads
    assert arch["model"]["adm_compatible"] is True
    assert_matches(teacher, fixture)
    assert teacher_origin(cfg) == f"imported from {adm_url} (an ADM-layout state dict, converted); not trained in " \
                                  "this run"

    # The run's own export starts another run; a different init_from for a run that has a teacher is refused.
    again = small_run(tmp_path / "root", "again", export_url)
    import_teacher(again)
    assert_matches(load_teacher(CheckpointStore(again.run_url, "teacher").latest_export()[0])[0], fixture)
    assert "a teacher export" in teacher_origin(again)
    with pytest.raises(ConfigError, match="already holds the teacher imported from"):
        plan(small_run(tmp_path / "root", "adm", export_url))[0].is_done()


def test_import_refuses_what_does_not_fit(reference, tmp_path: Path) -> None:
    _, state = reference
    adm_url = str(tmp_path / "edm.pt")
    torch.save(state, adm_url)
    root = tmp_path / "root"
    with pytest.raises(TeacherError, match="model.num_res_blocks"):
        import_teacher(small_run(root, "a", adm_url, "model.num_res_blocks=2"))
    with pytest.raises(TeacherError, match="teacher.sampler.guidance=1"):
        import_teacher(small_run(root, "b", adm_url, "teacher.sampler.guidance=1.5"))
    with pytest.raises(TeacherError, match="cannot read"):
        import_teacher(small_run(root, "c", str(tmp_path / "missing.pt")))
    # An own export of another architecture: the differing keys are named.
    other = small_run(root, "d", adm_url, "model.channels=64", "model.adm_compatible=false")
    commit_teacher(other.run_url, UNet(other.model))
    with pytest.raises(TeacherError, match="model.channels: .* 64 vs model 32"):
        import_teacher(small_run(root, "e", CheckpointStore(other.run_url, "teacher").latest_export()[0]))
    assert not storage.exists(str(root / "runs" / "a" / "teacher"))  # nothing committed for refused imports


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_run_starts_from_an_imported_teacher(reference, s3_env: str, tmp_path: Path) -> None:
    """The miniature chain of test_pipeline with teacher.init_from at ADM weights on the embedded S3 server: the
    teacher is imported, not trained, and precompute, distil, grow and evaluation run from it; the report says so."""
    from tests.test_pipeline import mini_overrides

    fixture, state = reference
    adm_url = storage.join(s3_env, "models", "edm.pt")
    with open(tmp_path / "edm.pt", "wb") as f:
        torch.save(state, f)
    storage.write_bytes(adm_url, (tmp_path / "edm.pt").read_bytes())
    cfg = load_config("configs/tiny.yaml", [*mini_overrides(s3_env, tmp_path, "imported"), *SMALL_OVERRIDES,
                                            f"teacher.init_from={adm_url}", "teacher.sampler.guidance=1"])
    records = run_pipeline(cfg, report_dir=tmp_path / "report")
    assert [(r.name, r.status) for r in records] == [
        ("teacher", "done"), ("prepare", "done"), ("precompute", "done"), ("distill", "done"), ("grow-32", "done"),
        ("evaluate", "done")]
    assert_matches(load_teacher(CheckpointStore(cfg.run_url, "teacher").latest_export()[0])[0], fixture)
    for stage in ("distill", "grow-32"):
        CheckpointStore(cfg.run_url, stage).latest_export()  # NoExport when nothing is committed
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["teacher_origin"].startswith(f"imported from {adm_url}")
    assert f"Teacher: imported from {adm_url}" in (tmp_path / "report" / "report.html").read_text()
    assert all(step.is_done() for step in plan(cfg))
