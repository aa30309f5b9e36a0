"""Where does the pretrained backbone read a text fact: at the answer cue, or one token later?

    python benchmarks/answer_cue_probe.py            # after `dvc repro calibrate` (or the whole pipeline)
    python benchmarks/answer_cue_probe.py --no-pruning

ELMM reads E_relation at the prompt's closing " answer:". The backbone was pretrained on lines that
go on " answer: region desert .", so at the cue it predicts "region" (the same for every answer of
`comes from`) and the value only one position later. For each text relation of the synthetic
world, on the prompt's text (" entity: {name} , {description} relation: {r} answer:", no images),
this reads the last decoder layer's hidden state of each object whose fact is a training triple
(fit) or a test triple (read):

- at the cue, and after `elmm.prompt.answer_prefixes`' tokens (`model.answer_prefix`);
- `lm_head`: top-1 of the language-model head among the relation's values;
- `probe`: a linear probe (`elmm.token_probe.fit_probe`) fitted on the training objects' states,
  accuracy on the test objects' (a reading of the description: test facts are in no training line);
- `follows`: `lm_head` when the test object's clause is rewritten to another value (the description
  read, not the name's memorised facts).

The pruned attention sub-blocks (data/pruning/compensation.safetensors, with their W_c) are removed
unless --no-pruning, as in the fine-tuned model. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from elmm.backbone import load_backbone  # noqa: E402
from elmm.kg.format import load_kg  # noqa: E402
from elmm.kg.synthetic import CONCEPTS, FACT_CLAUSES  # noqa: E402
from elmm.pretraining import TEXT_QUESTIONS, entity_line  # noqa: E402
from elmm.prompt import ANSWER_CUE, TAIL, answer_prefixes  # noqa: E402
from elmm.pruning.artifact import load_pruning  # noqa: E402
from elmm.pruning.layers import prune_layers  # noqa: E402
from elmm.token_probe import fit_probe  # noqa: E402


@torch.no_grad()
def last_states(backbone, lines: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last layer's hidden state [N, D] and lm_head logits [N, V] at each line's last token."""
    states = []
    for ids in lines:
        x = torch.tensor([[backbone.tokenizer.bos_token_id, *ids]])
        states.append(backbone.decoder(inputs_embeds=backbone.embed_tokens(x)).last_hidden_state[0, -1])
    h = torch.stack(states)
    return h, backbone.lm_head(h)


def prompt_lines(ids, names: list[str], descs: list[str], kind: str, relation: str, values: list[str],
                 rows: list[tuple[int, str]], extra: list[int], rewrite: random.Random | None = None):
    """The prompt's text ids for each (object, value) of `rows`, `extra` appended after the cue, and
    the value index; with `rewrite`, the clause rewritten to another value drawn from it (the label too)."""
    out, labels = [], []
    for h, v in rows:
        desc, label = descs[h], v
        if rewrite is not None:
            label = rewrite.choice([x for x in values if x != v])
            desc = desc.replace(FACT_CLAUSES[kind].format(v), FACT_CLAUSES[kind].format(label))
        out.append(ids(f"{entity_line(names[h], desc)} relation: {relation}{ANSWER_CUE}") + list(extra))
        labels.append(values.index(label))
    return out, torch.tensor(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-pruning", action="store_true", help="keep every attention sub-block")
    ap.add_argument("--seed", type=int, default=0, help="draws the rewritten values")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kg = load_kg("data/kg")
    backbone = load_backbone("data/backbone")  # from_pretrained: modules in eval mode
    pruned: list[int] = []
    if not args.no_pruning:
        pruned, weights, _ = load_pruning("data/pruning/compensation.safetensors")
        prune_layers(backbone.decoder.layers, weights)
    tok = backbone.tokenizer

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    names, descs = kg.entities["name"].tolist(), kg.entities["description"].fillna("").tolist()
    relations = kg.relations["name"].tolist()
    prefixes = answer_prefixes(tok, names, kg.triples["train"], kg.num_relations)[TAIL]
    rng = random.Random(args.seed)
    out = {"pruned_layers": sorted(pruned), "relations": {}}
    for kind, relation in TEXT_QUESTIONS.items():
        r = relations.index(relation)
        values = list(CONCEPTS[kind])
        value_ids = [ids(f" {v}")[0] for v in values]
        split_rows = {}
        for split in ("train", "test"):
            rows = [(h, names[t].split(" ", 1)[1]) for h, rr, t in kg.triples[split].tolist() if rr == r]
            split_rows[split] = [(h, v) for h, v in rows if FACT_CLAUSES[kind].format(v) in descs[h]]
        res = {"train_objects": len(split_rows["train"]), "test_objects": len(split_rows["test"]),
               "prefix": tok.convert_ids_to_tokens(prefixes[r])}
        for where, extra in (("cue", []), ("after_prefix", prefixes[r])):
            lines = functools.partial(prompt_lines, ids, names, descs, kind, relation, values, extra=extra)
            (x_tr, y_tr), (x_te, y_te), (x_sw, y_sw) = (lines(split_rows["train"]), lines(split_rows["test"]),
                                                        lines(split_rows["test"], rewrite=rng))
            h_tr, _ = last_states(backbone, x_tr)
            h_te, logits_te = last_states(backbone, x_te)
            _, logits_sw = last_states(backbone, x_sw)
            res[where] = {
                "lm_head": round(float((logits_te[:, value_ids].argmax(1) == y_te).float().mean()), 4),
                "probe": round(fit_probe(h_tr, y_tr, h_te, y_te), 4),
                "follows": round(float((logits_sw[:, value_ids].argmax(1) == y_sw).float().mean()), 4),
                "chance": round(1 / len(values), 4)}
        out["relations"][relation] = res
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
