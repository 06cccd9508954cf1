"""Real speech shipped with the package: 16 kHz mono PCM16 clips and their reference text.

The tests, the benchmarks and the load tester read them from here, so a fresh clone or an
installed wheel has everything it needs; ``SOURCES.md`` beside this file gives each clip's origin
and licence.
"""

from __future__ import annotations

import csv
from pathlib import Path

CLIPS_DIR = Path(__file__).resolve().parent
MANIFEST = CLIPS_DIR / "manifest.tsv"


def references(manifest: Path = MANIFEST) -> dict[str, str]:
    """``file name -> reference transcript`` from a manifest (tab-separated, with a header)."""
    with manifest.open(newline="") as fh:
        return {
            row["file"]: row["reference_transcript"] for row in csv.DictReader(fh, delimiter="\t")
        }
