"""Evaluation metrics: EfficientNet-Lite0 is really ImageNet-trained, SWD and FID-EffNetLite0 order degradations of
real photographs correctly, the Frechet distance matches closed forms, FLOP counting, PNG grids, CLIP score and the
standard-FID loading path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

from pagoda_dist.data.grid import save_grid
from pagoda_dist.data.images import to_unit_range
from pagoda_dist.eval.clip_score import clip_score, load_clip
from pagoda_dist.eval.fid import FeatureStats, effnet_features, fid_effnet_lite0, fid_inception, frechet_distance
from pagoda_dist.eval.swd import _downsample, _upsample, laplacian_pyramid, swd
from pagoda_dist.models.efficientnet_lite0 import FEATURE_CHANNELS, load_efficientnet_lite0
from pagoda_dist.runtime.flops import estimate_peak_flops, forward_flops_per_image, mfu, training_flops_per_image

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


# ------------------------------------------------------------------------------------------------ photo tiles
def _photos() -> list[np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
    photos = [getattr(data, n)() for n in names] + [data.stereo_motorcycle()[0]]
    return photos + list(load_sample_images().images)


@pytest.fixture(scope="module")
def tiles() -> torch.Tensor:
    """Non-overlapping 64x64 uint8 tiles of real photographs at scales 1 and 1/2, shuffled deterministically."""
    out = []
    for photo in _photos():
        x = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float()  # np.array: a writable copy
        for scale in (1, 2):
            y = x if scale == 1 else F.interpolate(x, scale_factor=1 / scale, mode="bilinear", antialias=True)
            h, w = y.shape[-2] // 64, y.shape[-1] // 64
            out += [y[0, :, i * 64:(i + 1) * 64, j * 64:(j + 1) * 64] for i in range(h) for j in range(w)]
    t = torch.stack(out).round().clamp(0, 255).to(torch.uint8)
    assert len(t) >= 512
    return t[torch.randperm(len(t), generator=torch.Generator().manual_seed(0))]


def blur_via(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Down to `resolution` and back up: the detail a generator at that resolution cannot have. Floats in [-1, 1]."""
    f = to_unit_range(x) * 2 - 1
    low = F.interpolate(f, size=(resolution, resolution), mode="bilinear", antialias=True)
    return F.interpolate(low, size=x.shape[-2:], mode="bilinear").clamp(-1, 1)


def add_noise(x: torch.Tensor, sigma_255: float) -> torch.Tensor:
    f = to_unit_range(x) * 2 - 1
    g = torch.Generator().manual_seed(1)
    return (f + torch.randn(f.shape, generator=g) * 2 * sigma_255 / 255).clamp(-1, 1)


# ---------------------------------------------------------------------------------------- EfficientNet-Lite0
@pytest.fixture(scope="module")
def effnet():
    return load_efficientnet_lite0()


