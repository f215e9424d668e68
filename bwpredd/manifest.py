"""The model directory contract: manifest schema, reader and file checks.

This module is the one contract shared by the daemon and ``export``: export
writes manifests as :func:`manifest_text` gives them, the daemon and ``bwpredd
check-model`` read them with :func:`load_manifest` and :func:`verify_files`.
It imports nothing but the standard library and the feature schema
(:mod:`bwpredd.schema`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from bwpredd import schema
from bwpredd.errors import ManifestError

__all__ = [
    "FORMAT_VERSION",
    "HORIZON_INPUTS",
    "HORIZON_OUTPUTS",
    "MANIFEST_NAME",
    "Manifest",
    "ModelFile",
    "TensorSpec",
    "load_manifest",
    "manifest_text",
    "sha256_file",
    "verify_files",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Names of the ONNX inputs and outputs the daemon binds by name.
FORECASTER_INPUT = "window"
FORECASTER_OUTPUTS: tuple[str, ...] = ("bandwidth_mbps", "low_mbps", "high_mbps")
ALLOCATOR_INPUT = "state"
ALLOCATOR_OUTPUT = "q_values"
N_ACTIONS = 10
# The optional horizon graph (``horizon`` + ``horizons`` in the manifest): the
# mean bandwidth over each declared horizon, with its interval, per window.
HORIZON_INPUTS: tuple[str, ...] = ("window", "step_s")
HORIZON_OUTPUTS: tuple[str, ...] = ("mean_mbps", "low_mbps", "high_mbps")
MAX_HORIZONS = 64
MAX_HORIZON_S = 86_400.0
# A model file is named by a plain name inside the directory.
_FILE_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX input or output: its name, dtype and shape (None = dynamic)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    @classmethod
    def from_json(cls, raw: Any, where: str) -> TensorSpec:
        obj = _obj(raw, where)
        shape = obj.get("shape")
        if not isinstance(shape, list) or not all(
            s is None or (_is_int(s) and s > 0) for s in shape
        ):
            raise ManifestError(f"{where}.shape: must be a list of positive ints or null")
        return cls(
            name=_str(obj, "name", where),
            shape=tuple(shape),
            dtype=_str(obj, "dtype", where),
        )


@dataclass(frozen=True)
class ModelFile:
    """One ONNX file of the directory and the tensors it is bound by."""

    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_json(cls, raw: Any, where: str) -> ModelFile:
        obj = _obj(raw, where)
        name = _str(obj, "file", where)
        if not _FILE_RE.fullmatch(name):
            raise ManifestError(
                f"{where}.file: must be a plain file name of [A-Za-z0-9._-], not starting "
                f"with '.', got {_show(name)}"
            )
        digest = _str(obj, "sha256", where)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ManifestError(f"{where}.sha256: must be 64 lowercase hex digits")
        return cls(
            file=name,
            sha256=digest,
            inputs=tuple(
                TensorSpec.from_json(t, f"{where}.inputs[{i}]")
                for i, t in enumerate(_list(obj, "inputs", where))
            ),
            outputs=tuple(
                TensorSpec.from_json(t, f"{where}.outputs[{i}]")
                for i, t in enumerate(_list(obj, "outputs", where))
            ),
        )


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``.

    ``forecaster`` must take ``window`` float32[N,10,4] (``[N, WINDOW,
    WIDTH]`` of :mod:`bwpredd.schema`) and give
    ``bandwidth_mbps``, ``low_mbps`` and ``high_mbps`` float32[N,1];
    ``allocator`` must take ``state`` float32[N,S] with S =
    ``len(state_layout)`` and give ``q_values`` float32[N,10].

    ``horizon`` and ``horizons`` are optional and come together: ``horizons``
    lists H horizons in seconds (strictly increasing, in (0, 86400]) and the
    ``horizon`` graph takes ``window`` float32[N,10,4] and ``step_s``
    float32[N,1] (seconds between the window's samples) and gives
    ``mean_mbps``, ``low_mbps`` and ``high_mbps`` float32[N,H]: the median and
    the interval (``interval``'s quantiles) of the mean bandwidth over the
    next ``horizons[j]`` seconds. A directory without them serves the next
    step only.
    """

    format: int
    version: str
    created: str
    window: int
    features: tuple[str, ...]
    units: dict[str, str]
    feature_defaults: dict[str, float]
    forecaster: ModelFile
    allocator: ModelFile
    state_layout: tuple[str, ...]
    interval: dict[str, float]
    opset: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    horizon: ModelFile | None = None
    horizons: tuple[float, ...] = ()

    @classmethod
    def from_json(cls, raw: Any) -> Manifest:
        """Validate a decoded manifest.

        Args:
            raw: the object decoded from ``manifest.json``.

        Raises:
            ManifestError: naming the field and the rule it breaks.
        """
        obj = _obj(raw, "manifest")
        fmt = obj.get("format")
        if not _is_int(fmt) or fmt != FORMAT_VERSION:
            raise ManifestError(f"format: expected {FORMAT_VERSION}, got {_show(fmt)}")
        window = obj.get("window")
        if not _is_int(window) or window != schema.WINDOW:
            raise ManifestError(f"window: expected {schema.WINDOW}, got {_show(window)}")
        features = tuple(_list(obj, "features", "manifest"))
        if features != schema.FEATURES:
            raise ManifestError(f"features: expected {list(schema.FEATURES)}")
        defaults_raw = _obj(obj.get("feature_defaults"), "feature_defaults")
        defaults: dict[str, float] = {}
        for feature in schema.SCHEMA:
            if feature.required:
                continue
            name, lo, hi = feature.name, feature.low, feature.high
            value = defaults_raw.get(name)
            if not _is_number(value) or not lo <= value <= hi:
                raise ManifestError(
                    f"feature_defaults.{name}: must be a number within [{lo:g}, {hi:g}], "
                    f"got {_show(value)}"
                )
            defaults[name] = float(value)
        forecaster = ModelFile.from_json(obj.get("forecaster"), "forecaster")
        allocator = ModelFile.from_json(obj.get("allocator"), "allocator")
        layout = tuple(_list(obj, "state_layout", "manifest"))
        if not layout or not all(isinstance(s, str) and s for s in layout):
            raise ManifestError("state_layout: must be a non-empty list of names")
        _check_io(forecaster, allocator, len(layout))
        interval = _obj(obj.get("interval"), "interval")
        for key, q in interval.items():
            if not _is_number(q):
                raise ManifestError(f"interval.{key}: must be a finite number, got {_show(q)}")
        for key in ("low_quantile", "high_quantile"):
            q = interval.get(key)
            if not _is_number(q) or not 0 < q < 1:
                raise ManifestError(f"interval.{key}: must be a number in (0, 1)")
        if not interval["low_quantile"] < interval["high_quantile"]:
            raise ManifestError("interval.low_quantile: must be below interval.high_quantile")
        opset = obj.get("opset", 0)
        if not _is_int(opset) or opset < 0:
            raise ManifestError(f"opset: must be an integer >= 0, got {_show(opset)}")
        version = _str(obj, "version", "manifest")
        if len(version) > 128 or not version.isprintable():
            raise ManifestError(
                f"manifest.version: must be at most 128 printable characters, got {_show(version)}"
            )
        horizon, horizons = _horizon(obj)
        if horizon is not None and horizon.file in (forecaster.file, allocator.file):
            raise ManifestError("horizon.file: must differ from the other graphs' files")
        known = {f.name for f in cls.__dataclass_fields__.values()}
        return cls(
            format=FORMAT_VERSION,
            version=version,
            created=_str(obj, "created", "manifest"),
            window=schema.WINDOW,
            features=features,
            units=_str_map(obj.get("units", schema.UNITS), "units"),
            feature_defaults=defaults,
            forecaster=forecaster,
            allocator=allocator,
            state_layout=layout,
            interval={k: float(v) for k, v in interval.items()},
            opset=opset,
            versions=_str_map(obj.get("versions", {}), "versions"),
            evaluation=dict(_obj(obj.get("evaluation", {}), "evaluation")),
            training_data=dict(_obj(obj.get("training_data", {}), "training_data")),
            extra={k: v for k, v in obj.items() if k not in known},
            horizon=horizon,
            horizons=horizons,
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict (the inverse of :meth:`from_json`)."""
        out = asdict(self)
        extra = out.pop("extra")
        if self.horizon is None:
            del out["horizon"], out["horizons"]
        else:
            out["horizons"] = list(self.horizons)
        for key in ("forecaster", "allocator", *(("horizon",) if self.horizon else ())):
            for io in ("inputs", "outputs"):
                out[key][io] = [{**spec, "shape": list(spec["shape"])} for spec in out[key][io]]
        out["features"] = list(self.features)
        out["state_layout"] = list(self.state_layout)
        out.update(extra)
        return out

    def feature_default_vector(self) -> tuple[float, ...]:
        """Defaults in feature order; a required feature has none and reads 0."""
        return schema.default_vector(self.feature_defaults)


def _check_io(forecaster: ModelFile, allocator: ModelFile, state_size: int) -> None:
    f_in = [t.name for t in forecaster.inputs]
    if f_in != [FORECASTER_INPUT]:
        raise ManifestError(f"forecaster.inputs: expected ['window'], got {f_in}")
    if forecaster.inputs[0].shape[1:] != (schema.WINDOW, schema.WIDTH):
        raise ManifestError(
            f"forecaster.inputs[0].shape: expected [N, {schema.WINDOW}, {schema.WIDTH}]"
        )
    f_out = tuple(t.name for t in forecaster.outputs)
    if f_out[:3] != FORECASTER_OUTPUTS:
        raise ManifestError(f"forecaster.outputs: expected {list(FORECASTER_OUTPUTS)} first")
    for t in forecaster.outputs[:3]:
        if t.shape[1:] != (1,):
            raise ManifestError(f"forecaster output {t.name}: expected shape [N, 1]")
    a_in = [t.name for t in allocator.inputs]
    if a_in != [ALLOCATOR_INPUT] or allocator.inputs[0].shape[1:] != (state_size,):
        raise ManifestError(f"allocator.inputs: expected ['state'] of shape [N, {state_size}]")
    a_out = [t.name for t in allocator.outputs]
    if a_out != [ALLOCATOR_OUTPUT] or allocator.outputs[0].shape[1:] != (N_ACTIONS,):
        raise ManifestError(f"allocator.outputs: expected ['q_values'] of shape [N, {N_ACTIONS}]")


def _horizon(obj: Mapping[str, Any]) -> tuple[ModelFile | None, tuple[float, ...]]:
    """The optional horizon graph and its horizons: both or neither."""
    if "horizon" not in obj and "horizons" not in obj:
        return None, ()
    if "horizon" not in obj or "horizons" not in obj:
        raise ManifestError("horizons: 'horizon' (the graph) and 'horizons' come together")
    raw = _list(obj, "horizons", "manifest")
    if not 1 <= len(raw) <= MAX_HORIZONS or not all(
        _is_number(h) and 0 < h <= MAX_HORIZON_S for h in raw
    ):
        raise ManifestError(
            f"horizons: must be 1-{MAX_HORIZONS} numbers in (0, {MAX_HORIZON_S:g}] seconds"
        )
    horizons = tuple(float(h) for h in raw)
    if any(b <= a for a, b in itertools.pairwise(horizons)):
        raise ManifestError("horizons: must be strictly increasing")
    graph = ModelFile.from_json(obj.get("horizon"), "horizon")
    names = [t.name for t in graph.inputs]
    if tuple(names) != HORIZON_INPUTS:
        raise ManifestError(f"horizon.inputs: expected {list(HORIZON_INPUTS)}, got {names}")
    if graph.inputs[0].shape[1:] != (schema.WINDOW, schema.WIDTH) or graph.inputs[1].shape[1:] != (
        1,
    ):
        raise ManifestError(
            f"horizon.inputs: expected shapes [N, {schema.WINDOW}, {schema.WIDTH}] and [N, 1]"
        )
    outs = [t.name for t in graph.outputs]
    if tuple(outs) != HORIZON_OUTPUTS:
        raise ManifestError(f"horizon.outputs: expected {list(HORIZON_OUTPUTS)}, got {outs}")
    for t in graph.outputs:
        if t.shape[1:] != (len(horizons),):
            raise ManifestError(
                f"horizon output {t.name}: expected shape [N, {len(horizons)}] (one per horizon)"
            )
    return graph, horizons


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    """A short, safe rendering of a bad value (containers by type only: a
    deeply nested one must not be walked)."""
    if value is None or isinstance(value, bool | int | float | str):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"a {type(value).__name__}"


def _str_map(raw: Any, where: str) -> dict[str, str]:
    obj = _obj(raw, where)
    for key, value in obj.items():
        if not isinstance(value, str):
            raise ManifestError(f"{where}.{key}: must be a string, got {_show(value)}")
    return dict(obj)


def _obj(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: must be an object")
    return raw


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}.{key}: must be a non-empty string")
    return value


def _list(obj: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise ManifestError(f"{where}.{key}: must be a list")
    return value


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(model_dir: Path) -> Manifest:
    """Read and validate ``model_dir/manifest.json``.

    Args:
        model_dir: the model directory.

    Raises:
        ManifestError: the file is missing, not JSON, or breaks the schema.
    """
    path = model_dir / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing") from None
    except RecursionError:
        raise ManifestError(f"{path}: unreadable: JSON nested too deeply") from None
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8, bad JSON, a NUL in the path
        raise ManifestError(f"{path}: unreadable: {exc}") from None
    return Manifest.from_json(raw)


def verify_files(model_dir: Path, manifest: Manifest) -> dict[str, bytes]:
    """Read each model file once, check its sha256 and return its bytes.

    Returning the checked bytes (rather than a path) means the session is
    built from exactly what was verified, with no window for a swap between
    check and load.

    Args:
        model_dir: the model directory.
        manifest: its parsed manifest.

    Raises:
        ManifestError: a file is missing or its sha256 does not match.
    """
    out: dict[str, bytes] = {}
    graphs = [manifest.forecaster, manifest.allocator]
    if manifest.horizon is not None:
        graphs.append(manifest.horizon)
    for model in graphs:
        path = model_dir / model.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ManifestError(f"{model.file}: unreadable: {exc.strerror or exc}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != model.sha256:
            raise ManifestError(
                f"{model.file}: sha256 mismatch (manifest {model.sha256[:12]}..., "
                f"file {actual[:12]}...)"
            )
        out[model.file] = data
    return out


def manifest_text(manifest: Manifest) -> str:
    """A manifest as the indented JSON a model directory holds (used by export)."""
    return json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
