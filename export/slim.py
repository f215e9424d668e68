"""Slim the exported graphs: the same arithmetic in fewer nodes.

torch's exporter spells each ``nn.LSTM`` of the stacked forecaster with its
own glue: zero initial states built from the input's shape (Shape, Gather,
Unsqueeze, Concat, ConstantOfShape), and each :class:`_SeqBatchNorm`
between layers as Squeeze, Transpose, BatchNormalization, Transpose; the
Q-network keeps its state standardisation and its norms as nodes of their
own. Every node is a kernel launch onnxruntime pays for on each run,
which at batch 1 (a peer's forecast right after its sample) weighs as much
as arithmetic. :func:`slim_forecaster` rewrites:

* an LSTM's initial state that is all zeros is left out (ONNX's default);
* a batch normalisation between two layers is folded into the next layer's
  input weights and bias (``W (a x + c) + b = (W diag a) x + (W c + b)``),
  which then reads the previous layer's output as it comes, sequence first;
* the last layer's normalisation, read at one step by the head's first
  Gemm, is folded into that Gemm the same way, the step read with a Gather
  on the sequence axis.

:func:`slim_allocator` folds the Q-network's standardisation and norms
into the Gemms that read them. On the embedded default that took the
forecaster from 233 to 166 nodes (101 to 85 once onnxruntime has optimised
it at batch 1) and the allocator from 30 to 20; ``reports/profile.md``
(section 7) has what it bought.

The answers are the same up to float32 rounding of the folded weights
(export's parity checks hold the slim graphs to torch, like any graph,
greedy actions included). Each folded forecaster norm's own parameters go
into the graph's metadata (:data:`trainer.models.from_onnx.FOLDED_NORMS_KEY`),
from which a fine-tune (``trainer retrain``) rebuilds the network as it was
trained; the allocator is never rebuilt from its graph. A step this module
does not recognise the shape of stays as it was; :class:`SlimReport` says
which rewrites were made. :func:`slim_model_dir` (``python -m export
--slim DIR``) republishes a directory exported before this module existed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper
from torch import nn

from bwpredd.manifest import Manifest, load_manifest
from bwpredd.modeldir import session
from bwpredd.state import DEFAULT_STEP_S, build_state
from trainer.models.forecaster import Forecaster
from trainer.models.from_onnx import FOLDED_NORMS_KEY, norm_affine

__all__ = ["SlimReport", "slim_allocator", "slim_forecaster", "slim_model_dir"]


@dataclass
class SlimReport:
    """What a slim pass did: node counts and rewrites made."""

    nodes_before: int
    nodes_after: int
    zero_states_dropped: int = 0
    norms_folded_into_lstm: int = 0
    norms_folded_into_gemm: int = 0
    skipped: list[str] = field(default_factory=list)


class _Graph:
    """Index of a graph's producers, consumers and initialisers."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.g = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.reindex()

    def reindex(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.g.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initialiser or a Constant node's output (through
        Identity nodes), else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":  # how the exporter shares equal tensors
            return self.const(node.input[0])
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def attr(self, node: onnx.NodeProto, name: str) -> object:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return None

    def only_consumer(self, name: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def set_init(self, name: str, value: np.ndarray) -> str:
        """A new initialiser ``name`` (made unique) holding ``value``."""
        base, k = name, 0
        while name in self.inits or name in self.producer:
            k += 1
            name = f"{base}_{k}"
        tensor = numpy_helper.from_array(value, name)
        self.g.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def prune(self, outputs: set[str]) -> None:
        """Drop nodes nothing reads, then initialisers nothing reads."""
        while True:
            self.reindex()
            dead = [
                n
                for n in self.g.node
                if not any(o in outputs or self.consumers.get(o) for o in n.output if o)
            ]
            if not dead:
                break
            for n in dead:
                self.g.node.remove(n)
        used = {name for n in self.g.node for name in n.input}
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        self.inits = {t.name: t for t in keep}


def _zero_state(g: _Graph, name: str) -> bool:
    """``name`` is a ConstantOfShape of zeros (or of its default, zero)."""
    node = g.producer.get(name)
    if node is None or node.op_type != "ConstantOfShape":
        return False
    for a in node.attribute:
        if a.name == "value":
            return bool(np.all(numpy_helper.to_array(a.t) == 0))
    return True


def _norm_params(
    g: _Graph, bn: onnx.NodeProto
) -> tuple[dict[str, object], np.ndarray, np.ndarray] | None:
    """An inference-mode norm's record for :data:`FOLDED_NORMS_KEY` (its
    weight, bias and statistics as float32 values) and its ``(a, c)``
    (:func:`norm_affine`), else None."""
    parts = [g.const(name) for name in bn.input[1:5]]
    if any(p is None for p in parts) or g.attr(bn, "training_mode") not in (None, 0):
        return None
    raw_eps = g.attr(bn, "epsilon")
    eps = 1e-5 if raw_eps is None else float(raw_eps)  # type: ignore[arg-type]
    weight, bias, mean, var = (np.asarray(p, dtype=np.float32).ravel() for p in parts)
    record: dict[str, object] = {"norm": bn.name, "epsilon": eps}
    for key, value in zip(
        ("weight", "bias", "running_mean", "running_var"), (weight, bias, mean, var), strict=True
    ):
        record[key] = value.tolist()
    a, c = norm_affine(weight, bias, mean, var, eps)
    return record, a, c


def _seq_source(g: _Graph, bn: onnx.NodeProto) -> str | None:
    """The ``[T, N, C]`` sequence a normalisation reads: BN <- Transpose
    (1, 2, 0) <- Squeeze(axis 1) <- an LSTM's Y; else None."""
    t1 = g.producer.get(bn.input[0])
    if t1 is None or t1.op_type != "Transpose" or list(g.attr(t1, "perm") or []) != [1, 2, 0]:  # type: ignore[call-overload]
        return None
    sq = g.producer.get(t1.input[0])
    if sq is None or sq.op_type != "Squeeze" or len(sq.input) < 2:
        return None
    axes = g.const(sq.input[1])
    lstm = g.producer.get(sq.input[0])
    if axes is None or list(np.ravel(axes)) != [1] or lstm is None or lstm.op_type != "LSTM":
        return None
    if len(g.consumers.get(t1.output[0], [])) != 1:
        return None
    return str(sq.output[0])


def _fold_into_lstm(
    g: _Graph, t2: onnx.NodeProto, seq: str, a: np.ndarray, c: np.ndarray
) -> str | None:
    """BN -> Transpose(2, 0, 1) -> LSTM.X: fold into the LSTM's W and B;
    the LSTM's name, or None."""
    lstm = g.only_consumer(t2.output[0], "LSTM")
    if lstm is None or lstm.input[0] != t2.output[0]:
        return None
    if list(g.attr(t2, "perm") or []) != [2, 0, 1] or g.attr(lstm, "layout") not in (None, 0):  # type: ignore[call-overload]
        return None
    w = g.const(lstm.input[1])
    if w is None or w.shape[0] != 1 or w.shape[2] != a.size:
        return None
    hidden4 = w.shape[1]
    has_b = len(lstm.input) > 3 and lstm.input[3]
    b = g.const(lstm.input[3]) if has_b else np.zeros((1, 2 * hidden4), dtype=np.float32)
    if b is None:
        return None
    w64 = w.astype(np.float64)
    new_w = (w64 * a[None, None, :]).astype(np.float32)
    new_b = b.astype(np.float64).copy()
    new_b[0, :hidden4] += w64[0] @ c
    inputs = list(lstm.input)
    while len(inputs) < 4:
        inputs.append("")
    inputs[0] = seq
    inputs[1] = g.set_init(f"{inputs[1]}_folded", new_w)
    inputs[3] = g.set_init(f"{inputs[3] or 'lstm_b'}_folded", new_b.astype(np.float32))
    del lstm.input[:]
    lstm.input.extend(inputs)
    return str(lstm.name)


def _fold_affine_into_gemm(
    g: _Graph, gemm: onnx.NodeProto, a: np.ndarray, c: np.ndarray, source: str
) -> bool:
    """``Gemm(a x + c)`` as ``Gemm'(x)`` reading ``source`` (x): the weight's
    columns scaled by ``a``, ``W c`` added to the bias. False (nothing
    changed) unless the Gemm is a plain ``x W^T + b`` of constants."""
    if (g.attr(gemm, "transA") or 0) != 0 or g.attr(gemm, "transB") != 1:
        return False
    if g.attr(gemm, "alpha") not in (None, 1.0) or g.attr(gemm, "beta") not in (None, 1.0):
        return False
    w = g.const(gemm.input[1])
    bias = g.const(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
    if w is None or w.ndim != 2 or a.shape != (w.shape[1],) or c.shape != a.shape:
        return False
    if bias is not None and bias.size not in (1, w.shape[0]):
        return False
    bias64 = np.zeros(w.shape[0]) if bias is None else np.broadcast_to(bias, (w.shape[0],))
    w64 = w.astype(np.float64)
    new_w = (w64 * a[None, :]).astype(np.float32)
    new_bias = (bias64 + w64 @ c).astype(np.float32)
    inputs = [source, g.set_init(f"{gemm.input[1]}_folded", new_w)]
    inputs.append(g.set_init(f"{gemm.input[2] or 'gemm_b'}_folded", new_bias))
    del gemm.input[:]
    gemm.input.extend(inputs)
    return True


def _fold_into_gemm(
    g: _Graph, t3: onnx.NodeProto, seq: str, a: np.ndarray, c: np.ndarray
) -> str | None:
    """BN -> Transpose(0, 2, 1) -> Gather(axis 1, one step) -> Gemm(transB):
    the step read from the sequence (Gather on axis 0), the norm folded into
    the Gemm's weight and bias; the Gemm's name, or None."""
    if list(g.attr(t3, "perm") or []) != [0, 2, 1]:  # type: ignore[call-overload]
        return None
    gathers = [n for n in g.consumers.get(t3.output[0], []) if n.op_type == "Gather"]
    if len(gathers) != 1 or g.attr(gathers[0], "axis") != 1:
        return None
    gather = gathers[0]
    step = g.const(gather.input[1])
    gemm = g.only_consumer(gather.output[0], "Gemm")
    if step is None or np.ndim(step) != 0 or gemm is None or gemm.input[0] != gather.output[0]:
        return None
    picked = f"{gather.output[0]}_seq"
    if not _fold_affine_into_gemm(g, gemm, a, c, picked):
        return None
    g.g.node.insert(
        list(g.g.node).index(gather) + 1,
        onnx.helper.make_node("Gather", [seq, gather.input[1]], [picked], axis=0),
    )
    return str(gemm.name)


def slim_forecaster(model_bytes: bytes) -> tuple[bytes, SlimReport]:
    """The forecaster graph with its LSTM glue rewritten (module docstring).

    Args:
        model_bytes: a serialised graph from :func:`export.to_onnx.export_forecaster`.

    Returns:
        The rewritten graph (``onnx.checker`` has passed on it) and what was done.
    """
    proto = onnx.load_from_string(model_bytes)
    g = _Graph(proto.graph)
    report = SlimReport(len(proto.graph.node), len(proto.graph.node))
    outputs = {o.name for o in proto.graph.output}
    for node in list(proto.graph.node):
        if node.op_type != "LSTM":
            continue
        inputs = list(node.input)
        for k in (5, 6):
            if len(inputs) > k and inputs[k] and _zero_state(g, inputs[k]):
                inputs[k] = ""
                report.zero_states_dropped += 1
        while inputs and not inputs[-1]:
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
    g.reindex()
    folded: list[dict[str, object]] = []
    for bn in [n for n in proto.graph.node if n.op_type == "BatchNormalization"]:
        seq = _seq_source(g, bn)
        found = _norm_params(g, bn)
        users = g.consumers.get(bn.output[0], [])
        if seq is None or found is None or not bn.name:
            report.skipped.append(f"{bn.name or bn.output[0]}: not a norm between LSTM steps")
            continue
        params, a, c = found
        # Fold into the reader that is the next LSTM or the head's Gemm. Any
        # other reader (the exporter's shape arithmetic for the zero states,
        # dead once those are dropped) keeps the norm computed as it was.
        into = None
        for user in [u for u in users if u.op_type == "Transpose"]:
            if into := _fold_into_lstm(g, user, seq, a, c):
                report.norms_folded_into_lstm += 1
            elif into := _fold_into_gemm(g, user, seq, a, c):
                report.norms_folded_into_gemm += 1
            g.reindex()
            if into:
                break
        if into is None:
            report.skipped.append(f"{bn.name}: no LSTM or Gemm to fold into")
            continue
        folded.append(params | {"into": into})
    g.prune(outputs)
    if folded:  # what a fine-tune needs to undo the folding
        entry = proto.metadata_props.add()
        entry.key, entry.value = FOLDED_NORMS_KEY, json.dumps(folded)
    report.nodes_after = len(proto.graph.node)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString(), report


def slim_allocator(model_bytes: bytes) -> tuple[bytes, SlimReport]:
    """The Q-network graph with its affine steps folded into the Gemms that
    read them: each batch norm between a ReLU and the next layer, and the
    state's standardisation (``(s - mean) / std``) before the first layer.

    The allocator is served from its graph and never rebuilt from it (the
    agent is retrained from scratch), so nothing is recorded for undoing
    it. Export's parity check holds the result to torch, greedy actions
    included.

    Args:
        model_bytes: a serialised graph from :func:`export.to_onnx.export_allocator`.

    Returns:
        The rewritten graph (``onnx.checker`` has passed on it) and what was done
        (``norms_folded_into_gemm`` counts the standardisations too).
    """
    proto = onnx.load_from_string(model_bytes)
    g = _Graph(proto.graph)
    report = SlimReport(len(proto.graph.node), len(proto.graph.node))
    for node in list(proto.graph.node):
        folded = False
        if node.op_type == "BatchNormalization":
            found = _norm_params(g, node)
            gemm = g.only_consumer(node.output[0], "Gemm")
            if found is not None and gemm is not None and gemm.input[0] == node.output[0]:
                folded = _fold_affine_into_gemm(g, gemm, found[1], found[2], node.input[0])
        elif node.op_type == "Div":
            sub = g.producer.get(node.input[0])
            std = g.const(node.input[1])
            mean = g.const(sub.input[1]) if sub is not None and sub.op_type == "Sub" else None
            gemm = g.only_consumer(node.output[0], "Gemm")
            if sub is not None and std is not None and mean is not None and gemm is not None:
                std64, mean64 = np.ravel(std).astype(np.float64), np.ravel(mean).astype(np.float64)
                if std64.shape == mean64.shape and np.all(std64 != 0):
                    a = 1.0 / std64
                    folded = _fold_affine_into_gemm(g, gemm, a, -mean64 * a, sub.input[0])
        else:
            continue
        if folded:
            report.norms_folded_into_gemm += 1
        else:
            report.skipped.append(f"{node.name or node.output[0]}: not before a plain Gemm")
        g.reindex()
    g.prune({o.name for o in proto.graph.output})
    report.nodes_after = len(proto.graph.node)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString(), report


def _keep_members(model: Forecaster, members: Sequence[int]) -> dict[str, list[int] | int]:
    """Keep only ``members`` (indices) of ``model``'s, in place; returns
    ``{"kept": [...], "of": n}`` for the manifest.

    Raises:
        ExportError: ``members`` is empty or names one ``model`` lacks.
    """
    from export import ExportError

    n = len(model.members)
    kept = sorted(set(members))
    if not kept or kept[0] < 0 or kept[-1] >= n:
        raise ExportError(
            f"members: indices in [0, {n - 1}] (the forecaster has {n}), got {list(members)}"
        )
    model.members = nn.ModuleList(model.members[k] for k in kept)
    model.cfg = replace(model.cfg, members=len(kept))
    return {"kept": kept, "of": n}


def slim_model_dir(
    src: Path,
    dest: Path,
    *,
    windows: npt.NDArray[np.float32],
    windows_source: str,
    version: str | None = None,
    force: bool = False,
    members: Sequence[int] | None = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Publish at ``dest`` a copy of the model directory ``src`` with the
    graphs this exporter writes now: the forecaster re-exported (and
    slimmed) from the network rebuilt from ``src``'s graph
    (:func:`trainer.models.from_onnx.load_forecaster`), the allocator's
    graph slimmed. A graph that would not get smaller, and the horizon
    graph, are kept byte for byte; the version changes, since the answers
    move by float32 rounding.

    The new forecaster is held to the rebuilt network by export's parity
    check on ``windows``, as an export holds a graph to its checkpoint; the
    slim allocator to ``src``'s allocator graph on the states of those
    windows, every greedy action the same.

    ``members`` keeps only those of the forecaster's members (indices, in
    training order), averaged as before with the same interval scale: what
    the daemon costs and serves with fewer of them. The manifest's
    evaluation figures stay the source's; ``export.provenance`` records the
    members kept, and ``trainer eval`` scores the result.

    Raises:
        ExportError: ``dest`` exists without ``force``, both graphs are
            slim already, ``members`` names none or one the forecaster does
            not have, or the result fails the daemon's checks.
        ParityError: the slim graphs disagree beyond export's tolerance.
        trainer.models.from_onnx.RecoveryError: ``src``'s forecaster graph
            does not rebuild a network.
    """
    from export import ExportError, publish_new_dir
    from export.manifest import default_version
    from export.to_onnx import export_forecaster, op_counts
    from export.verify import allocator_graph_parity, forecaster_parity
    from trainer.models.from_onnx import load_forecaster

    old = load_manifest(src)
    if dest.exists() and not force:
        raise ExportError(f"{dest}: exists (pass --force to replace it)")
    f_file, a_file = old.forecaster.file, old.allocator.file
    f_before, a_before = (src / f_file).read_bytes(), (src / a_file).read_bytes()
    rebuilt = load_forecaster(src, windows)
    kept = None
    if members is not None:
        kept = _keep_members(rebuilt.model, members)
        log(f"slim: forecaster members {kept['kept']} of {kept['of']} kept")
    f_bytes, f_report = slim_forecaster(export_forecaster(rebuilt.model))
    a_bytes, a_report = slim_allocator(a_before)
    f_nodes_before = len(onnx.load_from_string(f_before).graph.node)
    f_changed = f_report.nodes_after < f_nodes_before
    a_changed = bool(a_report.norms_folded_into_gemm)
    if not (f_changed or a_changed):
        raise ExportError(f"{src}: nothing to slim (both graphs are slim already)")
    raw = old.to_json()
    par = raw.setdefault("parity", {})
    exp = raw.setdefault("export", {})
    slim = exp.setdefault("slim", {})
    if not f_changed:
        f_bytes = f_before
    else:
        log(f"slim: {f_file} re-exported, {f_nodes_before} -> {f_report.nodes_after} nodes")
        f_par = forecaster_parity(rebuilt.model, f_bytes, windows)
        log(f"verify: forecaster max rel err {f_par.max_rel_err:.2e} on {f_par.n} windows")
        par["forecaster"] = f_par.to_json() | {
            "inputs": windows_source,
            "against": f"the network rebuilt from {old.version}'s graph, re-exported",
        }
        slim[f_file] = asdict(f_report)
    if not a_changed:
        a_bytes = a_before
    else:
        log(f"slim: {a_file} {a_report.nodes_before} -> {a_report.nodes_after} nodes")
        point, low, high = (o[:, 0] for o in session(f_bytes).run(None, {"window": windows}))
        states = build_state(windows, point, low, high, DEFAULT_STEP_S)
        a_par = allocator_graph_parity(a_before, a_bytes, states)
        log(
            f"verify: allocator max rel err {a_par.max_rel_err:.2e}, greedy actions agree"
            f" {a_par.action_agreement:.2%} on {a_par.n} states"
        )
        par["allocator"] = a_par.to_json() | {"against": f"{old.version}'s graph"}
        slim[a_file] = asdict(a_report)
    par["max_rel_err"] = max(
        float(par.get(k, {}).get("max_rel_err", 0.0)) for k in ("forecaster", "allocator")
    )
    digest = hashlib.sha256(
        (old.version + hashlib.sha256(f_bytes + a_bytes).hexdigest()).encode()
    ).hexdigest()
    version = version or default_version(digest)
    raw["version"] = version
    raw["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    raw["forecaster"]["sha256"] = hashlib.sha256(f_bytes).hexdigest()
    raw["allocator"]["sha256"] = hashlib.sha256(a_bytes).hexdigest()
    exp.setdefault("provenance", {})["slimmed_from"] = old.version
    if kept is not None:
        exp["provenance"]["forecaster_members"] = kept
    for name, data in ((f_file, f_bytes), (a_file, a_bytes)):
        exp.setdefault("sizes_bytes", {})[name] = len(data)
        exp.setdefault("op_counts", {})[name] = op_counts(data)
    exp.pop("timings_ms", None)  # measured on the graphs before; not re-measured here
    manifest = Manifest.from_json(json.loads(json.dumps(raw)))
    files = {f_file: f_bytes, a_file: a_bytes}
    if old.horizon is not None:
        files[old.horizon.file] = (src / old.horizon.file).read_bytes()
    publish_new_dir(dest, files, manifest, force=force)
    log(f"export: published {dest} (version {version}, slimmed)")
    return manifest
