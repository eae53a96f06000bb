"""What the 2D trainers need to be right on several processes (``accelerate launch``, ``torchrun``; DDP, gloo on
the CPU, NCCL on GPUs):

* weights that DDP does not broadcast start the same on every process: :func:`shared_seed`;
* a non-finite loss is skipped by every process or by none (a process that skipped its backward while the others
  ran theirs would leave them waiting in DDP's all-reduce for ever): :func:`all_finite`;
* each process draws its own noise (seeded ``seed + rank``); the checkpoint (written by the main process) holds
  the main process's random state, and every other process writes its own beside it
  (``checkpoints/rng_rank<R>.pt``), so a resumed run draws what an uninterrupted one would: :func:`save_process_rng`,
  :func:`restore_process_rng`;
* the replicas stay identical (gradients averaged): :func:`replica_fingerprints` hashes each process's weights, and
  the run's summary keeps them;
* checkpoints load on the CPU as ``cpu``, not as the ``cpu:0`` of a multi-process CPU run: :func:`map_location`;
* ``accelerate launch --cpu --num_processes N`` starts one process unless it goes through mpirun: :func:`launch_warning`
  says so and names the launch that gives N CPU processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch

from text3d.runtime.checkpoint import load_checkpoint, save_checkpoint
from text3d.runtime.seed import rng_state, seed_everything, set_rng_state


def launch_warning() -> str | None:
    """The warning for ``accelerate launch --cpu --num_processes N>1`` (which runs one process), else None."""
    one_process = "WORLD_SIZE" not in os.environ and "MASTER_ADDR" in os.environ
    if one_process and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1"):
        return ("accelerate launch --cpu runs one process (it expects mpirun for more); for N processes on the CPU "
                "use accelerate launch --multi_gpu --num_processes N -m text3d distill2d ... (gloo), or torchrun "
                "--nproc_per_node N -m text3d distill2d ...")
    return None


def warn_about_launch() -> None:
    message = launch_warning()
    if message:
        warnings.warn(message, stacklevel=2)


@contextlib.contextmanager
def shared_seed(accelerator, seed: int) -> Iterator[None]:
    """Inside: the same random numbers on every process (initial weights that DDP does not broadcast: the fake
    score's LoRA, DMD2's GAN head); after: each process's own stream again. Nothing changes with one process."""
    if accelerator.num_processes == 1:
        yield
        return
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every process (one small all-reduce when there are several)."""
    finite = bool(torch.isfinite(loss).all())
    if accelerator.num_processes == 1:
        return finite
    flag = torch.tensor([1.0 if finite else 0.0], device=accelerator.device)
    return int(accelerator.reduce(flag, reduction="sum").item()) == accelerator.num_processes


def map_location(device: torch.device):
    """Where a checkpoint's tensors load: ``cpu`` for any CPU device (torch.load cannot restore to ``cpu:0``, the
    device accelerate gives each process of a multi-process CPU run), else the device."""
    return "cpu" if device.type == "cpu" else device


def rng_path(out: Path, rank: int) -> Path:
    return Path(out) / "checkpoints" / f"rng_rank{rank}.pt"


def save_process_rng(accelerator, out: Path, step: int) -> None:
    """A process other than the main one: its random state at ``step``, beside the checkpoint."""
    if not accelerator.is_main_process:
        save_checkpoint(rng_path(out, accelerator.process_index), {"step": step, "rng": rng_state()})


def restore_process_rng(accelerator, out: Path, step: int, seed: int) -> None:
    """After the checkpoint of ``step`` has loaded (with the main process's random state): every other process
    takes its own state of that step, or, missing that (a crash between the two writes, another process count),
    a fresh seed of its own for that step, so no two processes draw the same noise."""
    if accelerator.is_main_process:
        return
    path = rng_path(out, accelerator.process_index)
    if path.is_file():
        state = load_checkpoint(path)
        if int(state.get("step", -1)) == step:
            set_rng_state(state["rng"])
            return
    seed_everything(seed + accelerator.process_index + 100_003 * step)


def state_hash(state: dict) -> str:
    """SHA-256 of a state dict's tensors (names, dtypes, shapes and bytes), in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replica_fingerprints(accelerator, states: dict[str, dict], counts: dict) -> dict:
    """Per process, the hash of each of ``states`` and ``counts`` (every process must call it): lists in rank
    order, and ``identical`` when every process holds the same weights."""
    from accelerate.utils import gather_object

    mine = {"hashes": {name: state_hash(state) for name, state in states.items()}, "counts": dict(counts)}
    every = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    result = {name: [p["hashes"][name] for p in every] for name in states}
    result["counts"] = [p["counts"] for p in every]
    result["identical"] = all(len(set(result[name])) == 1 for name in states)
    return result


def end_processes(accelerator) -> None:
    """Close a multi-process run: every process waits for the others to finish (the main one exports and scores
    after the last collective call), then leaves the process group. A process that exits with its gloo group still
    open can abort in the group's teardown ("terminate called without an active exception"), and the launcher then
    stops the others (seen once in CI, 2026-12-07). A no-op on one process."""
    if accelerator.num_processes <= 1 or not torch.distributed.is_initialized():
        return
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
