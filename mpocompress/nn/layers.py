"""MPO layers: drop-in ``nn.Module`` replacements whose weight matrices are MPO cores.

Implements the MPO layers of the seed papers: MPO fully-connected layers (Gao et al. 2020; Sun et al.
2020, MPO for speech enhancement) and MPO-LSTM, where the stacked-gate ``weight_ih``/``weight_hh``
matrices of an LSTM are each one MPO. A weight named ``weight`` (or ``weight_ih_l0``...) is held as a
``ParameterList`` named ``weight_cores`` (``weight_ih_l0_cores``...), so state-dict keys line up with
the tensors of a ``mpocompress convert`` output (``fc.weight_cores.0``...).

Every layer contracts its cores on the fly; the contraction is chosen per batch size (see
:mod:`mpocompress.core.contract`) and cached:

* ``mode="chain"``: always contract the input through the cores.
* ``mode="materialize"``: build the dense matrix once and reuse it while the cores are unchanged
  (dense speed, compressed storage; in training the matrix is rebuilt each step with gradients).
* ``mode="auto"`` (default): choose per batch size (rounded up to a power of two) by a fixed cost
  model (:func:`mpocompress.core.contract.choose_contraction`), so a layer's output never depends on
  the machine's load. :func:`tune_` replaces that with timing on the user's machine, by explicit
  request (like ``torch.backends.cudnn.benchmark``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.config import MPOConfig
from mpocompress.core.compress import compress_matrix
from mpocompress.core.contract import chain_mats, choose_contraction, mpo_chain, mpo_rows
from mpocompress.core.modes import choose_modes
from mpocompress.core.tt import TTMatrix, cores_to_matrix, tt_svd

MODES = ("auto", "chain", "materialize")
#: at inference, sequences shorter than this run frame by frame even where dense matrices are faster
FUSED_MIN_STEPS = 16


def _tracing() -> bool:
    """True under torch.jit.trace (and so the legacy ONNX exporter), torch.compile and torch.export
    (and so the dynamo ONNX exporter). Called on every forward: keep it cheap."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class MPOMatrices(nn.Module):
    """Base class: named weight matrices, each either an MPO (cores) or a dense parameter.

    Subclasses call :meth:`_set_matrix` in their constructors and :meth:`_linear` in ``forward``.
    """

    def __init__(self, mode: str = "auto") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self._shapes: dict[str, tuple[int, int]] = {}  # MPO matrices: name -> (out, in)
        self._choice: dict[tuple[str, int, bool], str] = {}
        self._cache: dict[tuple[str, str], tuple[tuple, Any]] = {}

    # -- building ---------------------------------------------------------------------------
    def _set_matrix(self, name: str, value: torch.Tensor | TTMatrix | list[torch.Tensor], shape: tuple[int, int] | None = None) -> None:
        """Hold matrix ``name`` as MPO cores (a TTMatrix or a list of cores) or a dense parameter."""
        for attr in (name, name + "_cores"):
            if attr in self._parameters:
                del self._parameters[attr]
            if attr in self._modules:
                del self._modules[attr]
        self._shapes.pop(name, None)
        self._cache = {k: v for k, v in self._cache.items() if k[1] != name}
        self._choice = {k: v for k, v in self._choice.items() if k[0] != name}
        if isinstance(value, torch.Tensor):
            self.register_parameter(name, nn.Parameter(value))
            return
        cores = value.cores if isinstance(value, TTMatrix) else list(value)
        shape = value.shape if isinstance(value, TTMatrix) else shape
        if shape is None:
            raise ValueError(f"{name}: the (out, in) shape is needed with a list of cores")
        out_p = math.prod([int(c.shape[1]) for c in cores])
        in_p = math.prod([int(c.shape[2]) for c in cores])
        if shape[0] > out_p or shape[1] > in_p:
            raise ValueError(f"{name}: cores of padded shape ({out_p}, {in_p}) cannot hold a {tuple(shape)} matrix")
        self.add_module(name + "_cores", nn.ParameterList([nn.Parameter(c.detach().clone()) for c in cores]))
        self._shapes[name] = (int(shape[0]), int(shape[1]))

    def is_mpo(self, name: str) -> bool:
        """Whether matrix ``name`` is held as MPO cores."""
        return name in self._shapes

    def cores_of(self, name: str) -> list[torch.Tensor]:
        # straight from the ParameterList's dict: iterating the list object costs microseconds per call
        """The cores of MPO matrix ``name``."""
        return list(self._modules[name + "_cores"]._parameters.values())

    def matrix(self, name: str) -> torch.Tensor:
        """The dense ``(out, in)`` matrix ``name`` (built from cores if it is an MPO)."""
        if name in self._shapes:
            return cores_to_matrix(self.cores_of(name), self._shapes[name])
        return getattr(self, name)

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): cached matrices are stale
        self._cache.clear()
        return super()._apply(fn, recurse)

    # -- forward ----------------------------------------------------------------------------
    def _cached(self, kind: str, name: str, cores: list[torch.Tensor]):
        """The dense matrix (``kind="dense"``) or the chain matrices (``"mats"``) of ``name``, built
        once and reused while the cores are unchanged (in-place updates bump ``_version``)."""
        key = tuple(c._version for c in cores)
        hit = self._cache.get((kind, name))
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            value = cores_to_matrix(cores, self._shapes[name]) if kind == "dense" else chain_mats(cores)
        self._cache[(kind, name)] = (key, value)
        return value

    def _run(self, how: str, name: str, x: torch.Tensor, cores: list[torch.Tensor], bias, grad: bool) -> torch.Tensor:
        """``x @ W^T + bias`` for a 2-D ``x``, by ``how`` ("chain" or "materialize")."""
        shape = self._shapes[name]
        fresh = grad or _tracing()  # build from the cores so gradients / the traced graph see them
        if how == "materialize":
            w = cores_to_matrix(cores, shape) if fresh else self._cached("dense", name, cores)
            return F.linear(x, w, bias)
        y = mpo_chain(x, cores, shape[0], None if fresh else self._cached("mats", name, cores))
        return y if bias is None else y + bias

    @staticmethod
    def _key(name: str, rows: int, grad: bool) -> tuple[str, int, bool]:
        # one choice per power-of-two bucket of rows: variable-length inputs (utterances, sentences)
        # would otherwise be timed at every new length
        return (name, 1 << max(int(rows) - 1, 0).bit_length(), grad)

    def _pick(self, name: str, x: torch.Tensor, cores: list[torch.Tensor], bias, grad: bool) -> str:
        """The contraction for this input: one :func:`tune_` timed, else the cost model's."""
        if _tracing():
            return self._by_cost(name, x.shape[0], cores, grad)
        key = self._key(name, x.shape[0], grad)
        choice = self._choice.get(key)
        if choice is None:
            if getattr(self, "_tuning", False):
                choice = self._time_choice(name, x, cores, bias, grad)
            else:
                choice = self._by_cost(name, x.shape[0], cores, grad)
            self._choice[key] = choice
        return choice

    def _by_cost(self, name: str, rows: int, cores: list[torch.Tensor], grad: bool) -> str:
        out_f, in_f = self._shapes[name]
        shapes = [tuple(c.shape) for c in cores]
        return choose_contraction(rows, shapes, out_f, in_f, training=grad, itemsize=cores[0].element_size())

    def _time_choice(self, name: str, x: torch.Tensor, cores: list[torch.Tensor], bias, grad: bool) -> str:
        """Time both contractions on this input and return the faster.

        Only under :func:`tune_`. The two are timed in alternation (2 warm-up rounds, then 12 rounds, median of each), so drift
        and cold caches hit both alike; the rounds stop early once one is 3x slower than the other in
        two successive rounds (timing a clearly slower contraction only costs time). In training
        (``grad``) "materialize" rebuilds the matrix each call, so that is what is timed.
        """
        detached = [c.detach() for c in cores]
        out_f = self._shapes[name][0]

        def call(how: str) -> None:
            if not grad:
                self._run(how, name, x, cores, bias, False)
            elif how == "chain":  # what a training step pays: no caches
                mpo_chain(x, detached, out_f)
            else:
                F.linear(x, cores_to_matrix(detached, self._shapes[name]), bias)

        times: dict[str, list[float]] = {"chain": [], "materialize": []}
        with torch.no_grad():
            for rnd in range(14):
                for how in times:
                    t0 = time.perf_counter()
                    call(how)
                    if rnd >= 2:
                        times[how].append(time.perf_counter() - t0)
                if rnd >= 3:
                    ch, ma = times["chain"][-2:], times["materialize"][-2:]
                    if all(c > 3 * m for c, m in zip(ch, ma)) or all(m > 3 * c for c, m in zip(ch, ma)):
                        break
        med = {how: sorted(ts)[len(ts) // 2] for how, ts in times.items()}
        return min(med, key=med.__getitem__)

    def _linear(self, name: str, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W_name^T (+ bias)`` for ``x`` of shape ``(..., in)``."""
        shape = self._shapes.get(name)
        if shape is None:
            return F.linear(x, getattr(self, name), bias)
        cores = self.cores_of(name)
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        how = self.mode if self.mode != "auto" else self._pick(name, x2, cores, bias, grad)
        y = self._run(how, name, x2, cores, bias, grad)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], shape[0])

    def compression(self) -> dict[str, Any]:
        """Parameters of the MPO matrices vs their dense size."""
        dense = sum(o * i for o, i in self._shapes.values())
        stored = sum(sum(c.numel() for c in self.cores_of(n)) for n in self._shapes)
        return {"dense_params": dense, "params": stored, "ratio": dense / stored if stored else 1.0}


def _compress(weight: torch.Tensor, config: MPOConfig | None, force: bool) -> TTMatrix | None:
    """Cores for a weight under ``config`` (None = exact); None if not smaller and not ``force``."""
    m = weight.detach().reshape(weight.shape[0], -1)
    if config is None:  # exact: 3 cores at full bond
        return tt_svd(m, *choose_modes(m.shape[0], m.shape[1], 3))
    res = compress_matrix(m, config)
    if res.tt is not None:
        return res.tt
    return res.best_tt if force else None


def _compress_weights(module: nn.Module, config: MPOConfig | None, names: list[str] | None, force: bool) -> dict[str, TTMatrix | None]:
    """Cores for each ``weight_*`` of an RNN or cell (all, or those in ``names``)."""
    return {
        name: _compress(p, config, force=force or config is None)
        for name, p in module.named_parameters()
        if name.startswith("weight_") and (names is None or name in names)
    }


def random_cores(out_f: int, in_f: int, out_modes, in_modes, bond_dims, device=None, dtype=None) -> list[torch.Tensor]:
    """Cores whose product has the variance of ``nn.Linear``'s default init (1 / (3 in))."""
    r = [1, *bond_dims, 1]
    d = len(out_modes)
    target = 1.0 / (3 * in_f)
    std = (target / math.prod(r)) ** (1 / (2 * d))
    return [torch.randn(r[k], out_modes[k], in_modes[k], r[k + 1], device=device, dtype=dtype) * std for k in range(d)]


class MPOLinear(MPOMatrices):
    """``nn.Linear`` whose weight is MPO cores.

    Args:
        in_features, out_features: as ``nn.Linear``.
        out_modes, in_modes: per-core modes (products >= the features; the rest is padding).
        bond_dims: interior bond dimensions (``len(out_modes) - 1`` of them).
        bias: learn an additive bias.
        mode: ``"auto"``, ``"chain"`` or ``"materialize"`` (module docstring).

    Trained from scratch, the cores start at a scale giving ``W`` the variance of ``nn.Linear``'s init.
    """

    def __init__(self, in_features: int, out_features: int, out_modes, in_modes, bond_dims, bias: bool = True,
                 *, mode: str = "auto", device=None, dtype=None) -> None:  # fmt: skip
        super().__init__(mode)
        self.in_features, self.out_features = in_features, out_features
        cores = random_cores(out_features, in_features, out_modes, in_modes, bond_dims, device, dtype)
        self._set_matrix("weight", cores, (out_features, in_features))
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features else 0
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_cores(cls, cores: list[torch.Tensor] | TTMatrix, in_features: int, out_features: int,
                   bias: torch.Tensor | None = None, *, mode: str = "auto") -> MPOLinear:  # fmt: skip
        """An ``MPOLinear`` holding the given cores (and bias)."""
        c0 = cores.cores[0] if isinstance(cores, TTMatrix) else cores[0]
        core_list = cores.cores if isinstance(cores, TTMatrix) else cores
        self = cls.__new__(cls)
        MPOMatrices.__init__(self, mode)
        self.in_features, self.out_features = in_features, out_features
        self._set_matrix("weight", list(core_list), (out_features, in_features))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(c0.device))
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: MPOConfig | None = None, *, mode: str = "auto") -> MPOLinear:
        """Compress an ``nn.Linear`` (device and dtype are inherited). ``config=None``: exact cores."""
        tt = _compress(linear.weight, config, force=True)
        return cls.from_cores(tt, linear.in_features, linear.out_features, linear.bias, mode=mode)

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix("weight")

    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` (same device and dtype)."""
        c0 = self.cores_of("weight")[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=c0.device, dtype=c0.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x`` of shape ``(..., in_features)``."""
        return self._linear("weight", x, self.bias)

    def extra_repr(self) -> str:
        """Shapes, modes and bonds, for ``print(model)``."""
        cores = self.cores_of("weight")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"out_modes={tuple(int(c.shape[1]) for c in cores)}, in_modes={tuple(int(c.shape[2]) for c in cores)}, "
            f"bond_dims={[int(c.shape[3]) for c in cores[:-1]]}, bias={self.bias is not None}, mode={self.mode!r}"
        )


class MPOConv(MPOMatrices):
    """``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` whose kernel, viewed as ``(out, in/groups * prod(k))``,
    is MPO cores. The kernel is rebuilt from the cores (cached in no-grad inference) and the
    convolution is the dense one."""

    def __init__(self, conv: nn.modules.conv._ConvNd, tt: TTMatrix | list[torch.Tensor], *, mode: str = "materialize") -> None:
        super().__init__(mode if mode != "chain" else "materialize")
        if conv.transposed:
            raise ValueError("transposed convolutions are not supported by MPOConv")
        self.kernel_shape = tuple(conv.weight.shape)
        self.dims = conv.weight.dim() - 2
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self._set_matrix("weight", tt, (self.kernel_shape[0], math.prod(self.kernel_shape[1:])))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, config: MPOConfig | None = None) -> MPOConv:
        """The MPO version of a ``Conv1d/2d/3d`` (its kernel as an ``(out, in * k...)`` MPO)."""
        return cls(conv, _compress(conv.weight, config, force=True))

    @property
    def weight(self) -> torch.Tensor:
        cores = self.cores_of("weight")
        fresh = (torch.is_grad_enabled() and any(c.requires_grad for c in cores)) or _tracing()
        w = cores_to_matrix(cores, self._shapes["weight"]) if fresh else self._cached("dense", "weight", cores)
        return w.reshape(self.kernel_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution with the kernel rebuilt from the cores."""
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        w = self.weight
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MPOConv1D(MPOMatrices):
    """Hugging Face's GPT-2 ``Conv1D`` (a linear layer whose weight is stored ``(in, out)``:
    ``y = x W + b``) with that weight as MPO cores, in its stored orientation (so the checkpoint's
    cores load as they are). The weight is rebuilt (cached in no-grad inference) and multiplied."""

    def __init__(self, module: nn.Module, tt: TTMatrix, *, mode: str = "auto") -> None:
        super().__init__(mode)
        self.nf, self.nx = int(module.nf), int(getattr(module, "nx", tt.shape[0]))
        self._set_matrix("weight", tt)
        self.bias = nn.Parameter(module.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix("weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W + bias`` for ``x`` of shape ``(..., nx)``."""
        cores = self.cores_of("weight")
        w = cores_to_matrix(cores, self._shapes["weight"]) if torch.is_grad_enabled() or _tracing() else self._cached("dense", "weight", cores)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], self.nf)


class MPOMultiheadAttention(MPOMatrices):
    """``nn.MultiheadAttention`` whose input projections (the packed ``in_proj_weight``, or
    ``q/k/v_proj_weight`` when key and value sizes differ) are MPO cores; ``out_proj`` is an
    ``MPOLinear`` when it was compressed. The forward pass is ``nn.MultiheadAttention``'s own (fast
    path included): it reads each projection as a dense matrix, rebuilt from the cores."""

    _MATRICES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

    def __init__(self, mha: nn.MultiheadAttention, tts: dict[str, TTMatrix], *, mode: str = "auto") -> None:
        super().__init__(mode)
        for key, value in mha.__dict__.items():  # sizes, flags (batch_first, dropout, ...)
            if not key.startswith("_") or key == "_qkv_same_embed_dim":
                if key != "training":
                    setattr(self, key, value)
        self.train(mha.training)
        for name, p in mha._parameters.items():
            if name in tts:
                self._set_matrix(name, tts[name])
            else:
                self.register_parameter(name, p)
        self.out_proj = mha.out_proj

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self.__dict__.get("_shapes", {}):
                return self.matrix(name)
            raise

    forward = nn.MultiheadAttention.forward
    merge_masks = nn.MultiheadAttention.merge_masks


class MPOEmbedding(MPOMatrices):
    """``nn.Embedding`` whose table is MPO cores; lookups contract only the rows asked for."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tt: TTMatrix | list[torch.Tensor], padding_idx: int | None = None) -> None:
        super().__init__("chain")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._set_matrix("weight", tt, (num_embeddings, embedding_dim))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, config: MPOConfig | None = None) -> MPOEmbedding:
        """The MPO version of an ``nn.Embedding``."""
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("MPOEmbedding does not support max_norm or sparse embeddings")
        return cls(emb.num_embeddings, emb.embedding_dim, _compress(emb.weight, config, force=True), emb.padding_idx)

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix("weight")

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the table, gathered from the cores without building it."""
        return mpo_rows(self.cores_of("weight"), index, self.embedding_dim)


class _MPORNNBase(MPOMatrices):
    """LSTM/GRU with any of ``weight_ih_l{k}[_reverse]``/``weight_hh_l{k}[_reverse]`` as MPO cores.

    Same constructor arguments, call signature and outputs as ``nn.LSTM``/``nn.GRU`` (no ``proj_size``).
    Gates are stacked as PyTorch stores them (LSTM i, f, g, o; GRU r, z, n) and each stacked matrix is
    one MPO (MPO-LSTM). In training (and whenever the dense matrices are the faster way) the matrices
    are built from the cores once per call and PyTorch's fused kernel runs the sequence; otherwise the
    input projection of all time steps is one batched product and the recurrent product is chained
    through the cores frame by frame (fastest for streaming with a small bond).
    """

    GATES = 0
    CELL = ""

    def __init__(self, rnn: nn.LSTM | nn.GRU, tts: dict[str, TTMatrix | None], *, mode: str = "auto") -> None:
        super().__init__(mode)
        if getattr(rnn, "proj_size", 0):
            raise ValueError("LSTM with proj_size is not supported")
        for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
            setattr(self, attr, getattr(rnn, attr))
        self.num_directions = 2 if rnn.bidirectional else 1
        for name, p in rnn.named_parameters():
            if name.startswith("weight_") and tts.get(name) is not None:
                self._set_matrix(name, tts[name])
            else:
                self.register_parameter(name, nn.Parameter(p.detach().clone()))
        self._names = [name for name, _ in rnn.named_parameters()]
        self._template = self._meta_template(rnn)

    @staticmethod
    def _meta_template(rnn: nn.LSTM | nn.GRU) -> list[nn.Module]:
        """A weightless (meta-device) copy of ``rnn`` for the fused kernel, in a list so that it is not
        a submodule (no parameters, no state-dict keys, untouched by ``.to()``)."""
        with torch.device("meta"):
            return [type(rnn)(rnn.input_size, rnn.hidden_size, num_layers=rnn.num_layers, bias=rnn.bias,
                              batch_first=rnn.batch_first, dropout=rnn.dropout, bidirectional=rnn.bidirectional)]  # fmt: skip

    def _fused(self, input: torch.Tensor) -> bool:
        """Run PyTorch's fused LSTM/GRU kernel on dense matrices built once per call?

        In training always (rebuilding a recurrent matrix at every frame, or chaining through cores
        frame by frame with autograd, is several times slower); with ``mode="materialize"`` always;
        with ``"auto"`` at inference for sequences of at least ``FUSED_MIN_STEPS`` frames when every MPO
        matrix times faster materialized at these sizes (streaming one frame at a time runs frame by
        frame: the fused call's fixed cost is larger than a frame's work)."""
        if self.mode == "chain" or _tracing():
            return False
        if self.mode == "materialize":
            return True
        if torch.is_grad_enabled() and any(c.requires_grad for n in self._shapes for c in self.cores_of(n)):
            return True
        steps = 1 if input.dim() == 2 else input.shape[0 if not self.batch_first else 1]
        batch = 1 if input.dim() == 2 else input.shape[1 if not self.batch_first else 0]
        if steps < FUSED_MIN_STEPS:  # streaming: the fused call's fixed cost (~0.5 ms) is not repaid
            return False
        for name in self._shapes:
            rows = batch if name.startswith("weight_hh") else steps * batch
            choice = self._choice.get(self._key(name, rows, False))  # per frame: no allocation on a hit
            if choice is None:
                choice = self._pick(name, input.new_zeros(rows, self._shapes[name][1]), self.cores_of(name), None, False)
            if choice != "materialize":
                return False
        return True

    def _fused_forward(self, input: torch.Tensor, hx: Any):
        grad = torch.is_grad_enabled()
        weights = {}
        for name in self._names:
            if name in self._shapes:
                cores = self.cores_of(name)
                fresh = grad and any(c.requires_grad for c in cores)
                weights[name] = cores_to_matrix(cores, self._shapes[name]) if fresh else self._cached("dense", name, cores)
            else:
                weights[name] = getattr(self, name)
        template = self._template[0]
        template.train(self.training)
        return torch.func.functional_call(template, weights, (input,) if hx is None else (input, hx))

    @classmethod
    def from_rnn(cls, rnn: nn.LSTM | nn.GRU, config: MPOConfig | None = None, *, names: list[str] | None = None,
                 mode: str = "auto", force: bool = False) -> _MPORNNBase:  # fmt: skip
        """Compress the weights of ``rnn`` (all, or those in ``names``); a weight whose MPO would not be
        smaller stays dense unless ``force``."""
        return cls(rnn, _compress_weights(rnn, config, names, force), mode=mode)

    def _cell(self, gi: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, whh: str, bhh: torch.Tensor | None):
        raise NotImplementedError

    def forward(self, input: torch.Tensor, hx: Any = None):
        if self._fused(input):
            return self._fused_forward(input, hx)
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        steps, batch = x.shape[0], x.shape[1]
        layers_dirs = self.num_layers * self.num_directions
        zeros = x.new_zeros(layers_dirs, batch, self.hidden_size)
        if hx is None:
            h0, c0 = zeros, (zeros if self.GATES == 4 else None)
        elif self.GATES == 4:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        else:
            h0, c0 = (hx.unsqueeze(1) if unbatched else hx), None
        h_n, c_n = [], []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                idx = layer * self.num_directions + direction
                b_ih = getattr(self, "bias_ih" + sfx) if self.bias else None
                b_hh = getattr(self, "bias_hh" + sfx) if self.bias else None
                gi = self._linear("weight_ih" + sfx, layer_in, b_ih)  # (T, B, G*H), one batched product
                h = h0[idx]
                c = c0[idx] if c0 is not None else None
                ys: list[torch.Tensor] = [h] * steps
                order = range(steps - 1, -1, -1) if direction else range(steps)
                for t in order:
                    h, c = self._cell(gi[t], h, c, "weight_hh" + sfx, b_hh)
                    ys[t] = h
                outs.append(torch.stack(ys))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            layer_in = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, True)
        out = layer_in
        hn = torch.stack(h_n)
        cn = torch.stack(c_n) if c_n else None
        if unbatched:
            out, hn = out.squeeze(1), hn.squeeze(1)
            cn = cn.squeeze(1) if cn is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return (out, (hn, cn)) if self.GATES == 4 else (out, hn)


