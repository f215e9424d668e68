"""deploy/kubernetes/daemonset.yaml: valid against the Kubernetes schemas
(kubernetes-validate, offline, strict), hardened, and consistent with the
daemon it runs."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bwpredd.config import Config
from tests.helpers import running_server

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"
# The oldest release still in wide use and the newest this package knows.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SOCKET_DIR = "/run/bwpredd"


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents() if d["kind"] == kind]
    return doc


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = by_kind("DaemonSet")["spec"]["template"]["spec"]
    return spec


def daemon() -> dict[str, Any]:
    (container,) = [c for c in pod()["containers"] if c["name"] == "bwpredd"]
    return container


def quantity(value: str) -> float:
    """A Kubernetes quantity ("100m", "1", "192Mi") as a number."""
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, scale in suffixes.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


class TestSchema:
    """kubernetes-validate on every document."""

    @pytest.mark.parametrize("version", VERSIONS)
    def test_every_document_validates(self, version: str) -> None:
        """Namespace, ServiceAccount, NetworkPolicy and DaemonSet validate
        strictly (unknown fields are errors)."""
        docs = documents()
        assert [d["kind"] for d in docs] == [
            "Namespace",
            "ServiceAccount",
            "NetworkPolicy",
            "DaemonSet",
        ]
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)

    def test_validator_catches_a_typo(self) -> None:
        """A misspelt field fails the same strict validation (the check bites)."""
        doc = copy.deepcopy(by_kind("DaemonSet"))
        sc = doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        sc["readOnlyRootFileSystem"] = sc.pop("readOnlyRootFilesystem")
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


class TestDaemonSet:
    """One hardened bwpredd per node, its socket shared through hostPath."""

    def test_one_per_node(self) -> None:
        """A DaemonSet that tolerates every taint, so each node gets one."""
        ds = by_kind("DaemonSet")
        labels = ds["spec"]["template"]["metadata"]["labels"]
        assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert {"operator": "Exists"} in pod()["tolerations"]

    def test_socket_in_host_path(self) -> None:
        """The daemon listens in a hostPath directory mounted at the same path."""
        volumes = {v["name"]: v for v in pod()["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in daemon()["volumeMounts"]}
        assert volumes[mounts[SOCKET_DIR]]["hostPath"]["path"] == SOCKET_DIR
        assert env_of(daemon())["BWPREDD_LISTEN"] == f"unix:{SOCKET_DIR}/bwpredd.sock"

    def test_hardened(self) -> None:
        """Non-root, RuntimeDefault seccomp, read-only root, no privilege
        escalation, all capabilities dropped (the init container adds back
        only CHOWN and FOWNER), no API token."""
        spec = pod()
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"] + spec["initContainers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert daemon()["securityContext"].get("capabilities", {}).get("add") is None
        (init,) = spec["initContainers"]
        assert set(init["securityContext"]["capabilities"]["add"]) == {"CHOWN", "FOWNER"}

    def test_resources(self) -> None:
        """Every container has CPU and memory requests and limits, requests
        not above limits."""
        for c in pod()["containers"] + pod()["initContainers"]:
            res = c["resources"]
            for kind in ("cpu", "memory"):
                request, limit = quantity(res["requests"][kind]), quantity(res["limits"][kind])
                assert 0 < request <= limit, (c["name"], kind)

    def test_probes_use_the_socket(self) -> None:
        """Startup, readiness and liveness run bwpredctl health against the
        socket the daemon listens on."""
        listen = env_of(daemon())["BWPREDD_LISTEN"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = daemon()[probe]["exec"]["command"]
            assert cmd[0] == "bwpredctl" and "health" in cmd, probe
            assert cmd[cmd.index("--target") + 1] == listen, probe

    def test_env_is_a_valid_config(self) -> None:
        """The BWPREDD_* variables are Config options the daemon accepts (it
        refuses unknown ones), and the grace period fits the termination one."""
        env = env_of(daemon())
        config = Config.load(env=env)
        assert config.listen == f"unix:{SOCKET_DIR}/bwpredd.sock"
        assert config.state_dir == "/var/lib/bwpredd"
        assert config.metrics_addr.endswith(":9464")
        assert config.log_format == "json"
        assert env["ORT_DISABLE_TELEMETRY"] == "1"
        assert pod()["terminationGracePeriodSeconds"] > config.grace_period_s
        ports = {p["name"]: p["containerPort"] for p in daemon()["ports"]}
        assert ports["metrics"] == int(config.metrics_addr.rpartition(":")[2])

    def test_no_egress(self) -> None:
        """The NetworkPolicy selects the pods and allows no egress at all."""
        policy = by_kind("NetworkPolicy")["spec"]
        labels = by_kind("DaemonSet")["spec"]["template"]["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items()
        assert "Egress" in policy["policyTypes"] and policy["egress"] == []


@pytest.mark.skipif(
    importlib.util.find_spec("bwpredd.ctl") is None, reason="bwpredctl is not installed"
)
class TestProbeCommands:
    """The probe commands, run against a real daemon."""

    def _run(self, cmd: list[str], target: str) -> int:
        args = [target if a.startswith("unix:") else a for a in cmd[1:]]
        code = "import sys; from bwpredd.ctl import main; sys.exit(main())"
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], check=False, capture_output=True, timeout=60
        )
        return proc.returncode

    def test_probes_pass_when_serving(self, tmp_path: Path) -> None:
        """Each probe command exits 0 against a serving daemon."""
        with running_server(tmp_path) as (server, _):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                cmd = daemon()[probe]["exec"]["command"]
                assert self._run(cmd, server.address) == 0, probe

    def test_probe_fails_without_daemon(self, tmp_path: Path) -> None:
        """The liveness command exits non-zero when nothing listens."""
        cmd = daemon()["livenessProbe"]["exec"]["command"]
        assert self._run(cmd, f"unix:{tmp_path}/none.sock") != 0