def test_effnet_loads_strict_and_classifies_the_cat(effnet) -> None:
    from skimage import data

    x = torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = effnet((x - 0.5) / 0.5).softmax(-1)[0]
        feats = effnet.forward_features((x - 0.5) / 0.5)
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5
    assert [f.shape[1] for f in feats] == list(FEATURE_CHANNELS)
    assert [f.shape[-1] for f in feats] == [224 // 4, 224 // 8, 224 // 16, 224 // 32]
    assert effnet.pooled(torch.zeros(2, 3, 64, 64)).shape == (2, 1280)


def test_effnet_stays_frozen(effnet) -> None:
    parent = torch.nn.Sequential(effnet)
    parent.train()  # a discriminator's .train() must not switch the backbone's batch norms to batch statistics
    assert not effnet.training and not any(m.training for m in effnet.modules())
    assert not any(p.requires_grad for p in effnet.parameters())


def test_effnet_weights_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_efficientnet_lite0(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        load_efficientnet_lite0(wrong)


# ------------------------------------------------------------------------------------------------------ SWD
def test_laplacian_pyramid_levels_reconstruct_the_image() -> None:
    x = torch.rand(2, 3, 64, 64)
    levels = laplacian_pyramid(x, min_resolution=16)
    assert [lvl.shape[-1] for lvl in levels] == [64, 32, 16]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + _upsample(rebuilt, band.shape[-2:])
    torch.testing.assert_close(rebuilt, x, atol=1e-5, rtol=0)
    assert _downsample(torch.ones(1, 1, 8, 8)).allclose(torch.ones(1, 1, 4, 4))  # the filter sums to one


def test_swd_orders_degradations_of_real_photos(tiles) -> None:
    """N = 256 vs 256: real-vs-real < blur via 32 < blur via 16 < noise, and blur shows at the finest level."""
    a, b = tiles[:256], tiles[256:512]
    results = {name: swd(a, y, seed=0) for name, y in [
        ("real", b), ("blur32", blur_via(b, 32)), ("blur16", blur_via(b, 16)), ("noise", add_noise(b, 16))]}
    avg = [results[n].average for n in ("real", "blur32", "blur16", "noise")]
    fine = [results[n].levels[64] for n in ("real", "blur32", "blur16", "noise")]
    assert avg == sorted(avg), results
    assert fine == sorted(fine) and fine[1] > 2 * fine[0], results
    assert set(results["real"].to_dict()) == {"swd/64", "swd/32", "swd/16", "swd/avg"}


def test_swd_is_deterministic_and_checks_its_inputs(tiles) -> None:
    a, b = tiles[:32], blur_via(tiles[32:64], 32)
    first, again = swd(a, b, seed=3), swd(a, b, seed=3)
    assert first == again
    assert swd(a, b, seed=4) != first
    as_float = swd(a.float() / 127.5 - 1, b, seed=3)  # uint8 and [-1, 1] floats are the same images
    assert as_float.average == pytest.approx(first.average, rel=1e-4)
    with pytest.raises(ValueError, match="equal size"):
        swd(a, b[:31])
    with pytest.raises(ValueError, match="one shape"):
        swd(a, b[..., :32, :32])


# ------------------------------------------------------------------------------------------ Frechet distance
def test_frechet_distance_of_identical_gaussians_is_zero() -> None:
    feats = np.random.default_rng(0).standard_normal((50, 80))  # fewer samples than dimensions: singular cov
    s = FeatureStats.of(feats)
    # sqrt of the ~1e-15 rounding in the zero eigenvalues leaves ~1e-7 each: zero up to that.
    assert abs(frechet_distance(s, s)) < 1e-6 * np.trace(s.cov)


def test_frechet_distance_matches_closed_forms() -> None:
    rng = np.random.default_rng(1)
    mu_a, mu_b = rng.standard_normal(6), rng.standard_normal(6)
    var_a, var_b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = frechet_distance(FeatureStats(mu_a, np.diag(var_a), 2), FeatureStats(mu_b, np.diag(var_b), 2))
    assert got == pytest.approx(expected, rel=1e-10)
    # Non-commuting full covariances: against the textbook formula with a general matrix square root.
    m_a, m_b = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    cov_a, cov_b = m_a @ m_a.T + 0.1 * np.eye(6), m_b @ m_b.T + 0.1 * np.eye(6)
    textbook = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    got = frechet_distance(FeatureStats(mu_a, cov_a, 2), FeatureStats(mu_b, cov_b, 2))
    assert got == pytest.approx(textbook, rel=1e-8)


def test_feature_stats_round_trip(tmp_path) -> None:
    s = FeatureStats.of(np.random.default_rng(2).standard_normal((10, 4)))
    s.save(tmp_path / "ref.npz")
    t = FeatureStats.load(tmp_path / "ref.npz")
    assert t.count == 10 and np.array_equal(t.mu, s.mu) and np.array_equal(t.cov, s.cov)


@pytest.mark.slow
def test_fid_effnet_orders_degradations_of_real_photos(tiles, effnet) -> None:
    """N = 128 vs 128 (about 30 s on an idle 2-core CPU): real < blur via 32 < blur via 16 < uniform noise."""
    a, b = tiles[:128], tiles[256:384]
    real = FeatureStats.of(effnet_features(a, effnet))
    noise = torch.rand(b.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    scores = [fid_effnet_lite0(real, y, net=effnet) for y in (b, blur_via(b, 32), blur_via(b, 16), noise)]
    assert scores == sorted(scores), scores


# ------------------------------------------------------------------------------------------- FLOPs and MFU
def test_flop_counter_counts_2mnk_for_a_linear() -> None:
    m, n, k = 4, 32, 64
    layer = torch.nn.Linear(k, n)
    assert forward_flops_per_image(layer, (k,), batch_size=m) * m == 2 * m * n * k
    # Training adds the weight gradient (another 2MNK; the input needs no gradient), and leaves .grad alone.
    assert training_flops_per_image(layer, (k,), batch_size=m) * m == 4 * m * n * k
    assert layer.weight.grad is None
    with pytest.raises(ValueError, match="requires_grad"):
        training_flops_per_image(layer.requires_grad_(False), (k,))


def test_peak_flops_and_mfu() -> None:
    peak = estimate_peak_flops("cpu", torch.float32, size=128, repeats=2, trials=1)
    assert peak > 1e6
    assert mfu(1e9, 10.0, 2e10) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1e9, 10.0, 0.0)


# ---------------------------------------------------------------------------------------------------- grids
def test_save_grid_writes_a_png_of_the_right_size(tmp_path) -> None:
    images = torch.rand(10, 3, 16, 20) * 2 - 1
    data = save_grid(images, tmp_path / "sub" / "grid.png", nrow=4, padding=1)
    on_disk = Image.open(tmp_path / "sub" / "grid.png")
    assert on_disk.format == "PNG" and on_disk.mode == "RGB"
    assert on_disk.size == (4 * 20 + 5, 3 * 16 + 4)  # (width, height): 4 per row, 3 rows, 1 px gaps
    assert Image.open(io.BytesIO(data)).size == on_disk.size
    top_left = np.asarray(on_disk)[1:17, 1:21]
    assert np.array_equal(top_left, ((images[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    grey = Image.open(io.BytesIO(save_grid(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), padding=0)))
    assert grey.mode == "L" and grey.size == (16, 16)


# ------------------------------------------------------------------------------------------ CLIP score, FID
def test_clip_needs_weights_unless_random_init_is_asked_for(tmp_path) -> None:
    with pytest.raises(ValueError, match="random_init"):
        load_clip("ViT-B-32")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_clip("ViT-B-32", tmp_path / "nope.pt")


@pytest.mark.slow
def test_clip_score_with_a_random_model() -> None:
    model, tokenizer = load_clip("ViT-B-32", random_init=True)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    score = clip_score(images, ["a cat", "a dog", "a shirt"], model, tokenizer)
    assert 0.0 <= score <= 100.0
    with pytest.raises(ValueError, match="pairs"):
        clip_score(images, ["a cat"], model, tokenizer)


def test_standard_fid_never_runs_without_its_weights(tmp_path) -> None:
    images = torch.zeros(4, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        fid_inception(images, images, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    impostor = tmp_path / "impostor.pth"
    torch.save({"x": torch.zeros(1)}, impostor)
    with pytest.raises(ValueError, match="SHA-256"):
        fid_inception(images, images, impostor)


@pytest.mark.slow
def test_standard_fid_pipeline_runs_on_a_local_file(tmp_path) -> None:
    """Plumbing only: a random Inception is not a metric. Real runs use the published file and its hash check."""
    pytest.importorskip("torch_fidelity")
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    path = tmp_path / "random_inception.pth"
    torch.save(net.state_dict(), path)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    assert fid_inception(images, images, path, check_hash=False) == pytest.approx(0.0, abs=1e-3)


def test_seeds_table_gives_the_mean_change_and_its_95_percent_interval():
    """The benchmark's paired summary must say when the draws cannot tell a stage from its reference."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_vs_time.py"
    spec = importlib.util.spec_from_file_location("quality_vs_time", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    change = [-0.069, 0.0, 0.056, 0.032, 0.082]  # mean 0.0202, sd 0.0584: t(0.975, 4) = 2.7764 -> half-width 0.0725
    assert bench.mean_interval(change) == "; mean +2.0%, 95% interval -5.2% to +9.3%"
    assert bench.mean_interval([-0.30, -0.31, -0.29]).endswith("interval -32.5% to -27.5%")
    assert bench.mean_interval([0.01]) == ""  # one draw has no spread to judge by
    rows = [{"metrics": {"swd/16": 100 * (1 + c), bench.EFFNET_METRIC: 50.0},
             "reference": {"swd/16": 100.0, bench.EFFNET_METRIC: 60.0}} for c in change]
    table = bench.seeds_table("distill", 16, rows)
    assert "lower in 1/5; mean +2.0%, 95% interval -5.2% to +9.3%" in table
    assert "lower in 5/5; mean -16.7%, 95% interval -16.7% to -16.7%" in table


def test_swd_resolution_summarises_every_pair_of_sets():
    """The resolution benchmark's summary: each set's mean (sd), and the paired changes with their intervals (the
    --inverted set's too); its latent statistics tell white noise from spatially correlated latents; its contrast
    ignores where an image's colours sit and follows how far its pixels spread about them."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "swd_resolution.py"
    spec = importlib.util.spec_from_file_location("swd_resolution", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"real": {"swd/16": 50.0}, "teacher": {"swd/16": 60.0}, "student": {"swd/16": 60.0 * (1 + c)}}
            for c in (-0.069, 0.0, 0.056, 0.032, 0.082)]
    lines = bench.summary(rows, "swd/16")
    assert lines[0] == "  swd/16: real 50.0 (0.0), teacher 60.0 (0.0), student 61.2 (3.5)"
    assert lines[1].startswith("    teacher vs real: +20.0% +20.0%") and "lower in 0/5; mean +20.0%" in lines[1]
    assert lines[3] == ("    student vs teacher: -6.9% +0.0% +5.6% +3.2% +8.2%, lower in 1/5; mean +2.0%, "
                        "95% interval -5.2% to +9.3%")
    for row in rows:
        row[bench.INVERTED] = {"swd/16": 51.0}
        row[bench.COLOURED] = {"swd/16": 66.0}
    lines = bench.summary(rows, "swd/16", bench.SETS + (bench.INVERTED, bench.COLOURED), bench.INVERTED_PAIRS)
    assert lines[0].endswith(", student on latents 51.0 (0.0), student on coloured noise 66.0 (0.0)")
    assert lines[1].startswith("    student on latents vs real: +2.0% +2.0%")
    assert lines[2].startswith("    student vs student on latents: +9.5% +17.6%")
    assert lines[3].startswith("    student on coloured noise vs student: +18.2% +10.0%")

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(512, 3, 16, 16, generator=g)
    white = bench.latent_stats(80.0 * noise)
    assert abs(white["std"] - 80.0) < 1.0 and abs(white["neighbour correlation"]) < 0.01
    assert abs(white["channel-mean sd"] - 1 / 16) < 0.005  # the mean of 256 unit values
    smooth = bench.latent_stats(noise + noise.roll(1, dims=-1))  # neighbours share half their variance
    assert abs(smooth["neighbour correlation"] - 0.5) < 0.02 and smooth["channel-mean sd"] > 1.3 / 16

    # Contrast is taken about each image's own channel means: a per-image offset leaves it, a scale moves it.
    images = 0.2 * noise.clamp(-3, 3) / 3
    shifted = images + torch.linspace(-0.5, 0.5, 512).view(-1, 1, 1, 1)
    assert abs(bench.contrast(shifted) - bench.contrast(images)) < 1e-6
    assert abs(bench.contrast(0.5 * images) / bench.contrast(images) - 0.5) < 1e-6


def test_coloured_noise_carries_the_latents_second_order_statistics_and_nothing_else():
    """swd_resolution's coloured noise: fresh unit noise given, frequency by frequency, the channel covariance of a
    set of latents: their neighbour correlation, spread of channel means and colour correlation come back, and white
    latents leave the noise white; the output is real and Gaussian whatever the latents' own distribution."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "swd_resolution.py"
    spec = importlib.util.spec_from_file_location("swd_resolution", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4096, 3, 16, 16, generator=g)
    fresh = torch.randn(4096, 3, 16, 16, generator=g)
    white = bench.coloured(fresh, bench.spectrum_root(base))
    assert white.dtype == fresh.dtype and white.shape == fresh.shape
    assert (white - fresh).abs().max() < 0.2  # the sample covariance of 4096 white latents is I to within ~3%
    smooth = (base + base.roll(1, dims=-1)) / 2**0.5
    grey = torch.cat([smooth[:, :1] * 0.8 + smooth[:, 1:2] * 0.6, smooth[:, 1:]], dim=1)  # channels 0, 1 at 0.6
    tinted = bench.coloured(fresh, bench.spectrum_root(grey))
    want, got = bench.latent_stats(grey), bench.latent_stats(tinted)
    assert abs(got["neighbour correlation"] - want["neighbour correlation"]) < 0.02
    assert abs(got["channel-mean sd"] - want["channel-mean sd"]) < 0.01
    assert abs(torch.corrcoef(tinted[:, :2].transpose(0, 1).flatten(1))[0, 1] - 0.6) < 0.02
    signs = bench.coloured(fresh, bench.spectrum_root(base.sign()))  # +-1 latents: the noise stays Gaussian
    kurtosis = (signs.flatten() ** 4).mean() / (signs.flatten() ** 2).mean() ** 2
    assert abs(kurtosis - 3.0) < 0.1


def test_discriminator_probe_tells_apart_what_differs_and_not_what_does_not():
    """discriminator_probe's training loop: a small pixel discriminator trained on shifted-brightness images against
    plain ones scores far above chance on held-back images; on two draws of one distribution it stays near chance;
    under DiffAugment's colour jitter (brightness +-0.5, wider than the shift) it tells them apart less well."""
    import importlib.util
    from pathlib import Path

    from pagoda_dist.config import DiscriminatorConfig, OptimizerConfig
    from pagoda_dist.losses import diff_augment
    from pagoda_dist.models.discriminator import Discriminator

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "discriminator_probe.py"
    spec = importlib.util.spec_from_file_location("discriminator_probe", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    g = torch.Generator().manual_seed(0)
    plain, other = (0.3 * torch.randn(600, 3, 8, 8, generator=g) for _ in range(2))
    bright = 0.3 * torch.randn(600, 3, 8, 8, generator=g) + 0.15
    opt = OptimizerConfig(name="adam", lr=2e-3, betas=[0.0, 0.99])

    def accuracy(real: torch.Tensor, fake: torch.Tensor, augment=None) -> float:
        torch.manual_seed(0)
        net = Discriminator(DiscriminatorConfig(channels=8, num_scales=1), 8)
        return bench.probe(net, real, fake, train=400, steps=150, batch=32, optimizer=opt, augment=augment)

    shifted = accuracy(bright, plain)
    assert shifted > 0.9
    assert abs(accuracy(other, plain) - 0.5) < 0.1
    jitter = accuracy(bright, plain, augment=lambda r, f: diff_augment(r, f, policy="color"))
    assert 0.6 < jitter < shifted - 0.05
