"""Rendering reports and spectra for people: rich tables, sparklines, a matplotlib figure.

Works on the JSON-ready dicts of :mod:`mpocompress.report` and :func:`mpocompress.jobs.convert.inspect`,
so what a person sees and what ``--json`` prints are the same numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

_BLOCKS = "▁▂▃▄▅▆▇█"


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``'1.5 KB'``."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def sparkline(values: list[float], width: int = 24) -> str:
    """Log-scale sparkline of a spectrum, scaled between its smallest (floored at 1e-8 of the largest)
    and largest value."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [values[min(int(i * step), len(values) - 1)] for i in range(width)]
    top = max(values) or 1.0
    logs = [math.log10(max(v / top, 1e-8)) for v in values]
    lo = min(logs)
    if lo == 0.0:
        return _BLOCKS[-1] * len(values)
    return "".join(_BLOCKS[min(int((x - lo) / -lo * (len(_BLOCKS) - 1) + 0.5), len(_BLOCKS) - 1)] for x in logs)


def _modes(out_modes: list[int] | None, in_modes: list[int] | None) -> str:
    if not out_modes:
        return "-"
    return "(" + ",".join(map(str, out_modes)) + ")x(" + ",".join(map(str, in_modes)) + ")"


#: report columns, most important first; on a narrow terminal the last ones are dropped first
_REPORT_COLUMNS = ("layer", "ratio", "error", "SVD error", "params", "bond dims", "cores", "codecs", "kind", "shape", "modes (out)x(in)")
_NUMERIC = {"ratio", "error", "SVD error", "params", "cores"}


def _report_cells(r: dict[str, Any]) -> dict[str, str]:
    if r["status"] == "dense":
        return {"layer": r["name"], "ratio": "1.0x", "error": "0", "SVD error": "-", "params": f"{r['dense_params']:,}",
                "bond dims": "-", "cores": "-", "codecs": "-", "kind": r["kind"], "shape": "x".join(map(str, r["shape"])),
                "modes (out)x(in)": "kept dense"}  # fmt: skip
    mpo = r["status"] == "mpo"
    return {
        "layer": r["name"], "ratio": f"{r['ratio']:.1f}x", "error": f"{r['rel_error']:.4f}",
        "SVD error": f"{r['svd_rel_error']:.4f} (r={r['svd_rank']})", "params": f"{r['dense_params']:,} -> {r['params']:,}",
        "bond dims": ",".join(map(str, r["bond_dims"])) if mpo else "-", "cores": str(r["cores"]) if mpo else "-",
        "codecs": " ".join(r.get("codecs") or []) or "-", "kind": r["kind"], "shape": "x".join(map(str, r["shape"])),
        "modes (out)x(in)": _modes(r["out_modes"], r["in_modes"]),
    }  # fmt: skip


def fit_columns(
    cells: list[dict[str, str]], columns: tuple[str, ...], width: int, fold: str = "layer", fold_min: int = 16
) -> tuple[list[str], int]:
    """The columns to show in ``width`` characters, and the width of the ``fold`` column: drop from
    the end of ``columns`` (the least important) until every other column fits whole; only ``fold``
    may wrap, down to ``fold_min`` characters."""
    need = {c: max([len(c), *(len(line) for row in cells for line in row[c].splitlines())]) + 3 for c in columns}
    shown = list(columns)
    while len(shown) > 5 and 1 + sum(need[c] for c in shown) > width:  # whole names if we can
        shown.pop()
    while len(shown) > 2 and 1 + sum(min(need[c], fold_min + 3) if c == fold else need[c] for c in shown) > width:
        shown.pop()
    room = width - 2 - sum(need[c] for c in shown if c != fold) - 3
    return shown, max(min(need[fold] - 3, room), fold_min)


