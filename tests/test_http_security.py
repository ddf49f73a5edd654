"""TLS, mTLS and basic auth on the metrics endpoint, with real TLS clients and certificates
generated here; web-config validation; listen-address parsing."""
from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402
from prometheus_client import CollectorRegistry, Counter  # noqa: E402

from wattmeter.errors import UsageError  # noqa: E402
from wattmeter.exporters.http import MetricsServer, ListenAddress, parse_listen  # noqa: E402
from wattmeter.exporters.webconfig import load_web_config  # noqa: E402


# -- certificates -------------------------------------------------------------------------------
@dataclass
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_cert: Path       # a client certificate from a CA the server does not trust
    other_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: str, issuer_key, *, ca: bool = False, sans=(), client=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = _key(), _key()
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    srv_key, cli_key, oth_key = _key(), _key(), _key()
    srv = _cert("localhost", srv_key, "test-ca", ca_key,
                sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cli = _cert("prometheus", cli_key, "test-ca", ca_key, sans=[x509.DNSName("prometheus.example")], client=True)
    oth = _cert("intruder", oth_key, "other-ca", other_ca_key, client=True)
    return Pki(d, _write(d / "ca.crt", ca), _write(d / "server.crt", srv), _write(d / "server.key", key=srv_key),
               _write(d / "client.crt", cli), _write(d / "client.key", key=cli_key),
               _write(d / "other.crt", oth), _write(d / "other.key", key=oth_key))


# -- helpers --------------------------------------------------------------------------------------
def _registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("wattmeter_test_energy_joules", "test", registry=reg).inc(42)
    return reg


def _serve(tmp_path: Path, yaml_text: str | None, health=None) -> MetricsServer:
    web = None
    if yaml_text is not None:
        cfg = tmp_path / "web-config.yml"
        cfg.write_text(yaml_text)
        web = load_web_config(str(cfg))
    return MetricsServer(_registry(), ListenAddress("127.0.0.1", 0), web, health=health).start()


def _client_ctx(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _get(port: int, path: str = "/metrics", ctx: ssl.SSLContext | None = None,
         auth: tuple[str, str] | None = None) -> tuple[int, dict, bytes]:
    conn = (http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10) if ctx
            else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _hash(password: str) -> str:
    import bcrypt
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")


TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"


def _copy_pki(pki: Pki, dest: Path) -> None:
    for p in pki.dir.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())


# -- TLS, mTLS, basic auth -------------------------------------------------------------------------
def test_tls_scrape_with_a_real_tls_client(pki: Pki, tmp_path: Path) -> None:
    _copy_pki(pki, tmp_path)
    srv = _serve(tmp_path, TLS + "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    try:
        status, headers, body = _get(srv.port, ctx=_client_ctx(pki))
        assert status == 200 and b"wattmeter_test_energy_joules_total 42.0" in body
        assert headers.get("X-Frame-Options") == "deny"
        assert srv.url.startswith("https://")
        with pytest.raises(ssl.SSLError):       # a client that does not trust the server's CA
            _get(srv.port, ctx=ssl.create_default_context())
    finally:
        srv.stop()


def test_basic_auth_wrong_password_gets_401(pki: Pki, tmp_path: Path) -> None:
    _copy_pki(pki, tmp_path)
    srv = _serve(tmp_path, TLS + f"basic_auth_users:\n  prometheus: '{_hash('s3cret')}'\n")
    ctx = _client_ctx(pki)
    try:
        assert _get(srv.port, ctx=ctx, auth=("prometheus", "s3cret"))[0] == 200
        assert _get(srv.port, ctx=ctx, auth=("prometheus", "s3cret"))[0] == 200     # cached path
        status, headers, _ = _get(srv.port, ctx=ctx, auth=("prometheus", "wrong"))
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert _get(srv.port, ctx=ctx, auth=("nobody", "s3cret"))[0] == 401
        assert _get(srv.port, ctx=ctx)[0] == 401
        assert _get(srv.port, "/healthz", ctx=ctx)[0] == 401      # every path is behind auth
    finally:
        srv.stop()


def test_basic_auth_without_tls(tmp_path: Path) -> None:
    srv = _serve(tmp_path, f"basic_auth_users:\n  alice: '{_hash('pw')}'\n")
    try:
        assert _get(srv.port, auth=("alice", "pw"))[0] == 200
        assert _get(srv.port, auth=("alice", "nope"))[0] == 401
    finally:
        srv.stop()


def _mtls(pki: Pki, tmp_path: Path, extra: str = "") -> MetricsServer:
    _copy_pki(pki, tmp_path)
    return _serve(tmp_path, TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
                  + extra)


def _handshake_refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True when the server refuses: TLS 1.3 reports a rejected client cert on the first read."""
    try:
        status, _, _ = _get(port, ctx=ctx)
    except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected, OSError):
        return True
    return status not in (200,)


def test_mtls_requires_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    srv = _mtls(pki, tmp_path)
    try:
        assert _get(srv.port, ctx=_client_ctx(pki, pki.client_cert, pki.client_key))[0] == 200
        assert _handshake_refused(srv.port, _client_ctx(pki))                               # no certificate
        assert _handshake_refused(srv.port, _client_ctx(pki, pki.other_cert, pki.other_key))  # untrusted CA
        # The server survives refused handshakes.
        assert _get(srv.port, ctx=_client_ctx(pki, pki.client_cert, pki.client_key))[0] == 200
    finally:
        srv.stop()


def test_mtls_handshake_fails_at_tls12_without_client_cert(pki: Pki, tmp_path: Path) -> None:
    srv = _mtls(pki, tmp_path)
    ctx = _client_ctx(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2     # at TLS 1.2 the handshake itself must fail
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                ctx.wrap_socket(raw, server_hostname="localhost")
    finally:
        srv.stop()


def test_mtls_allowed_sans(pki: Pki, tmp_path: Path) -> None:
    srv = _mtls(pki, tmp_path, "  client_allowed_sans: [other.example]\n")
    try:
        assert _handshake_refused(srv.port, _client_ctx(pki, pki.client_cert, pki.client_key))
    finally:
        srv.stop()


# -- endpoints -----------------------------------------------------------------------------------
def test_healthz_and_unknown_paths(tmp_path: Path) -> None:
    state = {"ok": True}
    srv = _serve(tmp_path, None, health=lambda: (state["ok"], "ok" if state["ok"] else "sampler stopped"))
    try:
        assert _get(srv.port, "/healthz")[0] == 200
        state["ok"] = False
        status, _, body = _get(srv.port, "/healthz")
        assert status == 503 and b"sampler stopped" in body
        assert _get(srv.port, "/nope")[0] == 404
        assert _get(srv.port, "/")[0] == 200
    finally:
        srv.stop()


def test_port_in_use_is_a_one_line_usage_error(tmp_path: Path) -> None:
    srv = _serve(tmp_path, None)
    try:
        with pytest.raises(UsageError, match=r"already in use.*--listen"):
            MetricsServer(_registry(), ListenAddress("127.0.0.1", srv.port)).start()
    finally:
        srv.stop()


# -- web-config validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ("tls_server_config:\n  cert_file: server.crt\n", "cert_file and key_file"),
    (TLS + "  client_auth_type: Sometimes\n", "client_auth_type"),
    (TLS + "  client_auth_type: RequireAndVerifyClientCert\n", "client_ca_file"),
    (TLS + "  min_version: SSL3\n", "min_version"),
    ("tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n", "missing.crt"),
    ("tls_server_config:\n  cert_file: server.key\n  key_file: server.crt\n", "cannot load"),
    ("basic_auth_users:\n  alice: hunter2\n", "bcrypt hash"),
    ("basic_auth_users:\n  alice: '$2b$12$" + "x" * 53 + "'\n", "not a valid bcrypt hash"),
    ("basic_auth_user:\n  alice: x\n", "unknown key 'basic_auth_user'"),
    ("tls_server_config: [1, 2]\n", "expected a mapping"),
    ("tls_server_config:\n  cert_file: [unclosed\n", "not valid YAML"),
    (TLS + "  min_version: TLS13\n  max_version: TLS12\n", "above max_version TLS12"),
    ('http_server_config:\n  headers:\n    X-Test: "a\\nSet-Cookie: evil=1"\n', "CR, LF or NUL"),
    ('http_server_config:\n  headers:\n    "X Bad": "v"\n', "not a valid header name"),
])
def test_invalid_web_config_is_refused_with_a_clear_error(pki: Pki, tmp_path: Path, text: str, match: str) -> None:
    _copy_pki(pki, tmp_path)
    cfg = tmp_path / "web.yml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=match) as info:
        load_web_config(str(cfg))
    assert "\n" not in str(info.value) and "--web-config" in str(info.value)


def test_unreadable_web_config(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        load_web_config(str(tmp_path / "absent.yml"))


def test_basic_auth_without_bcrypt_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "web.yml"
    cfg.write_text(f"basic_auth_users:\n  alice: '{_hash('pw')}'\n")
    monkeypatch.setitem(sys.modules, "bcrypt", None)    # import bcrypt -> ImportError
    with pytest.raises(UsageError, match=r"bcrypt.*pip install"):
        load_web_config(str(cfg))


def test_empty_web_config_means_plain_http(tmp_path: Path) -> None:
    cfg = tmp_path / "web.yml"
    cfg.write_text("")
    web = load_web_config(str(cfg))
    assert web.tls is None and not web.users


# -- listen addresses ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, host, port", [
    ("9445", "127.0.0.1", 9445), ("127.0.0.1:9000", "127.0.0.1", 9000),
    ("0.0.0.0:9445", "0.0.0.0", 9445), ("[::1]:9445", "::1", 9445), ("localhost:9445", "localhost", 9445),
    ("[::]:9445", "::", 9445), (":9445", "", 9445),
])
def test_listen_forms(text: str, host: str, port: int) -> None:
    assert parse_listen(text) == ListenAddress(host, port)


@pytest.mark.parametrize("text", ["http://0.0.0.0:9445", "host:port", "127.0.0.1:99999", "[zz]:1", "a b:1",
                                  "localhost", "", "::1:9445", "[::1]", "0.0.0.0:-1"])
def test_unknown_listen_forms_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="--listen"):
        parse_listen(text)


def test_default_address_is_loopback() -> None:
    assert parse_listen("9445").loopback and not parse_listen(":9445").loopback


def test_web_config_works_without_pyyaml(pki: Pki, tmp_path: Path, monkeypatch) -> None:
    """The image installs wattmeter[auth] without PyYAML: the built-in reader must do."""
    _copy_pki(pki, tmp_path)
    monkeypatch.setitem(sys.modules, "yaml", None)
    srv = _serve(tmp_path, TLS + "  client_allowed_sans: [prometheus.example]   # comment\n"
                 "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: 'ca.crt'\n"
                 f"basic_auth_users:\n  prometheus: \"{_hash('pw')}\"\n")
    try:
        ctx = _client_ctx(pki, pki.client_cert, pki.client_key)
        assert _get(srv.port, ctx=ctx, auth=("prometheus", "pw"))[0] == 200
        assert _get(srv.port, ctx=ctx, auth=("prometheus", "no"))[0] == 401
    finally:
        srv.stop()
    bad = tmp_path / "bad.yml"
    bad.write_text("tls_server_config: &anchor\n  cert_file: x\n")
    with pytest.raises(UsageError, match="pip install pyyaml"):
        load_web_config(str(bad))


def test_builtin_yaml_reader_agrees_with_pyyaml_on_the_deploy_example() -> None:
    yaml = pytest.importorskip("yaml")
    from wattmeter.exporters.webconfig import mini_yaml
    example = Path(__file__).parent.parent / "deploy" / "web-config.example.yml"
    if not example.exists():
        pytest.skip("deploy/web-config.example.yml not present")
    text = example.read_text()
    assert mini_yaml(text) == yaml.safe_load(text)


@pytest.mark.parametrize("listen, client_hosts", [
    (":0", ["127.0.0.1", "::1"]),        # dual-stack: both families reach it
    ("[::]:0", ["127.0.0.1", "::1"]),
    ("0.0.0.0:0", ["127.0.0.1"]),
])
def test_wildcard_listen_serves_the_families_it_names(listen: str, client_hosts: list) -> None:
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    try:
        srv = MetricsServer(_registry(), parse_listen(listen), None).start()
    except UsageError as exc:
        pytest.skip(f"no IPv6 on this kernel: {exc}")
    try:
        for host in client_hosts:
            try:
                conn = http.client.HTTPConnection(host, srv.port, timeout=5)
                conn.request("GET", "/metrics")
            except OSError as exc:
                if host == "::1":
                    pytest.skip(f"no IPv6 loopback here: {exc}")
                raise
            resp = conn.getresponse()
            assert resp.status == 200 and b"wattmeter_test_energy_joules_total 42.0" in resp.read()
            conn.close()
    finally:
        srv.stop()


def test_bad_listen_is_one_line_exit_2_from_serve(tmp_path: Path) -> None:
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "wattmeter", "serve", "--listen", "::1:9445"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--listen '::1:9445'" in lines[0] and "[::]:9445" in lines[0]
    assert "Traceback" not in proc.stderr


# -- hardening (issue 8): deadlines, connection cap, bodies ----------------------------------------------
def _raw(port: int, data: bytes, read_s: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except TimeoutError:
            pass
    return out


def _http_counts(srv: MetricsServer) -> dict:
    return dict(srv.health()[0].errors)


def test_slow_drip_client_is_cut_off_at_the_request_deadline_and_counted() -> None:
    import time
    srv = MetricsServer(_registry(), ListenAddress("127.0.0.1", 0), read_timeout_s=1.0).start()
    try:
        assert _http_counts(srv)["read_timeout"] == 0     # exported from 0, before any failure
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        t0 = time.monotonic()
        closed = False
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":     # a byte every 0.2 s: each recv is quick
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            if time.monotonic() - t0 > 4:
                break
        if not closed:
            s.settimeout(3)
            try:
                closed = s.recv(1024) == b""     # the server hung up without a reply
            except OSError:
                closed = True
        s.close()
        assert closed and time.monotonic() - t0 < 5
        assert _http_counts(srv)["read_timeout"] == 1
        assert _get(srv.port)[0] == 200      # other scrapers are unaffected
    finally:
        srv.stop()


def test_connections_past_the_cap_are_closed_and_counted() -> None:
    srv = MetricsServer(_registry(), ListenAddress("127.0.0.1", 0), max_connections=2, read_timeout_s=5.0).start()
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(2)]
    try:
        import time
        time.sleep(0.3)      # both accepted and holding a handler thread
        extra = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        assert extra.recv(1024) == b""      # closed at once, not queued behind the idle ones
        extra.close()
        assert _http_counts(srv)["connection_limit"] == 1
        for s in idle:
            s.close()
        time.sleep(0.3)
        assert _get(srv.port)[0] == 200
    finally:
        for s in idle:
            s.close()
        srv.stop()


def test_a_get_body_is_dropped_never_parsed_as_a_second_request() -> None:
    srv = _serve(Path("."), None)
    try:
        smuggled = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        req = (b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
               + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
        reply = _raw(srv.port, req)
        assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 200")
        assert b"404" not in reply.split(b"\r\n", 1)[0]
    finally:
        srv.stop()


@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: 10000000\r\n", b"413"),
    (b"Transfer-Encoding: chunked\r\n", b"411"),
    (b"Content-Length: ten\r\n", b"400"),
])
def test_bodies_that_cannot_be_dropped_are_refused(headers: bytes, status: bytes) -> None:
    srv = _serve(Path("."), None)
    try:
        reply = _raw(srv.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n0\r\n\r\n")
        assert reply.split(b"\r\n", 1)[0] == b"HTTP/1.1 " + status + reply.split(b"\r\n", 1)[0][12:]
        assert reply.count(b"HTTP/1.1 ") == 1
        if status == b"413":
            assert _http_counts(srv)["body_too_large"] == 1
    finally:
        srv.stop()


def test_unknown_user_pays_a_bcrypt_check_of_the_users_cost(monkeypatch) -> None:
    import bcrypt
    from wattmeter.exporters.webconfig import BasicAuth, bcrypt_cost
    known = bcrypt.hashpw(b"pw", bcrypt.gensalt(6))
    auth = BasicAuth({"alice": known})
    seen: list = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda pw, h: (seen.append(h), real(pw, h))[1])
    header = "Basic " + base64.b64encode(b"mallory:pw").decode()
    assert auth.check(header) is False
    assert len(seen) == 1 and bcrypt_cost(seen[0]) == 6     # same cost as alice's hash: same time
    assert auth.check("Basic " + base64.b64encode(b"alice:pw").decode()) is True
