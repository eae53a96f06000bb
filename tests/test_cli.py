"""The command line: help, doctor, and one-line errors with no partial files for bad input."""

import pytest
import trimesh

from tests.helpers import FAST, run_cli


def test_help_and_doctor():
    result = run_cli("--help")
    assert result.returncode == 0 and "generate" in result.stdout and "export" in result.stdout
    doctor = run_cli("doctor")
    assert doctor.returncode == 0 and "torch" in doctor.stdout and "nerfacc" in doctor.stdout


def _assert_clean_failure(result, words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert words in lines[0]


@pytest.mark.parametrize("case, words", [
    ("empty_prompt", "prompt is empty"),
    ("missing_teacher", "does not exist"),
    ("unknown_key", "unknown config key 'train.colour'"),
    ("zero_steps", "train.steps must be at least 1"),
    ("unwritable_out", "cannot"),
    ("no_teacher", "no default teacher"),
])
def test_bad_input_gives_one_line_and_no_files(case, words, tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    teacher = ["--teacher", str(tiny_teacher_dir)]
    args = {
        "empty_prompt": ["generate", "  ", *teacher, "--out", str(out)],
        "missing_teacher": ["generate", "a cube", "--teacher", str(tmp_path / "nope"), "--out", str(out)],
        "unknown_key": ["generate", "a cube", *teacher, "--out", str(out), "train.colour=red"],
        "zero_steps": ["generate", "a cube", *teacher, "--steps", "0", "--out", str(out)],
        "unwritable_out": ["generate", "a cube", *teacher, "--out", "/proc/text3d-run"],
        "no_teacher": ["generate", "a cube", "--out", str(out)],
    }[case]
    # "no teacher": as if no embedded teacher were installed, whatever text3d/assets/teacher holds
    result = run_cli(*args, *FAST, env_update={"TEXT3D_DEFAULT_TEACHER": ""} if case == "no_teacher" else {})
    _assert_clean_failure(result, words)
    assert not out.exists()


def test_export_command_rewrites_files(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    made = run_cli("generate", "a red cube", "--teacher", str(tiny_teacher_dir), "--steps", "2", "--out", str(out),
                   "-q", "--no-video", *FAST)
    assert made.returncode == 0, made.stderr
    glbs = sorted(out.glob("*.glb"))
    assert len(glbs) == 1
    glbs[0].unlink()
    again = run_cli("export", str(out), "--format", "glb", "--no-video")
    assert again.returncode == 0, again.stderr
    assert len(list(out.glob("*.glb"))) == 1
    ply = run_cli("export", str(out), "--format", "ply", "--faces", "300", "--no-video")
    assert ply.returncode == 0, ply.stderr
    plys = sorted(out.glob("*.ply"))
    assert len(plys) == 1 and 0 < len(trimesh.load(plys[0], force="mesh").faces) <= 300
    bad = run_cli("export", str(tmp_path / "missing"))
    _assert_clean_failure(bad, "does not exist")
    _assert_clean_failure(run_cli("export", str(out), "--faces", "2"), "--faces")
