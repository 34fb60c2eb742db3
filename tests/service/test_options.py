"""One home for every default (``adjointdpm.options``): a field left unset on the wire, an SDK
keyword left out, a CLI flag not given and the proto's comment mean the same value, and every
bound is refused with INVALID_ARGUMENT naming the field. The walk covers every field of every
request message, so a new field without its option fails here."""

from __future__ import annotations

import argparse
import inspect
import math
import re
from pathlib import Path

import grpc
import numpy as np
import pytest

import adjointdpm
import adjointdpm.aio
from adjointdpm import _requests, options
from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.cli import build_parser, call_keywords
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc
from adjointdpm_server.wire import convert
from adjointdpm_server.tasks._specs import TokenSpec

PROTO = Path(__file__).resolve().parents[2] / "proto/adjointdpm/v1/adjointdpm.proto"
REQUESTS = {rpc: message for _, (rpc, message, _) in _requests.METHODS.items()}
METHOD_OF = {rpc: name for name, (rpc, _, _) in _requests.METHODS.items()}
INPUTS = {"losses": [adjointdpm.ServerLoss("mse")], "examples": [{"seed": 0}]}


def _leaves(descriptor, prefix=""):
    """(path, field descriptor) of every field that is not a plain sub-message of options."""
    for field in descriptor.fields:
        path = prefix + field.name
        sub = field.message_type
        if sub is not None and not field.is_repeated and sub.name not in ("Tensor", "Struct"):
            yield from _leaves(sub, path + ".")
        else:
            yield path, field


@pytest.mark.parametrize("rpc", list(REQUESTS))
def test_every_field_of_every_request_is_an_option_or_an_input(rpc):
    declared = {o.path for o in options.options(rpc)}
    missing = [path for path, _ in _leaves(REQUESTS[rpc].DESCRIPTOR)
               if path not in declared and path not in options.INPUTS[rpc]]
    assert not missing, f"{rpc}: fields without an option in adjointdpm/options.py: {missing}"
    fields = {path for path, _ in _leaves(REQUESTS[rpc].DESCRIPTOR)}
    assert declared <= fields, f"{rpc}: options for fields that do not exist: {declared - fields}"


@pytest.mark.parametrize("rpc", list(REQUESTS))
def test_unset_on_the_wire_equals_the_sdk_default_equals_the_signature(rpc):
    method = METHOD_OF[rpc]
    empty = options.read(rpc, REQUESTS[rpc]())
    inputs = [INPUTS[i] for i in _requests.METHODS[method][2]]
    sdk_request, _ = _requests.build(method, *inputs)
    assert options.read(rpc, sdk_request) == empty  # the SDK leaves every default unset
    signatures = [inspect.signature(getattr(cls, method)) for cls in (adjointdpm.Client, adjointdpm.aio.Client)]
    for o in options.options(rpc):
        wire = (not o.default) if o.kind == "negated" else o.default
        assert empty[o.path] == wire, (rpc, o.path)
        if o.group:
            continue
        for sig in signatures:
            assert sig.parameters[o.name].default == o.default, (rpc, o.name)
        explicit, _ = _requests.build(method, *inputs, **{o.name: options.default(rpc, o.path)})
        assert options.read(rpc, explicit)[o.path] == empty[o.path], (rpc, o.path)


def test_the_in_process_specs_default_to_the_same_values():
    def same(spec, rpc, prefix, rename=()):
        for field in spec.__dataclass_fields__:
            if field in ("embedding",):
                continue
            path = prefix + dict(rename).get(field, field)
            want = options.default(rpc, path)
            got = getattr(spec(), field)
            assert got == want or (want is None and not got), (spec.__name__, field, got, want)

    same(TokenSpec, "ComputeGradient", "token.")  # the one spec that still has defaults


def test_the_typed_options_objects_default_like_the_table_and_read_the_wire():
    for rpc in REQUESTS:
        empty = options.values(rpc, REQUESTS[rpc]())
        for o in options.options(rpc):
            if o.group:
                group = getattr(empty, o.group)
                assert group is None or getattr(group, o.name) == o.default, (rpc, o.path)
                if group is None:
                    assert getattr(options.GROUPS[rpc][o.group](), o.name) == o.default
            else:
                assert getattr(empty, o.name) == o.default, (rpc, o.name)
    request = pb.FinetuneWeightsSpec(optimizer=pb.Optimizer(lr=0.2), keep_best=True)
    request.stop_when.patience = 3
    opts = options.values("FinetuneWeights", request)
    assert (opts.lr, opts.keep_best, opts.stop_when.patience, opts.iterations) == (0.2, True, 3, 10)
    assert options.values("OptimizeLatent", pb.OptimizeLatentSpec()).guided is None  # off
    assert options.values("ComputeGradient", pb.GradientSpec()).weights.lora_rank == 0  # defaults
    assert options.values("Sample", pb.SampleRequest(no_images=True)).images is False


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value)


