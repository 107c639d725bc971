"""Train a reference speech-enhancement model on a paired corpus and save it as safetensors.

    python examples/speech_enhancement/train.py corpus/train -o lstm.safetensors --model lstm --steps 1500
    python examples/speech_enhancement/train.py corpus/train -o lstm_mpo.safetensors --model lstm --mpo-bond 8

Adam on the mask MSE against the ideal ratio mask, 200-frame segments, batch 16, seeded; the input
normalisation (per-bin mean/std of the training features) is stored in the checkpoint. ``--mpo-bond D``
builds the Linear/LSTM weights as MPOs (``--mpo-cores``, default 3) with bond D and trains the cores
from scratch (MPO paper); such a model is written in the ``convert`` format (cores + metadata), so
``mpocompress evaluate``/``inspect`` and ``mpocompress.load_state_dict`` read it like any compressed
checkpoint. The last 10 % of the batches are held out, checked after every pass over the data, and the
best held-out checkpoint is written. ``--steps`` makes a run reproducible; ``--minutes`` caps time.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from mpocompress.io import save_safetensors  # noqa: E402
from mpocompress.nn.surgery import save_compressed  # noqa: E402
from mpocompress.speech.data import load_pairs, make_batches, utterance_features  # noqa: E402
from mpocompress.speech.models import MPOSpec, build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="folder with noisy/ and clean/")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--model", choices=["lstm", "mlp", "gcrn"], default="lstm")
    ap.add_argument("--mpo-bond", type=int, help="train MPO layers of this bond from scratch")
    ap.add_argument("--mpo-cores", type=int, default=3, help="cores per MPO layer (with --mpo-bond)")
    ap.add_argument("--steps", type=int, help="training steps (default: as many as --minutes allows)")
    ap.add_argument("--minutes", type=float, help="training time at most (default 4 without --steps)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps is None and args.minutes is None:
        args.minutes = 4.0
    limit_s = args.minutes * 60 if args.minutes is not None else float("inf")
    max_steps = args.steps if args.steps is not None else float("inf")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    pairs = load_pairs(args.data)
    batches = make_batches(pairs, batch_size=16, seed=args.seed)
    n_val = max(1, len(batches) // 10)
    train, val = batches[:-n_val], batches[-n_val:]
    model = build(args.model, mpo=MPOSpec(args.mpo_bond, args.mpo_cores) if args.mpo_bond else None)
    model.set_normalisation(torch.cat([utterance_features(n, c)[0] for n, c in pairs[:200]]))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    mse = torch.nn.functional.mse_loss

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            v = sum(float(mse(model(x), y)) for x, y in val) / len(val)
        model.train()
        return v

    best, best_state, start, step = val_loss(), copy.deepcopy(model.state_dict()), time.time(), 0
    def done() -> bool:
        return step >= max_steps or time.time() - start >= limit_s

    while not done():
        for x, y in train:
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step()
            step += 1
            if done():
                break
        v = val_loss()
        if v < best:
            best, best_state = v, copy.deepcopy(model.state_dict())
        print(f"train: step {step}, held-out mask MSE {v:.4f} (best {best:.4f})", file=sys.stderr)
    model.load_state_dict(best_state)
    n_params = sum(p.numel() for p in model.parameters())
    if args.mpo_bond:
        save_compressed(model, args.output, force=True)
    else:
        save_safetensors(model.state_dict(), args.output, {"format": "pt"})
    print(f"train: wrote {args.output} ({n_params} parameters, {step} steps in {time.time() - start:.0f} s, "
          f"held-out mask MSE {best:.4f})", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
