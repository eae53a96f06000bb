"""What a new user tripped on (issue 24): resume forgetting flags, files left by refused commands, slow argument
errors, and typos without a hint."""

import subprocess
import sys
import time
import warnings

import pytest
import torch

from tests.helpers import FAST, REPO, run_cli
from text3d.errors import CheckpointError, ConfigError, UserError
from text3d.generate.choices import read_choices
from text3d.generate.config import load_config
from text3d.generate.run import generate, resume

HEAVY = ("torch", "diffusers", "transformers", "peft", "trimesh")


def _cfg(teacher, steps, prompt="a red cube"):
    cfg = load_config(overrides=FAST + [f"teacher.name_or_path={teacher}", f"train.steps={steps}"])
    cfg.prompt = prompt
    return cfg


def _videos(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if "_turntable" in p.name)


def test_resume_keeps_no_video_unless_given_again(tiny_teacher_dir, tmp_path, monkeypatch):
    from text3d.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    run_dir = tmp_path / "run"
    main(["generate", "a red cube", "--teacher", str(tiny_teacher_dir), "--no-video", "--steps", "2", "-q",
          "--out", str(run_dir), *FAST])
    main(["generate", "--resume", str(run_dir), "train.steps=3", "-q"])
    assert _videos(run_dir) == []
    assert read_choices(run_dir).video is False
    resume(run_dir, show_progress=False, video=True)  # given again: the video is made, and kept from now on
    assert len(_videos(run_dir)) == 1 and read_choices(run_dir).video is True


def test_stages_texture_without_from_names_from_and_leaves_no_folder(tiny_teacher_dir, tmp_path, monkeypatch,
                                                                     capsys):
    from text3d.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red cube", "--stages", "texture", "--teacher", str(tiny_teacher_dir), "--out", str(out),
              *FAST])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--from RUN_DIR" in lines[0] and "--stages texture" in lines[0]
    assert not out.exists()


def test_failed_resume_leaves_the_run_files_as_they_were(tiny_teacher_dir, tmp_path):
    run = generate(_cfg(tiny_teacher_dir, 2), out=tmp_path / "c", show_progress=False, video=False)
    ckpt = run.run_dir / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = {name: (run.run_dir / name).read_bytes() for name in ("config.yaml", "cli.json")}
    with pytest.raises(CheckpointError) as error:
        resume(run.run_dir, ["train.steps=30"], show_progress=False, video=True)
    assert {name: (run.run_dir / name).read_bytes() for name in before} == before
    with pytest.raises(Exception) as cause:
        torch.load(ckpt, weights_only=True)
    reason = " ".join(line.strip() for line in str(cause.value).splitlines() if line.strip())
    message = str(error.value)
    assert "\n" not in message and "corrupt" in message and f"({reason})" in message


def test_argument_errors_are_fast_and_import_nothing_heavy():
    start = time.perf_counter()
    result = run_cli("generate", "--bogus-option", timeout=60)
    seconds = time.perf_counter() - start
    assert result.returncode == 2 and "--bogus-option" in result.stderr
    assert seconds < 2.0, f"an unknown option took {seconds:.1f} s to be reported"
    probe = ("import sys, text3d.cli\n"
             "for argv in (['generate', '--bogus'], ['export', 'x', '--format', 'nope'], ['--help'],\n"
             "             ['generate', '--help'], ['teacher', 'train', '--help'], ['sample', '--help']):\n"
             "    try:\n"
             "        text3d.cli.main(argv)\n"
             "    except SystemExit:\n"
             "        pass\n"
             f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]
    assert "--format must be one of" in out.stderr


def test_unknown_config_key_says_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*did you mean 'train.steps'\?"):
        load_config(overrides=["train.stpes=5"])
    with pytest.raises(ConfigError, match=r"did you mean 'camera.elevation'\?"):
        load_config(overrides=["camera.elevaton=[0,30]"])


def test_unknown_words_get_the_nearest_known_word(tiny_teacher_dir, tmp_path, monkeypatch):
    from text3d.generate.run import word_hints
    from text3d.teacher import load_teacher

    monkeypatch.setattr("text3d.teacher.loader.DEFAULT_TEACHER_DIR", tiny_teacher_dir)  # the embedded one, here
    teacher = load_teacher(str(tiny_teacher_dir), "cpu")
    # the tiny teacher knows "ball" (the embedded one does not): the hint itself
    assert word_hints(teacher, ["ball", "cubee"]) == ["ball (did you mean sphere?)", "cubee (did you mean cube?)"]
    cfg = _cfg(tiny_teacher_dir, 1, prompt="a red globe cubee xylophone")
    cfg.stages = ["texture"]
    # a --from folder that does not exist stops the run just after the warning, before anything is trained
    with pytest.warns(UserWarning) as record, pytest.raises(UserError, match="does not exist"):
        generate(cfg, out=tmp_path / "run", show_progress=False, teacher=teacher, from_dir=tmp_path / "missing")
    message = " ".join(str(w.message) for w in record)
    assert "globe (did you mean sphere?)" in message and "cubee (did you mean cube?)" in message
    assert "xylophone" in message and "xylophone (did you mean" not in message
    assert not (tmp_path / "run").exists()
