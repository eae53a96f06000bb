"""``text3d view``: serve a run folder on localhost (a browser will not load a ``.glb`` from ``file://``).

Only 127.0.0.1 is bound; the folder's files are served as they are (``.glb`` as ``model/gltf-binary``). A browser
is opened only where one can show the page (a desktop session); a missing folder or a busy port is one line.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from text3d.errors import UserError
from text3d.report.page import PAGE_NAME, write_run_page

HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".glb": "model/gltf-binary",
                      ".js": "text/javascript", ".mp4": "video/mp4", ".jsonl": "application/json"}

    def log_message(self, format, *args):  # quiet: the command prints the address, not every request
        pass

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")  # a run in progress rewrites its files
        super().end_headers()


def make_server(run_dir: Path, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """An HTTP server for ``run_dir`` on 127.0.0.1:``port`` (0: any free port), not yet serving. Writes the run
    page first when the folder has none. One-line UserError for a missing folder or a busy port."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    if not (run_dir / PAGE_NAME).is_file():
        write_run_page(run_dir)
    handler = functools.partial(_Handler, directory=str(run_dir.resolve()))
    try:
        return ThreadingHTTPServer((HOST, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} is in use; choose another with --port") from None
        raise UserError(f"cannot serve on {HOST}:{port}: {exc.strerror or exc}") from None


def address(server: ThreadingHTTPServer) -> str:
    return f"http://{HOST}:{server.server_address[1]}/"


def can_open_browser() -> bool:
    """A browser can show a page here: macOS or Windows, or a Linux/BSD desktop session (X11 or Wayland)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve(run_dir: Path, port: int = DEFAULT_PORT, open_browser: bool = True, echo=print) -> None:
    """Serve ``run_dir`` until Ctrl-C; prints the address and opens a browser when one is there."""
    server = make_server(run_dir, port)
    url = address(server)
    echo(f"serving {run_dir} at {url} (Ctrl-C to stop)")
    if open_browser and can_open_browser():
        import webbrowser

        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
