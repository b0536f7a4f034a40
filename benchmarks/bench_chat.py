"""Multi-turn chat load: `mlxkv serve` vs `mlx_lm.server`, the way chat clients talk.

Every chat opens with the same system prompt and re-sends its whole history each turn (the
assistant's own earlier replies included); user turns and reply lengths are mixed. `--chats`
chats of `--turns` turns run `--concurrency` at a time (a chat's turns are sequential),
streaming through the openai client over loopback. Both servers serve the same converted
model folder (float32) one after the other in one run, each after a warm-up request;
mlx_lm.server runs with its defaults, which keep its prompt cache on (its best
configuration). Reported per server: completion tokens/s over the wall time, TTFT
p50/p90, prompt tokens and the cached prompt tokens each server reports in its usage.
Writes results/chat.json and chat.png.

    python benchmarks/bench_chat.py                       # 8 chats x 3 turns, 8 concurrent
    python benchmarks/bench_chat.py --chats 16 --concurrency 4 8
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from _common import RESULTS, bar_plot, header, print_header, write_json
from _loadgen import pct
from bench_server import served_name, start

from mlxkv._blas import OPENBLAS_CANDIDATES

SYSTEM = (
    "You are Atlas, the assistant of a small travel agency. Answer in plain prose, be "
    "concrete, and keep every answer short unless the customer asks for detail. The agency "
    "sells rail trips, ferry crossings and guided walking tours in Europe. Prices are in "
    "euros and include taxes. Children under twelve travel at half price; pets travel free "
    "on ferries but need a booked cabin on night trains. Bookings can be changed without a "
    "fee up to seven days before departure; after that a change costs fifteen euros. If a "
    "customer mentions a medical need, suggest the assistance service and never give medical "
    "advice. Never invent timetables: say that exact times are confirmed by email. When you "
    "do not know something, say so and offer to ask a human agent. Walking tours are graded "
    "easy, moderate or demanding; demanding tours need hiking boots and a good level of "
    "fitness. Always end with one helpful suggestion the customer did not ask for.")
USER_TURNS = [
    "Hi!",
    "I want to take the night train from Vienna to Venice with my daughter, who is nine, and "
    "our dog. What do I need to book, and roughly what will it cost us?",
    "Which walking tour would you suggest for a first trip to the Dolomites?",
    "Thanks.",
    "My father uses a wheelchair and wants to join a ferry crossing to Corfu next month. "
    "Can you explain how boarding works and what we should tell you when we book?",
    "Can I move my booking from Friday to Sunday? I leave in ten days.",
    "What is the difference between a moderate and a demanding tour?",
    "Great, and what should I pack?",
]
MAX_TOKENS = [16, 48, 32, 64]


def chat_turns(chat: int, turns: int) -> list[tuple[str, int]]:
    """(user message, max_tokens) of each turn of chat `chat` (deterministic, mixed)."""
    return [(USER_TURNS[(3 * chat + t) % len(USER_TURNS)], MAX_TOKENS[(chat + t) % 4])
            for t in range(turns)]


def one_turn(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, text, usage = None, [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True})
    chunks = 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
            chunks += 1
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start,
            "text": "".join(text),
            "completion_tokens": usage.completion_tokens if usage else chunks,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": (getattr(details, "cached_tokens", 0) or 0) if details else 0}


def run_chats(base_url: str, model: str, chats: int, turns: int, concurrency: int) -> dict:
    """All chats, `concurrency` at a time; aggregate throughput and TTFT percentiles."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0,
                           timeout=600)
    results: list[dict] = []
    errors: list[str] = []
    todo = list(range(chats))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                chat = todo.pop(0)
            messages = [{"role": "system", "content": SYSTEM}]
            for user, max_tokens in chat_turns(chat, turns):
                messages.append({"role": "user", "content": user})
                try:
                    r = one_turn(client, model, messages, max_tokens)
                except Exception as exc:  # counted: a load test reports errors
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    break
                messages.append({"role": "assistant", "content": r["text"]})
                with lock:
                    results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    completion = sum(r["completion_tokens"] for r in results)
    return {"concurrency": concurrency, "turns": len(results), "errors": len(errors),
            "first_error": errors[0] if errors else None, "wall_s": wall,
            "completion_tokens": completion, "completion_tok_s": completion / wall,
            "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "cached_tokens": sum(r["cached_tokens"] for r in results),
            "ttft_p50": pct([r["ttft"] for r in results], 50),
            "ttft_p90": pct([r["ttft"] for r in results], 90)}


def servers(model_dir: str, max_seqs: int) -> dict:
    return {
        "mlxkv": ([sys.executable, "-m", "server", "--model", model_dir, "--port", "8421",
                   "--max-num-seqs", str(max(8, max_seqs))], 8421),
        "mlx_lm.server": ([sys.executable, "-m", "mlx_lm", "server", "--model", model_dir,
                           "--port", "8422"], 8422),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--chats", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8])
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    from mlxkv.models.loader import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    blas = next((b for b in OPENBLAS_CANDIDATES if os.path.exists(b)), None)
    env = {**os.environ, **({"LD_PRELOAD": blas} if blas else {}),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = servers(model_dir, max(args.concurrency))
    settings = {"chats": args.chats, "turns": args.turns, "concurrency": args.concurrency,
                "max_tokens_cycle": MAX_TOKENS, "sampling": "greedy",
                "system_prompt_chars": len(SYSTEM),
                "servers": {k: " ".join(v[0][1:]) for k, v in procs.items()}}
    h = header(args.model, "float32", settings)
    print_header(h)
    results: dict[str, list] = {}
    for label, (cmd, port) in procs.items():
        proc = start(cmd, port, env)
        try:
            name = served_name(port, model_dir)
            run_chats(f"http://127.0.0.1:{port}", name, 1, 1, 1)  # warm-up
            results[label] = []
            for c in args.concurrency:
                r = run_chats(f"http://127.0.0.1:{port}", name, args.chats, args.turns, c)
                results[label].append(r)
                print(f"{label:>14} c={c:<2} {r['completion_tok_s']:6.1f} completion tok/s  "
                      f"TTFT p50 {r['ttft_p50']:.2f} s p90 {r['ttft_p90']:.2f} s  prompt "
                      f"{r['prompt_tokens']} (cached {r['cached_tokens']})  errors "
                      f"{r['errors']}")
        finally:
            proc.terminate()
            proc.wait(30)
    ratios = [{"concurrency": a["concurrency"],
               "completion_tok_s_ratio": a["completion_tok_s"] / b["completion_tok_s"],
               "ttft_p90_ratio": a["ttft_p90"] / b["ttft_p90"]}
              for a, b in zip(results["mlxkv"], results["mlx_lm.server"], strict=True)]
    for r in ratios:
        print(f"mlxkv / mlx_lm.server at c={r['concurrency']}: completion tok/s "
              f"{r['completion_tok_s_ratio']:.2f}x (target >= 1.3x), TTFT p90 "
              f"{r['ttft_p90_ratio']:.2f}x (target <= 0.5x)")
    out = {**h, "results": results, "ratios": ratios}
    write_json("chat", out, args.out)
    last = {k: v[-1] for k, v in results.items()}
    bar_plot(Path(args.out) / "chat.png", f"Multi-turn chats, {args.model}, "
             f"c={args.concurrency[-1]}", {
                 "completion tok/s": {k: v["completion_tok_s"] for k, v in last.items()},
                 "TTFT p50 (s)": {k: v["ttft_p50"] for k, v in last.items()},
                 "TTFT p90 (s)": {k: v["ttft_p90"] for k, v in last.items()}})
    return out


if __name__ == "__main__":
    main()
