"""The documentation cannot rot: README commands are run by CI or by a named test, the openai example runs
against a real ``serve.py``, docs/CONFIG.md matches the code, and every relative link resolves.

To add a command to a README ``bash`` block: make a test (or ``.ci/run``) run it, then add a row to
:data:`COVERAGE` naming that test. A command without a row fails :func:`test_every_readme_command_is_exercised`.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"

# README command prefix → who runs it: ("ci", text that .ci/run must contain) or ("test", "file::test_name").
# The longest matching prefix wins. Tests named here run the command itself (argv from the README, with small
# overrides for speed) or the same entry point in-process with the same arguments.
COVERAGE: tuple[tuple[str, str, str], ...] = (
    ("python3.12 -m venv .venv", "ci", "-m venv .venv"),
    (". .venv/bin/activate", "ci", ". .venv/bin/activate"),
    ('pip install -e ".[dev]" -c constraints.txt', "ci", 'pip install -q -e ".[dev]" -c constraints.txt'),
    ("python -m pytest -q", "ci", "python -m pytest -q"),
    # All three `train.py --config configs/tiny.yaml` commands: the test runs the own-data one (the others differ
    # only in overrides; the default stdlib corpus and its BPE are exercised by notebooks/quickstart.ipynb).
    ("python train.py --config configs/tiny.yaml", "test", "tests/test_docs.py::test_readme_train_plot_serve"),
    ("python train.py --config configs/tiny.yaml model.num_hidden_layers=5 mesh.", "test",
     "tests/test_sharding.py::test_train_steps_match_one_device"),  # the same mesh through train(), 8 CPUs
    # The two V3.2 stages: the test runs these config files through train() in-process (shrunk by overrides).
    ("python train.py --config configs/tiny_v32_", "test", "tests/test_dsa.py::test_tiny_warmup_then_sparse_stage"),
    ("python -m dsv3_jax.plot", "test", "tests/test_docs.py::test_readme_train_plot_serve"),
    ("python -m dsv3_jax.plot --schedule", "test", "tests/test_schedule.py::test_plot_schedule"),
    ("python -m dsv3_jax.training.schedule", "test", "tests/test_schedule.py::test_readme_printer_command"),
    ("python serve.py --checkpoint", "test", "tests/test_docs.py::test_readme_train_plot_serve"),
    ("python serve.py --hf-dir", "test", "tests/test_docs.py::test_readme_serve_hf_dir"),
    ("python -m dsv3_jax.convert", "test", "tests/test_hf.py::test_convert_round_trip_is_exact"),
    ("python -m dsv3_jax.logits", "test", "tests/test_hf.py::test_logit_checker_cli_matches_hf"),
    ("python -m dsv3_jax.config_doc", "test", "tests/test_docs.py::test_config_reference_is_current"),
    ("python train.py --config configs/tiny_sft.yaml", "test",
     "tests/test_sft_cli.py::test_readme_fine_tune_from_run_dir_and_hf_export"),
    ("python train.py --config configs/deepseek_v3_671b_sft.yaml", "test",
     "tests/test_sft_cli.py::test_671b_sft_config_follows_the_recipe"),
    ("python -m sharding.plan --config configs/deepseek_v3_671b.yaml --mesh", "test",
     "tests/test_plan.py::test_671b_cli_plans_without_allocating"),
    ("python -m sharding.plan --config configs/deepseek_v3_671b.yaml --serve", "test",
     "tests/test_plan.py::test_serving_plan_cli"),
    # No SLURM or second host in CI: the sbatch script's environment (SLURM variables → jax.distributed) is
    # checked by the launch test, and the ssh recipe's JAX_* launch of train.py runs as two local processes.
    ("sbatch scripts/slurm_train.sbatch", "test", "tests/test_multihost.py::test_launch_environment"),
    ("for i in 0 1; do ssh host$i", "test", "tests/test_multihost.py::test_two_processes_match_one_and_resume"),
)

# Appended to the README's training commands: a couple of short steps instead of a full run.
FAST_TRAIN = ("train.steps=2", "data.seq_len=32", "train.global_batch_size=2", "train.eval_every=0",
              "train.log_every=1", "train.warmup_steps=1")


# ------------------------------------------------------------------------------------------------------------
# Reading the README
# ------------------------------------------------------------------------------------------------------------


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def _split_and(line: str) -> list[str]:
    """``a && b`` → [a, b], leaving ``&&`` inside quotes alone (``ssh host "cd x && y"`` is one command)."""
    parts, cur, quote, i = [], "", None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("&&", i):
            parts.append(cur)
            cur, i = "", i + 2
            continue
        cur += ch
        i += 1
    return [" ".join(p.split()) for p in [*parts, cur] if p.strip()]


def readme_commands(text: str | None = None) -> list[str]:
    """Every command of the README's bash blocks: comments dropped, ``\\`` continuations joined, ``&&`` split."""
    text = README.read_text() if text is None else text
    out = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment (not a '#' inside a word)
            out += _split_and(line)
    return out


