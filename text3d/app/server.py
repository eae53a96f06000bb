"""``text3d app``: launch the Gradio page on this machine, with nothing loaded from outside it (no analytics, no
share link, no server-side rendering, the theme's fonts served locally or taken from the system)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from text3d.errors import UserError

# set before gradio is imported: it reads them at import time
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SSR_MODE": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
               "GRADIO_DO_NOT_TRACK": "1"}


def _check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will (TIME_WAIT is not busy)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} is in use; choose another with --port") from None
            raise UserError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None


def import_gradio():
    """Gradio, with the offline settings; a one-line UserError when the optional extra is not installed."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import gradio
    except ImportError:
        raise UserError('text3d app needs Gradio: pip install -e ".[app]"') from None
    return gradio


def start(teacher: str | None, port: int, host: str, out: Path, block: bool = True, inbrowser: bool = False):
    """Build and launch the app; returns (demo, holder). ``block`` False returns while it serves."""
    gr = import_gradio()
    from text3d.app.ui import JobHolder, build_app, file_url
    from text3d.report.page import VIEWER_JS
    from text3d.runtime.resources import ASSETS_DIR

    if teacher is not None and (os.sep in teacher or teacher.startswith(".")) and not Path(teacher).is_dir():
        raise UserError(f"teacher folder {teacher} does not exist")
    _check_port(host, port)
    out = Path(out).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    holder = JobHolder()
    demo = build_app(teacher, out, holder)
    demo.queue(default_concurrency_limit=1, max_size=32)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    web = ASSETS_DIR / "web"  # model-viewer for the result, as on the run page
    head = f'<script type="module" src="{file_url(web / VIEWER_JS)}"></script>'
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=inbrowser,
                quiet=True, show_error=True, allowed_paths=[str(out), str(web)], head=head, prevent_thread_lock=not block, theme=theme,
                mcp_server=False, pwa=False, enable_monitoring=False, footer_links=["api"])
    return demo, holder


def launch(teacher: str | None, port: int, host: str, out: Path, echo=print) -> None:
    """``text3d app``: serve until Ctrl-C, which also stops a running job (its checkpoint is kept)."""
    from text3d.report.server import can_open_browser

    demo, holder = start(teacher, port, host, out, block=False, inbrowser=can_open_browser())
    echo(f"text3d app at http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/ (Ctrl-C to stop); "
         f"runs in {Path(out).expanduser()}")
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        job = holder.job
        if holder.stop():  # the running job saves its checkpoint, as after Ctrl-C on the command line
            echo(f"stopping the running job; resume it with: text3d generate --resume {job.state.run_dir}")
            job.wait(120)
        demo.close()
