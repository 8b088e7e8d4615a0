"""Finding and loading the teacher that precompute inverts with: the EMA weights of its latest committed checkpoint.

The runtime writes an export beside each teacher checkpoint (see `runtime.checkpoint`): `{"architecture", "network",
"ema", "net", ...}`. `find_teacher_export` resolves the export once, in the driver, so every actor loads the same
checkpoint even if training commits a newer one meanwhile; `load_teacher` is what each actor runs once.
The plain `{"architecture": ..., "state_dict": ...}` payload of `models.checkpoint_safety` loads too.
`import_teacher` commits a teacher from elsewhere (`teacher.init_from`: such an export, or an ADM-layout state
dict) as a run's teacher checkpoint.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pagoda_dist import storage
from pagoda_dist.config import Config, ModelConfig
from pagoda_dist.models.adm_convert import ADMLayoutError, adm_to_unet_state, is_adm_state_dict
from pagoda_dist.models.checkpoint_safety import ArchitectureMismatchError, check_architecture, model_from_architecture
from pagoda_dist.models.unet import UNet
from pagoda_dist.runtime.checkpoint import CheckpointRef, CheckpointStore, NoExport, SavePayload, load_export

TEACHER_STAGE = "teacher"


class TeacherError(ValueError):
    """No usable teacher: nothing committed, no export in the checkpoint, or an export that is not a UNet."""


@dataclass(frozen=True)
class TeacherRef:
    """The teacher checkpoint a precompute run uses."""

    export_url: str      # the export of a committed teacher checkpoint
    nimg: int            # images the teacher had seen
    architecture: dict   # the UNet's architecture record (models.checkpoint_safety format)


def find_teacher_export(run_url: str) -> tuple[str, int]:
    """The export of the latest committed teacher checkpoint under `run_url` and the images it had seen;
    TeacherError if there is none."""
    try:
        return CheckpointStore(run_url, TEACHER_STAGE).latest_export()
    except NoExport as err:
        raise TeacherError(str(err)) from None


def _unet_architecture(payload: dict[str, Any], where: str) -> dict[str, Any]:
    """The UNet's record in an export: the record itself, or the entry of the exported network in a per-net map."""
    arch = payload.get("architecture")
    if isinstance(arch, dict) and arch.get("kind") == "unet":
        return arch
    if isinstance(arch, dict):
        named = arch.get(str(payload.get("network")))
        if isinstance(named, dict) and named.get("kind") == "unet":
            return named
        units = [a for a in arch.values() if isinstance(a, dict) and a.get("kind") == "unet"]
        if len(units) == 1:
            return units[0]
    raise TeacherError(f"{where}: no UNet architecture record in the export (found {arch!r:.200}); precompute "
                       "needs a teacher-stage checkpoint")


def _weights(payload: dict[str, Any], where: str) -> dict[str, Tensor]:
    for key in ("ema", "state_dict"):  # the EMA is what the teacher is sampled with
        if isinstance(payload.get(key), dict):
            return payload[key]
    raise TeacherError(f"{where}: the export holds no 'ema' (or 'state_dict') weights (keys: {sorted(payload)})")


def _match_prefix(state: dict[str, Tensor], net: UNet) -> dict[str, Tensor]:
    """Strips a wrapper's prefix (an EDMPrecond's `net.`) when the keys carry one and the UNet's do not."""
    own = set(net.state_dict())
    if set(state) == own:
        return state
    for prefix in ("net.", "module.", "_orig_mod."):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(stripped) == own:
            return stripped
    return state  # load_state_dict's strict check then names the differing keys


def load_teacher(export_url: str) -> tuple[UNet, dict[str, Any]]:
    """The teacher UNet with its EMA weights (eval mode, frozen, fp32) and its architecture record."""
    try:
        payload = load_export(export_url)
    except storage.StorageError as err:
        raise TeacherError(f"cannot read the teacher export {export_url}: {err}") from None
    if not isinstance(payload, dict):
        raise TeacherError(f"{export_url}: expected a dict payload, got {type(payload).__name__}")
    arch = _unet_architecture(payload, export_url)
    net = model_from_architecture(arch)
    if not isinstance(net, UNet):
        raise TeacherError(f"{export_url}: the exported network is a {type(net).__name__}, not the teacher UNet")
    try:
        net.load_state_dict(_match_prefix(_weights(payload, export_url), net), strict=True)
    except RuntimeError as err:
        raise TeacherError(f"{export_url}: the weights do not fit the recorded architecture ({err})") from None
    # fp32 inversion means fp32 arithmetic: Ampere/Hopper GPUs would run cuDNN convolutions in TF32 by default.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return net.float().eval().requires_grad_(False), arch


