"""``python -m trainer allocator-state``: richer allocator states on hand-made traces."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model
from bwpredd.state import STATE_LAYOUT, reference_capacity
from bwpredd.transfer import HorizonCurves
from tests.helpers import HandTrace, write_csv_traces
from trainer import allocator_state
from trainer.allocator_state import (
    VARIANTS,
    horizon_columns,
    horizon_features,
    render_markdown,
)
from trainer.dqn import QUICK, train_loop
from trainer.env import LinkEnv, prepare_traces

S = len(STATE_LAYOUT)


def hand_trace(bw: np.ndarray, step_s: float = 1.0, name: str = "t") -> HandTrace:
    """``bw`` Mbit/s, 20 ms latency, no loss, at ``step_s`` seconds a step."""
    data = np.zeros((len(bw), 4), np.float32)
    data[:, 0], data[:, 1], data[:, 3] = 20.0, bw, 1.0
    return HandTrace("lab", name, step_s, data)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    loaded = load_model(DEFAULT_MODEL_DIR, threads=1)
    assert loaded.horizon is not None
    return loaded


def with_horizon(traces: list[HandTrace], loaded, steps=(1, 2, 3, 4)):  # type: ignore[no-untyped-def]
    return horizon_features(
        prepare_traces(traces), loaded.run_horizon, loaded.manifest.horizons, steps
    )


class TestHorizonFeatures:
    def test_columns_equal_the_horizon_graph_on_a_window(self, model) -> None:  # type: ignore[no-untyped-def]
        """The extra columns at step t are the horizon graph's quantiles on the
        window before t, read at k steps ahead and divided by that window's
        reference capacity."""
        rng = np.random.default_rng(3)
        bw = 20.0 * np.exp(np.cumsum(rng.normal(0, 0.3, 60)))
        steps = (1, 2, 3, 4)
        for step_s in (0.5, 2.0):
            tr = with_horizon([hand_trace(bw, step_s)], model, steps)[0]
            assert tr.extra is not None
            assert tr.extra.shape == (60, len(horizon_columns(steps)))
            assert np.isnan(tr.extra[:10]).all()
            for t in (10, 33, 59):
                win = tr.data[None, t - 10 : t].copy()
                mean, low, high = model.run_horizon(win, np.array([step_s], np.float32))
                curves = HorizonCurves.from_outputs(model.manifest.horizons, mean, low, high)
                cap = float(reference_capacity(win)[0])
                want = []
                for k in steps:
                    m, lo, hi = curves.at(k * step_s)
                    want += [m[0] / cap, lo[0] / cap, hi[0] / cap]
                np.testing.assert_allclose(tr.extra[t], want, rtol=1e-5)
                # Ordered quantiles: low <= median <= high at every step ahead.
                q = tr.extra[t].reshape(len(steps), 3)
                assert (q[:, 1] <= q[:, 0]).all() and (q[:, 0] <= q[:, 2]).all()

    def test_a_steady_link_reads_its_capacity(self, model) -> None:  # type: ignore[no-untyped-def]
        """On a constant link every median is close to 1 (of the capacity)."""
        tr = with_horizon([hand_trace(np.full(30, 50.0))], model, VARIANTS["lookahead"])[0]
        assert tr.extra is not None
        medians = tr.extra[10:, 0::3]
        assert np.abs(medians - 1.0).max() < 0.1

    def test_bad_steps_are_refused(self, model) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(ValueError, match="steps"):
            with_horizon([hand_trace(np.full(30, 5.0))], model, (0, 1))


class TestEnvExtraColumns:
    def test_states_carry_the_extra_columns_and_nothing_else_changes(self, model) -> None:  # type: ignore[no-untyped-def]
        """States are the shipped ones with the trace's extra columns of the
        same step appended; rewards and next states follow the same dynamics."""
        bw = np.r_[np.full(20, 10.0), np.full(20, 5.0)]
        plain = prepare_traces([hand_trace(bw)])
        rich = with_horizon([hand_trace(bw)], model)
        assert rich[0].extra is not None
        env_p, env_r = LinkEnv(plain), LinkEnv(rich)
        assert (env_p.state_size, env_r.state_size) == (S, S + 12)
        sp, sr = env_p.reset([(0, 15, 10)]), env_r.reset([(0, 15, 10)])
        np.testing.assert_array_equal(sr[:, :S], sp)
        np.testing.assert_array_equal(sr[0, S:], rich[0].extra[15])
        cp, rp = env_p.counterfactual(np.array([9]))
        cr, rr = env_r.counterfactual(np.array([9]))
        np.testing.assert_array_equal(rr, rp)
        np.testing.assert_array_equal(cr[:, :S], cp)
        np.testing.assert_array_equal(cr[0, S:], rich[0].extra[16])
        for a in (9, 0, 4):
            res_p, res_r = env_p.step(np.array([a])), env_r.step(np.array([a]))
            np.testing.assert_array_equal(res_r.reward, res_p.reward)
            np.testing.assert_array_equal(res_r.state[:, :S], res_p.state)

    def test_mixed_traces_are_refused(self, model) -> None:  # type: ignore[no-untyped-def]
        bw = np.full(30, 5.0)
        rich = with_horizon([hand_trace(bw)], model)
        with pytest.raises(ValueError, match="extra state columns"):
            LinkEnv([*rich, *prepare_traces([hand_trace(bw, name="u")])])
        other = replace(rich[0], extra=np.zeros((30, 3), np.float32))
        with pytest.raises(ValueError, match="width"):
            LinkEnv([rich[0], other])

    def test_the_agent_trains_on_the_wider_state(self, model) -> None:  # type: ignore[no-untyped-def]
        rng = np.random.default_rng(0)
        traces = [
            hand_trace(10.0 * np.exp(np.cumsum(rng.normal(0, 0.2, 150))), name=f"t{i}")
            for i in range(3)
        ]
        rich = with_horizon(traces, model)
        cfg = replace(QUICK, episodes=3, warmup=32, norm_states=200)
        net, hist = train_loop(rich, rich[:1], cfg, 0, progress=False)
        assert net.cfg.state_size == S + 12
        assert hist["updates"] > 0


class TestCLI:
    def test_bad_variant_is_refused(self, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
        parser = argparse.ArgumentParser()
        allocator_state.add_arguments(parser)
        args = parser.parse_args(
            ["--traces", str(tmp_path), "--model", str(DEFAULT_MODEL_DIR), "--variants", "nope"]
        )
        assert args.func(args) == 2
        assert "--variants" in capsys.readouterr().err

    @pytest.mark.slow  # two spawned training processes: 25-85 s on 2 shared cores
    def test_compares_the_states_and_writes_the_report(self, tmp_path: Path) -> None:
        """A short run on generic CSVs: one arm per state, every figure in the
        JSON and in the markdown."""
        traces = write_csv_traces(tmp_path / "traces", 200)
        parser = argparse.ArgumentParser()
        allocator_state.add_arguments(parser)
        out, md = tmp_path / "state.json", tmp_path / "state.md"
        args = parser.parse_args(
            [
                "--traces",
                str(traces),
                "--model",
                str(DEFAULT_MODEL_DIR),
                "--episodes",
                "2",
                "--variants",
                "horizon",
                "--json",
                str(out),
                "--report",
                str(md),
            ]
        )
        assert args.func(args) == 0
        doc = json.loads(out.read_text())
        assert doc["columns"] == {"shipped_state": S, "horizon": S + 12}
        text = md.read_text()
        for split in ("val", "test"):
            arms = doc[split]["arms"]
            assert set(arms) == {"shipped_state", "horizon"}
            diff = arms["horizon"]["ddqn"] - arms["shipped_state"]["ddqn"]
            assert arms["horizon"]["minus_shipped"] == pytest.approx(diff)
            lo, hi = arms["horizon"]["minus_shipped_90ci"]
            assert lo <= hi
            pto = doc[split]["predict_then_optimise_per_source"]
            wins = arms["horizon"]["wins_vs_predict_then_optimise"]
            per = arms["horizon"]["per_source"]
            assert wins["wins"] == sum(per[s] >= pto[s] for s in pto)
            assert f"{arms['horizon']['ddqn']:.4f}" in text
        assert f"Verdict on validation: {doc['verdict']}" in text
        assert "Generated by `cmd`" in render_markdown(doc, "cmd")
        won = doc["val"]["arms"]["horizon"]["minus_shipped"] > allocator_state.WIN_MARGIN
        assert ("beat the shipped state" in doc["verdict"]) == won


class TestAllocatorReportSection:
    def test_allocator_md_gets_the_richer_state_section(self) -> None:
        """report-allocator's markdown carries allocator-state's arms, their
        validation margins and the verdict when its JSON is given."""
        from trainer.report_allocator import _state_lines

        def arm(r: float, wins: int, minus: float | None = None) -> dict:  # type: ignore[type-arg]
            out = {
                "ddqn": r,
                "wins_vs_predict_then_optimise": {"real_wins": wins, "real_of": 9},
            }
            if minus is not None:
                out["minus_shipped"], out["minus_shipped_90ci"] = minus, [minus - 0.001, minus]
            return out

        state = {
            "seed": 0,
            "config": {"episodes": 1000},
            "variants": {"horizon": [1, 2, 3, 4]},
            "val": {
                "arms": {"shipped_state": arm(0.81, 2), "horizon": arm(0.813, 3, 0.003)},
                "predict_then_optimise": 0.814,
            },
            "test": {
                "arms": {"shipped_state": arm(0.786, 0), "horizon": arm(0.789, 2, 0.003)},
                "predict_then_optimise": 0.792,
            },
            "verdict": "no variant beats the shipped state",
        }
        seed1 = {**state, "train_seed": 1, "verdict": "seed one's verdict"}
        text = "\n".join(_state_lines([state, seed1]))
        row = "| 0.8130 | 0.7890 | +0.0030 [+0.0020, +0.0030] | 2 of 9 |"
        assert f"| horizon | 1, 2, 3, 4 | 0 {row}" in text
        assert f"| horizon | 1, 2, 3, 4 | 1 {row}" in text
        assert "| shipped_state | - | 0 | 0.8100 | 0.7860 |  | 0 of 9 |" in text
        # The shipped state's row comes first in each run.
        assert text.index("| shipped_state | - | 0 |") < text.index("| horizon | 1, 2, 3, 4 | 0 ")
        assert "| predict_then_optimise | | | 0.8140 | 0.7920 | | |" in text
        assert "* training seed 0: no variant beats the shipped state" in text
        assert "* training seed 1: seed one's verdict" in text
        assert "training seeds 0, 1" in text and "--variants horizon " in text
