"""Load a teacher's components from a local diffusers folder or a Hugging Face hub id.

Each component is loaded on its own with ``from_pretrained(source, subfolder=...)``, the same code
for folders and hub ids:

  unet/          diffusers UNet2DConditionModel
  vae/           diffusers AutoencoderKL
  text_encoder/  transformers CLIPTextModel (or the class its config names, e.g. T5EncoderModel)
  tokenizer/     transformers CLIPTokenizer (AutoTokenizer for non-CLIP text encoders)
  scheduler/     read as a DDPMScheduler (DDIM/PNDM/... configs carry the same betas)

A hub id (``stabilityai/stable-diffusion-2-1-base``) is read from the local Hugging Face cache first
(:func:`hub_cache_dir`: ``models--org--name/snapshots/<rev>/`` with ``refs/main`` naming the revision),
with ``local_files_only``, so a complete cached copy loads without any network call; the network is tried only
when the cache lacks a file, never with ``HF_HUB_OFFLINE=1``, and not when the hub's port does not answer. When
the cache lacks it offline, the error names the cache folder it looked in.

Every failure a user can cause (no such path, a folder missing components, a hub id that cannot be
fetched, a corrupt weight file) becomes a one-line :class:`~text3d.errors.TeacherError`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import torch

from text3d.errors import ConfigError, TeacherError
from text3d.runtime.resources import package_path

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_FOLDER_HINT = ("a diffusers Stable Diffusion folder must contain the subfolders "
                  "unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
# The teacher used when none is named: the embedded one in the repository's text3d/assets/teacher/, once trained
# there by `text3d teacher train` (it counts as present when its model_index.json is).
DEFAULT_TEACHER_DIR = package_path("assets", "teacher")


def default_teacher() -> str | None:
    """The teacher used when none is named: $TEXT3D_DEFAULT_TEACHER if set (a folder or hub id), else the
    embedded one in text3d/assets/teacher/, or None while none is installed."""
    override = os.environ.get("TEXT3D_DEFAULT_TEACHER")
    if override is not None:
        return override.strip() or None
    return str(DEFAULT_TEACHER_DIR) if (DEFAULT_TEACHER_DIR / "model_index.json").is_file() else None

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def is_local_path(name: str | os.PathLike) -> bool:
    """True when ``name`` means a folder on disk rather than a hub id like ``owner/model``.

    A path is anything that exists, starts with '.', '/' or '~', or has more than one '/'.
    """
    text = os.fspath(name)
    return (os.path.exists(os.path.expanduser(text)) or text.startswith((".", "/", "~", "\\"))
            or text.count("/") > 1 or os.sep != "/" and os.sep in text)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` (or None) is fp16 on CUDA and fp32 elsewhere; otherwise fp32 | fp16 | bf16.

    fp16 on the CPU (e.g. a GPU config such as ``vsd-sd21.yaml`` run on a CPU) becomes fp32 with a warning:
    the CPU has no fast fp16 kernels (a step is several times slower) and fp16 GroupNorm/softmax there lose
    precision; ``bf16`` stays available on the CPU when asked for by name."""
    if isinstance(spec, torch.dtype):
        if spec not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"teacher dtype {spec} is not supported: use fp32, fp16 or bf16")
        dtype = spec
    else:
        name = (spec or "auto").lower()
        if name == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        if name not in DTYPES:
            raise ConfigError(f"unknown teacher dtype {spec!r}: expected auto, fp32, fp16 or bf16")
        dtype = DTYPES[name]
    if dtype is torch.float16 and device.type == "cpu":
        warnings.warn("teacher dtype fp16 on the CPU: using fp32 instead (no fast fp16 kernels on the CPU)")
        return torch.float32
    return dtype