def coverage_of(command: str) -> tuple[str, str, str] | None:
    matches = [row for row in COVERAGE if command.startswith(row[0])]
    return max(matches, key=lambda row: len(row[0])) if matches else None


def readme_argv(prefix: str) -> list[str]:
    """The README command starting with ``prefix`` as argv: ``[...]`` groups unwrapped, ``[... ...]`` dropped."""
    found = [c for c in readme_commands() if c.startswith(prefix)]
    assert len(found) == 1, f"expected one README command starting with {prefix!r}, found {found}"
    cmd = re.sub(r"\[[^\]]*\.\.\.[^\]]*\]", "", found[0])  # "[key=value ...]": an open-ended placeholder
    cmd = re.sub(r"\[([^\]]*)\]", r"\1", cmd)  # "[--api-key KEY]": an option, exercised here
    argv = shlex.split(cmd)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def test_readme_commands_parse():
    text = ("```bash\na && b   # note\nc \\\n  --x 1  # more\nssh h \"cd x && y\" && z\n```\n"
            "```python\nnot = 'a command'\n```\n")
    assert readme_commands(text) == ["a", "b", "c --x 1", 'ssh h "cd x && y"', "z"]


# ------------------------------------------------------------------------------------------------------------
# Cheap checks (every run)
# ------------------------------------------------------------------------------------------------------------


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert commands, "no bash blocks found in README.md"
    missing = [c for c in commands if coverage_of(c) is None]
    assert not missing, ("README commands that nothing runs — make a test (or .ci/run) run each, then add a row "
                         "to COVERAGE in tests/test_docs.py:\n  " + "\n  ".join(missing))
    ci = CI.read_text()
    for prefix, kind, target in COVERAGE:
        assert any(coverage_of(c) == (prefix, kind, target) for c in commands), (
            f"COVERAGE row {prefix!r} matches no README command any more: remove it")
        if kind == "ci":
            assert target in ci, f"README command {prefix!r} is said to run in CI, but .ci/run lacks {target!r}"
        else:
            path, name = target.split("::")
            src = (ROOT / path).read_text()
            assert re.search(rf"^def {name}\(", src, re.MULTILINE), f"{target} (exercising {prefix!r}) does not exist"


def _dist_name(requirement: str) -> str:
    """'jax[cuda13]>=0.11.2' → 'jax'; names compared as pip normalises them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()


def test_constraints_pin_every_dependency():
    """The pinned set (constraints.txt, used by the README's install and .ci/run) names an exact version for each
    runtime and dev dependency of pyproject.toml, and each pin satisfies pyproject's lower bound."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_dist_name(name)] = version.strip()
    for req in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        r = Requirement(req)
        assert _dist_name(r.name) in pins, f"constraints.txt does not pin {r.name}"
        assert r.specifier.contains(pins[_dist_name(r.name)]), f"{r.name}=={pins[_dist_name(r.name)]} breaks {req}"


def test_config_reference_is_current(capsys):
    from dsv3_jax import config_doc

    assert config_doc.main(["--check", str(ROOT / "docs" / "CONFIG.md")]) == 0, capsys.readouterr().err
    ref = (ROOT / "docs" / "CONFIG.md").read_text()
    for key in ("`model.kv_lora_rank`", "`train.bias_update_speed`", "`mesh.zero1`", "`data.source`", "`run_dir`"):
        assert key in ref


def test_config_reference_documents_every_field():
    """A field without a comment in config.py would get an empty description: comment it there."""
    import dataclasses

    from dsv3_jax import config as config_module
    from dsv3_jax.config_doc import _sections, field_comments

    empty = [f"{prefix}{f.name}" for prefix, cls in _sections(config_module.Config) for f in dataclasses.fields(cls)
             if not field_comments(cls).get(f.name)]
    assert not empty, f"config fields without a comment in dsv3_jax/config.py: {empty}"


def test_relative_links_resolve():
    docs = [README, *(ROOT / "docs").glob("*.md")]
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} → {target}")
    assert not broken, broken


def test_readme_python_imports_resolve():
    """The README's Python blocks parse, and every name they import exists."""
    for block in code_blocks(README.read_text(), "python"):
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(mod, alias.name), f"README: from {node.module} import {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)


