"""The user's view of a long stream: `editd run` on its embedded defaults takes N CounterFact
facts from the topic, then every published fact is asked over HTTP, greedily.

    python scripts/user_view.py --dataset ../shared/data/counterfact/counterfact-edit.json \
        --facts 2000 --batch-size 100 --out docs/gated/user-view-2000.json

What runs is what a user runs: the daemon (`python -m editd run`, its embedded broker, the
model's profile, the evaluator and its rollback policy as configured by default), facts
published with `editd publish`, answers read from `/v1/completions` at temperature 0. The
facts are the lifelong benchmark's draw (evaluation split, `--seed`), so the two views can be
compared. Everything lives in a temporary directory (the broker's log included) unless
`--workdir` keeps it. The JSON says how many facts the served model states on their edit
prompt and on their paraphrases, what the daemon applied, rolled back and rejected, the
evaluator's last canary against its baseline, and how long each phase took.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from editd.bench.data import draw, load_dataset, split
from editd.consumers.broker import free_port
from editd.editing.scoring import prompt_text
from editd.facts import FactUpdate

PROMPTS_PER_REQUEST = 32  # the API's limit per request


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--facts", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="editd run --model (default: its own default)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=6 * 3600.0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--answers-from-store",
        action="store_true",
        help="the daemon has run in --workdir: read the answers from its store's current "
        "version (VersionedModel and the server's greedy decoder, in batches) instead of over "
        "HTTP, where a request's prompts are decoded one after another",
    )
    args = p.parse_args()
    if args.answers_from_store:
        return answers_from_store(args)

    facts = draw(split(load_dataset(args.dataset), "eval"), args.facts, args.seed)
    # Absolute: the daemon and `editd publish` run with the work dir as their cwd.
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="editd-user-view-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    facts_file = work / "facts.jsonl"
    facts_file.write_text("".join(f.model_dump_json() + "\n" for f in facts))

    broker_port, http_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    env = {**os.environ, "EDITD_KAFKA__EMBEDDED_PORT": str(broker_port)}
    run = [sys.executable, "-m", "editd", "run", "--data-dir", str(work / "data")]
    run += ["--batch-size", str(args.batch_size), "--http-port", str(http_port)]
    if args.model:
        run += ["--model", args.model]
    log = (work / "daemon.log").open("w")
    t0 = time.perf_counter()
    # The daemon's cwd is the work dir: the embedded broker keeps its log under it.
    daemon = subprocess.Popen(run, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        status = wait(url, daemon, lambda s: s.get("ready"), args.timeout)
        ready_s = time.perf_counter() - t0
        version0 = status["version"]
        t1 = time.perf_counter()
        publish = [sys.executable, "-m", "editd", "publish", str(facts_file)]
        subprocess.run(
            [*publish, "--bootstrap-servers", f"127.0.0.1:{broker_port}"],
            cwd=work,
            env=env,
            check=True,
        )
        publish_s = time.perf_counter() - t1
        progress = Progress(len(facts))
        status = wait(url, daemon, progress.done, args.timeout)
        edit_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        edit_hits, para_hits, examples = ask_all(url, facts, args.max_tokens)
        ask_s = time.perf_counter() - t2
        versions = listing(work, env)
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()

    states: dict[str, int] = {}
    facts_by_state: dict[str, int] = {}
    for info in versions:
        if info["version"] == 0:
            continue
        states[info["state"]] = states.get(info["state"], 0) + 1
        facts_by_state[info["state"]] = facts_by_state.get(info["state"], 0) + info["facts"]
    evaluation = status.get("evaluation") or {}
    last = evaluation.get("last_evaluation") or {}
    baseline = evaluation.get("baseline") or {}
    paraphrased = sum(len(f.paraphrase_prompts) for f in facts)
    result = {
        "facts": len(facts),
        "batch_size": args.batch_size,
        "seed": args.seed,
        "dataset": str(args.dataset),
        "model": status.get("model"),
        "memory": (status.get("memory") or {}).get("form"),
        "first_version": version0,
        "last_version": status.get("version"),
        "stated_edit": sum(edit_hits),
        "stated_edit_share": sum(edit_hits) / len(facts),
        "stated_paraphrase": sum(para_hits),
        "paraphrases": paraphrased,
        "stated_paraphrase_share": sum(para_hits) / paraphrased if paraphrased else None,
        "versions_by_state": states,
        "facts_by_state": facts_by_state,
        "consumer": {
            k: v for k, v in (status.get("consumer") or {}).items() if k != "lag_by_partition"
        },
        "canary": last.get("canary"),
        "canary_base": baseline.get("canary"),
        "last_evaluation": last,
        "last_rollback": status.get("last_rollback"),
        "gate": (status.get("memory") or {}),
        "seconds": {
            "ready": round(ready_s, 1),
            "publish": round(publish_s, 1),
            "published_to_last_fact": round(edit_s, 1),
            "ask": round(ask_s, 1),
        },
        "facts_per_second": len(facts) / edit_s,
        "examples": examples,
        "workdir": str(work),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("examples", "last_evaluation")}))
    return 0


def answers_from_store(args: argparse.Namespace) -> int:
    """Score the greedy answers of the version the daemon in `--workdir` serves last."""
    from editd.bench.edit import served
    from editd.config import Settings
    from editd.models.factory import load_model, make_editor
    from editd.versions import VersionedModel

    work = args.workdir
    facts = [FactUpdate.model_validate_json(line) for line in (work / "facts.jsonl").open()]
    settings = Settings()
    handle = load_model(settings, args.model or "smollm2-135m")
    model = VersionedModel.open(handle, work / "data", editor=make_editor(handle, settings))
    try:
        t = time.perf_counter()
        # Edit prompts and paraphrases: what a user asks about a fact they published.
        asked = [f.model_copy(update={"neighborhood_prompts": ()}) for f in facts]
        scores = served(handle, asked)
        seconds = time.perf_counter() - t
        version = model.current
    finally:
        model.close()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["answers_from_store"] = {
        "version": version,
        "facts": len(facts),
        "stated_edit_share": scores["es"],
        "stated_paraphrase_share": scores["ps"],
        "seconds": round(seconds, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["answers_from_store"]))
    return 0


class Progress:
    """Whether every published fact was taken: applied (rejected ones too), dead-lettered,
    folded into a duplicate or recognised as applied before, with nothing left to edit."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.last = -1

    def done(self, s: dict[str, Any]) -> bool:
        c = s.get("consumer") or {}
        kinds = ("applied", "dead_lettered", "folded", "already_applied")
        taken = sum(int(c.get(k, 0)) for k in kinds)
        if taken != self.last:
            self.last = taken
            now = time.strftime("%H:%M:%S")
            print(f"{now} version {s.get('version')}: {taken}/{self.n} facts taken", flush=True)
        return taken >= self.n and not s.get("editing") and not s.get("consumer_lag")


