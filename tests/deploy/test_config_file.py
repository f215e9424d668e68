"""deploy/bwpredd.toml: every option with its default, accepted by Config.load."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bwpredd.config import Config, ConfigError
from tests.helpers import daemon_process

ROOT = Path(__file__).resolve().parents[2]
TOML = ROOT / "deploy" / "bwpredd.toml"
# A key written but commented out: "# listen = ...".
COMMENTED_KEY = re.compile(r"^#\s*([a-z_]+)\s*=\s*(.+)$")
KEY = re.compile(r"^([a-z_]+)\s*=")


def defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(Config)}


def commented_keys() -> dict[str, str]:
    out = {}
    for line in TOML.read_text().splitlines():
        m = COMMENTED_KEY.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


class TestExampleConfig:
    """The shipped configuration file."""

    def test_keys_are_the_config_fields(self) -> None:
        """The file's keys plus the commented-out listen are exactly Config's
        fields: nothing missing, nothing extra."""
        keys = set(tomllib.loads(TOML.read_text()))
        assert set(commented_keys()) == {"listen"}
        assert keys | {"listen"} == set(defaults())
        assert "listen" not in keys

    def test_values_are_the_defaults(self) -> None:
        """Each key holds the field's default value, of the field's type."""
        data = tomllib.loads(TOML.read_text())
        want = defaults()
        for key, value in data.items():
            assert value == want[key], key
            assert type(value) is type(want[key]), key

    def test_every_key_is_documented(self) -> None:
        """Every key has a comment in the lines just above it (its group's
        comment for grouped keys such as tls_cert/tls_key)."""
        lines = TOML.read_text().splitlines()
        for i, line in enumerate(lines):
            if not KEY.match(line):
                continue
            j = i - 1
            while j >= 0 and KEY.match(lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("# "), f"{line!r} has no comment above"

    def test_load_gives_the_defaults(self) -> None:
        """Config.load(file=...) with no environment equals the defaults."""
        assert Config.load(file=TOML, env={}) == Config.load(env={})

    def test_under_systemd(self) -> None:
        """Under the unit's directories the file gives the socket in
        /run/bwpredd (the path its comment names) and snapshots in
        /var/lib/bwpredd."""
        env = {"RUNTIME_DIRECTORY": "/run/bwpredd", "STATE_DIRECTORY": "/var/lib/bwpredd"}
        config = Config.load(file=TOML, env=env)
        assert config.listen == "unix:/run/bwpredd/bwpredd.sock"
        assert config.listen == commented_keys()["listen"].strip('"')
        assert config.state_dir == "/var/lib/bwpredd"

    def test_uncommented_listen_loads(self, tmp_path: Path) -> None:
        """Uncommenting the listen line gives a valid file with that address."""
        text = TOML.read_text().replace("# listen = ", "listen = ", 1)
        path = tmp_path / "bwpredd.toml"
        path.write_text(text)
        assert Config.load(file=path, env={}).listen == "unix:/run/bwpredd/bwpredd.sock"


class TestRefusals:
    """What the daemon does with a bad file."""

    def _with(self, tmp_path: Path, extra: str) -> Path:
        path = tmp_path / "bwpredd.toml"
        path.write_text(TOML.read_text() + "\n" + extra + "\n")
        return path

    def test_unknown_key(self, tmp_path: Path) -> None:
        """An unknown key is refused with an error naming the key and the file."""
        path = self._with(tmp_path, "max_peer = 5")
        with pytest.raises(ConfigError) as err:
            Config.load(file=path, env={})
        assert "max_peer: unknown option" in str(err.value)
        assert str(path) in str(err.value)

    def test_wrong_type(self, tmp_path: Path) -> None:
        """A value of the wrong type is refused naming the key."""
        path = tmp_path / "bwpredd.toml"
        path.write_text(TOML.read_text().replace("max_peers = 100_000", 'max_peers = "many"'))
        with pytest.raises(ConfigError, match="max_peers"):
            Config.load(file=path, env={})

    def test_daemon_exits_2_naming_the_key(self, tmp_path: Path) -> None:
        """bwpredd --config with an unknown key exits 2 and says which key."""
        path = self._with(tmp_path, "metrics_port = 9464")
        with daemon_process(["--config", str(path)]) as proc:
            out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 2
        assert "metrics_port: unknown option" in out
