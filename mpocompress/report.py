"""The size report: plain data, JSON-ready. Rendering lives in :mod:`mpocompress.render`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mpocompress.config import Gates
from mpocompress.errors import GateError

REPORT_VERSION = 1


@dataclass
class LayerRow:
    """One selected weight tensor in the report.

    ``rel_error`` is the relative Frobenius error of what is stored; ``svd_rel_error`` is the error of
    a plain truncated SVD (rank ``svd_rank``) with no more parameters than the cores, shown so that
    the MPO can be judged against the simplest alternative.
    """

    name: str
    kind: str
    shape: list[int]
    dtype: str
    status: str  # "mpo" (cores, maybe encoded) | "codec" (pruned/quantized weight) | "dense" (kept as is)
    dense_params: int
    params: int
    dense_bytes: int
    bytes: int
    rel_error: float
    svd_rank: int
    svd_rel_error: float
    cores: int | None = None
    out_modes: list[int] | None = None
    in_modes: list[int] | None = None
    padded_shape: list[int] | None = None
    bond_dims: list[int] | None = None
    reason: str | None = None
    codecs: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    #: what refined the stored values after TT-SVD/encoding: ALS, activation refit, fine-tuning
    refine: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.bytes if self.bytes else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data, with its ratio."""
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


@dataclass
class Report:
    """What a conversion did, per layer and in total."""

    input: str
    output: str
    config: dict[str, Any]
    rows: list[LayerRow]
    passthrough_tensors: int
    passthrough_params: int
    passthrough_bytes: int
    input_file_bytes: int
    #: the pass-through tensors' bytes in the input (more than ``passthrough_bytes`` when some were
    #: stored narrower: ``passthrough_narrowed`` of them); None: the same
    passthrough_dense_bytes: int | None = None
    passthrough_narrowed: int = 0
    output_file_bytes: int | None = None
    gates: dict[str, Any] = field(default_factory=dict)
    #: fine-tuning summary (held-out losses before/after, steps, time), when the model was trained
    finetune: dict[str, Any] | None = None
    #: how the work was done: groups, groups reused from an interrupted run, workers, ranks
    work: dict[str, Any] = field(default_factory=dict)
    #: ``--target-size``: the budget, each layer's choice and its predicted damage
    allocation: dict[str, Any] | None = None
    #: ``--model``/``--data``: the calibration (samples, weights recorded, seconds)
    calibration: dict[str, Any] | None = None

    def totals(self) -> dict[str, Any]:
        """Totals over the whole checkpoint: bytes, params, ratios, errors."""
        mpo = [r for r in self.rows if r.status != "dense"]
        pass_dense = self.passthrough_bytes if self.passthrough_dense_bytes is None else self.passthrough_dense_bytes
        dense_bytes = sum(r.dense_bytes for r in self.rows) + pass_dense
        stored_bytes = sum(r.bytes for r in self.rows) + self.passthrough_bytes
        errors = [r.rel_error for r in mpo]
        return {
            "layers": len(self.rows),
            "layers_compressed": len(mpo),
            "layers_kept_dense": len(self.rows) - len(mpo),
            "passthrough_tensors": self.passthrough_tensors,
            "passthrough_narrowed": self.passthrough_narrowed,
            "dense_params": sum(r.dense_params for r in self.rows) + self.passthrough_params,
            "params": sum(r.params for r in self.rows) + self.passthrough_params,
            "dense_bytes": dense_bytes,
            "bytes": stored_bytes,
            "ratio": dense_bytes / stored_bytes if stored_bytes else float("inf"),
            "compressed_layers_ratio": (
                sum(r.dense_bytes for r in mpo) / sum(r.bytes for r in mpo) if mpo else 1.0
            ),
            "max_rel_error": max(errors, default=0.0),
            "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
            "input_file_bytes": self.input_file_bytes,
            "output_file_bytes": self.output_file_bytes,
            "file_ratio": (
                self.input_file_bytes / self.output_file_bytes if self.output_file_bytes else None
            ),
        }

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (what ``--json`` prints)."""
        return {
            "report_version": REPORT_VERSION,
            "input": self.input,
            "output": self.output,
            "config": self.config,
            "layers": [r.to_dict() for r in self.rows],
            "totals": self.totals(),
            "gates": self.gates,
            **({"finetune": self.finetune} if self.finetune is not None else {}),
            **({"work": self.work} if self.work else {}),
            **({"allocation": self.allocation} if self.allocation is not None else {}),
            **({"calibration": self.calibration} if self.calibration is not None else {}),
        }


def check_gates(report: Report, gates: Gates) -> None:
    """Raise :class:`GateError` when the report misses a gate (records the outcome in ``report.gates``)."""
    failures = []
    totals = report.totals()
    if gates.max_error is not None:
        bad = [r for r in report.rows if r.rel_error > gates.max_error]
        report.gates["max_error"] = {"limit": gates.max_error, "failed_layers": [r.name for r in bad]}
        if bad:
            worst = max(bad, key=lambda r: r.rel_error)
            failures.append(
                f"{len(bad)} layer(s) above --max-error {gates.max_error:g} (worst {worst.name}: {worst.rel_error:.4g})"
            )
    if gates.min_ratio is not None:
        report.gates["min_ratio"] = {"limit": gates.min_ratio, "ratio": totals["ratio"]}
        if totals["ratio"] < gates.min_ratio:
            failures.append(f"total ratio {totals['ratio']:.3g}x below --min-ratio {gates.min_ratio:g}")
    report.gates["passed"] = not failures
    if failures:
        raise GateError("quality gate failed: " + "; ".join(failures))
