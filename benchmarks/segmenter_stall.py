"""How long the segmenter holds the event loop: the longest single ``push()``/``flush()`` call and the
total, for texts that made the old segmenter stall, before and after it was made linear.

    python -m benchmarks.segmenter_stall [--quick] [--budget SECONDS]

Each input is 3,999 characters (the service takes at most 4,000 per message), fed one character per
delta and as one delta, then flushed; ordinary prose is also fed in word-sized deltas, as an LLM
streams it. "Before" is the segmenter at commit ``OLD_COMMIT``, loaded from git into a temporary
module, so both run in the same harness in the same run. Each run happens in a forked process with a
time budget: a run still going when its budget is spent stops after the call in progress (its
figures are then lower bounds), and one whose single call outlasts twice the budget is killed
("not run"). The new segmenter's figures are the best of three runs (the longest call is easily
inflated by the machine's other work); the old one runs once.

:func:`run` returns the Markdown table, for the main benchmark to include.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import re
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

OLD_COMMIT = "c302123"
LENGTH = 3999
ROOT = Path(__file__).resolve().parent.parent


def _repeat(unit: str) -> str:
    return (unit * (LENGTH // len(unit) + 1))[:LENGTH]


def _prose() -> str:
    """Ordinary English sentences that do not repeat (so no cache flatters either segmenter)."""
    rng = random.Random(7)
    subjects = ["The committee", "Our neighbour", "A young engineer", "The old library", "Dr. Patel", "The city"]
    subjects += ["Every visitor", "The river", "My sister", "The new policy", "Each student", "The report"]
    verbs = ["opened", "described", "changed", "ignored", "reviewed", "praised", "questioned", "rebuilt"]
    verbs += ["followed", "measured", "explained", "protected"]
    objects = ["the northern bridge", "a small garden", "the budget for next year", "the morning train"]
    objects += ["an unusual proposal", "the last chapter", "the harbour walls", "three old paintings"]
    objects += ["the main square", "a quiet afternoon", "the results, e.g. the survey", "about 3.5 km of road"]
    tails = ["after the storm", "before lunch", "in 2019", "with great care", "without much warning"]
    tails += ["at 5 p.m. on Friday", "for the first time", "despite the rain", "near the station"]
    questions = ["Why did it take so long?", "Who could have guessed?", "Was it worth the cost?"]
    out: list[str] = []
    while sum(len(s) + 1 for s in out) < LENGTH:
        roll = rng.random()
        if roll < 0.1:
            out.append(rng.choice(questions))
            continue
        sentence = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}"
        if roll < 0.45:
            sentence += f", and {rng.choice(subjects).lower()} {rng.choice(verbs)} {rng.choice(objects)}"
        out.append(sentence + ("!" if roll > 0.95 else "."))
    return " ".join(out)[:LENGTH]


INPUTS: dict[str, str] = {
    '"1. " × 1333': _repeat("1. "),
    '"? a " × 1000': _repeat("? a "),
    '". " × 2000': _repeat(". "),
    '"a. " × 1333': _repeat("a. "),
    '"J. R. R. " × 444': _repeat("J. R. R. "),
    "newlines": "\n" * LENGTH,
    '"(" × 3999': "(" * LENGTH,
    "one long URL": _repeat("http://x.y/" + "a" * LENGTH),
    "CJK, no punctuation": _repeat("我们今天去公园散步吧天气很好"),
    '"1.2.3.4…" (digits)': _repeat("1.2.3.4.5.6.7.8.9.0."),
    "prose": _prose(),
}


def _deltas(text: str, how: str) -> list[str]:
    if how == "1 char":
        return list(text)
    if how == "words":
        return re.findall(r"\s*\S+\s*$|\s*\S+", text)
    return [text]


CASES = [(name, how) for name in INPUTS for how in ("1 char", "whole")] + [("prose", "words")]


@dataclass(frozen=True)
class Result:
    longest_ms: float
    total_ms: float
    fed: int  # characters pushed before the budget ran out
    complete: bool


def _old_source() -> str | None:
    try:
        shown = subprocess.run(
            ["git", "show", f"{OLD_COMMIT}:service/core/segmenter.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return shown.stdout


def _load(source: str | None) -> Any:
    """The current segmenter module, or one built from ``source``."""
    if source is None:
        from service.core import segmenter

        return segmenter
    module = types.ModuleType(f"segmenter_{OLD_COMMIT}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"<segmenter at {OLD_COMMIT}>", "exec"), module.__dict__)
    return module


def _measure(source: str | None, text: str, how: str, budget: float, repeats: int, out: Connection) -> None:
    module = _load(source)
    warm = module.Segmenter()  # pysbd compiles its patterns on first use
    warm.push("Warm up, please. Dr. Smith said so at 5 p.m. on Friday, e.g. here.")
    warm.flush()
    deltas = _deltas(text, how)
    best: Result | None = None
    for _ in range(repeats):
        segmenter = module.Segmenter()
        longest = 0.0
        fed = 0
        start = time.perf_counter()
        complete = True
        for delta in deltas:
            if time.perf_counter() - start > budget:
                complete = False
                break
            before = time.perf_counter()
            segmenter.push(delta)
            longest = max(longest, time.perf_counter() - before)
            fed += len(delta)
        if complete:
            before = time.perf_counter()
            segmenter.flush()
            longest = max(longest, time.perf_counter() - before)
        result = Result(longest * 1e3, (time.perf_counter() - start) * 1e3, fed, complete)
        if best is None or (result.longest_ms, result.total_ms) < (best.longest_ms, best.total_ms):
            best = result
    out.send(best)


def _run_case(source: str | None, text: str, how: str, budget: float, repeats: int) -> Result | None:
    """Measure in a forked process; None if it had to be killed."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_measure, args=(source, text, how, budget, repeats, sender))
    process.start()
    sender.close()
    result = receiver.recv() if receiver.poll(2 * budget + 5) else None
    if process.is_alive():
        process.kill()
    process.join()
    return result


def _ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.2g} ms" if value < 1 else f"{value:.1f} ms"


def _cells(result: Result | None, budget: float) -> tuple[str, str]:
    if result is None:
        return f"not run: > {2 * budget + 5:.0f} s", "—"
    if result.complete:
        return _ms(result.longest_ms), _ms(result.total_ms)
    where = f"stopped at {result.fed:,}/{LENGTH:,} chars"
    return f"≥ {_ms(result.longest_ms)}", f"> {budget:.0f} s ({where})"


def run(quick: bool = False, budget: float | None = None, progress: bool = False) -> str:
    """Measure every case before and after; return a Markdown table (rows also go to stderr as
    they are measured with ``progress``)."""
    if budget is None:
        budget = 5.0 if quick else 20.0
    old = _old_source()
    rows = [
        "| input (3,999 chars) | deltas | before: longest call | before: total | after: longest call | after: total |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, how in CASES:
        text = INPUTS[name]
        before = (
            ("old segmenter not found", "—") if old is None else _cells(_run_case(old, text, how, budget, 1), budget)
        )
        after = _cells(_run_case(None, text, how, budget, 3), budget)
        rows.append(f"| {name} | {how} | {before[0]} | {before[1]} | {after[0]} | {after[1]} |")
        if progress:
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter time budget for the old segmenter")
    parser.add_argument("--budget", type=float, help="seconds a run may take before it is stopped")
    args = parser.parse_args()
    from benchmarks.bench import machine  # the same machine line as the benchmark report

    print(f"Segmenter stalls before ({OLD_COMMIT}) and after, on {machine()}.\n")
    print(run(args.quick, args.budget, progress=True))


if __name__ == "__main__":
    main()
