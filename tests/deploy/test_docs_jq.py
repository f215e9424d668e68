"""Every ``... | jq`` command in the docs, run against a real journal.

``data/journal.json`` is ``journalctl -u bwpredd -o json`` (fields limited
with ``--output-fields=MESSAGE,PRIORITY,SYSLOG_IDENTIFIER,_PID,_COMM,
_SYSTEMD_UNIT,UNIT``) from a Debian bookworm container booted with systemd 252
(``systemd-nspawn -b``), the unit installed by deploy/install.sh: two windows,
concatenated. The first is a start under the unit as it was (ProcSubset=pid:
onnxruntime's plain and ANSI-coloured stderr lines; the coloured ones are
byte arrays in the JSON) after a 203/EXEC failure; the second a fresh install:
start, RPCs with one INVALID_ARGUMENT, a reload, restarts, a start that
failed with exit code 3, a watchdog SIGABRT, a 203/EXEC, a crash loop cut
off by the start limit. systemd's own lines (Starting..., Started...) are
there throughout.

Each documented command's producer (``journalctl -u bwpredd -o cat|json``,
``kubectl logs``) is replaced by that capture in the same format; the rest
of the pipeline runs as written. Its output must be non-empty and equal to
what the same jq filter gives on the daemon's JSON lines alone.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", ROOT / "deploy" / "README.md")
JOURNAL = Path(__file__).parent / "data" / "journal.json"
# What makes a filter read a mixed journal: raw lines parsed where they can
# be, or each entry's MESSAGE parsed where it can be.
TOLERANT_PREFIX = re.compile(r"^\s*(\.MESSAGE\s*\|\s*)?fromjson\?\s*\|\s*")

needs_jq = pytest.mark.skipif(
    shutil.which("jq") is None,
    reason="jq is not installed (Debian: apt-get install jq; .ci/run installs it)",
)


def documented_pipelines() -> list[tuple[str, str]]:
    """(doc, command) for every line of a fenced sh block that pipes into jq."""
    found = []
    for doc in DOCS:
        in_sh = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_sh = line.strip() in ("```sh", "```bash", "```console")
                continue
            if in_sh and re.search(r"\|\s*jq\b", line):
                found.append((doc.relative_to(ROOT).as_posix(), line.strip()))
    return found


def stages(command: str) -> list[list[str]]:
    """The pipeline's commands as word lists (``|`` inside quotes kept)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars="|")
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token == "|":
            out.append([])
        else:
            out[-1].append(token)
    return out


def journal_entries() -> list[dict[str, Any]]:
    return [json.loads(line) for line in JOURNAL.read_text().splitlines()]


def message(entry: dict[str, Any]) -> str:
    """MESSAGE as text: journalctl writes it as a byte array when it holds
    control characters (the ANSI colours of onnxruntime's warnings)."""
    value = entry["MESSAGE"]
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")


def daemon_json_lines() -> list[str]:
    """The daemon's own JSON objects, one per line."""
    out = []
    for entry in journal_entries():
        try:
            obj = json.loads(message(entry))
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(json.dumps(obj))
    return out


def producer_output(words: list[str]) -> str:
    """What the documented producer prints, made from the capture."""
    if words[:3] == ["journalctl", "-u", "bwpredd"] and "-o" in words and "-f" not in words:
        fmt = words[words.index("-o") + 1]
        if fmt == "json":
            return JOURNAL.read_text()
        if fmt == "cat":
            return "".join(message(e) + "\n" for e in journal_entries())
    if words[:1] == ["kubectl"] and "logs" in words:
        # A container's log is its process's stdout and stderr, without
        # systemd's lines.
        lines = [message(e) for e in journal_entries() if e.get("_COMM") == "bwpredd"]
        return "".join(line + "\n" for line in lines)
    raise AssertionError(f"the test has no capture for the producer {shlex.join(words)!r}")


def run(pipeline: list[list[str]], stdin: str) -> subprocess.CompletedProcess[str]:
    script = " | ".join(shlex.join(words) for words in pipeline)
    return subprocess.run(
        ["sh", "-c", script], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


PIPELINES = documented_pipelines()


class TestCapture:
    """The capture holds what broke the old commands."""

    def test_enough_commands_found(self) -> None:
        """The docs' jq commands are found (journalctl -o cat and -o json,
        kubectl logs), so the runs below cover them."""
        producers = {" ".join(stages(cmd)[0][:1] + stages(cmd)[0][-2:]) for _, cmd in PIPELINES}
        assert len(PIPELINES) >= 5, PIPELINES
        assert {"journalctl -o cat", "journalctl -o json"} <= producers, producers
        assert any(p.startswith("kubectl") for p in producers), producers

    def test_journal_has_systemd_and_raw_lines(self) -> None:
        """systemd's Starting/Started lines, a plain stderr line and byte-array
        MESSAGEs are in the capture, beside the daemon's JSON."""
        messages = [message(e) for e in journal_entries()]
        assert any(m.startswith("Starting bwpredd.service") for m in messages)
        assert any(m.startswith("Started bwpredd.service") for m in messages)
        assert any(m.startswith("bwpredd: cannot start: ") for m in messages)
        assert any(isinstance(e["MESSAGE"], list) for e in journal_entries())
        events = {json.loads(line)["event"] for line in daemon_json_lines()}
        assert {"model_loaded", "rpc", "model_reloaded", "startup_failed"} <= events

    @needs_jq
    def test_plain_jq_fails_on_it(self) -> None:
        """What the docs used to say, `journalctl -o cat | jq -c 'select(...)'`,
        stops with a parse error on this journal."""
        proc = run([["jq", "-c", 'select(.event == "rpc")']], producer_output(
            ["journalctl", "-u", "bwpredd", "-o", "cat"]
        ))  # fmt: skip
        assert proc.returncode != 0 and "parse error" in proc.stderr


@needs_jq
@pytest.mark.parametrize(("doc", "command"), PIPELINES, ids=[c for _, c in PIPELINES])
def test_documented_jq_command(doc: str, command: str) -> None:
    """The command, run as written on the captured journal, exits 0 and prints
    what its filter gives on the daemon's JSON lines alone (non-empty)."""
    producer, *rest = stages(command)
    proc = run(rest, producer_output(producer))
    assert proc.returncode == 0 and proc.stderr == "", f"{doc}: {command}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{doc}: {command} printed nothing"
    reference = []
    for words in rest:
        if words[0] == "jq":
            options = [w for w in words[1:-1] if w != "-R"]
            reference.append(["jq", *options, TOLERANT_PREFIX.sub("", words[-1])])
        else:
            reference.append(words)
    expected = run(reference, "".join(line + "\n" for line in daemon_json_lines()))
    assert expected.returncode == 0, expected.stderr
    assert proc.stdout == expected.stdout