def render_report(report: dict[str, Any], console: Console) -> None:
    """The size report: one row per selected layer, then the totals. On a narrow terminal the less
    important columns are left out (never cut: numbers are shown whole); ``--json`` has them all."""
    cells = [_report_cells(r) for r in report["layers"]]
    shown, layer_width = fit_columns(cells, _REPORT_COLUMNS, console.width)
    table = Table(title=f"mpocompress: {report['input']} -> {report['output']}", title_justify="left")
    for col in shown:
        table.add_column(col, justify="right" if col in _NUMERIC else "left", no_wrap=col != "layer", overflow="fold",
                         min_width=layer_width if col == "layer" else None)  # fmt: skip
    for r, row in zip(report["layers"], cells):
        table.add_row(*(row[c] for c in shown), style="dim" if r["status"] == "dense" else None)
    if len(shown) < len(_REPORT_COLUMNS):
        table.caption = f"({', '.join(c for c in _REPORT_COLUMNS if c not in shown)} left out at {console.width} columns; --json has every field)"
    console.print(table)
    t = report["totals"]
    console.print(
        f"[bold]total[/bold]: {t['layers_compressed']} of {t['layers']} layers compressed, "
        f"{t['layers_kept_dense']} kept dense, {t['passthrough_tensors']} other tensors "
        + ("stored as they are (fine-tuned where trained)" if report.get("finetune") else "unchanged")
        + (f" ({t['passthrough_narrowed']} of them stored in 16 bits)" if t.get("passthrough_narrowed") else "")
    )
    console.print(
        f"  tensors {human_bytes(t['dense_bytes'])} -> {human_bytes(t['bytes'])} "
        f"([bold]{t['ratio']:.2f}x[/bold]; compressed layers {t['compressed_layers_ratio']:.2f}x), "
        f"params {t['dense_params']:,} -> {t['params']:,}"
    )
    if t.get("output_file_bytes"):
        console.print(
            f"  files on disk {human_bytes(t['input_file_bytes'])} -> {human_bytes(t['output_file_bytes'])} "
            f"({t['file_ratio']:.2f}x)"
        )
    alloc = report.get("allocation")
    if alloc:
        console.print(
            f"  target {human_bytes(alloc['target_bytes'])}: wrote {human_bytes(alloc['written_bytes'])} "
            f"({alloc['passes']} pass(es)); predicted damage {alloc['predicted_damage']:.4g} ({alloc['damage']}); "
            "each layer's choice is in --json under allocation"
        )
    ft = report.get("finetune")
    what = "weight error vs the original (after fine-tuning)" if ft else "relative error"
    console.print(f"  {what}: max {t['max_rel_error']:.4f}, mean {t['mean_rel_error']:.4f}")
    if ft:
        kd = ft["val_kd_loss"]
        line = (
            f"  fine-tuned {ft['steps']} steps ({ft['seconds']:.1f} s, train={ft['config']['train']}"
            + (f", IPKD {len(ft['rounds'])} rounds" if "rounds" in ft else "")
            + f"): held-out distillation loss {kd['compressed']:.4g} -> [bold]{kd['finetuned']:.4g}[/bold]"
        )
        if "val_task_loss" in ft:
            tl = ft["val_task_loss"]
            line += f"; task loss dense {tl['dense']:.4g}, compressed {tl['compressed']:.4g}, fine-tuned {tl['finetuned']:.4g}"
        console.print(line)
    refits = [r for r in report["layers"] if r.get("refine", {}).get("activation_refit")]
    for r in refits:
        a = r["refine"]["activation_refit"]
        console.print(f"  [dim]{r['name']}: output error on recorded inputs {a['output_error_before']:.4f} -> {a['output_error_after']:.4f}[/dim]")
    for k in (r for r in report["layers"] if r.get("reason")):
        console.print(f"  [dim]{k['name']}: {k['reason']}[/dim]")
    skipped_als = [r["name"] for r in report["layers"] if r.get("refine", {}).get("als_skipped")]
    if skipped_als:
        console.print(f"  [dim]--als: {len(skipped_als)} layer(s) chose 2 cores (a truncated SVD, already optimal): "
                      f"nothing to refine ({', '.join(skipped_als[:3])}{' ...' if len(skipped_als) > 3 else ''})[/dim]")  # fmt: skip


def render_inspect(result: dict[str, Any], console: Console) -> None:
    """Spectra of a dense checkpoint, or the stored layers of a compressed one."""
    if result["compressed"]:
        _render_compressed(result, console)
        return
    pct = "/".join(f"{f * 100:g}" for f in (0.9, 0.99, 0.999))
    table = Table(
        title=f"bond spectra of {result['path']} ({result['cores']} cores, untruncated TT-SVD)", title_justify="left"
    )
    for col in ("layer", "matrix", "modes (out)x(in)", "spectrum per bond (log scale)", f"bond for {pct}% energy", "SVD spectrum", f"SVD rank for {pct}%"):
        table.add_column(col, no_wrap=col == "layer")
    for layer in result["layers"]:
        table.add_row(
            layer["name"],
            "x".join(map(str, layer["matrix_shape"])),
            _modes(layer["out_modes"], layer["in_modes"]),
            "\n".join(f"{b['bond']}: {sparkline(b['spectrum'])}" for b in layer["bonds"]),
            "\n".join(f"{b['bond']}: " + "/".join(map(str, b["energy_ranks"])) + f" of {b['full_rank']}" for b in layer["bonds"]),
            sparkline(layer["svd"]["spectrum"]),
            "/".join(map(str, layer["svd"]["energy_ranks"])) + f" of {layer['svd']['full_rank']}",
        )
    console.print(table)
    for skipped in result.get("skipped", []):
        console.print(f"  [dim]{skipped['name']}: skipped ({skipped['reason']})[/dim]")
    curve = Table(title="error vs compression: max bond -> ratio, MPO error | same-size SVD error", title_justify="left")
    curve.add_column("layer", no_wrap=True)
    bonds = sorted({p["max_bond"] for layer in result["layers"] for p in layer["curve"]})[:10]
    for b in bonds:
        curve.add_column(f"bond {b}", justify="right")
    for layer in result["layers"]:
        by_bond = {p["max_bond"]: p for p in layer["curve"]}
        cells = []
        for b in bonds:
            p = by_bond.get(b)
            cells.append("-" if p is None else f"{p['ratio']:.1f}x {p['rel_error']:.3f}|{p['svd_rel_error']:.3f}")
        curve.add_row(layer["name"], *cells)
    console.print(curve)


