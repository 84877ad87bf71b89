"""Derive the ImageNet-1k WordNet table shipped in retrieval/asif/data/imagenet_wordnet.tsv.

For each of the 1,000 ImageNet classes (wnid ``n01440764`` -> noun synset offset
``01440764`` in WordNet 3.0's ``data.noun``): its synonyms, its gloss (the definition
without the example sentences) and the synonyms of its first hypernym. WordNet 3.0 is
Debian's ``wordnet-base`` (``apt-get install -y wordnet-base``; files in /usr/share/wordnet).
The wnids come from any ``labels.csv`` with ``wnid`` and ``class_index`` columns (the
ImageNet sample in ../shared/data has one). Only this derived table ships; run this again
only to regenerate it:

    python tools/imagenet_wordnet.py ../shared/data/imagenet-sample/labels.csv \
        --wordnet /usr/share/wordnet --out retrieval/asif/data/imagenet_wordnet.tsv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

COLUMNS = ("class_index", "wnid", "synonyms", "gloss", "hypernym")


def parse_synset(line: str) -> tuple[list[str], list[str], str]:
    """(words, hypernym offsets, definition) of one ``data.noun`` line (see wndb(5))."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    count = int(fields[3], 16)
    words = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
    at = 4 + 2 * count
    pointers = int(fields[at])
    hypernyms = [fields[at + 1 + 4 * i + 1] for i in range(pointers) if fields[at + 1 + 4 * i] in ("@", "@i")]
    definition = gloss.split('; "')[0].strip().rstrip(";").strip()
    return words, hypernyms, definition


def read_synsets(data_noun: Path, wanted: set[str]) -> dict[str, tuple[list[str], list[str], str]]:
    """The parsed synsets of ``data.noun`` (all of them: hypernyms need lookups beyond ``wanted``)."""
    synsets = {}
    with open(data_noun, encoding="latin-1") as f:
        for line in f:
            if line[:1].isdigit():
                synsets[line[:8]] = parse_synset(line.rstrip("\n"))
    missing = sorted(wanted - synsets.keys())
    if missing:
        raise SystemExit(f"{data_noun}: {len(missing)} ImageNet synsets missing, e.g. {missing[0]}")
    return synsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=Path("retrieval/asif/data/imagenet_wordnet.tsv"))
    args = parser.parse_args()
    with open(args.labels, newline="") as f:
        classes = sorted({(int(r["class_index"]), r["wnid"]) for r in csv.DictReader(f)})
    if [i for i, _ in classes] != list(range(1000)):
        raise SystemExit(f"{args.labels}: expected class_index 0..999 once each")
    synsets = read_synsets(args.wordnet / "data.noun", {wnid[1:] for _, wnid in classes})
    rows = []
    for index, wnid in classes:
        words, hypernyms, definition = synsets[wnid[1:]]
        parent = synsets[hypernyms[0]][0] if hypernyms else []
        rows.append((str(index), wnid, ", ".join(words), definition, ", ".join(parent)))
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    tmp.replace(args.out)
    print(f"{args.out}: {len(rows)} classes", file=sys.stderr)


if __name__ == "__main__":
    main()
