"""The contract every loss plugin keeps (issue 26 item 5), like diffusers' ``SchedulerCommonTest``.

Every plugin under the entry-point group ``adjointdpm.losses`` — the built-ins and any third-party
package's — is collected from ``discover_losses()`` and held, on valid inputs in its domain
(images in [0, 1] of the backend's shape (B, C, H, W), or latents), to:

1. shape: one loss per sample, shape (B,), for B in {1, 3}; differentiable in x; calling the
   same built plugin again gives the same values (it is built once per request, called per step);
2. dtype: float32 x → float32 or float64 losses and a float32 gradient; float64 x works (below);
3. finiteness: finite losses and gradients, inside the domain and at its corners (black, white
   and black-and-white images; zero and large latents);
4. gradient: ``torch.autograd.gradcheck`` in float64 where the plugin computes in float64, else
   central finite differences in float32 along the gradient and random directions, under a
   non-uniform cotangent;
5. batch independence: sample i's loss and gradient are the same in a batch of 3 and alone (with
   its own per-sample inputs: labels, targets, content, or the prompt or label it was generated
   with, ``LossContext.conditions``), and ∂L_i/∂x_j = 0 for j ≠ i;
6. declared metadata: ``name`` is the entry-point name, ``description`` non-empty, ``domain`` image
   or latent, ``params``/``tensors`` exactly what the plugin reads; a missing required input is
   refused with InvalidArgument naming it (built for samples with no conditions of their own: a
   plugin may default ``prompt``/``label`` to a sample's own), an undeclared one with "does not take".

float64, decided from the code: the service hands a plugin x in its backend's dtype (images =
``backend.decode(x0)``), so float64 means a ``--dtype float64`` server: the float64 runs use the
digits backend loaded in float64. ``mse`` and ``gram_style`` then compute in float64 ("native":
gradcheck), and so do the rewards ``aesthetic`` and ``preference`` (a float64 copy of their CLIP). ``classifier`` casts the logits to float32 (``logits.float()``), ``clip_similarity``
runs its float32 CLIP on ``x.float()`` and ``triton`` sends FP32 over the wire: they accept float64
and compute in float32 ("float32": finite differences in float32). No plugin refuses float64.
(float64 x on a float32 backend, which the service never builds, fails inside torch for
``classifier`` and ``gram_style`` with a dtype-mismatch RuntimeError; not part of the contract.)

Per-plugin valid inputs are the ``CASES`` table. A plugin with no row is run from defaults (no
parameters or tensors, digits-shaped images); one that needs inputs fails until a row is added.
The ``_Mutant`` tests at the end prove that each check fails on a plugin breaking it.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from adjointdpm_server.errors import InvalidArgument
from adjointdpm_server.losses import Conditions, LossContext, LossPlugin, build_loss, discover_losses

F32, F64 = torch.float32, torch.float64
ALL = [0, 1, 2]  # the rows of the batch of 3; a batch of 1 is row [0], sample i alone is [i]
COTANGENT = torch.tensor([1.0, -0.5, 2.0], dtype=F64)  # a non-uniform weight per sample


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# per-sample inputs of the three rows (float64; each run casts to its dtype)
TARGETS = _rand(101, 3, 1, 8, 8)          # mse on images: one target per sample
LATENT_TARGET = _randn(102, 4, 8, 8)      # mse on latents: one target broadcast to the batch
STYLE = _rand(103, 1, 8, 8)               # gram_style: one style image
CONTENT = _rand(104, 3, 1, 8, 8)          # gram_style: content per sample (tensor or reference)
LABELS = [3, 7, 1]                        # classifier: one label per sample
PROMPTS = ["a photo of a cat", "a dog", "a painting in the style of a cat"]  # preference, per sample
# margin mode at κ = 5 on the interior inputs: samples 0 and 1 are active (margins −2.91, −2.93),
# sample 2 sits on the floor (−5.55: loss −5, zero gradient); all ≥ 0.55 from the kink at −5, which
# a finite-difference step (|δx| = 0.01, |∇margin| < 10) cannot reach


@dataclass(frozen=True)
class Case:
    """One valid construction of a plugin: what a request passes for rows ``rows`` of the bank."""

    id: str
    plugin: str                                   # entry-point name
    shape: tuple[int, ...] = (1, 8, 8)            # one sample of x (digits' image shape)
    domain: str = "image"                         # how x is drawn: images in [0, 1], or latents
    params: Callable[[list[int]], dict] = lambda rows: {}
    tensors: Callable[[list[int], torch.dtype], dict] = lambda rows, dtype: {}
    reference: Callable[[list[int], torch.dtype], torch.Tensor] | None = None  # LossContext's
    conditions: Callable[[list[int]], Conditions] | None = None  # the rows' own prompts or labels
    needs: tuple[str, ...] = ()                   # settings from fixtures: triton_url, *_model_dir
    float64: str = "native"                       # native | float32 | refused (module docstring)
    required: tuple[str, ...] = ()                # inputs whose absence must be refused, by name
    fd_eps: float = 1e-2                          # float32 finite-difference step (x's units)


def _labels(**extra):
    return lambda rows: {"label": [LABELS[i] for i in rows], **extra}


def _own(kind: str, values: list):
    """The rows' own conditions (LossContext's), for a plugin that defaults to them."""
    return lambda rows: Conditions(kind, tuple(values[i] for i in rows))


CASES = [
    Case("mse", "mse", tensors=lambda rows, dt: {"target": TARGETS[rows].to(dt)}, required=("target",)),
    Case("mse-latent", "mse", shape=(4, 8, 8), domain="latent",
         tensors=lambda rows, dt: {"target": LATENT_TARGET.to(dt)}),
    # classifier: logits.float() → computes in float32 even on a float64 backend
    Case("classifier-targeted", "classifier", params=_labels(), float64="float32", required=("label",)),
    Case("classifier-untargeted", "classifier", params=_labels(mode="untargeted"), float64="float32"),
    Case("classifier-margin", "classifier", params=_labels(mode="margin", kappa=5.0), float64="float32"),
    Case("classifier-own-labels", "classifier", conditions=_own("labels", LABELS), float64="float32"),
    Case("gram_style-content", "gram_style", params=lambda rows: {"content_weight": 0.5},
         tensors=lambda rows, dt: {"style": STYLE.to(dt), "content": CONTENT[rows].to(dt)},
         required=("style",)),
    Case("gram_style-reference", "gram_style", params=lambda rows: {"content_weight": 0.5},
         tensors=lambda rows, dt: {"style": STYLE.to(dt)},
         reference=lambda rows, dt: CONTENT[rows].to(dt)),
    # a tiny CLIP (16×16 images; digits' 1×8×8 images take the grayscale-expand and resize path)
    Case("clip_similarity", "clip_similarity", params=lambda rows: {"text": "a photo of a cat"},
         needs=("clip_model_dir",), float64="float32", required=("text",)),
    Case("clip_similarity-own-prompts", "clip_similarity", conditions=_own("prompts", PROMPTS),
         needs=("clip_model_dir",), float64="float32"),
    # the rewards (tests/losses/tiny_rewards.py): tiny CLIPs with random weights, 16×16 images
    Case("aesthetic", "aesthetic", needs=("aesthetic_model_dir",)),
    Case("aesthetic-rgb", "aesthetic", shape=(3, 10, 12), needs=("aesthetic_model_dir",)),  # resize + crop
    Case("preference", "preference", params=lambda rows: {"prompt": "a photo of a cat"},
         needs=("preference_model_dir",), required=("prompt",)),
    Case("preference-per-sample", "preference", params=lambda rows: {"prompt": [PROMPTS[i] for i in rows]},
         needs=("preference_model_dir",)),
    Case("preference-own-prompts", "preference", conditions=_own("prompts", PROMPTS),
         needs=("preference_model_dir",)),
    # tests/triton_peer's per-sample model: a [1] (batch total) model credits total / B to each
    # sample by design, so only a per-sample model can keep batch independence
    Case("triton", "triton", params=lambda rows: {"model": "mse_per_sample"}, needs=("triton_url",),
         float64="float32", required=("model",)),
]

PLUGINS = discover_losses()
# a plugin without a row (a third-party package's) runs from defaults
CASES += [Case(name, name) for name in PLUGINS if name not in {c.plugin for c in CASES}]
CASES_BY_PLUGIN = {name: [c for c in CASES if c.plugin == name] for name in PLUGINS}


# ---- fixtures: the embedded digits backend, a tiny CLIP, the Triton peer (tests/conftest.py) ----

@pytest.fixture(scope="module")
def backends():
    from adjointdpm_server.models import load_model

    return {F32: load_model("digits"), F64: load_model("digits", dtype=F64)}


@pytest.fixture(scope="module")
def clip_model_dir(tmp_path_factory):
    """The tiny CLIP of tests/models/tiny_sd.py, saved as the directory --clip-model-dir names."""
    import json

    from tests.models.tiny_sd import BOS, EOS, MAX_LENGTH, build_tiny_clip, tiny_vocab

    root = tmp_path_factory.mktemp("contract-clip")
    tokenizer = root / "sd" / "tokenizer"  # the one part of the tiny SD that build_tiny_clip reads
    tokenizer.mkdir(parents=True)
    vocab, merges = tiny_vocab()
    (tokenizer / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}))
    return str(build_tiny_clip(root / "clip", root / "sd"))


@pytest.fixture(scope="module")
def aesthetic_model_dir(tmp_path_factory):
    """A tiny CLIP vision tower + LAION's head with random weights, as --aesthetic-model-dir names."""
    from tests.losses.tiny_rewards import build_tiny_aesthetic

    return str(build_tiny_aesthetic(tmp_path_factory.mktemp("contract-aesthetic")))


