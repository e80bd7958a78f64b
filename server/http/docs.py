"""The API docs pages, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served with no internet connection.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so on an offline machine (or behind a proxy that blocks
it) ``/docs`` is a blank page. :func:`install_docs` replaces them with the same pages (FastAPI's
``get_swagger_ui_html`` / ``get_redoc_html``) pointed at copies of those files installed with gradstore: the
``fastapi-offline`` package's ``static/`` folder (Swagger UI 5, which renders FastAPI's OpenAPI 3.1, ReDoc and
FastAPI's favicon), mounted at :data:`ASSETS_URL`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def assets_dir() -> Path:
    """The installed folder holding :data:`ASSET_FILES`."""
    return Path(str(resources.files("fastapi_offline").joinpath("static")))


def install_docs(app: FastAPI) -> None:
    """Serve ``app.docs_url`` and ``app.redoc_url`` (when set) from the package's files instead of a CDN."""
    docs_url, redoc_url = app.docs_url, app.redoc_url
    # FastAPI() registered its CDN pages at these paths: drop them (the OAuth2 redirect page needs no assets)
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in {docs_url, redoc_url}]
    if docs_url is None and redoc_url is None:
        return
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "").rstrip("/")
        return f"{root}{app.openapi_url}", f"{root}{ASSETS_URL}"

    if docs_url is not None:

        @app.get(docs_url, include_in_schema=False)
        async def swagger_ui(request: Request) -> HTMLResponse:
            openapi, assets = urls(request)
            return get_swagger_ui_html(
                openapi_url=openapi,
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
                swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                swagger_css_url=f"{assets}/swagger-ui.css",
                swagger_favicon_url=f"{assets}/favicon.png",
                swagger_ui_parameters=app.swagger_ui_parameters,
            )

    if redoc_url is not None:

        @app.get(redoc_url, include_in_schema=False)
        async def redoc(request: Request) -> HTMLResponse:
            openapi, assets = urls(request)
            return get_redoc_html(
                openapi_url=openapi,
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{assets}/redoc.standalone.js",
                redoc_favicon_url=f"{assets}/favicon.png",
                with_google_fonts=False,
            )
