"""The commands the README and the docs/ pages show, read out of their shell blocks and checked against what they
call: every ``fcnseg`` command line parses with the real CLI, every Hydra override of ``python -m fcnseg.train``
(also under torchrun and srun) and of ``dvc exp run -S`` composes with conf/, and every ``mlflow run`` entry
point and parameter exists in MLproject. What they do when run is tested elsewhere (the pages name the tests)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from fcnseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HYDRA_FLAGS = {"--cfg": 1, "--package": 1, "-m": 0, "--multirun": 0, "--resolve": 0, "--info": 0, "--help": 0}


def shell_commands(page: Path) -> list[list[str]]:
    """Each command of the page's ```bash blocks as argv, continuation lines joined, comments and `VAR=x` prefixes
    dropped, `a && b` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # a heredoc's body, not a command
                continue
            command: list[str] = []
            for word in [*words, "&&"]:
                if word == "&&":
                    while command and re.fullmatch(r"[A-Z_]+=.*", command[0]):
                        command.pop(0)
                    if command:
                        commands.append(command)
                    command = []
                else:
                    command.append(word)
    return commands


def train_overrides(argv: list[str]) -> list[str] | None:
    """The Hydra overrides of a command that runs ``fcnseg.train`` (python -m, torchrun -m, srun), else None."""
    if "fcnseg.train" not in argv:
        return None
    rest, overrides = argv[argv.index("fcnseg.train") + 1:], []
    while rest:
        word = rest.pop(0)
        if word in HYDRA_FLAGS:
            del rest[:HYDRA_FLAGS[word]]
        else:
            overrides.append(word)
    return overrides


def all_commands() -> list[tuple[str, list[str]]]:
    return [(page.relative_to(ROOT).as_posix(), argv) for page in PAGES for argv in shell_commands(page)]


def compose_each(overrides: list[str]) -> None:
    # a sweep (`-m model=fcn32s,fcn16s`) composes once per value
    first, *rest = [o for o in overrides if "," in o.split("=", 1)[-1] and not o.split("=", 1)[-1].startswith("[")
                    ] or [None]
    values = first.split("=", 1)[1].split(",") if first else [None]
    for value in values:
        chosen = [o if o != first else f"{first.split('=', 1)[0]}={value}" for o in overrides]
        compose("config", overrides=chosen)


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        yield


def test_the_pages_show_commands_of_every_kind():
    kinds = {argv[0] for _, argv in all_commands()}
    assert {"fcnseg", "python", "dvc", "mlflow", "torchrun", "srun"} <= kinds, kinds


def test_every_fcnseg_command_parses_with_the_real_cli():
    parser, checked = build_parser(), 0
    for page, argv in all_commands():
        if argv[0] != "fcnseg":
            continue
        try:
            parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{page}: `{shlex.join(argv)}` does not parse with the fcnseg CLI")
        checked += 1
    assert checked >= 20, checked


def test_every_training_override_composes(hydra_conf):
    checked = 0
    for page, argv in all_commands():
        overrides = train_overrides(argv)
        if argv[:3] == ["dvc", "exp", "run"]:
            overrides = [argv[i + 1] for i, word in enumerate(argv) if word == "-S"]
        if overrides is None:
            continue
        try:
            compose_each(overrides)
        except Exception as exc:  # Hydra's errors: unknown group, option or key
            pytest.fail(f"{page}: `{shlex.join(argv)}` does not compose: {exc}")
        checked += 1
    assert checked >= 25, checked


def test_every_mlflow_run_entry_point_and_parameter_exists():
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    checked = 0
    for page, argv in all_commands():
        if argv[:3] != ["mlflow", "run", "."]:
            continue
        entry = argv[argv.index("-e") + 1]
        assert entry in entry_points, f"{page}: no MLproject entry point {entry!r}"
        params = [argv[i + 1].split("=", 1)[0] for i, word in enumerate(argv) if word == "-P"]
        unknown = set(params) - set(entry_points[entry].get("parameters") or {})
        assert not unknown, f"{page}: `{shlex.join(argv)}`: {entry} has no parameter {sorted(unknown)}"
        checked += 1
    assert checked >= 4, checked


def test_the_readme_shows_each_user_job_with_its_command():
    readme = [argv for page, argv in all_commands() if page == "README.md"]
    starts = {" ".join(argv[:3]) for argv in readme}
    for job in ("dvc exp run", "dvc repro", "mlflow ui --backend-store-uri", "fcnseg promote fcn-voc",
                "fcnseg predict photo.jpg", "mlflow models serve", "python -m fcnseg.train"):
        assert any(start.startswith(job) or job.startswith(start) for start in starts), job


def test_every_test_the_pages_cite_exists():
    """The Reliability table and the other pages prove their claims by naming tests: each named file and test is
    real, so a renamed or deleted test cannot leave a guarantee unproven on paper."""
    cited, missing = 0, []
    for page in PAGES:
        for path, name in re.findall(r"((?:tests/)?(?:[a-z_]+/)?test_\w+\.py)(?:::(\w+))?", page.read_text()):
            source = ROOT / "tests" / path.removeprefix("tests/")
            if not source.is_file() or (name and not re.search(rf"^def {name}\(", source.read_text(), re.M)):
                missing.append(f"{page.name}: {path}" + (f"::{name}" if name else ""))
            cited += 1
    assert not missing, "cited tests that do not exist:\n" + "\n".join(missing)
    assert cited >= 30, cited


def test_the_readme_stays_a_front_page_and_no_table_cell_becomes_an_essay():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200, "move detail into a docs/ page"
    for page in [*PAGES, ROOT / "CHANGELOG.md"]:
        for line in page.read_text().splitlines():
            if line.startswith("|"):
                longest = max(len(cell) for cell in line.split("|"))
                assert longest <= 500, f"{page.name}: a table cell of {longest} characters: {line[:80]}…"