def hf_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks the Hugging Face libraries to stay off the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else huggingface_hub's default ``~/.cache/huggingface/hub``); huggingface_hub reads these
    once at import, so a process that sets them later still finds its cache here."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_cache_folder(repo_id: str) -> Path:
    """Where the hub cache keeps ``repo_id`` (``models--org--name``, holding ``snapshots/<rev>/`` and ``refs/``)."""
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence diffusers/transformers/huggingface_hub logging, progress bars and warnings for a block."""
    from diffusers.utils import logging as d_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as h_logging
    from transformers.utils import logging as t_logging

    d_level, t_level, h_level = d_logging.get_verbosity(), t_logging.get_verbosity(), h_logging.get_verbosity()
    d_bar, t_bar = d_logging.is_progress_bar_enabled(), t_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    d_logging.set_verbosity(logging.CRITICAL)  # every failure is re-raised as a TeacherError instead
    t_logging.set_verbosity(logging.CRITICAL)
    h_logging.set_verbosity(logging.CRITICAL)
    d_logging.disable_progress_bar()
    t_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        d_logging.set_verbosity(d_level)
        t_logging.set_verbosity(t_level)
        h_logging.set_verbosity(h_level)
        if d_bar:
            d_logging.enable_progress_bar()
        if t_bar:
            t_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message, cut to ``limit`` characters (for one-line errors)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_HUB_UNREACHABLE_HINTS = ("couldn't connect", "could not connect", "offline", "local_files_only", "cached files",
                          "connection", "not found in cache", "cannot find the requested files",
                          "is not a local folder and is not a valid model identifier", "repository not found")


def is_hub_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the hub or its cache could not serve a file."""
    from huggingface_hub import errors as hub_errors

    kinds = (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, hub_errors.RepositoryNotFoundError,
             hub_errors.HfHubHTTPError, ConnectionError, TimeoutError)
    for e in _chain(exc):
        if isinstance(e, kinds):
            return True
        if any(hint in str(e).lower() for hint in _HUB_UNREACHABLE_HINTS):
            return True
    return False


def _repo_not_found(exc: BaseException) -> bool:
    from huggingface_hub import errors as hub_errors

    return any(isinstance(e, hub_errors.RepositoryNotFoundError) for e in _chain(exc))


def _remote_file_missing(exc: BaseException) -> bool:
    from huggingface_hub import errors as hub_errors

    return any(isinstance(e, hub_errors.EntryNotFoundError) and not isinstance(e, hub_errors.LocalEntryNotFoundError)
               for e in _chain(exc))


def _describe_failure(exc: BaseException, component: str, source: str, local: bool,
                      local_files_only: bool = False) -> str:
    if not local and _repo_not_found(exc) and not local_files_only:
        return (f"teacher {source!r} was not found on the Hugging Face hub (wrong id, or a gated/private model: "
                f"log in with `hf auth login`); or pass the path of a local diffusers folder")
    if not local and not local_files_only and _remote_file_missing(exc):
        return (f"teacher {source!r} on the Hugging Face hub has no usable {component}/ "
                f"({first_line(exc, 100)}); {SD_FOLDER_HINT}")
    if not local and is_hub_unreachable(exc):
        why = ("offline mode is on (HF_HUB_OFFLINE=1 or local_files_only)" if local_files_only
               else "the hub cannot be reached (no network?)")
        folder = hub_cache_folder(source)
        where = (f"{folder} is incomplete" if folder.is_dir()
                 else f"it is not in the local Hugging Face cache ({folder} does not exist)")
        return (f"teacher {source!r} is not a local folder, {where}, and {why}: "
                f"download it once with network access, or pass the path of a local diffusers folder")
    return (f"could not load {component}/ of teacher {source}: its weights or config look corrupt or incomplete "
            f"({type(exc).__name__}: {first_line(exc)})")


