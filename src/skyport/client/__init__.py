"""Python client of the Sky Port core (sync and async), used by the CLI, the Jupyter spawner and tests."""

from skyport.client.api import ApiError, AsyncClient, Client, ClientError, ConnectionFailed
from skyport.client.config import ClientConfig, ConfigError

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "ClientConfig",
    "ClientError",
    "ConfigError",
    "ConnectionFailed",
]
