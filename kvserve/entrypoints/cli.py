"""The `kvserve` command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Sequence
from pathlib import Path

from kvserve.config import KV_CACHE_DTYPES, QUANTIZATIONS, EngineConfig
from kvserve.errors import InvalidRequestError, KVServeError

DEFAULT_COST_MODEL = Path.home() / ".cache" / "kvserve" / "cost_model.json"


def engine_fields(group: str | None = None) -> list[dataclasses.Field]:
    """EngineConfig's fields that are flags, in declaration order; `group`: only "engine" or only "parallel"."""
    return [f for f in dataclasses.fields(EngineConfig) if f.metadata.get("flag", True)
            and (group is None or f.metadata.get("group", "engine") == group)]


def _value_type(hint: object) -> type:
    """int | None -> int; a union with str (kv_cache_memory: int | str | None) stays a string; bool -> bool."""
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for kind in (str, bool, float, int):
        if kind in kinds:
            return kind
    raise TypeError(f"EngineConfig field of type {hint!r} has no command-line form")


def _add_config_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup, group: str) -> None:
    """One --kebab-case flag per EngineConfig field of `group`: its default, type, help and choices."""
    hints = typing.get_type_hints(EngineConfig)
    for f in engine_fields(group):
        md = f.metadata
        names = (f"--{f.name.replace('_', '-')}", *md.get("aliases", ()))
        kw: dict = dict(default=f.default, help=md.get("help", "").replace("%", "%%"))
        kind = _value_type(hints[f.name])
        if kind is bool:  # default True: --flag / --no-flag; default False: --flag alone
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        else:
            parse = md.get("type") or (None if kind is str else kind)
            if parse is not None:
                kw["type"] = parse
            if md.get("choices"):
                kw["choices"] = md["choices"]
        p.add_argument(*names, **kw)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags, spelled as vLLM spells them (from EngineConfig's fields)."""
    _add_config_flags(p, "engine")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Tensor / pipeline parallelism and where the ranks meet (kvserve/distributed)."""
    _add_config_flags(p.add_argument_group("parallelism", "one engine over tensor x pipeline ranks "
                                                          "(kvserve/distributed)"), "parallel")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig arguments from parsed flags. A group counts only when the subcommand has all its flags
    (simulate's own --tensor-parallel-size sizes the roofline, not the engine)."""
    groups = {f.metadata.get("group", "engine") for f in engine_fields()}
    present = {g for g in groups if all(hasattr(args, f.name) for f in engine_fields(g))}
    return {f.name: getattr(args, f.name) for f in engine_fields() if f.metadata.get("group", "engine") in present}


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace):
    from kvserve.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="kvserve: LLM inference and serving")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the memory plan and engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt (streams tokens as they come)")
    add_engine_args(g)
    add_parallel_args(g)
    add_sampling_args(g, max_tokens=64)
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")

    c = sub.add_parser("chat", help="interactive chat in the terminal")
    add_engine_args(c)
    add_parallel_args(c)
    add_sampling_args(c, max_tokens=512)
    c.add_argument("--system", default=None, help="system prompt")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(sv)
    add_parallel_args(sv)
    sv.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                    help="engine replicas behind this one server (requests routed by cached prefix, else load)")
    sv.add_argument("--routing", choices=("prefix", "round_robin"), default="prefix",
                    help="data-parallel routing policy")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None,
                    help="require this bearer token on every route but /health (or set KVSERVE_API_KEY)")
    sv.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    sv.add_argument("--served-model-name", default=None)
    sv.add_argument("--max-waiting-requests", type=int, default=None, help="beyond this, answer 429")
    sv.add_argument("--request-timeout", type=float, default=None,
                    help="seconds a request may take in all; past it, it is aborted and answered 408")
    sv.add_argument("--limit-concurrency", type=int, default=None,
                    help="HTTP requests in flight (streams included) beyond which the next is answered 503 with "
                         "Retry-After in the OpenAI error JSON; /health and /metrics are never refused")
    sv.add_argument("--uvicorn-log-level", default="warning")
    sv.add_argument("--disable-log-requests", action="store_true",
                    help="no per-request log line (id, route, status, tokens, TTFT, e2e; the reason of each error)")
    sv.add_argument("--fatal-grace-period", type=float, default=2.0,
                    help="seconds between an engine crash (streams failed, /health 503) and the process exiting 1")
    sv.add_argument("--keep-alive-on-fatal", action="store_true",
                    help="after an engine crash keep the process up (answering 503) for debugging")

    sim = sub.add_parser("simulate", help="serving simulator: the real scheduler on a calibrated or roofline step-time model")
    add_engine_args(sim)
    sim.add_argument("--calibrate", action="store_true", help="measure engine steps on this machine and save the model")
    sim.add_argument("--cost-model", default=str(DEFAULT_COST_MODEL), help="calibrated model file (JSON)")
    sim.add_argument("--hardware", default=None, help="roofline model instead: h100 | h200 | a100 | l4")
    sim.add_argument("--sim-model", default=None,
                     help="model shape for --hardware: smollm2-135m | llama-8b | llama-70b (default: --model's shape, "
                          "read from its metadata, else smollm2-135m)")
    sim.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica (roofline)")
    sim.add_argument("--replicas", type=int, default=1)
    sim.add_argument("--workload", default=None, help="JSONL workload; default: synthetic")
    sim.add_argument("--num-requests", type=int, default=500)
    sim.add_argument("--rate", type=float, default=1.0, help="synthetic arrivals per second")
    sim.add_argument("--rate-scale", type=float, default=1.0, help="compress arrivals: 10 = a 10x traffic peak")
    sim.add_argument("--short-frac", type=float, default=0.7, help="synthetic share of short answers")
    sim.add_argument("--max-tokens", type=int, default=512)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--policies", default=None, help="comma-separated policies to compare (default: --scheduling-policy)")
    sim.add_argument("--json", action="store_true", help="print one JSON line per policy")

    from kvserve.bench import add_parser as add_bench_parser

    add_bench_parser(sub, add_engine_args)

    rf = sub.add_parser("roofline",
                        help="measure this machine's read bandwidth and GEMM peak once (cached), print them")
    rf.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    rf.add_argument("--num-threads", type=int, default=None, help="CPU threads (default: torch's)")
    rf.add_argument("--remeasure", action="store_true", help="measure again even if this machine's peaks are cached")
    rf.add_argument("--read-size", default=None, help="bytes the bandwidth test reads (default 1GiB on CPU, 2GiB GPU)")
    rf.add_argument("--gemm-n", type=int, default=None, help="GEMM size n (n x n x n; default 2048 CPU, 8192 GPU)")
    rf.add_argument("--model", default=None, help="also print the batch-1 decode ceiling for this model's weights")
    rf.add_argument("--json", action="store_true", help="print one JSON line")

    ev = sub.add_parser("eval", help="evaluations")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ppl = ev_sub.add_parser("ppl", help="perplexity, computed as llama.cpp's llama-perplexity does")
    ppl.add_argument("--model", default=None)
    ppl.add_argument("--dtype", default="float32")
    ppl.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default="none",
                     help="weights as the engine would run them (default none: the float reference)")
    ppl.add_argument("--file", required=True, help="text file")
    ppl.add_argument("--ctx", type=int, default=512)
    ppl.add_argument("--kv-cache-dtype", choices=("none", *KV_CACHE_DTYPES), default="none",
                     help="attend through a paged KV cache of this kind (none: straight from the fresh K/V)")
    from kvserve.entrypoints.compress_cli import add_prune_parser, add_quantize_parser

    add_quantize_parser(sub)
    add_prune_parser(sub)
    return parser


