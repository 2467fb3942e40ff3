from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Normalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZATION_UNSPECIFIED: _ClassVar[Normalization]
    NORMALIZATION_RAW: _ClassVar[Normalization]
    NORMALIZATION_SIGMOID: _ClassVar[Normalization]

class LongDocs(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LONG_DOCS_UNSPECIFIED: _ClassVar[LongDocs]
    LONG_DOCS_MAX: _ClassVar[LongDocs]
    LONG_DOCS_TRUNCATE: _ClassVar[LongDocs]

class Fusion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_UNSPECIFIED: _ClassVar[Fusion]
    FUSION_OFF: _ClassVar[Fusion]
    FUSION_AUTO: _ClassVar[Fusion]

class InputType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_TYPE_UNSPECIFIED: _ClassVar[InputType]
    INPUT_TYPE_QUERY: _ClassVar[InputType]
    INPUT_TYPE_DOCUMENT: _ClassVar[InputType]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_RERANKER: _ClassVar[ModelKind]
    MODEL_KIND_DENSE_ENCODER: _ClassVar[ModelKind]
    MODEL_KIND_SPARSE_ENCODER: _ClassVar[ModelKind]
NORMALIZATION_UNSPECIFIED: Normalization
NORMALIZATION_RAW: Normalization
NORMALIZATION_SIGMOID: Normalization
LONG_DOCS_UNSPECIFIED: LongDocs
LONG_DOCS_MAX: LongDocs
LONG_DOCS_TRUNCATE: LongDocs
FUSION_UNSPECIFIED: Fusion
FUSION_OFF: Fusion
FUSION_AUTO: Fusion
INPUT_TYPE_UNSPECIFIED: InputType
INPUT_TYPE_QUERY: InputType
INPUT_TYPE_DOCUMENT: InputType
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_RERANKER: ModelKind
MODEL_KIND_DENSE_ENCODER: ModelKind
MODEL_KIND_SPARSE_ENCODER: ModelKind

class Document(_message.Message):
    __slots__ = ("id", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class RerankOptions(_message.Message):
    __slots__ = ("max_length", "normalization", "return_documents", "depth", "long_docs", "window_overlap", "max_doc_tokens", "keep_schedule", "keep_ratio", "keep_from_layer", "fusion")
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    LONG_DOCS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MAX_DOC_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEEP_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    KEEP_RATIO_FIELD_NUMBER: _ClassVar[int]
    KEEP_FROM_LAYER_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    max_length: int
    normalization: Normalization
    return_documents: bool
    depth: int
    long_docs: LongDocs
    window_overlap: int
    max_doc_tokens: int
    keep_schedule: _containers.RepeatedScalarFieldContainer[float]
    keep_ratio: float
    keep_from_layer: int
    fusion: Fusion
    def __init__(self, max_length: _Optional[int] = ..., normalization: _Optional[_Union[Normalization, str]] = ..., return_documents: bool = ..., depth: _Optional[int] = ..., long_docs: _Optional[_Union[LongDocs, str]] = ..., window_overlap: _Optional[int] = ..., max_doc_tokens: _Optional[int] = ..., keep_schedule: _Optional[_Iterable[float]] = ..., keep_ratio: _Optional[float] = ..., keep_from_layer: _Optional[int] = ..., fusion: _Optional[_Union[Fusion, str]] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "top_n", "model", "options")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    top_n: int
    model: str
    options: RerankOptions
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., top_n: _Optional[int] = ..., model: _Optional[str] = ..., options: _Optional[_Union[RerankOptions, _Mapping]] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("index", "id", "score", "text", "model_score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    score: float
    text: str
    model_score: float
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., score: _Optional[float] = ..., text: _Optional[str] = ..., model_score: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("tokens", "cache_hits")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    cache_hits: int
    def __init__(self, tokens: _Optional[int] = ..., cache_hits: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_us", "tokenize_us", "inference_us")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_US_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_US_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    tokenize_us: int
    inference_us: int
    def __init__(self, queue_us: _Optional[int] = ..., tokenize_us: _Optional[int] = ..., inference_us: _Optional[int] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("results", "model", "usage", "timings", "depth", "keep_schedule", "fusion_weight")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    KEEP_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    FUSION_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    model: str
    usage: Usage
    timings: Timings
    depth: int
    keep_schedule: _containers.RepeatedScalarFieldContainer[float]
    fusion_weight: float
    def __init__(self, results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., model: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., depth: _Optional[int] = ..., keep_schedule: _Optional[_Iterable[float]] = ..., fusion_weight: _Optional[float] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "dense_model", "input_type", "dense", "sparse", "normalize", "sparse_model")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    DENSE_MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_MODEL_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    dense_model: str
    input_type: InputType
    dense: bool
    sparse: bool
    normalize: bool
    sparse_model: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., dense_model: _Optional[str] = ..., input_type: _Optional[_Union[InputType, str]] = ..., dense: bool = ..., sparse: bool = ..., normalize: bool = ..., sparse_model: _Optional[str] = ...) -> None: ...

class DenseVector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SparseVector(_message.Message):
    __slots__ = ("indices", "values")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, indices: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("dense", "sparse")
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    dense: DenseVector
    sparse: SparseVector
    def __init__(self, dense: _Optional[_Union[DenseVector, _Mapping]] = ..., sparse: _Optional[_Union[SparseVector, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dense_model", "sparse_model", "usage")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DENSE_MODEL_FIELD_NUMBER: _ClassVar[int]
    SPARSE_MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dense_model: str
    sparse_model: str
    usage: Usage
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dense_model: _Optional[str] = ..., sparse_model: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "source", "architecture", "num_layers", "hidden_size", "num_heads", "max_length", "default_max_length", "backend", "precision", "device", "is_default", "dimension", "supports_depth", "supports_token_pruning", "supports_fusion", "default_long_docs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_TOKEN_PRUNING_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_FUSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LONG_DOCS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ModelKind
    source: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    max_length: int
    default_max_length: int
    backend: str
    precision: str
    device: str
    is_default: bool
    dimension: int
    supports_depth: bool
    supports_token_pruning: bool
    supports_fusion: bool
    default_long_docs: LongDocs
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., source: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_heads: _Optional[int] = ..., max_length: _Optional[int] = ..., default_max_length: _Optional[int] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., is_default: bool = ..., dimension: _Optional[int] = ..., supports_depth: bool = ..., supports_token_pruning: bool = ..., supports_fusion: bool = ..., default_long_docs: _Optional[_Union[LongDocs, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
