"""Every command block of README.md and launchers/README.md, run as a user types it, so the documents cannot
drift from the code.

Each ```bash block is split into commands (continuation lines joined, comments dropped), and every command has an
entry in COMMANDS: `Run` (it runs here, as written or with the substitutions its entry names) or `Cannot` (it needs
what a CI machine lacks: a real Slurm/Kubernetes/AWS cluster, GPUs, a real bucket, docker, kubectl; its probe checks
what can be checked here, e.g. the same command with `--dry-run`). A command without an entry, or an entry whose
command is no longer in the documents, fails `test_every_command_is_covered`. A run form must contain every word of
the documented command in order, apart from the documents' own placeholders (PLACEHOLDERS): substitutions only add
to the command, so a renamed flag or file in a document fails the run.

Each block then runs as one bash script in a scratch copy of the checkout (its own `work/`, the test's S3 ports,
this virtualenv; `pagoda_dist` imported from the copy), and must exit 0. What differs from the documents:
- `{tiny}`: the small budget TINY_BUDGET plus the test's S3 port, where a command trains on configs/tiny.yaml (the
  full tiny chain takes ~16 minutes on 2 cores); `{s3_port}`: the test's S3 port, never the default 8333, which a
  user's own server may hold (`pagoda s3 up storage.embedded_s3_port=N`, `cluster/local.sh up --s3-port N`);
- `--only prepare` where a job is submitted only to show that submission, the job's driver and its storage work;
- a running Ray cluster for the "bare Ray" blocks: the one `cluster/local.sh up` starts, at $RAY_API_SERVER_ADDRESS.

The blocks run in document order, launchers/README.md first, sharing the scratch copy: the one-machine flow
(`eval "$(bash cluster/local.sh up)"`, `pagoda launch ray configs/tiny.yaml` with the budget, `down`) trains the whole
chain as a Ray job, and the README's `pagoda run`, `precompute`, `evaluate`, `sample`, `report` and `demo.sh` then
find that run committed and resume it, as the README says they do. Run alone (`-k`), each block still passes: it
trains what it needs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pagoda_dist.storage.local_s3 import free_port_block

ROOT = Path(__file__).resolve().parents[1]
# The one-machine flow first: later blocks resume the run it trains instead of training their own.
DOCS = ("launchers/README.md", "README.md")
FENCE = re.compile(r"^(?P<indent> *)```bash\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
DEFAULT_S3_PORT = 8333  # the config's default: a user's own server may hold it, so no test command may use it

# The documents' placeholders for the reader's own things, and what stands in for them here. The word check
# ignores them; everything else of a documented command must appear, in order, in its run form.
PLACEHOLDERS = {
    "/data/imagenet": "your images: a scratch folder of real photos in ImageNet's class-folder layout ({images})",
    "s3://bucket/imagenet-64": "your bucket: a scratch folder",
    "http://HEAD:8265": "your cluster's job API: the local cluster's, $RAY_API_SERVER_ADDRESS",
    "JOB_ID": "the id the submission printed, $JOB_ID",
    "[key=value ...]": "your overrides: {tiny}",
    "up|status|down": "the three actions, one after the other",
    "| kubectl apply -f -": "your cluster's kubectl: the manifests go to a file, checked by `pagoda launch check-k8s`",
}
# configs/tiny.yaml in miniature: every stage of the chain runs, a few steps each (minutes, not ~16). A teacher of
# 4 steps does not invert faithfully, so the inversion-quality gate is off (min_psnr_db=0 still refuses NaN; the gate
# itself is tests/test_precompute.py's).
TINY_BUDGET = (
    "data.limit=256 data.shard_size=64 data.loader_workers=0 model.channels=16 model.attn_resolutions=[] "
    "teacher.train.batch_size=16 teacher.train.total_kimg=0.064 teacher.sampler.steps=4 precompute.steps=4 "
    "precompute.batch_size=32 precompute.psnr_samples=4 precompute.min_psnr_db=0 precompute.max_actors=1 "
    "distill.train.batch_size=16 "
    "distill.train.total_kimg=0.032 distill.adversarial.discriminator.channels=16 "
    "distill.adversarial.discriminator.num_scales=1 grow.train.batch_size=16 grow.train.total_kimg=0.032 "
    "grow.adversarial.discriminator.channels=16 grow.adversarial.discriminator.num_scales=1 "
    "runtime.cpus_per_worker=1 logging.log_every_kimg=0.016 logging.sample_every_kimg=0.032 "
    "logging.checkpoint_every_kimg=0.032 logging.grid_size=4 eval.num_images=16")
# The "bare Ray" blocks' running cluster: the local one (its `down` runs after every block anyway).
CLUSTER_UP = 'eval "$(bash cluster/local.sh up --s3-port {s3_port})"'
JOB_API = '"$RAY_API_SERVER_ADDRESS"'


@dataclass(frozen=True)
class Run:
    """Runs here: `run` is the documented command with {placeholders} filled in (None: exactly as written)."""

    run: str | None = None
    why: str = ""                      # what differs from the document, and why (required when `run` is given)
    expect: tuple[str, ...] = ()       # text the block's output must contain ({placeholders} filled in)
    minutes: float = 0.1               # about how long it takes on a 2-core CPU (the block's timeout and mark)


@dataclass(frozen=True)
class Cannot:
    """Cannot run here (`reason`); `probe` checks what can be: the same command validated (`same`: the word check
    applies), or the facts it relies on. None: only the block's shell syntax is checked."""

    reason: str
    probe: str | None = None
    same: bool = True