def _stream(engine, request_id: str, prompt, params) -> str:
    """Run one request, printing text deltas as steps produce them; returns the full text."""
    engine.add_request(request_id, prompt, params)
    text = ""
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == request_id:
                    delta = out.outputs[0].delta_text
                    text += delta
                    print(delta, end="", flush=True)
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        while engine.has_unfinished_requests():
            engine.step()
    print(flush=True)
    return text


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvserve.engine.llm_engine import LLMEngine

    params = sampling_params(args)
    if not args.prompt:
        raise InvalidRequestError("the prompt is empty")
    from kvserve.distributed.launch import is_worker_node, run_worker_node

    if is_worker_node(args.node_rank):
        return run_worker_node(args)
    engine = LLMEngine(**engine_kwargs(args))
    try:
        print(engine.lm.describe(), file=sys.stderr)
        print(engine.budget.describe(), file=sys.stderr)
        tok = engine.tokenizer
        if args.chat:
            prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
        else:
            prompt = args.prompt
            print(args.prompt, end="")
        _stream(engine, "cli", prompt, params)
    finally:
        engine.shutdown()
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from kvserve.engine.llm_engine import LLMEngine

    params = sampling_params(args)
    engine = LLMEngine(**engine_kwargs(args))
    print(engine.lm.describe(), file=sys.stderr)
    print("Type a message; an empty line or Ctrl-D quits.", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(messages, tokenize=True)
        try:
            reply = _stream(engine, f"chat-{turn}", prompt, params)
        except InvalidRequestError as e:  # e.g. the conversation outgrew max_model_len
            print(f"kvserve: error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
        turn += 1
    return 0


class _GracefulServerBase:
    """Mixin for uvicorn.Server: on SIGINT/SIGTERM report not-ready, drain, and exit 0.

    (uvicorn re-raises the signal after a graceful shutdown, which would end the process with
    status -15 instead of a clean exit.)
    """

    app_state = None  # the FastAPI app's state, once the engine is loaded

    def handle_exit(self, sig, frame) -> None:  # type: ignore[no-untyped-def]
        if self.app_state is not None:
            self.app_state.ready = False  # /health answers 503 while draining
        super().handle_exit(sig, frame)  # type: ignore[misc]

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def _graceful_server_class():  # uvicorn is imported only when serving
    import uvicorn

    return type("_GracefulServer", (_GracefulServerBase, uvicorn.Server), {})


class _LoadingApp:
    """ASGI front that answers 503 (OpenAI envelope) until the engine is loaded, then delegates."""

    def __init__(self) -> None:
        self.app = None
        self.error: str | None = None

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        import json as _json

        msg = f"model failed to load: {self.error}" if self.error else "model is loading"
        body = _json.dumps({"error": {"message": msg, "type": "service_unavailable", "param": None,
                                      "code": None}}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.entrypoints.openai.metrics import Metrics
    from kvserve.entrypoints.openai.app import build_app, default_api_key

    from kvserve.distributed.data_parallel import DataParallelEngine
    from kvserve.distributed.launch import is_worker_node, run_worker_node
    from kvserve.entrypoints.log_writer import LogWriter

    if is_worker_node(args.node_rank):
        return run_worker_node(args)  # this machine only hosts ranks of the engine on node 0
    if args.limit_concurrency is not None and args.limit_concurrency < 1:
        raise InvalidRequestError(f"--limit-concurrency must be >= 1, got {args.limit_concurrency}")
    dp = args.data_parallel_size
    if dp < 1:
        raise InvalidRequestError(f"data_parallel_size must be >= 1, got {dp}")
    if dp > 1 and args.tensor_parallel_size * args.pipeline_parallel_size > 1:
        raise InvalidRequestError("data parallel replicas of a tensor/pipeline-parallel engine are not supported yet")
    front = _LoadingApp()
    out = LogWriter()  # logs and messages: a stdout or stderr nobody reads must not stall the server
    engines: list = []
    if not args.disable_log_requests:  # request lines at INFO, whatever -v says
        logging.getLogger("kvserve.requests").setLevel(logging.INFO)
    fatal: list = []  # the engine error that ends the process

    def load() -> None:
        try:
            engine = LLMEngine(**engine_kwargs(args))
            # more replicas share the first one's weights (read-only); each has its own cache and scheduler
            replicas = [engine] + [LLMEngine(loaded=engine.lm, **engine_kwargs(args)) for _ in range(dp - 1)]
        except KVServeError as e:
            front.error = str(e)
            out.print(f"kvserve: error: {e}")
            server.should_exit = True
            return
        name = args.served_model_name or (engine.lm.path.stem if args.model else "SmolLM2-135M-Instruct")
        fronts = [AsyncLLMEngine(e, max_waiting_requests=args.max_waiting_requests,
                                 request_timeout=args.request_timeout) for e in replicas]
        async_engine = fronts[0] if dp == 1 else DataParallelEngine(fronts, args.routing)
        engines.append(async_engine)
        metrics = Metrics(log_records_dropped=lambda: out.dropped_total)
        app = build_app(async_engine, name, default_api_key(args.api_key), metrics,
                        metrics_public=args.metrics_public, log_requests=not args.disable_log_requests,
                        limit_concurrency=args.limit_concurrency)
        server.app_state = app.state
        out.print(f"model: {engine.lm.describe()}")
        out.print(engine.budget.describe() + (f" (x {dp} replicas)" if dp > 1 else ""))
        out.print(f"serving {name!r} on http://{args.host}:{args.port}/v1")
        front.app = app
        threading.Thread(target=watch, args=(async_engine,), name="kvserve-watch", daemon=True).start()

    def watch(async_engine) -> None:  # type: ignore[no-untyped-def]
        """An engine that crashed cannot serve again: exit non-zero so a supervisor restarts the process."""
        while not server.should_exit and async_engine.error is None:
            time.sleep(0.1)
        if server.should_exit or args.keep_alive_on_fatal:
            return
        fatal.append(async_engine.error)
        out.print(f"kvserve: error: the engine crashed ({async_engine.error!r}); exiting in "
                  f"{args.fatal_grace_period:g} s")
        time.sleep(args.fatal_grace_period)  # the failed streams' error events reach their clients
        server.should_exit = True

    config = uvicorn.Config(front, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=10, lifespan="off")
    server = _graceful_server_class()(config)
    out.install()  # after uvicorn.Config, which sets up uvicorn's own handlers
    threading.Thread(target=load, name="kvserve-load", daemon=True).start()
    try:
        server.run()  # SIGINT/SIGTERM: stop accepting, let in-flight requests finish, exit 0
    finally:
        for e in engines:
            e.shutdown()
        flushed = out.flush(timeout=2)  # what is still queued, unless nobody reads it
    code = 2 if front.error else 1 if fatal else 0
    if not flushed:  # a write is stuck on an output nobody reads, holding its handler's lock: logging's
        os._exit(code)  # exit hook would wait for that lock for ever (the engines are shut down already)
    return code


def _cmd_ppl(args: argparse.Namespace) -> int:
    from kvserve.eval.perplexity import perplexity
    from kvserve.loader import load_model

    path = Path(args.file)
    if not path.is_file():
        raise InvalidRequestError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{path}: not UTF-8 text") from None
    lm = load_model(args.model, dtype=args.dtype, quantization=args.quantization)
    print(lm.describe(), file=sys.stderr)
    r = perplexity(lm, text, ctx=args.ctx, kv_cache_dtype=args.kv_cache_dtype)
    print(f"chunks {r.num_chunks} x ctx {r.ctx}, scored tokens {r.num_scored}")
    print(f"PPL = {r.ppl:.4f} +/- {r.stderr:.5f}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    import json

    import torch

    from kvserve.sim import cost_model as cm
    from kvserve.sim.simulator import SimConfig, Simulator
    from kvserve.sim.workload import load_jsonl, scale_rate, synthetic

    if args.calibrate:
        from kvserve.engine.llm_engine import LLMEngine
        from kvserve.sim.calibrate import calibrate

        engine = LLMEngine(**engine_kwargs(args))
        model = calibrate(engine, seed=args.seed, max_seqs=min(args.max_num_seqs, 32))
        model.save(args.cost_model)
        print(model.describe())
        print(f"saved to {args.cost_model}")
        return 0
    config = EngineConfig.from_kwargs(**engine_kwargs(args)).resolve()  # every engine flag checked once
    if args.hardware:
        # the shape: --sim-model's, else --model's (read from its file's metadata), else SmolLM2-135M's
        model = args.sim_model or (cm.model_shape(args.model) if args.model is not None else "smollm2-135m")
        # K/V in --kv-cache-dtype; auto: the roofline's 2-byte (bfloat16) weights
        kv_dtype = torch.bfloat16 if config.kv_cache_dtype == "auto" else getattr(torch, config.kv_cache_dtype)
        cost, kv_bytes = cm.roofline(args.hardware, model, kv_dtype=kv_dtype, tensor_parallel=args.tensor_parallel_size)
        kv_per_token = cost.kv_bytes_per_token
    else:
        cost = cm.load_cost_model(args.cost_model)
        kv_bytes = 2**30
        kv_per_token = cm.model_kv_bytes_per_token(config)  # --model's shape at --kv-cache-dtype (auto: --dtype)
    if config.kv_cache_memory is not None:
        kv_bytes = config.kv_cache_memory
    num_blocks = int(kv_bytes // (kv_per_token * args.block_size))
    if num_blocks < 1:
        raise InvalidRequestError("the KV cache holds no block; raise --kv-cache-memory")
    if args.workload:
        work = load_jsonl(args.workload)
    else:
        work = synthetic(args.num_requests, args.rate, seed=args.seed, short_frac=args.short_frac,
                         max_tokens=args.max_tokens)
    work = scale_rate(work, args.rate_scale)
    policies = args.policies.split(",") if args.policies else [args.scheduling_policy]
    print(cost.describe(), file=sys.stderr)
    print(f"{len(work)} requests, {args.replicas} replica(s), {num_blocks} KV blocks of {args.block_size} per replica, "
          f"{kv_per_token} bytes of KV per token", file=sys.stderr)
    header = f"{'policy':8} {'req/s':>7} {'tok/s':>8} {'lat mean':>9} {'lat p99':>8} {'ttft mean':>9} " \
             f"{'norm lat':>9} {'worst wait':>10} {'kv mean':>7} {'preempt':>7}"
    if not args.json:
        print(header)
    for name in policies:
        cfg = SimConfig(num_blocks=num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens or 2048,
                        max_model_len=args.max_model_len or 8192, preemption_mode=args.preemption_mode,
                        enable_prefix_caching=args.enable_prefix_caching, scheduling_policy=name.strip(),
                        scheduling_max_wait=args.scheduling_max_wait, replicas=args.replicas)
        res = Simulator(cfg, cost).run(work)
        s = res.summary
        if args.json:
            print(json.dumps({"policy": name, **{k: round(v, 4) for k, v in s.items()},
                              "kv_usage_mean": round(res.kv_usage_mean, 4), "kv_usage_max": round(res.kv_usage_max, 4),
                              "preemptions": res.num_preemptions}))
        else:
            print(f"{name:8} {s['throughput_req_s']:7.2f} {s['throughput_out_tok_s']:8.1f} {s['latency_mean_s']:9.2f} "
                  f"{s['latency_p99_s']:8.2f} {s['ttft_mean_s']:9.2f} {s['normalized_latency_mean_s']:9.3f} "
                  f"{s['worst_wait_s']:10.2f} {res.kv_usage_mean:7.2f} {res.num_preemptions:7d}")
    return 0


def _cmd_roofline(args: argparse.Namespace) -> int:
    import json

    import torch

    from kvserve import roofline
    from kvserve.config import parse_bytes

    here = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    name = args.device or here[-1]
    if name.split(":")[0] not in here:
        raise InvalidRequestError(f"--device {name}: not available here ({', '.join(here)})")
    device = torch.device(name)
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise InvalidRequestError(f"--num-threads must be >= 1, got {args.num_threads}")
        torch.set_num_threads(args.num_threads)
    try:
        nbytes = parse_bytes(args.read_size) if args.read_size is not None else None
    except (ValueError, TypeError):
        raise InvalidRequestError(f"--read-size takes a size such as 1GiB or 512MiB, got {args.read_size!r}") from None
    if (nbytes is not None and nbytes < 4096) or (args.gemm_n is not None and args.gemm_n < 8):
        raise InvalidRequestError("--read-size must be >= 4KiB and --gemm-n >= 8")
    weights = None
    if args.model:
        p = Path(args.model).expanduser()
        if not p.exists():
            raise InvalidRequestError(f"--model {args.model}: no such file or directory")
        files = [p] if p.is_file() else [*p.glob("*.safetensors"), *p.glob("*.gguf"), *p.glob("*.bin")]
        weights = sum(f.stat().st_size for f in files)
        if not weights:
            raise InvalidRequestError(f"--model {args.model}: no weight files (.safetensors, .gguf, .bin) in it")
    peaks, hit = roofline.get(device, args.remeasure, nbytes, args.gemm_n)
    if args.json:
        out = {**dataclasses.asdict(peaks), "ridge_flop_per_byte": peaks.ridge_flop_per_byte, "cached": hit,
               "cache": str(roofline.cache_path())}
        if weights:
            out["weight_bytes"] = weights
            out["decode_batch1_ceiling_tok_s"] = peaks.read_bandwidth_gb_s * 1e9 / weights
        print(json.dumps(out))
        return 0
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(peaks.measured_at))
    print(f"roofline of {peaks.device} ({peaks.threads or 'GPU'} threads), measured {when}"
          f"{' (cached' if hit else ' (now, cached'} in {roofline.cache_path()}; --remeasure to redo)")
    print(f"  read bandwidth  {peaks.read_bandwidth_gb_s:10.1f} GB/s")
    print(f"  GEMM peak       {peaks.gemm_gflop_s:10.1f} GFLOP/s ({peaks.gemm_shape})")
    print(f"  ridge point     {peaks.ridge_flop_per_byte:10.1f} FLOP/byte: a step below it is memory-IO bound "
          "(decode at small batch), above it compute bound")
    if weights:
        print(f"  {args.model}: {weights / 1e6:.0f} MB of weights: batch-1 decode reads them all each token, "
              f"so at most {peaks.read_bandwidth_gb_s * 1e9 / weights:.1f} tok/s here")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from kvserve.entrypoints.compress_cli import cmd_prune, cmd_quantize

    commands = {"generate": _cmd_generate, "chat": _cmd_chat, "serve": _cmd_serve, "simulate": _cmd_simulate,
                "quantize": cmd_quantize, "prune": cmd_prune}
    try:
        if args.command == "eval" and args.eval_command == "ppl":
            return _cmd_ppl(args)
        if args.command == "roofline":
            return _cmd_roofline(args)
        if args.command == "bench":
            return args.bench_func(args, engine_kwargs(args))
        return commands[args.command](args)
    except KVServeError as e:
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
