"""A pod's tiny HTTP server: answers on its pod IP with its pod name (GET /) and 200 on /healthz.

Run by the local kubelet as a container command; reads POD_IP and POD_NAME from the downward API.
"""

import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path in ("/", "/healthz"):
            body = os.environ["POD_NAME"].encode()
            self.send_response(200)
        else:
            body = b"not found"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1])
    print(f"serving {os.environ['POD_NAME']} on {os.environ['POD_IP']}:{port}", flush=True)
    HTTPServer((os.environ["POD_IP"], port), Handler).serve_forever()
