"""Where the client finds the core and its credentials.

In order: explicit arguments, ``SKYPORT_URL`` / ``SKYPORT_USER`` / ``SKYPORT_CERT`` / ``SKYPORT_KEY`` /
``SKYPORT_CA``, then ``$SKYPORT_HOME/client.toml`` (written by ``skyport init``) and the user's bundle in
``$SKYPORT_HOME/users/<user>/``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "https://localhost:8443"
CLIENT_FILE = "client.toml"


class ConfigError(Exception):
    """The client cannot be set up; the message says what to do."""


def skyport_home() -> Path:
    return Path(os.environ.get("SKYPORT_HOME") or Path.home() / ".skyport").expanduser()


@dataclass(frozen=True)
class ClientConfig:
    url: str
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def load(
        cls,
        *,
        url: str | None = None,
        user: str | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        ca: Path | None = None,
        home: Path | None = None,
    ) -> ClientConfig:
        home = home or skyport_home()
        saved: dict[str, str] = {}
        client_file = home / CLIENT_FILE
        if client_file.exists():
            try:
                saved = {k: str(v) for k, v in tomllib.loads(client_file.read_text()).items()}
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{client_file} is not valid TOML: {exc}") from exc
        env = os.environ
        user = user or env.get("SKYPORT_USER") or saved.get("user") or "admin"
        bundle = home / "users" / user
        config = cls(
            url=(url or env.get("SKYPORT_URL") or saved.get("url") or DEFAULT_URL).rstrip("/"),
            cert=Path(cert or env.get("SKYPORT_CERT") or bundle / "cert.pem"),
            key=Path(key or env.get("SKYPORT_KEY") or bundle / "key.pem"),
            ca=Path(ca or env.get("SKYPORT_CA") or bundle / "ca.pem"),
        )
        for what, path in (("certificate", config.cert), ("key", config.key), ("CA bundle", config.ca)):
            if not path.exists():
                raise ConfigError(
                    f"no {what} at {path}: run `skyport init` (on the core's host) or `skyport user add "
                    f"{user}`, or point SKYPORT_HOME / SKYPORT_CERT / SKYPORT_KEY / SKYPORT_CA at your files"
                )
        return config
