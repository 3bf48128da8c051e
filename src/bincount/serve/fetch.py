"""Fetching an image by URL without letting a request reach what the server can reach (no SSRF).

Every hop, the first and each redirect, is checked before any connection is made: http or https only, a
host on the allowlist, and every address the host resolves to public. The connection then goes to the
address that was checked, not to a second lookup of the name, so DNS rebinding cannot swap in another. The
whole fetch, redirects included, has one deadline and one size cap, and the answer must say it is an image.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urljoin, urlsplit

from bincount.config import ServeConfig
from bincount.errors import ConfigError
from bincount.serve.errors import RequestError

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 << 10


@dataclass(frozen=True)
class UrlPolicy:
    hosts: tuple[str, ...]
    timeout: float
    max_bytes: int
    max_redirects: int
    unsafe_addresses: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> UrlPolicy:
        return cls(tuple(h.lower().rstrip(".") for h in cfg.url_hosts), cfg.url_timeout, cfg.url_max_bytes,
                   cfg.url_max_redirects, frozenset(_address(a) for a in cfg.unsafe_url_addresses))

    def admits(self, host: str) -> bool:
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)


@dataclass(frozen=True)
class _Target:
    url: str
    https: bool
    host: str
    port: int
    address: str
    path: str


def fetch(url: str, policy: UrlPolicy, where: str) -> bytes:
    """The image bytes at `url`; `where` names the instance in error messages."""
    deadline = time.monotonic() + policy.timeout
    for _ in range(policy.max_redirects + 1):
        target = _check(url, policy, where)
        conn = _connect(target, deadline, where)
        sock = conn.sock  # http.client drops conn.sock once a response will close the connection
        try:
            response = _get(conn, sock, target, deadline, where)
            if response.status in REDIRECTS:
                location = response.getheader("location")
                if not location:
                    raise RequestError(f"{where}: {target.url} redirects nowhere (HTTP {response.status} "
                                       "without Location)", HTTPStatus.BAD_GATEWAY)
                url = urljoin(target.url, location)
                continue
            if response.status != 200:
                raise RequestError(f"{where}: {target.url} answered HTTP {response.status}", HTTPStatus.BAD_GATEWAY)
            return _read_image(sock, response, target, policy, deadline, where)
        finally:
            conn.close()
    raise RequestError(f"{where}: more than {policy.max_redirects} redirect(s) from the URL", HTTPStatus.BAD_GATEWAY)


def _check(url: str, policy: UrlPolicy, where: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise RequestError(f"{where}: {url!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise RequestError(f"{where}: only http and https URLs are fetched, not {parts.scheme or 'no'} scheme")
    if parts.username is not None or parts.password is not None:
        raise RequestError(f"{where}: URLs with credentials are refused")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise RequestError(f"{where}: the URL {url!r} has no host")
    if not policy.admits(host):
        raise RequestError(f"{where}: host {host} is not on this server's URL allowlist", HTTPStatus.FORBIDDEN)
    https = parts.scheme == "https"
    port = port or (443 if https else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise RequestError(f"{where}: cannot resolve host {host} ({e})", HTTPStatus.BAD_GATEWAY) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if (not ip.is_global or ip.is_multicast) and (str(ip), port) not in policy.unsafe_addresses:
            raise RequestError(f"{where}: host {host} resolves to {ip}, a private, loopback, link-local or "
                               "otherwise non-public address; refused", HTTPStatus.FORBIDDEN)
    path = parts.path or "/"
    return _Target(url, https, host, port, addresses[0], path + (f"?{parts.query}" if parts.query else ""))


def _remaining(deadline: float, where: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RequestError(f"{where}: fetching the URL took too long", HTTPStatus.GATEWAY_TIMEOUT)
    return left


def _connect(target: _Target, deadline: float, where: str) -> http.client.HTTPConnection:
    """A connection to the checked address; TLS verifies the certificate against the host name."""
    try:
        sock = socket.create_connection((target.address, target.port), timeout=_remaining(deadline, where))
        if target.https:
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
            except BaseException:
                sock.close()
                raise
    except TimeoutError:
        raise RequestError(f"{where}: connecting to {target.host} timed out", HTTPStatus.GATEWAY_TIMEOUT) from None
    except (ssl.SSLError, ssl.CertificateError) as e:
        raise RequestError(f"{where}: TLS with {target.host} failed ({e})", HTTPStatus.BAD_GATEWAY) from None
    except OSError as e:
        raise RequestError(f"{where}: cannot connect to {target.host} ({e.strerror or e})",
                           HTTPStatus.BAD_GATEWAY) from None
    conn = http.client.HTTPConnection(target.host, target.port)
    conn.sock = sock
    return conn


def _get(conn: http.client.HTTPConnection, sock: socket.socket, target: _Target, deadline: float, where: str):
    try:
        sock.settimeout(_remaining(deadline, where))
        conn.request("GET", target.path, headers={"Accept": "image/*", "Accept-Encoding": "identity",
                                                  "User-Agent": "bincount-serve"})
        return conn.getresponse()
    except TimeoutError:
        raise RequestError(f"{where}: {target.host} did not answer in time", HTTPStatus.GATEWAY_TIMEOUT) from None
    except (OSError, http.client.HTTPException) as e:
        raise RequestError(f"{where}: {target.host} gave no valid HTTP answer ({e})", HTTPStatus.BAD_GATEWAY) from None


def _read_image(sock: socket.socket, response: http.client.HTTPResponse, target: _Target,
                policy: UrlPolicy, deadline: float, where: str) -> bytes:
    content_type = (response.getheader("content-type") or "").split(";")[0].strip().lower()
    if not content_type.startswith("image/"):
        raise RequestError(f"{where}: {target.url} is {content_type or 'of no content type'}, not an image",
                           HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    too_big = RequestError(f"{where}: {target.url} is larger than this server's limit of {policy.max_bytes} bytes",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    length = response.getheader("content-length")
    if length and length.isdigit() and int(length) > policy.max_bytes:
        raise too_big
    chunks, size = [], 0
    try:
        while True:
            sock.settimeout(_remaining(deadline, where))
            chunk = response.read1(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise too_big
            chunks.append(chunk)
    except TimeoutError:
        raise RequestError(f"{where}: reading {target.url} took too long", HTTPStatus.GATEWAY_TIMEOUT) from None
    except (OSError, http.client.HTTPException) as e:
        raise RequestError(f"{where}: reading {target.url} failed ({e})", HTTPStatus.BAD_GATEWAY) from None
    return b"".join(chunks)


def _address(text: str) -> tuple[str, int]:
    """`IP:PORT` or `[IPv6]:PORT` → (ip, port)."""
    host, sep, port = text.strip().rpartition(":")
    try:
        if not sep:
            raise ValueError("no port")
        return str(ipaddress.ip_address(host.strip("[]"))), int(port)
    except ValueError:
        raise ConfigError(f"unsafe_url_addresses: {text!r} is not IP:PORT") from None
