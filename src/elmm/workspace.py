"""The inputs every model stage opens: the KG, the backbone, the stored image tokens, the prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backbone import Backbone, load_backbone
from .config import Params
from .image_tokens import ImageTokens
from .kg.format import KnowledgeGraph, load_kg
from .prompt import PromptBuilder, answer_prefixes


@dataclass
class Workspace:
    params: Params
    kg: KnowledgeGraph
    backbone: Backbone
    tokens: ImageTokens
    prompts: PromptBuilder
    knowledge: Any = None  # elmm.knowledge.source.KnowledgeSource, set by model_io for a model with the knowledge path


def open_workspace(params: Params, kg_dir="data/kg", backbone_dir="data/backbone", encoded_dir="data/encoded") -> Workspace:
    """Load the stage inputs (the backbone freshly, so a stage may prune it or add adapters)."""
    kg = load_kg(kg_dir)
    backbone = load_backbone(backbone_dir)
    tokens = ImageTokens(encoded_dir, kg.num_entities)
    names = kg.entities["name"].tolist()
    prefixes = (answer_prefixes(backbone.tokenizer, names, kg.triples["train"], kg.num_relations)
                if params.model.answer_prefix else None)  # from the training split only
    prompts = PromptBuilder(backbone.tokenizer, names, kg.entities["description"].tolist(),
                            kg.relations["name"].tolist(), params.model.max_text_tokens, prefixes)
    return Workspace(params, kg, backbone, tokens, prompts)
