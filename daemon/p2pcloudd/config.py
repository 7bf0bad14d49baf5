"""``config.toml``: the daemon's optional settings, every one documented here.

The daemon needs no config file. When ``config.toml`` exists in the data dir it is read with
:mod:`tomllib`; a command-line flag overrides the file, the file overrides what the daemon
remembered in ``state.json`` (the ports it chose on first start), and that overrides the
built-in defaults. An unknown key or a value of the wrong type stops the daemon with a
message naming the key, the line to fix, and (for a typo) the key it probably meant.

docs/daemon.md renders :data:`OPTIONS` as its table of options; keep them in step.
"""

from __future__ import annotations

import difflib
import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DISCOVERY_MODES = ("auto", "on", "off")
MIN_STATISTICS_INTERVAL = 0.5  # seconds; faster ticks only burn CPU on every open dashboard
MAX_CONFIG_BYTES = 1024 * 1024  # a config larger than this is a mistake, not a config


class ConfigError(Exception):
    """The config file or a flag has a bad value; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True)
class Option:
    """One config option.

    Attributes:
        name: the key in config.toml (and the flag ``--name-with-dashes`` where one exists).
        kind: ``"port"``, ``"str"``, ``"bool"``, ``"float"``, ``"uris"``, or a tuple of choices.
        default: the value when neither flag nor file sets it (None: decided at start).
        help: what it does (docs/daemon.md shows it).
    """

    name: str
    kind: str | tuple[str, ...]
    default: Any
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("port", "port", None,
           "UDP port of the mesh. Default: the port chosen on first start (42424, or any "
           "free port if that is taken), remembered in state.json. 0: any free port."),
    Option("tcp_port", "port", None,
           "TCP port of the mesh. Default: remembered, else the UDP port's number if free, "
           "else any. 0: any free port."),
    Option("bind", "str", "127.0.0.1",
           "Address the mesh listens on. 0.0.0.0 listens on every interface (needed to link "
           "with other machines)."),
    Option("link", "uris", [],
           "Link URIs (link://...) to link with at every start."),
    Option("relink", "bool", True,
           "At start, link again with every known peer whose link URI the daemon remembers."),
    Option("api_port", "port", None,
           "Port of the local HTTP API and dashboard. Default: remembered, else 42480 if "
           "free, else any. 0: any free port."),
    Option("api_bind", "str", "127.0.0.1",
           "Address the HTTP API listens on. Anything but a loopback address needs "
           "allow_remote_api = true."),
    Option("allow_remote_api", "bool", False,
           "Allow api_bind to be a non-loopback address. The API is plain HTTP: only do this "
           "on a network you trust, or behind a TLS proxy."),
    Option("log_level", LOG_LEVELS, "info",
           "Least severe log level written."),
    Option("log_format", LOG_FORMATS, "text",
           "text: key=value lines; json: one JSON object per line."),
    Option("discovery", DISCOVERY_MODES, "auto",
           "LAN discovery (mDNS, service _p2pcloud._udp): advertise this node and link with "
           "the cloud's members found on the LAN. auto: on when bind is not a loopback "
           "address; on; off."),
    Option("statistics_interval", "float", 5.0,
           f"Seconds between statistics events on /api/events (at least "
           f"{MIN_STATISTICS_INTERVAL})."),
)
_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True, slots=True)
class Settings:
    """The daemon's effective settings (flags over config.toml over defaults).

    Ports that are None are decided at start (remembered ones, then defaults).
    """

    port: int | None
    tcp_port: int | None
    bind: str
    link: tuple[str, ...]
    relink: bool
    api_port: int | None
    api_bind: str
    allow_remote_api: bool
    log_level: str
    log_format: str
    statistics_interval: float
    discovery: str = "auto"


def load_config_file(path: Path) -> dict[str, Any]:
    """Read and check ``config.toml``; a missing file is an empty config.

    Raises:
        ConfigError: the file is not TOML, has an unknown key, or a bad value.
    """
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is it the right file?")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    for key, value in data.items():
        option = _BY_NAME.get(key)
        if option is None:
            close = difflib.get_close_matches(key, list(_BY_NAME), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{path}: unknown option {key!r}{hint}; known options: "
                + ", ".join(_BY_NAME) + " (docs/daemon.md describes each)"
            )
        data[key] = check_value(option, value, where=f"{path}: {key}")
    return data


def check_value(option: Option, value: Any, *, where: str) -> Any:
    """Return ``value`` checked against ``option``'s kind.

    Raises:
        ConfigError: the value has the wrong type or is out of range.
    """
    kind = option.kind
    if isinstance(kind, tuple):
        if value not in kind:
            raise ConfigError(f"{where} must be one of {', '.join(kind)}, not {value!r}")
        return value
    if kind == "port":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            raise ConfigError(f"{where} must be a port number 0..65535, not {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        if value < MIN_STATISTICS_INTERVAL:
            raise ConfigError(f"{where} must be at least {MIN_STATISTICS_INTERVAL}")
        return float(value)
    if kind == "uris":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f'{where} must be a list of link URIs, e.g. ["link://..."]')
        return list(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, not {value!r}")
    return value


def is_loopback(host: str) -> bool:
    """True when ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve(file_values: dict[str, Any], flags: dict[str, Any]) -> Settings:
    """Merge flags (non-None values win) over the file over the defaults.

    Raises:
        ConfigError: the API would listen on a non-loopback address without
            ``allow_remote_api = true``.
    """
    values = {option.name: option.default for option in OPTIONS}
    values.update(file_values)
    for key, value in flags.items():
        if key == "link":
            values["link"] = list(values["link"]) + list(value or [])
        elif value is not None:
            values[key] = check_value(_BY_NAME[key], value, where=f"--{key.replace('_', '-')}")
    if not is_loopback(values["api_bind"]) and not values["allow_remote_api"]:
        raise ConfigError(
            f"refusing to serve the HTTP API on {values['api_bind']} (not a loopback address): "
            "anyone who can reach it could try the token. To allow it, set "
            "allow_remote_api = true in config.toml"
        )
    values["link"] = tuple(values["link"])
    return Settings(**values)


def options_markdown() -> str:
    """The options as a Markdown table (docs/daemon.md carries a copy)."""
    rows = ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
    for option in OPTIONS:
        kind = " \\| ".join(option.kind) if isinstance(option.kind, tuple) else option.kind
        default = "(see meaning)" if option.default is None else repr(option.default)
        rows.append(f"| `{option.name}` | {kind} | `{default}` | {option.help} |")
    return "\n".join(rows)
