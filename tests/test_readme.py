"""The README's commands work as written: every command line of its ```bash blocks is mapped in
tests/readme_commands.py (run here on small data, covered by a named test, or not run for a stated
reason), and the runnable ones run, in README order, in one scratch folder, each on what the
earlier ones wrote, as a new user would."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from .readme_commands import COMMANDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_lines(path: str = os.path.join(REPO, "README.md")) -> list[str]:
    """The command lines of the README's bash blocks: continuations joined, trailing comments
    (two spaces, then #) and comment lines dropped, heredoc bodies skipped, spaces collapsed."""
    text = open(path).read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        current, heredoc = "", None
        for raw in block.split("\n"):
            if heredoc is not None:
                if raw.strip() == heredoc:
                    heredoc = None
                continue
            current = f"{current} {raw.strip()}" if current else raw.strip()
            if current.endswith("\\"):
                current = current[:-1].rstrip()
                continue
            command = re.sub(r"\s{2,}#.*$", "", current).strip()
            current = ""
            if not command or command.startswith("#"):
                continue
            marker = re.search(r"<<-?'?(\w+)'?", command)
            if marker:
                heredoc = marker.group(1)
            lines.append(re.sub(r"\s+", " ", command))
    return lines


def _options(command: str) -> set[str]:
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    return {t.split("=", 1)[0] for t in tokens if t.startswith("--")}


def test_every_readme_command_is_mapped_and_every_mapping_is_in_the_readme():
    documented = readme_lines()
    mapped = [re.sub(r"\s+", " ", line) for line, _ in COMMANDS]
    missing = [line for line in documented if line not in mapped]
    stale = [line for line in mapped if line not in documented]
    assert not missing, f"README commands with no entry in tests/readme_commands.py: {missing}"
    assert not stale, f"tests/readme_commands.py entries no longer in the README: {stale}"
    assert mapped == documented  # README order: each run command reads what the earlier ones wrote
    for line, (kind, what) in COMMANDS:
        if kind == "covered":
            path, _, name = what.partition("::")
            source = open(os.path.join(REPO, path)).read()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{line!r}: {what} does not exist"
        elif kind == "run":
            readme, ran = shlex.split(line), shlex.split(what)
            assert readme[:2] == ran[:2], f"{line!r} runs another command: {what!r}"
            assert _options(line) <= _options(what), f"{what!r} drops options of the README's {line!r}"
        else:
            assert kind == "not run" and len(what) > 10, line


@pytest.mark.slow
def test_the_readme_commands_run_on_small_data(tmp_path):
    work = tmp_path / "lab"
    work.mkdir()
    os.symlink(os.path.join(REPO, "configs"), work / "configs")
    (work / "demo-run").mkdir()
    os.symlink("../cache", work / "demo-run" / "cache")  # `make demo`'s cache, here the README's own preprocess output
    script = ["set -euo pipefail"]
    for line, (kind, command) in COMMANDS:
        if kind != "run":
            continue
        if command.startswith("medmoco predict --model models:/"):
            # a registered candidate, as `make demo` leaves one, before the README's section 4 predicts with it
            script.append("medmoco register --run $FINETUNE_RUN --name rsna-ich-moco >/dev/null")
        script += [f"echo {shlex.quote('$ ' + command)}", command]
        if "--run-dir runs/pretrain-cpu" in command:
            script.append("export PRETRAIN_RUN=$(cat runs/pretrain-cpu/mlflow_run_id)")
        if "--run-dir runs/ft-moco" in command:
            script.append("export FINETUNE_RUN=$(cat runs/ft-moco/mlflow_run_id)")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           # one store for the whole session, as after `make demo` (section 4's export names it)
           "MLFLOW_TRACKING_URI": "sqlite:///demo-run/mlflow.db", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert os.path.exists(work / "runs" / "ft-scratch" / "model.pt") and os.path.exists(work / "submission.csv")
    assert "history verified (1 releases" in out.stdout
    assert shutil.which("medmoco", path=env["PATH"])
