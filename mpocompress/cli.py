"""The ``mpocompress`` command line: parse, call one library function, render.

Heavy imports (torch, rich) happen inside the commands so that ``--help`` is instant. Data (tables,
``--json``) goes to stdout; messages and progress go to stderr. Known errors print one line and exit
with the code documented in :mod:`mpocompress.errors`; set ``MPOCOMPRESS_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mpocompress import __version__
from mpocompress.errors import EXIT_INTERNAL, EXIT_USAGE, Interrupted, MPOCompressError

DEBUG_ENV = "MPOCOMPRESS_DEBUG"


def _fail(message: str, code: int) -> None:
    click.echo(f"mpocompress: error: {message}", err=True)
    sys.exit(code)


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into one line on stderr and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except MPOCompressError as e:
            if os.environ.get(DEBUG_ENV):
                raise
            _fail(str(e), e.exit_code)
        except Interrupted as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted (every output is written atomically: nothing half-written was left)", 130)
        except Exception as e:  # a bug: still one line unless debugging
            if os.environ.get(DEBUG_ENV):
                raise
            _fail(f"internal error: {type(e).__name__}: {e} (set {DEBUG_ENV}=1 for the traceback)", EXIT_INTERNAL)

    return wrapper


def _protect_stdout() -> None:
    """Keep stdout for data only: point file descriptor 1 at stderr, so that whatever native
    libraries print (MKL, OpenMP) cannot corrupt ``--json``, and give Python's ``sys.stdout`` the
    real stdout. Only for a real process stdout (not under ``CliRunner``)."""
    try:
        if sys.stdout.fileno() != 1:
            return
    except (AttributeError, OSError, ValueError):
        return
    import io

    sys.stdout.flush()
    data_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(os.fdopen(data_fd, "wb"), encoding=sys.stdout.encoding, line_buffering=True)


class _StderrHandler(logging.Handler):
    """Library log messages as lines on the current stderr (never stdout)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # logging must never break the command
            self.handleError(record)


