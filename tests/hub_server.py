"""A stand-in for the Hugging Face Hub's file-resolve endpoint, served on 127.0.0.1 by the
tests (HF_ENDPOINT points huggingface_hub at it): no test touches the network.

    with FakeHub({"user/model": {"config.json": b"...", "model.safetensors": b"..."}}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url

It answers HEAD and GET of /<user>/<name>/resolve/<revision>/<file> as the Hub does: the
file with its ETag, commit and size headers, or 404 with the Hub's X-Error-Code
(RepoNotFound, RevisionNotFound, EntryNotFound). `requests` records every path asked for.
"""
import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?:models/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")


class FakeHub:
    def __init__(self, repos):
        self.repos = repos  # repo id -> {file name: bytes}
        self.requests = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body):
                hub.requests.append((self.command, self.path))
                match = RESOLVE.match(self.path.split("?")[0])
                if match is None:
                    return self.error(404, "RepoNotFound", "no such endpoint")
                files = hub.repos.get(match["repo"])
                if files is None:
                    return self.error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
                if match["revision"] not in ("main", COMMIT):
                    return self.error(404, "RevisionNotFound", f"Invalid rev id: {match['revision']}")
                data = files.get(match["file"])
                if data is None:
                    return self.error(404, "EntryNotFound", f"Entry Not Found for url: {self.path}")
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def error(self, status, code, message):
                payload = ('{"error": "%s"}' % message).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
