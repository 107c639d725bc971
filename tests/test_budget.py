"""--target-size: per-layer rate-distortion curves, one global allocation, a file under the budget."""

import contextlib
import itertools
import json
import math
import random

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mpocompress import MPOConfig
from mpocompress.cli import main
from mpocompress.config import apply_overrides
from mpocompress.core.allocate import Option, allocate, lower_hull, pareto
from mpocompress.data import example_checkpoint
from mpocompress.errors import ConfigError, GateError
from mpocompress.jobs import budget
from mpocompress.jobs.budget import convert_to_size, header_estimate, parse_target, plan_budget
from mpocompress.jobs.convert import convert
from mpocompress.jobs.curves import measure_options


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_allocation_matches_brute_force_on_small_problems():
    rng = random.Random(0)
    for _ in range(200):
        curves = {
            f"l{i}": [Option(f"o{j}", {}, rng.randint(1, 10**5), rng.random()) for j in range(rng.randint(1, 6))]
            for i in range(rng.randint(1, 4))
        }
        weights = {n: rng.choice([0.1, 1.0, 10.0]) for n in curves}
        budget = sum(min(o.nbytes for o in v) for v in curves.values()) + rng.randint(0, 2 * 10**5)
        a = allocate(curves, budget, weights)
        assert a.nbytes <= budget
        best = min(
            sum(o.error * weights[n] for n, o in zip(curves, combo))
            for combo in itertools.product(*curves.values())
            if sum(o.nbytes for o in combo) <= budget
        )
        assert sum(a.damage.values()) <= best * 1.001 + 1e-12


def test_each_option_family_has_its_own_weight():
    """A low-rank option and a codec with the same error do different damage once the layer's families
    are weighed apart; a family never probed takes the layer's largest weight."""
    from mpocompress.core.allocate import family
    from mpocompress.jobs.budget import allocate_damage, weight_of

    rank, codec, pruned = Option("mpo2 bond 4", {}, 10, 0.1), Option("kmeans:4", {}, 10, 0.1), Option("magnitude:0.5 + kmeans:16", {}, 10, 0.1)
    assert [family(o) for o in (rank, codec, pruned, Option("dense", {}, 40, 0.0))] == ["lowrank", "codec", "prune", "codec"]
    curves = {"a": [Option("a big", {}, 20, 0.0), rank, codec]}
    assert allocate_damage(curves, 10, {"a": {"codec": 1.0, "lowrank": 5.0}}).picks["a"] is codec
    assert allocate_damage(curves, 10, {"a": {"codec": 5.0, "lowrank": 1.0}}).picks["a"] is rank
    assert weight_of({"a": {"codec": 1.0, "lowrank": 5.0}}, "a", pruned) == 5.0
    assert weight_of({"a": {"*": 3.0}}, "a", rank) == 3.0 and weight_of(None, "a", rank) == 1.0


def test_without_data_errors_compound():
    """The data-free damage -log(1 - e): a layer near e = 1 (its output destroyed) costs more than its
    error says, so the allocation does not destroy one layer to spare another; picks keep true errors."""
    from mpocompress.jobs.budget import allocate_damage

    curves = {"a": [Option("a0", {}, 0, 0.95), Option("a1", {}, 10, 0.5)], "b": [Option("b0", {}, 0, 0.6), Option("b1", {}, 10, 0.0)]}
    plain = allocate(curves, 10)
    assert {o.label for o in plain.picks.values()} == {"a0", "b1"}  # 0.95 + 0 < 0.5 + 0.6
    compounded = allocate_damage(curves, 10, None, compound=True)
    assert {o.label for o in compounded.picks.values()} == {"a1", "b0"}  # 1 - 0.05 survives vs 0.5 * 0.4
    assert compounded.picks["a"] is curves["a"][1] and compounded.damage["b"] == pytest.approx(-math.log(0.4))
    small = {"a": [Option("a0", {}, 0, 1e-4)], "b": [Option("b0", {}, 0, 2e-4)]}  # small errors: the plain sum
    assert sum(allocate_damage(small, 10, None, compound=True).damage.values()) == pytest.approx(3e-4, rel=1e-3)


def test_infeasible_budget_names_the_smallest_total():
    curves = {"a": [Option("x", {}, 100, 0.5), Option("y", {}, 300, 0.0)], "b": [Option("x", {}, 50, 0.2)]}
    with pytest.raises(GateError, match="150 bytes"):
        allocate(curves, 120)


