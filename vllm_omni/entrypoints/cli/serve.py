"""``vllm serve MODEL --omni``: vLLM's own serve parser plus our diffusion flags.

vLLM's serve parser defines ~200 text-engine flags. We honour the ones that mean something for
diffusion serving (``HONOURED``); any other vLLM flag set to a non-default value is an error, so a
user is never left believing ``--max-model-len`` or ``--enable-prefix-caching`` did something.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket

from vllm_omni.diffusion.data import (
    CACHE_BACKENDS,
    DiffusionParallelConfig,
    OmniEngineConfig,
    parse_json_config,
)

logger = logging.getLogger("vllm_omni")

OMNI_GROUP = "Omni diffusion"

# vLLM serve flags (argparse dests) that the diffusion server implements.
HONOURED = {
    "model_tag", "model", "host", "port", "api_key", "served_model_name", "seed", "dtype",
    "tensor_parallel_size", "quantization", "revision", "uvicorn_log_level",
    "disable_uvicorn_access_log", "root_path", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs",
    "allowed_origins", "allowed_methods", "allowed_headers", "allow_credentials", "config",
    "max_num_seqs", "distributed_executor_backend", "quantization_config",
    "lora_modules", "max_loras", "max_cpu_loras", "enable_lora", "data_parallel_size",
}


def _positive(kind):
    """An argparse type: a finite ``kind`` > 0, or a usage error naming the flag."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not 0 < v < float("inf"):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"expected {what} > 0, got {text!r}")
        return v

    return parse


