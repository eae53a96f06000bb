"""What a teacher is, read from its folder without loading a weight, and an estimate of a command's peak memory.

:func:`inspect_teacher` reads ``unet/config.json``, ``vae/config.json``, the scheduler config and the
safetensors headers (each tensor's shape, so parameter counts are exact and nothing is read into memory) of a
local folder or of a hub id's snapshot in the local Hugging Face cache (no network: ``text3d doctor`` never
downloads). It gives the image resolution (``unet.sample_size * 2^(VAE levels - 1)``), the prediction type,
the dtype the teacher would run in on the device, and each network's parameters.

:func:`estimate_peak` models the peak resident memory of a command as the sum of what is alive at its worst
moment (GB = 1e9 bytes; ``b`` = bytes per teacher parameter, 4 for fp32):

* ``base``: the process itself (Python, torch, diffusers, the NeRF and its Adam state): 0.6 GB;
* ``weights``: ``b * (UNet + VAE + text encoder parameters)``;
* latent-space SDS, the VAE encoder's graph kept for the backward pass: ``VAE_GRAPH_BYTES_PER_PIXEL`` bytes
  per input pixel per image (3.3 GB at 512 px measured for SD's VAE, 128 channels at full resolution; scaled
  by the first level's channels / 128), ``VAE_GRAPH_CHECKPOINTED`` of it with ``teacher.memory=lean``;
* VSD adds the LoRA's training step, whose UNet graph (kept for the backward pass to the LoRA weights) is alive
  after the render's graph is freed, so the two do not add: ``max(VAE graph, UNet graph)`` with the UNet graph
  ``UNET_GRAPH_BYTES_PER_LATENT`` bytes per latent pixel per sample, scaled by (first block's channels / 320):
  3.5 GB at SD size and 64x64 latents, not measured apart but bounded by the VSD run's peak (9.46 GB measured,
  less the weights and base: 3.7 GB);
* ``distill2d``: the student (a full fp32 copy of the UNet), its gradients (fp32), the optimiser's state
  (AdamW: two fp32 moments; Adafactor: about none), the teacher, and the student's graph (checkpointed in the
  lean mode, a quarter of the UNet graph per sample).

The constants were fitted to the peaks that ``/usr/bin/time -v`` measured at SD 2.1-base size on the CPU
(docs/benchmarks.md lists estimate against measurement); the estimate is within about 15% there and is meant for
the order of magnitude elsewhere (a GPU run in fp16 keeps the activations in fp16: about half).
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from text3d.errors import TeacherError

GB = 1e9
BASE_BYTES = 0.6 * GB
VAE_GRAPH_BYTES_PER_PIXEL = 3.3 * GB / (512 * 512)  # SD's VAE encoder, 128 channels at full resolution
VAE_GRAPH_CHECKPOINTED = 0.6 / 3.3
UNET_GRAPH_BYTES_PER_LATENT = 3.5 * GB / (64 * 64)  # SD's UNet (320 channels first), LoRA training, one sample
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class TeacherInfo:
    source: str
    folder: Path
    image_size: int
    latent_size: int
    latent_channels: int
    prediction_type: str
    dtype: str  # what it would run in on the device asked for
    params: dict[str, int] = field(default_factory=dict)  # unet, vae, text_encoder
    vae_channels: int = 128
    unet_channels: int = 320

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype] * sum(self.params.values())


def _safetensors_params(folder: Path) -> int:
    """Parameters of every ``*.safetensors`` file in ``folder`` from their headers (8-byte length + JSON)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= int(d)
                total += n
    return total


def teacher_folder(name_or_path: str) -> Path:
    """A local folder, or a hub id's snapshot in the local Hugging Face cache (``refs/main``), without network."""
    from text3d.teacher.loader import hub_cache_folder, resolve_source

    source, local = resolve_source(name_or_path)
    if local:
        return Path(source)
    repo = hub_cache_folder(source)
    ref = repo / "refs" / "main"
    snapshot = repo / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    if snapshot is None or not snapshot.is_dir():
        raise TeacherError(f"teacher {source!r} is not a local folder and not in the local Hugging Face cache "
                           f"({repo} has no snapshot)")
    return snapshot


