"""Pretraining the tiny backbone on the synthetic world, the way LLaVA-style models are made, in miniature.

A random-weight backbone gives attention that carries nothing, so pruning it removes no knowledge
and the paper's claims cannot be tested on it. This module makes a small multimodal LM instead:

- **Seeing** (LLaVA's captioning stage): freshly rendered pictures of the world's kind, each
  captioned with all its attributes ("a small red circle with a white mark on navy"). The images
  go through the vision tower and the projector as a prefix; the loss is the caption's next-token
  loss, so the tower, projector and decoder learn to describe images. The pictures come from their
  own random stream (`CAPTION_STREAM`), never from the KG's images.
- **Reading**: every entity's name and description, and the verbalised TRAINING triples in the
  prompt's own words (" entity: X relation: knows answer: Y ." and the inverse phrasing). Valid
  and test triples never enter the corpus, so the weights do not depend on them (tested).
- **Curriculum**: captions and descriptions first, triples joining after `pretrain.triples_after`
  of the steps (memorising facts pays only once the model reads).

`evaluate_pretraining` measures what the pretrained weights do, next to the same numbers for the
random-init weights: held-out caption accuracy per attribute, and held-out loss with all attention,
or a single layer's attention, replaced by zero (`attention_zeroed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .backbone import Backbone
from .config import PretrainParams
from .kg.synthetic import BACKDROPS, COLOURS, CONCEPTS, MARKS, SHAPES, Look, caption, describe, random_look, render, unique_names
from .prompt import ANSWER_CUE

CAPTION_STREAM = 7  # seed purpose of the caption pictures (the KG's images use 1)
ATTRIBUTES = ("size", "colour", "shape", "mark", "backdrop")  # the words of a caption, in order


def entity_line(name: str, description: str) -> str:
    """An entity as the prompt shows it (elmm.prompt): " entity: {name} , {description}"."""
    return f" entity: {name} , {description}" if description else f" entity: {name}"


def triple_lines(head: tuple[str, str], relation: str, tail: tuple[str, str]) -> list[str]:
    """A training triple in the prompt's own words (elmm.prompt), both directions: the anchor's
    (name, description), the relation phrase, the answer cue, then the answer's name."""
    return [f"{entity_line(*head)} relation: {relation}{ANSWER_CUE} {tail[0]} .",
            f"{entity_line(*tail)} relation: inverse of {relation}{ANSWER_CUE} {head[0]} ."]


def _heldout(line: str, fraction: float) -> bool:
    """A fixed, seed-independent share of lines kept out of training, to measure held-out loss."""
    return int(hashlib.sha256(line.encode()).hexdigest()[:8], 16) / 16**8 < fraction


@dataclass
class TextCorpus:
    descriptions: list[str]
    triples: list[str]
    heldout: list[str]


def evenly_spaced(items: list, limit: int) -> list:
    """At most `limit` of `items`, spread evenly over them in their order (all of them if they fit).

    The held-out lines grow with the KG (descriptions first, then triples); the evaluation passes
    over them are repeated once per layer, so large KGs evaluate a sample that keeps both kinds.
    """
    if len(items) <= limit:
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def text_corpus(kg, heldout_fraction: float) -> TextCorpus:
    """Descriptions of every entity and the verbalised train triples (never valid or test)."""
    ents = list(zip(kg.entities["name"].tolist(), kg.entities["description"].tolist()))
    rel = kg.relations["name"].tolist()
    descriptions = [entity_line(n, d) for n, d in ents]
    triples = [line for h, r, t in kg.triples["train"].tolist() for line in triple_lines(ents[h], rel[r], ents[t])]
    heldout = [x for x in descriptions + triples if _heldout(x, heldout_fraction)]
    keep = set(heldout)
    return TextCorpus([x for x in descriptions if x not in keep], [x for x in triples if x not in keep], heldout)


def caption_pictures(n: int, image_size: int, seed: int, stream: int) -> list[tuple[Look, bytes]]:
    """`n` random pictures with what they show, from the stream (seed, CAPTION_STREAM, stream)."""
    rng = np.random.default_rng([seed, CAPTION_STREAM, stream])
    out = []
    for _ in range(n):
        look = random_look(rng)
        out.append((look, render(look, image_size, rng)))
    return out


