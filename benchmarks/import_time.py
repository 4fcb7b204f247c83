"""Import cost of vlsegkit against torch, and the command line's ``--help`` (issue: fast import).

Each cell is a fresh interpreter (``python -c``), repeated ``--repeats`` times with the cells
interleaved so machine load affects them alike; the best time of each cell is reported.

* ``import torch`` -- the floor: every vlsegkit model needs torch.
* ``import vlsegkit; vlsegkit.VLSM`` -- the package with its model base class (transformers, open_clip
  and timm load on first use of a backbone, not here). Target: at most 1.3x ``import torch``.
* ``vlsegkit --help`` -- the CLI parser; must not import torch at all. Target: under 0.5 s.

Run: ``python benchmarks/import_time.py [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CELLS = {
    "python": "pass",
    "import torch": "import torch",
    "import vlsegkit (lazy)": "import vlsegkit",
    "vlsegkit.VLSM": "import vlsegkit; vlsegkit.VLSM",
    "vlsegkit --help": (
        "import sys\nfrom vlsegkit.cli import main\ntry:\n    main(['--help'])\n"
        "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch was imported'"
    ),
}


def _time(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    best = dict.fromkeys(CELLS, float("inf"))
    for _ in range(args.repeats):
        for name, code in CELLS.items():
            best[name] = min(best[name], _time(code))
    for name, seconds in best.items():
        print(f"{name:<24} {seconds:6.3f} s")
    ratio = best["vlsegkit.VLSM"] / best["import torch"]
    print(f"vlsegkit.VLSM / import torch = {ratio:.2f}x (target <= 1.3x)")
    print(f"vlsegkit --help = {best['vlsegkit --help']:.3f} s (target < 0.5 s, torch not imported)")
    return {**best, "ratio": ratio}


if __name__ == "__main__":
    main()