def test_pareto_and_hull():
    opts = [Option("a", {}, 10, 1.0), Option("b", {}, 20, 1.2), Option("c", {}, 30, 0.4), Option("d", {}, 40, 0.35), Option("e", {}, 50, 0.0)]
    assert [o.label for o in pareto(opts)] == ["a", "c", "d", "e"]
    assert [o.label for o in lower_hull(pareto(opts))] == ["a", "c", "e"]  # d lies above the segment c-e


@pytest.mark.parametrize("text", ["0%", "150%", "-3MB", "abc", "nan%", "0KB"])
def test_bad_targets_are_usage_errors(text):
    with pytest.raises(ConfigError):
        parse_target(text, 1000)


def test_parse_target():
    assert parse_target("12.5%", 8000) == 1000
    assert parse_target("2KB", 10) == 2048


def test_measured_options_are_exact(trained_like):
    w = load_file(str(trained_like))["a.weight"]
    options = measure_options("a.weight", w, {"a.weight": tuple(w.shape)})
    labels = {o.label for o in options}
    assert {"dense", "fp16", "int8", "kmeans:16", "kmeans:4"} <= labels and any(o.label.startswith("mpo2 bond") for o in options)
    assert any(o.label.startswith("mpo3 bond") for o in options) and any("+ int8" in o.label for o in options)
    dense = w.numel() * 4
    for o in options:
        assert 0 <= o.error <= 1.0 + 1e-9 and o.nbytes <= dense
    int8 = next(o for o in options if o.label == "int8")
    assert int8.nbytes == w.numel() + w.shape[0] * (4 + 2) and int8.error < 1e-3
    # options with coded cores (counted and decoded without packing): what convert stores
    from mpocompress.jobs.budget import _decoded
    from mpocompress.jobs.plan import compress_tensor

    norm2 = float(w.double().square().sum())
    for o in [o for o in options if o.label.startswith("mpo") and "+" in o.label]:
        cfg = apply_overrides(MPOConfig(quantize="int8"), o.overrides)
        _, _, stored = compress_tensor("a.weight", w, cfg, {"a.weight": tuple(w.shape)})
        assert sum(v.numel() * v.element_size() for v in stored.values()) == o.nbytes, o.label
        error = float((_decoded("a.weight", w, o).double() - w.double()).square().sum()) / norm2
        assert error == pytest.approx(o.error, rel=1e-4, abs=1e-9), o.label


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_options_left_unmeasured_are_dominated(trained_like, scale):
    """Skipping the options a measured codec already beats leaves the Pareto front as it was."""
    from mpocompress.jobs import curves as budget

    w = load_file(str(trained_like))["a.weight"]
    w = w + scale * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std()  # (low rank, and not)
    v = w.reshape(-1).double()
    norm2 = float(v @ v)
    every = (budget._alone(budget._codec_options, w, v, norm2, 4) + budget._alone(budget._svd_options, w, 4, norm2, None)
             + budget._alone(budget._mpo_options, w, 4, norm2, 3, None))  # fmt: skip
    measured = budget.measure_options("a.weight", w, {"a.weight": tuple(w.shape)})
    assert len(measured) - 1 < len(every) if scale else len(measured) - 1 <= len(every)  # (a full-rank weight: some skipped)
    assert [(o.label, o.nbytes) for o in pareto(measured[1:])] == [(o.label, o.nbytes) for o in pareto(every)]


def test_layers_measured_together_are_measured_as_alone():
    """measure_many solves several layers' k-means in one program: each curve is what it is alone."""
    from mpocompress.jobs.curves import measure_many

    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(48, 40, generator=g), torch.randn(8, 3, 5, generator=g), torch.randn(64, 24, generator=g).exp(),
               torch.randint(0, 5, (20, 12), generator=g).float()]  # fmt: skip
    together = measure_many(tensors)
    for t, curve in zip(tensors, together):
        alone = measure_options("w", t, {"w": tuple(t.shape)})
        assert [(o.label, o.nbytes) for o in curve] == [(o.label, o.nbytes) for o in alone]
        assert [o.error for o in curve] == pytest.approx([o.error for o in alone], rel=1e-9, abs=1e-15)