@pytest.fixture(scope="module")
def preference_model_dir(tmp_path_factory):
    """A tiny CLIPModel with its tokenizer, as --preference-model-dir names."""
    from tests.losses.tiny_rewards import build_tiny_preference

    return str(build_tiny_preference(tmp_path_factory.mktemp("contract-preference")))


class Harness:
    """Builds a case's plugin (through ``build_loss``, the service's path, unless ``cls`` is given)
    on the digits backend of the run's dtype, and draws its inputs."""

    def __init__(self, case: Case, backends: Mapping, settings: Mapping[str, Any], cls=None):
        self.case, self.backends, self.settings = case, backends, dict(settings)
        self.cls = cls or PLUGINS[case.plugin]
        self.registered = cls is None

    def context(self, rows, dtype=F32) -> LossContext:
        reference = self.case.reference(rows, dtype) if self.case.reference else None
        own = self.case.conditions(rows) if self.case.conditions else Conditions()
        return LossContext(self.backends[dtype], self.settings, reference, own.kind, own.values or None)

    def build(self, rows, dtype=F32, *, params=None, tensors=None) -> LossPlugin:
        params = self.case.params(rows) if params is None else params
        tensors = self.case.tensors(rows, dtype) if tensors is None else tensors
        if self.registered:
            return build_loss(self.case.plugin, self.context(rows, dtype), params, tensors)
        return self.cls(self.context(rows, dtype), params, tensors)

    def inputs(self, rows, dtype=F32, kind: str = "interior") -> torch.Tensor:
        n, image = (3, *self.case.shape), self.case.domain == "image"
        if kind == "interior":  # images away from the edges, so a finite-difference step stays in [0, 1]
            bank = 0.1 + 0.8 * _rand(7, *n) if image else _randn(7, *n)
        elif kind == "zeros":
            bank = torch.zeros(n, dtype=F64)
        elif kind == "ones":
            bank = torch.ones(n, dtype=F64)
        elif kind == "binary":
            bank = (_rand(8, *n) < 0.5).to(F64)
        elif kind == "large":
            bank = 4.0 * _randn(9, *n)
        else:
            raise ValueError(kind)
        return bank[rows].to(dtype)


