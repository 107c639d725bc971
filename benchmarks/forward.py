"""Forward speed of MPO layers: MPOLinear vs nn.Linear vs tltorch FactorizedLinear, one thread, one run.

    python benchmarks/forward.py              # full grid, a few minutes
    python benchmarks/forward.py --quick      # n = 1024 only

Grid: n x n layers (n = 1024, 4096), 4 cores with the same modes for both libraries ((4, 8, 8, 4), (8, 8, 8, 8)), max bond
8/32/128, batch 1 and 64; no-grad inference. For each point the median of repeated calls, the contenders timed in alternation:

* ``dense``           ``nn.Linear``
* ``tltorch``         ``tltorch.FactorizedLinear(factorization="blocktt", implementation="factorized")``
* ``mpo-chain``       ``MPOLinear(mode="chain")`` (contract the input through the cores)
* ``mpo-auto``        ``MPOLinear(mode="auto")`` (times chain vs a cached dense matrix once per batch size)

Also an LSTM speech-enhancement shape streamed frame by frame (input 257, hidden 512, batch 1):
``nn.LSTM`` vs ``MPOLSTM`` at bonds 8 and 32.

Writes ``benchmarks/results/forward.json`` and the tables in ``docs/benchmarks.md`` (``forward`` markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _docs import write_block  # noqa: E402
from torch import nn  # noqa: E402

from mpocompress.core.modes import choose_modes  # noqa: E402
from mpocompress.core.tt import tt_svd  # noqa: E402
from mpocompress.nn.layers import MPOLSTM, MPOLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def interleaved_medians(fns: dict, min_time: float = 0.5, max_rounds: int = 2000) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (round-robin) so that drift
    on a shared machine hits every contender alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while (time.perf_counter() - start < min_time or rounds < 5) and rounds < max_rounds:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}


def linear_point(n: int, bond: int, batch: int) -> dict:
    import tltorch

    torch.manual_seed(0)
    modes, _ = choose_modes(n, n, 4)  # (4, 8, 8, 4) for 1024, (8, 8, 8, 8) for 4096
    dense = nn.Linear(n, n)
    x = torch.randn(batch, n)
    fact = tltorch.FactorizedLinear(modes, modes, factorization="blocktt", rank=[1, bond, bond, bond, 1], implementation="factorized")
    ranks = [c.shape[-1] for c in fact.weight.factors[:-1]]
    tt = tt_svd(dense.weight.detach(), modes, modes, max_bond=bond)
    chain = MPOLinear.from_cores(tt, n, n, dense.bias, mode="chain")
    auto = MPOLinear.from_cores(tt, n, n, dense.bias, mode="auto")
    row = {"n": n, "bond": bond, "batch": batch, "bond_dims": tt.bond_dims, "tltorch_ranks": ranks,
           "params_mpo": tt.num_params, "params_tltorch": sum(f.numel() for f in fact.weight.factors)}  # fmt: skip
    with torch.no_grad():
        mods = {"dense": dense, "tltorch": fact, "mpo-chain": chain, "mpo-auto": auto}
        row.update(interleaved_medians({k: (lambda m=m: m(x)) for k, m in mods.items()}, min_time=min(2.0, 0.3 + n * n * batch / 4e8)))
        row["auto_choice"] = auto._choice.get(("weight", batch, False))
    return row


def lstm_point(bond: int, frames: int = 200) -> dict:
    torch.manual_seed(0)
    lstm = nn.LSTM(257, 512)
    from mpocompress.config import MPOConfig

    mpo = MPOLSTM.from_lstm(lstm, MPOConfig(bond_dim=bond, cores=4), force=True)
    xs = torch.randn(frames, 1, 1, 257)

    def stream(model):
        state = None
        for t in range(frames):
            _, state = model(xs[t], state)

    with torch.no_grad():
        t = interleaved_medians({"dense": lambda: stream(lstm), "mpo": lambda: stream(mpo)}, min_time=2.0)
        dense_t, mpo_t = t["dense"] / frames, t["mpo"] / frames
    return {"bond": bond, "hidden": 512, "input": 257, "dense_per_frame": dense_t, "mpo_per_frame": mpo_t,
            "params_dense": sum(p.numel() for n, p in lstm.named_parameters() if n.startswith("weight")),
            "params_mpo": sum(p.numel() for n, p in mpo.named_parameters() if "_cores" in n)}  # fmt: skip


def tables(rows: list[dict], lstm_rows: list[dict]) -> str:
    out = [
        "| n | bond | batch | dense ms | tltorch ms | mpo-chain ms | mpo-auto ms (choice) | dense / mpo-auto | tltorch / mpo-auto | mpo-auto / dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['n']} | {r['bond']} | {r['batch']} | {r['dense'] * 1e3:.3f} | {r['tltorch'] * 1e3:.3f} | {r['mpo-chain'] * 1e3:.3f} | "
            f"{r['mpo-auto'] * 1e3:.3f} ({r['auto_choice']}) | {r['dense'] / r['mpo-auto']:.1f}x | {r['tltorch'] / r['mpo-auto']:.1f}x | "
            f"{r['mpo-auto'] / r['dense']:.2f} |"
        )
    out += ["", "| LSTM 257 -> 512, streaming | bond | nn.LSTM us/frame | MPOLSTM us/frame | speed-up | weight params dense -> MPO |", "|---|---|---|---|---|---|"]
    for r in lstm_rows:
        out.append(
            f"| batch 1, 4 cores | {r['bond']} | {r['dense_per_frame'] * 1e6:.0f} | {r['mpo_per_frame'] * 1e6:.0f} | "
            f"{r['dense_per_frame'] / r['mpo_per_frame']:.2f}x | {r['params_dense']:,} -> {r['params_mpo']:,} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description="MPO layer forward speed")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in ([1024] if args.quick else [1024, 4096]):
        for bond in (8, 32, 128):
            for batch in (1, 64):
                r = linear_point(n, bond, batch)
                rows.append(r)
                print(f"n={n} bond={bond} batch={batch}: dense {r['dense'] * 1e3:.3f} ms, tltorch {r['tltorch'] * 1e3:.3f}, "
                      f"chain {r['mpo-chain'] * 1e3:.3f}, auto {r['mpo-auto'] * 1e3:.3f} ({r['auto_choice']})", flush=True)  # fmt: skip
    lstm_rows = [lstm_point(b) for b in (8, 32)]
    for r in lstm_rows:
        print(f"lstm bond={r['bond']}: dense {r['dense_per_frame'] * 1e6:.0f} us/frame, mpo {r['mpo_per_frame'] * 1e6:.0f}", flush=True)
    import tltorch

    env = {"torch": torch.__version__, "tltorch": tltorch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    out = ROOT / "benchmarks" / "results" / "forward.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "linear": rows, "lstm": lstm_rows}, indent=2))
    text = tables(rows, lstm_rows)
    print(text)
    if not args.no_docs:
        write_block("forward", f"Command: `python benchmarks/forward.py` (torch {env['torch']}, tltorch {env['tltorch']}, "
                    f"1 thread, {env['machine']}; no-grad, median per call).\n\n{text}")


if __name__ == "__main__":
    main()
