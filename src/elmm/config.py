"""The pipeline's parameters: one schema for `params.yaml`, validated on load.

Every key is declared here with its type and default. Loading rejects unknown keys, wrong types
and impossible values with a message naming the dotted key (e.g. `prune.k`), so a typo in an
`dvc exp run -S ...` override fails at once instead of silently using a default.

Why one module of ~440 lines: it is the schema of one file (`params.yaml`), read top to bottom
beside it; tests/test_project.py checks that the two agree.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """A params.yaml problem, with the dotted key in the message."""


@dataclass
class SyntheticParams:
    entities: int = 300
    images_per_entity: int = 10
    image_size: int = 32
    fewer_images: float = 0.1
    no_images: float = 0.03
    corrupt_images: int = 3
    distractor_images: float = 0.3
    colour_in_text: float = 0.3
    communities: int = 12
    teams: int = 20
    knows_degree: float = 5.0
    works_with_degree: float = 4.0
    rival_degree: float = 2.0
    valid_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclass
class DataParams:
    name: Literal["synthetic", "fb15k-237-img", "wn18-img", "custom"] = "synthetic"
    url: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    drop_unknown: bool = False
    max_image_pixels: int = 64_000_000  # larger images are skipped at ingestion (decompression bombs)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)


@dataclass
class TinyBackboneParams:
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 8
    heads: int = 4
    intermediate: int = 256
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8


@dataclass
class PretrainParams:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    caption_share: float = 0.5  # share of steps that are caption batches (the rest read text)
    triples_after: float = 0.3  # share of the steps before verbalised train triples join the text
    reading_share: float = 0.8  # share of the text steps that are reading exercises about invented entities
    reading_loss: Literal["line", "answer", "both"] = "both"  # the exercises' loss: every token, the answer, or both means
    pictures: int = 4000  # rendered caption pictures to train on
    heldout_pictures: int = 256
    heldout_text: float = 0.05  # share of text lines kept out, to measure held-out loss
    heldout_lines: int = 1024  # at most this many of them evaluated (large KGs); the rest stay out of training


@dataclass
class MVTCParams:
    enabled: bool = True
    text_view: bool = True
    image_view: bool = True
    heads: int = 4
    text_query: Literal["prompt", "entity_relation"] = "prompt"  # what the text view's query X_t max-pools
    value: Literal["per_head", "shared", "low_rank"] = "per_head"  # the value maps W^V (docs/model.md)
    value_rank: int = 8  # r of value=low_rank


@dataclass
class KnowledgeParams:
    """MR-MKG's knowledge path (docs/knowledge.md): retrieved training subgraph -> graph encoder ->
    knowledge tokens before the image block; optionally a graph term on the candidate side."""

    enabled: bool = False
    max_triples: int = 10  # N: triples kept per query subgraph (and per candidate neighbourhood)
    seed_triples: int = 5  # n: the anchor's most relevant triples, expanded by one hop
    reverse_edge: Literal["remove", "keep"] = "remove"  # training: also drop (t, r, h) of the query edge
    layers: int = 2  # message-passing layers of the encoder (0: node initialisation only)
    conv: Literal["rgat", "gat", "gcn"] = "rgat"
    dim: int = 128  # width of the graph encoder
    tokens: int = 4  # knowledge tokens placed before the image block
    candidates: Literal["free", "graph"] = "free"  # graph: + E'_m . P h_e from each candidate's neighbourhood
    node_rows: bool = False  # node init also reads a learned map (zero at start) of the entity's answer-side row
    align_margin: float = 0.2  # triplet margin (unit-normalised node embeddings)
    align_lambda: float = 0.1  # weight of the cross-modal alignment loss; 0 disables it


@dataclass
class ModelParams:
    backbone: str = "tiny"  # tiny | tiny-qwen2-vl (built locally) | a HF name or local checkpoint dir
    tiny: TinyBackboneParams = field(default_factory=TinyBackboneParams)
    mvtc: MVTCParams = field(default_factory=MVTCParams)
    knowledge: KnowledgeParams = field(default_factory=KnowledgeParams)
    head: Literal["completion", "lm_head"] = "completion"
    entity_readout: Literal["segment_end", "name_end"] = "segment_end"  # the token E_entity is read at
    # a learned vector per anchor entity, added at entity_token_at; relational: times a learned
    # diagonal per relation and direction; complex: times a complex diagonal (ComplEx's); none: off
    entity_token: Literal["none", "free", "relational", "complex"] = "complex"
    entity_token_at: Literal["name", "answer", "both"] = "answer"  # added at the name's last token, the answer cue, or both
    entity_token_tied: bool = True  # the vector also reads the anchor's answer-side row (False before measured)
    entity_token_dropout: float = 0.0  # training: share of queries whose anchor vector is left out
    max_text_tokens: int = 32
    max_image_tokens: int = 256
    # after the answer cue, the tokens every training answer's name of the relation starts with
    # (elmm.prompt.answer_prefixes), so E_relation is read where the backbone reads the value
    answer_prefix: bool = True  # (False before it was measured)


@dataclass
class EncodeParams:
    feature_layer: int = -2
    batch_size: int = 64
    shard_rows: int | None = None  # None: as many images as fit in ~256 MB
    pool: int = 1  # p >= 2: p x p average pooling of the patch grid (0 and 1: none)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU


@dataclass
class PruneParams:
    k: int = 4
    samples: int = 256
    heldout: float = 0.25
    batch_size: int = 32
    compensation: Literal["ridge", "paper", "none"] = "ridge"
    init: Literal["closed_form", "zero"] = "closed_form"
    target: Literal["global", "local"] = "global"
    ridge: float = 0.01
    similarity: Literal["residual", "attention"] = "residual"  # the reading that ranks layers for pruning


@dataclass
class LoraParams:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0  # 0.05 before the batch-64 default


@dataclass
class TrainParams:
    lr: float = 6e-4  # at batch 64 (3e-4 at batch 32 before)
    entity_lr_scale: float = 10.0  # lr multiplier of the per-entity tables (completion rows, entity tokens)
    epochs: int = 10
    batch_size: int = 64  # 32 before
    grad_accum: int = 1
    max_steps: int | None = None
    patience: int = 0  # stop after this many epochs without a better validation MRR; 0 = train every epoch
    loss: Literal["bce", "softmax"] = "softmax"  # softmax: cross-entropy against every entity | bce: eq. 15, sampled negatives
    negatives: int = 32
    self_denoise: bool = True
    label_smoothing: float = 0.0  # softmax: this share of the target's mass spread over the normaliser's entities
    warmup_steps: int = 20
    weight_decay: float = 0.3  # AdamW's decoupled decay of every trainable tensor (0 before it was measured)
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    lora: LoraParams = field(default_factory=LoraParams)
    checkpoint_every: int = 100  # optimizer steps between checkpoints (also at every epoch end); 0 = never
    hard_negatives: Literal["none", "faiss"] = "none"
    hard_negatives_pool: int = 16  # nearest entity vectors of the target to draw hard negatives from
    hard_negatives_fraction: float = 0.5  # share of train.negatives drawn from that pool, the rest uniform
    hard_negatives_refresh: int = 50  # optimizer steps between rebuilds of the nearest-neighbour table


@dataclass
class EvaluateParams:
    split: Literal["valid", "test"] = "test"
    batch_size: int = 128
    index: Literal["flat", "hnsw", "ivf"] = "flat"  # faiss index over the entity vectors (flat = exact)
    index_k: int = 10  # top-k of the recall@k check of the index against the exact model scores
    index_hnsw_m: int = 32
    index_ef_search: int = 64
    index_nlist: int = 0  # IVF lists; 0 = about sqrt(entities)
    index_nprobe: int = 4
    # head queries (?, r, t): direct (their own prompt) | triples (log p(t | e, r) from each candidate's
    # tail query) | sum (both) | per_relation (the best of the three per relation on valid); elmm.head_scoring
    head_scoring: Literal["direct", "triples", "sum", "per_relation"] = "per_relation"


@dataclass
class BaselinesParams:
    """Stage `baselines` (docs/baselines.md). The RotatE settings were chosen by `python -m elmm.kge tune`."""

    kge: Literal["rotate", "none"] = "rotate"  # the structure-only KGE baseline (rotate needs `.[kge]`)
    dim: int = 256
    lr: float = 0.01
    max_epochs: int = 20
    patience: int = 2
    eval_every: int = 5
    negatives: int = 16
    batch_size: int = 64
    margin: float = 6.0


@dataclass
class Params:
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    encode: EncodeParams = field(default_factory=EncodeParams)
    prune: PruneParams = field(default_factory=PruneParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    baselines: BaselinesParams = field(default_factory=BaselinesParams)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # a single url/checksum given as a string
            value = [value]
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads "3e-4" (no dot) as a string; accept it, reject everything else.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ParamsError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(
            f"unknown key {where}{unknown[0]} (known keys under {prefix or 'the top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ParamsError(f"{key}: {msg}")


def _check_fraction(value: float, key: str, *, closed: bool = True) -> None:
    _require(0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0, key,
             f"must be in [0, 1{']' if closed else ')'}, got {value}")


def validate(p: Params, num_layers: int | None = None) -> None:
    """Value checks that types alone cannot express.

    `num_layers` is the backbone's decoder depth, known only once the backbone is loaded; stages
    that have it pass it so `prune.k` is checked against the real model.
    """
    s = p.data.synthetic
    for key in ("entities", "images_per_entity", "image_size", "communities", "teams"):
        _require(getattr(s, key) >= 1, f"data.synthetic.{key}", "must be at least 1")
    _require(s.entities >= 10, "data.synthetic.entities", "must be at least 10")
    for key in ("fewer_images", "no_images", "distractor_images", "colour_in_text", "valid_fraction", "test_fraction"):
        _check_fraction(getattr(s, key), f"data.synthetic.{key}")
    _require(s.valid_fraction + s.test_fraction < 0.9, "data.synthetic.valid_fraction",
             "valid_fraction + test_fraction must leave at least 10% for training")
    _require(s.corrupt_images >= 0, "data.synthetic.corrupt_images", "must be >= 0")
    for key in ("knows_degree", "works_with_degree", "rival_degree"):
        _require(getattr(s, key) >= 0, f"data.synthetic.{key}", "must be >= 0 (0: no such edges)")
    if p.data.sha256:
        _require(len(p.data.sha256) == len(p.data.url), "data.sha256", "give one checksum per data.url entry")
    for i, digest in enumerate(p.data.sha256):
        _require(digest == "" or (len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest)),
                 f"data.sha256[{i}]", f"{digest!r} is not a hex sha256 (64 characters) or \"\" (no check)")
    for i, url in enumerate(p.data.url):
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        _require(url != "" and scheme in ("", "http", "https", "file"), f"data.url[{i}]",
                 f"{url!r}: use https://, http://, file:// or a local path")
    _require(p.data.max_image_pixels >= 1, "data.max_image_pixels", "must be at least 1")
    if p.data.name != "synthetic":
        _require(bool(p.data.url), "data.url", f"data.name={p.data.name} needs at least one archive or directory")

    t = p.model.tiny
    for key in ("vocab_size", "hidden", "layers", "heads", "intermediate", "vision_hidden", "vision_layers",
                "vision_heads", "image_size", "patch_size"):
        _require(getattr(t, key) >= 1, f"model.tiny.{key}", "must be at least 1")
    _require(t.hidden % t.heads == 0, "model.tiny.hidden", f"must be divisible by model.tiny.heads ({t.heads})")
    _require(t.vision_hidden % t.vision_heads == 0, "model.tiny.vision_hidden",
             f"must be divisible by model.tiny.vision_heads ({t.vision_heads})")
    _require(t.image_size % t.patch_size == 0, "model.tiny.image_size",
             f"must be a multiple of model.tiny.patch_size ({t.patch_size})")
    _require(t.vocab_size >= 300, "model.tiny.vocab_size", "must be at least 300 (byte alphabet + specials)")
    _require(p.model.mvtc.heads >= 1, "model.mvtc.heads", "must be at least 1")
    _check_fraction(p.model.entity_token_dropout, "model.entity_token_dropout", closed=False)
    _require(p.model.entity_token_dropout == 0 or p.model.entity_token != "none", "model.entity_token_dropout",
             "needs an entity token (model.entity_token is none)")
    _require(p.model.mvtc.value_rank >= 1, "model.mvtc.value_rank", "must be at least 1")
    if p.model.mvtc.enabled:
        _require(p.model.mvtc.text_view or p.model.mvtc.image_view, "model.mvtc.text_view",
                 "at least one MVTC view must be on (or set model.mvtc.enabled=false)")
    _require(p.model.max_text_tokens >= 1, "model.max_text_tokens", "must be at least 1")
    _require(p.model.max_image_tokens >= 1, "model.max_image_tokens", "must be at least 1")
    k = p.model.knowledge
    for key in ("max_triples", "seed_triples", "dim", "tokens"):
        _require(getattr(k, key) >= 1, f"model.knowledge.{key}", "must be at least 1")
    _require(k.seed_triples <= k.max_triples, "model.knowledge.seed_triples",
             f"must not exceed model.knowledge.max_triples ({k.max_triples})")
    _require(k.layers >= 0, "model.knowledge.layers", "must be >= 0 (0: node initialisation only)")
    _require(k.align_margin >= 0, "model.knowledge.align_margin", "must be >= 0")
    _require(k.align_lambda >= 0, "model.knowledge.align_lambda", "must be >= 0 (0 disables the alignment loss)")

    pp = p.pretrain
    _require(pp.steps >= 0, "pretrain.steps", "must be >= 0 (0: the random-init backbone)")
    _require(pp.batch_size >= 1, "pretrain.batch_size", "must be at least 1")
    _require(pp.lr > 0, "pretrain.lr", "must be > 0")
    _require(pp.warmup_steps >= 0, "pretrain.warmup_steps", "must be >= 0")
    _require(pp.weight_decay >= 0, "pretrain.weight_decay", "must be >= 0")
    _check_fraction(pp.caption_share, "pretrain.caption_share")
    _check_fraction(pp.triples_after, "pretrain.triples_after")
    _check_fraction(pp.reading_share, "pretrain.reading_share")
    _require(pp.pictures >= pp.batch_size or pp.caption_share == 0, "pretrain.pictures",
             f"must be at least pretrain.batch_size ({pp.batch_size})")
    _require(pp.heldout_pictures >= 1, "pretrain.heldout_pictures", "must be at least 1")
    _check_fraction(pp.heldout_text, "pretrain.heldout_text", closed=False)
    _require(pp.heldout_lines >= 1, "pretrain.heldout_lines", "must be at least 1")

    _require(p.encode.batch_size >= 1, "encode.batch_size", "must be at least 1")
    _require(p.encode.shard_rows is None or p.encode.shard_rows >= 1, "encode.shard_rows", "must be null or at least 1")
    _require(p.encode.pool >= 0, "encode.pool", "must be >= 0 (0 and 1: no pooling)")
    if p.model.backbone == "tiny-qwen2-vl":  # Qwen's merger maps 2x2 patch windows to one token
        _require((t.image_size // t.patch_size) % 2 == 0, "model.tiny.image_size",
                 "tiny-qwen2-vl needs an even number of patches per side (its merger takes 2x2 windows)")
        _require(p.encode.pool <= 1, "encode.pool", "tiny-qwen2-vl merges patches itself: use pool 1")
    if p.encode.pool > 1 and p.model.backbone == "tiny":
        grid = t.image_size // t.patch_size
        _require(grid % p.encode.pool == 0, "encode.pool",
                 f"{p.encode.pool} does not divide the tiny tower's {grid}x{grid} patch grid")

    _require(p.prune.k >= 0, "prune.k", "must be >= 0")
    if num_layers is not None:
        _require(p.prune.k <= num_layers, "prune.k", f"{p.prune.k} is larger than the backbone's {num_layers} decoder layers")
    _require(p.prune.samples >= 2, "prune.samples", "must be at least 2")
    _check_fraction(p.prune.heldout, "prune.heldout", closed=False)
    _require(p.prune.batch_size >= 1, "prune.batch_size", "must be at least 1")
    _require(p.prune.ridge >= 0, "prune.ridge", "must be >= 0")

    tr = p.train
    _require(tr.lr > 0, "train.lr", "must be > 0")
    _require(tr.entity_lr_scale > 0, "train.entity_lr_scale", "must be > 0")
    _require(tr.epochs >= 1, "train.epochs", "must be at least 1")
    _require(tr.batch_size >= 1, "train.batch_size", "must be at least 1")
    _require(tr.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    _require(tr.max_steps is None or tr.max_steps >= 0, "train.max_steps", "must be null or >= 0")
    _require(tr.patience >= 0, "train.patience", "must be >= 0 (0 = no early stopping)")
    _require(tr.negatives >= 1, "train.negatives", "must be at least 1")
    _require(tr.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _require(tr.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check_fraction(tr.label_smoothing, "train.label_smoothing", closed=False)
    _require(tr.label_smoothing == 0 or tr.loss == "softmax", "train.label_smoothing",
             "applies to train.loss: softmax only (bce scores sampled negatives); set it to 0")
    _require(tr.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(tr.lora.r >= 1, "train.lora.r", "must be at least 1")
    _require(tr.lora.alpha >= 1, "train.lora.alpha", "must be at least 1")
    _check_fraction(tr.lora.dropout, "train.lora.dropout", closed=False)
    _require(tr.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 disables periodic checkpoints)")
    _require(tr.hard_negatives_pool >= 1, "train.hard_negatives_pool", "must be at least 1")
    _check_fraction(tr.hard_negatives_fraction, "train.hard_negatives_fraction")
    _require(tr.hard_negatives_refresh >= 1, "train.hard_negatives_refresh", "must be at least 1")
    # softmax scores every entity: there is nothing to sample.
    _require(tr.loss == "bce" or tr.hard_negatives == "none", "train.hard_negatives",
             "must be none with train.loss: softmax (every entity is a negative already)")
    ev = p.evaluate
    _require(ev.batch_size >= 1, "evaluate.batch_size", "must be at least 1")
    _require(ev.index_k >= 1, "evaluate.index_k", "must be at least 1")
    _require(ev.index_hnsw_m >= 2, "evaluate.index_hnsw_m", "must be at least 2")
    _require(ev.index_ef_search >= 1, "evaluate.index_ef_search", "must be at least 1")
    _require(ev.index_nlist >= 0, "evaluate.index_nlist", "must be >= 0 (0 = about sqrt(entities))")
    _require(ev.index_nprobe >= 1, "evaluate.index_nprobe", "must be at least 1")
    b = p.baselines
    for key in ("dim", "max_epochs", "patience", "eval_every", "negatives", "batch_size"):
        _require(getattr(b, key) >= 1, f"baselines.{key}", "must be at least 1")
    _require(b.lr > 0, "baselines.lr", "must be > 0")
    _require(b.margin > 0, "baselines.margin", "must be > 0")


def from_dict(raw: dict | None) -> Params:
    params = _build(Params, raw or {}, "")
    validate(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ParamsError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of keys")
    try:
        return from_dict(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def to_dict(p: Params) -> dict:
    return dataclasses.asdict(p)
