"""The exporter-toolkit ``web-config.yml`` (the format of node_exporter and dcgm-exporter):
TLS, mutual TLS and basic auth with bcrypt hashes. Everything is checked when the file is
loaded, so a bad file stops ``wattmeter serve`` at start with one line, never at first scrape.

    tls_server_config:
      cert_file: server.crt            # paths are relative to this file's folder
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
      min_version: TLS12
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}
    basic_auth_users:
      prometheus: $2y$10$...           # htpasswd -nBC 10 "" | tr -d ':\\n'
"""
from __future__ import annotations

import base64
import hashlib
import logging
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import UsageError

log = logging.getLogger("wattmeter.webconfig")

_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version",
             "client_allowed_sans", "cipher_suites", "prefer_server_cipher_suites", "curve_preferences",
             "cert", "key", "client_ca"}
_IGNORED_TLS = {"cipher_suites", "prefer_server_cipher_suites", "curve_preferences"}  # Go-specific tuning
_HTTP_KEYS = {"http2", "headers"}
_RESERVED_HEADERS = {"authorization", "content-type", "content-length", "content-encoding", "www-authenticate",
                     "date", "server", "connection", "transfer-encoding"}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
             "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")     # RFC 9110 field-name


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str | None = None
    client_allowed_sans: tuple[str, ...] = ()

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _VERSIONS[self.min_version]
        if self.max_version:
            ctx.maximum_version = _VERSIONS[self.max_version]
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        ctx.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file is not None:
            ctx.load_verify_locations(cafile=str(self.client_ca_file))
        return ctx


@dataclass
class WebConfig:
    path: str = ""
    tls: TlsConfig | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)      # user -> bcrypt hash
    headers: Mapping[str, str] = field(default_factory=dict)
    ssl_context: ssl.SSLContext | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


def _fail(path: str, where: str, message: str) -> UsageError:
    return UsageError(f"--web-config {path}: {where}: {message}")


def _parse_text(path: str, text: str) -> Any:
    try:
        import yaml
    except ImportError:     # PyYAML is optional: the subset web-config files use is read below
        try:
            return mini_yaml(text)
        except ValueError as exc:
            raise UsageError(f"--web-config {path}: not valid YAML for wattmeter's reader ({exc}); "
                             "fix the file or pip install pyyaml") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        first = str(exc).replace("\n", " ")
        raise UsageError(f"--web-config {path}: not valid YAML ({first}); fix the file") from None


# -- the YAML subset of web-config files, for installs without PyYAML -------------------------------
_KEY = re.compile(r"""^("[^"]*"|'[^']*'|[^:'"]+?)\s*:(?:\s+(.*))?$""")


def _strip_comment(line: str) -> str:
    quote = ""
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _scalar(text: str) -> Any:
    t = text.strip()
    if t[:1] in "|>&*!%@`" or t.startswith("{") and t != "{}":
        raise ValueError(f"unsupported YAML in {t!r}")
    if t == "{}":
        return {}
    if t.startswith("[") != t.endswith("]"):
        raise ValueError(f"unclosed flow list in {t!r}")
    if t.startswith("["):
        inner = t[1:-1].strip()
        return [_scalar(x) for x in inner.split(",")] if inner else []
    if len(t) >= 2 and t[0] == t[-1] == "'":
        return t[1:-1].replace("''", "'")
    if len(t) >= 2 and t[0] == t[-1] == '"':
        return t[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
    if t[:1] in "'\"":
        raise ValueError(f"unterminated quote in {t!r}")
    return {"true": True, "false": False, "null": None, "~": None}.get(t.lower(), t)


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("-"):
        items = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
            item = lines[i][1][1:].strip()
            if not item or _KEY.match(item):
                raise ValueError(f"line {lines[i][1]!r}: only plain list items are supported")
            items.append(_scalar(item))
            i += 1
        return items, i
    out: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent:
        m = _KEY.match(lines[i][1])
        if not m:
            raise ValueError(f"expected 'key: value', got {lines[i][1]!r}")
        key, rest = _scalar(m.group(1)), m.group(2)
        i += 1
        if rest:
            out[key] = _scalar(rest)
        elif i < len(lines) and (lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("-"))):
            out[key], i = _block(lines, i, lines[i][0])
        else:
            out[key] = None
    return out, i