def _add_omni_args(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    g = parser.add_argument_group(OMNI_GROUP, "Diffusion serving (vllm_omni). These flags, and "
                                  "the vLLM flags listed in the epilog, apply with --omni.")
    return [
        g.add_argument("--omni", action="store_true",
                       help="Serve a diffusion pipeline with vllm_omni instead of an LLM."),
        g.add_argument("--usp", "--ulysses-degree", dest="ulysses_degree", type=int, default=1,
                       help="Ulysses sequence-parallel degree."),
        g.add_argument("--ring", "--ring-degree", dest="ring_degree", type=int, default=1,
                       help="Ring-attention sequence-parallel degree."),
        g.add_argument("--cfg-parallel-size", type=int, default=1,
                       help="Ranks over which the CFG branches are split (1 or 2)."),
        g.add_argument("--vae-patch-parallel-size", type=int, default=1,
                       help="Ranks over which the VAE decode is split into patches."),
        g.add_argument("--cache-backend", choices=CACHE_BACKENDS, default="none",
                       help="Step cache: tea_cache or cache_dit (lossy; off by default)."),
        g.add_argument("--cache-config", type=str, default=None,
                       help="JSON object of cache settings, e.g. '{\"rel_l1_thresh\": 0.2}'."),
        g.add_argument("--enable-cpu-offload", action="store_true",
                       help="Keep each pipeline component (text encoder, transformer, VAE) off "
                            "the GPU, in pinned host memory, except while it runs. On a CPU: "
                            "each is read from a temporary file when it runs."),
        g.add_argument("--enable-layerwise-offload", action="store_true",
                       help="Stream the transformer's blocks to the GPU one at a time, the next "
                            "prefetched while one runs; the rest stays on the GPU. On a CPU: "
                            "the blocks are read from a temporary file when they run."),
        g.add_argument("--lora-path", type=str, default=None,
                       help="A LoRA adapter (a .safetensors file or a directory holding one) "
                            "applied to every request, beside any the request names."),
        g.add_argument("--allowed-lora-dirs", nargs="+", default=[], metavar="DIR",
                       help="Directories request-given LoRA paths may lie in (after resolving "
                            "symlinks and '..'). None by default: requests may name only the "
                            "adapters of --lora-modules."),
        g.add_argument("--model-load-timeout", type=float, default=1800.0,
                       help="Seconds the workers may take to load the model."),
        g.add_argument("--max-queue-len", type=int, default=64,
                       help="Requests that may wait beyond the running one; more get HTTP 429 "
                            "with Retry-After."),
        g.add_argument("--request-timeout", type=float, default=None,
                       help="Seconds a request may take end to end; then it is cancelled and "
                            "answered 504. Default: no deadline."),
        g.add_argument("--max-images-per-request", type=int, default=10,
                       help="Largest n accepted (400 beyond)."),
        g.add_argument("--max-inference-steps", type=int, default=1000,
                       help="Largest num_inference_steps accepted (400 beyond)."),
        g.add_argument("--max-pixels", type=int, default=None,
                       help="Largest width x height accepted (400 beyond). Default: the model's "
                            "own limit."),
        g.add_argument("--max-request-memory", type=str, default=None,
                       help="Largest estimated peak memory one batch may take beyond the loaded "
                            "model, e.g. 8GiB (400 beyond, naming the estimate). The device's free "
                            "memory (RAM on CPU) always limits it too; 0 turns the check off."),
        g.add_argument("--step-batching", action=argparse.BooleanOptionalAction, default=None,
                       help="Batch at the denoiser call: the --max-num-seqs requests in flight "
                            "each run their own steps and share one transformer forward per "
                            "step wherever their inputs have the same shapes (different steps, "
                            "guidance and seeds allowed); a new request starts at the next step "
                            "instead of waiting for a batch to end. On by default with "
                            "--max-num-seqs > 1 wherever the model runs it (all but BAGEL); "
                            "--no-step-batching batches whole pipeline calls of one batch key "
                            "instead."),
        g.add_argument("--max-upload-mb", type=float, default=50.0,
                       help="Largest request body in MiB, uploads included (413 beyond)."),
        g.add_argument("--header-read-timeout", type=_positive(float), default=10.0,
                       help="Seconds a client has to send a request line and headers, from "
                            "connecting or, on a kept-alive connection, from its first byte "
                            "after the previous response; then the connection is closed."),
        g.add_argument("--body-read-timeout", type=_positive(float), default=60.0,
                       help="Seconds a client has to send a whole request body, from the end of "
                            "its headers; then it gets 408 and the connection is closed. Raise "
                            "it for large uploads over slow links (50 MiB in 60 s is ~7 Mbit/s)."),
        g.add_argument("--max-connections", type=_positive(int), default=512,
                       help="Open HTTP connections accepted at once; a connection beyond them "
                            "is answered 503 and closed at once."),
        g.add_argument("--warmup-sizes", type=str, default=None,
                       help="Sizes generated before /health reports ready, e.g. "
                            "'1024x1024,512x512', or 'none'. Default: the model's default size."),
        g.add_argument("--warmup-steps", type=int, default=None,
                       help="Denoising steps of each warm-up request. Default: 2 (4 with a "
                            "cache-dit step mask, the fewest its masks support)."),
        g.add_argument("--worker-heartbeat-timeout", type=_positive(float), default=30.0,
                       help="Seconds without a heartbeat from a worker (sent by a thread, also "
                            "during compute) before it is treated as dead (stopped, frozen) and "
                            "the workers restart."),
        g.add_argument("--cancel-grace-period", type=_positive(float), default=10.0,
                       help="Seconds the workers get to stop a cancelled (timed-out or "
                            "abandoned) request before they are restarted so the queue moves."),
        g.add_argument("--video-storage-dir", type=str, default=None,
                       help="Directory of video jobs (records and mp4s), kept across restarts: "
                            "unfinished jobs run again when the server starts on it. Default: "
                            "$XDG_CACHE_HOME/vllm_omni/videos/<served model name>."),
        g.add_argument("--video-retention-hours", type=_positive(float), default=24.0,
                       help="Hours a finished video job and its files are kept (expires_at)."),
        g.add_argument("--public-url", type=str, default=None,
                       help="Base URL of this server as clients reach it (e.g. "
                            "https://images.example.com/api), used in response_format=url "
                            "links. Default: the address the request came in on, plus "
                            "--root-path."),
        g.add_argument("--disable-playground", action="store_true",
                       help="Serve no playground page (GET / and /playground), for deployments "
                            "that want the API alone."),
    ]


def make_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm", description="vLLM CLI (vllm_omni diffusion mode)")
    subparsers = parser.add_subparsers(dest="subparser")
    serve = subparsers.add_parser(
        "serve", usage="vllm serve MODEL --omni [options]",
        description="Serve a diffusers pipeline (a local directory or a Hugging Face id) through "
                    "OpenAI-compatible image endpoints.")
    serve = make_arg_parser(serve)
    # vLLM turns --quantization-config into its LLM layer specs; ours is the plain JSON object
    # (fp8's "ignore" list), so that an explicit empty list still reads as given.
    for action in serve._actions:
        if action.dest == "quantization_config":
            action.type = lambda text: parse_json_config(text, "--quantization-config")
    # vLLM defaults --seed to 0, which would make every server draw the same "random" request
    # seeds; without an explicit --seed they come from the OS's entropy instead.
    serve.set_defaults(seed=None)
    actions = _add_omni_args(serve)
    # vLLM's --help shows only group titles; list our flags in full, as users look for them.
    fmt = serve._get_formatter()
    fmt.start_section(f"{OMNI_GROUP} flags")
    fmt.add_arguments(actions)
    fmt.end_section()
    fmt.add_text("vLLM flags honoured with --omni: " + ", ".join(
        "--" + d.replace("_", "-") for d in sorted(HONOURED - {"model_tag"})))
    serve.epilog = fmt.format_help() + "\n" + (serve.epilog or "")
    return parser, serve


def unsupported_flags(serve_parser, args: argparse.Namespace) -> list[str]:
    ours = {a.dest for g in serve_parser._action_groups if g.title == OMNI_GROUP
            for a in g._group_actions}
    bad = []
    for action in serve_parser._actions:
        dest = action.dest
        if dest in HONOURED or dest in ours or dest == "help" or not hasattr(args, dest):
            continue
        if getattr(args, dest) != action.default:
            bad.append(action.option_strings[0] if action.option_strings else dest)
    return bad


def lora_modules(given) -> dict[str, str]:
    """vLLM's --lora-modules (``name=path`` or its JSON form) as name -> path."""
    modules: dict[str, str] = {}
    for m in given or []:
        if m.base_model_name is not None:
            raise ValueError(f"--lora-modules {m.name}: base_model_name is not supported (the "
                             "adapter applies to the served model)")
        if m.name in modules:
            raise ValueError(f"--lora-modules: {m.name!r} is given twice")
        modules[m.name] = m.path
    return modules


def lora_registry(config: OmniEngineConfig):
    """The server's adapters; run-time updates as vLLM allows them
    (VLLM_ALLOW_RUNTIME_LORA_UPDATING), which need LoRA on from the start."""
    from vllm import envs

    from vllm_omni.lora import LoraRegistry

    registry = LoraRegistry.from_config(config)
    if envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
        if not config.lora_enabled:
            raise ValueError("VLLM_ALLOW_RUNTIME_LORA_UPDATING is set but LoRA is off: add "
                             "--enable-lora (and --allowed-lora-dirs for the adapters' paths)")
        registry.runtime_updates = True
    return registry


def config_from_args(args: argparse.Namespace, serve_parser):
    """The engine config and the model's spec, checked against each other; ValueError if not."""
    from vllm_omni.models.registry import load_model_spec, resolve_model_dir

    # vLLM defaults --model to an LLM; only an explicitly given one counts here.
    explicit_model = args.model if args.model != serve_parser.get_default("model") else None
    model = args.model_tag or explicit_model
    if not model:
        raise ValueError("no model given: use `vllm serve MODEL --omni`")
    if args.quantization not in (None, "fp8"):
        raise ValueError(f"--quantization {args.quantization} is not supported with --omni "
                         "(supported: fp8)")
    parallel = DiffusionParallelConfig(
        ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
        cfg_parallel_size=args.cfg_parallel_size,
        tensor_parallel_size=args.tensor_parallel_size,
        vae_patch_parallel_size=args.vae_patch_parallel_size,
        data_parallel_size=args.data_parallel_size)
    config = OmniEngineConfig(
        model=resolve_model_dir(model, args.revision), model_name=model,
        served_model_names=list(args.served_model_name or [model]),
        dtype=args.dtype, parallel=parallel, cache_backend=args.cache_backend,
        cache_config=args.cache_config or {}, quantization=args.quantization,
        quantization_config=args.quantization_config,
        enable_cpu_offload=args.enable_cpu_offload,
        enable_layerwise_offload=args.enable_layerwise_offload, lora_path=args.lora_path,
        lora_modules=lora_modules(args.lora_modules), max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras, allowed_lora_dirs=args.allowed_lora_dirs,
        enable_lora=bool(args.enable_lora),
        default_seed=args.seed, load_timeout_s=args.model_load_timeout,
        max_num_seqs=args.max_num_seqs or 1, max_request_memory=args.max_request_memory,
        heartbeat_timeout_s=args.worker_heartbeat_timeout,
        cancel_grace_s=args.cancel_grace_period,
        distributed_executor_backend=args.distributed_executor_backend or "mp",
        step_batching=args.step_batching,
    )
    spec = load_model_spec(config.model)
    spec.adapter.check_engine(config)
    lora_registry(config)  # the adapters' files: a missing or pickle one fails now
    return config, spec


def limits_from_args(args: argparse.Namespace, spec, config: OmniEngineConfig):
    """The API server's admission limits; warm-up sizes are checked against the model now."""
    from vllm_omni.engine.input_processor import InputProcessor
    from vllm_omni.engine.request import InvalidRequestError
    from vllm_omni.entrypoints.openai.limits import ServingLimits, parse_sizes
    from vllm_omni.entrypoints.openai.api_server import warmup_params

    limits = ServingLimits(
        max_queue_len=args.max_queue_len, max_num_seqs=args.max_num_seqs or 1,
        data_parallel_size=args.data_parallel_size, request_timeout_s=args.request_timeout,
        max_images_per_request=args.max_images_per_request,
        max_inference_steps=args.max_inference_steps, max_pixels=args.max_pixels,
        max_body_bytes=int(args.max_upload_mb * 2**20),
        warmup_sizes=parse_sizes(args.warmup_sizes) if args.warmup_sizes else None,
        warmup_steps=warmup_steps(args, spec, config),
        header_read_timeout_s=args.header_read_timeout,
        body_read_timeout_s=args.body_read_timeout, max_connections=args.max_connections)
    if args.public_url is not None:
        from urllib.parse import urlsplit

        url = urlsplit(args.public_url)
        if url.scheme not in ("http", "https") or not url.netloc or url.query or url.fragment:
            raise ValueError(f"--public-url {args.public_url!r}: expected http(s)://host[:port]"
                             "[/path]")
    if limits.warmup_sizes and not spec.adapter.sized and not spec.adapter.image_inputs[1]:
        raise ValueError(f"--warmup-sizes: {spec.pipeline_class} has no size to warm up at; "
                         "give 'none' or leave it out")
    for w, h in limits.warmup_sizes or []:
        try:
            params, inputs = warmup_params(spec, limits.warmup_steps, w, h)
            InputProcessor(spec).process("warm-up", params, images=inputs)
        except InvalidRequestError as e:
            raise ValueError(f"--warmup-sizes {w}x{h}: {e.message}") from None
    return limits


def job_store_from_args(args: argparse.Namespace, spec, config: OmniEngineConfig):
    """The video job store of a video model (opened now: a bad directory is a start-up error),
    else None."""
    if spec.adapter.output != "video":
        given = [f for f, v in (("--video-storage-dir", args.video_storage_dir is not None),
                                ("--video-retention-hours", args.video_retention_hours != 24.0))
                 if v]
        if given:
            raise ValueError(f"{', '.join(given)}: {spec.pipeline_class} does not generate video")
        return None
    from vllm_omni.entrypoints.openai.video_jobs import JobStore

    directory = args.video_storage_dir or default_video_dir(config.served_model_names[0])
    return JobStore(directory, args.video_retention_hours * 3600)


def default_video_dir(model_name: str) -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vllm_omni", "videos", re.sub(r"[^A-Za-z0-9._-]+", "--",
                                                             model_name).strip("-."))