def test_target_size_end_to_end(tmp_path, trained_like):
    size = trained_like.stat().st_size
    out = tmp_path / "o.safetensors"
    report = convert_to_size(trained_like, out, size // 8, MPOConfig(quantize="int8"))
    written = out.stat().st_size
    assert written <= size // 8 and written >= 0.9 * (size // 8)  # under the budget, and close to it
    alloc = report.allocation
    assert alloc["written_bytes"] == written and set(alloc["layers"]) == {"a.weight", "b.weight", "c.weight"}
    # never worse than the best uniform setting that fits the same budget (the data-free damage)
    ours = sum(layer["error"] for layer in alloc["layers"].values())
    uniform = []
    for quantize in ("int8", "kmeans:4", "kmeans:8", "kmeans:16"):
        r = convert(trained_like, tmp_path / "u.safetensors", MPOConfig(quantize=quantize), force=True)
        if (tmp_path / "u.safetensors").stat().st_size <= size // 8:
            uniform.append(sum(row.rel_error**2 for row in r.rows))
    assert uniform and ours <= min(uniform) * 1.05


def test_passes_that_do_not_settle_end_on_the_largest_that_fitted(tmp_path, trained_like, monkeypatch):
    """The header changes with the choices: when the last pass overshoots, the largest pass that fitted
    is converted again rather than failing."""
    import mpocompress.jobs.convert as conv

    real, calls = conv.convert, []

    def convert(src, out, *args, **kwargs):  # passes 2 and 4 write a file 20 % of the target larger than they should
        report = real(src, out, *args, **kwargs)
        calls.append(out)
        if len(calls) % 2 == 0 and len(calls) <= 4:
            with open(out, "ab") as f:
                f.write(b" " * int(0.2 * target))
        return report

    monkeypatch.setattr(conv, "convert", convert)
    target = trained_like.stat().st_size // 8
    monkeypatch.setattr(budget, "HEADER_BASE", budget.HEADER_BASE + target // 10)  # a first pass well under the target
    report = convert_to_size(trained_like, tmp_path / "o.safetensors", target, MPOConfig(quantize="int8"))
    written = (tmp_path / "o.safetensors").stat().st_size
    assert written <= target and report.allocation["written_bytes"] == written
    assert len(calls) == 5, len(calls)  # four passes, then the one that fitted again


def test_a_recipe_fixes_layers_and_include_exclude_compose(tmp_path, trained_like):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[layers]]\nmatch = "c.*"\nquantize = "int8"\n')
    out = tmp_path / "o.safetensors"
    res = run("convert", trained_like, "-o", out, "--target-size", "70%", "--recipe", recipe, "--exclude", "b.*", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data["allocation"]["layers"]) == {"a.weight"}  # c is fixed by the recipe, b excluded
    rows = {r["name"]: r for r in data["layers"]}
    assert rows["c.weight"]["codecs"] == ["int8"] and "b.weight" not in rows
    assert out.stat().st_size <= 0.7 * trained_like.stat().st_size


def test_cli_target_errors(tmp_path, trained_like):
    out = tmp_path / "o.safetensors"
    for args, code in ((["--target-size", "1%"], 5), (["--target-size", "150%"], 2), (["--target-size", "10%", "--ratio", "3"], 2),
                       (["--target-size", "10%", "--target-ratio", "3"], 2), (["--target-ratio", "0.5"], 2),
                       (["--ratio", "2", "--sensitivity", "fisher"], 2), (["--target-size", "50%", "--sensitivity", "hessian"], 2)):  # fmt: skip
        res = run("convert", trained_like, "-o", out, *args)
        assert res.exit_code == code, (args, res.stderr)
        assert res.stderr.startswith("mpocompress: error: ")
    assert "smallest choice" in run("convert", trained_like, "-o", out, "--target-size", "1%").stderr
    res = run("convert", trained_like, "-o", out, "--target-ratio", "4", "--json")
    assert res.exit_code == 0 and out.stat().st_size <= trained_like.stat().st_size / 4


def test_inspect_plans_without_writing(tmp_path, trained_like):
    res = run("inspect", trained_like, "--target-size", "20%", "--json")
    assert res.exit_code == 0, res.stderr
    plan = json.loads(res.stdout)["plan"]
    assert plan["allocated_bytes"] + plan["fixed_bytes"] + plan["header_estimate"] <= plan["target_bytes"]
    assert [p.name for p in tmp_path.iterdir()] == ["trained.safetensors"]
    assert plan["passthrough_dtype"] == "float16" and plan["fixed_bytes"] == 2 * (96 + 160 + 64)  # as convert --target-size


def test_data_driven_damage_weights_layers_by_their_effect(tmp_path):
    """A layer whose output the model ignores gets no weight; the one that matters gets it all."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(128, 128)
            self.unused = torch.nn.Linear(128, 128)

        def forward(self, x):
            return self.used(x) + 0.0 * self.unused(x)

    torch.manual_seed(0)
    model = Net()
    src = tmp_path / "n.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    batches = [torch.randn(16, 128) for _ in range(3)]
    plan, _ = plan_budget(src, src.stat().st_size // 4, MPOConfig(quantize="int8"), model=Net(), batches=batches)
    layers = plan.allocation.to_dict()["layers"]
    assert plan.data_driven and layers["unused.weight"]["damage"] == 0.0
    assert layers["used.weight"]["bytes"] > layers["unused.weight"]["bytes"]  # the budget goes where it matters


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 1), (3, 2)])
def test_tiny_tensors_have_options(shape):
    """A 1x1 PReLU weight (real ONNX exports have them): pruning everything leaves nothing to cluster."""
    t = torch.arange(1, 1 + math.prod(shape), dtype=torch.float32).reshape(shape)
    options = measure_options("w", t, {"w": shape})
    assert options[0].label == "dense" and all(isinstance(o.error, float) for o in options)


def test_with_recorded_inputs_options_are_made_and_measured_the_data_aware_way():
    """Each option's error is its output error, and the data-aware versions beat the plain ones there."""
    from mpocompress.core.tt import tt_svd

    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g) * 0.1
    x = torch.randn(2000, 64, generator=g) @ torch.randn(64, 64, generator=g) * torch.logspace(0, -1.5, 64)
    c = (x.T @ x).double()
    plain = {o.label: o for o in measure_options("w", w, {"w": (96, 64)})}
    aware = {o.label: o for o in measure_options("w", w, {"w": (96, 64)}, c)}
    assert set(plain) <= set(aware)  # (without data, options a codec already beats are not measured)
    assert all(o.nbytes == plain[k].nbytes for k, o in aware.items() if k in plain)

    def out_err(approx):
        e = (w - approx).double()
        return float(torch.einsum("oi,ij,oj->", e, c, e) / torch.einsum("oi,ij,oj->", w.double(), c, w.double()))

    svd = tt_svd(w, (96, 1), (1, 64), max_bond=4).to_matrix()
    assert aware["mpo2 bond 4"].error < 0.8 * out_err(svd)
    assert aware["kmeans:4"].error < plain["kmeans:4"].error  # GPTQ (here the weight error is also the output error's scale)