def mini_yaml(text: str) -> Any:
    """Block mappings, block and ``[flow]`` lists, quoted and plain scalars, comments."""
    lines = []
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        body = line.lstrip(" ")
        if not body or body in ("---", "..."):
            continue
        if body.startswith("\t") or "\t" in line[:len(line) - len(body)]:
            raise ValueError("tabs are not allowed for indentation")
        lines.append((len(line) - len(body), body))
    if not lines:
        return {}
    value, i = _block(lines, 0, lines[0][0])
    if i != len(lines):
        raise ValueError(f"unexpected indentation at {lines[i][1]!r}")
    return value


def _table(path: str, data: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _fail(path, where, f"expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise _fail(path, where, f"unknown key {unknown[0]!r}; expected one of {', '.join(sorted(allowed))}")
    return data


def _file(path: str, base: Path, where: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(path, where, "must be a file path")
    p = Path(value)
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise _fail(path, where, f"{p} does not exist or is not a file")
    return p


def _tls(path: str, base: Path, raw: Any) -> TlsConfig | None:
    t = _table(path, raw, "tls_server_config", _TLS_KEYS)
    if not t:
        return None
    for inline in ("cert", "key", "client_ca"):
        if inline in t:
            raise _fail(path, f"tls_server_config.{inline}", f"inline PEM is not supported; use {inline}_file")
    for k in sorted(_IGNORED_TLS & set(t)):
        log.warning("web-config %s: tls_server_config.%s is ignored (Python's TLS defaults apply)", path, k)
    if "cert_file" not in t or "key_file" not in t:
        raise _fail(path, "tls_server_config", "cert_file and key_file are both required")
    auth = t.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise _fail(path, "tls_server_config.client_auth_type", f"{auth!r} is not one of {', '.join(_CLIENT_AUTH)}")
    ca = _file(path, base, "tls_server_config.client_ca_file", t["client_ca_file"]) if t.get("client_ca_file") else None
    if auth != "NoClientCert" and ca is None:
        raise _fail(path, "tls_server_config.client_ca_file",
                    f"required with client_auth_type {auth} (wattmeter verifies client certificates)")
    versions = {}
    for key in ("min_version", "max_version"):
        v = t.get(key)
        if v is not None and v not in _VERSIONS:
            raise _fail(path, f"tls_server_config.{key}", f"{v!r} is not one of {', '.join(_VERSIONS)}")
        versions[key] = v
    order = list(_VERSIONS)
    if versions["max_version"] and order.index(versions["min_version"] or "TLS12") > order.index(versions["max_version"]):
        raise _fail(path, "tls_server_config.min_version",
                    f"{versions['min_version'] or 'TLS12'} is above max_version {versions['max_version']}; "
                    "no TLS version could be agreed")
    sans = t.get("client_allowed_sans") or []
    if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
        raise _fail(path, "tls_server_config.client_allowed_sans", "must be a list of names")
    if sans and ca is None:
        raise _fail(path, "tls_server_config.client_allowed_sans", "needs client_ca_file and a client_auth_type")
    return TlsConfig(cert_file=_file(path, base, "tls_server_config.cert_file", t["cert_file"]),
                     key_file=_file(path, base, "tls_server_config.key_file", t["key_file"]),
                     client_auth_type=auth, client_ca_file=ca, min_version=versions["min_version"] or "TLS12",
                     max_version=versions["max_version"], client_allowed_sans=tuple(sans))


def _users(path: str, raw: Any) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(path, "basic_auth_users", "expected a mapping of user: bcrypt-hash")
    users = {}
    for user, hashed in raw.items():
        if not isinstance(hashed, str) or not hashed.startswith(_BCRYPT_PREFIXES) or len(hashed) != 60:
            raise _fail(path, f"basic_auth_users.{user}",
                        "must be a bcrypt hash ($2y$10$..., 60 characters), never a plain password; "
                        "make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'")
        users[str(user)] = hashed.encode()
    if users:
        try:
            import bcrypt   # checked now, so that a scrape never finds it missing
        except ImportError:
            raise _fail(path, "basic_auth_users", "needs the bcrypt package: pip install 'wattmeter[auth]'") from None
        for user, hashed in users.items():
            try:
                bcrypt.checkpw(b"", hashed)     # a malformed hash (a placeholder) fails here, not at a scrape
            except ValueError:
                raise _fail(path, f"basic_auth_users.{user}",
                            "is not a valid bcrypt hash (a placeholder?); "
                            "make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'") from None
    return users


def load_web_config(path: str) -> WebConfig:
    """Read and check a web-config file; the TLS context is built now (bad keys fail here)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"--web-config {path}: cannot read ({reason}); give a readable YAML file") from None
    top = _table(path, _parse_text(path, text), "top level", _TOP_KEYS)
    base = Path(path).resolve().parent
    tls = _tls(path, base, top.get("tls_server_config"))
    http = _table(path, top.get("http_server_config"), "http_server_config", _HTTP_KEYS)
    headers = http.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise _fail(path, "http_server_config.headers", "must map header names to strings")
    for name, value in headers.items():
        if not _TOKEN.fullmatch(str(name)):
            raise _fail(path, f"http_server_config.headers.{name!r}", "is not a valid header name")
        if any(c in value for c in "\r\n\0"):    # a newline would split the response (header injection)
            raise _fail(path, f"http_server_config.headers.{name}", "contains a CR, LF or NUL; give one line")
        if str(name).lower() in _RESERVED_HEADERS:
            raise _fail(path, f"http_server_config.headers.{name}", "is set by wattmeter and cannot be overridden")
    cfg = WebConfig(path=path, tls=tls, users=_users(path, top.get("basic_auth_users")),
                    headers={str(k): v for k, v in headers.items()})
    if tls is not None:
        try:
            cfg.ssl_context = tls.context()
        except (ssl.SSLError, OSError) as exc:
            raise _fail(path, "tls_server_config", f"cannot load the certificate or key ({exc}); "
                                                   "check cert_file, key_file and client_ca_file") from None
    return cfg


def bcrypt_cost(hashed: bytes) -> int:
    """The cost factor of a ``$2y$NN$...`` hash (10 when it cannot be read)."""
    try:
        return max(4, min(31, int(hashed[4:6])))
    except ValueError:
        return 10


class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes.

    A bcrypt check costs tens of ms by design, so a verified (user, password) pair is cached
    as a salted SHA-256 for the life of the process (as exporter-toolkit does). Unknown users
    still pay one bcrypt check, so timing does not reveal which users exist.
    """

    def __init__(self, users: Mapping[str, bytes]) -> None:
        import bcrypt

        self._bcrypt = bcrypt
        self.users = dict(users)
        self._salt = bcrypt.gensalt()
        # An unknown user pays one bcrypt check of the users' own cost, so the time taken
        # does not tell which users exist.
        self._dummy = bcrypt.hashpw(b"wattmeter-dummy", bcrypt.gensalt(bcrypt_cost(max(self.users.values(),
                                                                                     key=bcrypt_cost, default=b""))))
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def check(self, header: str | None) -> bool:
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        key = hashlib.sha256(self._salt + user.encode() + b"\0" + password.encode()).digest()
        with self._lock:
            if key in self._ok:
                return True
        hashed = self.users.get(user)
        try:
            ok = bool(self._bcrypt.checkpw(password.encode(), hashed or self._dummy)) and hashed is not None
        except ValueError:      # checked at load; never let a bad hash turn into a 500
            ok = False
        if ok:
            with self._lock:
                self._ok.add(key)
        return ok
