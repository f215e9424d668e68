"""The feature schema, and the places that must agree with it by hand.

The hot ingest path (:func:`bwpredd.servicer.extract_batch`) reads each
feature by name, unrolled, because a loop over the schema costs more per
sample; these tests fail when it, the API or the validation rules drift from
:mod:`bwpredd.schema`.
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bwpredd import schema
from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb
from bwpredd.engine import FALLBACK_DEFAULTS
from bwpredd.manifest import load_manifest
from bwpredd.modeldir import DEFAULT_MODEL_DIR
from bwpredd.servicer import extract_batch
from bwpredd.validate import validate_batch
from tests.helpers import running_server

NOW = 1_800_000_000.0
# A value per feature that no other feature has and that survives float32.
DISTINCT = {"latency_ms": 12.5, "bandwidth_mbps": 250.0, "packet_loss": 0.25, "reliability": 0.75}


def _reasons(*samples: pb.Sample) -> dict[int, tuple[str, str]]:
    return validate_batch(extract_batch(samples), NOW, set(), 300.0, 86_400.0).reasons


class TestSchema:
    """The schema's own definitions."""

    def test_order_width_and_window(self) -> None:
        """The feature order, the window's width and length, and the index
        constants are today's contract."""
        assert schema.FEATURES == ("latency_ms", "bandwidth_mbps", "packet_loss", "reliability")
        assert (schema.WINDOW, schema.WIDTH) == (10, 4)
        for name, index in (
            ("latency_ms", schema.LAT),
            ("bandwidth_mbps", schema.BW),
            ("packet_loss", schema.LOSS),
            ("reliability", schema.REL),
        ):
            assert schema.FEATURES[index] == name

    def test_required_optional_and_defaults(self) -> None:
        """Bandwidth is required; the rest are optional with a default within range."""
        assert schema.REQUIRED == ("bandwidth_mbps",)
        assert schema.OPTIONAL == ("latency_ms", "packet_loss", "reliability")
        assert schema.DEFAULTS == {"latency_ms": 50.0, "packet_loss": 0.0, "reliability": 1.0}
        for f in schema.SCHEMA:
            assert f.default is None or f.low <= f.default <= f.high, f.name
        assert FALLBACK_DEFAULTS == schema.default_vector() == (50.0, 0.0, 0.0, 1.0)

    def test_high_rule_states_the_bound(self) -> None:
        """An upper bound written out for errors is the bound itself."""
        for f in schema.SCHEMA:
            if f.high_rule is not None:
                assert float(f.high_rule.split()[0]) == f.high, f.name

    def test_csv_headers(self) -> None:
        """Trace CSVs start time_s, bandwidth_mbps; push CSVs need peer_id and bandwidth."""
        assert schema.TRACE_CSV_HEADER == (
            "time_s",
            "bandwidth_mbps",
            "latency_ms",
            "packet_loss",
            "reliability",
        )
        assert schema.PUSH_CSV_REQUIRED == ("peer_id", "bandwidth_mbps")

    def test_stack_places_each_column_at_its_index(self) -> None:
        """stack() puts every named column at its feature's index and refuses
        a missing or unknown name."""
        out = schema.stack({k: np.full((2, 3), v) for k, v in DISTINCT.items()})
        assert out.shape == (2, 3, schema.WIDTH) and out.dtype == np.float32
        for name, value in DISTINCT.items():
            assert (out[..., schema.FEATURES.index(name)] == np.float32(value)).all()
        with pytest.raises(ValueError, match="columns"):
            schema.stack({k: v for k, v in DISTINCT.items() if k != "reliability"})
        with pytest.raises(ValueError, match="columns"):
            schema.stack({**DISTINCT, "jitter_ms": 1.0})

    def test_embedded_model_declares_the_schema(self) -> None:
        """The shipped model directory declares these features, units and window."""
        manifest = load_manifest(DEFAULT_MODEL_DIR)
        assert manifest.features == schema.FEATURES
        assert manifest.units == schema.UNITS
        assert manifest.window == schema.WINDOW


