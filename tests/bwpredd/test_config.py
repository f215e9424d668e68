"""Config: precedence, coercion, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from bwpredd.config import Config, ConfigError, default_listen, parse_listen


class TestPrecedence:
    """flags > environment > file > defaults."""

    def test_order(self, tmp_path: Path) -> None:
        """Each layer overrides the ones below it, key by key."""
        toml = tmp_path / "c.toml"
        toml.write_text('max_peers = 10\nidle_expiry_s = 5.0\nlog_level = "debug"\n')
        env = {"BWPREDD_MAX_PEERS": "20", "BWPREDD_IDLE_EXPIRY_S": "7", "BWPREDD_CONFIG": str(toml)}
        c = Config.load(flags={"max_peers": 30, "reflection": None}, env=env)
        assert (c.max_peers, c.idle_expiry_s, c.log_level, c.reflection) == (30, 7.0, "debug", True)

    def test_defaults(self) -> None:
        """With nothing set the documented defaults hold."""
        c = Config.load(env={})
        assert c.max_peers == 100_000 and c.metrics_addr == "127.0.0.1:9464"
        assert c.listen.startswith("unix:/")

    def test_record_options(self, tmp_path: Path) -> None:
        """The recording options come from a flag, the environment and the
        file like every other; their defaults record with a state_dir."""
        d = Config.load(env={})
        assert (d.record, d.record_max_bytes, d.record_max_age_s, d.record_flush_s) == (
            True,
            1 << 30,
            604_800.0,
            5.0,
        )
        assert d.record_node == ""
        toml = tmp_path / "c.toml"
        toml.write_text("record = false\nrecord_max_age_s = 60\n")
        env = {"BWPREDD_CONFIG": str(toml), "BWPREDD_RECORD_MAX_BYTES": "0x100000"}
        c = Config.load(flags={"record_node": "edge-7.dc1"}, env=env)
        assert (c.record, c.record_max_age_s, c.record_max_bytes, c.record_node) == (
            False,
            60.0,
            1 << 20,
            "edge-7.dc1",
        )

    def test_systemd_directories(self) -> None:
        """RUNTIME_DIRECTORY and STATE_DIRECTORY give the socket and state paths."""
        c = Config.load(env={"RUNTIME_DIRECTORY": "/run/x", "STATE_DIRECTORY": "/var/lib/x"})
        assert c.listen == "unix:/run/x/bwpredd.sock" and c.state_dir == "/var/lib/x"


class TestValidation:
    """Bad values are refused with the key named."""

    @pytest.mark.parametrize(
        ("env", "match"),
        [
            ({"BWPREDD_NOPE": "1"}, "nope: unknown option"),
            ({"BWPREDD_MAX_PEERS": "many"}, "max_peers"),
            ({"BWPREDD_MAX_PEERS": "0"}, "max_peers: must be >= 1"),
            ({"BWPREDD_REFLECTION": "maybe"}, "reflection"),
            ({"BWPREDD_LOG_FORMAT": "xml"}, "log_format"),
            ({"BWPREDD_LISTEN": "nowhere"}, "listen"),
            ({"BWPREDD_LISTEN": "0.0.0.0:80"}, "needs tls_cert"),
            ({"BWPREDD_TLS_CERT": "/c"}, "give both"),
            ({"BWPREDD_GRACE_PERIOD_S": "nan"}, "grace_period_s"),
            ({"BWPREDD_RECORD": "maybe"}, r"record: expected true or false"),
            ({"BWPREDD_RECORD_MAX_BYTES": "1000"}, r"record_max_bytes: must be >= 65536"),
            ({"BWPREDD_RECORD_MAX_BYTES": "1.5"}, "record_max_bytes"),
            ({"BWPREDD_RECORD_MAX_AGE_S": "-1"}, "record_max_age_s: must be a finite"),
            ({"BWPREDD_RECORD_MAX_AGE_S": "inf"}, "record_max_age_s: must be a finite"),
            ({"BWPREDD_RECORD_FLUSH_S": "0"}, r"record_flush_s: must be > 0"),
            ({"BWPREDD_RECORD_NODE": "rack/1"}, r"record_node: must be 1-128 characters"),
        ],
    )
    def test_env_errors(self, env: dict[str, str], match: str) -> None:
        """Each broken rule raises ConfigError naming the key."""
        with pytest.raises(ConfigError, match=match):
            Config.load(env=env)

    def test_unknown_file_key(self, tmp_path: Path) -> None:
        """An unknown TOML key is refused naming the key and the file."""
        toml = tmp_path / "c.toml"
        toml.write_text("max_peer = 1\n")
        with pytest.raises(ConfigError, match=r"max_peer: unknown option \(config file"):
            Config.load(env={}, file=toml)

    def test_bad_toml(self, tmp_path: Path) -> None:
        """A file that is not TOML is refused with the file named."""
        toml = tmp_path / "c.toml"
        toml.write_text("max_peers = = 1\n")
        with pytest.raises(ConfigError, match="invalid TOML"):
            Config.load(env={}, file=toml)


class TestListen:
    """Listen addresses."""

    def test_parse(self) -> None:
        """unix paths, host:port and [v6]:port parse; relative paths do not."""
        assert parse_listen("unix:/a/b.sock") == ("unix", "/a/b.sock", 0)
        assert parse_listen("127.0.0.1:0") == ("tcp", "127.0.0.1", 0)
        assert parse_listen("[::1]:50051") == ("tcp", "::1", 50051)
        with pytest.raises(ConfigError):
            parse_listen("unix:rel.sock")

    def test_default_listen_paths(self) -> None:
        """The default socket sits in a directory of its own."""
        assert default_listen({"RUNTIME_DIRECTORY": "/run/q"}) == "unix:/run/q/bwpredd.sock"
        assert default_listen({}).endswith("/bwpredd/bwpredd.sock") or "bwpredd-" in default_listen(
            {}
        )