COMMANDS: dict[str, Run | Cannot] = {
    # ---------------------------------------------------------------------------------------- README.md
    "bash scripts/demo.sh": Run(
        "bash scripts/demo.sh {tiny}", "the small budget (the demo takes ~16 min); after the one-machine flow it "
        "finds that run committed and skips every step", expect=("[pagoda] run tiny complete",), minutes=4),
    "bash scripts/test.sh": Run(
        "bash scripts/test.sh --collect-only -q", "collects the suite: running it would run this test again",
        expect=("tests collected",), minutes=1),
    ". .venv/bin/activate": Run(),
    "pagoda config configs/tiny.yaml model.channels=64": Run(expect=("channels: 64",)),
    "pagoda config --keys": Run(expect=("storage.embedded_s3_port",)),
    "pagoda s3 up|status|down": Run(
        "pagoda s3 up storage.embedded_s3_port={s3_port} && pagoda s3 status && pagoda s3 down",
        "the test's S3 port", expect=("endpoint:    http://127.0.0.1:{s3_port}", "pagoda s3: stopped")),
    "pagoda prepare /data/imagenet s3://bucket/imagenet-64 data.resolution=64 data.image_format=jpeg": Run(
        "pagoda prepare {images} work/bucket-a/imagenet-64 data.resolution=64 data.image_format=jpeg",
        "ImageNet and a bucket: real photos in class folders, written to a scratch folder",
        expect=("2 classes: n00000000, n00000001",)),
    "pagoda prepare configs/tiny.yaml --src /data/imagenet --out s3://bucket/imagenet-64": Run(
        "pagoda prepare configs/tiny.yaml storage.embedded_s3_port={s3_port} --src {images} "
        "--out work/bucket-b/imagenet-64", "as above, in another folder (the settings differ from the line "
        "above's); the config's embedded S3 server starts, so on the test's port"),
    "pagoda prepare builtin:photo-tiles work/data/tiles-64 data.resolution=64": Run(minutes=1),
    "pagoda prepare builtin:fashion-mnist work/data/fmnist-32 data.resolution=32 data.channels=1": Run(
        expect=("train: 60000 samples",), minutes=1),
    "pagoda run configs/tiny.yaml [key=value ...]": Run(
        "pagoda run configs/tiny.yaml {tiny}", "the small budget as the overrides",
        expect=("[pagoda] embedded S3 at http://127.0.0.1:{s3_port} (data in ./work/s3)",
                "[pagoda] run tiny complete: s3://pagoda/tiny/runs/tiny"), minutes=8),
    "pagoda run configs/tiny.yaml --only teacher": Run(
        "pagoda run configs/tiny.yaml {tiny} --only teacher", "the small budget", minutes=1),
    "pagoda run configs/imagenet-512.yaml --dry-run": Run(),
    "pagoda precompute configs/tiny.yaml": Run("pagoda precompute configs/tiny.yaml {tiny}", "the small budget",
                                               minutes=1),
    "pagoda evaluate configs/tiny.yaml": Run(
        "pagoda evaluate configs/tiny.yaml {tiny}", "the small budget",
        expect=("[pagoda] metrics in s3://pagoda/tiny/runs/tiny/eval/metrics.json",), minutes=2),
    "pagoda sample configs/tiny.yaml --stage grow-32 --n 64 --out grid.png": Run(
        "pagoda sample configs/tiny.yaml {tiny} --stage grow-32 --n 64 --out grid.png", "the small budget",
        expect=("64 samples of grow-32 (32px)",), minutes=0.5),
    "pagoda report configs/tiny.yaml": Run("pagoda report configs/tiny.yaml {tiny}", "the small budget",
                                           expect=("[pagoda] report: ",), minutes=0.5),
    "pagoda run configs/tiny.yaml storage.embedded_s3=false run.root=s3://my-bucket/pagoda "
    "storage.endpoint_url=https://s3.eu-west-1.amazonaws.com": Cannot(
        "a real AWS bucket and its credentials",
        "pagoda run configs/tiny.yaml storage.embedded_s3=false run.root=s3://my-bucket/pagoda "
        "storage.endpoint_url=https://s3.eu-west-1.amazonaws.com --dry-run"),
    # ------------------------------------------------------------------------------- launchers/README.md
    "kubectl create secret generic pagoda-s3 --from-literal=AWS_ACCESS_KEY_ID=... "
    "--from-literal=AWS_SECRET_ACCESS_KEY=...": Cannot(
        "kubectl and a Kubernetes cluster; the probe: `pagoda launch k8s` references that Secret by that name",
        "pagoda launch k8s configs/tiny.yaml | grep -q 'name: pagoda-s3'", same=False),
    "export RAY_AUTH_MODE=token": Run(
        f"{CLUSTER_UP} && export RAY_AUTH_MODE=token", "a running cluster: the local one (`up` exports its token)"),
    "pagoda launch ray configs/tiny.yaml run.name=try1 --address http://HEAD:8265": Run(
        f"pagoda launch ray configs/tiny.yaml run.name=try1 {{tiny}} --address {JOB_API} --only prepare",
        "the local cluster; the prepare step only (the job, its driver and storage work: the chain is the "
        "one-machine flow's)", expect=("[pagoda] run try1 complete",), minutes=1.5),
    "ray job submit --address http://HEAD:8265 --working-dir . --runtime-env-json '{\"excludes\": [\"/.venv/\", "
    "\"/.cache/\", \"/work/\", \"/runs/\", \"/data/\", \"/.git/\", \"wandb/\", \"__pycache__/\", \"*.egg-info/\", "
    "\".pytest_cache/\", \"*.pyc\"]}' -- python -m pagoda_dist.cli run configs/tiny.yaml run.name=try1 "
    "storage.embedded_s3_dir=\"$PWD/work/s3\" runtime.ray_address=auto": Run(
        f"{CLUSTER_UP} && JOB_ID=plain-try1-$RANDOM && ray job submit --address {JOB_API} --submission-id "
        "\"$JOB_ID\" --working-dir . --runtime-env-json '{\"excludes\": [\"/.venv/\", \"/.cache/\", \"/work/\", "
        "\"/runs/\", \"/data/\", \"/.git/\", \"wandb/\", \"__pycache__/\", \"*.egg-info/\", \".pytest_cache/\", "
        "\"*.pyc\"]}' -- python -m pagoda_dist.cli run configs/tiny.yaml run.name=try1 "
        "storage.embedded_s3_dir=\"$PWD/work/s3\" runtime.ray_address=auto {tiny} --only prepare",
        "the local cluster, a known job id for the commands below; the prepare step only",
        expect=("[pagoda] embedded S3 at http://127.0.0.1:{s3_port} (data in {scratch}/work/s3)",
                "succeeded"), minutes=1.5),
    "ray job logs --address http://HEAD:8265 --follow JOB_ID": Run(
        f'ray job logs --address {JOB_API} --follow "$JOB_ID"', "the local cluster, the job above"),
    "ray job status --address http://HEAD:8265 JOB_ID": Run(
        f'ray job status --address {JOB_API} "$JOB_ID"', "the local cluster, the job above",
        expect=("Job 'plain-try1-",)),
    "ray job stop --address http://HEAD:8265 JOB_ID": Run(
        f'ray job stop --address {JOB_API} "$JOB_ID"', "the local cluster, the job above (already finished)"),
    'eval "$(bash cluster/local.sh up)"': Run(CLUSTER_UP, "the test's S3 port", minutes=0.5),
    "pagoda launch ray configs/tiny.yaml": Run(
        "pagoda launch ray configs/tiny.yaml {tiny}", "the small budget: the whole chain, as a Ray job",
        expect=("[pagoda] embedded S3 at http://127.0.0.1:{s3_port} (data in {scratch}/work/s3)",
                "[pagoda] run tiny complete: s3://pagoda/tiny/runs/tiny", "SUCCEEDED"), minutes=10),
    "bash cluster/local.sh status": Run(expect=("kept up by:  `pagoda s3 up`", "head ")),
    "bash cluster/local.sh down": Run(expect=("pagoda s3: stopped",)),
    'eval "$(bash cluster/local.sh up --workers 2 --cpus 1 --head-cpus 1)"': Run(
        'eval "$(bash cluster/local.sh up --workers 2 --cpus 1 --head-cpus 1 --s3-port {s3_port})"',
        "the test's S3 port", minutes=1),
    "pagoda launch ray configs/tiny.yaml run.name=drill runtime.num_workers=2 runtime.cpus_per_worker=1 "
    "--no-wait": Run(
        "JOB_ID=$(pagoda launch ray configs/tiny.yaml run.name=drill runtime.num_workers=2 "
        "runtime.cpus_per_worker=1 {tiny} --no-wait --only prepare)",
        "the job id kept for the commands below; the prepare step only: the drill itself (a node killed after a "
        "checkpoint, the run resumed) is tests/test_launch.py::test_node_loss_resumes_from_s3_and_a_fresh_cluster_"
        "continues, and takes minutes"),
    "bash cluster/local.sh kill worker-1": Run(
        'ray job logs --address "$RAY_API_SERVER_ADDRESS" --follow "$JOB_ID" > /dev/null && '
        "bash cluster/local.sh kill worker-1", "after the job above ended: the drill kills a node mid-training, "
        "which the prepare step alone does not reach", expect=("killed worker-1",)),
    'ray job logs --address "$RAY_API_SERVER_ADDRESS" --follow JOB_ID': Run(
        'ray job logs --address "$RAY_API_SERVER_ADDRESS" --follow "$JOB_ID"', "the job above",
        expect=("[pagoda] run drill complete",), minutes=1),
    "pagoda launch slurm configs/tiny.yaml run.name=big --nodes 4 --partition gpu --time 24:00:00": Cannot(
        "a Slurm cluster with a `gpu` partition of 4 nodes",
        "pagoda launch slurm configs/tiny.yaml run.name=big --nodes 4 --partition gpu --time 24:00:00 --dry-run"),
    "pagoda launch slurm configs/tiny.yaml --nodes 4 --dry-run": Run(expect=("#SBATCH --nodes=4",)),
    "pagoda launch slurm configs/tiny.yaml run.name=big --only prepare --only teacher": Cannot(
        "a Slurm cluster (tests/test_launch.py submits such a job to a real one where it can install one)",
        "pagoda launch slurm configs/tiny.yaml run.name=big --only prepare --only teacher --dry-run"),
    "sbatch --nodes=4 --partition=gpu --gpus-per-node=4 launchers/slurm/pagoda.sbatch configs/tiny.yaml "
    "run.name=big": Cannot(
        "a Slurm cluster with GPUs; the probe: the script parses and its driver's arguments validate",
        "bash -n launchers/slurm/pagoda.sbatch && pagoda config configs/tiny.yaml run.name=big > /dev/null",
        same=False),
    "docker build -f cluster/Dockerfile -t REGISTRY/pagoda-dist:0.1.0 . && docker push REGISTRY/pagoda-dist:0.1.0":
        Cannot("docker and a registry (tests/test_launch.py lints the Dockerfile); the probe: the file exists and "
               "the tag is the project's version, the image `pagoda launch k8s` names by default",
               "test -f cluster/Dockerfile && python -c 'from pagoda_dist.launch.k8s import project_version; "
               "assert project_version() == \"0.1.0\", project_version()'", same=False),
    "pagoda launch k8s configs/tiny.yaml run.root=s3://bucket/pagoda storage.embedded_s3=false "
    "storage.endpoint_url=https://s3.example.com runtime.num_workers=8 runtime.use_gpu=true --image "
    "REGISTRY/pagoda-dist:0.1.0 --workers 8 --gpus 1 --cpus 8 --memory 48Gi --secret pagoda-s3 --namespace ml | "
    "kubectl apply -f -": Cannot(
        "kubectl and a Kubernetes cluster with KubeRay; the probe: the same manifests, to a file, checked",
        "pagoda launch k8s configs/tiny.yaml run.root=s3://bucket/pagoda storage.embedded_s3=false "
        "storage.endpoint_url=https://s3.example.com runtime.num_workers=8 runtime.use_gpu=true --image "
        "REGISTRY/pagoda-dist:0.1.0 --workers 8 --gpus 1 --cpus 8 --memory 48Gi --secret pagoda-s3 --namespace ml "
        "> rayjob.yaml && pagoda launch check-k8s rayjob.yaml"),
    "kubectl get rayjob -n ml pagoda-tiny -w": Cannot(
        "kubectl and a cluster; the probe: the RayJob above is named pagoda-tiny, in namespace ml",
        "grep -q '^  name: pagoda-tiny$' rayjob.yaml && grep -q '^  namespace: ml$' rayjob.yaml", same=False),
    "kubectl logs -n ml -l job-name=pagoda-tiny -f": Cannot(
        "kubectl and a cluster (the `job-name` label is set by Kubernetes on KubeRay's submitter pod)"),
    "pagoda launch k8s --cluster-only --workers 2 --cpus 8 --gpus 1 --memory 48Gi --image "
    "REGISTRY/pagoda-dist:0.1.0 | kubectl apply -f -": Cannot(
        "kubectl and a Kubernetes cluster with KubeRay; the probe: the same manifest, to a file, checked",
        "pagoda launch k8s --cluster-only --workers 2 --cpus 8 --gpus 1 --memory 48Gi --image "
        "REGISTRY/pagoda-dist:0.1.0 > raycluster.yaml && pagoda launch check-k8s raycluster.yaml"),
    "kubectl port-forward svc/pagoda-cluster-head-svc 8265:8265 &": Cannot(
        "kubectl and a cluster; the probe: the RayCluster above is pagoda-cluster (KubeRay names its head service "
        "NAME-head-svc)", "grep -q '^  name: pagoda-cluster$' raycluster.yaml", same=False),
    "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=\"$(kubectl get secret pagoda-cluster -o "
    "jsonpath='{.data.auth_token}' | base64 -d)\"": Cannot(
        "kubectl and a cluster (KubeRay creates that Secret)"),
    "pagoda launch ray configs/tiny.yaml --address http://127.0.0.1:8265": Cannot(
        "the port-forwarded KubeRay cluster (the same submission runs on the local cluster in the bare Ray block); "
        "the probe: the config validates", "pagoda run configs/tiny.yaml --dry-run > /dev/null", same=False),
    "pagoda launch check-k8s manifests.yaml": Run(
        "pagoda launch k8s configs/tiny.yaml -o manifests.yaml && pagoda launch check-k8s manifests.yaml",
        "a manifest file to check: the RayJob `pagoda launch k8s` writes", expect=("manifest(s) valid",)),
    "ray get-auth-token --generate": Cannot(
        "it writes the user's own ~/.ray/auth_token; the probe: the flag exists",
        "ray get-auth-token --help | grep -q -- --generate", same=False),
    "ray up cluster/ray-autoscaler.yaml": Cannot(
        "an AWS account (tests/test_launch.py checks the file with Ray's own validator); the probe: the file exists",
        "test -f cluster/ray-autoscaler.yaml", same=False),
    "ray dashboard cluster/ray-autoscaler.yaml &": Cannot(
        "the autoscaler's cluster on AWS; the probe: the subcommand exists", "ray dashboard --help > /dev/null",
        same=False),
    "RAY_AUTH_MODE=token pagoda launch ray configs/tiny.yaml run.root=s3://bucket/pagoda storage.embedded_s3=false "
    "runtime.use_gpu=true runtime.num_workers=8 --address http://127.0.0.1:8265": Cannot(
        "a GPU cluster on AWS and a bucket; the probe: the same config and overrides validate",
        "pagoda run configs/tiny.yaml run.root=s3://bucket/pagoda storage.embedded_s3=false runtime.use_gpu=true "
        "runtime.num_workers=8 --dry-run > /dev/null", same=False),
    "ray down cluster/ray-autoscaler.yaml": Cannot(
        "the autoscaler's cluster on AWS; the probe: the subcommand exists", "ray down --help > /dev/null",
        same=False),
}