def test_options_are_measured_on_held_out_inputs():
    """Fitted on fewer samples than inputs, GPTQ zeroes its error on their span: measured there it looks
    nearly free. The plan fits on half the samples and measures on the other half."""
    from mpocompress.jobs.budget import _halves
    from mpocompress.jobs.curves import measure_many

    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 64, generator=g)
    fit, other = torch.randn(40, 64, generator=g), torch.randn(40, 64, generator=g)
    gram, held = (fit.T @ fit).double(), (other.T @ other).double()
    ((in_sample,), (held_out,)) = [[o for o in curve if o.label == "kmeans:4"] for curve in measure_many([w, w], [gram, gram], [None, held])]
    assert in_sample.error < 0.5 * held_out.error and in_sample.nbytes == held_out.nbytes
    batches = [torch.zeros(3, 2), torch.ones(3, 2), torch.full((3, 2), 2.0)]
    assert [len(h) for h in _halves(batches)] == [2, 1]
    first, second = _halves([torch.arange(10).reshape(5, 2)])
    assert first[0].shape == (2, 2) and second[0].shape == (3, 2)
    (a,), (b,) = _halves([{"input_ids": torch.zeros(4, 7), "mask": torch.ones(4, 7)}])
    assert a["input_ids"].shape == (2, 7) and b["mask"].shape == (2, 7)
    assert _halves([torch.zeros(1, 5)]) is None and _halves([object()]) is None


