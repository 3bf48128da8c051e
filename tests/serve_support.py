"""Helpers of the serving tests: photos, a small exported model, HTTP servers on 127.0.0.1 to fetch from,
and a trap that counts every connection made to it (a refused fetch must make none)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from bincount.model.exported import ExportedModel, Inference, Preprocessing
from bincount.model.zoo import IMAGENET_MEAN, IMAGENET_STD, build_model, head
from bincount.store import open_store

CLASSES = [1, 2, 3, 4, 5]
INPUT_SIZE = 64


def drawn_jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A photo-like JPEG that needs no shared data: boxes on a shelf."""
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", size, (200, 190, 170))
    draw = ImageDraw.Draw(image)
    for _ in range(1 + seed % 5):
        x, y = (int(v) for v in torch.randint(0, size[0] - 60, (2,), generator=g))
        colour = tuple(int(v) for v in torch.randint(0, 255, (3,), generator=g))
        draw.rectangle([x, y % (size[1] - 60), x + 50, y % (size[1] - 60) + 50], fill=colour)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def real_photos(sample: Path, per_class: int) -> list[tuple[bytes, int]]:
    """(JPEG bytes, item count) pairs from the ABID sample, `per_class` of each count, in key order."""
    out: list[tuple[bytes, int]] = []
    taken = {c: 0 for c in CLASSES}
    for meta in sorted((sample / "metadata").glob("*.json")):
        label = json.loads(meta.read_text()).get("EXPECTED_QUANTITY")
        if label in taken and taken[label] < per_class:
            taken[label] += 1
            out.append(((sample / "bin-images" / f"{meta.stem}.jpg").read_bytes(), label))
    return out


def export_model(root: str | Path, photos: list[tuple[bytes, int]], inference: Inference = Inference()) -> str:
    """resnet18 at INPUT_SIZE px with its head trained on `photos` (so its answers are decisive, not
    coin flips), exported as model.pt + model.json the way the trainer exports, under `root` (a directory or
    store URI); returns where."""
    torch.manual_seed(0)
    model, _ = build_model("resnet18", len(CLASSES), "none")
    model.eval()
    preprocessing = Preprocessing(INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    if photos:
        x = preprocessing.normalize(torch.stack([preprocessing.read(data) for data, _ in photos]), torch.device("cpu"))
        fc = head(model)
        model.fc = torch.nn.Identity()
        with torch.no_grad():
            features = model(x)
        model.fc = fc
        # The head fitted by least squares to logits of +8 for each photo's count and 0 for the others.
        targets = 8 * torch.nn.functional.one_hot(torch.tensor([CLASSES.index(c) for _, c in photos]), len(CLASSES))
        ones = torch.ones(len(photos), 1)
        solution = torch.linalg.lstsq(torch.cat([features, ones], 1), targets.float(), driver="gelsd").solution
        with torch.no_grad():
            fc.weight.copy_(solution[:-1].T)
            fc.bias.copy_(solution[-1])
    ExportedModel(model, "resnet18", CLASSES, preprocessing, inference,
                  {"best_epoch": 1, "metrics": {}, "config": {}}).save(open_store(str(root)), "models/test")
    return f"{root}/models/test"


def jpeg_claiming(data: bytes, width: int, height: int) -> bytes:
    """`data`, a JPEG, with its frame header (SOF) patched to claim `width` × `height`: the data stays as short as
    it was, end marker and all."""
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return data[:i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[i + 9:]


def listening_addresses(port: int) -> set[str]:
    """The addresses that TCP sockets listening on `port` are bound to, from Linux's /proc/net tables."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:          # 0A: LISTEN
                raw = bytes.fromhex(address)                        # 32-bit words in the host's (little) byte order
                found.add(socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


def png_of_size(width: int, height: int) -> bytes:
    """A few-KB PNG whose header claims width × height pixels: what a decompression bomb looks like."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG", optimize=True)
    return out.getvalue()


class ImageServer:
    """HTTP on 127.0.0.1: /photo.jpg, /page.html (not an image), /big.jpg (over any small cap), /slow.jpg
    (answers after `slow_s`), /redirect (→ /photo.jpg) and /redirect-to?url=U (→ U)."""

    def __init__(self, photo: bytes, big_bytes: int = 3 << 20, slow_s: float = 3.0):
        self.photo, self.big_bytes, self.slow_s = photo, big_bytes, slow_s
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.paths.append(self.path)
                path, _, query = self.path.partition("?")
                if path == "/photo.jpg":
                    self._send(200, "image/jpeg", server.photo)
                elif path == "/page.html":
                    self._send(200, "text/html", b"<html>not an image</html>")
                elif path == "/big.jpg":
                    self._send(200, "image/jpeg", b"\xff" * server.big_bytes)
                elif path == "/slow.jpg":
                    time.sleep(server.slow_s)
                    self._send(200, "image/jpeg", server.photo)
                elif path == "/redirect":
                    self._redirect("/photo.jpg")
                elif path == "/redirect-to":
                    self._redirect(query.removeprefix("url="))
                else:
                    self._send(404, "text/plain", b"not found")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class Trap:
    """A listening socket on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture(scope="module")
def trap():
    """A Trap per test module."""
    t = Trap()
    yield t
    t.close()
