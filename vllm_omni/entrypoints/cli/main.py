"""Entry point that stock vLLM's CLI hands every ``--omni`` command line to."""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("VLLM_OMNI_LOG_LEVEL", "INFO"),
                        format="%(levelname)s %(asctime)s [api_server] %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    core = None
    if argv[:1] == ["serve"] and not any(a == "-h" or a.startswith("--help") for a in argv):
        # Before vLLM's argument parser, whose imports take seconds: the engine core's workers
        # import theirs meanwhile (on another core). It waits for its config; stopped below if
        # the server does not start.
        from vllm_omni.engine.async_engine import EngineCoreProcess

        core = EngineCoreProcess.start()
    try:
        _serve(argv, core)
    finally:
        if core is not None:
            core.stop()


def _serve(argv: list[str], core) -> None:
    from vllm_omni.entrypoints.cli.serve import (
        api_keys,
        config_from_args,
        job_store_from_args,
        limits_from_args,
        make_parser,
        run_server,
        unsupported_flags,
    )

    parser, serve = make_parser()
    args = parser.parse_args(argv)
    if args.subparser != "serve":
        parser.error("--omni is supported with `vllm serve` only")
    bad = unsupported_flags(serve, args)
    if bad:
        serve.error(f"{', '.join(bad)}: vLLM text-engine option(s) with no meaning for diffusion "
                    "serving; remove them (see `vllm serve --omni --help`)")
    try:
        args.api_key = api_keys(args.api_key)
        config, spec = config_from_args(args, serve)
        limits = limits_from_args(args, spec, config)
        job_store = job_store_from_args(args, spec, config)
    except ValueError as e:
        serve.error(str(e))
    run_server(args, config, spec, limits, job_store, core)


if __name__ == "__main__":
    main()