def warmup_steps(args: argparse.Namespace, spec, config: OmniEngineConfig) -> int:
    """--warmup-steps, or its default: 2, or 4 where a cache-dit step mask needs it."""
    steps = args.warmup_steps
    if config.cache_backend != "cache_dit":
        return 2 if steps is None else steps
    from vllm_omni.cache.cache_dit import CacheDiTConfig, mask_supports

    cache = CacheDiTConfig.resolve(config.cache_config, spec.adapter.cache_dit_presets,
                                   spec.pipeline_class)
    if cache.scm_steps_mask_policy is None:
        return 2 if steps is None else steps
    if steps is None:
        return 4
    if not mask_supports(steps):
        raise ValueError(f"--warmup-steps {steps}: the cache-dit step mask supports 4, 6, or 8 "
                         "and more steps")
    return steps


def api_keys(value) -> list[str]:
    """vLLM takes one or more keys (--api-key K [K ...]) or VLLM_API_KEY. An empty key (an unset
    shell variable in ``--api-key "$KEY"``) is refused: vLLM's parser turns it into None, and a
    server that looks protected must not open to ``Bearer None`` or run without a key."""
    if value:
        keys = [value] if isinstance(value, str) else list(value)
        if not all(keys):
            raise ValueError("--api-key: a key is empty (an unset variable?); give non-empty "
                             "keys, or drop the flag to serve without one")
        return keys
    env = os.environ.get("VLLM_API_KEY")
    return [env] if env else []