def test_the_proto_comments_state_every_default_that_is_not_the_zero_value():
    text = PROTO.read_text()
    for rpc, message in REQUESTS.items():
        for o in options.options(rpc):
            holder = message.DESCRIPTOR
            *parents, leaf = o.path.split(".")
            for p in parents:
                holder = holder.fields_by_name[p].message_type
            field = holder.fields_by_name[leaf]
            zero = [] if field.is_repeated else field.default_value
            if o.default is None or o.kind in ("tensor", "negated") or o.default == zero:
                continue
            body = re.search(rf"message {holder.name} {{(.*?)\n}}", text, re.S).group(1)
            line = next(ln for ln in body.splitlines() if re.search(rf"\b{leaf} = \d+;", ln))
            assert f"default {_show(o.default)}" in line or _show(o.default) in line, (rpc, o.path, line)


def test_every_sdk_keyword_is_documented_one_line_each():
    for method in _requests.METHODS:
        for cls in (adjointdpm.Client, adjointdpm.aio.Client):
            fn = getattr(cls, method)
            sig = inspect.signature(fn)
            doc = inspect.getdoc(fn)
            for name in list(sig.parameters)[1:]:
                assert re.search(rf"^    {name}: \S", doc, re.M), (cls.__name__, method, name)
            assert "stream" in sig.parameters and "on_event" in sig.parameters and "progress" in sig.parameters


def test_a_wrong_keyword_is_a_type_error_before_anything_is_sent(client):
    with pytest.raises(TypeError, match="lerning_rate"):
        client.optimize_latent(adjointdpm.ServerLoss("mse"), lerning_rate=0.1)
    with pytest.raises(TypeError, match="patients"):
        client.optimize_latent(adjointdpm.ServerLoss("mse"), stop_when={"patients": 3})


# ---- the CLI: a flag not given sends nothing, so the option's one default applies ----------------

COMMANDS = {"sample": "Sample", "compute-gradient": "ComputeGradient", "optimize-latent": "OptimizeLatent",
            "finetune-weights": "FinetuneWeights", "optimize-embedding": "OptimizeEmbedding"}
ALIASES = {"grad": "compute-gradient", "optimize": "optimize-latent", "finetune": "finetune-weights",
           "invert": "optimize-embedding"}


def test_one_name_per_rpc_in_the_cli_the_sdk_and_the_tasks():
    """The proto's name in each one's case: ComputeGradient → compute-gradient (CLI),
    compute_gradient (SDK), run_compute_gradient (tasks); the old CLI names stay as aliases."""
    import adjointdpm_server.tasks as tasks

    parser, _ = _subparser("sample")
    for command, rpc in COMMANDS.items():
        snake = re.sub(r"(?<!^)([A-Z])", r"_\1", rpc).lower()
        assert command == snake.replace("_", "-")
        assert callable(getattr(adjointdpm.Client, snake)) and callable(getattr(tasks, f"run_{snake}"))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for alias, command in ALIASES.items():
        assert sub.choices[alias] is sub.choices[command]
        assert parser.parse_args([alias, *(["--loss", "mse"] if alias != "invert" else [])]).handler == command