def resolve_teacher(run_url: str) -> TeacherRef:
    """Finds the latest committed teacher and reads its architecture (one read of the export, in the driver)."""
    url, nimg = find_teacher_export(run_url)
    _, arch = load_teacher(url)
    return TeacherRef(export_url=url, nimg=nimg, architecture=arch)


class _NoEngineState:
    """A bare network has no optimizer or engine state to save beside its export."""

    def save_state(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)

    def load_state(self, directory: Path) -> None:
        raise TeacherError("an imported teacher checkpoint holds no training state to resume from")


def commit_teacher(run_url: str, net: UNet, nimg: int = 0, origin: dict[str, str] | None = None) -> CheckpointRef:
    """Commits `net` as a teacher checkpoint in the runtime's layout (its weights as the EMA), e.g. to import a
    teacher trained elsewhere, or an untrained one for demos, benchmarks and tests. `origin` (where the weights came
    from: {"url", "layout"}) is recorded in the checkpoint's meta.json for the report."""
    arch = net.architecture()
    state = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
             for k, v in net.state_dict().items()}
    # the runtime's own layout (the teacher stage's architecture is the UNet's record), so distill builds from it
    export = {"format": 1, "stage": TEACHER_STAGE, "nimg": nimg, "network": "net", "architecture": arch,
              "ema": state, "net": state}
    meta = {"architecture": arch, "imported": True, **({"origin": origin} if origin else {})}
    return CheckpointStore(run_url, TEACHER_STAGE).save(SavePayload(nimg, _NoEngineState(), {}, meta, state, export))


def read_teacher(url: str, model: ModelConfig) -> tuple[UNet, str]:
    """The teacher at `url` as the UNet `model` describes (fp32, eval) and the layout it was read from: 'export' (a
    teacher checkpoint's export) or 'adm' (an ADM-layout state dict); TeacherError naming what does not fit."""
    try:
        payload = load_export(url)
    except storage.StorageError as err:
        raise TeacherError(f"cannot read {url}: {err}") from None
    except (pickle.UnpicklingError, RuntimeError) as err:  # pickled code (e.g. EDM's .pkl), or not a torch file
        raise TeacherError(f"{url} does not load as tensors with torch.load(weights_only=True) ({err}); give a "
                           "state dict or a teacher export") from None
    net = UNet(model)
    try:
        if is_adm_state_dict(payload):
            layout, state = "adm", adm_to_unet_state(payload, model, where=url)
        elif isinstance(payload, dict) and "architecture" in payload:
            check_architecture(net.architecture(), _unet_architecture(payload, url), source=url)
            layout, state = "export", _match_prefix(_weights(payload, url), net)
        else:
            keys = sorted(payload)[:5] if isinstance(payload, dict) else type(payload).__name__
            raise TeacherError(f"{url} is neither a teacher checkpoint export nor an ADM-layout state dict "
                               f"(found {keys})")
        net.load_state_dict(state, strict=True)
    except (ADMLayoutError, ArchitectureMismatchError) as err:
        raise TeacherError(str(err)) from None
    except RuntimeError as err:
        raise TeacherError(f"{url}: the weights do not fit the configured model ({err})") from None
    return net.float().eval().requires_grad_(False), layout


def import_teacher(cfg: Config) -> CheckpointRef:
    """Commits the teacher at `teacher.init_from` as this run's teacher checkpoint, recording where it came from."""
    url = cfg.teacher.init_from
    net, layout = read_teacher(url, cfg.model)
    if layout == "adm" and (cfg.teacher.sampler.guidance != 1 or cfg.distill.adversarial.guidance_range):
        raise TeacherError(f"{url}: an ADM teacher was never trained without a class label, so it has no "
                           "unconditional model for classifier-free guidance; set teacher.sampler.guidance=1 and "
                           "leave distill.adversarial.guidance_range empty")
    return commit_teacher(cfg.run_url, net, origin={"url": url, "layout": layout})


__all__ = ["TeacherError", "TeacherRef", "commit_teacher", "find_teacher_export", "import_teacher", "load_teacher",
           "read_teacher", "resolve_teacher"]