@pytest.mark.parametrize("sensitivity", ["auto", "fisher", "probe"])
def test_target_size_with_data_calibrates_and_fits(tmp_path, sensitivity):
    src = example_checkpoint()
    out = tmp_path / "d.safetensors"
    res = run("convert", src, "-o", out, "--target-size", "12.5%", "--model", "mpocompress.speech.example:se_lstm",
              "--data", "mpocompress.speech.example:batches", "--steps", "0", "--sensitivity", sensitivity, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert out.stat().st_size <= int(src.stat().st_size * 0.125)
    assert rep["allocation"]["damage"].startswith("relative weight error x Fisher" if sensitivity == "fisher" else "layer output error")  # (auto: a few layers are probed)
    assert rep["calibration"]["weights"] >= 3


def test_pruning_options_count_exactly_what_the_codec_keeps():
    """Ties at the threshold (here many exact zeros) still prune exactly the codec's share: the
    option's error is the stored tensor's."""
    t = torch.cat([torch.zeros(600), torch.linspace(-1, 1, 400)]).reshape(40, 25)
    opts = {o.label: o for o in measure_options("w", t, {"w": (40, 25)})}
    from mpocompress.codecs import decode, encode, parse_codec

    for level in (0.5, 0.75, 0.9):
        label = f"magnitude:{level} + kmeans:16"
        if label in opts:
            stored = decode(*encode(t, [parse_codec(f"magnitude:{level}"), parse_codec("kmeans:16")]))
            assert opts[label].error == pytest.approx(float(((t - stored) ** 2).sum() / (t**2).sum()), rel=1e-4, abs=1e-9)


def test_a_tied_embedding_counts_once_per_use_without_data(tmp_path):
    from safetensors.torch import save_file

    from mpocompress.io import open_checkpoint
    from mpocompress.jobs.budget import _uses

    folder = tmp_path / "lm"
    folder.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(50, 8), "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8)},
              str(folder / "model.safetensors"))  # fmt: skip
    layers = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')  # tie_word_embeddings: true by default
    with open_checkpoint(folder) as ckpt:
        assert _uses(ckpt, folder, layers) == {"model.embed_tokens.weight": 2.0}
    (folder / "config.json").write_text('{"tie_word_embeddings": false}')
    with open_checkpoint(folder) as ckpt:
        assert _uses(ckpt, folder, layers) is None


