"""The YAML files a user names: search spaces and experiments, found by name in the user's own
folders first, then in the copy shipped inside the package; and their one-line descriptions.

The shipped copy is `towerspace/shipped/{search_spaces,experiments}/`. In a checkout those are
links to the repository's top-level folders (the one source of both); a wheel carries real
copies (package data), so `pip install towerspace` runs the shipped experiments from any folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from towerspace.errors import ConfigError
from towerspace.files import shown
from towerspace.schema import did_you_mean
from towerspace.yamlfile import read_mapping

SPACES, EXPERIMENTS = "search_spaces", "experiments"
PACKAGE = "package"  # where a shipped file comes from, as `towerspace spaces` lists it
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a bare name: no folder, no suffix
COMMENT_BYTES = 65536  # how much of a file is read for its first comment line


@dataclass(frozen=True)
class Entry:
    """One named file: where it is, where it comes from, and what it is, in one line."""

    name: str  # the file's stem
    path: Path
    origin: str  # the user folder it was found in, as shown, or PACKAGE
    description: str
    shadows: bool  # a user's file hiding the package's file of the same name


def shipped_dir(kind: str) -> Path:
    """The package's own folder of a kind (SPACES or EXPERIMENTS)."""
    # wheels install unpacked, so the package's files are plain paths
    return Path(str(resources.files("towerspace").joinpath("shipped", kind)))


def user_space_dirs(experiment_file: str | Path | None = None) -> tuple[Path, ...]:
    """The user's folders a space name is looked up in: beside the experiment file
    (`search_spaces/` in its folder, or in the folder above, as in `experiments/x.yaml`), then
    ./search_spaces."""
    dirs = [Path(SPACES)]
    if experiment_file is not None:
        folder = Path(experiment_file).resolve().parent
        dirs[:0] = [folder / SPACES, folder.parent / SPACES]
    return tuple(dirs)


USER_EXPERIMENT_DIRS = (Path("."), Path(EXPERIMENTS))  # `towerspace init` writes into ./


def search_dirs(kind: str, user_dirs: Sequence[str | Path]) -> tuple[Path, ...]:
    """The user's folders (each once, the package's own left out), then the package's."""
    package = shipped_dir(kind)
    seen = {package.resolve()}
    dirs: list[Path] = []
    for folder in map(Path, user_dirs):
        if folder.resolve() not in seen:
            seen.add(folder.resolve())
            dirs.append(folder)
    return (*dirs, package)


def is_name(text: str) -> bool:
    """Whether an argument is a bare name to look up (not a path to a file)."""
    path_like = text.endswith((".yaml", ".yml")) or Path(text).is_file()
    return bool(NAME.fullmatch(text)) and not path_like


def find(name: str, kind: str, user_dirs: Sequence[str | Path]) -> Path | None:
    """The first `<name>.yaml` in the user's folders, then the package's, or None."""
    for folder in search_dirs(kind, user_dirs):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    return None


def names(kind: str, user_dirs: Sequence[str | Path]) -> list[str]:
    """Every name of a kind found in these folders and the package's, sorted."""
    return sorted({p.stem for d in search_dirs(kind, user_dirs) for p in d.glob("*.yaml")})


def unknown(name: str, kind: str, user_dirs: Sequence[str | Path]) -> str:
    """The one-line problem of a name that is not found: what is allowed, and the nearest."""
    word = "search space" if kind == SPACES else "experiment"
    available = names(kind, user_dirs)
    if not available:
        looked = ", ".join(str(d) for d in search_dirs(kind, user_dirs))
        return f"no {word} {name!r} (no .yaml files in: {looked})"
    also = "" if kind == SPACES else ", or a path to an experiment file"
    return (f"no {word} {name!r}; {did_you_mean(name, available)}(available: "
            f"{', '.join(available)}{also})")  # fmt: skip


def experiment_file(argument: str | Path) -> Path:
    """The file an experiment argument names: a path as given, or a bare name looked up in
    ./, ./experiments, then the package's experiments."""
    text = str(argument)
    if isinstance(argument, Path) or not is_name(text):
        return Path(argument)
    found = find(text, EXPERIMENTS, USER_EXPERIMENT_DIRS)
    if found is None:
        raise ConfigError(unknown(text, EXPERIMENTS, USER_EXPERIMENT_DIRS))
    return shown(found)


def describe(path: Path) -> str:
    """A file's one line: its `description` field, else its first comment line, else ""."""
    try:
        description = read_mapping(path).get("description")
    except (ConfigError, OSError):  # a broken file is still listed, by its comment
        description = None
    if isinstance(description, str) and description.strip():
        return description.strip().splitlines()[0]
    try:
        with path.open("rb") as file:
            head = file.read(COMMENT_BYTES).decode(errors="replace")
    except OSError:
        return ""
    for line in head.splitlines():
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip()
        if line.strip():  # a comment further down says something about a field, not the file
            return ""
    return ""


def _is_experiment(path: Path) -> bool:
    """Whether a file reads as an experiment (a mapping with a space): how the working
    directory's other YAML files are left out of the list."""
    try:
        return "space" in read_mapping(path)
    except (ConfigError, OSError):
        return False


def entries(kind: str, user_dirs: Sequence[str | Path]) -> list[Entry]:
    """Every name of a kind once, by name, as found: the first folder holding it wins."""
    package = shipped_dir(kind)
    found: dict[str, Entry] = {}
    for folder in search_dirs(kind, user_dirs):
        is_package = folder == package
        origin = PACKAGE if is_package else f"{shown(folder)}/"
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in found:
                continue
            if (
                not is_package
                and kind == EXPERIMENTS
                and folder == Path(".")
                and (not _is_experiment(path))
            ):
                continue
            shadows = not is_package and (package / path.name).is_file()
            found[path.stem] = Entry(path.stem, path, origin, describe(path), shadows)
    return sorted(found.values(), key=lambda entry: entry.name)