class TestApiAgrees:
    """The proto and the hand-unrolled ingest path name the schema's features."""

    def test_every_feature_is_an_optional_double_sample_field(self) -> None:
        """Each feature is a Sample field of the same name, a double with presence."""
        fields = pb.Sample.DESCRIPTOR.fields_by_name
        for name in schema.FEATURES:
            assert name in fields, name
            field = fields[name]
            assert field.type == field.TYPE_DOUBLE and field.has_presence, name
        others = set(fields) - set(schema.FEATURES)
        assert others == {"peer_id", "timestamp"}, others

    def test_extract_batch_reads_exactly_the_features(self) -> None:
        """extract_batch's unrolled reads (attributes and HasField names)
        are the schema's features, plus peer_id and timestamp."""
        tree = ast.parse(textwrap.dedent(inspect.getsource(extract_batch)))
        attrs: set[str] = set()
        has: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "s":
                    attrs.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "has"
                and isinstance(node.args[0], ast.Constant)
            ):
                has.add(node.args[0].value)
        assert attrs - {"peer_id", "timestamp", "HasField"} == set(schema.FEATURES)
        assert has - {"timestamp"} == set(schema.FEATURES)

    def test_each_value_lands_at_its_schema_index(self) -> None:
        """A sample with a distinct value per feature comes out of
        extract_batch + validate_batch with each value in its feature's column."""
        valid = validate_batch(
            extract_batch([pb.Sample(peer_id="p", **DISTINCT)]), NOW, set(), 300.0, 86_400.0
        )
        assert valid.reasons == {}
        for name, value in DISTINCT.items():
            assert valid.rows[0, schema.FEATURES.index(name)] == value, name

    def test_each_value_lands_at_its_schema_index_in_a_running_daemon(self, tmp_path: Path) -> None:
        """Through a real server: PushSamples, then the window store holds
        each value at its schema index and GetPeer gives it back by name."""
        with running_server(tmp_path) as (server, client):
            client.push([pb.Sample(peer_id="p", **DISTINCT)])
            assert server.core is not None
            view = server.core.store.view("p")
            got = client.peer("p").window[0]
        assert view is not None
        for name, value in DISTINCT.items():
            assert view.window[0, schema.FEATURES.index(name)] == np.float32(value), name
            assert getattr(got, name) == value, name


# Today's reason for each rule, word for word: clients and tests read them.
RULES = {
    "bandwidth_mbps": [
        (None, "is required"),
        (math.nan, "must be finite (got NaN or infinity)"),
        (-1.0, "must be >= 0"),
        (1.1e7, "must be <= 1e7 (10 Tbit/s)"),
    ],
    "latency_ms": [
        (math.inf, "must be finite (got NaN or infinity)"),
        (-0.5, "must be >= 0"),
        (600_001.0, "must be <= 600000 (10 minutes)"),
    ],
    "packet_loss": [
        (math.nan, "must be finite (got NaN or infinity)"),
        (-0.1, "must be within [0, 1]"),
        (1.5, "must be within [0, 1]"),
    ],
    "reliability": [
        (-math.inf, "must be finite (got NaN or infinity)"),
        (2.0, "must be within [0, 1]"),
    ],
}


class TestValidationFromSchema:
    """The sample rules come from the schema, with today's messages."""

    @pytest.mark.parametrize(
        ("name", "value", "text"),
        [(name, v, t) for name, cases in RULES.items() for v, t in cases],
    )
    def test_reason_word_for_word(self, name: str, value: float | None, text: str) -> None:
        """Each broken rule gives its field and today's text."""
        fields = {"bandwidth_mbps": 5.0, name: value}
        sample = pb.Sample(peer_id="p", **{k: v for k, v in fields.items() if v is not None})
        assert _reasons(sample) == {0: (name, text)}

    def test_required_first_then_schema_order(self) -> None:
        """A missing required feature outranks a bad optional one; among the
        optional ones the first in schema order is the reason."""
        assert _reasons(pb.Sample(peer_id="p", latency_ms=-1.0)) == {
            0: ("bandwidth_mbps", "is required")
        }
        bad = pb.Sample(peer_id="p", bandwidth_mbps=1.0, latency_ms=-1.0, packet_loss=2.0)
        assert _reasons(bad) == {0: ("latency_ms", "must be >= 0")}
