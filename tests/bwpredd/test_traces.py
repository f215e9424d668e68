"""Tests for bwpredd.traces: each source's loader against hand-read lines."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from bwpredd.schema import BW, FEATURES, LAT, LOSS, REL, TRACE_CSV_HEADER
from bwpredd.schema import DEFAULTS as FEATURE_DEFAULTS
from bwpredd.traces import LoadResult, Trace, load_traces, summarize
from trainer.data.traces import default_traces_dir


@pytest.fixture(scope="module")
def traces_dir() -> Path:
    root = default_traces_dir()
    if not root.is_dir():
        pytest.skip(f"traces directory {root} not found (set BWPRED_TRACES)")
    return root


def _one(root: Path, rel: str) -> Trace:
    """Load one file and return its single trace."""
    path = root / rel
    if not path.exists():
        pytest.skip(f"{rel} not in this traces set")
    res = load_traces(path)
    assert not res.unknown and not res.skipped, (res.unknown, res.skipped)
    assert len(res.traces) == 1
    return res.traces[0]


def _defaults_ok(tr: Trace, features: tuple[str, ...]) -> None:
    for f in features:
        np.testing.assert_array_equal(tr.data[:, FEATURES.index(f)], FEATURE_DEFAULTS[f])


class TestTwoColumnSources:
    def test_lumos5g_4g_space_separated(self, traces_dir: Path) -> None:
        """lumos5g 4G files (space separated) load as Mbit/s at a 1 s step."""
        tr = _one(traces_dir, "lumos5g/4G/4g_trace_driving_50015_dr.gz")
        # zcat: "0 45.0", "1 45.0", "2 44.0"
        np.testing.assert_array_equal(tr.data[:3, BW], [45.0, 45.0, 44.0])
        assert tr.source == "lumos5g"
        assert tr.name == "lumos5g/4G/4g_trace_driving_50015_dr.gz"
        assert tr.group == tr.name
        assert tr.step_s == 1.0
        assert tr.measured == ("bandwidth_mbps",)
        assert tr.data.dtype == np.float32 and tr.data.shape[1] == 4
        _defaults_ok(tr, ("latency_ms", "packet_loss", "reliability"))

    def test_lumos5g_5g_tab_separated(self, traces_dir: Path) -> None:
        """lumos5g 5G files (tab separated) split on whitespace too."""
        tr = _one(traces_dir, "lumos5g/5G/5g_trace_100_walking.gz")
        # zcat: "1.0\t91.0", "2.0\t123.0", "3.0\t96.0"
        np.testing.assert_array_equal(tr.data[:3, BW], [91.0, 123.0, 96.0])
        np.testing.assert_array_equal(tr.time_s[:3], [0.0, 1.0, 2.0])

    def test_pensieve_fcc_five_second_step(self, traces_dir: Path) -> None:
        """pensieve_fcc keeps its native 5 s step and Mbit/s values."""
        tr = _one(traces_dir, "pensieve_fcc/trace_10322_http---edition.cnn.com.gz")
        # zcat: "0.0\t0.890992", "5.0\t0.88812", "10.0\t0.852304"
        np.testing.assert_allclose(tr.data[:3, BW], [0.890992, 0.88812, 0.852304], rtol=1e-6)
        assert tr.step_s == 5.0

    def test_norway_grouped_by_route_and_day(self, traces_dir: Path) -> None:
        """Norway HSDPA logs are grouped by route + day and keep their irregular step."""
        tr = _one(
            traces_dir,
            "pensieve_norway_hsdpa/metro.kalbakken-jernbanetorget-report.2010-09-13_1003CEST.log.gz",
        )
        # zcat: "0.0\t1.28562290227", "1.008\t1.69371428571", "2.019\t1.81225717112"
        np.testing.assert_allclose(tr.data[:3, BW], [1.28562290227, 1.69371428571, 1.81225717112])
        assert tr.group == "pensieve_norway_hsdpa/metro.kalbakken-jernbanetorget@2010-09-13"
        assert 0.9 < tr.step_s < 1.1 and tr.step_s != 1.0

    def test_norway_same_route_day_share_group(self, traces_dir: Path) -> None:
        """Two overlapping logs of one route on one day land in one group."""
        d = traces_dir / "pensieve_norway_hsdpa"
        if not d.is_dir():
            pytest.skip("no pensieve_norway_hsdpa")
        res = load_traces(d)
        groups = {t.name.rsplit("/", 1)[1]: t.group for t in res.traces}
        a = "bus.ljansbakken-oslo-report.2010-09-29_1823CEST.log.gz"
        b = "bus.ljansbakken-oslo-report.2010-09-29_1827CEST.log.gz"
        c = "bus.ljansbakken-oslo-report.2011-01-29_1423CET.log.gz"
        assert groups[a] == groups[b] != groups[c]

    def test_oboe_per_chunk_step(self, traces_dir: Path) -> None:
        """oboe stays at its native per-chunk step (median gap), not resampled."""
        tr = _one(traces_dir, "oboe/oboe_trace_27.txt.gz")
        # zcat: "0.474\t3.16175652173913", "0.91\t3.167022900763359"
        np.testing.assert_allclose(tr.data[:2, BW], [3.16175652173913, 3.167022900763359])
        np.testing.assert_allclose(tr.time_s[:2], [0.0, 0.91 - 0.474])
        assert 2.0 < tr.step_s < 5.0


class TestPuffer:
    def test_megabytes_per_second_times_eight(self, traces_dir: Path) -> None:
        """Puffer rates are MB/s upstream and are multiplied by 8 into Mbit/s."""
        rel = "puffer/puffer_220218/trace76tpga0skLbUquJoQthxKCmZ1HftzhnZllAPKvQZsYU=_1.gz"
        tr = _one(traces_dir, rel)
        # zcat: "0.0\t1.433288", "0.0659999847412\t1.429309", "0.124000072479\t1.720761"
        np.testing.assert_allclose(
            tr.data[:3, BW], [1.433288 * 8, 1.429309 * 8, 1.720761 * 8], rtol=1e-6
        )
        assert tr.group == "puffer/76tpga0skLbUquJoQthxKCmZ1HftzhnZllAPKvQZsYU="

    def test_files_of_one_session_share_group(self, traces_dir: Path) -> None:
        """All stream files of one Puffer session share its group and no other's."""
        d = traces_dir / "puffer" / "puffer_220218"
        files = sorted(d.glob("traceVj1lBBexSt2hgejLNBYAJS9pq0AbNBf+2VZJQQMEA9s=_*"))
        if len(files) < 2:
            pytest.skip("session with several files not present")
        groups = {load_traces(f).traces[0].group for f in files}
        assert groups == {"puffer/Vj1lBBexSt2hgejLNBYAJS9pq0AbNBf+2VZJQQMEA9s="}