class _Group(click.Group):
    """Usage errors as one line (``mpocompress: error: ...``, exit 2), like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        if extra.pop("_protect", True):
            _protect_stdout()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            hint = f" (see: mpocompress {e.ctx.command.name} --help)" if e.ctx is not None and e.ctx.command is not self else ""
            _fail(e.format_message().replace("\n", " ") + hint, EXIT_USAGE)
        except click.ClickException as e:
            _fail(e.format_message().replace("\n", " "), e.exit_code)
        except click.Abort:
            _fail("interrupted", 130)
        sys.exit(rv if isinstance(rv, int) else 0)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _stdout_console():
    from rich.console import Console

    # wide enough that a table piped to a file is not squeezed into 80 columns
    return Console(width=None if sys.stdout.isatty() else 200)


def _show_progress() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


#: seconds between plain progress lines when stderr is not a terminal (a log file, a pipe)
PLAIN_PROGRESS_EVERY = 10.0


class _Progress:
    """A rich progress bar on stderr; off a terminal, a plain line every few seconds of long work;
    nothing when ``CI`` is set."""

    def __init__(self, label: str, show: bool = True):
        self.label = label
        self.show = show
        self.bar = None
        self.task = None
        self._plain = show and not sys.stderr.isatty() and not os.environ.get("CI")
        self._last = None

    def _plain_line(self, name: str, index: int, total: int) -> None:
        import time

        now = time.monotonic()
        if self._last is None:
            self._last = now
            return
        if now - self._last >= PLAIN_PROGRESS_EVERY:
            self._last = now
            click.echo(f"mpocompress: {self.label} {index}/{total} {name}", err=True)

    def __enter__(self) -> _Progress:
        if self.show and _show_progress():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=_stderr_console(), transient=True,
            )  # fmt: skip
            self.bar.__enter__()
        return self

    def __call__(self, name: str, index: int, total: int) -> None:
        if self.bar is None:
            if self._plain:
                self._plain_line(name, index, total)
            return
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=index, description=f"{self.label} {name}")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


class _TuneProgress(_Progress):
    """Fine-tuning steps on the progress bar, with the running and best held-out losses."""

    def __init__(self, show: bool = True) -> None:
        super().__init__("fine-tuning", show)

    def __call__(self, step: int, total: int, info: dict[str, Any]) -> None:  # type: ignore[override]
        if self.bar is None:
            if self._plain:
                self._plain_line(f"step, best held-out loss {info['best_val_loss']:.4g}", step, total)
            return
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=total)
        rnd = f" round {info['round']}" if "round" in info else ""
        self.bar.update(self.task, completed=step, total=total,
                        description=f"{self.label}{rnd} loss {info['loss']:.4g} best val {info['best_val_loss']:.4g}")  # fmt: skip


def _cores(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"expected an integer in 2..8 or 'auto', got {value!r}") from None
    if not 2 <= n <= 8:
        raise click.BadParameter(f"expected an integer in 2..8 or 'auto', got {n}")
    return n


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpocompress")
@click.option("-v", "--verbose", count=True, help="More messages on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Make trained PyTorch checkpoints small with MPO (tensor-train matrix) cores.

    \b
    Exit codes: 0 ok, 1 internal error (a bug), 2 bad usage, 3 bad input,
    4 bad output path, 5 quality gate (--max-error/--min-ratio) failed,
    130 interrupted.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logger = logging.getLogger("mpocompress")
    for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("mpocompress: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Output .safetensors file, or a folder (sharded, with model.safetensors.index.json).")
@click.option("--bond-dim", type=click.IntRange(min=1),
              help="Maximum bond dimension D (>= 1); with --cores auto every candidate stays within D.")
@click.option("--tol", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Relative Frobenius error target per layer, split over the bonds.")
@click.option("--ratio", type=click.FloatRange(1, min_open=True), help="Target compression ratio per layer (dense/compressed params).")
@click.option("--cores", default="auto", show_default=True, callback=lambda c, p, v: _cores(v),
              help="Cores per MPO, 2..8 (2 = truncated SVD), or 'auto' to pick per layer the least error at the budget.")
@click.option("--svd", type=click.Choice(["auto", "full", "randomized"]), default="auto", show_default=True,
              help="SVD used by the TT-SVD (randomized only applies with a known bond).")
@click.option("--prune", metavar="magnitude:S|channel:THETA|units:F",
              help="Prune what is stored: magnitude to sparsity S, PP channel pruning at THETA, or a fraction F of whole hidden units (needs --model/--data).")
@click.option("--quantize", metavar="kmeans:K|int8|seofp:E|fp16|bf16", help="Quantize what is stored (after pruning).")
@click.option("--prune-scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True,
              help="Magnitude pruning per tensor, or one threshold over all selected tensors.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), help="TOML file of per-layer choices ([default], [[layers]] match=...).")
@click.option("--include", multiple=True, metavar="PATTERN", help="Compress only matching tensors (glob or re:REGEX; repeatable).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave matching tensors untouched (glob or re:REGEX; repeatable).")
@click.option("--seed", default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Also write the JSON report to this file.")
@click.option("--force", is_flag=True, help="Replace an existing output written by mpocompress (never an input, never anything else).")
@click.option("--strict", is_flag=True, help="Exit 3 on a weight holding NaN/Inf (default: store it unchanged, with a warning).")
@click.option("--max-error", type=click.FloatRange(min=0), help="Exit 5 if any layer's relative error exceeds this.")
@click.option("--min-ratio", type=click.FloatRange(min=0, min_open=True), help="Exit 5 if the total compression ratio is below this.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Shard size of a folder output.")
@click.option("--als", "als_sweeps", default=0, show_default=True, type=click.IntRange(min=0),
              help="ALS sweeps refining the cores after TT-SVD (data-free); with a lossy codec, also refit the cores while quantizing.")
@click.option("--activations", "activations_path", type=click.Path(path_type=Path),
              help="safetensors of recorded layer inputs by weight name: fit those layers to their outputs on them.")
@click.option("--model", "model_spec", metavar="MODULE:FACTORY|hf",
              help="Calibrate and fine-tune: a callable (pkg.mod:fn or file.py:fn) returning the nn.Module; 'hf' (the default for a "
                   "model folder with config.json): built by transformers from the folder's config.")
@click.option("--data", "data_spec", metavar="PATH|MODULE:FACTORY",
              help="Calibration and fine-tuning batches: safetensors file/folder ('inputs'[, 'targets']), a factory, or a .txt/.jsonl "
                   "text file (tokenized with the model folder's tokenizer into --seq-len windows).")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per window of text --data.")
@click.option("--kd-loss", type=click.Choice(["auto", "mse", "kl", "stft"]), default="auto", show_default=True,
              help="Distillation loss: MSE between outputs, KL between softmaxes, or a multi-resolution STFT loss for waveform "
                   "outputs (auto: KL for text data, STFT when the model's output is a waveform, else MSE).")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True, help="Softmax temperature of --kd-loss kl.")
@click.option("--kd-hidden", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Weight of an added hidden-state MSE between student and teacher blocks (a transformer's layers; 0: off).")
@click.option("--val-data", "val_spec", metavar="PATH|MODULE:FACTORY", help="Held-out batches (default: the last 10% of --data).")
@click.option("--steps", type=click.IntRange(min=0), default=200, show_default=True, help="Fine-tuning steps at most (0: calibrate only, no training).")
@click.option("--calibration", type=click.Choice(["auto", "sequential", "sequential-plain", "dense", "none"]), default="auto", show_default=True,
              help="With --model/--data, fit each layer to its recorded inputs (whitened SVD, activation-aware MPO, GPTQ) before any "
                   "training: inputs in the model compressed so far, fitted to the dense layer's outputs (sequential) or to its "
                   "own (sequential-plain), inputs in the dense model (dense), or not at all; auto: sequential-plain for text data, "
                   "else sequential.")
@click.option("--calibration-samples", type=click.IntRange(min=1), metavar="N", help="Calibrate on at most N samples of --data.")
@click.option("--time", "time_limit", type=click.FloatRange(min=0, min_open=True), help="Fine-tuning seconds at most (whichever of --steps/--time comes first).")
@click.option("--lr", default="auto", show_default=True, callback=lambda c, p, v: _lr(v),
              help="Fine-tuning learning rate (Adam), or 'auto': a short probe of 1e-3..3e-5 (going up while the top rate is best) picks the best on held-out data.")
@click.option("--train", "train_sel", type=click.Choice(["all", "central", "outer"]), default="all", show_default=True,
              help="What trains: all parameters, only each MPO's central core, or only its outer cores.")
@click.option("--kd-weight", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="Weight of the distillation loss; the task loss (batches with targets) gets 1 - W.")
@click.option("--task-loss", type=click.Choice(["mse", "cross_entropy"]), default="mse", show_default=True, help="Task loss against targets.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Rows per batch when a data file holds one 'inputs' tensor.")
@click.option("--qat-grid", type=click.Choice(["fixed", "trained"]), default="fixed", show_default=True,
              help="Fine-tuning k-means-coded weights: keep the starting codebook (fixed), or learn its centroids with the weights (trained).")
@click.option("--curvature", type=click.Choice(["auto", "kfac", "none"]), default="auto", show_default=True,
              help="With calibration: fit SVD and MPO layers to the distillation loss's curvature at their outputs (kfac: one backward pass "
                   "of the dense model), to their output error alone (none), or auto: with --kd-loss kl both, keeping the lower held-out loss, "
                   "else none.")
@click.option("--task", type=click.Choice(["generic", "speech-enhancement"]), default="generic", show_default=True,
              help="speech-enhancement: --data/--val-data are folders of noisy/ and clean/ wavs; targets are ideal ratio masks.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local processes converting tensor groups in parallel (the output is the same for any N).")
@click.option("--ipkd", "ipkd_rounds", type=click.IntRange(min=1), help="Iterative pruning with distillation in N rounds (with --prune magnitude:S).")
@click.option("--target-size", metavar="SIZE", help="Make the whole file <= SIZE (12.5% of the input, or 900KB / 2.1GB), choosing each layer's method and setting.")
@click.option("--target-ratio", type=click.FloatRange(1, min_open=True), help="The same as --target-size INPUT/R.")
@click.option("--sensitivity", type=click.Choice(["auto", "fisher", "output-fisher", "probe"]), default="auto", show_default=True,
              help="With --target-size and --data: weigh layers by probing each one's effect on the output (a forward pass per batch, "
                   "layer and option family), by a Fisher estimate (a backward pass per batch), by the Fisher of each layer's output times "
                   "its output error (output-fisher), or auto: probe up to 128 layers, Fisher beyond (output-fisher when --methods has no codec).")
@click.option("--methods", metavar="LIST", callback=lambda c, p, v: _methods(v),
              help="With --target-size: what the layers may be stored as, comma-separated: codec (casts, int8, k-means), svd "
                   "(2 cores), mpo (3+ cores), prune, lowrank (= svd,mpo). Default: all; keeping a layer dense is always allowed.")
@click.option("--passthrough-dtype", type=click.Choice(["auto", "keep", "float16", "bfloat16"]), default="auto", show_default=True,
              help="Store the tensors left uncompressed (biases, norm gains, buffers) as this float dtype where it changes each by "
                   "<= 0.1 % (bfloat16: 1 %; others are kept); reading restores their dtype. auto: float16 with --target-size/"
                   "--target-ratio, else keep.")
@_errors
@click.pass_context
def convert(ctx: click.Context, input_path: Path, output_path: Path, bond_dim, tol, ratio, cores, svd, prune, quantize, prune_scope, recipe_path, include, exclude, seed,
            as_json, report_path, force, strict, max_error, min_ratio, max_shard_size, als_sweeps, activations_path, model_spec, data_spec,
            val_spec, steps, calibration, calibration_samples, time_limit, lr, train_sel, kd_weight, task_loss, batch_size, task, workers,
            ipkd_rounds, target_size, target_ratio, seq_len, kd_loss, temperature, kd_hidden, sensitivity, methods, qat_grid, curvature, passthrough_dtype) -> None:  # fmt: skip
    """Compress the weight matrices of INPUT into MPO cores and write a compact checkpoint.

    \b
    Examples:
      mpocompress convert model.safetensors -o model.mpo.safetensors --ratio 4
      mpocompress convert ckpt.pt -o small.safetensors --bond-dim 16 --cores 2 --exclude "*embed*"
      mpocompress convert big/ -o big-mpo/ --tol 0.2 --json --max-error 0.25 --min-ratio 3
      mpocompress convert se.pt -o se.pq.safetensors --prune channel:0.65 --quantize kmeans:16
      mpocompress convert se.pt -o se.mpo.safetensors --ratio 10 --model mymodels:build --data batches/ --steps 300
      mpocompress convert se.pt -o se.q.safetensors --quantize kmeans:16 --model mymodels:build --data batches/ --steps 0
      mpocompress convert SmolLM2/ -o small/ --ratio 2 --include "*proj*" --data calib.txt --seq-len 256 --steps 0
      mpocompress convert big/ -o big-mpo/ --ratio 8 --cores 2 --workers 8
      torchrun --nproc-per-node 4 -m mpocompress convert big/ -o big-mpo/ --ratio 8

    \b
    MPO is applied when --bond-dim, --tol or --ratio is given; --prune/--quantize
    alone apply only themselves, and with MPO they apply to the cores.
    With --model and --data every layer is first fitted to reproduce the dense model's outputs from
    the inputs it sees (calibration), then the compressed model is fine-tuned against the dense one
    (--steps 0: not).
    An interrupted conversion resumes from the work folder (.OUTPUT.partial) when run again.
    Under torchrun each rank converts its share (fine-tuning is data-parallel); rank 0 reports.
    """
    from mpocompress.config import Gates, MPOConfig, TuneConfig

    tune_opts = {"steps": "--steps", "time_limit": "--time", "lr": "--lr", "train_sel": "--train", "kd_weight": "--kd-weight",
                 "task_loss": "--task-loss", "batch_size": "--batch-size", "ipkd_rounds": "--ipkd", "val_spec": "--val-data", "task": "--task",
                 "calibration": "--calibration", "calibration_samples": "--calibration-samples", "seq_len": "--seq-len",
                 "kd_loss": "--kd-loss", "temperature": "--temperature", "kd_hidden": "--kd-hidden", "qat_grid": "--qat-grid",
                 "curvature": "--curvature"}  # fmt: skip
    from mpocompress.text.hf import is_model_folder

    if model_spec is None and data_spec is not None and is_model_folder(input_path):
        model_spec = "hf"  # a Hugging Face folder: the model is built from its config.json
    if model_spec is None or data_spec is None:
        if model_spec is not None or data_spec is not None:
            raise click.UsageError("fine-tuning needs both --model and --data")
        used = [flag for o, flag in tune_opts.items() if ctx.get_parameter_source(o) is not click.core.ParameterSource.DEFAULT]
        if used:
            raise click.UsageError(f"{used[0]} needs --model and --data (fine-tuning)")

    given, recipe = _given_options(ctx, recipe_path, bond_dim=bond_dim, tol=tol, ratio=ratio, prune=prune, quantize=quantize,
                                   cores=cores, svd=svd, prune_scope=prune_scope, seed=seed, als_sweeps=als_sweeps)  # fmt: skip
    target = _target(ctx, target_size, target_ratio, input_path)
    _allocation_options(ctx, target)
    if target is not None:  # the allocation chooses every layer's method: a placeholder base config
        given = {"quantize": "int8", "seed": seed}
    config = MPOConfig(**given, include=include, exclude=exclude)
    gates = Gates(max_error=max_error, min_ratio=min_ratio)

    # every path this command writes is checked before any work starts
    from mpocompress.io import guard_outputs, input_paths
    from mpocompress.jobs.plan import check_output_name

    check_output_name(output_path)
    outputs = [(output_path, "checkpoint")] + ([(report_path, "report")] if report_path is not None else [])
    guard_outputs(outputs, input_paths(input_path), force)

    from mpocompress.errors import GateError
    from mpocompress.io import write_text
    from mpocompress.jobs.convert import convert as run_convert
    from mpocompress.jobs.plan import parse_size
    from mpocompress.report import check_gates

    shard_bytes = parse_size(max_shard_size)
    extra: dict[str, Any] = {"narrow": {"auto": "float16" if target is not None else None, "keep": None}.get(passthrough_dtype, passthrough_dtype)}
    if activations_path is not None:
        from mpocompress.jobs.inputs import read_activations

        extra["activations"] = read_activations(activations_path)
    if model_spec is not None:
        from mpocompress.text.data import is_text

        if auto_kd := kd_loss == "auto":
            kd_loss = "kl" if is_text(data_spec) else "mse"
        tune = TuneConfig(steps=steps, time=time_limit, lr=lr, train=train_sel, kd_weight=kd_weight, kd_loss=kd_loss, temperature=temperature,
                          kd_hidden=kd_hidden, task_loss=task_loss, batch_size=batch_size, ipkd=ipkd_rounds or 0, seed=seed, qat_grid=qat_grid,
                          curvature=curvature)  # fmt: skip
        extra.update(_tuning_inputs(model_spec, data_spec, val_spec, task, prune, seed, tune, input_path, seq_len, auto_kd and kd_loss == "mse"))
        if calibration == "auto":  # measured: corrected targets help SE/encoder models, overfit on a language model
            calibration = "sequential-plain" if is_text(data_spec) else "sequential"
        sequential = {"sequential": True, "sequential-plain": "plain"}.get(calibration, False)
        extra.update(calibrate=calibration != "none", sequential=sequential, calibration_samples=calibration_samples)
    from mpocompress.jobs import dist

    started = dist.init_from_env()
    try:
        leader = dist.rank_world()[0] == 0
        with _Progress("converting", leader) as progress, _TuneProgress(leader) as tune_progress:
            if target is not None:
                from mpocompress.jobs.budget import convert_to_size

                report = convert_to_size(input_path, output_path, target, config, recipe=recipe, force=force,
                                         max_shard_bytes=shard_bytes, workers=workers, progress=progress,
                                         tune_progress=tune_progress, strict=strict, sensitivity=sensitivity, methods=methods,
                                         **_calibration(extra))  # fmt: skip
            else:
                report = run_convert(input_path, output_path, config, force=force, max_shard_bytes=shard_bytes, workers=workers,
                                     progress=progress, recipe=recipe, tune_progress=tune_progress, strict=strict, **extra)  # fmt: skip
    finally:
        if started:
            dist.shutdown()
    if not leader:
        return
    gate_error = None
    try:
        check_gates(report, gates)
    except GateError as e:
        gate_error = e
    data = report.to_dict()
    if report_path is not None:
        guard_outputs([(report_path, "report")], input_paths(input_path) + [output_path], force)
        write_text(report_path, json.dumps(data, indent=2) + "\n")
    _show_report(data, as_json, output_path)
    if gate_error is not None:
        raise gate_error


@main.command()
@click.argument("checkpoints", metavar="CKPT...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(["speech-enhancement", "lm"]), default="speech-enhancement", show_default=True,
              help="speech-enhancement: PESQ/STOI on noisy/clean wavs; lm: perplexity of causal language models on a text file.")
@click.option("--model", "model_spec", metavar="MODULE:FACTORY",
              help="A callable returning the mask model (e.g. mpocompress.speech.models:lstm_mask); --task lm builds it from config.json.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Folder with noisy/ and clean/ wav files (16 kHz); --task lm: a .txt/.jsonl file.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="--task lm: tokens per window.")
@click.option("--stride", type=click.IntRange(min=1), help="--task lm: tokens between window starts (default --seq-len: disjoint windows).")
@click.option("--max-tokens", type=click.IntRange(min=2), help="--task lm: score only the first N tokens of the text.")
@click.option("--metrics", default="pesq_wb,pesq_nb,stoi,estoi,si_sdr", show_default=True,
              help="Comma-separated; PESQ and STOI need the speech extra.")
@click.option("--limit", type=click.IntRange(min=1), help="Score only the first N utterances.")
@click.option("--no-noisy", is_flag=True, help="Leave out the unprocessed noisy input as a system.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores (means, per utterance, paired CIs) as JSON on stdout.")
@_errors
def evaluate(checkpoints: tuple[Path, ...], task: str, model_spec: str | None, data_dir: Path, seq_len: int, stride: int | None,
             max_tokens: int | None, metrics: str, limit: int | None, no_noisy: bool, as_json: bool) -> None:  # fmt: skip
    """Score speech-enhancement checkpoints (dense or compressed) on a noisy/clean set, or language
    models (model folders, dense or compressed) by perplexity on a text file.

    \b
    The first CKPT is the baseline: every other system's mean difference from it is shown with a
    paired 95 % bootstrap confidence interval over utterances (--task lm: its perplexity ratio).
    \b
    Examples:
      mpocompress evaluate dense.safetensors small.safetensors \\
          --model mpocompress.speech.models:lstm_mask --data corpus/test
      mpocompress evaluate --task lm SmolLM2/ small/ --data persuasion.txt --seq-len 512 --json
    """
    if task == "lm":
        _evaluate_lm(checkpoints, data_dir, seq_len, stride, max_tokens, as_json)
        return
    if model_spec is None:
        raise click.UsageError("--task speech-enhancement needs --model")
    from mpocompress.errors import ConfigError, InputError
    from mpocompress.jobs.decompress import load_state_dict
    from mpocompress.jobs.inputs import import_object
    from mpocompress.speech.data import load_pairs
    from mpocompress.speech.evaluate import evaluate_systems
    from mpocompress.speech.metrics import METRICS

    wanted = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise ConfigError(f"unknown metric {unknown[0] if unknown else metrics!r} (choose from {', '.join(METRICS)})")
    factory = import_object(model_spec, "--model")
    systems: dict[str, Any] = {} if no_noisy else {"noisy": None}
    for path in checkpoints:
        model = factory()
        sd = load_state_dict(path)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise InputError(f"{path}: does not fit the --model ({str(e).splitlines()[0]})") from e
        systems[str(path) if str(path) not in systems else f"{path}#{len(systems)}"] = model
    pairs = load_pairs(data_dir, limit=limit)
    with _Progress("scoring") as progress:
        result = evaluate_systems(systems, pairs, wanted, baseline=str(checkpoints[0]),
                                  progress=lambda name, i, n: progress(name, i, n))  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{result['utterances']} utterances from {data_dir}; differences vs {result['baseline']} (95 % CI)")
    table.add_column("system")
    for m in wanted:
        table.add_column(m, justify="right")
    for name, means in result["systems"].items():
        cells = []
        for m in wanted:
            cell = f"{means[m]:.3f}"
            if name in result["paired"]:
                ci = result["paired"][name][m]
                cell += f" ({ci['diff']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}])"
            cells.append(cell)
        table.add_row(name, *cells)
    _stdout_console().print(table)


@main.command()
@click.argument("path", metavar="CKPT", type=click.Path(path_type=Path))
@click.option("--cores", default=3, show_default=True, type=click.IntRange(min=2), help="Cores of the TT-SVD whose spectra are shown.")
@click.option("--include", multiple=True, metavar="PATTERN", help="Inspect only matching tensors (glob or re:REGEX).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Skip matching tensors.")
@click.option("--json", "as_json", is_flag=True, help="Print the spectra as JSON on stdout.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG of the spectra and error curves (needs matplotlib).")
@click.option("--force", is_flag=True, help="Replace an existing --plot written by mpocompress.")
@click.option("--target-size", metavar="SIZE", help="Show what convert --target-size SIZE would choose per layer (nothing is written).")
@click.option("--methods", metavar="LIST", callback=lambda c, p, v: _methods(v),
              help="With --target-size: the methods the layers may use (as convert --methods).")
@_errors
def inspect(path: Path, cores: int, include, exclude, as_json: bool, plot_path: Path | None, force: bool, target_size: str | None,
            methods: tuple[str, ...] | None) -> None:  # fmt: skip
    """Show each layer's bond-dimension spectra (dense CKPT) or the kept bonds (compressed CKPT)."""
    if target_size is not None:
        _inspect_plan(path, target_size, include, exclude, as_json, methods)
        return
    if methods is not None:
        raise click.UsageError("--methods limits the choices of --target-size: give --target-size")
    from mpocompress.errors import ConfigError
    from mpocompress.jobs.inspect import inspect_checkpoint as run_inspect

    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'mpocompress[plot]'") from None
        from mpocompress.io import guard_outputs, input_paths

        guard_outputs([(plot_path, "plot")], input_paths(path), force)
    with _Progress("analysing") as progress:
        result = run_inspect(path, cores=cores, include=include, exclude=exclude, progress=progress)
    if plot_path is not None:
        if result["compressed"]:
            raise ConfigError("--plot needs a dense checkpoint (a compressed one has no spectra to plot)")
        from mpocompress.render import plot_inspect

        plot_inspect(result, plot_path)
        click.echo(f"mpocompress: wrote {plot_path}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        from mpocompress.render import render_inspect

        render_inspect(result, _stdout_console())


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Dense output: .safetensors, or .pt/.pth/.bin (torch.save).")
@click.option("--force", is_flag=True, help="Replace an existing output (never the input).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@_errors
def decompress(input_path: Path, output_path: Path, force: bool, as_json: bool) -> None:
    """Rebuild the dense state dict of a compressed checkpoint (loads with strict=True)."""
    from mpocompress.jobs.decompress import decompress as run_decompress

    summary = run_decompress(input_path, output_path, force=force)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    click.echo(f"mpocompress: wrote {output_path} ({summary['tensors']} tensors)", err=True)


@main.command()
def example() -> None:
    """Print the path of the bundled example checkpoint (a small trained SE LSTM)."""
    from mpocompress.data import example_checkpoint

    click.echo(str(example_checkpoint()))


def _given_options(ctx: click.Context, recipe_path: Path | None, **options: Any) -> tuple[dict[str, Any], Any]:
    """The MPOConfig fields the user gave (explicit options win over a recipe's ``[default]``), and the recipe."""
    from mpocompress.config import Recipe

    given = {k: options[k] for k in ("bond_dim", "tol", "ratio", "prune", "quantize") if options[k] is not None}
    for k in ("cores", "svd", "prune_scope", "seed", "als_sweeps"):
        if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT:
            given[k] = options[k]
    recipe = None
    if recipe_path is not None:
        from mpocompress.io import read_toml

        default, recipe = Recipe.from_dict(read_toml(recipe_path))
        # explicit command-line options win over the recipe's [default]
        if any(k in given for k in ("bond_dim", "tol", "ratio")):
            default = {k: v for k, v in default.items() if k not in ("bond_dim", "tol", "ratio")}
        given = {**default, **given}
    return given, recipe


def _lr(value: str) -> float | None:
    """``--lr``: a positive number, or ``auto`` (None: probe)."""
    if value == "auto":
        return None
    try:
        lr = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'auto'") from None
    if not (lr > 0 and math.isfinite(lr)):
        raise click.BadParameter(f"must be a positive number or 'auto', got {value}")
    return lr


def _tuning_inputs(model_spec: str, data_spec: str, val_spec: str | None, task: str, prune: str | None, seed: int, tune: Any,
                   input_path: Path, seq_len: int, waveform_kd: bool = False) -> dict[str, Any]:  # fmt: skip
    """The model and batches fine-tuning needs, from ``--model``/``--data``/``--val-data``; with
    ``waveform_kd`` (``--kd-loss auto`` on tensor data) the tuning's loss becomes the STFT loss when
    the model's output is a waveform (:func:`mpocompress.jobs.finetune.kd_loss_for`)."""
    from mpocompress.jobs.inputs import import_object, read_batches
    from mpocompress.text.data import is_text

    batch_size = tune.batch_size
    if tune.ipkd and (prune is None or not prune.startswith("magnitude")):
        raise click.UsageError("--ipkd needs --prune magnitude:SPARSITY")
    if model_spec == "hf":
        from mpocompress.text.hf import is_model_folder, model_factory

        if not is_model_folder(input_path):
            raise click.UsageError(f"--model hf needs a model folder with config.json as INPUT, not {input_path}")
        factory = model_factory(input_path)
    else:
        factory = import_object(model_spec, "--model")
    if not callable(factory):
        raise click.UsageError(f"--model {model_spec!r} is not callable")
    import torch

    torch.manual_seed(seed)
    reader = read_batches
    if task == "speech-enhancement":
        from mpocompress.speech.data import folder_batches as reader
    elif is_text(data_spec) or (val_spec is not None and is_text(val_spec)):
        reader = _text_reader(input_path, seq_len)
    model, train = factory(), reader(data_spec, batch_size)
    if waveform_kd and train:
        import dataclasses

        from mpocompress.jobs.finetune import kd_loss_for

        tune = dataclasses.replace(tune, kd_loss=kd_loss_for(model, train[0]))
    return {"tune": tune, "model": model, "train_batches": train, "val_batches": reader(val_spec, batch_size) if val_spec else None}


def _text_reader(input_path: Path, seq_len: int) -> Any:
    """A batch reader for text ``--data``: tokenized with the input folder's tokenizer."""
    from mpocompress.text.data import is_text, text_batches
    from mpocompress.text.hf import is_model_folder, load_tokenizer

    if not is_model_folder(input_path):
        raise click.UsageError(f"text --data needs a model folder (config.json and tokenizer) as INPUT, not {input_path}")
    tokenizer = load_tokenizer(input_path)

    def read(spec: str, batch_size: int) -> list[Any]:
        if not is_text(spec):
            raise click.UsageError(f"{spec}: mix of text and tensor data; give .txt/.jsonl files for both --data and --val-data")
        return text_batches(Path(spec), tokenizer, seq_len, batch_size)

    return read


def _evaluate_lm(checkpoints: tuple[Path, ...], data: Path, seq_len: int, stride: int | None, max_tokens: int | None, as_json: bool) -> None:
    """``evaluate --task lm``: perplexity of each checkpoint, as JSON or a table."""
    from mpocompress.text.evaluate import evaluate_lm

    with _Progress("scoring") as progress:
        result = evaluate_lm(list(checkpoints), data, seq_len, stride, max_tokens, progress=progress)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from rich.table import Table

    first = next(iter(result["systems"].values()))
    table = Table(title=f"perplexity on {data}: {first['tokens']} tokens, windows of {seq_len} every {first['stride']}")
    for col in ("system", "perplexity", "vs baseline", "nll/token", "seconds"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for name, r in result["systems"].items():
        table.add_row(name, f"{r['ppl']:.3f}", f"{r['ppl_ratio']:.3f}x", f"{r['nll']:.4f}", f"{r['seconds']:.1f}")
    _stdout_console().print(table)


def _show_report(data: dict[str, Any], as_json: bool, output_path: Path) -> None:
    """The report on stdout (table or JSON) and the summary lines on stderr."""
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        from mpocompress.render import render_report

        render_report(data, _stdout_console())
    t = data["totals"]
    ft = data.get("finetune")
    if ft is not None:
        kd = ft["val_kd_loss"]
        lr = f" at lr {ft['lr']:g}" if ft.get("lr") else ""
        click.echo(f"mpocompress: fine-tuned {ft['steps']} steps{lr} in {ft['seconds']:.1f}s: held-out distillation loss "
                   f"{kd['compressed']:.4g} -> {kd['finetuned']:.4g}", err=True)  # fmt: skip

    click.echo(f"mpocompress: wrote {output_path} ({t['ratio']:.2f}x smaller tensors)", err=True)


def _allocation_options(ctx: click.Context, target: int | None) -> None:
    """``--sensitivity`` and ``--methods`` shape a ``--target-size`` allocation: not without one."""
    if target is not None:
        return
    if ctx.get_parameter_source("sensitivity") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--sensitivity weighs the layers of a --target-size allocation: give --target-size or --target-ratio")
    if ctx.params.get("methods") is not None:
        raise click.UsageError("--methods limits the choices of a --target-size allocation: give --target-size or --target-ratio")


def _methods(text: str | None) -> tuple[str, ...] | None:
    """``--methods``: the parsed list (None when not given)."""
    if text is None:
        return None
    from mpocompress.core.allocate import parse_methods

    try:
        return parse_methods(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--methods") from None


def _target(ctx: click.Context, target_size: str | None, target_ratio: float | None, input_path: Path) -> int | None:
    """The byte budget of ``--target-size``/``--target-ratio`` (None when neither is given)."""
    if target_size is None and target_ratio is None:
        return None
    if target_size is not None and target_ratio is not None:
        raise click.UsageError("give --target-size or --target-ratio, not both")
    chosen = [f for o, f in (("bond_dim", "--bond-dim"), ("tol", "--tol"), ("ratio", "--ratio"), ("prune", "--prune"),
                             ("quantize", "--quantize"), ("als_sweeps", "--als"), ("cores", "--cores"))
              if ctx.get_parameter_source(o) is not click.core.ParameterSource.DEFAULT]  # fmt: skip
    if chosen:
        raise click.UsageError(f"{chosen[0]} fixes every layer's setting; --target-size chooses them (use --recipe to fix some layers)")
    from mpocompress.io import open_checkpoint
    from mpocompress.jobs.budget import parse_target

    with open_checkpoint(input_path) as ckpt:
        input_bytes = ckpt.nbytes_on_disk
    return parse_target(target_size, input_bytes) if target_size is not None else int(input_bytes / target_ratio)


def _calibration(extra: dict[str, Any]) -> dict[str, Any]:
    """``convert`` arguments for ``--target-size``: the model and a few batches also measure each
    layer's effect on the output (calibration), before any fine-tuning."""
    out = dict(extra)
    if "model" in extra:
        batches = extra.get("val_batches") or extra["train_batches"][-8:]
        out.update(calibration_model=extra["model"], calibration_batches=batches[:8])
    return out


def _inspect_plan(path: Path, target_size: str, include: tuple[str, ...], exclude: tuple[str, ...], as_json: bool,
                  methods: tuple[str, ...] | None = None) -> None:  # fmt: skip
    """``inspect --target-size``: the allocation and its predicted damage, without writing."""
    from mpocompress.config import MPOConfig
    from mpocompress.io import open_checkpoint
    from mpocompress.jobs.budget import parse_target, plan_budget

    with open_checkpoint(path) as ckpt:
        input_bytes = ckpt.nbytes_on_disk
    target = parse_target(target_size, input_bytes)
    with _Progress("measuring") as progress:
        plan, _ = plan_budget(path, target, MPOConfig(quantize="int8", include=include, exclude=exclude), progress=progress, methods=methods,
                              narrow="float16")  # (what convert --target-size does by default)
    data = {"path": str(path), "input_bytes": input_bytes, "plan": plan.to_dict()}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from mpocompress.render import render_plan

    render_plan(data, _stdout_console())
