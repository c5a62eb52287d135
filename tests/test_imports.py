"""Start-up: the block and the command line's help load none of the heavy libraries (checked in
a fresh interpreter through sys.modules)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # fresh interpreters
HEAVY = ("torchvision", "pandas", "matplotlib", "ray", "optuna", "scipy", "sklearn")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, timeout=120)  # fmt: skip
    return done.stdout.split()


@pytest.mark.parametrize(
    "code",
    [
        "import towerspace.block",
        "from towerspace import TowerConv2d; TowerConv2d(8, 8, towers=2)",
        "from towerspace.models import xception; xception(width=0.125, middle_blocks=1)",
        "from towerspace.models import towerize",
    ],
)
def test_the_block_and_models_load_no_heavy_library(code):
    assert _loaded_after(code) == []


@pytest.mark.parametrize(
    "argv", [["--help"], ["sweep", "--help"], ["--version"], ["spaces"], ["experiments"]]
)
def test_help_version_and_lists_load_neither_torch_nor_any_heavy_library(argv):
    code = (
        "import contextlib, io\nfrom towerspace.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main({argv!r})\n"
        "assert 'torch' not in __import__('sys').modules"
    )
    assert _loaded_after(code) == []


def test_lazy_names_are_the_real_ones():
    import importlib

    import towerspace
    from towerspace import block, models

    def module(name):
        return importlib.import_module(f"towerspace.models.{name}")

    assert towerspace.TowerConv2d is block.TowerConv2d
    assert towerspace.towerize is module("towerize").towerize is models.towerize
    assert models.xception is module("xception").xception  # the function, not the module
    assert models.build_model is module("build").build_model
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        towerspace.nothing  # noqa: B018