def corners(domain: str) -> tuple[str, ...]:
    return ("zeros", "ones", "binary") if domain == "image" else ("zeros", "large")


@pytest.fixture
def harness(request, backends):
    case = request.param
    return Harness(case, backends, {need: request.getfixturevalue(need) for need in case.needs})


def with_harness(cases):
    return pytest.mark.parametrize("harness", cases, ids=[c.id for c in cases], indirect=True)


def evaluate(plugin, x: torch.Tensor, cotangent: torch.Tensor | None = None):
    """(losses, ∂(Σ cotangent · losses)/∂x), both detached."""
    x = x.detach().clone().requires_grad_()
    out = plugin(x)
    w = torch.ones_like(out) if cotangent is None else cotangent[:len(out)].to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, w)
    return out.detach(), grad


# ---- the checks (plain functions: the _Mutant tests run them on broken plugins) ----------------

def check_metadata(name: str, cls) -> None:
    assert isinstance(cls, type) and issubclass(cls, LossPlugin), f"{name}: not a LossPlugin"
    assert not inspect.isabstract(cls), f"{name}: abstract ({cls.__abstractmethods__})"
    assert getattr(cls, "name", None) == name, \
        f"{name}: class name {getattr(cls, 'name', None)!r} is not its entry-point name (errors quote it)"
    assert isinstance(cls.description, str) and cls.description.strip(), f"{name}: empty description"
    assert cls.domain in ("image", "latent"), f"{name}: domain {cls.domain!r} is neither image nor latent"
    for kind in ("params", "tensors"):
        declared = getattr(cls, kind)
        assert isinstance(declared, Mapping), f"{name}: {kind} is not a mapping"
        for key, text in declared.items():
            assert isinstance(key, str) and key.isidentifier(), f"{name}: {kind} key {key!r}"
            assert isinstance(text, str) and text.strip(), f"{name}: {kind}[{key!r}] has no description"
    both = set(cls.params) & set(cls.tensors)
    assert not both, f"{name}: {sorted(both)} declared both as parameter and as tensor"
    assert isinstance(cls.available({}), bool), f"{name}: available({{}}) is not a bool"


