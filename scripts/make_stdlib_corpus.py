"""Write a local training corpus from the running Python's standard library sources (no download).

One JSON line per UTF-8 ``.py`` file of the standard library (``sysconfig``'s stdlib directory, without
site-packages), in a seeded random order so a short run sees a mix of modules.  Files that are not valid
UTF-8 (a few deliberate encoding tests) are skipped and counted.

    python scripts/make_stdlib_corpus.py OUT.jsonl [--seed 0] [--max-files N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig


def stdlib_files(root: str):
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in ("site-packages", "dist-packages",
                                                                             "__pycache__"))
        for name in sorted(names):
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the JSON-lines file to write (its folder is created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file order (default: 0)")
    parser.add_argument("--max-files", type=int, help="keep only this many files (default: all)")
    args = parser.parse_args()
    root = sysconfig.get_paths()["stdlib"]
    documents, skipped = [], 0
    for path in stdlib_files(root):
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if text.strip():
            documents.append({"text": text, "path": os.path.relpath(path, root)})
    random.Random(args.seed).shuffle(documents)
    if args.max_files:
        documents = documents[:args.max_files]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    temporary = args.out + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(document) + "\n")
    os.replace(temporary, args.out)
    stats = {"python": sys.version.split()[0], "stdlib": root, "documents": len(documents),
             "skipped_not_utf8": skipped, "utf8_bytes": sum(len(d["text"].encode("utf-8")) for d in documents)}
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
