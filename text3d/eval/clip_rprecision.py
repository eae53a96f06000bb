"""CLIP R-precision of rendered views: does CLIP pick the run's prompt out of a list of other prompts?

DreamFusion's measure for prompts outside any labelled world. Each view is embedded by a CLIP image
encoder, each candidate prompt (the run's prompt first, then the distractors, minus any copy of the run's
prompt) by the text encoder; the similarity is the cosine of the two embeddings. A view's rank is 1 plus the
number of distractors at least as similar as the run's prompt (ties count against it, so a model that cannot
tell prompts apart scores 0), and R-precision is the fraction of views of rank 1.

The model is a transformers ``CLIPModel`` folder or hub id with its tokenizer and image processor (e.g.
``openai/clip-vit-base-patch32``); a local folder is read with no network access.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from text3d.errors import UserError
from text3d.runtime.resources import package_path

DEFAULT_CLIP_PROMPTS = package_path("assets", "eval", "clip_prompts.txt")
CLIP_FOLDER_HINT = ("a transformers CLIP folder holds config.json, the model weights, the tokenizer files and "
                    "preprocessor_config.json; or pass a hub id such as openai/clip-vit-base-patch32")


def cosine_similarities(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """[N, P] cosine similarities (float64) of image embeddings [N, D] and text embeddings [P, D]."""
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"expected embeddings [N, D] and [P, D], got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    return F.normalize(image_embeds.double(), dim=-1) @ F.normalize(text_embeds.double(), dim=-1).T


def retrieval_ranks(image_embeds: torch.Tensor, text_embeds: torch.Tensor, true_index: int = 0) -> list[int]:
    """Per image [N, D], the 1-based rank of text ``true_index`` among the texts [P, D] by cosine similarity.

    Rank 1 means every other text is strictly less similar; a tie ranks the true text below the other."""
    sim = cosine_similarities(image_embeds, text_embeds)
    others = torch.ones(sim.shape[1], dtype=torch.bool)
    others[true_index] = False
    return (1 + (sim[:, others] >= sim[:, true_index:true_index + 1]).sum(dim=1)).tolist()


def r_precision(ranks: Sequence[int]) -> float:
    """The fraction of ranks that are 1 (the true prompt retrieved first)."""
    if not ranks:
        raise ValueError("R-precision needs at least one view")
    return sum(r == 1 for r in ranks) / len(ranks)


def _normal(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(". ")


def candidate_prompts(prompt: str, distractors: Sequence[str]) -> list[str]:
    """The run's prompt first, then the distractors without repeats or copies of the prompt (case and spaces
    ignored)."""
    seen = {_normal(prompt)}
    out = [prompt]
    for text in distractors:
        if _normal(text) not in seen:
            seen.add(_normal(text))
            out.append(text)
    if len(out) < 2:
        raise UserError("CLIP R-precision needs at least one distractor prompt different from the run's prompt")
    return out


def _pooled(output) -> torch.Tensor:
    # transformers 4.x returns the projected embeddings, 5.x an output whose pooler_output holds them
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """A CLIP model with its tokenizer and image processor; ``source`` is the folder or hub id it came from."""

    def __init__(self, model, tokenizer, image_processor, source: str, batch_size: int = 64):
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        self.source, self.batch_size = source, batch_size
        self._texts: dict[tuple[str, ...], torch.Tensor] = {}  # the last prompt list: the same for every particle

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        key = tuple(prompts)
        if key not in self._texts:
            self._texts = {key: self._embed_texts(key)}
        return self._texts[key]

    def _embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        max_length = self.model.config.text_config.max_position_embeddings
        chunks = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                    max_length=max_length, return_tensors="pt").to(self.device)
            chunks.append(_pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                               attention_mask=tokens["attention_mask"])))
        return torch.cat(chunks).float().cpu()

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1], as 8-bit pictures (what CLIP saw in training) resized and normalised by
        the model's own image processor."""
        pictures = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        pixels = self.image_processor(images=list(pictures.numpy()), return_tensors="pt")["pixel_values"]
        return _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device))).float().cpu()

    def r_precision(self, images: torch.Tensor, prompt: str, distractors: Sequence[str]) -> dict:
        """``clip_r_precision``, per-view ``clip_ranks`` and ``clip_top_prompts``, and ``clip_n_prompts``."""
        prompts = candidate_prompts(prompt, distractors)
        text = self.embed_texts(prompts)
        image = self.embed_images(images)
        ranks = retrieval_ranks(image, text)
        # the retrieved prompt of a view: its own when ranked first, else the most similar distractor
        best = (1 + cosine_similarities(image, text)[:, 1:].argmax(dim=1)).tolist()
        top = [prompts[0] if r == 1 else prompts[b] for r, b in zip(ranks, best)]
        return {"clip_r_precision": r_precision(ranks), "clip_ranks": ranks, "clip_top_prompts": top,
                "clip_n_prompts": len(prompts)}


def _load_parts(source: str, local_files_only: bool, device: str | torch.device) -> ClipScorer:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    kwargs = {"local_files_only": local_files_only}
    model = CLIPModel.from_pretrained(source, **kwargs).to(device)
    model.requires_grad_(False)
    return ClipScorer(model, AutoTokenizer.from_pretrained(source, **kwargs),
                      AutoImageProcessor.from_pretrained(source, **kwargs), source)


def load_clip(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> ClipScorer:
    """A CLIP model from a local folder (offline) or a hub id (the local cache first, then the network unless
    HF_HUB_OFFLINE=1); every failure is a one-line :class:`UserError`."""
    from text3d.teacher.loader import first_line, hf_offline, hub_reachable, is_hub_unreachable, is_local_path, quiet_hf

    text = os.fspath(name_or_path).strip()
    if not text:
        raise UserError(f"--clip needs a CLIP model: {CLIP_FOLDER_HINT}")
    local = is_local_path(text)
    source = str(Path(os.path.expanduser(text)).resolve()) if local else text
    if local and not Path(source).is_dir():
        raise UserError(f"CLIP model folder {source} does not exist; {CLIP_FOLDER_HINT}")
    def not_cached(why: str) -> UserError:
        return UserError(f"CLIP model {source!r} is not a local folder, is not in the local Hugging Face cache, and "
                         f"{why}: download it once with network access, or pass the path of a local CLIP folder")

    with quiet_hf():
        try:
            return _load_parts(source, True, device)
        except Exception as exc:  # OSError, ValueError, SafetensorError... from transformers
            if local:
                raise UserError(f"could not load the CLIP model in {source}: {type(exc).__name__}: "
                                f"{first_line(exc)}; {CLIP_FOLDER_HINT}") from None
            if not is_hub_unreachable(exc):
                raise UserError(f"could not load the CLIP model {source!r} from the local Hugging Face cache: "
                                f"{type(exc).__name__}: {first_line(exc)}") from None
            if hf_offline():
                raise not_cached("offline mode is on (HF_HUB_OFFLINE=1)") from None
        if not hub_reachable():
            raise not_cached("the hub cannot be reached (no network?)")
        try:
            return _load_parts(source, False, device)
        except Exception as exc:
            raise UserError(f"could not load the CLIP model {source!r} from the Hugging Face hub: "
                            f"{type(exc).__name__}: {first_line(exc)}") from None
