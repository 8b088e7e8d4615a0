"""`pagoda_dist.api`: exports as the runtime writes them (export.pt, export.safetensors with its record, export.json)
loaded from an export file, a checkpoint folder, a stage folder or S3, and sampled exactly as the stage samples; bad
files refused in one line; `pagoda sample --prompt`. Tiny random networks: nothing is trained."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from pagoda_dist import storage
from pagoda_dist.api import ExportedModel, GeneratorError, load_generator
from pagoda_dist.chain import stage_spec
from pagoda_dist.config import Config, load_config
from pagoda_dist.eval.inputs import load_export_network
from pagoda_dist.interfaces import Condition, Stage
from pagoda_dist.models.text_encoder import TextEncoder
from pagoda_dist.runtime.checkpoint import CheckpointRef, CheckpointStore, SavePayload
from pagoda_dist.runtime.worker import export_payload
from pagoda_dist.stages import build_distill, build_grow, build_teacher
from tests.test_t2i_additions import randomized

pytestmark = pytest.mark.timeout(180)

SMALL = ["storage.embedded_s3=false", "model.resolution=8", "model.channels=16", "model.channel_mult=[1,2]",
         "model.num_res_blocks=1", "model.attn_resolutions=[4]", "model.head_channels=8", "teacher.sampler.steps=3",
         "teacher.sampler.guidance=2.0", "distill.adversarial.discriminator.channels=16",
         "grow.adversarial.discriminator.channels=16", "grow.resolutions=[16]", "data.resolution=16"]
CLASS = [*SMALL, "model.num_classes=4"]
UNCONDITIONAL = [*SMALL, "model.num_classes=0"]
# configs/tiny-text.yaml (tiny random CLIP text tower) with a guidance-aware generator
TEXT = [*SMALL, "distill.adversarial.guidance_range=[1,4]", "distill.adversarial.distill_loss_weight=1.0"]
PROMPTS = ["a red dress", "a bag"]


class _NoEngines:
    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)

    def load_state(self, directory: Path) -> None:
        raise AssertionError("not resumed here")


def commit(run_url: str, stage: Stage, nimg: int = 64) -> CheckpointRef:
    """A checkpoint of `stage` as the runtime commits one: the worker's export payload, the store's save."""
    first, net = next(iter(stage.trainable().items()))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    export = export_payload(stage, stage.name, nimg, first, state, state)
    meta = {"architecture": stage.architecture()}
    return CheckpointStore(run_url, stage.name).save(SavePayload(nimg, _NoEngines(), {}, meta, state, export))


def chain_of(cfg: Config) -> dict[str, Stage]:
    """Teacher, distil and grow-16 stages with random weights (zero-initialised heads would sample nothing)."""
    teacher = build_teacher(cfg)
    randomized(teacher.net, seed=1)
    distill = build_distill(cfg, {"architecture": teacher.architecture(), "ema": teacher.net.state_dict()})
    randomized(distill.generator, seed=2)
    grow = build_grow(cfg, stage_spec(cfg, "grow-16"),
                      {"architecture": distill.architecture(), "ema": distill.generator.state_dict()})
    randomized(grow.generator, seed=3)
    return {"teacher": teacher, "distill": distill, "grow-16": grow}


def net_of(stage: Stage) -> torch.nn.Module:
    return next(iter(stage.trainable().values())).eval()


def unit_noise(n: int, cfg: Config, seed: int) -> torch.Tensor:
    m = cfg.model
    return torch.randn(n, m.in_channels, m.resolution, m.resolution, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def class_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict[str, Stage], str]:
    cfg = load_config(None, CLASS)
    stages = chain_of(cfg)
    run = str(tmp_path_factory.mktemp("class-run"))
    for stage in stages.values():
        commit(run, stage)
    return cfg, stages, run


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict[str, Stage], str]:
    root = tmp_path_factory.mktemp("text-root")
    cfg = load_config("configs/tiny-text.yaml", [*TEXT, f"run.root={root}"])
    teacher, distill = (stage for name, stage in chain_of(cfg).items() if name != "grow-16")
    for stage in (teacher, distill):
        commit(cfg.run_url, stage)
    return cfg, {"teacher": teacher, "distill": distill}, str(root)


# ------------------------------------------------------------------------------------------------- exports
@pytest.mark.parametrize("name", ["teacher", "distill", "grow-16"])
def test_safetensors_and_pt_exports_sample_as_the_stage_does(class_run, name: str) -> None:
    cfg, stages, run = class_run
    stage = stages[name]
    ref = CheckpointStore(run, name).latest_committed()
    parts = storage.read_commit(ref.url).parts
    assert {"export.pt", "export.safetensors", "export.json"} <= set(parts)  # committed parts of the checkpoint
    record = json.loads(storage.read_bytes(storage.join(ref.url, "export.json")))
    assert record["stage"] == name and record["nimg"] == 64 and record["format"] == 1
    assert record["architecture"] == json.loads(json.dumps(stage.architecture()))
    assert record["metadata"]["condition"] == "class" and record["metadata"]["sampler"]["steps"] == 3
    assert "ema" not in record and "net" not in record

    from_folder = load_generator(ref.url)  # a checkpoint folder: its safetensors
    from_pt = load_generator(storage.join(ref.url, "export.pt"))
    assert from_folder.source.endswith("export.safetensors")
    for stage_folder in (load_generator(run, stage=name), load_generator(storage.join(run, name))):
        assert stage_folder.source == from_folder.source  # a stage: its latest checkpoint
    images = from_folder.generate(6, seed=3)
    assert torch.equal(images, from_pt.generate(6, seed=3))

    # What the stage samples (the teacher: its PF-ODE with the recorded 3 Heun steps at guidance 2).
    expected = stage.sample(net_of(stage), unit_noise(6, cfg, 3), Condition(class_labels=torch.arange(6) % 4))
    assert torch.equal(images, expected)
    resolution = 16 if name == "grow-16" else 8
    assert images.shape == (6, 3, resolution, resolution) and images.dtype == torch.float32
    assert from_folder.stage == name and from_folder.nimg == 64 and from_folder.is_teacher == (name == "teacher")
    if name == "teacher":  # the guidance scale reaches the sampler
        assert not torch.equal(from_folder.generate(6, seed=3, guidance=1.0), images)
    else:  # one class for all; the first sample's noise does not depend on n (up to the batch's float rounding)
        one_class = from_folder.generate(3, classes=[2], seed=3)
        torch.testing.assert_close(one_class[:1], from_folder.generate(seed=3, classes=2))
        assert not torch.equal(one_class[:2], from_folder.generate(2, classes=[1], seed=3))


def test_the_live_weights_load_beside_the_ema_network(class_run, tmp_path: Path) -> None:
    """load_export_network(weights="net"): the weights the optimiser stepped, from the full export only."""
    _, _, run = class_run
    ref = CheckpointStore(run, "distill").latest_committed()
    export = torch.load(io.BytesIO(storage.read_bytes(storage.join(ref.url, "export.pt"))), weights_only=True)
    # This short run's EMA has not left its live weights yet; make them differ so a mix-up cannot pass.
    export["net"] = {name: t + 1 if t.is_floating_point() else t for name, t in export["net"].items()}
    torch.save(export, tmp_path / "export.pt")
    for weights in ("ema", "net"):
        state = load_export_network(str(tmp_path / "export.pt"), weights).state_dict()
        assert all(torch.equal(state[name], t) for name, t in export[weights].items())
    with pytest.raises(ValueError, match="holds no 'net' weights.*full export"):
        load_export_network(storage.join(ref.url, "export.safetensors"), "net")


def test_an_unconditional_generator(tmp_path: Path) -> None:
    cfg = load_config(None, UNCONDITIONAL)
    stage = chain_of(cfg)["distill"]
    ref = commit(str(tmp_path), stage)
    model = load_generator(ref.url)
    images = model.generate(4, seed=7)
    assert model.condition == "none"
    assert torch.equal(images, stage.sample(net_of(stage), unit_noise(4, cfg, 7), Condition()))
    with pytest.raises(GeneratorError, match="unconditional: it takes no classes"):
        model.generate(2, classes=[0])


@pytest.mark.parametrize("name", ["teacher", "distill"])
def test_prompts_go_through_the_recorded_text_tower(text_run, name: str) -> None:
    cfg, stages, _ = text_run
    stage = stages[name]
    model = load_generator(cfg.run_url, stage=name)
    assert model.record["metadata"]["text_encoder"] == {"arch": "pagoda-tiny-text", "weights": None,
                                                        "random_init": True}
    images = model.generate(prompts=PROMPTS, seed=1)
    # The stages' condition: the tower's embeddings rounded to float16 as the latent pairs store them.
    condition = TextEncoder("pagoda-tiny-text", None, random_init=True)(PROMPTS).stored_condition()
    assert torch.equal(images, stage.sample(net_of(stage), unit_noise(2, cfg, 1), condition))
    # A guidance-aware generator (and the teacher) take the guidance scale.
    assert not torch.equal(model.generate(prompts=PROMPTS, seed=1, guidance=4.0), images)
    from_pt = load_generator(model.source.removesuffix(".safetensors") + ".pt")
    assert torch.equal(from_pt.generate(prompts=PROMPTS, seed=1), images)
    if name == "distill":  # prompts repeat in turn, and their order matters
        four = stage.sample(net_of(stage), unit_noise(4, cfg, 1), condition.repeat(2))
        assert torch.equal(model.generate(4, prompts=PROMPTS, seed=1), four)
        assert not torch.equal(model.generate(prompts=PROMPTS[::-1], seed=1), images)


def test_loads_from_s3(class_run, s3_env: str) -> None:
    cfg, stages, local = class_run
    run = storage.join(s3_env, "runs", "api")
    commit(run, stages["distill"])
    model = load_generator(storage.join(run, "distill"))
    assert model.source.startswith("s3://") and model.source.endswith("export.safetensors")
    assert torch.equal(model.generate(4, seed=5), load_generator(local, stage="distill").generate(4, seed=5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_written_export_samples_on_the_cpu_and_the_gpu(tmp_path: Path) -> None:
    cfg = load_config(None, CLASS)
    stage = chain_of(cfg)["distill"]
    stage.generator.cuda()  # the runtime's EMA lives on the GPU: export.pt then holds CUDA tensors
    ref = commit(str(tmp_path), stage)
    for name in ("export.pt", "export.safetensors"):
        model = load_generator(storage.join(ref.url, name))  # onto the CPU, as on a machine without a GPU
        assert model.device.type == "cpu"
        on_cpu = model.generate(8, seed=0)
        on_gpu = model.generate(8, seed=0, device="cuda")
        assert model.device.type == "cuda" and on_gpu.device.type == "cpu"
        assert (on_cpu - on_gpu).abs().mean() < 1e-2  # the same noise; TF32 convolutions round differently


# ----------------------------------------------------------------------------------------------- refusals
def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _safetensors(weights: dict[str, torch.Tensor], record: dict) -> bytes:
    return save({k: v.contiguous() for k, v in weights.items()}, metadata={"pagoda_export": json.dumps(record)})


def test_damaged_or_mismatched_files_are_refused_in_one_line(class_run, tmp_path: Path) -> None:
    cfg, stages, run = class_run
    distill = CheckpointStore(run, "distill").latest_committed().url
    grow = CheckpointStore(run, "grow-16").latest_committed().url
    good = storage.read_bytes(storage.join(distill, "export.safetensors"))
    record = json.loads(storage.read_bytes(storage.join(distill, "export.json")))
    weights = net_of(stages["distill"]).state_dict()
    grow_record = json.loads(storage.read_bytes(storage.join(grow, "export.json")))
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    buffer = io.BytesIO()
    torch.save({"architecture": record["architecture"], "ema": weights}, buffer)  # no sampling record
    old = _write(tmp_path / "old.pt", buffer.getvalue())
    cases = {
        _write(tmp_path / "cut.safetensors", good[:len(good) // 2]): "not a readable export",
        _write(tmp_path / "short.safetensors", good[:100]): "truncated or not a safetensors file",
        _write(tmp_path / "garbage.pt", b"not a checkpoint at all"): "not a torch checkpoint (no zip archive",
        _write(tmp_path / "cut.pt", storage.read_bytes(storage.join(distill, "export.pt"))[:5000]):
            "not a readable export",
        str(plain): "without the 'pagoda_export' record",
        _write(tmp_path / "mixed.safetensors", _safetensors(weights, grow_record)):
            "weights do not fit the recorded architecture",
        _write(tmp_path / "future.safetensors", _safetensors(weights, {**record, "format": 2})):
            "export format 2, this code reads 1",
        old: "carries no sampling record",
        str(tmp_path / "no-such-stage"): "no committed checkpoint there (nothing is there)",
        run: "no committed checkpoint there (it holds distill, grow-16, teacher)",
    }
    for url, message in cases.items():
        with pytest.raises(GeneratorError) as err:
            load_generator(url)
        assert message in str(err.value) and url in str(err.value), (url, str(err.value))
        assert "\n" not in str(err.value)
    # An export without a record takes it from the run's config, which must fit the network.
    assert torch.equal(load_generator(old, config=cfg).generate(2, seed=0), load_generator(distill).generate(2, seed=0))
    with pytest.raises(GeneratorError, match="the config does not belong to this export"):
        load_generator(old, config=load_config(None, UNCONDITIONAL))


@pytest.mark.parametrize("request_, message", [
    ({"prompts": ["a bag"]}, "class-conditional: it takes no prompts"),
    ({"classes": [4]}, "class ids run from 0 to 3"),
    ({"guidance": 3.0}, "not trained guidance-aware"),
    ({"n": 0}, "must be >= 1"),
])
def test_requests_a_model_cannot_serve_are_refused(class_run, request_: dict, message: str) -> None:
    _, _, run = class_run
    model: ExportedModel = load_generator(run, stage="distill")
    with pytest.raises(GeneratorError, match=message):
        model.generate(**request_)


# -------------------------------------------------------------------------------------------------------- CLI
def test_pagoda_sample_takes_prompts(text_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from pagoda_dist.cli import main

    cfg, _, root = text_run
    out = tmp_path / "prompts.png"
    args = ["sample", "configs/tiny-text.yaml", *TEXT, f"run.root={root}", "--stage", "distill", "--n", "4",
            "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "1", "--out", str(out)]
    assert main(args) == 0
    assert "4 samples of distill (8px)" in capsys.readouterr().out
    assert Image.open(out).size == (2 * 8 + 3, 2 * 8 + 3)  # 2 x 2 images of 8 px, 1 px gaps
    # the CLI draws what the API draws
    expected = load_generator(cfg.run_url, stage="distill").generate(4, prompts=PROMPTS, seed=1)
    again = tmp_path / "api.png"
    from pagoda_dist.api import save_grid

    save_grid(expected, again)
    assert Image.open(out).tobytes() == Image.open(again).tobytes()
    assert main([*args[:-2], "--out", str(tmp_path / "x.png"), "--label", "1"]) == 2
    assert "text-conditioned: it takes no classes" in capsys.readouterr().err

    # The run's own stage samples as its config says, overrides included (the record has 3 steps).
    teacher = ["sample", "configs/tiny-text.yaml", *TEXT, f"run.root={root}", "teacher.sampler.steps=2", "--stage",
               "teacher", "--n", "1", "--prompt", PROMPTS[0], "--out", str(tmp_path / "teacher.png")]
    assert main(teacher) == 0
    model = load_generator(cfg.run_url, stage="teacher")
    recorded = model.generate(prompts=PROMPTS[0])
    model.sampler = dataclasses.replace(model.sampler, steps=2)
    save_grid(model.generate(prompts=PROMPTS[0]), again)
    assert Image.open(tmp_path / "teacher.png").tobytes() == Image.open(again).tobytes()
    assert save_grid(recorded) != again.read_bytes()  # 3 steps draw another image