# ------------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Block:
    """One ```bash block: where it is, its text, and its commands (normalised)."""

    doc: str
    line: int
    text: str
    commands: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def split_commands(body: str) -> list[str]:
    """Commands of a block: continuation lines joined, comment lines and trailing comments dropped, blanks
    collapsed (a documented command and its COMMANDS key compare equal however it is wrapped)."""
    commands, pending = [], ""
    for raw in body.splitlines():
        line = f"{pending} {raw.strip()}" if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        line = re.sub(r"\s+#\s.*$", "", line)
        if line and not line.startswith("#"):
            commands.append(" ".join(line.split()))
    return commands


def blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text()
    found = []
    for match in FENCE.finditer(text):
        indent = match.group("indent")
        body = "\n".join(line.removeprefix(indent) for line in match.group("body").splitlines())
        found.append(Block(doc, text.count("\n", 0, match.start()) + 1, body, tuple(split_commands(body))))
    return found


ALL_BLOCKS = [block for doc in DOCS for block in blocks(doc)]


def words(command: str) -> list[str]:
    """The words of a command, quotes, `$(`, `)` and `$` aside: `eval "$(bash x up)"` -> eval, bash, x, up."""
    return re.findall(r"[^\s\"'()$]+", command)


def covers(documented: str, run: str) -> bool:
    """True when `run` holds every word of `documented` (placeholders aside) in the same order."""
    for placeholder in PLACEHOLDERS:
        documented = documented.replace(placeholder, " ")
    remaining = iter(words(run))
    return all(any(word == have for have in remaining) for word in words(documented))


