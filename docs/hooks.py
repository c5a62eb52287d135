"""MkDocs hook: the site serves the shipped example figures from examples/ (the README shows the
same files), so the docs link them without a second copy in docs/."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("examples/digits_continuum/plots", "examples/outputs")


def on_files(files: Files, config) -> Files:
    """Add every example figure at its repository path, e.g. examples/.../continuum.png."""
    for folder in FIGURES:
        for path in sorted((ROOT / folder).glob("*.png")):
            files.append(File.generated(config, f"{folder}/{path.name}", abs_src_path=str(path)))
    return files
