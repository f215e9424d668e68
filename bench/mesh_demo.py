"""``make mesh-demo``: a mesh learns its own links, end to end on one machine.

Three daemons (nodes ``node-a``, ``node-b``, ``node-c``), each with its own
state directory (so each records what it sees) and one model directory they
all serve (a copy of the embedded default). Each node measures
``--links`` datacenter fabric links (:mod:`trainer.data.fabric`: a profile
the shipped models never trained on). Then:

1. **History**: ``--history`` seconds of every link pushed into its node
   (samples timestamped one second apart, in the past), recorded in
   ``<state>/recordings/``.
2. **Before**: the next ``--fresh`` seconds replayed live: before each
   sample the daemon is asked for its forecast, then the sample is pushed;
   the forecasts are scored (normalised MAE, ``bwpredd.accuracy.nmae``,
   per link then averaged) beside last value and EWMA computed here.
3. **Retrain** on the three nodes' recordings (``python -m trainer retrain``),
   **gate** and publish into the served model directory (``python -m export
   --run ... --gate``), **reload** every daemon (SIGHUP, what ``systemctl
   reload bwpredd`` sends).
4. **After**: the ``--fresh`` seconds that follow, scored the same way.

Prints the retrain report's figures (base and retrained on the recordings'
test part) and the live table before and after, and writes
``<workdir>/mesh_demo.json``. The fresh samples of step 4 were never
recorded before the retraining.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from bench.harness import REPO, Daemon, channel
from bwpredd import recording
from bwpredd.accuracy import nmae
from bwpredd.baselines import ewma
from bwpredd.client import Client, pb
from bwpredd.engine import BASELINE_ALPHA
from bwpredd.modeldir import DEFAULT_MODEL_DIR
from bwpredd.schema import BW, FEATURES, WINDOW
from trainer.data.fabric import fabric_link

__all__ = ["main"]

NODES = ("node-a", "node-b", "node-c")
PREDICTORS = ("daemon", "last_value", "ewma")


@dataclass
class Link:
    node: str
    peer: str
    data: np.ndarray  # [steps, WIDTH]


@dataclass
class Phase:
    """Per node and predictor: per link (sum |error|, sum actual)."""

    sums: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)

    def add(self, node: str, name: str, err: float, actual: float) -> None:
        self.sums.setdefault(node, {}).setdefault(name, []).append((err, actual))

    def table(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for node, by in self.sums.items():
            out[node] = {
                n: nmae([e for e, _ in rows], [a for _, a in rows]) for n, rows in by.items()
            }
        out["macro"] = {n: float(np.mean([out[node][n] for node in self.sums])) for n in PREDICTORS}
        return out


def _sample(peer: str, row: np.ndarray, t: float) -> pb.Sample:
    ts = Timestamp()
    ts.FromNanoseconds(round(t * 1e9))
    s = pb.Sample(peer_id=peer, timestamp=ts)
    for i, f in enumerate(FEATURES):
        setattr(s, f, float(row[i]))
    return s


def push_history(client: Client, links: list[Link], steps: range, t0: float) -> None:
    """Every link's samples at ``steps``, one request per step (all links)."""
    for i in steps:
        resp = client.push([_sample(ln.peer, ln.data[i], t0 + i) for ln in links])
        if resp.rejected:
            raise RuntimeError(f"history rejected: {resp.rejections[0].reason}")


def score_live(client: Client, links: list[Link], steps: range, t0: float, phase: Phase) -> None:
    """Ask, then push, for each step; score the daemon and two baselines."""
    err = {ln.peer: dict.fromkeys(PREDICTORS, 0.0) for ln in links}
    total = dict.fromkeys((ln.peer for ln in links), 0.0)
    for i in steps:
        fcs = {f.peer_id: f.bandwidth_mbps for f in client.forecast([ln.peer for ln in links])}
        for ln in links:
            actual = float(ln.data[i, BW])
            window = ln.data[i - WINDOW : i][None].astype(np.float32)
            guesses = {
                "daemon": fcs[ln.peer],
                "last_value": float(window[0, -1, BW]),
                "ewma": float(ewma(window, np.array([WINDOW]), alpha=BASELINE_ALPHA)[0]),
            }
            for name, g in guesses.items():
                err[ln.peer][name] += abs(g - actual)
            total[ln.peer] += actual
        client.push([_sample(ln.peer, ln.data[i], t0 + i) for ln in links])
    for ln in links:
        for name in PREDICTORS:
            phase.add(ln.node, name, err[ln.peer][name], total[ln.peer])


