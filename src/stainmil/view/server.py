"""Serving the viewer: a socket on the first free port from the one asked for, uvicorn, the browser opened."""

from __future__ import annotations

import errno
import socket
import threading
import webbrowser
from pathlib import Path

from stainmil.errors import ConfigError
from stainmil.view.app import create_app
from stainmil.view.catalog import Catalog

PORT_TRIES = 50


def bind_socket(host: str, port: int, tries: int = PORT_TRIES) -> socket.socket:
    """A listening TCP socket on ``host``: ``port`` if free, else the next free one (at most ``tries`` ports)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in range(port, port + tries):
        # proto given: asyncio sets TCP_NODELAY only on sockets that say they are TCP (else keep-alive responses
        # wait ~40 ms on Nagle's algorithm and the browser's delayed ACK)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free again
        try:
            sock.bind((host, candidate))
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise ConfigError(f"cannot listen on {host}:{candidate} ({exc.strerror}); pass another --host.") from exc
        sock.listen(128)
        sock.set_inheritable(True)
        return sock
    raise ConfigError(f"ports {port}–{port + tries - 1} on {host} are all in use; pass another --port.")


class ViewerServer:
    """The viewer app on a bound socket; :meth:`run` blocks, :meth:`start`/:meth:`stop` run it in a thread."""
    def __init__(self, folder: str | Path, host: str = "127.0.0.1", port: int = 8765,
                 slides_dir: str | Path | None = None, review: str | None = None) -> None:
        import uvicorn

        self.catalog = Catalog(folder, slides_dir=slides_dir)
        self.app = create_app(self.catalog, review=review)
        self.review = self.app.state.review   # the ReviewDesk with --review, else None
        self.socket = bind_socket(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=2))
        self._thread: threading.Thread | None = None
        threading.Thread(target=self.catalog.warm, daemon=True).start()  # the first page without the imports' wait

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run(self, open_browser: bool = False) -> None:
        if open_browser:
            threading.Timer(0.8, webbrowser.open, args=(self.url,)).start()
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.close()

    def start(self) -> ViewerServer:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            self._thread.join(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.close()

    def close(self) -> None:
        self.socket.close()
        self.catalog.handles.close()

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
