"""Tests for trainer.data.traces: where the trainer finds its traces."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.data.traces import default_traces_dir


class TestDefaultDir:
    def test_env_overrides(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """$BWPRED_TRACES wins over the repo-relative default."""
        monkeypatch.setenv("BWPRED_TRACES", str(tmp_path))
        assert default_traces_dir() == tmp_path

    def test_repo_relative(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without the variable it is ../shared/traces next to the repository."""
        monkeypatch.delenv("BWPRED_TRACES", raising=False)
        repo = Path(__file__).resolve().parents[2]
        assert default_traces_dir() == (repo.parent / "shared" / "traces").resolve()