IMAGE_QUESTIONS = {"colour": "has colour", "shape": "has shape", "mark": "has mark"}  # the world's image relations


def caption_text(look: Look) -> str:
    """A picture's caption, then one image question in the prompt's words, answered with the
    concept's name ("... ; relation: has mark answer: mark white ."): the decoder learns to answer
    a relation about the image tokens before it, as it will be asked to in the ELMM prompt."""
    kind = tuple(IMAGE_QUESTIONS)[int(look.size * 1000) % 3]  # a fixed, picture-dependent choice
    return f" {caption(look)} ; relation: {IMAGE_QUESTIONS[kind]}{ANSWER_CUE} {kind} {getattr(look, kind)} ."


TEXT_QUESTIONS = {"category": "belongs to category", "region": "comes from", "material": "made of"}  # text relations
READING_STREAM = 8  # seed purpose of the reading exercises


@dataclass(frozen=True)
class Exercise:
    """A reading exercise: an invented entity's description and one question about it."""

    line: str  # the whole line, answer included, in the prompt's words
    prefix: str  # the line up to the answer's value (" ... answer: material")
    value: str  # the answer's value ("iron")


def reading_exercises(n: int, seed: int, stream: int, taken: set[str]) -> list[Exercise]:
    """`n` exercises about invented entities (names never among `taken`, lower case): a description
    with the world's three text facts in random order, then a question about one of them. The
    answer is only in the description, so a model can answer only by reading it (a name cannot be
    memorised: each is new). Drawn from the stream (seed, READING_STREAM, stream)."""
    rng = random.Random(f"{seed}/{READING_STREAM}/{stream}")  # str seeds hash with sha512: stable
    names = unique_names(n, rng, taken=taken)
    out = []
    for name in names:
        facts = {k: rng.choice(CONCEPTS[k]) for k in TEXT_QUESTIONS}
        kind = rng.choice(tuple(TEXT_QUESTIONS))
        prefix = f"{entity_line(name, describe(facts, rng))} relation: {TEXT_QUESTIONS[kind]}{ANSWER_CUE} {kind}"
        out.append(Exercise(f"{prefix} {facts[kind]} .", prefix, facts[kind]))
    return out


def tokenizer_texts(kg) -> list[str]:
    """What the tiny backbone's tokenizer is trained on: the KG's text, captions' words, templates."""
    words = [caption(Look(c, sh, m, b, size)) for c in COLOURS for sh in SHAPES for m in MARKS for b in BACKDROPS
             for size in (0.5, 0.8)]
    return (kg.entities["name"].tolist() + kg.entities["description"].tolist() + kg.relations["name"].tolist()
            + words + [caption_text(Look("red", "circle", "white", "grey", 0.5 + i / 1000)) for i in range(3)]
            + [" entity: , relation: inverse of answer: ."])


# ---------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    ids: torch.Tensor  # [B, L] token ids (BOS first), right-padded
    mask: torch.Tensor  # [B, L] True on real tokens
    pixels: torch.Tensor | None = None  # [B, ...] preprocessed pictures (caption batches)
    answer: torch.Tensor | None = None  # [B, L] reading exercises: True on the answer's tokens (value and " .")


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids, mask