def inspect_teacher(name_or_path: str | None, device: str = "cpu", dtype: str = "auto") -> TeacherInfo:
    """The teacher's resolution, prediction type, dtype on ``device`` and parameters (module docstring)."""
    import torch

    from text3d.teacher.loader import default_teacher, resolve_dtype

    name = name_or_path if name_or_path is not None else default_teacher()
    folder = teacher_folder(name)

    def config(sub: str, *names: str) -> dict:
        for n in names:
            path = folder / sub / n
            if path.is_file():
                return json.loads(path.read_text())
        raise TeacherError(f"teacher folder {folder} has no {sub}/{names[0]}")

    unet, vae = config("unet", "config.json"), config("vae", "config.json")
    scheduler = config("scheduler", "scheduler_config.json", "config.json")
    size = unet.get("sample_size", 64)
    latent = int(size[0] if isinstance(size, (list, tuple)) else size)
    factor = 2 ** (len(vae.get("block_out_channels", [1])) - 1)
    params = {}
    for sub in ("unet", "vae", "text_encoder"):
        params[sub] = _safetensors_params(folder / sub)
    with warnings.catch_warnings():  # fp16 on the CPU: fp32, said once by the command that loads it
        warnings.simplefilter("ignore")
        run_dtype = resolve_dtype(dtype, torch.device("cuda" if device.startswith("cuda") else "cpu"))
    return TeacherInfo(source=str(name), folder=folder, image_size=latent * factor, latent_size=latent,
                       latent_channels=int(unet.get("in_channels", 4)),
                       prediction_type=str(scheduler.get("prediction_type", "epsilon")),
                       dtype=str(run_dtype).replace("torch.", ""), params=params,
                       vae_channels=int(vae.get("block_out_channels", [128])[0]),
                       unet_channels=int(unet.get("block_out_channels", [320])[0]))


def vae_graph_bytes(info: TeacherInfo, images: int, checkpointed: bool = False) -> float:
    """The VAE encoder's graph of ``images`` encodes at the teacher's resolution (module docstring)."""
    per_image = VAE_GRAPH_BYTES_PER_PIXEL * info.image_size ** 2 * info.vae_channels / 128
    per_image *= DTYPE_BYTES[info.dtype] / 4
    return per_image * images * (VAE_GRAPH_CHECKPOINTED if checkpointed else 1.0)


def unet_graph_bytes(info: TeacherInfo, samples: int) -> float:
    """The UNet's graph of one forward pass with gradients on ``samples`` latents (module docstring)."""
    return (UNET_GRAPH_BYTES_PER_LATENT * info.latent_size ** 2 * info.unet_channels / 320 * samples
            * DTYPE_BYTES[info.dtype] / 4)


def estimate_peak(info: TeacherInfo, command: str, batch: int = 1, space: str = "latent", lean: bool = False,
                  optimizer: str = "adamw") -> dict[str, float]:
    """Bytes of each part alive at the peak of ``command`` (``sds`` | ``vsd`` | ``distill2d``), and ``total``.

    ``batch``: images per step; ``space``: latent (the VAE encoder's graph is kept) or image (it is not);
    ``lean``: the memory-lean modes (VAE encoder checkpointed for generate; the student checkpointed for
    distill2d, with ``optimizer`` its optimiser)."""
    parts = {"base": BASE_BYTES, "teacher weights": float(info.weight_bytes)}
    graph = vae_graph_bytes(info, batch, checkpointed=lean) if space == "latent" else 0.0
    if command == "sds":
        parts["VAE encoder graph"] = graph
    elif command == "vsd":
        parts["max(VAE graph, LoRA's UNet graph)"] = max(graph, unet_graph_bytes(info, batch))
    elif command == "distill2d":
        unet = 4.0 * info.params["unet"]
        parts["student (fp32 UNet copy)"] = unet
        parts["student gradients"] = unet
        parts["optimiser state"] = 2 * unet if optimizer == "adamw" else 0.01 * unet
        parts["student graph"] = unet_graph_bytes(info, batch) * (0.25 if lean else 1.0)
    else:
        raise ValueError(f"unknown command {command!r}")
    parts["total"] = sum(parts.values())
    return parts


def describe(info: TeacherInfo) -> dict[str, str]:
    """``text3d doctor``'s lines about a teacher."""
    p = info.params
    return {
        "teacher": f"{info.source} ({info.folder})" if str(info.folder) != info.source else info.source,
        "resolution": f"{info.image_size} px images, {info.latent_channels}x{info.latent_size}x{info.latent_size} "
                      f"latents",
        "prediction": info.prediction_type,
        "dtype": info.dtype,
        "parameters": f"UNet {p['unet'] / 1e6:.1f} M, VAE {p['vae'] / 1e6:.1f} M, text encoder "
                      f"{p['text_encoder'] / 1e6:.1f} M ({info.weight_bytes / GB:.2f} GB in {info.dtype})",
    }


def gb(x: float) -> str:
    return f"{x / GB:.1f} GB"


__all__ = ["TeacherInfo", "describe", "estimate_peak", "gb", "inspect_teacher", "teacher_folder"]