# --------------------------------------------------------------------------------------------- the scratch
@dataclass
class Scratch:
    """A copy of the checkout to run the documents' commands in."""

    root: Path
    s3_port: int
    env: dict[str, str]

    def fill(self, command: str) -> str:
        values = {"s3_port": str(self.s3_port), "tiny": f"{TINY_BUDGET} storage.embedded_s3_port={self.s3_port}",
                  "images": str(self.root / "work" / "imagenet" / "train"), "scratch": str(self.root)}
        return re.sub(r"\{(s3_port|tiny|images|scratch)\}", lambda m: values[m.group(1)], command)

    def script(self, block: Block) -> str:
        """The block as a bash script: each command announced, then run; the first failure ends it."""
        lines = ["set -o pipefail"]
        for command in block.commands:
            entry = COMMANDS[command]
            run = entry.probe if isinstance(entry, Cannot) else (entry.run or command)
            lines.append(f'echo "[${{SECONDS}}s]" {shlex.quote(">>> " + command)}')
            if run is not None:
                lines.append(f"{self.fill(run)} || {{ echo {shlex.quote('FAILED: ' + command)}; exit 1; }}")
        return "\n".join(lines) + "\n"

    def run_block(self, block: Block, timeout: float, script: str | None = None) -> str:
        """Runs the block (or `script` in its place); returns its output. Stops what it started, whatever happened:
        its processes (a session of their own) and the local cluster and S3 server (`cluster/local.sh down`)."""
        shell = subprocess.Popen(["bash", "-c", script or self.script(block)], cwd=self.root, env=self.env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = shell.communicate(timeout=timeout)
        finally:
            if shell.poll() is None:
                os.killpg(shell.pid, signal.SIGKILL)
                shell.wait()
            work = self.root / "work"
            if (work / "local-cluster.json").exists() or (work / "s3" / "weed.pid").exists():
                subprocess.run(["bash", "cluster/local.sh", "down"], cwd=self.root, env=self.env,
                               capture_output=True, timeout=180, check=False)
        assert shell.returncode == 0, f"{block.name}: exit {shell.returncode}\n{output[-8000:]}"
        return output


def _copy_checkout(dest: Path) -> None:
    """The files git would ship (tracked and untracked-but-not-ignored): no virtualenv, caches or outputs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _shadow_venv(dest: Path) -> None:
    """`.venv` of the copy: this virtualenv's parts, linked, with a set-up stamp of its own matching the copy, so
    scripts/env.sh takes it as set up and never installs anything into the shared one."""
    dest.mkdir()
    for part in Path(sys.prefix).iterdir():
        if part.name != ".pagoda-stamp":
            (dest / part.name).symlink_to(part)
    stamp = hashlib.sha256((dest.parent / "constraints.txt").read_bytes() + (dest.parent / "pyproject.toml")
                           .read_bytes()).hexdigest()
    (dest / ".pagoda-stamp").write_text(stamp + "\n")


def _imagenet_like(root: Path) -> None:
    """ImageNet's layout, train/nXXXXXXXX/*.JPEG: crops of two real photos, one class each."""
    import skimage.data
    from PIL import Image

    for c, photo in enumerate((skimage.data.astronaut(), skimage.data.coffee())):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        image = Image.fromarray(photo)
        for i in range(8):
            image.crop((20 * i, 20 * i, 20 * i + 200, 20 * i + 200)).save(folder / f"n{c:08d}_{i}.JPEG")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scratch]:
    root = tmp_path_factory.mktemp("checkout")
    _copy_checkout(root)
    _shadow_venv(root / ".venv")
    _imagenet_like(root / "work" / "imagenet" / "train")
    # As a user's shell after `. .venv/bin/activate`, with nothing pointing at another Ray or S3.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "VIRTUAL_ENV"))}
    env.update(PATH=os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")]), PYTHONPATH=str(root),
               RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    yield Scratch(root, free_port_block(), env)


# ---------------------------------------------------------------------------------------------------- tests
def test_every_command_is_covered() -> None:
    """Each documented command has an entry (and each entry a documented command); a run form adds to its command
    and never drops a word of it; every block parses as bash."""
    documented = {command for block in ALL_BLOCKS for command in block.commands}
    assert documented - COMMANDS.keys() == set(), (
        "documented commands without an entry in tests/test_docs.py COMMANDS (add one: Run or Cannot):\n"
        + "\n".join(sorted(documented - COMMANDS.keys())))
    assert COMMANDS.keys() - documented == set(), "entries whose command is no longer documented (update them):\n" + \
        "\n".join(sorted(COMMANDS.keys() - documented))
    for command, entry in COMMANDS.items():
        run = entry.probe if isinstance(entry, Cannot) and entry.same else getattr(entry, "run", None)
        if run is not None:
            assert covers(command, run), f"the run form of {command!r} drops or reorders its words: {run!r}"
        if isinstance(entry, Run) and entry.run is not None:
            assert entry.why, f"{command!r}: say why its run form differs from the document"
        text = (entry.probe or "") if isinstance(entry, Cannot) else (entry.run or command)
        assert str(DEFAULT_S3_PORT) not in text, f"{command!r}: the test never uses the default S3 port"
    for block in ALL_BLOCKS:
        syntax = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True, check=False)
        assert syntax.returncode == 0, f"{block.name}: not valid bash: {syntax.stderr}"


