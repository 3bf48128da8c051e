"""Fetching images by URL: refused before any connection for non-public addresses (after DNS resolution, on
every redirect), allowed for an allowlisted server; the size cap, deadline and content-type check hold.

Every address below that is not 127.0.0.1 is refused by the check itself: `socket.create_connection` is
spied on, so a test fails if a connection to anything but the loopback test servers were even attempted.
"""

from __future__ import annotations

import socket
import time

import pytest
from serve_support import ImageServer, drawn_jpeg

from bincount.config import ServeConfig
from bincount.errors import ConfigError
from bincount.serve.errors import RequestError
from bincount.serve.fetch import UrlPolicy, fetch

PHOTO = drawn_jpeg(1)


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer(PHOTO, big_bytes=300_000, slow_s=2.0)
    yield server
    server.close()


@pytest.fixture
def connections(monkeypatch) -> list[tuple[str, int]]:
    """Every address a fetch connects to; anything but 127.0.0.1 fails the test before it is reached."""
    made: list[tuple[str, int]] = []
    real = socket.create_connection

    def spy(address, *args, **kwargs):
        made.append(address)
        assert address[0] == "127.0.0.1", f"a fetch tried to connect to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return made


def policy(image_server: ImageServer, **overrides) -> UrlPolicy:
    cfg = ServeConfig(model="unused", url_hosts=["127.0.0.1", "localhost", "10.0.0.1", "169.254.169.254",
                                                 "2130706433", "::1", "::ffff:127.0.0.1", "0.0.0.0",
                                                 "*.example.com"],
                      unsafe_url_addresses=[f"127.0.0.1:{image_server.port}"], url_max_bytes=100_000,
                      url_timeout=1.0, url_max_redirects=2)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return UrlPolicy.from_config(cfg)


def refused(url: str, p: UrlPolicy) -> RequestError:
    with pytest.raises(RequestError) as e:
        fetch(url, p, "instances[0]")
    return e.value


def test_allowlisted_server_is_fetched(image_server, connections):
    assert fetch(f"{image_server.base}/photo.jpg", policy(image_server), "x") == PHOTO
    assert connections == [("127.0.0.1", image_server.port)]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0"])
def test_loopback_refused_before_connecting(host, image_server, trap, connections):
    error = refused(f"http://{host}:{trap.port}/photo.jpg", policy(image_server))
    assert error.status == 403
    assert "non-public address; refused" in error.reason and error.reason.startswith("instances[0]: ")
    assert connections == [] and trap.connections == 0


@pytest.mark.parametrize("url", ["http://10.0.0.1/bin.jpg", "http://169.254.169.254/latest/meta-data/",
                                 "https://10.0.0.1:8443/bin.jpg"])
def test_private_and_link_local_refused_before_connecting(url, image_server, connections):
    error = refused(url, policy(image_server))
    assert error.status == 403 and "non-public address" in error.reason
    assert connections == []


def test_redirects_are_checked_again(image_server, trap, connections):
    p = policy(image_server)
    assert fetch(f"{image_server.base}/redirect", p, "x") == PHOTO
    for target in (f"http://127.0.0.1:{trap.port}/x", "http://169.254.169.254/latest/meta-data/",
                   "http://not-allowed.test/x.jpg", "file:///etc/passwd"):
        error = refused(f"{image_server.base}/redirect-to?url={target}", p)
        assert error.status in (400, 403), error.reason
    assert trap.connections == 0
    assert {address for address in connections} == {("127.0.0.1", image_server.port)}


def test_too_many_redirects(image_server, connections):
    loop = f"{image_server.base}/redirect-to?url=/redirect-to?url=/redirect-to?url=/photo.jpg"
    error = refused(loop, policy(image_server))
    assert error.status == 502 and "more than 2 redirect" in error.reason


def test_allowlist_scheme_and_credentials(image_server, connections):
    p = policy(image_server)
    cases = {"http://example.com/bin.jpg": (403, "not on this server's URL allowlist"),
             "http://evil.test/bin.jpg": (403, "allowlist"),
             "ftp://127.0.0.1/bin.jpg": (400, "only http and https"),
             "file:///etc/passwd": (400, "only http and https"),
             "bin.jpg": (400, "only http and https"),
             f"http://user:secret@127.0.0.1:{image_server.port}/photo.jpg": (400, "credentials"),
             "http://127.0.0.1:99999/x": (400, "not a valid URL")}
    for url, (status, words) in cases.items():
        error = refused(url, p)
        assert (error.status, words in error.reason) == (status, True), (url, error.reason)
    assert connections == []
    assert p.admits("img.example.com") and not p.admits("example.com.evil.test")


def test_content_type_size_and_deadline(image_server, connections):
    p = policy(image_server)
    assert refused(f"{image_server.base}/page.html", p).status == 415
    assert refused(f"{image_server.base}/big.jpg", p).status == 413
    assert refused(f"{image_server.base}/missing.jpg", p).status == 502
    start = time.monotonic()
    error = refused(f"{image_server.base}/slow.jpg", p)
    assert error.status == 504 and time.monotonic() - start < 1.8


def test_unsafe_exemption_is_exact_and_validated(image_server, trap, connections):
    p = policy(image_server)
    assert refused(f"http://localhost:{trap.port}/photo.jpg", p).status == 403
    assert refused(f"http://127.0.0.1:{trap.port}/photo.jpg", p).status == 403
    assert trap.connections == 0
    with pytest.raises(ConfigError, match="not IP:PORT"):
        policy(image_server, unsafe_url_addresses=["localhost"])


def test_url_fetching_is_off_by_default():
    assert ServeConfig(model="m").url_hosts == []
