"""Stage `download`: produce the knowledge graph in the canonical format under data/kg.

Real sources are downloaded into the cache `data/downloads/` (or $ELMM_DOWNLOAD_DIR): git-ignored
and not a DVC output, so DVC never deletes it and an interrupted download resumes on the next run.
"""

import os
import sys
from dataclasses import asdict

from _common import params, parse_args
from elmm.io import write_json
from elmm.kg.download import DownloadError
from elmm.kg.format import coverage, load_kg
from elmm.kg.ingest import ingest
from elmm.kg.synthetic import generate_synthetic

KG_DIR = "data/kg"
CACHE_DIR = os.environ.get("ELMM_DOWNLOAD_DIR") or "data/downloads"


def main(argv: list[str] | None = None) -> None:
    parse_args("download", __doc__, argv)
    p = params()
    if p.data.name == "synthetic":
        generate_synthetic(KG_DIR, seed=p.seed, **asdict(p.data.synthetic))
    else:
        try:
            result = ingest(p.data.name, p.data.url, p.data.sha256, KG_DIR, CACHE_DIR,
                            drop_unknown=p.data.drop_unknown, max_image_pixels=p.data.max_image_pixels)
        except (ValueError, DownloadError) as e:
            raise SystemExit(f"error: {e}") from None
        for line in result["warnings"]:
            print(f"download: warning: {line}")
        skipped = result["skipped_images"]
        for line in skipped[:20]:
            print(f"download: skipped image {line}")
        if len(skipped) > 20:
            print(f"download: ... and {len(skipped) - 20} more skipped images (count in metrics/data.json)")
    report = coverage(load_kg(KG_DIR))
    write_json("metrics/data.json", report)
    print(f"download: {report['entities']} entities, {report['relations']} relations, triples {report['triples']}, "
          f"entities by images {report['entities_by_images']}")


if __name__ == "__main__":
    main(sys.argv[1:])
