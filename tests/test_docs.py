"""The docs: the generated reference pages are what docs/gen_reference.py writes from the code
now (so they cannot drift from it), every config field has a meaning to show, the README's links
lead to files, and the site builds with warnings as errors."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _generator():
    """docs/gen_reference.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "docs/gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_what_the_code_gives_now():
    gen = _generator()
    generated = gen.pages()
    assert {p.relative_to(REPO).as_posix() for p in generated} >= {
        "docs/reference/fields.md", "docs/reference/cli.md", "docs/reference/example-outputs.md",
        "docs/results.md",
    }  # fmt: skip
    assert "$ towerspace plan examples/digits_continuum" in generated[REPO / "docs/results.md"]
    assert gen.stale(generated) == [], "out of date: run make docs and commit the pages it writes"


@pytest.mark.slow  # runs the commands the docs show (about 20 s)
def test_command_outputs_in_the_docs_are_what_the_commands_print_now():
    gen = _generator()
    generated = gen.output_pages()
    blocks = sum(text.count("<!-- output: ") for text in generated.values())
    assert blocks == 6  # models, two estimates, two errors, an export
    # recorded runs: ResNet-18, init_from, the demo's status, the residual smoke run, the
    # per-flow latency search, the recipe's curves
    assert sum(text.count("<!-- file: ") for text in generated.values()) == 6
    assert "$ towerspace models --match params" in generated[REPO / "docs/continuum.md"]
    assert gen.stale(generated) == [], "out of date: run make docs and commit the pages it writes"


def test_every_experiment_field_has_a_meaning_in_the_reference():
    assert _generator().undocumented() == [], "add a comment beside these fields in the code"


def test_the_cli_page_holds_every_command_and_option():
    from towerspace.cli import build_parser

    page = (REPO / "docs/reference/cli.md").read_text()
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name, command in sub.choices.items():
        assert f"## towerspace {name}\n" in page
        for action in command._actions:
            assert all(flag in page for flag in action.option_strings), (name, action.dest)


def test_the_example_page_names_the_commit_the_example_trials_ran_at():
    page = (REPO / "docs/reference/example-outputs.md").read_text()
    record = next((REPO / "examples/digits_continuum/records").glob("*.json")).read_text()
    commit = re.search(r'"git_commit": "([0-9a-f]{40})', record).group(1)
    assert f"`{commit}`" in page


def test_readme_links_lead_to_files():
    text = (REPO / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text) if "://" not in t]
    assert any(t.startswith("docs/") for t in targets)  # the front page leads into the docs
    assert [t for t in targets if not (REPO / t).exists()] == []


@pytest.mark.slow
def test_site_builds_with_warnings_as_errors(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(site)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    for page in ("index.html", "reference/cli/index.html", "reference/fields/index.html"):
        assert (site / page).is_file(), page
    assert (site / "examples/digits_continuum/plots/continuum.png").is_file()  # docs/hooks.py
