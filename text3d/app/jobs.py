"""The app's jobs: each is a ``text3d generate`` child process, so a job runs exactly as on the command line.

Stopping a job sends the child SIGINT, the path of Ctrl-C: it finishes its step, saves its checkpoint and exits
with code 130, and ``text3d generate --resume`` continues it. The child's plain progress lines (stderr, one a
second) give the step; its ``error:`` line, the message shown for a bad input. The inputs that the command line
would accept but the app refuses (a step count out of range, words the embedded teacher never saw) are checked
here, before any process starts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from text3d.errors import UserError
from text3d.generate.config import load_config
from text3d.prompts import validate_prompt
from text3d.runtime.run_folder import new_run_name

MAX_STEPS = 20000
GUIDANCES = ("sds", "vsd")
STEP_LINE = re.compile(r"^\[(?P<what>[^\]]+)\] step (?P<step>\d+)/(?P<total>\d+)")
INTERRUPTED = 130


def default_steps() -> int:
    """The default config's ``train.steps`` (the NeRF stage's), what the form starts with."""
    return int(load_config().train.steps)


def default_stages() -> str:
    """The default config's stages, comma-separated (``nerf,texture``), what the form starts with."""
    return ",".join(load_config().stages)


@dataclass
class JobRequest:
    """What the app's form asks for (checked by :func:`check_request`)."""

    prompt: str
    guidance: str = "sds"
    steps: int = field(default_factory=default_steps)
    seed: int = 0
    stages: str = field(default_factory=default_stages)
    overrides: str = ""  # key=value, one a line or space-separated
    teacher: str | None = None


def check_request(req: JobRequest) -> JobRequest:
    """The request with its prompt normalised; one-line UserError for what the app refuses."""
    req.prompt = validate_prompt(req.prompt)
    if req.guidance not in GUIDANCES:
        raise UserError(f"guidance must be one of {', '.join(GUIDANCES)}, got {req.guidance!r}")
    try:
        req.steps, req.seed = int(req.steps), int(req.seed)
    except (TypeError, ValueError):
        raise UserError("steps and seed must be whole numbers") from None
    if not 1 <= req.steps <= MAX_STEPS:
        raise UserError(f"steps must be between 1 and {MAX_STEPS}, got {req.steps}")
    if req.seed < 0:
        raise UserError(f"the seed must be 0 or more, got {req.seed}")
    if not req.stages or not re.fullmatch(r"[a-z0-9_]+(,[a-z0-9_]+)*", req.stages):
        raise UserError(f"stages must be names separated by commas, e.g. nerf,geometry,texture; got {req.stages!r}")
    for item in override_list(req.overrides):
        if "=" not in item:
            raise UserError(f"an override must be key=value, got {item!r}")
    unknown = embedded_unknown_words(req.prompt, req.teacher)
    if unknown:
        raise UserError(f"the embedded teacher never saw the word(s) {', '.join(unknown)}; it knows 12 objects in 9 "
                        f"colours (text3d toyworld list), e.g. \"a red cube\"")
    return req


def override_list(text: str) -> list[str]:
    return [item for item in (text or "").replace("\n", " ").split(" ") if item.strip()]


def embedded_unknown_words(prompt: str, teacher: str | None) -> list[str]:
    """The words of ``prompt`` the embedded teacher never saw, each with its hint (none for other teachers)."""
    from text3d.teacher.loader import DEFAULT_TEACHER_DIR, default_teacher

    source = teacher or default_teacher()
    if source is None or Path(source).resolve() != DEFAULT_TEACHER_DIR.resolve():
        return []
    from types import SimpleNamespace

    from transformers import CLIPTokenizer

    from text3d.generate.run import unknown_words, word_hints

    shim = SimpleNamespace(source=DEFAULT_TEACHER_DIR,
                           tokenizer=CLIPTokenizer.from_pretrained(str(DEFAULT_TEACHER_DIR / "tokenizer")))
    return word_hints(shim, unknown_words(shim, prompt))


def generate_args(req: JobRequest, run_dir: Path) -> list[str]:
    """The ``text3d generate`` arguments of a new run in ``run_dir``."""
    args = ["generate", req.prompt, "--out", str(run_dir), "--guidance", req.guidance, "--steps", str(req.steps),
            "--seed", str(req.seed), "--stages", req.stages]
    if req.teacher:
        args += ["--teacher", req.teacher]
    preview = max(10, req.steps // 10)  # a preview image ten times a run
    return args + [f"train.preview_every={preview}"] + override_list(req.overrides)


def resume_args(run_dir: Path, steps: int | None = None) -> list[str]:
    args = ["generate", "--resume", str(run_dir)]
    return args + ([f"train.steps={int(steps)}"] if steps else [])


def new_run_dir(root: Path, prompt: str) -> Path:
    return Path(root) / new_run_name(prompt)


@dataclass
class JobState:
    """What the page shows of a job: the last progress line, the step, and once it ends, its exit code and
    the error line if it failed."""

    run_dir: Path
    line: str = "starting"
    step: int = 0
    total: int = 0
    returncode: int | None = None
    error: str | None = None
    lines: deque = field(default_factory=lambda: deque(maxlen=200))

    @property
    def done(self) -> bool:
        return self.returncode is not None


class Job:
    """A running ``text3d generate`` child (one at a time: the app's queue sees to that)."""

    def __init__(self, args: Sequence[str], run_dir: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1", TEXT3D_PROGRESS_INTERVAL="1")
        env.pop("TEXT3D_DEBUG", None)
        self.state = JobState(Path(run_dir))
        self.proc = subprocess.Popen([sys.executable, "-m", "text3d", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)  # a Ctrl-C in the app's terminal is not the job's
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            self.state.lines.append(line)
            match = STEP_LINE.match(line)
            if match:
                self.state.step, self.state.total = int(match["step"]), int(match["total"])
                self.state.line = line
            elif line.startswith("error: "):
                self.state.error = line[len("error: "):]
            elif not line.startswith(" "):
                self.state.line = line

    def stop(self) -> bool:
        """Ask the child to stop as Ctrl-C does (SIGINT: it saves a checkpoint, then exits 130)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            return True
        return False

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self.state.returncode = code
        return code

    def follow(self, every: float = 1.0) -> Iterator[JobState]:
        """The state every ``every`` seconds while the child runs, then once more when it has ended."""
        while self.proc.poll() is None:
            yield self.state
            time.sleep(every)
        self.wait()
        yield self.state


def latest_preview(run_dir: Path, final: bool = False) -> Path | None:
    """The newest preview image of a run (``previews/*.png``, else ``preview.png``); ``final``: ``preview.png``
    (the finished run's) first."""
    run_dir = Path(run_dir)
    if final and (run_dir / "preview.png").is_file():
        return run_dir / "preview.png"
    previews = sorted((run_dir / "previews").glob("*step_*.png"), key=lambda p: p.stat().st_mtime) \
        if (run_dir / "previews").is_dir() else []
    if previews:
        return previews[-1]
    return run_dir / "preview.png" if (run_dir / "preview.png").is_file() else None
