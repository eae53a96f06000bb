"""CLIP R-precision: the retrieval math on hand-made embeddings, and `text3d eval run --clip` with a tiny random CLIP."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import mesh_run_folder
from text3d.errors import UserError
from text3d.eval.clip_rprecision import DEFAULT_CLIP_PROMPTS, candidate_prompts, r_precision, retrieval_ranks
from text3d.eval.cli import eval_app
from text3d.eval.judge import Judge
from text3d.eval.score_run import clip_distractors
from text3d.toyworld.catalog import COLOURS, OBJECTS, all_captions

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ retrieval on hand-made embeddings


def test_ranks_use_cosine_similarity_and_count_ties_against_the_prompt():
    # texts: the run's prompt, then two distractors; the second is long, so a plain dot product favours it
    # and a Euclidean distance shuns it
    texts = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 10.0, 0]])
    views = torch.tensor([
        [1.0, 0, 0, 0],       # exactly the prompt
        [2.0, 0.5, 0, 0],     # the prompt, with some of distractor 1
        [1.0, 0, 0.3, 0],     # cosine: the prompt (dot product: distractor 2)
        [5.0, 0, 0, 1.0],     # a long vector near the prompt
        [0.9, 0.1, 0.1, 0.1],
        [0.1, 0, 1.0, 0],     # cosine: distractor 2 (Euclidean: the prompt) -> rank 2
        [0.1, 1.0, 0.5, 0],   # distractor 1, then 2, then the prompt -> rank 3
        [1.0, 1.0, 0, 0],     # a tie with distractor 1 -> rank 2
    ])
    ranks = retrieval_ranks(views, texts)
    assert ranks == [1, 1, 1, 1, 1, 2, 3, 2]
    assert r_precision(ranks) == 0.625
    # the same views against the prompt at another index (texts reordered) rank the same
    assert retrieval_ranks(views, texts[[1, 0, 2]], true_index=1) == ranks
    assert r_precision([2, 3]) == 0.0 and r_precision([1]) == 1.0
    with pytest.raises(ValueError):
        retrieval_ranks(views, texts[:, :3])


def test_candidates_drop_the_prompt_and_repeats():
    assert candidate_prompts("a corgi", ["A  Corgi.", "a cat", "a dog", "a Cat", "a corgi puppy"]) == \
        ["a corgi", "a cat", "a dog", "a corgi puppy"]
    with pytest.raises(UserError):
        candidate_prompts("a corgi", ["a corgi"])


def test_default_distractors():
    shipped = clip_distractors(None)
    assert len(shipped) >= 100 and len(set(shipped)) == len(shipped)
    world = clip_distractors(("cube", "red"))
    assert len(world) == len(all_captions()) - 1 and "a red cube" not in world and "a blue cube" in world
    assert DEFAULT_CLIP_PROMPTS.is_file()


# ------------------------------------------------------------------ `text3d eval run --clip`


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIPModel with an offline-built tokenizer and a 32 px image processor, saved as a transformers folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from text3d.teacher.tiny import tiny_text_encoder
    from text3d.teacher.tokenizer import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_clip_tokenizer(folder)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=tiny_text_encoder(tokenizer).config.to_dict(), vision_config=vision,
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("judge")
    Judge(list(OBJECTS), list(COLOURS), ["front", "side", "back", "overhead"]).save(folder)
    return folder


def _eval_run(*args):
    return CliRunner().invoke(eval_app, ["run", *map(str, args)])


def _check_clip_figures(scores: dict, n_prompts: int):
    ranks = scores["clip_ranks"]
    assert len(ranks) == 8 and all(1 <= r <= n_prompts for r in ranks)
    assert 0.0 <= scores["clip_r_precision"] <= 1.0
    assert scores["clip_r_precision"] == sum(r == 1 for r in ranks) / 8
    assert [t == scores["prompt"] for t in scores["clip_top_prompts"]] == [r == 1 for r in ranks]
    assert scores["clip_n_prompts"] == n_prompts


def test_eval_run_with_clip_on_a_world_prompt(tmp_path, tiny_clip_dir, judge_dir):
    folder = mesh_run_folder(tmp_path / "run", "a red cube", "cube")
    r = _eval_run(folder, "--clip", tiny_clip_dir, "--judge", judge_dir)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "CLIP R-precision" in r.output and "silhouette IoU" in r.output
    scores = json.loads((folder / "eval.json").read_text())
    _check_clip_figures(scores, len(all_captions()))  # the prompt + every other caption of the world
    assert scores["clip_model"] == str(tiny_clip_dir.resolve()) and scores["clip_resolution"] == 224
    assert scores["object"] == "cube" and scores["silhouette_iou"] > 0.9
    assert scores["object_accuracy"] is not None and scores["colour_accuracy"] is not None


def test_eval_run_with_clip_alone_on_any_prompt(tmp_path, tiny_clip_dir, monkeypatch):
    monkeypatch.setattr("text3d.eval.score_images.DEFAULT_JUDGE_DIR", tmp_path / "no-judge")  # never needed
    folder = mesh_run_folder(tmp_path / "run", "a corgi", "sphere")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# distractors\na cat\nA corgi\n\na lamp\na cat\n")
    r = _eval_run(folder, "--clip", tiny_clip_dir, "--clip-prompts", prompts)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "CLIP R-precision" in r.output and "silhouette" not in r.output
    scores = json.loads((folder / "eval.json").read_text())
    _check_clip_figures(scores, 3)  # "a corgi", "a cat", "a lamp"
    for key in ("object", "object_accuracy", "colour_accuracy", "view_accuracy", "silhouette_iou", "janus_rate"):
        assert scores[key] is None, key

    r = _eval_run(folder, "--clip", tiny_clip_dir)  # the shipped distractors
    assert r.exit_code == 0, r.output + repr(r.exception)
    _check_clip_figures(json.loads((folder / "eval.json").read_text()), 1 + len(clip_distractors(None)))


def test_eval_run_errors_are_one_line(tmp_path, tiny_clip_dir, judge_dir):
    folder = mesh_run_folder(tmp_path / "run", "a corgi", "sphere")
    failures = [
        ((folder, "--judge", judge_dir), "--clip"),  # the judge cannot score a corgi
        ((folder, "--clip", tmp_path / "no-clip"), "does not exist"),
        ((folder, "--clip", tmp_path), "could not load the CLIP model"),  # a folder, but no model in it
        ((folder, "--clip-prompts", tmp_path / "p.txt"), "needs --clip"),
        ((folder, "--clip", tiny_clip_dir, "--clip-prompts", tmp_path / "p.txt"), "does not exist"),
    ]
    for args, words in failures:
        r = _eval_run(*args)
        assert isinstance(r.exception, UserError), (args, r.output, repr(r.exception))
        assert words in str(r.exception) and "\n" not in str(r.exception), str(r.exception)
    assert not (folder / "eval.json").exists()
