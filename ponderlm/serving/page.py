"""The page at ``GET /``: watch the router work. A prompt typed there is completed by this server
(``/v1/completions``, streamed, ``logprobs: 0`` so each chunk names its tokens), each token shaded
by its ponder depth, with the running mean depth and FLOPs per token (docs/SERVING.md, "The page").

The page is three static files shipped in the package (``page/``: HTML, JS, CSS; no build step)
and one small read-only JSON route, ``/page/info``: the model's K and the FLOPs of a token at each
depth, from :mod:`ponderlm.model.flops`. Every response says ``Cache-Control: no-store`` and a
Content-Security-Policy that allows this origin only, so the page can load nothing from elsewhere.
It sits behind the API key like every route; the page's routes answer a missing key with a Basic
challenge, so a browser asks for it (:class:`~ponderlm.serving.http._AuthAndCount`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

FILES = Path(__file__).with_name("page")

# path -> (file in FILES, media type): a fixed list, nothing else under FILES is reachable
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page/page.css": ("page.css", "text/css; charset=utf-8"),
    "/page/icon.svg": ("icon.svg", "image/svg+xml"),
}
INFO = "/page/info"

HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def asks_for_login(path: str) -> bool:
    """Whether a request for ``path`` without the key is answered with a Basic challenge (the
    browser's login prompt): the page and its files, which a browser loads by navigating."""
    return path in ASSETS


def flops_per_depth(cfg) -> list[float]:
    """Inference FLOPs of one token at each depth 0..K, as :func:`~ponderlm.model.flops.inference_flops`
    counts them for a token with no earlier context: its 1 + d slots, the attention among them, the
    router and the head (attention to earlier tokens grows with the context and is not in it)."""
    import torch

    from ponderlm.model.flops import inference_flops

    return [inference_flops(cfg, torch.tensor([[d]])).total for d in range(cfg.max_depth + 1)]


def page_info(model_id: str, info, cfg) -> dict:
    """What the page shows about the model: its name, method, K, tau, and FLOPs by depth (null
    without the model's config)."""
    return {"model": model_id, "method": info.method, "max_depth": info.max_depth, "tau": info.tau,
            "flops_per_depth": flops_per_depth(cfg) if cfg is not None else None}  # fmt: skip


def add_page(app: FastAPI, settings, engine) -> None:
    """Serve the page's files and ``/page/info`` on ``app`` (the API key is checked before, in the middleware)."""
    bodies = {path: (FILES / name).read_bytes() for path, (name, _) in ASSETS.items()}  # read once, at start
    cached: dict[str, dict] = {}

    def serve_file(path: str):
        async def asset() -> Response:
            return Response(bodies[path], media_type=ASSETS[path][1], headers=HEADERS)

        return asset

    for path in ASSETS:
        app.add_api_route(path, serve_file(path), methods=["GET"], include_in_schema=False)

    @app.get(INFO, include_in_schema=False)
    async def info() -> JSONResponse:
        if "info" not in cached:
            cached["info"] = page_info(settings.model_id, engine.info, settings.model_config)
        return JSONResponse(cached["info"], headers=HEADERS)