def check_shapes(h: Harness) -> None:
    for batch in (1, 3):
        rows = ALL[:batch]
        plugin = h.build(rows)
        x = h.inputs(rows).requires_grad_()
        out = plugin(x)
        assert isinstance(out, torch.Tensor), f"{h.case.id}: returned {type(out).__name__}"
        assert tuple(out.shape) == (batch,), \
            f"{h.case.id}: shape {tuple(out.shape)} for a batch of {batch}; a loss gives one value per sample"
        assert out.requires_grad, f"{h.case.id}: the losses are not differentiable in x"
        assert out.device == x.device
        torch.testing.assert_close(plugin(x), out, rtol=1e-6, atol=0,
                                   msg=lambda m: f"{h.case.id}: a second call differs: {m}")


def check_dtypes(h: Harness) -> None:
    out32, g32 = evaluate(h.build(ALL, F32), h.inputs(ALL, F32))
    assert out32.dtype in (F32, F64), f"{h.case.id}: float32 x gave {out32.dtype} losses"
    assert g32.dtype == F32
    if h.case.float64 == "refused":
        try:
            h.build(ALL, F64)(h.inputs(ALL, F64))
        except InvalidArgument as err:
            assert "float64" in str(err) or "dtype" in str(err), f"{h.case.id}: unclear refusal: {err}"
            return
        raise AssertionError(f"{h.case.id}: declared to refuse float64, but it ran")
    out64, g64 = evaluate(h.build(ALL, F64), h.inputs(ALL, F64))
    if h.case.float64 == "native":
        assert out64.dtype == F64, f"{h.case.id}: float64 x gave {out64.dtype} losses (declared native)"
    assert out64.dtype in (F32, F64) and g64.dtype == F64
    assert torch.isfinite(out64).all() and torch.isfinite(g64).all(), f"{h.case.id}: non-finite in float64"
    # the same computation: float32 and float64 agree to float32's precision
    scale = out32.abs().max().item() + 1e-6
    torch.testing.assert_close(out64.double(), out32.double(), rtol=1e-4, atol=1e-5 * scale,
                               msg=lambda m: f"{h.case.id}: float64 losses differ from float32: {m}")
    gscale = g32.abs().max().item() + 1e-12
    torch.testing.assert_close(g64, g32.double(), rtol=1e-3, atol=1e-4 * gscale,
                               msg=lambda m: f"{h.case.id}: float64 gradient differs from float32: {m}")


