"""DVC stage `fingerprint`: one code fingerprint per stage, blind to comments, docstrings and formatting.

Every other stage depends on its `fingerprints/<stage>.json` instead of on the source files, so an edit that changes
no code reruns nothing but this stage (a second or two).
"""

from __future__ import annotations

import argparse

from pipeline.errors import run_main
from pipeline.fingerprint import write_fingerprints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory of the per-stage fingerprint files (fingerprints)")
    args = parser.parse_args()

    for stage, digest in write_fingerprints(args.out).items():
        print(f"{stage:<10} {digest[:12]}")


if __name__ == "__main__":
    run_main(main)