def _render_compressed(result: dict[str, Any], console: Console) -> None:
    meta = result["meta"]
    table = Table(
        title=f"{result['path']}: mpocompress format v{meta['format_version']} ({human_bytes(result['file_bytes'])})",
        title_justify="left",
    )
    for col in ("layer", "kind", "shape", "modes (out)x(in)", "bond dims", "codecs", "params", "error", "SVD error"):
        table.add_column(col, no_wrap=col == "layer")
    for name, e in meta["layers"].items():
        codecs = sorted({c for m in e.get("encoded", {}).values() for c in m["chain"]}, key=lambda c: c.split(":")[0] not in ("magnitude", "channel"))
        table.add_row(
            name, e["kind"], "x".join(map(str, e["shape"])), _modes(e.get("out_modes"), e.get("in_modes")),
            ",".join(map(str, e.get("bond_dims") or [])) or "-", " ".join(codecs) or "-", f"{e['dense_params']:,} -> {e['params']:,}",
            "-" if e.get("rel_error") is None else f"{e['rel_error']:.4f}",
            "-" if e.get("svd_rel_error") is None else f"{e['svd_rel_error']:.4f} (r={e['svd_rank']})",
        )  # fmt: skip
    console.print(table)
    cfg = ", ".join(f"{k}={v}" for k, v in meta["config"].items() if v not in (None, [], ()))
    console.print(f"config: {cfg}")
    t = meta.get("totals", {})
    if t:
        console.print(
            f"tensors {human_bytes(t['dense_bytes'])} -> {human_bytes(t['bytes'])} ({t['ratio']:.2f}x), "
            f"max error {t['max_rel_error']:.4f}"
        )


def plot_inspect(result: dict[str, Any], path: Path, max_layers: int = 16) -> None:
    """Write a PNG: per layer, the bond spectra (left) and error vs compression (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"][:max_layers]
    fig, axes = plt.subplots(len(layers), 2, figsize=(11, 2.6 * len(layers)), squeeze=False)
    for (ax_s, ax_e), layer in zip(axes, layers):
        for b in layer["bonds"]:
            ax_s.semilogy(range(1, len(b["spectrum"]) + 1), b["spectrum"], label=f"bond {b['bond']}")
        ax_s.semilogy(range(1, len(layer["svd"]["spectrum"]) + 1), layer["svd"]["spectrum"], "k--", label="SVD")
        ax_s.set_title(f"{layer['name']} {layer['matrix_shape'][0]}x{layer['matrix_shape'][1]}", fontsize=9)
        ax_s.set_xlabel("index")
        ax_s.set_ylabel("normalised singular value")
        ax_s.legend(fontsize=7)
        ratios = [p["ratio"] for p in layer["curve"]]
        ax_e.semilogx(ratios, [p["rel_error"] for p in layer["curve"]], "o-", label=f"MPO ({layer['cores']} cores)")
        ax_e.semilogx(ratios, [p["svd_rel_error"] for p in layer["curve"]], "s--", label="truncated SVD, same size")
        ax_e.set_xlabel("compression ratio")
        ax_e.set_ylabel("relative error")
        ax_e.set_ylim(0, 1.05)
        ax_e.legend(fontsize=7)
    fig.tight_layout()
    from mpocompress.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": "mpocompress"})
    plt.close(fig)


def render_plan(data: dict[str, Any], console: Console) -> None:
    """``inspect --target-size``: each layer's choice, its bytes and predicted damage, and the totals."""
    plan = data["plan"]
    table = Table(title=f"plan for {data['path']} at {human_bytes(plan['target_bytes'])} "
                        f"({plan['target_bytes'] / data['input_bytes']:.1%} of {human_bytes(data['input_bytes'])})",
                  title_justify="left")  # fmt: skip
    for col in ("layer", "choice", "bytes", "rel. error", "damage"):
        table.add_column(col, justify="left" if col in ("layer", "choice") else "right", overflow="fold")
    for name, layer in plan["layers"].items():
        table.add_row(name, layer["label"], human_bytes(layer["bytes"]), f"{layer['error']:.4g}", f"{layer['damage']:.4g}")
    console.print(table)
    console.print(
        f"  layers {human_bytes(plan['allocated_bytes'])} + other tensors {human_bytes(plan['fixed_bytes'])} + header "
        f"~{human_bytes(plan['header_estimate'])}; predicted damage {plan['predicted_damage']:.4g} ({plan['damage']}); "
        f"smallest possible layers {human_bytes(plan['smallest_bytes'])}"
    )
