"""Where sensorpipe finds the files it ships with and the configuration a user runs.

The shipped files (default configuration, supervisord template, firmware) are package data
(``workers.shipped``), so a wheel installed anywhere finds them as a checkout does.
"""
from __future__ import annotations

import os
import typing
from importlib import resources
from pathlib import Path

CONFIG_NAME = "sensorpipe.toml"          # what ``sensorpipe init`` writes and ``run`` looks for in the cwd


def shipped(*parts: str) -> Path:
    """A file or folder shipped inside the package (``shipped("deploy", "sensorpipe.toml")``)."""
    root = resources.files("workers.shipped")
    return Path(str(root.joinpath(*parts)))


def default_config() -> Path:
    return shipped("deploy", CONFIG_NAME)


def supervisord_template() -> Path:
    return shipped("supervisord.conf")


def firmware_dir() -> Path:
    return shipped("firmware")


def config_path(explicit: str | os.PathLike[str] | None, env: typing.Mapping[str, str]) -> Path:
    """The configuration to run: ``--config``, then ``$SENSORPIPE_CONFIG``, then ``./sensorpipe.toml``
    (what ``sensorpipe init`` writes), then the shipped default."""
    if explicit:
        return Path(explicit)
    if env.get("SENSORPIPE_CONFIG"):
        return Path(env["SENSORPIPE_CONFIG"])
    local = Path(CONFIG_NAME)
    if local.is_file():
        return local
    return default_config()