def _text_encoder_class(source: str, kwargs: dict[str, Any]):
    """CLIPTextModel for CLIP configs; otherwise the transformers class the config names (or AutoModel)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(source, subfolder="text_encoder", **kwargs)
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if getattr(config, "model_type", "").startswith("clip"):
        return transformers.CLIPTextModel
    return transformers.AutoModel


def resolve_source(name_or_path: str | os.PathLike | None) -> tuple[str, bool]:
    """(source string for from_pretrained, is_local); checks that a local folder has every component."""
    if name_or_path is None:
        name_or_path = default_teacher()
    if name_or_path is None or not str(name_or_path).strip():
        raise TeacherError("no teacher given and no default teacher is installed yet (text3d/assets/teacher/ is empty): "
                           "pass --teacher with a diffusers Stable Diffusion folder or hub id "
                           "(e.g. stabilityai/stable-diffusion-2-1-base), or train the embedded one with "
                           "text3d teacher train")
    if not is_local_path(name_or_path):
        return str(name_or_path), False
    path = Path(os.path.expanduser(os.fspath(name_or_path))).resolve()
    if not path.exists():
        raise TeacherError(f"teacher path {path} does not exist; {SD_FOLDER_HINT}")
    if not path.is_dir():
        raise TeacherError(f"teacher path {path} is a file, not a folder; {SD_FOLDER_HINT}")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        names = ", ".join(f"{c}/" for c in missing)
        raise TeacherError(f"teacher folder {path} is missing {names}; {SD_FOLDER_HINT}")
    return str(path), True


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds.

    Without it, huggingface_hub retries an unreachable host for ~30 s. Behind an HTTP(S) proxy the
    probe is skipped (True): only the proxy knows.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_all(source: str, local: bool, device: torch.device, dtype: torch.dtype, local_files_only: bool,
              offline: bool) -> dict[str, Any]:
    import diffusers
    import transformers

    hub_kwargs = {"local_files_only": local_files_only}
    if not local:
        hub_kwargs["cache_dir"] = str(hub_cache_dir())
    loaded: dict[str, Any] = {"source": source}

    def guarded(component: str, fn):
        try:
            return fn()
        except TeacherError:
            raise
        except Exception as exc:  # libraries raise OSError, ValueError, SafetensorError, RuntimeError...
            raise TeacherError(_describe_failure(exc, component, source, local, offline)) from exc

    loaded["scheduler"] = guarded("scheduler", lambda: diffusers.DDPMScheduler.from_pretrained(
        source, subfolder="scheduler", **hub_kwargs))
    encoder_cls = guarded("text_encoder", lambda: _text_encoder_class(source, hub_kwargs))
    tokenizer_cls = transformers.CLIPTokenizer if encoder_cls.__name__.startswith("CLIP") else transformers.AutoTokenizer
    loaded["tokenizer"] = guarded("tokenizer", lambda: tokenizer_cls.from_pretrained(
        source, subfolder="tokenizer", **hub_kwargs))
    loaded["text_encoder"] = guarded("text_encoder", lambda: encoder_cls.from_pretrained(
        source, subfolder="text_encoder", dtype=dtype, **hub_kwargs))
    loaded["vae"] = guarded("vae", lambda: diffusers.AutoencoderKL.from_pretrained(
        source, subfolder="vae", torch_dtype=dtype, **hub_kwargs))
    loaded["unet"] = guarded("unet", lambda: diffusers.UNet2DConditionModel.from_pretrained(
        source, subfolder="unet", torch_dtype=dtype, **hub_kwargs))
    if loaded["text_encoder"].dtype != dtype:  # transformers versions that ignore the `dtype` keyword
        loaded["text_encoder"] = loaded["text_encoder"].to(dtype)
    for name in ("unet", "vae", "text_encoder"):
        # already in `dtype` (modules a model keeps in fp32 stay so); only move them
        module = loaded[name].to(device)
        module.requires_grad_(False)
        module.eval()
        loaded[name] = module
    return loaded


def load_components(name_or_path: str | os.PathLike | None, device: torch.device, dtype: torch.dtype,
                    local_files_only: bool = False) -> dict[str, Any]:
    """Load unet, vae, text_encoder, tokenizer and scheduler onto ``device`` in ``dtype``.

    Returns a dict with those five keys plus ``source`` (the resolved path or hub id). A hub id is
    read from the local HF cache when it is complete there; the network is used only otherwise
    (never with ``local_files_only`` or ``HF_HUB_OFFLINE=1``).
    """
    source, local = resolve_source(name_or_path)
    offline = local_files_only or hf_offline()
    with quiet_hf():
        if local or offline:
            return _load_all(source, local, device, dtype, local_files_only=offline, offline=offline)
        try:  # a complete cached copy needs no network
            return _load_all(source, local, device, dtype, local_files_only=True, offline=False)
        except TeacherError as exc:
            if not is_hub_unreachable(exc):  # cached but corrupt: report that, the network will not help
                raise
        if not hub_reachable():
            raise TeacherError(_describe_failure(ConnectionError("hub unreachable"), "scheduler", source, local))
        return _load_all(source, local, device, dtype, local_files_only=False, offline=False)


def save_components(folder: Path, vae, unet, text_encoder, tokenizer_dir, scheduler) -> None:
    """A diffusers Stable Diffusion folder: save_pretrained of every component (fp32, on the CPU) plus
    model_index.json; :func:`load_teacher` reads it back (load and save side by side, as diffusers does).

    ``tokenizer_dir`` is a saved tokenizer folder to copy, or a tokenizer object to save."""

    with quiet_hf():
        for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
            on_cpu_fp32 = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())
            # a copy only when it must move or change dtype (at SD size each copy of the UNet is 3.4 GB)
            (module if on_cpu_fp32 else copy.deepcopy(module).to("cpu", torch.float32)).save_pretrained(folder / name)
        if hasattr(tokenizer_dir, "save_pretrained"):
            tokenizer_dir.save_pretrained(folder / "tokenizer")
        else:
            shutil.copytree(tokenizer_dir, folder / "tokenizer")
        scheduler.save_pretrained(folder / "scheduler")
    for name in ("vae", "unet"):  # a model loaded from a folder records its path there; the teacher moves
        config_path = folder / name / "config.json"
        config = json.loads(config_path.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")


def model_index(scheduler_class: str = "DDPMScheduler") -> dict:
    """The model_index.json of a StableDiffusionPipeline folder without safety checker."""
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
