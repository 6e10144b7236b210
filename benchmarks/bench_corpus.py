"""Open every CIF of tests/corpus through the CLI as a user would (a fresh process per file,
start-up included) and print a table: opened by model, refused by reason, seconds per file.

``python benchmarks/bench_corpus.py [--threads 2] [--json out.json]``. Baseline in the same
run: pymatgen's ``CifParser`` alone on the same file in the same process (``python -c``),
so the table shows what reconstruction adds to reading.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "corpus"
PARSE = ("import sys, warnings; warnings.simplefilter('ignore'); from pymatgen.io.cif import CifParser; "
         "CifParser(sys.argv[1]).parse_structures(primitive=False, on_error='ignore')")


def _reason(line: str) -> str:
    msg = line.split(": ", 2)[-1]
    for key in ("lacks", "no crystal structure", "cannot parse", "took longer", "too many", "occupanc", "unknown element"):
        if key in msg:
            return key
    return re.sub(r"\(.*", "", msg)[:40]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="")
    a = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    rows = []
    for f in sorted(CORPUS.rglob("*.cif")):
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "crystalstudio.cli", "reconstruct", str(f), "--json"],
                           capture_output=True, text=True, env=env, timeout=120)
        t1 = time.time()
        subprocess.run([sys.executable, "-c", PARSE, str(f)], capture_output=True, env=env, timeout=120)
        t2 = time.time()
        row = {"file": str(f.relative_to(CORPUS)), "rc": r.returncode, "seconds": t1 - t0, "parse_seconds": t2 - t1}
        if r.returncode == 0:
            row["representation"] = json.loads(r.stdout)["representation"]
        else:
            row["error"] = (r.stderr.strip().splitlines() or ["?"])[-1]
        rows.append(row)
        print(f"{row['file']:45s} {row['seconds']:5.1f} s  {row.get('representation', row.get('error', ''))[:90]}",
              file=sys.stderr)
    ok = [r for r in rows if r["rc"] == 0]
    crashed = [r for r in rows if r["rc"] not in (0, 2)]
    secs = sorted(r["seconds"] for r in rows)
    print(f"\n| corpus ({len(rows)} CIF files, {a.threads} threads) | count |\n|---|---|")
    for rep, n in Counter(r["representation"] for r in ok).most_common():
        print(f"| reconstructed, {rep} model | {n} |")
    for why, n in Counter(_reason(r["error"]) for r in rows if r["rc"] == 2).most_common():
        print(f"| refused: {why} | {n} |")
    print(f"| crashed (exit status other than 0 or 2) | {len(crashed)} |")
    med = secs[len(secs) // 2]
    pmed = sorted(r["parse_seconds"] for r in rows)[len(rows) // 2]
    print(f"\n| seconds per file | median | max |\n|---|---|---|\n"
          f"| crystalstudio reconstruct (start-up included) | {med:.1f} | {secs[-1]:.1f} |\n"
          f"| baseline: pymatgen CifParser alone (start-up included) | {pmed:.1f} | "
          f"{max(r['parse_seconds'] for r in rows):.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