class _Two(torch.nn.Module):
    """``a(x) + 3 b(x)``: two linears whose outputs count 1x and 3x."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(6, 5, bias=False)

    def forward(self, x):
        return self.a(x) + 3.0 * self.b(x)


def _fisher_of(model, batches, kd_loss):
    from mpocompress.io import open_checkpoint
    from mpocompress.jobs.budget import fisher_weights

    def curves(names):
        return {n: [Option("dense", {"skip": True}, 1, 0.0)] for n in names}

    return lambda path, names: fisher_weights(model, batches, curves(names), open_checkpoint(path), kd_loss=kd_loss)


def test_fisher_weights_match_the_gauss_newton_diagonal(tmp_path):
    """Linear layers: diag(J^T J) of ``W`` is ``sum x_j^2`` for MSE outputs, ``sum p_i (1 - p_i) x_j^2``
    for logits (the softmax's Fisher); the sampled estimate and its ``mean(H) ||W||^2`` agree."""
    torch.manual_seed(0)

    model = _Two()
    path = tmp_path / "two.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    batches = [torch.randn(512, 6) for _ in range(8)]
    w = _fisher_of(model, batches, "mse")(path, ["a.weight", "b.weight"])
    xx = sum(float((x**2).sum()) for x in batches) / len(batches) / 6  # mean over j of sum_samples x_j^2
    for name, scale in (("a.weight", 1.0), ("b.weight", 9.0)):
        exact = scale * xx * float((getattr(model, name[0]).weight.detach().double() ** 2).sum())
        assert w[name] == pytest.approx(exact, rel=0.15), name
    # logits: exact softmax Fisher of a single linear classifier
    clf = torch.nn.Linear(6, 4, bias=False)
    path = tmp_path / "clf.safetensors"
    save_file({"weight": clf.weight.detach().contiguous()}, str(path))
    w = _fisher_of(clf, batches, "kl")(path, ["weight"])
    exact = 0.0
    for x in batches:
        p = torch.softmax(clf(x).detach().double(), -1)
        exact += float(((p * (1 - p)).T @ (x.double() ** 2)).mean())
    exact = exact / len(batches) * float((clf.weight.detach().double() ** 2).sum())
    assert w["weight"] == pytest.approx(exact, rel=0.15)


def test_target_size_with_fisher_sensitivity_skips_ignored_layers(tmp_path):
    """Fisher sensitivity: a layer the output ignores gets no weight; a model whose file stores a
    tied weight once plans it."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(40, 64)
            self.mid = torch.nn.Linear(64, 64)
            self.dead = torch.nn.Linear(64, 64)
            self.head = torch.nn.Linear(64, 40, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            return self.head(h + self.mid(h) + 0.0 * self.dead(h))

    torch.manual_seed(0)
    model = Tied()
    src = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}, str(src))
    batches = [torch.randint(0, 40, (8, 16)) for _ in range(4)]
    plan, _ = plan_budget(src, src.stat().st_size // 4, MPOConfig(quantize="int8"), model=Tied(), batches=batches, kd_loss="kl",
                          sensitivity="fisher")  # fmt: skip
    layers = plan.allocation.to_dict()["layers"]
    assert plan.sensitivity == "fisher" and "Fisher" in plan.damage
    assert layers["dead.weight"]["damage"] == 0.0 and layers["mid.weight"]["damage"] > 0 and "emb.weight" in layers
    assert layers["mid.weight"]["bytes"] > layers["dead.weight"]["bytes"]
    with pytest.raises(ConfigError, match="sensitivity"):
        plan_budget(src, src.stat().st_size // 4, MPOConfig(quantize="int8"), model=Tied(), batches=batches, sensitivity="hessian")


def test_fisher_reads_weights_held_as_buffers_and_falls_back_without_autograd(tmp_path):
    """Models run from buffers (a wrapped TorchScript/ONNX graph) get Fisher weights; a model run outside
    autograd is weighed by probing instead (and the plan says so)."""

    class Buffers(torch.nn.Module):
        def __init__(self, frozen: bool = False):
            super().__init__()
            self.register_buffer("a", torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
            self.frozen = frozen

        def forward(self, x):
            with torch.no_grad() if self.frozen else contextlib.nullcontext():
                return x @ self.a.T

    src = tmp_path / "b.safetensors"
    save_file({"a": Buffers().a.contiguous()}, str(src))
    batches = [torch.randn(8, 64) for _ in range(2)]
    plan, _ = plan_budget(src, src.stat().st_size // 3, MPOConfig(quantize="int8"), model=Buffers(), batches=batches, sensitivity="fisher")
    assert plan.sensitivity == "fisher" and plan.allocation.to_dict()["layers"]["a"]["damage"] > 0
    plan, _ = plan_budget(src, src.stat().st_size // 3, MPOConfig(quantize="int8"), model=Buffers(frozen=True), batches=batches,
                          sensitivity="fisher")  # fmt: skip
    assert plan.sensitivity == "probe" and plan.damage.startswith("layer output error")


def test_output_fisher_weights_are_the_output_gradient_energy_times_the_output_energy(tmp_path):
    """``y = a(x) + 3 b(x)`` with MSE outputs: the sampled gradient at ``b``'s output has variance 9
    per entry, at ``a``'s 1; a weight is that times ``tr(W C W^T)`` on the Gram it is measured on."""
    from mpocompress.io import open_checkpoint
    from mpocompress.jobs.budget import fisher_weights

    torch.manual_seed(0)

    model = _Two()
    path = tmp_path / "two.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    batches = [torch.randn(512, 6) * torch.arange(1, 7) for _ in range(8)]
    gram = sum(x.double().T @ x.double() for x in batches)
    curves = {n: [Option("dense", {"skip": True}, 1, 0.0)] for n in ("a.weight", "b.weight")}
    w = fisher_weights(model, batches, curves, open_checkpoint(path), outputs={"a.weight": gram, "b.weight": gram})
    for name, scale in (("a.weight", 1.0), ("b.weight", 9.0)):
        weight = getattr(model, name[0]).weight.detach().double()
        exact = scale * float(torch.einsum("oi,ij,oj->", weight, gram, weight))
        assert w[name] == pytest.approx(exact, rel=0.1), name
    # without ``outputs`` the same pass gives the weight Fisher (a different number)
    plain = fisher_weights(model, batches, curves, open_checkpoint(path))
    assert plain["b.weight"] != pytest.approx(w["b.weight"], rel=0.5)


def test_methods_limit_the_options(tmp_path, trained_like):
    from mpocompress.core.allocate import methods_of, parse_methods

    assert parse_methods("lowrank") == ("svd", "mpo") and parse_methods("prune, codec") == ("codec", "prune")
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("svd,hosvd")
    assert methods_of(Option("mpo3 bond 4 + int8", {}, 1, 0.0)) == {"mpo", "codec"}
    assert methods_of(Option("magnitude:0.5 + kmeans:16", {}, 1, 0.0)) == {"prune", "codec"}
    size = trained_like.stat().st_size
    for methods, ok in ((("svd",), lambda label: label.startswith("mpo2 ")), (("codec",), lambda label: not label.startswith(("mpo", "magnitude")))):
        plan, curves = plan_budget(trained_like, int(size * 0.6), MPOConfig(quantize="int8"), methods=methods)
        assert all(ok(o.label) or o.label == "dense" for opts in curves.values() for o in opts), methods
        assert plan.to_dict()["methods"] == list(methods)
    # low rank alone reaches up to the dense size, on a fine grid of ranks
    _, curves = plan_budget(trained_like, int(size * 0.6), MPOConfig(quantize="int8"), methods=("svd",))
    for opts in curves.values():
        dense = opts[0].nbytes
        assert max(o.nbytes for o in opts[1:]) > 0.9 * dense and len(opts) > 20
    out = tmp_path / "o.safetensors"
    res = run("convert", trained_like, "-o", out, "--target-size", "60%", "--methods", "svd", "--json")
    assert res.exit_code == 0, res.stderr
    layers = json.loads(res.stdout)["allocation"]["layers"]
    assert all(v["label"].startswith("mpo2 ") or v["label"] == "dense" for v in layers.values())
    for args in (["--ratio", "2", "--methods", "svd"], ["--target-size", "60%", "--methods", "svd,tucker"]):
        res = run("convert", trained_like, "-o", tmp_path / "x.safetensors", *args)
        assert res.exit_code == 2 and res.stderr.startswith("mpocompress: error: "), (args, res.stderr)
    res = run("inspect", trained_like, "--target-size", "60%", "--methods", "lowrank", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["plan"]["methods"] == ["svd", "mpo"]


def test_target_size_of_low_rank_with_data_weighs_layers_by_their_output_fisher(tmp_path):
    src = example_checkpoint()
    out = tmp_path / "d.safetensors"
    res = run("convert", src, "-o", out, "--target-size", "60%", "--methods", "svd", "--model", "mpocompress.speech.example:se_lstm",
              "--data", "mpocompress.speech.example:batches", "--steps", "0", "--sensitivity", "output-fisher", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    alloc = json.loads(res.stdout)["allocation"]
    assert out.stat().st_size <= int(src.stat().st_size * 0.6)
    assert "Fisher of the layer's output" in alloc["damage"]
    assert all(v["label"].startswith("mpo2 ") or v["label"] == "dense" for v in alloc["layers"].values())


def test_low_rank_alone_measures_every_whitened_rank_exactly_on_held_out_inputs():
    """The fine grid's errors come from one decomposition; each equals the stored factors' error."""
    from mpocompress.core.whiten import whitened_svd
    from mpocompress.jobs.curves import measure_many

    torch.manual_seed(0)
    w = torch.randn(40, 24)
    fit, held = (torch.randn(200, 24) * torch.linspace(0.1, 3, 24) for _ in range(2))
    g, h = fit.double().T @ fit.double(), held.double().T @ held.double()
    (options,) = measure_many([w], [g], [h], methods=("svd",))
    ranks = [o.overrides["bond_dim"] for o in options[1:]]
    assert ranks == list(range(1, len(ranks) + 1)) and ranks[-1] * (40 + 24) <= 40 * 24
    for o in options[1:]:
        e = w.double() - whitened_svd(w, g, o.overrides["bond_dim"]).to_matrix().double()
        direct = float(torch.einsum("oi,ij,oj->", e, h, e) / torch.einsum("oi,ij,oj->", w.double(), h, w.double()))
        assert o.error == pytest.approx(direct, rel=1e-6, abs=1e-12)


def test_target_size_stores_other_tensors_in_float16_and_gives_their_bytes_to_the_layers(tmp_path, trained_like):
    """With a target, the tensors left uncompressed (here the biases) are stored in float16 by
    default, the plan counts them so, and ``--passthrough-dtype keep`` keeps them; without a target
    nothing is narrowed unless asked."""
    out = tmp_path / "o.safetensors"
    target = trained_like.stat().st_size // 6
    plans = {}
    for choice in ("auto", "keep"):
        res = run("convert", trained_like, "-o", out, "--target-size", target, "--passthrough-dtype", choice, "--json", "--force")
        assert res.exit_code == 0, res.stderr
        data = json.loads(res.stdout)
        plans[choice] = data["allocation"]
        assert data["totals"]["passthrough_narrowed"] == (3 if choice == "auto" else 0)
        assert out.stat().st_size <= target
    assert plans["keep"]["fixed_bytes"] == 4 * (96 + 160 + 64) == 2 * plans["auto"]["fixed_bytes"]
    assert plans["auto"]["budget_bytes"] > plans["keep"]["budget_bytes"]  # (the header passes may move both)
    assert plans["auto"]["predicted_damage"] <= plans["keep"]["predicted_damage"]
    res = run("convert", trained_like, "-o", out, "--ratio", "3", "--json", "--force")
    assert json.loads(res.stdout)["totals"]["passthrough_narrowed"] == 0
    res = run("convert", trained_like, "-o", out, "--ratio", "3", "--passthrough-dtype", "bfloat16", "--json", "--force")
    assert json.loads(res.stdout)["totals"]["passthrough_narrowed"] == 3


def test_header_estimate_covers_the_written_header_without_wasting_the_budget(tmp_path, trained_like):
    """The first pass's header estimate is at least the header written (a single plan fits) and not
    far above it (the old per-layer rule left 6 % of Conv-TasNet's 6.25 % budget unused)."""
    import struct

    from mpocompress.io import open_checkpoint

    out = tmp_path / "o.safetensors"
    report = convert_to_size(trained_like, out, trained_like.stat().st_size // 6, MPOConfig(quantize="int8"))
    with open(out, "rb") as f:
        written = struct.unpack("<Q", f.read(8))[0] + 8
    with open_checkpoint(trained_like) as ck:
        estimate = header_estimate(ck.keys(), report.allocation["layers"])
    assert written <= estimate <= 2 * written + budget.HEADER_BASE, (written, estimate)


def test_probe_sees_a_few_batches_and_skips_tiny_layers(tmp_path, monkeypatch):
    """The probe runs on at most ``PROBE_BATCHES`` batches spread over the set (the same for every
    layer); a layer under ``PROBE_MIN_NUMEL`` entries is not probed and takes each family's largest
    weight (its bytes are next to nothing)."""
    from mpocompress.io import open_checkpoint
    from mpocompress.jobs import finetune

    assert budget.spread(list(range(32)), 8) == [0, 4, 8, 12, 16, 20, 24, 28] and budget.spread([1, 2], 8) == [1, 2]

    class Three(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.big = torch.nn.Parameter(torch.randn(32, 32, generator=g))
            self.other = torch.nn.Parameter(torch.randn(32, 32, generator=g))
            self.slope = torch.nn.Parameter(torch.full((1, 1), 0.3))  # (a PReLU slope as an ONNX export stores it)

        def forward(self, x):
            y = x @ self.big.T + 10 * (x @ self.other.T)  # (``other`` matters more)
            return torch.where(y > 0, y, self.slope * y)

    model = Three()
    src = tmp_path / "m.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(src))
    with open_checkpoint(src) as ckpt:
        curves = {n: measure_options(n, ckpt.get(n), {n: ckpt.shape(n)}) for n in ("big", "other", "slope")}
    seen = []
    real = finetune.evaluate
    monkeypatch.setattr(finetune, "evaluate", lambda s, t, b, c=None: seen.append(len(b)) or real(s, t, b, c))
    with open_checkpoint(src) as ckpt:
        weights = budget.sensitivities(model, [torch.randn(4, 32) for _ in range(20)], curves, ckpt)
    assert seen and set(seen) == {budget.PROBE_BATCHES}  # one evaluation per probed family of ``big`` and ``other``
    assert len(seen) == len(weights["big"]) + len(weights["other"])
    assert all(weights["other"][f] > weights["big"][f] for f in weights["big"]) and weights["slope"] == weights["other"]
