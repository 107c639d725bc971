"""What storing the tensors passed through in float16 does to a ``--target-size`` cell.

    python benchmarks/passthrough.py                                  # the cells docs/results.md quotes
    python benchmarks/passthrough.py --cells convtasnet:0.0625:data   # MODEL:SHARE:no data|data

``--target-size`` stores the tensors it does not compress (biases, norm gains) in float16 by default
(``--passthrough-dtype``, format version 3) and gives the bytes saved to the layers. For each cell,
on ``benchmarks/budget.py``'s development models, test sets and calibration data: the conversion with
the pass-through kept in float32 and with float16 (each its own allocation), and the float32 file with
its pass-through tensors cast to float16 and back (the same allocation: what float16 alone costs).
Change from dense with paired 95 % bootstrap CIs. Writes ``benchmarks/results/passthrough.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import budget as dev  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mpocompress import MPOConfig  # noqa: E402
from mpocompress.format import read_meta  # noqa: E402
from mpocompress.io import open_checkpoint  # noqa: E402
from mpocompress.jobs.budget import convert_to_size  # noqa: E402
from mpocompress.jobs.decompress import load_state_dict  # noqa: E402
from mpocompress.speech.metrics import paired_ci  # noqa: E402
from mpocompress.speech.wav import paired_wavs, read_wav  # noqa: E402

CELLS = ("minilm:0.0625:data", "convtasnet:0.0625:no data", "convtasnet:0.0625:data")


def _data(name: str, spec: dict) -> tuple:
    """Test inputs, calibration inputs (as budget.py builds them)."""
    if name == "minilm":
        folder = spec["folder"]
        return dev.tokenize(folder, dev.sentences(60, 1)), dev.tokenize(folder, dev.sentences(8, 2))
    corpus = dev.WORK / "corpus"
    pairs = [(read_wav(n)[0], read_wav(c)[0]) for n, c in paired_wavs(corpus / "test")]
    calib = [(read_wav(n)[0], read_wav(c)[0]) for n, c in paired_wavs(corpus / "train")]
    return pairs, calib


def _cast_back(path: Path, out: Path) -> int:
    """``path``'s dense state dict with every float32 tensor it did not compress cast to float16 and back."""
    with open_checkpoint(path) as ck:
        layers = set(read_meta(ck)["layers"])
    sd = load_state_dict(path)
    cast = [k for k, v in sd.items() if v.dtype == torch.float32 and k not in layers]
    save_file({k: (v.half().float() if k in cast else v).contiguous() for k, v in sd.items()}, str(out))
    return len(cast)


def run_cell(cell: str, specs: dict) -> dict:
    name, share, mode = cell.split(":")
    spec = specs[name]
    test, calib = _data(name, spec)
    dense_outs, base, calib_model, calib_batches = dev._references(name, spec, test, calib)
    with open_checkpoint(spec["ckpt"]) as ck:
        target = int(ck.nbytes_on_disk * float(share))
    kw = {"calibration_model": calib_model, "calibration_batches": calib_batches} if mode == "data" else {}
    out_dir = dev.WORK / "out-passthrough"
    out_dir.mkdir(parents=True, exist_ok=True)
    row: dict = {"target_bytes": target}
    for narrow in (None, "float16"):
        path = out_dir / f"{name}-{share}-{mode.replace(' ', '_')}-{narrow or 'kept'}.safetensors"
        t0 = time.perf_counter()
        report = convert_to_size(spec["ckpt"], path, target, MPOConfig(quantize="int8"), force=True, narrow=narrow, **kw)
        ci = paired_ci(base, dev.evaluate_file(name, spec, path, test, dense_outs))
        alloc = report.allocation
        row[narrow or "float32"] = {"bytes": path.stat().st_size, "fixed_bytes": alloc["fixed_bytes"], "budget_bytes": alloc["budget_bytes"],
                                    "seconds": time.perf_counter() - t0, **ci}  # fmt: skip
        print(f"  {cell} pass-through {narrow or 'float32'}: {ci['diff']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]", flush=True)
        if narrow is None:
            cast = out_dir / f"{path.stem}-cast.safetensors"
            n = _cast_back(path, cast)
            ci = paired_ci(base, dev.evaluate_file(name, spec, cast, test, dense_outs))
            row["float32, cast to float16 after"] = {"tensors_cast": n, **ci}
            print(f"  {cell} float32 file, {n} pass-through tensors cast: {ci['diff']:+.4f}", flush=True)
            cast.unlink()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", nargs="+", default=list(CELLS), help="MODEL:SHARE:MODE, MODE 'no data' or 'data'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = dev.models(dev.fetch())
    path = Path(__file__).resolve().parent / "results" / "passthrough.json"
    results = json.loads(path.read_text())["results"] if path.exists() else {}
    for cell in args.cells:
        results[cell] = run_cell(cell, specs)
        path.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2) + "\n")
    for cell, row in results.items():
        print(f"{cell}: " + ", ".join(f"{k} {v['diff']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"
                                      for k, v in row.items() if isinstance(v, dict)))  # fmt: skip


if __name__ == "__main__":
    main()