class Encoder:
    """Token ids and picture tensors for pretraining batches."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        tok = backbone.tokenizer
        self.tokenizer, self.bos, self.pad = tok, backbone.start_token_id, tok.pad_token_id

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def texts(self, lines: list[str]) -> Batch:
        return Batch(*_pad([[self.bos, *self.ids(x)] for x in lines], self.pad))

    def exercises(self, items: list[Exercise]) -> Batch:
        """Reading exercises, with `answer` marking each line's answer tokens (`reading_loss`)."""
        batch = self.texts([x.line for x in items])
        prefixes = [self.ids(x.prefix) for x in items]
        for x, prefix, row in zip(items, prefixes, batch.ids):
            if row[1:1 + len(prefix)].tolist() != prefix:  # the answer must start at a token boundary
                raise ValueError(f"reading exercise {x.line!r}: the tokenizer does not split it after its prefix")
        starts = torch.tensor([1 + len(prefix) for prefix in prefixes])  # BOS + prefix
        batch.answer = batch.mask & (torch.arange(batch.ids.shape[1]) >= starts[:, None])
        return batch

    def pixels(self, jpegs: list[bytes]) -> torch.Tensor:
        out = []
        for data in jpegs:
            with Image.open(io.BytesIO(data)) as im:
                out.append(self.backbone.preprocess(im.convert("RGB")))
        return torch.stack(out)

    def captions(self, pictures: list[tuple[Look, bytes]]) -> Batch:
        ids, mask = _pad([[self.bos, *self.ids(caption_text(look))] for look, _ in pictures], self.pad)
        return Batch(ids, mask, self.pixels([data for _, data in pictures]))


# ---------------------------------------------------------------------------------- forward and loss