def _lstm_step(self: MPOMatrices, gi, h, c, whh, bhh):
    g = gi + self._linear(whh, h, bhh)
    i, f, gg, o = g.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_step(self: MPOMatrices, gi, h, c, whh, bhh):
    gh = self._linear(whh, h, bhh)
    ir, iz, in_ = gi.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r = torch.sigmoid(ir + hr)
    z = torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1 - z) * n + z * h, None


class MPOLSTM(_MPORNNBase):
    """``nn.LSTM`` with MPO weights (MPO-LSTM). Build with :meth:`from_rnn` (alias :meth:`from_lstm`)."""

    GATES = 4

    def _cell(self, gi, h, c, whh, bhh):
        return _lstm_step(self, gi, h, c, whh, bhh)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, config: MPOConfig | None = None, **kwargs: Any) -> MPOLSTM:
        """The MPO version of an ``nn.LSTM`` (each stacked-gate matrix one MPO, as in MPO-LSTM)."""
        return cls.from_rnn(lstm, config, **kwargs)


class MPOGRU(_MPORNNBase):
    """``nn.GRU`` with MPO weights. Build with :meth:`from_rnn` (alias :meth:`from_gru`)."""

    GATES = 3

    def _cell(self, gi, h, c, whh, bhh):
        return _gru_step(self, gi, h, c, whh, bhh)

    @classmethod
    def from_gru(cls, gru: nn.GRU, config: MPOConfig | None = None, **kwargs: Any) -> MPOGRU:
        """The MPO version of an ``nn.GRU``."""
        return cls.from_rnn(gru, config, **kwargs)