def check_finite(h: Harness) -> None:
    for kind in ("interior", *corners(h.case.domain)):
        out, grad = evaluate(h.build(ALL), h.inputs(ALL, kind=kind), COTANGENT)
        assert torch.isfinite(out).all(), f"{h.case.id}: non-finite losses on {kind} inputs: {out}"
        assert torch.isfinite(grad).all(), f"{h.case.id}: non-finite gradient on {kind} inputs"


def check_gradient(h: Harness) -> None:
    if h.case.float64 == "native":
        plugin = h.build(ALL, F64)
        x = h.inputs(ALL, F64).requires_grad_()
        try:
            torch.autograd.gradcheck(plugin, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
        except GradcheckError as err:
            raise AssertionError(f"{h.case.id}: gradcheck failed: {err}") from err
        return
    plugin, x = h.build(ALL, F32), h.inputs(ALL, F32)
    _, grad = evaluate(plugin, x, COTANGENT)
    grad = grad.double()
    norm = grad.norm().item()
    gen = torch.Generator().manual_seed(5)
    directions = [grad / norm] if norm > 0 else []
    directions += [torch.randn(x.shape, generator=gen, dtype=F64) for _ in range(3)]
    eps = h.case.fd_eps
    for k, v in enumerate(directions):
        v = v / v.norm()

        def f(t):
            with torch.no_grad():
                return (COTANGENT * plugin((x.double() + t * v).to(F32)).double()).sum().item()

        fd = (f(eps) - f(-eps)) / (2 * eps)
        ad = (grad * v).sum().item()
        assert abs(fd - ad) <= 1e-2 * norm + 1e-6, \
            (f"{h.case.id}: direction {k}: autograd {ad:.6g} vs central difference {fd:.6g} "
             f"(|∇| = {norm:.3g})")


def check_batch_independence(h: Harness) -> None:
    plugin, x = h.build(ALL), h.inputs(ALL).requires_grad_()
    out = plugin(x)
    for i in ALL:
        (cross,) = torch.autograd.grad(out[i], x, retain_graph=True)
        own = cross[i].abs().max().item()
        for j in ALL:
            if j != i:
                leak = cross[j].abs().max().item()
                assert leak <= 1e-7 * own, \
                    f"{h.case.id}: ∂L_{i}/∂x_{j} = {leak:.3g} ≠ 0 (it depends on other samples)"
    out, grad = evaluate(plugin, x, COTANGENT)
    # float32 rounding differs between a batched and a single evaluation; where a loss cancels
    # (classifier untargeted at p(label) → 0: a difference of two logsumexps) it is amplified, so
    # the tolerance is relative to the batch's largest value and gradient entry
    scale, gscale = out.abs().max().item(), grad.abs().max().item()
    for i in ALL:
        alone, grad_alone = evaluate(h.build([i]), h.inputs([i]), COTANGENT[i:i + 1])
        torch.testing.assert_close(
            out[i:i + 1], alone, rtol=1e-4, atol=1e-6 * max(scale, 1.0),
            msg=lambda m: f"{h.case.id}: sample {i}'s loss depends on the batch: {m}")
        torch.testing.assert_close(
            grad[i:i + 1], grad_alone, rtol=1e-3, atol=1e-4 * gscale + 1e-12,
            msg=lambda m: f"{h.case.id}: sample {i}'s gradient depends on the batch: {m}")


class Recording(dict):
    """A parameter or tensor mapping that notes every key a plugin looks up."""

    def __init__(self, data, seen: set):
        super().__init__(data)
        self.seen = seen

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)