def test_a_changed_command_is_caught() -> None:
    """The word check fails a run form that lost a documented flag, and passes added overrides."""
    assert covers("pagoda launch ray configs/tiny.yaml --no-wait", "pagoda launch ray configs/tiny.yaml x=1 --no-wait")
    assert not covers("pagoda launch ray configs/tiny.yaml --no-wait", "pagoda launch ray configs/tiny.yaml")
    assert not covers("bash cluster/local.sh up", "bash cluster/start.sh up")
    assert covers("ray job stop --address http://HEAD:8265 JOB_ID", 'ray job stop --address "$A" "$JOB_ID"')


def _minutes(block: Block) -> float:
    return sum(entry.minutes for c in block.commands if isinstance(entry := COMMANDS.get(c), Run))


def _block_params() -> list:
    params = []
    for block in ALL_BLOCKS:
        minutes = _minutes(block) if all(c in COMMANDS for c in block.commands) else 0.1
        marks = [pytest.mark.timeout(int(120 + 60 * minutes))]
        if minutes > 0.4:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(block, id=block.name, marks=marks))
    return params


@pytest.mark.parametrize("block", _block_params())
def test_documented_block_runs(block: Block, scratch: Scratch) -> None:
    missing = [c for c in block.commands if c not in COMMANDS]
    if missing:
        pytest.fail(f"{block.name}: commands without an entry (see test_every_command_is_covered): {missing}")
    output = scratch.run_block(block, timeout=60 + 60 * _minutes(block))
    # Each command's output: what follows its "[Ns] >>> command" line, up to the next one.
    sections = re.split(r"^\[\d+s\] >>> ", output, flags=re.M)[1:]
    assert len(sections) == len(block.commands), output[-6000:]
    for command, section in zip(block.commands, sections):
        entry = COMMANDS[command]
        for text in entry.expect if isinstance(entry, Run) else ():
            assert scratch.fill(text) in section, f"{block.name}: {command!r} did not print {text!r}:\n{section}"
    assert f"127.0.0.1:{DEFAULT_S3_PORT}" not in output, f"{block.name} reached the default S3 port:\n{output}"


