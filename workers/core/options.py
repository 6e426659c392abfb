"""What every plugin's options need to say that they are wrong, below the configuration that composes them.

Decoders and sinks each own their options (a frozen dataclass) and its checks; ``workers.core.config``
builds them from the TOML file and calls the checks. A check raises ``ConfigError`` naming the key, e.g.
``sinks.influx.url: expected http://host:port or https://..., got 'influx:8086'``. It lives here, not in
config, so that a plugin never imports the configuration that imports it.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """The configuration file is wrong; the message names the key."""