def playground_url(args: argparse.Namespace, host: str) -> str:
    """Where a browser on this machine finds the page (the --public-url's, when given)."""
    if args.public_url:
        return args.public_url.rstrip("/") + "/playground"
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    scheme = "https" if args.ssl_certfile else "http"
    return f"{scheme}://{host}:{args.port}{(args.root_path or '').rstrip('/')}/playground"


def run_server(args: argparse.Namespace, config: OmniEngineConfig, spec, limits,
               job_store, core) -> None:
    """``core``: an ``EngineCoreProcess`` started early, for the engine (None: a new one)."""
    import uvicorn
    from fastapi.middleware.cors import CORSMiddleware
    from vllm import envs

    from vllm_omni.engine.data_parallel import start_engine
    from vllm_omni.entrypoints.openai.api_server import build_app
    from vllm_omni.entrypoints.openai.connections import guarded_protocol

    # Bind the port before the engine starts, as vLLM does: the workers open many TCP
    # connections while loading, and one of them could take a port chosen but not yet bound.
    host = args.host or "0.0.0.0"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, args.port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{args.port}: {e}") from None
    sock.set_inheritable(False)
    logger.info("starting engine for %s (%s)", config.model_name, spec.pipeline_class)
    engine = start_engine(config, core)
    try:
        app = build_app(engine, spec, config.served_model_names, model_root=config.model,
                        api_keys=args.api_key,
                        seed=args.seed, root_path=args.root_path or "", limits=limits,
                        public_url=args.public_url, job_store=job_store,
                        loras=lora_registry(config),
                        playground_url=None if args.disable_playground else
                        playground_url(args, host))
        # Outermost, as in vLLM: a browser's preflight carries no key.
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins,
                           allow_credentials=args.allow_credentials,
                           allow_methods=args.allowed_methods,
                           allow_headers=args.allowed_headers)
        server = uvicorn.Server(uvicorn.Config(
            app, host=host, port=args.port, log_level=args.uvicorn_log_level,
            http=guarded_protocol(limits.header_read_timeout_s, limits.max_connections),
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,  # as vLLM's own server
            access_log=not args.disable_uvicorn_access_log, ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
            timeout_graceful_shutdown=10))
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
        sock.close()
