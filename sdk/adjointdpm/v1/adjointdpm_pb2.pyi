from adjointdpm.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Domain(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DOMAIN_UNSPECIFIED: _ClassVar[Domain]
    DOMAIN_IMAGE: _ClassVar[Domain]
    DOMAIN_LATENT: _ClassVar[Domain]

class Target(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TARGET_UNSPECIFIED: _ClassVar[Target]
    TARGET_X_T: _ClassVar[Target]
    TARGET_COND: _ClassVar[Target]
    TARGET_TOKEN: _ClassVar[Target]
    TARGET_WEIGHTS: _ClassVar[Target]
DOMAIN_UNSPECIFIED: Domain
DOMAIN_IMAGE: Domain
DOMAIN_LATENT: Domain
TARGET_UNSPECIFIED: Target
TARGET_X_T: Target
TARGET_COND: Target
TARGET_TOKEN: Target
TARGET_WEIGHTS: Target

class Generation(_message.Message):
    __slots__ = ("model", "adapter", "prompt", "negative_prompt", "labels", "cond", "embedding", "batch", "seed", "start_latents", "steps", "solver", "guidance_scale", "grid", "t_start")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    COND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    START_LATENTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    T_START_FIELD_NUMBER: _ClassVar[int]
    model: str
    adapter: str
    prompt: _containers.RepeatedScalarFieldContainer[str]
    negative_prompt: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.RepeatedScalarFieldContainer[int]
    cond: _tensor_pb2.Tensor
    embedding: str
    batch: int
    seed: int
    start_latents: _tensor_pb2.Tensor
    steps: int
    solver: str
    guidance_scale: float
    grid: str
    t_start: float
    def __init__(self, model: _Optional[str] = ..., adapter: _Optional[str] = ..., prompt: _Optional[_Iterable[str]] = ..., negative_prompt: _Optional[_Iterable[str]] = ..., labels: _Optional[_Iterable[int]] = ..., cond: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., embedding: _Optional[str] = ..., batch: _Optional[int] = ..., seed: _Optional[int] = ..., start_latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., steps: _Optional[int] = ..., solver: _Optional[str] = ..., guidance_scale: _Optional[float] = ..., grid: _Optional[str] = ..., t_start: _Optional[float] = ...) -> None: ...

class ServerLoss(_message.Message):
    __slots__ = ("name", "params", "tensors")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _struct_pb2.Struct
    tensors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., tensors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class LossTerm(_message.Message):
    __slots__ = ("weight", "client", "server", "domain")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    weight: float
    client: str
    server: ServerLoss
    domain: Domain
    def __init__(self, weight: _Optional[float] = ..., client: _Optional[str] = ..., server: _Optional[_Union[ServerLoss, _Mapping]] = ..., domain: _Optional[_Union[Domain, str]] = ...) -> None: ...

class LossQuery(_message.Message):
    __slots__ = ("term", "name", "domain", "x", "iteration")
    TERM_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    term: int
    name: str
    domain: Domain
    x: _tensor_pb2.Tensor
    iteration: int
    def __init__(self, term: _Optional[int] = ..., name: _Optional[str] = ..., domain: _Optional[_Union[Domain, str]] = ..., x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., iteration: _Optional[int] = ...) -> None: ...

class LossReply(_message.Message):
    __slots__ = ("term", "value", "grad", "values")
    TERM_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    term: int
    value: float
    grad: _tensor_pb2.Tensor
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, term: _Optional[int] = ..., value: _Optional[float] = ..., grad: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("generation", "no_images", "return_pixels")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    NO_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    generation: Generation
    no_images: bool
    return_pixels: bool
    def __init__(self, generation: _Optional[_Union[Generation, _Mapping]] = ..., no_images: _Optional[bool] = ..., return_pixels: _Optional[bool] = ...) -> None: ...

class TokenSpec(_message.Message):
    __slots__ = ("placeholder", "initializer", "embedding")
    PLACEHOLDER_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    placeholder: str
    initializer: str
    embedding: _tensor_pb2.Tensor
    def __init__(self, placeholder: _Optional[str] = ..., initializer: _Optional[str] = ..., embedding: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class WeightsSpec(_message.Message):
    __slots__ = ("parameters", "lora_rank", "inline")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.RepeatedScalarFieldContainer[str]
    lora_rank: int
    inline: bool
    def __init__(self, parameters: _Optional[_Iterable[str]] = ..., lora_rank: _Optional[int] = ..., inline: _Optional[bool] = ...) -> None: ...

class GradientSpec(_message.Message):
    __slots__ = ("generation", "losses", "targets", "grad_mode", "token", "weights", "return_images", "memory_budget_mib", "truncate", "truncate_min", "decoder_tile")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    GRAD_MODE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_MIB_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_MIN_FIELD_NUMBER: _ClassVar[int]
    DECODER_TILE_FIELD_NUMBER: _ClassVar[int]
    generation: Generation
    losses: _containers.RepeatedCompositeFieldContainer[LossTerm]
    targets: _containers.RepeatedScalarFieldContainer[Target]
    grad_mode: str
    token: TokenSpec
    weights: WeightsSpec
    return_images: bool
    memory_budget_mib: int
    truncate: int
    truncate_min: int
    decoder_tile: int
    def __init__(self, generation: _Optional[_Union[Generation, _Mapping]] = ..., losses: _Optional[_Iterable[_Union[LossTerm, _Mapping]]] = ..., targets: _Optional[_Iterable[_Union[Target, str]]] = ..., grad_mode: _Optional[str] = ..., token: _Optional[_Union[TokenSpec, _Mapping]] = ..., weights: _Optional[_Union[WeightsSpec, _Mapping]] = ..., return_images: _Optional[bool] = ..., memory_budget_mib: _Optional[int] = ..., truncate: _Optional[int] = ..., truncate_min: _Optional[int] = ..., decoder_tile: _Optional[int] = ...) -> None: ...

class ComputeGradientRequest(_message.Message):
    __slots__ = ("spec", "loss_reply")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LOSS_REPLY_FIELD_NUMBER: _ClassVar[int]
    spec: GradientSpec
    loss_reply: LossReply
    def __init__(self, spec: _Optional[_Union[GradientSpec, _Mapping]] = ..., loss_reply: _Optional[_Union[LossReply, _Mapping]] = ...) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ("name", "lr", "iterations", "momentum", "schedule", "warmup")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    iterations: int
    momentum: float
    schedule: str
    warmup: int
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., iterations: _Optional[int] = ..., momentum: _Optional[float] = ..., schedule: _Optional[str] = ..., warmup: _Optional[int] = ...) -> None: ...

class StopWhen(_message.Message):
    __slots__ = ("loss_below", "verdict_changed", "patience")
    LOSS_BELOW_FIELD_NUMBER: _ClassVar[int]
    VERDICT_CHANGED_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    loss_below: float
    verdict_changed: bool
    patience: int
    def __init__(self, loss_below: _Optional[float] = ..., verdict_changed: _Optional[bool] = ..., patience: _Optional[int] = ...) -> None: ...

class Constraint(_message.Message):
    __slots__ = ("norm", "epsilon")
    NORM_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    norm: str
    epsilon: float
    def __init__(self, norm: _Optional[str] = ..., epsilon: _Optional[float] = ...) -> None: ...

class GuidedSampling(_message.Message):
    __slots__ = ("every", "scale", "inner_steps", "grad_steps", "step", "clip")
    EVERY_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    GRAD_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    every: int
    scale: float
    inner_steps: int
    grad_steps: int
    step: str
    clip: float
    def __init__(self, every: _Optional[int] = ..., scale: _Optional[float] = ..., inner_steps: _Optional[int] = ..., grad_steps: _Optional[int] = ..., step: _Optional[str] = ..., clip: _Optional[float] = ...) -> None: ...

class OptimizeLatentSpec(_message.Message):
    __slots__ = ("generation", "losses", "optimizer", "constraint", "norm_weight", "image_every", "grad_mode", "guided", "stop_when", "memory_budget_mib", "decoder_tile")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    NORM_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_EVERY_FIELD_NUMBER: _ClassVar[int]
    GRAD_MODE_FIELD_NUMBER: _ClassVar[int]
    GUIDED_FIELD_NUMBER: _ClassVar[int]
    STOP_WHEN_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_MIB_FIELD_NUMBER: _ClassVar[int]
    DECODER_TILE_FIELD_NUMBER: _ClassVar[int]
    generation: Generation
    losses: _containers.RepeatedCompositeFieldContainer[LossTerm]
    optimizer: Optimizer
    constraint: Constraint
    norm_weight: float
    image_every: int
    grad_mode: str
    guided: GuidedSampling
    stop_when: StopWhen
    memory_budget_mib: int
    decoder_tile: int
    def __init__(self, generation: _Optional[_Union[Generation, _Mapping]] = ..., losses: _Optional[_Iterable[_Union[LossTerm, _Mapping]]] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., constraint: _Optional[_Union[Constraint, _Mapping]] = ..., norm_weight: _Optional[float] = ..., image_every: _Optional[int] = ..., grad_mode: _Optional[str] = ..., guided: _Optional[_Union[GuidedSampling, _Mapping]] = ..., stop_when: _Optional[_Union[StopWhen, _Mapping]] = ..., memory_budget_mib: _Optional[int] = ..., decoder_tile: _Optional[int] = ...) -> None: ...

class OptimizeLatentRequest(_message.Message):
    __slots__ = ("spec", "loss_reply")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LOSS_REPLY_FIELD_NUMBER: _ClassVar[int]
    spec: OptimizeLatentSpec
    loss_reply: LossReply
    def __init__(self, spec: _Optional[_Union[OptimizeLatentSpec, _Mapping]] = ..., loss_reply: _Optional[_Union[LossReply, _Mapping]] = ...) -> None: ...

class FinetuneExample(_message.Message):
    __slots__ = ("seed", "start_latents", "prompt", "label")
    SEED_FIELD_NUMBER: _ClassVar[int]
    START_LATENTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    seed: int
    start_latents: _tensor_pb2.Tensor
    prompt: str
    label: int
    def __init__(self, seed: _Optional[int] = ..., start_latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., prompt: _Optional[str] = ..., label: _Optional[int] = ...) -> None: ...

class WeightedCondition(_message.Message):
    __slots__ = ("prompt", "label", "weight")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    label: int
    weight: float
    def __init__(self, prompt: _Optional[str] = ..., label: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class FinetuneWeightsSpec(_message.Message):
    __slots__ = ("generation", "examples", "losses", "optimizer", "method", "lora_rank", "lora_alpha", "target_modules", "checkpoint_every", "name", "batch_size", "grad_mode", "resume_from", "keep_checkpoints", "validation", "validate_every", "keep_best", "stop_when", "memory_budget_mib", "resume_job", "truncate", "truncate_min", "conditions", "seed", "micro_batch", "decoder_tile")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAD_MODE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    KEEP_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_EVERY_FIELD_NUMBER: _ClassVar[int]
    KEEP_BEST_FIELD_NUMBER: _ClassVar[int]
    STOP_WHEN_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_MIB_FIELD_NUMBER: _ClassVar[int]
    RESUME_JOB_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_MIN_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    DECODER_TILE_FIELD_NUMBER: _ClassVar[int]
    generation: Generation
    examples: _containers.RepeatedCompositeFieldContainer[FinetuneExample]
    losses: _containers.RepeatedCompositeFieldContainer[LossTerm]
    optimizer: Optimizer
    method: str
    lora_rank: int
    lora_alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    checkpoint_every: int
    name: str
    batch_size: int
    grad_mode: str
    resume_from: str
    keep_checkpoints: int
    validation: _containers.RepeatedCompositeFieldContainer[FinetuneExample]
    validate_every: int
    keep_best: bool
    stop_when: StopWhen
    memory_budget_mib: int
    resume_job: str
    truncate: int
    truncate_min: int
    conditions: _containers.RepeatedCompositeFieldContainer[WeightedCondition]
    seed: int
    micro_batch: int
    decoder_tile: int
    def __init__(self, generation: _Optional[_Union[Generation, _Mapping]] = ..., examples: _Optional[_Iterable[_Union[FinetuneExample, _Mapping]]] = ..., losses: _Optional[_Iterable[_Union[LossTerm, _Mapping]]] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., method: _Optional[str] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., checkpoint_every: _Optional[int] = ..., name: _Optional[str] = ..., batch_size: _Optional[int] = ..., grad_mode: _Optional[str] = ..., resume_from: _Optional[str] = ..., keep_checkpoints: _Optional[int] = ..., validation: _Optional[_Iterable[_Union[FinetuneExample, _Mapping]]] = ..., validate_every: _Optional[int] = ..., keep_best: _Optional[bool] = ..., stop_when: _Optional[_Union[StopWhen, _Mapping]] = ..., memory_budget_mib: _Optional[int] = ..., resume_job: _Optional[str] = ..., truncate: _Optional[int] = ..., truncate_min: _Optional[int] = ..., conditions: _Optional[_Iterable[_Union[WeightedCondition, _Mapping]]] = ..., seed: _Optional[int] = ..., micro_batch: _Optional[int] = ..., decoder_tile: _Optional[int] = ...) -> None: ...

class FinetuneWeightsRequest(_message.Message):
    __slots__ = ("spec", "loss_reply")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LOSS_REPLY_FIELD_NUMBER: _ClassVar[int]
    spec: FinetuneWeightsSpec
    loss_reply: LossReply
    def __init__(self, spec: _Optional[_Union[FinetuneWeightsSpec, _Mapping]] = ..., loss_reply: _Optional[_Union[LossReply, _Mapping]] = ...) -> None: ...

class OptimizeEmbeddingSpec(_message.Message):
    __slots__ = ("generation", "losses", "target_image", "optimizer", "token", "name", "grad_mode", "image_every", "prior", "prior_weight", "stop_when", "memory_budget_mib", "decoder_tile")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    TARGET_IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRAD_MODE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_EVERY_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    PRIOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STOP_WHEN_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_MIB_FIELD_NUMBER: _ClassVar[int]
    DECODER_TILE_FIELD_NUMBER: _ClassVar[int]
    generation: Generation
    losses: _containers.RepeatedCompositeFieldContainer[LossTerm]
    target_image: _tensor_pb2.Tensor
    optimizer: Optimizer
    token: TokenSpec
    name: str
    grad_mode: str
    image_every: int
    prior: str
    prior_weight: float
    stop_when: StopWhen
    memory_budget_mib: int
    decoder_tile: int
    def __init__(self, generation: _Optional[_Union[Generation, _Mapping]] = ..., losses: _Optional[_Iterable[_Union[LossTerm, _Mapping]]] = ..., target_image: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., token: _Optional[_Union[TokenSpec, _Mapping]] = ..., name: _Optional[str] = ..., grad_mode: _Optional[str] = ..., image_every: _Optional[int] = ..., prior: _Optional[str] = ..., prior_weight: _Optional[float] = ..., stop_when: _Optional[_Union[StopWhen, _Mapping]] = ..., memory_budget_mib: _Optional[int] = ..., decoder_tile: _Optional[int] = ...) -> None: ...

class OptimizeEmbeddingRequest(_message.Message):
    __slots__ = ("spec", "loss_reply")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LOSS_REPLY_FIELD_NUMBER: _ClassVar[int]
    spec: OptimizeEmbeddingSpec
    loss_reply: LossReply
    def __init__(self, spec: _Optional[_Union[OptimizeEmbeddingSpec, _Mapping]] = ..., loss_reply: _Optional[_Union[LossReply, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "step", "total", "t", "nfe", "iteration")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    NFE_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    phase: str
    step: int
    total: int
    t: float
    nfe: int
    iteration: int
    def __init__(self, phase: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., t: _Optional[float] = ..., nfe: _Optional[int] = ..., iteration: _Optional[int] = ...) -> None: ...

class QueuePosition(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Iteration(_message.Message):
    __slots__ = ("iteration", "loss", "loss_terms", "grad_norm", "images", "sample_losses", "start_latents", "stopped", "lr")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_TERMS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LOSSES_FIELD_NUMBER: _ClassVar[int]
    START_LATENTS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    loss: float
    loss_terms: _containers.RepeatedScalarFieldContainer[float]
    grad_norm: float
    images: _containers.RepeatedScalarFieldContainer[bytes]
    sample_losses: _containers.RepeatedScalarFieldContainer[float]
    start_latents: _tensor_pb2.Tensor
    stopped: _containers.RepeatedScalarFieldContainer[bool]
    lr: float
    def __init__(self, iteration: _Optional[int] = ..., loss: _Optional[float] = ..., loss_terms: _Optional[_Iterable[float]] = ..., grad_norm: _Optional[float] = ..., images: _Optional[_Iterable[bytes]] = ..., sample_losses: _Optional[_Iterable[float]] = ..., start_latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., stopped: _Optional[_Iterable[bool]] = ..., lr: _Optional[float] = ...) -> None: ...

class Validation(_message.Message):
    __slots__ = ("iteration", "loss", "loss_terms", "agreement", "images", "best")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_TERMS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    loss: float
    loss_terms: _containers.RepeatedScalarFieldContainer[float]
    agreement: float
    images: _containers.RepeatedScalarFieldContainer[bytes]
    best: bool
    def __init__(self, iteration: _Optional[int] = ..., loss: _Optional[float] = ..., loss_terms: _Optional[_Iterable[float]] = ..., agreement: _Optional[float] = ..., images: _Optional[_Iterable[bytes]] = ..., best: _Optional[bool] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "replica", "iteration")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    replica: str
    iteration: int
    def __init__(self, id: _Optional[str] = ..., replica: _Optional[str] = ..., iteration: _Optional[int] = ...) -> None: ...

class MemoryPlan(_message.Message):
    __slots__ = ("grad_mode", "steps", "gradient_steps", "kept_graphs", "stored_states", "network_checkpointing", "graph_bytes", "budget_bytes", "iteration", "decoder_slice_size", "decoder_checkpointing", "decoder_graph_bytes", "decoder_tile")
    GRAD_MODE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_STEPS_FIELD_NUMBER: _ClassVar[int]
    KEPT_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    STORED_STATES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    GRAPH_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    DECODER_SLICE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DECODER_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    DECODER_GRAPH_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODER_TILE_FIELD_NUMBER: _ClassVar[int]
    grad_mode: str
    steps: int
    gradient_steps: int
    kept_graphs: int
    stored_states: int
    network_checkpointing: bool
    graph_bytes: int
    budget_bytes: int
    iteration: int
    decoder_slice_size: int
    decoder_checkpointing: str
    decoder_graph_bytes: int
    decoder_tile: int
    def __init__(self, grad_mode: _Optional[str] = ..., steps: _Optional[int] = ..., gradient_steps: _Optional[int] = ..., kept_graphs: _Optional[int] = ..., stored_states: _Optional[int] = ..., network_checkpointing: _Optional[bool] = ..., graph_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., iteration: _Optional[int] = ..., decoder_slice_size: _Optional[int] = ..., decoder_checkpointing: _Optional[str] = ..., decoder_graph_bytes: _Optional[int] = ..., decoder_tile: _Optional[int] = ...) -> None: ...

class ArtifactInfo(_message.Message):
    __slots__ = ("id", "kind", "model", "size", "name", "iteration", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    model: str
    size: int
    name: str
    iteration: int
    metadata: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., size: _Optional[int] = ..., name: _Optional[str] = ..., iteration: _Optional[int] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class SampleResult(_message.Message):
    __slots__ = ("images", "x0", "start_latents", "pixels")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    START_LATENTS_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    x0: _tensor_pb2.Tensor
    start_latents: _tensor_pb2.Tensor
    pixels: _tensor_pb2.Tensor
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., x0: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., start_latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., pixels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GradientResult(_message.Message):
    __slots__ = ("loss", "loss_terms", "x0", "images", "gradients", "weight_gradients", "weights_artifact", "nfe", "sample_losses")
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class WeightGradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_TERMS_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    NFE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LOSSES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    loss_terms: _containers.RepeatedScalarFieldContainer[float]
    x0: _tensor_pb2.Tensor
    images: _containers.RepeatedScalarFieldContainer[bytes]
    gradients: _containers.MessageMap[str, _tensor_pb2.Tensor]
    weight_gradients: _containers.MessageMap[str, _tensor_pb2.Tensor]
    weights_artifact: ArtifactInfo
    nfe: int
    sample_losses: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, loss: _Optional[float] = ..., loss_terms: _Optional[_Iterable[float]] = ..., x0: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., images: _Optional[_Iterable[bytes]] = ..., gradients: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., weight_gradients: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., weights_artifact: _Optional[_Union[ArtifactInfo, _Mapping]] = ..., nfe: _Optional[int] = ..., sample_losses: _Optional[_Iterable[float]] = ...) -> None: ...

class OptimizeResult(_message.Message):
    __slots__ = ("loss", "history", "start_latents", "x0", "images", "initial_images", "artifact", "sample_losses", "best_iteration", "stopped", "iterations_run", "last_start_latents")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    START_LATENTS_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INITIAL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LOSSES_FIELD_NUMBER: _ClassVar[int]
    BEST_ITERATION_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_RUN_FIELD_NUMBER: _ClassVar[int]
    LAST_START_LATENTS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    history: _containers.RepeatedScalarFieldContainer[float]
    start_latents: _tensor_pb2.Tensor
    x0: _tensor_pb2.Tensor
    images: _containers.RepeatedScalarFieldContainer[bytes]
    initial_images: _containers.RepeatedScalarFieldContainer[bytes]
    artifact: ArtifactInfo
    sample_losses: _containers.RepeatedScalarFieldContainer[float]
    best_iteration: _containers.RepeatedScalarFieldContainer[int]
    stopped: _containers.RepeatedScalarFieldContainer[bool]
    iterations_run: int
    last_start_latents: _tensor_pb2.Tensor
    def __init__(self, loss: _Optional[float] = ..., history: _Optional[_Iterable[float]] = ..., start_latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., x0: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., images: _Optional[_Iterable[bytes]] = ..., initial_images: _Optional[_Iterable[bytes]] = ..., artifact: _Optional[_Union[ArtifactInfo, _Mapping]] = ..., sample_losses: _Optional[_Iterable[float]] = ..., best_iteration: _Optional[_Iterable[int]] = ..., stopped: _Optional[_Iterable[bool]] = ..., iterations_run: _Optional[int] = ..., last_start_latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("progress", "queued", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    queued: QueuePosition
    result: SampleResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., queued: _Optional[_Union[QueuePosition, _Mapping]] = ..., result: _Optional[_Union[SampleResult, _Mapping]] = ...) -> None: ...

class ComputeGradientResponse(_message.Message):
    __slots__ = ("progress", "queued", "loss_query", "plan", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    LOSS_QUERY_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    queued: QueuePosition
    loss_query: LossQuery
    plan: MemoryPlan
    result: GradientResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., queued: _Optional[_Union[QueuePosition, _Mapping]] = ..., loss_query: _Optional[_Union[LossQuery, _Mapping]] = ..., plan: _Optional[_Union[MemoryPlan, _Mapping]] = ..., result: _Optional[_Union[GradientResult, _Mapping]] = ...) -> None: ...

class OptimizeLatentResponse(_message.Message):
    __slots__ = ("progress", "queued", "loss_query", "plan", "iteration", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    LOSS_QUERY_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    queued: QueuePosition
    loss_query: LossQuery
    plan: MemoryPlan
    iteration: Iteration
    result: OptimizeResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., queued: _Optional[_Union[QueuePosition, _Mapping]] = ..., loss_query: _Optional[_Union[LossQuery, _Mapping]] = ..., plan: _Optional[_Union[MemoryPlan, _Mapping]] = ..., iteration: _Optional[_Union[Iteration, _Mapping]] = ..., result: _Optional[_Union[OptimizeResult, _Mapping]] = ...) -> None: ...

class FinetuneWeightsResponse(_message.Message):
    __slots__ = ("progress", "queued", "loss_query", "plan", "iteration", "job", "checkpoint", "validation", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    LOSS_QUERY_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    queued: QueuePosition
    loss_query: LossQuery
    plan: MemoryPlan
    iteration: Iteration
    job: Job
    checkpoint: ArtifactInfo
    validation: Validation
    result: OptimizeResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., queued: _Optional[_Union[QueuePosition, _Mapping]] = ..., loss_query: _Optional[_Union[LossQuery, _Mapping]] = ..., plan: _Optional[_Union[MemoryPlan, _Mapping]] = ..., iteration: _Optional[_Union[Iteration, _Mapping]] = ..., job: _Optional[_Union[Job, _Mapping]] = ..., checkpoint: _Optional[_Union[ArtifactInfo, _Mapping]] = ..., validation: _Optional[_Union[Validation, _Mapping]] = ..., result: _Optional[_Union[OptimizeResult, _Mapping]] = ...) -> None: ...

class OptimizeEmbeddingResponse(_message.Message):
    __slots__ = ("progress", "queued", "loss_query", "plan", "iteration", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    LOSS_QUERY_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    queued: QueuePosition
    loss_query: LossQuery
    plan: MemoryPlan
    iteration: Iteration
    result: OptimizeResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., queued: _Optional[_Union[QueuePosition, _Mapping]] = ..., loss_query: _Optional[_Union[LossQuery, _Mapping]] = ..., plan: _Optional[_Union[MemoryPlan, _Mapping]] = ..., iteration: _Optional[_Union[Iteration, _Mapping]] = ..., result: _Optional[_Union[OptimizeResult, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "spec", "is_default", "latent_shape", "image_shape", "conditioning", "default_steps", "default_guidance", "solvers", "grad_modes", "adapters", "path", "schedule", "prediction", "default_grid", "t_min", "t_max", "family", "guidance", "cond_shape", "token_dim")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SOLVERS_FIELD_NUMBER: _ClassVar[int]
    GRAD_MODES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GRID_FIELD_NUMBER: _ClassVar[int]
    T_MIN_FIELD_NUMBER: _ClassVar[int]
    T_MAX_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    COND_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: str
    is_default: bool
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    conditioning: str
    default_steps: int
    default_guidance: float
    solvers: _containers.RepeatedScalarFieldContainer[str]
    grad_modes: _containers.RepeatedScalarFieldContainer[str]
    adapters: _containers.RepeatedCompositeFieldContainer[ArtifactInfo]
    path: str
    schedule: str
    prediction: str
    default_grid: str
    t_min: float
    t_max: float
    family: str
    guidance: str
    cond_shape: _containers.RepeatedScalarFieldContainer[int]
    token_dim: int
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[str] = ..., is_default: _Optional[bool] = ..., latent_shape: _Optional[_Iterable[int]] = ..., image_shape: _Optional[_Iterable[int]] = ..., conditioning: _Optional[str] = ..., default_steps: _Optional[int] = ..., default_guidance: _Optional[float] = ..., solvers: _Optional[_Iterable[str]] = ..., grad_modes: _Optional[_Iterable[str]] = ..., adapters: _Optional[_Iterable[_Union[ArtifactInfo, _Mapping]]] = ..., path: _Optional[str] = ..., schedule: _Optional[str] = ..., prediction: _Optional[str] = ..., default_grid: _Optional[str] = ..., t_min: _Optional[float] = ..., t_max: _Optional[float] = ..., family: _Optional[str] = ..., guidance: _Optional[str] = ..., cond_shape: _Optional[_Iterable[int]] = ..., token_dim: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ListLossesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LossInfo(_message.Message):
    __slots__ = ("name", "description", "params", "tensors", "domain")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    params: _containers.RepeatedScalarFieldContainer[str]
    tensors: _containers.RepeatedScalarFieldContainer[str]
    domain: Domain
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., params: _Optional[_Iterable[str]] = ..., tensors: _Optional[_Iterable[str]] = ..., domain: _Optional[_Union[Domain, str]] = ...) -> None: ...

class ListLossesResponse(_message.Message):
    __slots__ = ("losses",)
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[LossInfo]
    def __init__(self, losses: _Optional[_Iterable[_Union[LossInfo, _Mapping]]] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("id", "format")
    ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    id: str
    format: str
    def __init__(self, id: _Optional[str] = ..., format: _Optional[str] = ...) -> None: ...

class DeleteArtifactRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteArtifactResponse(_message.Message):
    __slots__ = ("artifact",)
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    artifact: ArtifactInfo
    def __init__(self, artifact: _Optional[_Union[ArtifactInfo, _Mapping]] = ...) -> None: ...

class GetArtifactResponse(_message.Message):
    __slots__ = ("info", "data")
    INFO_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    info: ArtifactInfo
    data: bytes
    def __init__(self, info: _Optional[_Union[ArtifactInfo, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetServerMetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_batch", "max_steps", "max_iterations", "max_examples", "max_tensor_elements", "max_message_bytes", "max_inline_weight_elements", "max_lora_rank", "max_network_calls", "client_loss_timeout_s", "max_request_s", "grad_memory_bytes")
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_INLINE_WEIGHT_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_NETWORK_CALLS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LOSS_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_S_FIELD_NUMBER: _ClassVar[int]
    GRAD_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_batch: int
    max_steps: int
    max_iterations: int
    max_examples: int
    max_tensor_elements: int
    max_message_bytes: int
    max_inline_weight_elements: int
    max_lora_rank: int
    max_network_calls: int
    client_loss_timeout_s: float
    max_request_s: float
    grad_memory_bytes: int
    def __init__(self, max_batch: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_iterations: _Optional[int] = ..., max_examples: _Optional[int] = ..., max_tensor_elements: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_inline_weight_elements: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., max_network_calls: _Optional[int] = ..., client_loss_timeout_s: _Optional[float] = ..., max_request_s: _Optional[float] = ..., grad_memory_bytes: _Optional[int] = ...) -> None: ...

class GetServerMetadataResponse(_message.Message):
    __slots__ = ("name", "version", "api_package", "models", "default_model", "losses", "grad_modes", "solvers", "tensor_dtypes", "compute_dtype", "limits", "extensions", "api_packages")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_PACKAGE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    GRAD_MODES_FIELD_NUMBER: _ClassVar[int]
    SOLVERS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_DTYPES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    API_PACKAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    api_package: str
    models: _containers.RepeatedScalarFieldContainer[str]
    default_model: str
    losses: _containers.RepeatedScalarFieldContainer[str]
    grad_modes: _containers.RepeatedScalarFieldContainer[str]
    solvers: _containers.RepeatedScalarFieldContainer[str]
    tensor_dtypes: _containers.RepeatedScalarFieldContainer[str]
    compute_dtype: str
    limits: ServerLimits
    extensions: _containers.RepeatedScalarFieldContainer[str]
    api_packages: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., api_package: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., default_model: _Optional[str] = ..., losses: _Optional[_Iterable[str]] = ..., grad_modes: _Optional[_Iterable[str]] = ..., solvers: _Optional[_Iterable[str]] = ..., tensor_dtypes: _Optional[_Iterable[str]] = ..., compute_dtype: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., extensions: _Optional[_Iterable[str]] = ..., api_packages: _Optional[_Iterable[str]] = ...) -> None: ...
