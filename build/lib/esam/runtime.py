"""Process-level plumbing the trainer needs: device, precision, distributed, seeds, atomic files."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from esam.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_submitit() -> None:
    """Under a multi-task submitit job (Slurm or local), export the variables torchrun would set.

    Each task of ``tasks_per_node`` x ``nodes`` becomes one DDP rank; rank 0's host is the
    rendezvous. A no-op outside submitit, with one task, or when torchrun already set them.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR") or "WORLD_SIZE" in os.environ:
        return
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    # A port per job, so array jobs sharing a node do not collide.
    port = 20000 + int(hashlib.sha1(env.job_id.encode()).hexdigest(), 16) % 20000
    os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank),
                      WORLD_SIZE=str(env.num_tasks), MASTER_ADDR=env.hostnames[0],
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun (or a multi-task submitit job) describes; no-op otherwise."""
    env_from_submitit()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' = CUDA (this rank's GPU) if present, else CPU; 'cuda' = this rank's GPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device={name!r} is not one of auto, cpu, cuda, cuda:N")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' = bf16 autocast where the device runs it natively (AMX/AVX512-BF16 CPUs, Ampere+
    GPUs), else fp16 on older GPUs and fp32 on older CPUs. 'tf32' = fp32 with TF32 matmuls on
    CUDA (the caller sets the backend flags), plain fp32 on the CPU."""
    name = str(getattr(name, "value", name))
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("precision=fp16 needs CUDA (autocast + GradScaler); use bf16 or fp32 on the CPU")
    if name == "tf32" and device.type != "cuda":
        return "fp32"  # TF32 is a CUDA tensor-core format; the CPU computes plain fp32
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """A fresh context for one forward at ``precision`` (resolved, see ``resolve_precision``):
    bf16/fp16 = autocast to that dtype on ``device``; fp32 (and tf32) = no autocast."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(getattr(precision, "value", precision)))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
    """HEAD of the repo this package runs from, with '-dirty' if it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The hardware's model name (GPU name, or the CPU's "model name" from /proc/cpuinfo), so
    throughput is never compared across machines that share an architecture like ``x86_64``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
                if name:
                    return name
    except OSError:  # not Linux, or no /proc
        pass
    import platform

    # macOS/Windows: processor() names the CPU there; machine() is only the architecture.
    return platform.processor() or platform.machine() or "cpu"


# -- files that are either complete or absent ------------------------------------------
def _atomic_write(path: str | Path, mode: str, write) -> None:
    """Write to a temp file beside ``path``, then rename it over ``path``: readers see the old
    file or the new one, never half of one; a failed write removes its temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


CHECKPOINT_FORMAT = "esam-checkpoint-v1"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by the trainer, or say in one sentence why it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, wrong file, unpickling error
        raise UserError(f"checkpoint {path} is corrupt or truncated and cannot be loaded ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} is not an esam training checkpoint ({CHECKPOINT_FORMAT})")
    return ckpt