def wait(
    url: str, daemon: subprocess.Popen[bytes], predicate: Any, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"editd run exited with {daemon.returncode}")
        try:
            r = httpx.get(f"{url}/v1/status", timeout=10)
            if r.status_code == 200 and predicate(r.json()):
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(2.0)
    raise SystemExit(f"not done in {timeout}s")


def ask_all(
    url: str, facts: list[FactUpdate], max_tokens: int
) -> tuple[list[bool], list[bool], list[dict[str, Any]]]:
    """Greedy answers to every edit prompt and paraphrase; a fact is stated when the answer,
    leading space aside, starts with its new object."""
    edit_prompts = [f.rendered_prompt for f in facts]
    para = [
        (i, prompt_text(p, f.subject)) for i, f in enumerate(facts) for p in f.paraphrase_prompts
    ]
    answers = complete(url, edit_prompts + [p for _, p in para], max_tokens)
    edit_answers, para_answers = answers[: len(facts)], answers[len(facts) :]
    edit_hits = [states(a, f.target_new) for a, f in zip(edit_answers, facts, strict=True)]
    para_hits = [
        states(a, facts[i].target_new) for (i, _), a in zip(para, para_answers, strict=True)
    ]
    examples = [
        {"prompt": p, "new": f.target_new, "true": f.target_true, "answer": a}
        for p, f, a in zip(edit_prompts[:10], facts[:10], edit_answers[:10], strict=True)
    ]
    return edit_hits, para_hits, examples


def states(answer: str, obj: str) -> bool:
    return answer.lstrip().startswith(obj.strip())


def complete(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    out: list[str] = []
    with httpx.Client(timeout=600) as client:
        for lo in range(0, len(prompts), PROMPTS_PER_REQUEST):
            chunk = prompts[lo : lo + PROMPTS_PER_REQUEST]
            r = client.post(
                f"{url}/v1/completions",
                json={"prompt": chunk, "max_tokens": max_tokens, "temperature": 0},
            )
            r.raise_for_status()
            choices = sorted(r.json()["choices"], key=lambda c: c["index"])
            out += [c["text"] for c in choices]
    return out


def listing(work: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    r = subprocess.run(
        [sys.executable, "-m", "editd", "versions", "--json", "--data-dir", str(work / "data")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout)


if __name__ == "__main__":
    sys.exit(main())