def _subparser(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices[command]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_flags_left_out_send_nothing_and_their_help_states_the_one_default(command):
    rpc = COMMANDS[command]
    parser, sub = _subparser(command)
    loss = ["--loss", "mse"] if command != "sample" else []
    args = parser.parse_args([command, *loss])
    assert call_keywords(args) == {}
    keywords = {name for name, _, _ in _requests.keywords(METHOD_OF[rpc])}
    flags = dict(args.option_flags)
    assert len(flags) >= 10
    for action in sub._actions:
        if action.dest not in flags:
            continue
        name = flags[action.dest]
        o = options.option(rpc, name)
        assert action.default is None, (command, action.dest)
        assert (o.group or o.name) in keywords, (command, name)
        if o.default not in (None, "", [], False) and o.kind != "negated" and "(default" not in action.help:
            pytest.fail(f"{command} {action.option_strings}: its help does not state the default")
        if o.default not in (None, "", [], False) and "(default" in action.help and o.kind == "scalar":
            assert f"default {options._show(o.default)}" in action.help, (command, action.help)


def test_cli_flags_given_become_the_sdk_keywords():
    parser = build_parser()
    args = parser.parse_args(["finetune-weights", "--loss", "mse", "--lr", "0.01", "--patience", "3", "--rank", "2",
                              "--keep-best", "--label", "1", "--label", "2", "--validate-every", "2"])
    assert call_keywords(args) == {"lr": 0.01, "stop_when": {"patience": 3}, "lora_rank": 2,
                                   "keep_best": True, "labels": [1, 2], "validate_every": 2}
    args = parser.parse_args(["optimize-latent", "--loss", "mse", "--constraint", "none", "--stop-on-flip"])
    assert call_keywords(args) == {"constraint": "", "stop_when": {"verdict_changed": True}}


# ---- the server: defaults and bounds through the same table --------------------------------------

def _out_of_bounds(o, field):
    """A value the option refuses that the field can carry and that is not its unset value."""
    unsigned = field.type in (field.TYPE_UINT32, field.TYPE_UINT64)
    if o.choices:
        return "bogus"
    if o.above is not None:
        return o.above - 1.0
    if o.low is not None and not (unsigned and o.low - 1 <= 0):  # 0 is "unset" on the wire
        return o.low - 1
    if o.below is not None:
        return float(o.below)
    if o.high is not None:
        return o.high * 2 + 1
    return None


def _bounded():
    for rpc, message in REQUESTS.items():
        for o in options.options(rpc):
            holder = message.DESCRIPTOR
            *parents, leaf = o.path.split(".")
            for p in parents:
                holder = holder.fields_by_name[p].message_type
            value = _out_of_bounds(o, holder.fields_by_name[leaf])
            if value is not None and o.kind == "scalar":
                yield rpc, o, value


BOUNDED = list(_bounded())


def test_the_bounded_options_are_many():
    assert len(BOUNDED) >= 35


@pytest.mark.parametrize("rpc,o,value", BOUNDED, ids=[f"{r}-{o.path}" for r, o, _ in BOUNDED])
def test_every_bound_is_refused_by_the_server_naming_the_field(server, rpc, o, value):
    request = REQUESTS[rpc]()
    holder, leaf = options._field(request, o.path)
    setattr(holder, leaf, type(getattr(holder, leaf))(value) if not isinstance(value, str) else value)
    if rpc != "Sample":
        request.losses.add(server=pb.ServerLoss(name="classifier"))
    if rpc == "FinetuneWeights":
        request.examples.add(seed=0)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.AdjointDPMServiceStub(channel)
        if rpc == "Sample":
            call = stub.Sample(request, timeout=60)
        else:
            wrapper = {"ComputeGradient": pb.ComputeGradientRequest, "OptimizeLatent": pb.OptimizeLatentRequest,
                       "FinetuneWeights": pb.FinetuneWeightsRequest,
                       "OptimizeEmbedding": pb.OptimizeEmbeddingRequest}[rpc]
            call = getattr(stub, rpc)(iter([wrapper(spec=request)]), timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert o.path in err.value.details()


def test_check_refuses_non_finite_numbers_naming_the_field():
    values = options.read("OptimizeLatent", pb.OptimizeLatentSpec())
    for bad in (math.nan, math.inf):
        with pytest.raises(options.InvalidOption, match="optimizer.lr"):
            options.check("OptimizeLatent", {**values, "optimizer.lr": bad})
    with pytest.raises(options.InvalidOption, match="targets"):
        options.check("ComputeGradient", {**options.read("ComputeGradient", pb.GradientSpec()),
                                          "targets": [9]})


def test_a_fine_tune_from_raw_grpc_with_nothing_set_trains_like_the_sdk_default(server, client):
    """The defect that started this: raw gRPC fine-tuned at lr 0.05, the SDK at 1e-3."""
    loss = adjointdpm.ServerLoss("classifier", {"label": 8})
    sdk = client.finetune_weights(loss, [{"seed": 0, "label": 1}], iterations=2, steps=4)
    request = pb.FinetuneWeightsSpec(generation=pb.Generation(steps=4), examples=[pb.FinetuneExample(seed=0, label=1)],
                                 optimizer=pb.Optimizer(iterations=2))
    request.losses.add(server=pb.ServerLoss(name="classifier")).server.params.update({"label": 8})
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        events = list(pb_grpc.AdjointDPMServiceStub(channel).FinetuneWeights(
            iter([pb.FinetuneWeightsRequest(spec=request)]), timeout=300))
    raw = next(e.result for e in events if e.WhichOneof("kind") == "result")
    np.testing.assert_allclose(list(raw.history), sdk.history, rtol=1e-6)
    assert sdk.artifact.metadata.get("rank") == options.default("FinetuneWeights", "lora_rank")


def test_convert_reads_options_once_for_the_server():
    assert convert.options_of("FinetuneWeights", pb.FinetuneWeightsSpec()).lr == 1e-3
    assert options.default("FinetuneWeights", "lr") == 1e-3
    assert convert.options_of("OptimizeLatent", pb.OptimizeLatentSpec()).lr == 0.05


def test_every_public_method_of_both_clients_has_a_signature():
    for cls in (adjointdpm.Client, adjointdpm.aio.Client):
        for name, fn in inspect.getmembers(cls, callable):
            if not name.startswith("_"):
                inspect.signature(fn)  # raised ValueError for the RPC methods before