def lm_loss(backbone: Backbone, batch: Batch, feature_layer: int, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss of the text of `batch`; a caption batch has its pictures' tokens as a prefix
    (after BOS), as LLaVA places them: [<s>, image tokens, caption]."""
    losses, valid = token_losses(backbone, batch, feature_layer)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum().clamp(min=1)


def reading_loss(backbone: Backbone, batch: Batch, mode: str) -> torch.Tensor:
    """The loss of a batch of reading exercises (`pretrain.reading_loss`): `line`, the next-token
    loss of every token (lm_loss); `answer`, of the answer's tokens only; `both`, the sum of the two
    means. Most of a line (an invented name, filler clauses) is unpredictable or learnt from the
    descriptions already, and in the line's mean the one token that needs reading weighs ~1/40."""
    losses, valid = token_losses(backbone, batch)
    line = losses.sum() / valid.sum().clamp(min=1)
    if mode == "line":
        return line
    if batch.answer is None:
        raise ValueError(f"pretrain.reading_loss={mode} needs a batch from Encoder.exercises (its answer tokens)")
    answer = batch.answer[:, 1:]
    on_answer = (losses * answer).sum() / answer.sum().clamp(min=1)
    return on_answer if mode == "answer" else line + on_answer


def token_losses(backbone: Backbone, batch: Batch, feature_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text token's next-token loss [B, L - 1] (0 on padding) and where it is real;
    `feature_layer` is the vision tower's layer for a caption batch's pictures."""
    embeds = backbone.embed_tokens(batch.ids)
    mask = batch.mask
    prefix = 0
    if batch.pixels is not None:
        if feature_layer is None:
            raise ValueError("a batch with pictures needs the vision feature_layer")
        _, patches = backbone.vision_features(batch.pixels, feature_layer)
        image = backbone.project_images(patches).to(embeds.dtype)  # [B, M', D]
        prefix = image.shape[1]
        embeds = torch.cat([embeds[:, :1], image, embeds[:, 1:]], dim=1)
        mask = torch.cat([mask[:, :1], torch.ones(image.shape[:2], dtype=torch.bool), mask[:, 1:]], dim=1)
    hidden = backbone.decoder(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
    # Text token j >= 1 sits at decoder position prefix + j and is predicted one position earlier.
    logits = backbone.lm_head(hidden[:, prefix:prefix + batch.ids.shape[1] - 1])
    targets = batch.ids[:, 1:]
    valid = batch.mask[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape) * valid, valid


@contextlib.contextmanager
def attention_zeroed(layers, which: list[int]) -> Iterator[None]:
    """Inside the block, the attention sub-block of each layer in `which` outputs zero: h = x + 0."""
    def zero(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        return (torch.zeros_like(out), *output[1:]) if isinstance(output, tuple) else torch.zeros_like(out)

    handles = [layers[i].self_attn.register_forward_hook(zero, with_kwargs=True) for i in which]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------- training


def _schedule(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def pretrain(backbone: Backbone, corpus: TextCorpus, pictures: list[tuple[Look, bytes]], p: PretrainParams, *,
             feature_layer: int, seed: int, log: Callable[[str, float, int], None] = lambda *a: None,
             progress: bool = True, taken_names: set[str] = frozenset()) -> dict:
    """Train every weight of `backbone` (tower, projector, decoder, embeddings) on the curriculum.

    Step s is a caption batch when s % round(1 / caption_share) == 0; otherwise, with probability
    `reading_share`, a batch of fresh reading exercises (`reading_exercises`; the loss on every
    token, on the answer only, or both: `reading_loss`), else a text batch of
    descriptions (and, after `triples_after` of the steps, triples). Everything random is drawn
    from `seed`, so the same inputs give the same weights.
    """
    model = backbone.model
    model.train()
    model.requires_grad_(True)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(p.warmup_steps, p.steps))
    enc = Encoder(backbone)
    gen = np.random.default_rng([seed, CAPTION_STREAM, 99])
    every = max(1, round(1 / p.caption_share)) if p.caption_share > 0 else 0
    with_triples = int(p.triples_after * p.steps)
    losses = {"caption": [], "text": [], "reading": []}
    exercises: list[Exercise] = []
    start = time.perf_counter()
    for step in tqdm(range(p.steps), desc="pretrain", unit="step", disable=not progress):
        if every and step % every == 0:
            pick = gen.choice(len(pictures), size=p.batch_size, replace=False)
            kind, batch = "caption", enc.captions([pictures[i] for i in pick])
        elif gen.random() < p.reading_share:
            if len(exercises) < p.batch_size:  # drawn in blocks, from the stream of this step
                exercises = reading_exercises(64 * p.batch_size, seed, 1000 + step, taken_names)
            kind, batch = "reading", enc.exercises(exercises[-p.batch_size:])
            del exercises[-p.batch_size:]
        else:
            pool = corpus.descriptions + (corpus.triples if step >= with_triples else [])
            pick = gen.choice(len(pool), size=min(p.batch_size, len(pool)), replace=False)
            kind, batch = "text", enc.texts([pool[i] for i in pick])
        loss = reading_loss(backbone, batch, p.reading_loss) if kind == "reading" else lm_loss(backbone, batch, feature_layer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses[kind].append(loss.item())
        log(f"pretrain/{kind}_loss", loss.item(), step + 1)
    model.eval()
    model.requires_grad_(False)
    return {"steps": p.steps, "seconds": round(time.perf_counter() - start, 1),
            "final_caption_loss": float(np.mean(losses["caption"][-20:])) if losses["caption"] else None,
            "final_text_loss": float(np.mean(losses["text"][-20:])) if losses["text"] else None,
            "final_reading_loss": float(np.mean(losses["reading"][-20:])) if losses["reading"] else None}


# ---------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def caption_accuracy(backbone: Backbone, pictures: list[tuple[Look, bytes]], feature_layer: int,
                     batch_size: int = 64) -> dict[str, float]:
    """Per attribute: how often the most likely next token at that word's place in the caption is
    the word's first token (teacher-forced on the caption before it)."""
    enc = Encoder(backbone)
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for lo in range(0, len(pictures), batch_size):
        chunk = pictures[lo:lo + batch_size]
        batch = enc.captions(chunk)
        embeds = backbone.embed_tokens(batch.ids)
        _, patches = backbone.vision_features(batch.pixels, feature_layer)
        image = backbone.project_images(patches).to(embeds.dtype)
        prefix = image.shape[1]
        embeds = torch.cat([embeds[:, :1], image, embeds[:, 1:]], dim=1)
        mask = torch.cat([batch.mask[:, :1], torch.ones(image.shape[:2], dtype=torch.bool), batch.mask[:, 1:]], 1)
        hidden = backbone.decoder(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
        for i, (look, _) in enumerate(chunk):
            text = caption_text(look)
            words = {"size": "small" if look.size < 0.65 else "large", "colour": look.colour, "shape": look.shape,
                     "mark": look.mark, "backdrop": look.backdrop}
            for attr, word in words.items():
                before = text[: text.index(f" {word}")]
                pos = len(enc.ids(before))  # caption token index of the word's first token
                # caption token j (j >= 1) is predicted at decoder position prefix + j; token 0 after BOS+image
                at = prefix + pos  # hidden state of the token before the word (BOS is index 0)
                predicted = int(backbone.lm_head(hidden[i, at]).argmax())
                hits[attr] += predicted == enc.ids(text)[pos]
    return {a: round(hits[a] / len(pictures), 4) for a in ATTRIBUTES}


@torch.no_grad()
def reading_accuracy(backbone: Backbone, exercises: list[Exercise], batch_size: int = 64) -> float:
    """How often the most likely token after " answer: {kind}" is the value's first token: the
    answer to a question about a description the model has never seen (teacher-forced)."""
    enc = Encoder(backbone)
    hits = 0
    for lo in range(0, len(exercises), batch_size):
        chunk = exercises[lo:lo + batch_size]
        batch = enc.exercises(chunk)
        hidden = backbone.decoder(inputs_embeds=backbone.embed_tokens(batch.ids),
                                  attention_mask=batch.mask.long()).last_hidden_state
        for i, start in enumerate(batch.answer.int().argmax(1).tolist()):  # the value's first token
            hits += int(backbone.lm_head(hidden[i, start - 1]).argmax()) == int(batch.ids[i, start])
    return round(hits / len(exercises), 4)


@torch.no_grad()
def heldout_loss(backbone: Backbone, pictures, texts: list[str], feature_layer: int, batch_size: int = 64) -> dict:
    """Mean next-token loss (nats per token) on held-out captions and held-out text."""
    enc = Encoder(backbone)
    out = {}
    for kind, items in (("caption", pictures), ("text", texts)):
        total = tokens = 0.0
        for lo in range(0, len(items), batch_size):
            chunk = items[lo:lo + batch_size]
            batch = enc.captions(chunk) if kind == "caption" else enc.texts(chunk)
            total += float(lm_loss(backbone, batch, feature_layer, reduction="sum"))
            tokens += float(batch.mask[:, 1:].sum())
        out[kind] = round(total / max(tokens, 1), 4)
    return out


def evaluate_pretraining(backbone: Backbone, pictures, texts: list[str], feature_layer: int,
                         exercises: list[Exercise] = ()) -> dict:
    """Caption accuracy per attribute, reading accuracy on new exercises, and the held-out loss as
    is, with all attention zeroed, and with each single layer's attention zeroed (and the rise over
    the unablated loss).

    The single-layer losses use the first half of the held-out pictures and lines (and their rise
    is over the unablated loss of that half): they are L passes of the decoder, most of the
    evaluation's time, and the stage's time budget holds the pretraining itself.
    """
    layers = backbone.layers
    base = heldout_loss(backbone, pictures, texts, feature_layer)
    with attention_zeroed(layers, list(range(len(layers)))):
        none = heldout_loss(backbone, pictures, texts, feature_layer)
    half_pictures, half_texts = pictures[: max(1, len(pictures) // 2)], texts[: max(1, len(texts) // 2)]
    half = heldout_loss(backbone, half_pictures, half_texts, feature_layer)
    single = []
    for i in range(len(layers)):
        with attention_zeroed(layers, [i]):
            single.append(heldout_loss(backbone, half_pictures, half_texts, feature_layer))
    rise = lambda x, over=base: {k: round(x[k] - over[k], 4) for k in over}  # noqa: E731
    reading = {}
    if exercises:
        reading["reading_accuracy"] = reading_accuracy(backbone, list(exercises))
        with attention_zeroed(layers, list(range(len(layers)))):
            reading["reading_accuracy_without_attention"] = reading_accuracy(backbone, list(exercises))
    return {"caption_accuracy": caption_accuracy(backbone, pictures, feature_layer), **reading,
            "heldout_loss": base, "loss_without_attention": none, "rise_without_attention": rise(none),
            "layer_ablation_heldout": {"pictures": len(half_pictures), "lines": len(half_texts), "heldout_loss": half},
            "loss_without_layer_attention": single, "rise_without_layer_attention": [rise(x, half) for x in single]}