def check_reads(harnesses: list[Harness]) -> None:
    """Over all of a plugin's cases, the keys it looks up are exactly the ones it declares."""
    cls = harnesses[0].cls
    read = {"params": set(), "tensors": set()}
    for h in harnesses:
        params = Recording(h.case.params(ALL), read["params"])
        tensors = Recording(h.case.tensors(ALL, F32), read["tensors"])
        cls(h.context(ALL), params, tensors)(h.inputs(ALL))  # some read only when called
    for kind in ("params", "tensors"):
        declared = set(getattr(cls, kind))
        assert not read[kind] - declared, \
            (f"{cls.name}: reads undeclared {kind} {sorted(read[kind] - declared)} "
             "(the base class refuses every request that passes them)")
        assert not declared - read[kind], \
            f"{cls.name}: declares {kind} {sorted(declared - read[kind])} it never reads"


def check_required(h: Harness) -> None:
    params, tensors = h.case.params(ALL), h.case.tensors(ALL, F32)
    for key in h.case.required:
        where = "tensors" if key in h.cls.tensors else "params"
        given = tensors if where == "tensors" else params
        assert key in given, f"{h.case.id}: the case does not pass its required {key!r}"
        rest = {k: v for k, v in given.items() if k != key}
        kwargs = {where: rest}
        try:
            h.build(ALL, **kwargs)(h.inputs(ALL))
        except InvalidArgument as err:
            assert f"'{key}'" in str(err), \
                f"{h.case.id}: refusing a missing {key!r}, the error does not name it: {err}"
            continue
        except Exception as err:  # noqa: BLE001
            raise AssertionError(f"{h.case.id}: a missing {key!r} raised {type(err).__name__}: {err}; "
                                 "expected InvalidArgument naming it") from err
        raise AssertionError(f"{h.case.id}: ran without its required {key!r}")
    unknown = (("params", {"contract_unknown": 1}), ("tensors", {"contract_unknown": torch.zeros(1)}))
    for where, extra in unknown:
        kwargs = {where: {**(params if where == "params" else tensors), **extra}}
        try:
            h.build(ALL, **kwargs)
        except InvalidArgument as err:
            assert "does not take contract_unknown" in str(err), f"{h.case.id}: {err}"
            continue
        raise AssertionError(f"{h.case.id}: accepted an undeclared {where[:-1]} 'contract_unknown'")


# ---- the contract, for every discovered plugin ---------------------------------------------------

@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_declared_metadata(name):
    check_metadata(name, PLUGINS[name])


def test_the_built_in_plugins_are_discovered():
    assert {"mse", "classifier", "gram_style", "clip_similarity", "triton", "aesthetic",
            "preference"} <= set(PLUGINS)


@with_harness(CASES)
def test_one_loss_per_sample(harness):
    check_shapes(harness)


@with_harness(CASES)
def test_dtypes(harness):
    check_dtypes(harness)


@with_harness(CASES)
def test_finite_values_and_gradients(harness):
    check_finite(harness)


@with_harness(CASES)
def test_gradient_matches_finite_differences(harness):
    check_gradient(harness)


@with_harness(CASES)
def test_batch_independence(harness):
    check_batch_independence(harness)


@with_harness([c for c in CASES if c.required] or [CASES[0]])
def test_missing_or_unknown_inputs_are_refused_by_name(harness):
    check_required(harness)


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_reads_exactly_what_it_declares(name, request, backends):
    harnesses = [Harness(c, backends, {n: request.getfixturevalue(n) for n in c.needs})
                 for c in CASES_BY_PLUGIN[name]]
    check_reads(harnesses)


# ---- a third-party plugin is found by its entry point and held to the same contract -------------

