"""Stage `download`: produce the knowledge graph in the canonical format under data/kg."""

from dataclasses import asdict

from _common import params

from elmm.io import write_json
from elmm.kg.format import coverage, load_kg
from elmm.kg.synthetic import generate_synthetic

KG_DIR = "data/kg"


def main() -> None:
    p = params()
    if p.data.name != "synthetic":
        raise SystemExit(
            f"error: data.name={p.data.name}: acquiring the real benchmarks is not implemented in this version; "
            "use data.name=synthetic"
        )
    generate_synthetic(KG_DIR, seed=p.seed, **asdict(p.data.synthetic))
    report = coverage(load_kg(KG_DIR))
    write_json("metrics/data.json", report)
    print(f"download: {report['entities']} entities, {report['relations']} relations, triples {report['triples']}")


if __name__ == "__main__":
    main()