def wait_recorded(state_dirs: list[Path], expected: int, timeout: float = 120.0) -> int:
    """Wait until the recordings hold ``expected`` rows in all; return them.
    A recording in place is complete and never changes: each is read once."""
    deadline = time.monotonic() + timeout
    counted: dict[Path, int] = {}
    while True:
        for d in state_dirs:
            for f in recording.recording_files(d / recording.DIR_NAME):
                if f not in counted:
                    counted[f] = len(recording.read_recording_file(f)["peer"])
        rows = sum(counted.values())
        if rows >= expected:
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"recordings hold {rows} of {expected} samples after {timeout:.0f} s"
            )
        time.sleep(0.5)


def wait_version(d: Daemon, peer: str, version: str, timeout: float = 60.0) -> None:
    """Wait until ``d`` answers with model ``version`` (after a reload)."""
    deadline = time.monotonic() + timeout
    with Client(channel(d.address)) as c:
        while time.monotonic() < deadline:
            if c.forecast([peer])[0].model_version == version:
                return
            time.sleep(0.2)
    raise TimeoutError(f"{d.name} does not serve {version} {timeout:.0f} s after SIGHUP")


def run_command(cmd: list[str], log: Path) -> int:
    """Run a step of the demo, its output to the terminal and ``log``."""
    print("$ " + " ".join(cmd), flush=True)
    with log.open("ab") as f:
        proc = subprocess.run(
            cmd, check=False, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        f.write(proc.stdout)
    sys.stdout.write(proc.stdout.decode(errors="replace")[-3000:])
    return proc.returncode


def format_live(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    lines = [
        "live normalised MAE on fresh samples (per link, averaged; lower is better)",
        f"{'node':<8} {'before':>8} {'after':>8} {'after/before':>13}   "
        f"{'last value b/a':>16} {'EWMA b/a':>16}",
    ]
    for node in [*NODES, "macro"]:
        b, a = before[node], after[node]
        lines.append(
            f"{node:<8} {b['daemon']:>8.4f} {a['daemon']:>8.4f} "
            f"{a['daemon'] / b['daemon']:>13.3f}   "
            f"{b['last_value']:>7.4f}/{a['last_value']:<8.4f} {b['ewma']:>7.4f}/{a['ewma']:<8.4f}"
        )
    return "\n".join(lines)


def format_offline(report: dict[str, Any] | None) -> str:
    """The retrain report's figures on the recordings' test part."""
    if not report:
        return "retrain: no report"
    lines = [
        "recordings' test part (trainer retrain): normalised MAE",
        f"{'node':<10} {'base':>8} {'retrained':>10} {'ratio':>7} {'best baseline':>22}",
    ]
    rows = {**report["test"]["per_node"], "macro": report["test"]["macro"]}
    for node, row in rows.items():
        best = row["best_baseline"]
        lines.append(
            f"{node:<10} {row['base']:>8.4f} {row['retrained']:>10.4f} "
            f"{row['retrained'] / row['base']:>7.3f} {best['method']:>13} {best['nmae']:>8.4f}"
        )
    lines.append(f"gate: {report['gate']['message']}")
    return "\n".join(lines)


def render_markdown(
    result: dict[str, Any], offline: str, live: str, args: argparse.Namespace
) -> str:
    """``reports/mesh_demo.md``: what was run and the two tables."""
    return "\n".join(
        [
            "# make mesh-demo: three daemons learn their own links",
            "",
            "Written by `python -m bench.mesh_demo` (`make mesh-demo`; the module docstring "
            "has the steps). Three daemons, "
            f"{args.links} datacenter fabric links each (`trainer/data/fabric.py`, a profile "
            f"the shipped models never trained on), {args.history} s of history recorded, "
            f"then {args.fresh} s scored live before and {args.fresh} s after the retraining "
            f"(seed {args.seed}). Served before: `{result['served_before']}`; after: "
            f"`{result.get('served_after', '?')}` (gate exit {result.get('gate_exit')}).",
            "",
            "```",
            offline,
            "```",
            "",
            "```",
            live,
            "```",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.mesh_demo", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "mesh-demo")
    ap.add_argument("--links", type=int, default=6, help="fabric links per node")
    ap.add_argument("--history", type=int, default=1500, help="seconds recorded before retraining")
    ap.add_argument("--fresh", type=int, default=300, help="seconds scored before and after")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--agent-episodes",
        type=int,
        default=600,
        help="the allocator's episodes in the retraining (its own default: 2000)",
    )
    ap.add_argument("--retrain-args", default="", help="extra flags for trainer retrain")
    ap.add_argument(
        "--report", type=Path, default=REPO / "reports" / "mesh_demo.md", help="markdown report"
    )
    args = ap.parse_args(argv)

    wd: Path = args.workdir
    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    log = wd / "steps.log"
    served = wd / "models" / "current"
    shutil.copytree(DEFAULT_MODEL_DIR, served)
    steps = args.history + 2 * args.fresh
    t0 = time.time() - steps - 60.0
    links: dict[str, list[Link]] = {
        node: [
            Link(node, f"{node}/link-{i}", fabric_link(args.seed * 1000 + k * 100 + i, steps))
            for i in range(args.links)
        ]
        for k, node in enumerate(NODES)
    }
    daemons: dict[str, Daemon] = {}
    result: dict[str, Any] = {"links_per_node": args.links, "history_s": args.history}
    result["served_before"] = json.loads((served / "manifest.json").read_text())["version"]
    try:
        for node in NODES:
            state = wd / node / "state"
            d = Daemon(
                wd,
                node,
                {
                    "BWPREDD_STATE_DIR": str(state),
                    "BWPREDD_MODEL_DIR": str(served),
                    "BWPREDD_RECORD": "true",
                    "BWPREDD_RECORD_NODE": node,
                },
            )
            d.start()
            daemons[node] = d
        print(f"3 daemons serving {served}; {args.links} fabric links each", flush=True)

        before, after = Phase(), Phase()
        for node, d in daemons.items():
            with Client(channel(d.address)) as c:
                push_history(c, links[node], range(args.history), t0)
        recorded = wait_recorded([wd / n / "state" for n in NODES], 3 * args.links * args.history)
        print(f"history: {recorded} samples recorded", flush=True)
        for node, d in daemons.items():
            with Client(channel(d.address)) as c:
                score_live(
                    c, links[node], range(args.history, args.history + args.fresh), t0, before
                )
        result["before"] = before.table()

        run = wd / "retrain"
        rc = run_command(
            [
                sys.executable,
                "-m",
                "trainer",
                "retrain",
                "--recordings",
                *(str(wd / n / "state" / "recordings") for n in NODES),
                "--base",
                str(served),
                "--out",
                str(run),
                "--agent-episodes",
                str(args.agent_episodes),
                "--quiet",
                *args.retrain_args.split(),
            ],
            log,
        )
        if rc != 0:
            print(f"retrain failed (exit {rc}); see {log}", file=sys.stderr)
            return rc
        report = run / "retrain.json"
        if report.is_file():
            result["retrain"] = json.loads(report.read_text())
        rc = run_command(
            [
                sys.executable,
                "-m",
                "export",
                "--run",
                str(run),
                "--gate",
                "--out",
                str(served),
                "--force",
            ],
            log,
        )
        result["gate_exit"] = rc
        if rc != 0:
            print(f"the gate kept the base model (exit {rc})", flush=True)
        version = json.loads((served / "manifest.json").read_text())["version"]
        result["served_after"] = version
        for node, d in daemons.items():
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
            wait_version(d, links[node][0].peer, version)
        print(f"reloaded: every daemon serves {version}", flush=True)
        for node, d in daemons.items():
            with Client(channel(d.address)) as c:
                lo = args.history + args.fresh
                score_live(c, links[node], range(lo, lo + args.fresh), t0, after)
        result["after"] = after.table()
    finally:
        for d in daemons.values():
            d.stop()
    live = format_live(result["before"], result["after"])
    offline = format_offline(result.get("retrain"))
    print(offline)
    print(live)
    (wd / "mesh_demo.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {wd / 'mesh_demo.json'}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(render_markdown(result, offline, live, args))
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