class TestMahimahi:
    def test_binned_into_one_second_capacity(self, traces_dir: Path) -> None:
        """Mahimahi delivery timestamps become count * 1500 * 8 / 1e6 Mbit/s per 1 s bin."""
        tr = _one(traces_dir, "mahimahi_cellular/ATT-LTE-driving.down.gz")
        # awk '{c[int($1/1000)]++}' over the file: 219, 522, 594, 619 packets.
        expected = np.array([219, 522, 594, 619]) * 1500 * 8 / 1e6
        np.testing.assert_allclose(tr.data[:4, BW], expected, rtol=1e-6)
        # The last timestamp is 786112 ms: 786 complete seconds, the partial one dropped.
        assert len(tr) == 786
        assert tr.step_s == 1.0

    def test_up_and_down_share_group(self, traces_dir: Path) -> None:
        """The .up and .down of one drive are one fold group."""
        up = _one(traces_dir, "mahimahi_cellular/ATT-LTE-driving.up.gz")
        down = _one(traces_dir, "mahimahi_cellular/ATT-LTE-driving.down.gz")
        assert up.group == down.group == "mahimahi_cellular/ATT-LTE-driving"
        assert len(up) == 1012  # last timestamp 1012472 ms


class TestUcc5g:
    def test_kbit_to_mbit_and_repeated_stamps_averaged(self, traces_dir: Path) -> None:
        """DL_bitrate kbit/s / 1000; rows sharing a timestamp are averaged; gaps kept."""
        tr = _one(traces_dir, "ucc_5g/Download/Driving/B_2019.12.14_10.16.30.csv.gz")
        # Rows 10.16.30: 7 | .31: 7, 0 | .32: 0 | .33: 9 | .34: 0 | .36 | .37 | .38 |
        # .39: 0 (PINGAVG 82, PINGLOSS 0) and 149 | .40: 14316 kbit/s
        np.testing.assert_allclose(
            tr.data[:4, BW], [0.007, 0.0035, 0.0, 0.009], rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(tr.data[8, BW], 0.0745, rtol=1e-5)
        np.testing.assert_allclose(tr.data[9, BW], 14.316, rtol=1e-6)
        np.testing.assert_array_equal(tr.time_s[4:7], [4.0, 6.0, 7.0])  # .35 is missing
        assert tr.data[8, LAT] == 82.0
        assert tr.step_s == 1.0

    def test_ping_latency_and_loss_carried_forward(self, traces_dir: Path) -> None:
        """PINGAVG and PINGLOSS/100 are carried forward; defaults before the first ping."""
        tr = _one(traces_dir, "ucc_5g/Download/Driving/B_2020.01.16_07.26.43.csv.gz")
        # 07.26.43 .. 07.26.49 no ping; 07.26.50 PINGAVG 68.0, PINGLOSS 50.0; 07.26.53 8254 kbit/s
        assert tr.measured == FEATURES
        np.testing.assert_array_equal(tr.data[:7, LAT], FEATURE_DEFAULTS["latency_ms"])
        np.testing.assert_array_equal(tr.data[:7, LOSS], FEATURE_DEFAULTS["packet_loss"])
        np.testing.assert_array_equal(tr.data[:7, REL], FEATURE_DEFAULTS["reliability"])
        np.testing.assert_array_equal(tr.data[7:13, LAT], 68.0)
        np.testing.assert_allclose(tr.data[7:13, LOSS], 0.5)
        np.testing.assert_allclose(tr.data[7:13, REL], 0.5)
        np.testing.assert_allclose(tr.data[10, BW], 8.254, rtol=1e-6)


class TestPantheon:
    FOLDER = "pantheon_genet/ethernet/2020-02-17T21-29-AWS-California-1-to-Stanford-5-runs"

    def test_placeholder_dropped_and_rtt_doubled(self, traces_dir: Path) -> None:
        """The 0.1 first bin is dropped; latency = one-way delay * 2; loss field ignored."""
        tr = _one(traces_dir, f"{self.FOLDER}/indigo_datalink_run1.json.gz")
        # bandwidths [0.1, 93.622032, 200.184, 200.328, ...] (61 bins), delays [9.5105]
        np.testing.assert_allclose(tr.data[:3, BW], [93.622032, 200.184, 200.328], rtol=1e-6)
        assert len(tr) == 60
        np.testing.assert_allclose(tr.data[:, LAT], 2 * 9.510499999999999, rtol=1e-6)
        assert tr.measured == ("latency_ms", "bandwidth_mbps")
        _defaults_ok(tr, ("packet_loss", "reliability"))
        assert tr.step_s == 0.5
        assert tr.group == self.FOLDER

    def test_folder_is_one_group(self, traces_dir: Path) -> None:
        """Every run in one measurement folder shares the folder's group."""
        d = traces_dir / self.FOLDER
        if not d.is_dir():
            pytest.skip("folder not present")
        res = load_traces(d)
        assert len(res.traces) >= 2
        assert {t.group for t in res.traces} == {self.FOLDER}


class TestUmn5gophers:
    def test_throughput_split_into_series(self, traces_dir: Path) -> None:
        """data.csv splits into per-run series ordered by seq_num; RTT files are skipped."""
        d = traces_dir / "umn_5gophers"
        if not d.is_dir():
            pytest.skip("no umn_5gophers")
        res = load_traces(d)
        by_name = {t.name: t for t in res.traces}
        base = "umn_5gophers/All-Carriers/01-Throughput/data.csv.gz"
        tr = by_name[f"{base}#TCP/SPRINT/1/US-East/1"]
        # "TCP,SPRINT,1,US-East,1,0,0.9312768299517644", "...,1,1.9512156461736485"
        np.testing.assert_allclose(tr.data[:2, BW], [0.9312768299517644, 1.9512156461736485])
        assert tr.group == f"{base}#TCP/SPRINT/US-East"
        assert sum(t.name.startswith(base) for t in res.traces) == 120
        assert not res.unknown
        rtt = "umn_5gophers/All-Carriers/02-Round-Trip-Times/data.csv.gz"
        assert "RTT" in res.skipped[rtt]
        pings = [k for k in res.skipped if "04-Ping-Traces" in k]
        assert pings and all("RTT" in res.skipped[k] for k in pings)

    def test_mobility_files(self, traces_dir: Path) -> None:
        """The car file gives one series per carrier (one group); walking is one series."""
        mob = traces_dir / "umn_5gophers" / "All-Carriers" / "03-User-Mobility"
        if not mob.is_dir():
            pytest.skip("no mobility traces")
        res = load_traces(mob)
        by_name = {t.name: t for t in res.traces}
        car = "umn_5gophers/All-Carriers/03-User-Mobility/car-driving-trace-1.csv.gz"
        walk = "umn_5gophers/All-Carriers/03-User-Mobility/walking-trace.csv.gz"
        # "TCP,8,0,25.764822301311288,145.75433600000005,53.48353650061554"
        assert by_name[f"{car}#Sprint"].data[0, BW] == pytest.approx(25.764822301311288)
        assert by_name[f"{car}#TMobile"].data[0, BW] == pytest.approx(145.75433600000005)
        assert by_name[f"{car}#Verizon"].data[0, BW] == pytest.approx(53.48353650061554)
        assert {by_name[f"{car}#{c}"].group for c in ("Sprint", "TMobile", "Verizon")} == {car}
        # walking: seq 1 -> 92.1, 2 -> 150, 3 -> 186
        np.testing.assert_allclose(by_name[walk].data[:3, BW], [92.1, 150.0, 186.0])


def _write(path: Path, text: str, compress: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def _csv(n: int, empty_from: int = 0) -> str:
    """A generic CSV of n rows; latency given only from row ``empty_from`` on."""
    lines = [",".join(TRACE_CSV_HEADER)]
    for i in range(n):
        lat = f"{20 + i}" if i >= empty_from else ""
        lines.append(f"{i * 0.5},{10 + i},{lat},,")
    return "\n".join(lines) + "\n"


class TestGenericCsv:
    def test_plain_and_gzip_with_empty_cells(self, tmp_path: Path) -> None:
        """A directory of generic CSVs (plain and .gz) is a traces root; sources from subdirs."""
        _write(tmp_path / "linkA" / "a.csv", _csv(12, empty_from=3), compress=False)
        _write(tmp_path / "linkB" / "b.csv.gz", _csv(15), compress=True)
        res = load_traces(tmp_path)
        assert not res.unknown and not res.skipped
        by_name = {t.name: t for t in res.traces}
        a, b = by_name["linkA/a.csv"], by_name["linkB/b.csv.gz"]
        assert (a.source, b.source) == ("linkA", "linkB")
        assert a.group == "linkA/a.csv"
        np.testing.assert_array_equal(a.data[:, BW], np.arange(10, 22))
        # Empty latency before row 3 reads the default, then the real values.
        np.testing.assert_array_equal(a.data[:3, LAT], FEATURE_DEFAULTS["latency_ms"])
        np.testing.assert_array_equal(a.data[3:6, LAT], [23, 24, 25])
        _defaults_ok(a, ("packet_loss", "reliability"))
        assert a.measured == ("latency_ms", "bandwidth_mbps")
        assert a.step_s == 0.5
        assert len(b) == 15

    def test_files_directly_in_root_use_root_name(self, tmp_path: Path) -> None:
        """Generic CSVs directly in the root take the root's name as their source."""
        root = tmp_path / "mylinks"
        _write(root / "x.csv", _csv(11), compress=False)
        res = load_traces(root)
        assert [t.source for t in res.traces] == ["mylinks"]

    def test_unknown_and_short_reported(self, tmp_path: Path) -> None:
        """Unrecognised files land in unknown, short ones in skipped; README is ignored."""
        _write(tmp_path / "s" / "ok.csv", _csv(11), compress=False)
        _write(tmp_path / "s" / "short.csv", _csv(5), compress=False)
        _write(tmp_path / "s" / "other.csv", "time,bw\n0,1\n", compress=False)
        _write(tmp_path / "s" / "notes.txt", "hello\n", compress=False)
        _write(tmp_path / "README.md", "# my traces\n", compress=False)
        res = load_traces(tmp_path)
        assert [t.name for t in res.traces] == ["s/ok.csv"]
        assert sorted(p.name for p in res.unknown) == ["notes.txt", "other.csv"]
        assert "too short" in res.skipped["s/short.csv"]

    def test_optional_columns_may_be_left_out(self, tmp_path: Path) -> None:
        """A header of time_s,bandwidth_mbps plus any of the optional columns,
        and rows that stop early, are generic CSVs; a longer row, a missing
        time and a bad cell are reported with their line."""
        _write(tmp_path / "s" / "two.csv", "time_s,bandwidth_mbps\n0,5\n1,6\n", False)
        _write(
            tmp_path / "s" / "rel.csv", "time_s,bandwidth_mbps,reliability\n0,5,0.5\n1,6\n", False
        )
        _write(tmp_path / "s" / "full.csv", ",".join(TRACE_CSV_HEADER) + "\n0,5\n1,6,30\n", False)
        _write(tmp_path / "s" / "long.csv", "time_s,bandwidth_mbps\n0,5\n1,6,7\n", False)
        _write(tmp_path / "s" / "notime.csv", "time_s,bandwidth_mbps\n0,5\n\n,6\n", False)
        _write(tmp_path / "s" / "dup.csv", "time_s,bandwidth_mbps,reliability,reliability\n", False)
        res = load_traces(tmp_path, min_steps=2)
        by_name = {t.name: t for t in res.traces}
        assert sorted(by_name) == ["s/full.csv", "s/rel.csv", "s/two.csv"]
        assert by_name["s/two.csv"].measured == ("bandwidth_mbps",)
        np.testing.assert_array_equal(by_name["s/rel.csv"].data[:, REL], [0.5, 0.5])
        want = [FEATURE_DEFAULTS["latency_ms"], 30]  # the default until the first value
        np.testing.assert_array_equal(by_name["s/full.csv"].data[:, LAT], want)
        assert res.skipped["s/long.csv"].endswith("line 3: 3 cells, the header names 2")
        assert "line 4: time_s and bandwidth_mbps must be present" in res.skipped["s/notime.csv"]
        assert [p.name for p in res.unknown] == ["dup.csv"]

    def test_bad_rows_reported_not_raised(self, tmp_path: Path) -> None:
        """A generic CSV with a negative bandwidth is reported in skipped."""
        _write(tmp_path / "s" / "neg.csv", _csv(11).replace("\n0.0,10,", "\n0.0,-1,"), False)
        res = load_traces(tmp_path)
        assert not res.traces
        assert "bandwidth" in res.skipped["s/neg.csv"]


class TestDefaults:
    def test_custom_defaults_fill_missing_features(self, traces_dir: Path) -> None:
        """Features a source does not measure take the given defaults."""
        path = traces_dir / "oboe" / "oboe_trace_27.txt.gz"
        if not path.exists():
            pytest.skip("oboe_trace_27 not present")
        tr = load_traces(path, defaults={"latency_ms": 7.0, "reliability": 0.9}).traces[0]
        np.testing.assert_array_equal(tr.data[:, LAT], 7.0)
        np.testing.assert_array_equal(tr.data[:, REL], np.float32(0.9))
        np.testing.assert_array_equal(tr.data[:, LOSS], FEATURE_DEFAULTS["packet_loss"])

    def test_unknown_default_key_rejected(self, tmp_path: Path) -> None:
        """A default for a feature that does not exist is a ValueError."""
        with pytest.raises(ValueError, match="unknown features"):
            load_traces(tmp_path, defaults={"jitter_ms": 1.0})

    def test_missing_root_raises(self, tmp_path: Path) -> None:
        """A traces directory that does not exist raises FileNotFoundError."""
        with pytest.raises(FileNotFoundError):
            load_traces(tmp_path / "nope")


class TestWholeSet:
    def test_loads_everything_fast_and_clean(self, traces_dir: Path) -> None:
        """All files load in seconds with nothing unknown, and every trace is well formed."""
        start = time.perf_counter()
        res: LoadResult = load_traces(traces_dir)
        elapsed = time.perf_counter() - start
        assert elapsed < 10.0
        assert not res.unknown, res.unknown[:5]
        # Only the umn RTT/ping files hold no throughput.
        assert all(k.startswith("umn_5gophers/") for k in res.skipped), res.skipped
        names = [t.name for t in res.traces]
        assert len(names) == len(set(names))
        for t in res.traces:
            assert t.data.dtype == np.float32 and t.data.shape == (len(t), 4)
            assert len(t) >= 11 and t.step_s > 0
            assert np.isfinite(t.data).all() and (t.data[:, BW] >= 0).all()
            assert t.time_s is not None and (np.diff(t.time_s) >= 0).all()
        summary = summarize(res)
        if (traces_dir / "MANIFEST.csv").exists() and len(summary) == 9:
            assert summary["puffer"]["mean_bw_mbps"] == pytest.approx(1.67 * 8, rel=0.02)
            assert summary["lumos5g"]["mean_bw_mbps"] == pytest.approx(240, rel=0.02)
            assert summary["mahimahi_cellular"]["mean_bw_mbps"] == pytest.approx(4.06, rel=0.02)
