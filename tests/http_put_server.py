"""`python -m http.server` that also takes PUT: what a plain HTTP store for checkpoints is (nginx's
dav module, a WebDAV share). A PUT body, whole (Content-Length) or chunked, lands under a
temporary name and is renamed into place. It deletes nothing, as many such servers do not.

    python -m tests.http_put_server PORT DIRECTORY
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(SimpleHTTPRequestHandler):
    def do_PUT(self) -> None:
        target = Path(self.translate_path(self.path))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent)
        with os.fdopen(fd, "wb") as out:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    out.write(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
            else:
                out.write(self.rfile.read(int(self.headers["Content-Length"])))
        os.replace(tmp, target)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()


def main(port: str, directory: str) -> None:
    handler = functools.partial(Handler, directory=directory)
    ThreadingHTTPServer(("127.0.0.1", int(port)), handler).serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:])
