"""`.ci/run` must run README's install command and then README's test command, as its last command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_readme_install_then_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install and test", 1)[1].split("\n## ", 1)[0]
    install, test = re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]
    assert commands[0] == install
    assert commands[-1] == test
    # Between them only the PostgreSQL server install, which the README mentions.
    assert all("postgresql" in line for line in commands[1:-1])