# ---------------------------------------------------------------------------- what the one-machine flow needs
def test_launch_ray_points_the_job_at_the_running_embedded_server(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`pagoda launch ray` hands the driver the embedded server's folder as an absolute path (resolved where the
    user stands), and refuses a config whose port differs from the one that folder's server runs on."""
    from pagoda_dist.config import load_config
    from pagoda_dist.launch.common import LaunchError
    from pagoda_dist.launch.ray_job import embedded_s3_overrides
    from pagoda_dist.storage.local_s3 import LocalS3Server

    monkeypatch.chdir(tmp_path)
    port = free_port_block()
    tiny = load_config(ROOT / "configs/tiny.yaml", [f"storage.embedded_s3_port={port}"])
    assert embedded_s3_overrides(tiny) == [f"storage.embedded_s3_dir={tmp_path / 'work' / 's3'}"]
    assert embedded_s3_overrides(load_config(ROOT / "configs/tiny.yaml", ["storage.embedded_s3=false"])) == []
    assert embedded_s3_overrides(load_config(ROOT / "configs/tiny.yaml", [f"storage.embedded_s3_dir={tmp_path}"])) \
        == []  # already absolute: the user's choice travels as it is

    with LocalS3Server(tmp_path / "work" / "s3", port).session():
        assert embedded_s3_overrides(tiny) == [f"storage.embedded_s3_dir={tmp_path / 'work' / 's3'}"]
        other = load_config(ROOT / "configs/tiny.yaml", [f"storage.embedded_s3_port={port + 20}"])
        with pytest.raises(LaunchError, match=rf"runs at http://127.0.0.1:{port}; pass storage.embedded_s3_port="
                                              rf"{port}"):
            embedded_s3_overrides(other)



