"""Wall time of `rlhf-gym --help` and of each `rlhf-gym COMMAND --help`, each in a fresh Python process.

The CLI imports no stage at the top (`rlhf_gym/cli.py`), so listing the commands and their options should
cost little more than starting Python; a stage that started importing torch or transformers at the top
would show here as a second or more. Each command line runs `repeats` times after one warm-up run (the
file cache), as `python -m rlhf_gym.cli ...` from the repository root (what the `rlhf-gym` script runs,
without depending on which checkout the installed script points at); the table gives the median, and the
median of a bare `python -c pass` for the interpreter's own start-up.

    python -m benchmarks.cli_help [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def commands() -> list[list[str]]:
    """`--help`, then `COMMAND --help` for every subcommand, in the order `rlhf-gym --help` lists them (read
    from that listing, as a user would: the benchmarks sit below the CLI and do not import it)."""
    listing = subprocess.run(
        [sys.executable, "-m", "rlhf_gym.cli", "--help"],
        cwd=ROOT,
        env=_env(),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    section = listing.split("positional arguments:", 1)[1].split("options:", 1)[0]
    names = re.findall(r"^    ([a-z][\w-]*)(?:\s|$)", section, flags=re.MULTILINE)
    return [["--help"], *([name, "--help"] for name in names)]


def wall_ms(argv: list[str], repeats: int) -> list[float]:
    """Milliseconds per run of `python ARGV` in a fresh process, `repeats` times after one warm-up."""
    env = _env()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True, capture_output=True)
        if i:  # the first run warms the file cache
            times.append((time.perf_counter() - start) * 1e3)
    return times


def run(quick: bool = False, repeats: int | None = None) -> dict[str, Any]:
    repeats = repeats or (3 if quick else 5)
    python = statistics.median(wall_ms(["-c", "pass"], repeats))
    rows = []
    for argv in commands():
        times = wall_ms(["-m", "rlhf_gym.cli", *argv], repeats)
        rows.append(
            {
                "command": " ".join(["rlhf-gym", *argv]),
                "median_ms": statistics.median(times),
                "min_ms": min(times),
            }
        )
    return {"repeats": repeats, "python_startup_ms": python, "commands": rows}


def markdown(result: dict[str, Any]) -> str:
    from benchmarks.common import markdown_table

    python = result["python_startup_ms"]
    rows = [
        [f"`{row['command']}`", f"{row['median_ms']:.0f}", f"{row['median_ms'] - python:.0f}"]
        for row in result["commands"]
    ]
    slowest = max(result["commands"], key=lambda row: row["median_ms"])
    return (
        markdown_table(["command", "ms (median)", "ms over bare Python"], rows)
        + f"\n\nMedian of {result['repeats']} fresh processes each; a bare `python -c pass` takes "
        f"{python:.0f} ms. Slowest: `{slowest['command']}`, {slowest['median_ms']:.0f} ms."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.common import OUT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per command line (after a warm-up)"
    )
    args = parser.parse_args(argv)
    result = run(repeats=args.repeats)
    OUT.mkdir(exist_ok=True)
    (OUT / "cli_help.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