class _MPOCellBase(MPOMatrices):
    """LSTMCell/GRUCell with MPO weights, for streaming (frame-by-frame) inference."""

    GATES = 0

    def __init__(self, cell: nn.LSTMCell | nn.GRUCell, tts: dict[str, TTMatrix | None], *, mode: str = "auto") -> None:
        super().__init__(mode)
        self.input_size, self.hidden_size, self.bias = cell.input_size, cell.hidden_size, cell.bias
        for name, p in cell.named_parameters():
            if name.startswith("weight_") and tts.get(name) is not None:
                self._set_matrix(name, tts[name])
            else:
                self.register_parameter(name, nn.Parameter(p.detach().clone()))

    @classmethod
    def from_cell(cls, cell, config: MPOConfig | None = None, *, names: list[str] | None = None,
                  mode: str = "auto", force: bool = False):  # fmt: skip
        return cls(cell, _compress_weights(cell, config, names, force), mode=mode)

    def forward(self, input: torch.Tensor, hx: Any = None):
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        zeros = x.new_zeros(x.shape[0], self.hidden_size)
        if self.GATES == 4:
            h, c = (zeros, zeros) if hx is None else hx
            if unbatched and hx is not None:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
        else:
            h = zeros if hx is None else (hx.unsqueeze(0) if unbatched else hx)
            c = None
        gi = self._linear("weight_ih", x, self.bias_ih if self.bias else None)
        step = _lstm_step if self.GATES == 4 else _gru_step
        h, c = step(self, gi, h, c, "weight_hh", self.bias_hh if self.bias else None)
        if unbatched:
            h = h.squeeze(0)
            c = c.squeeze(0) if c is not None else None
        return (h, c) if self.GATES == 4 else h


