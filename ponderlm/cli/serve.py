"""``ponderlm serve``: the OpenAI-compatible server (the work is in :mod:`ponderlm.serving`)."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

from ponderlm.cli.common import finite_number, int_at_least, needs


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server, continuous batching at slot granularity",
                       description="Serves /v1/completions, /v1/chat/completions, /v1/models, /health and "
                                   "/metrics (docs/SERVING.md). Needs: pip install 'ponderlm[serve]'.")  # fmt: skip
    p.add_argument("--checkpoint", type=Path, required=True, help="run, checkpoint or exported directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="0 picks a free port (printed when ready)")
    p.add_argument("--max-batch", type=int_at_least(1), default=16, help="requests decoding at once")
    p.add_argument("--max-queue", type=int_at_least(1), default=64, help="requests waiting; beyond: 429")
    p.add_argument("--tau", type=float, default=None, help="pruning threshold (default: the model's)")
    p.add_argument("--api-key", default=None, help="Bearer key every request must carry (or $PONDERLM_API_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory's name)")
    p.add_argument("--shutdown-timeout", type=finite_number(at_least=0), default=30.0,
                   help="seconds SIGTERM waits for streams in flight")  # fmt: skip
    p.add_argument("--prefill", choices=("auto", "exact", "converged", "parallel"), default="auto",
                   help="exact: prompts walk through the batch, slot by slot; converged/parallel: prompts are "
                        "prefilled when admitted (with the others admitted at that step); auto (default): "
                        "latent-thought models walk prompts of up to --walk-max tokens and prefill longer ones "
                        "(converged Jacobi), other methods prefill every prompt in one pass "
                        "(docs/SERVING.md)")  # fmt: skip
    p.add_argument("--walk-max", type=int_at_least(0), default=64,
                   help="with --prefill auto: the longest prompt that walks (default 64 tokens)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=int_at_least(1), default=4 << 20,
                   help="larger request bodies are refused with 413, unread (default 4 MiB)")  # fmt: skip
    p.add_argument("--request-timeout", type=finite_number(above=0), default=30.0,
                   help="seconds a client has to send a request's headers, and again its body; then 408 "
                        "(default 30)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(handler=cmd_serve)


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text[:40]}")
    return v


def _listen(host: str, port: int):
    """A listening TCP socket, or a one-line error (port in use, address not on this machine)."""
    import socket

    from ponderlm.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{host}:{port} is already in use; stop what listens there or pick another --port"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.device import resolve_device
    from ponderlm.errors import ConfigError
    from ponderlm.model.config import check_tau

    needs("fastapi", "ponderlm serve", "'ponderlm[serve]'")
    needs("uvicorn", "ponderlm serve", "'ponderlm[serve]'")
    from ponderlm.loading import load_model
    from ponderlm.serving.api import ServerSettings, api_key_from_env, longest_token, run
    from ponderlm.serving.engine import Engine
    from ponderlm.serving.scheduler import BatchSettings

    if args.tau is not None:
        check_tau(args.tau)
    device = resolve_device(args.device)
    model, tok, _ = load_model(args.checkpoint, device)  # every mistake in the checkpoint is one line here
    cfg = model.cfg
    del model  # the engine process loads its own copy
    if cfg.n_rounds > 1:
        raise ConfigError(f"serve decodes slot methods; {cfg.method!r} decodes by rounds (use `generate`)")
    name = args.model_name or Path(args.checkpoint).resolve().name
    settings = ServerSettings(model_id=name, context=cfg.max_seq_len, api_key=api_key_from_env(args.api_key),
                              max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
                              token_chars=longest_token(tok), model_config=cfg)  # fmt: skip
    sock = _listen(args.host, args.port)
    batch = BatchSettings(max_batch=args.max_batch, max_queue=args.max_queue, tau=args.tau, prefill=args.prefill,
                          walk_max=args.walk_max)  # fmt: skip
    engine = Engine(args.checkpoint, str(device), batch)
    engine.start()
    return run(engine, tok, settings, sock, shutdown_timeout=args.shutdown_timeout)
