"""Import hygiene: heavy optional backends load on first use, and ``vlsegkit --help`` needs no torch.

(Times are measured by ``benchmarks/import_time.py``; here only what gets imported is checked.)
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torchvision", "transformers", "open_clip", "timm")


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('MODULES:', ' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split("MODULES:")[-1].split())


def test_model_classes_load_without_the_heavy_backends():
    loaded = _modules_after(
        "import vlsegkit\nvlsegkit.VLSM; vlsegkit.CLIPSeg; vlsegkit.MedCLIPSeg; vlsegkit.CoOp\n"
        "vlsegkit.fit = __import__('vlsegkit.train', fromlist=['fit']).fit"
    )
    assert "torch" in loaded
    assert not [m for m in HEAVY if m in loaded]


def test_building_a_model_loads_its_backend():
    loaded = _modules_after("import vlsegkit\nvlsegkit.create_model('clipseg-tiny')")
    assert "transformers" in loaded


def test_the_command_line_help_needs_no_torch():
    loaded = _modules_after(
        "from vlsegkit.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n"
        "    pass"
    )
    assert "torch" not in loaded and "vlsegkit.cli" in loaded