# A job's driver reports its cluster, and a Ray task what the node gave it: the cluster and the S3 credentials file.
PROBE = ("python -c \"import os, ray; ray.init(); print('driver at', ray.get_runtime_context().gcs_address); "
         "print('task sees', *ray.get(ray.remote(lambda: [os.environ.get(k) for k in ('RAY_ADDRESS', "
         "'AWS_SHARED_CREDENTIALS_FILE')]).remote()))\"")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_cluster_jobs_find_their_cluster_and_the_s3_server(scratch: Scratch) -> None:
    """On the one-machine cluster a job's driver joins its own cluster, not another Ray on the machine (the head
    records its address where a job's "auto" looks), Ray's own processes get the address too (RAY_ADDRESS on
    every node), and so do the S3 server's endpoint and credentials file: a job with `storage.embedded_s3=false`
    reads and writes the local S3 server with no key in its runtime_env or its output."""
    recorded = ("python -c \"import json, pathlib; s = json.load(open('work/local-cluster.json')); "
                "print('cluster at', s['address'], 'recorded', (pathlib.Path(s['temp_dir']) / "
                "'ray_current_cluster').read_text().strip())\"")
    script = "\n".join(["set -eo pipefail", scratch.fill(CLUSTER_UP),
                        scratch.fill("pagoda s3 up storage.embedded_s3_port={s3_port} --bucket pagoda"), recorded,
                        f"pagoda launch ray configs/tiny.yaml --driver {shlex.quote(PROBE)}",
                        scratch.fill("pagoda launch ray configs/tiny.yaml {tiny} storage.embedded_s3=false "
                                     "--only prepare")])
    output = scratch.run_block(Block("(test)", 0, script, ()), timeout=480, script=script)
    address = re.search(r"^cluster at (\S+) recorded (\S+)$", output, re.M)
    assert address and address.group(1) == address.group(2), output[-6000:]
    credentials = scratch.root / "work" / "s3" / "aws_credentials"
    assert f"driver at {address.group(1)}" in output and f"task sees {address.group(1)} {credentials}" in output, \
        output[-6000:]
    assert "[pagoda] run tiny complete" in output, output[-6000:]
    assert "[pagoda] embedded S3" not in output  # no server of the job's own: the nodes' environment led it here
    secret = json.loads((scratch.root / "work" / "s3" / "credentials.json").read_text())["secret_access_key"]
    assert secret not in output