def test_architecture_names_existing_modules():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    paths = set(re.findall(r"((?:dsv3_jax|sharding|tests|bench|notebooks)/[\w/]*\w(?:\.py|/)?|\w+\.py)", text))
    ours = [ROOT / d for d in ("dsv3_jax", "sharding", "tests", "bench")]
    missing = [p for p in sorted(paths) if not (ROOT / p).exists() and not any(list(d.rglob(p)) for d in ours)]
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"


# ------------------------------------------------------------------------------------------------------------
# The README's commands, run (slow: each starts JAX and compiles the tiny model)
# ------------------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device, as a reader's machine
    return env


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{shlex.join(argv)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def _workdir(tmp_path: Path) -> Path:
    """A directory laid out like the repository root for the README's relative paths (configs/, train.py, ...)."""
    for name in ("configs", "train.py", "serve.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_train_plot_serve(tmp_path):
    """Training on your own data → plots → one offline completion → the HTTP server + the openai example."""
    from dsv3_jax.data import Tokenizer, train_bpe

    work = _workdir(tmp_path)
    # "my_corpus/*.jsonl" with a `text` field, and a tokenizer.json, as the README's second command expects.
    (work / "my_corpus").mkdir()
    sources = sorted(Path(json.__file__).parent.glob("*.py")) + sorted(Path(re.__file__).parent.glob("*.py"))
    texts = [p.read_text() for p in sources if p.stat().st_size > 2000]
    with (work / "my_corpus" / "part0.jsonl").open("w") as f:
        for t in texts * 3:
            f.write(json.dumps({"text": t}) + "\n")
    Tokenizer(train_bpe(texts, 512), "readme").save(work / "tokenizer.json")

    train_own = readme_argv("python train.py --config configs/tiny.yaml data.source=")
    assert "data.source=my_corpus/*.jsonl" in train_own and "data.tokenizer=tokenizer.json" in train_own
    _run([*train_own, *FAST_TRAIN], work)
    run = work / "runs" / "tiny"  # tiny.yaml's run_dir, which the README's next commands use
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    _run(readme_argv("python -m dsv3_jax.plot runs/"), work)
    assert {p.name for p in run.glob("*.png")} >= {"loss.png", "lr.png", "throughput.png", "expert_load.png"}

    offline = readme_argv("python serve.py --checkpoint runs/tiny --prompt")
    r = _run([*offline, "--max-tokens", "4"], work)
    assert r.stdout.startswith("def fib(n):") and re.search(r"\[\d tokens in", r.stderr), (r.stdout, r.stderr)

    server = readme_argv("python serve.py --checkpoint runs/tiny --port")
    assert "--api-key" in server and "--speculative" in server
    port = _free_port()
    server[server.index("--port") + 1] = str(port)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(server, cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "server did not come up"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        [example] = [b for b in code_blocks(README.read_text(), "python") if "from openai import OpenAI" in b]
        assert "http://127.0.0.1:8000/v1" in example and 'api_key="KEY"' in example
        example = example.replace("http://127.0.0.1:8000/v1", f"http://127.0.0.1:{port}/v1")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(example, "README.md (openai example)", "exec"), {})  # noqa: S102 - our own README
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer KEY"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 401  # the key guards /metrics too
        stats = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer KEY"}).text
        assert re.search(r"^dsv3_requests_total 2(\.0)?$", stats, re.MULTILINE), stats  # the completion + the chat
    finally:
        proc.terminate()
        t0 = time.monotonic()
        proc.wait(30)
        log.close()
    assert time.monotonic() - t0 < 20, "SIGTERM took too long"  # shutdown completes in seconds


@pytest.mark.slow
def test_readme_serve_hf_dir(tmp_path):
    """``serve.py --hf-dir``: an HF checkpoint (the tiny_yarn fixture) served directly, one offline completion."""
    from dsv3_jax.data import Tokenizer, train_bpe

    work = _workdir(tmp_path)
    tok = work / "tokenizer.json"
    Tokenizer(train_bpe([Path(json.__file__).read_text()], 300), "hf-dir").save(tok)  # ≤ the fixture's 320 ids
    argv = readme_argv("python serve.py --hf-dir")
    argv[argv.index("--hf-dir") + 1] = str(ROOT / "tests" / "fixtures" / "tiny_yarn")
    argv = argv[:argv.index("--port")]  # offline instead of listening: the HTTP path is tested above
    r = _run([*argv, "--tokenizer", str(tok), "--prompt", "import json", "--max-tokens", "3"], work)
    assert r.stdout.startswith("import json") and re.search(r"\[\d tokens in", r.stderr), (r.stdout, r.stderr)
