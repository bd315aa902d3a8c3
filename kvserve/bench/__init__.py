"""`kvserve bench serve | throughput | latency`: vLLM's benchmark sub-commands and flag names where they fit."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_parser(sub: argparse._SubParsersAction, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    from kvserve.bench import offline, serve

    b = sub.add_parser("bench", help="benchmarks: serve (any OpenAI-compatible server), throughput, latency (offline)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    serve.add_parser(bsub)
    offline.add_parsers(bsub, add_engine_args)
