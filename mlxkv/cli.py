"""`mlxkv fetch | generate | serve | bench | profile-kv`: argparse -> EngineConfig; nothing below reads argparse.

Errors a user can cause (unknown model, bad flags, corrupt file) print one line on stderr
and exit with status 2; there is no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# transformers (imported by mlx-lm) prints a "PyTorch was not found" advisory; keep the
# terminal to our own output and one-line errors.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import mlxkv  # noqa: F401  (OpenBLAS before mlx)
from mlxkv.config import EngineConfig
from mlxkv.errors import MlxkvError


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or use --chat)")
    p.add_argument("--chat", default=None, help="a user message, formatted with the chat template")
    p.add_argument("--system", default=None, help="system message (implies the chat template)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temp", type=float, default=0.0, help="temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    EngineConfig.add_cli_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxkv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="fetch and convert embedded models into the cache")
    f.add_argument("names", nargs="*", help="embedded model names (default: the default model)")
    f.add_argument(
        "--cache-dir",
        default=None,
        help="mlxkv cache root (default: $MLXKV_CACHE_DIR or ~/.cache/mlxkv)",
    )
    _add_generate(sub)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    try:
        from server.serve import add_serve_args

        add_serve_args(s)
    except ImportError:
        EngineConfig.add_cli_args(s)
    b = sub.add_parser("bench", help="run the quick benchmark suite and print a summary")
    try:
        from mlxkv.bench import add_bench_args

        add_bench_args(b)
    except ImportError:
        pass
    _add_profile_kv(sub)
    return parser


def _add_profile_kv(sub) -> None:
    p = sub.add_parser("profile-kv", help="measure per-layer K/V codec sensitivity (for "
                       "--kv-codec auto:<R>x)")
    p.add_argument("--model", required=True, help="model name or path")
    p.add_argument("--text", default=None, help="calibration text file (default: the cached "
                   "Austen corpus's Emma, if present)")
    p.add_argument("--family", default="e8", choices=["e8", "d4", "lloyd"])
    p.add_argument("--rates", type=int, nargs="+", default=[4, 5])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--out", default=None, help="profile path (default: <cache>/profiles/"
                   "<model>.json, where auto:<R>x looks first)")


def cmd_profile_kv(args) -> int:
    import logging
    from pathlib import Path

    from mlxkv.config import default_cache_dir
    from mlxkv.kv_profile import calibration_windows, profile_model, write_profile
    from mlxkv.models.loader import load_model

    if any(not 2 <= r <= 8 for r in args.rates):
        raise MlxkvError("--rates must be between 2 and 8")
    text_path = Path(args.text) if args.text else default_cache_dir() / "corpus" / "emma.txt"
    if not text_path.is_file():
        raise MlxkvError(f"calibration text {text_path} not found (pass --text FILE)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loaded = load_model(args.model)
    windows = calibration_windows(loaded.tokenizer, text_path.read_text(), args.ctx,
                                  args.windows)
    profile = profile_model(loaded.model, windows, tuple(args.rates), args.family)
    profile["model"] = loaded.name
    profile["calibration"]["text"] = text_path.name
    out = Path(args.out) if args.out else default_cache_dir() / "profiles" / f"{loaded.name}.json"
    print(f"wrote {write_profile(profile, out)}")
    return 0


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.chat is not None or args.system is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.chat or args.prompt or ""})
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    if not args.prompt:
        raise MlxkvError('give a prompt (mlxkv generate "...") or --chat "..."')
    return list(tokenizer.encode(args.prompt))


def _generate_stream(config: EngineConfig, args):
    """Yield (text_delta, stats) from the paged engine."""
    from mlxkv.llm import LLM
    from mlxkv.sampling import SamplingParams

    llm = LLM(config)
    ids = _prompt_ids(args, llm.tokenizer)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    yield from llm.stream_text(ids, params)


def cmd_generate(args) -> int:
    config = EngineConfig.from_args(args)
    start = time.perf_counter()
    stats = {}
    for text, step_stats in _generate_stream(config, args):
        stats = step_stats or stats
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats:
        print(
            f"prompt: {stats['num_prompt_tokens']} tokens, {stats['prompt_tps']:.1f} tok/s | "
            f"generation: {stats['num_generated_tokens']} tokens, {stats['decode_tps']:.1f} tok/s | "
            f"total {time.perf_counter() - start:.2f} s",
            file=sys.stderr,
        )
        if stats.get("num_draft_tokens"):
            print(f"speculative: {stats['num_accepted_tokens']} of "
                  f"{stats['num_draft_tokens']} draft tokens accepted", file=sys.stderr)
    return 0


def cmd_fetch(args) -> int:
    from mlxkv.config import DEFAULT_MODEL
    from mlxkv.models.builtin import ensure_builtin

    for name in args.names or [DEFAULT_MODEL]:
        print(ensure_builtin(name, cache_dir=args.cache_dir, progress=True))
    return 0


def cmd_serve(args) -> int:
    try:
        from server.serve import serve
    except ImportError as exc:
        raise MlxkvError(f"the server is not available: {exc}") from exc
    serve(EngineConfig.from_args(args), allow_remote=getattr(args, "allow_remote", False))
    return 0


def cmd_bench(args) -> int:
    try:
        from mlxkv.bench import main as bench_main
    except ImportError as exc:
        raise MlxkvError(f"the benchmark suite is not available: {exc}") from exc
    return int(bench_main(args) or 0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "fetch": cmd_fetch,
        "generate": cmd_generate,
        "serve": cmd_serve,
        "bench": cmd_bench,
        "profile-kv": cmd_profile_kv,
    }
    try:
        return commands[args.command](args)
    except (MlxkvError, ValueError) as exc:
        print(f"mlxkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlxkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