class MPOLSTMCell(_MPOCellBase):
    """``nn.LSTMCell`` with MPO weights."""

    GATES = 4


class MPOGRUCell(_MPOCellBase):
    """``nn.GRUCell`` with MPO weights."""

    GATES = 3


def tune_(model: nn.Module, *example_inputs: Any, train: bool = False, **example_kwargs: Any) -> dict[str, dict]:
    """Time each MPO layer's two contractions on this machine and keep the faster, in place.

    Opt-in, like ``torch.backends.cudnn.benchmark``: by default layers choose by a fixed cost model
    (deterministic); after ``tune_`` a layer's choice for the batch sizes seen here follows the
    timing, which depends on the machine and its load. Runs ``model(*example_inputs)`` once (with
    gradients and a backward pass when ``train``).

    Returns:
        ``{module name: {(weight, rows bucket, training): choice}}`` for every MPO module.
    """
    mpo = {n: m for n, m in model.named_modules() if isinstance(m, MPOMatrices)}
    for m in mpo.values():
        m._choice = {}
        m._tuning = True
    try:
        if train:
            out = model(*example_inputs, **example_kwargs)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(*example_inputs, **example_kwargs)
    finally:
        for m in mpo.values():
            m._tuning = False
    return {n: dict(m._choice) for n, m in mpo.items()}