THIRD_PARTY = '''
import torch
from adjointdpm_server.losses import LossPlugin


class TotalVariation(LossPlugin):
    name = "contract_tv"
    description = "weight x mean squared difference of neighbouring pixels, per sample"
    params = {"weight": "a factor (default 1)"}

    def __init__(self, context, params, tensors):
        super().__init__(context, params, tensors)
        self.weight = self.number(params, "weight", 1.0, low=0.0)

    def __call__(self, x):
        dx, dy = x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]
        return self.weight * (dx.square().flatten(1).mean(1) + dy.square().flatten(1).mean(1))
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A package installed on sys.path, declaring ``contract_tv`` under the entry-point group."""
    import sys

    (tmp_path / "contract_tv_plugin.py").write_text(THIRD_PARTY)
    info = tmp_path / "contract_tv_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: contract-tv-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[adjointdpm.losses]\ncontract_tv = contract_tv_plugin:TotalVariation\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    discover_losses.cache_clear()
    yield discover_losses()
    monkeypatch.undo()
    sys.modules.pop("contract_tv_plugin", None)
    discover_losses.cache_clear()


def test_third_party_plugin_is_discovered_and_held_to_the_contract(third_party, backends):
    assert "contract_tv" in third_party
    check_metadata("contract_tv", third_party["contract_tv"])
    h = Harness(Case("contract_tv", "contract_tv", params=lambda rows: {"weight": 2.0}), backends, {},
                cls=third_party["contract_tv"])
    for check in (check_shapes, check_dtypes, check_finite, check_gradient, check_batch_independence):
        check(h)
    check_reads([h])


# ---- the checks have teeth: each fails on a plugin that breaks its clause ------------------------

class _Mutant(PLUGINS["mse"]):  # the registered mse, so a moved module needs no edit here
    pass


class BatchMean(_Mutant):
    def __call__(self, x):
        loss = super().__call__(x)
        return loss.mean().expand_as(loss)  # every sample gets the batch's mean


class DoubledGradient(_Mutant):
    def __call__(self, x):
        loss = super().__call__(x)
        return 2 * loss - loss.detach()  # the right value, twice the gradient


class Column(_Mutant):
    def __call__(self, x):
        return super().__call__(x)[:, None]  # (B, 1)


class SqrtAtZero(_Mutant):
    def __call__(self, x):
        return super().__call__(x) + x.clamp_min(0).sqrt().flatten(1).mean(1)  # ∞ slope at black


class SilentFloat32(_Mutant):
    def __call__(self, x):
        return super().__call__(x).float()


class Undescribed(_Mutant):
    description = " "


class ReadsUndeclared(_Mutant):
    def __init__(self, context, params, tensors):
        super().__init__(context, params, tensors)
        self.scale = params.get("scale", 1.0)


class UnnamedRefusal(LossPlugin):
    name = "mse"
    description = "mse whose missing target surfaces as a KeyError"
    tensors = {"target": "the target"}

    def __init__(self, context, params, tensors):
        super().__init__(context, params, tensors)
        self.target = tensors["target"]

    def __call__(self, x):
        return (x - self.target.to(x.dtype)).square().flatten(1).mean(1)


MSE_CASE = CASES[0]


@pytest.mark.parametrize("mutant,check,float64", [
    (BatchMean, check_batch_independence, "native"),
    (DoubledGradient, check_gradient, "native"),     # gradcheck
    (DoubledGradient, check_gradient, "float32"),    # finite differences in float32
    (Column, check_shapes, "native"),
    (SqrtAtZero, check_finite, "native"),
    (SilentFloat32, check_dtypes, "native"),
    (Undescribed, lambda h: check_metadata("mse", h.cls), "native"),
    (ReadsUndeclared, lambda h: check_reads([h]), "native"),
    (UnnamedRefusal, check_required, "native"),
], ids=lambda v: getattr(v, "__name__", v))
def test_the_contract_catches(mutant, check, float64, backends):
    case = dataclasses.replace(MSE_CASE, float64=float64)
    with pytest.raises(AssertionError):
        check(Harness(case, backends, {}, cls=mutant))
