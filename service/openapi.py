"""The OpenAPI 3.0 description of the API, served at ``/api/openapi.json``.

Written by hand, next to the handlers it describes; tests/test_serve_api.py
checks every route against it (schemathesis) so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from imgindex import __version__
from imgindex.pipeline.search import KINDS

# A search's `copies` flag, by JSON or in the form.
_COPIES = {
    "type": "boolean",
    "description": "tell each hit's kind against the query (reads each hit's file)",
}


def _error(text: str) -> dict[str, Any]:
    return {
        "description": text,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
        },
    }


def _html(text: str) -> dict[str, Any]:
    return {
        "description": text,
        "content": {"text/html": {"schema": {"type": "string"}}},
    }


def _json(text: str, schema: str) -> dict[str, Any]:
    return {
        "description": text,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
        },
    }


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The index's folder name under the service's index root.",
    "schema": {"type": "string"},
}
_ID = {
    "name": "image_id",
    "in": "path",
    "required": True,
    "description": "An indexed image's id (decimal; ids are 63-bit).",
    "schema": {"type": "string"},
}
# k, turns and copies may come in the URL as well as in the body (not both
# with two values).
_SEARCH_URL_ARGUMENTS = [
    {
        "name": name,
        "in": "query",
        "required": False,
        "description": f"As the body's {name!r}, which it must agree with if both "
        "are given.",
        "schema": schema,
    }
    for name, schema in (
        ("k", {"type": "integer", "minimum": 1}),
        ("turns", {"type": "boolean"}),
        ("copies", _COPIES),
    )
]
_BUILD_ID = {
    "name": "build_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}
_TOKEN = [{"token": []}]  # every route but /health (and /, which asks for it)

# A name or path: any text without NUL, which no file system takes in a name.
_DATASET_NAME = {"type": "string", "minLength": 1, "pattern": "^[^\\x00]+$"}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Health": {
        "description": "Up; nothing more, to anyone.",
        "type": "object",
        "required": ["status"],
        "additionalProperties": False,
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
    },
    "Status": {
        "type": "object",
        "required": ["status", "version", "indexes", "builds_running"],
        "properties": {
            "status": {"type": "string", "enum": ["ok"]},
            "version": {"type": "string"},
            "index_root": {"type": "string"},
            "indexes": {"type": "integer"},
            "builds_running": {"type": "integer"},
            "builds_allowed": {"type": "boolean"},
            "token_required": {"type": "boolean"},
            "same_image": {
                "type": "number",
                "description": "Hits scoring below this are other images "
                "(imgindex.duplicates.threshold).",
            },
            "cluster": {
                "type": "object",
                "nullable": True,
                "description": "`build --json`'s cluster, without the address.",
            },
        },
    },
    "IndexList": {
        "type": "object",
        "required": ["root", "indexes"],
        "properties": {
            "root": {"type": "string"},
            "indexes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "count": {"type": "integer"},
                        "model": {"type": "string"},
                        "dim": {"type": "integer"},
                        "index_key": {"type": "string"},
                        "index_kind": {"type": "string"},
                        "updated": {"type": "string"},
                        "duplicates": {"type": "boolean"},
                        "error": {"type": "string"},
                    },
                },
            },
        },
    },
    "IndexInfo": {
        "description": "What `imgindex info --json` prints.",
        "type": "object",
        "required": ["name", "model", "dim", "metric", "count", "failed", "created"],
        "properties": {
            "name": {"type": "string"},
            "model": {"type": "string"},
            "dim": {"type": "integer"},
            "metric": {"type": "string"},
            "count": {"type": "integer"},
            "copies": {
                "type": "integer",
                "description": "Images whose vector is another's, stored once.",
            },
            "failed": {"type": "integer"},
            "created": {"type": "string"},
            "imgindex_version": {"type": "string"},
        },
    },
    "SearchById": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "An indexed image's id."},
            "path": {
                "type": "string",
                "description": "An indexed image's path inside the dataset.",
            },
            "k": {"type": "integer", "minimum": 1, "maximum": 100},
            "turns": {"type": "boolean"},
            "copies": _COPIES,
        },
    },
    "SearchUpload": {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary"},
            "k": {"type": "integer", "minimum": 1, "maximum": 100},
            "turns": {"type": "boolean"},
            "copies": _COPIES,
        },
    },
    "SearchResult": {
        "type": "object",
        "required": ["index", "k", "hits", "seconds"],
        "properties": {
            "index": {"type": "string"},
            "k": {"type": "integer"},
            "seconds": {"type": "number"},
            "query": {"type": "object"},
            "hits": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["rank", "path", "score", "id"],
                    "properties": {
                        "rank": {"type": "integer"},
                        "path": {"type": "string"},
                        "score": {"type": "number"},
                        "id": {"type": "string"},
                        "relpath": {"type": "string"},
                        "image": {"type": "string"},
                        "thumbnail": {"type": "string"},
                        "kind": {
                            "type": "string",
                            "enum": list(KINDS),
                            "description": "with copies: what the hit is to "
                            "the query, as `imgindex duplicates` tells",
                        },
                        "meta": {
                            "type": "object",
                            "description": "the other columns of the image's "
                            "row in the file list it was built from",
                        },
                    },
                },
            },
        },
    },
    "Duplicates": {
        "description": "`imgindex duplicates --json`'s report with one page of "
        "copy groups (`page`) and the same page of groups of other shots of one "
        "scene (`shot_page`, in place of `other_shots`).",
        "type": "object",
        "required": ["groups", "page", "shot_groups", "shot_page", "offset", "limit"],
        "properties": {
            "groups": {"type": "integer"},
            "shot_groups": {"type": "integer"},
            "offset": {"type": "integer"},
            "limit": {"type": "integer"},
            "page": {"type": "array", "items": {"type": "object"}},
            "shot_page": {"type": "array", "items": {"type": "object"}},
        },
    },
    "ImageInfo": {
        "type": "object",
        "required": ["id", "relpath", "path", "bytes", "modified"],
        "properties": {
            "id": {"type": "string"},
            "relpath": {"type": "string"},
            "path": {"type": "string"},
            "bytes": {"type": "integer"},
            "modified": {"type": "string", "format": "date-time"},
            "width": {"type": "integer", "nullable": True},
            "height": {"type": "integer", "nullable": True},
            "format": {"type": "string", "nullable": True},
        },
    },
    "LegacyBuildRequest": {
        "description": "The build request of the Flask service imgindex replaces.",
        "type": "object",
        "required": ["dataset_names"],
        "properties": {
            "dataset_names": {
                "type": "array",
                "minItems": 1,
                "items": _DATASET_NAME,
            },
            "distributed": {
                "type": "boolean",
                "description": "Accepted and ignored: every build runs on Dask.",
            },
            "rebuild": {"type": "boolean"},
            "moved": {"type": "boolean", "description": "As /api/builds takes it."},
        },
    },
    "Datasets": {
        "type": "object",
        "required": ["roots", "datasets"],
        "properties": {
            "roots": {"type": "array", "items": {"type": "string"}},
            "datasets": {"type": "array", "items": {"type": "object"}},
        },
    },
    "BuildRequest": {
        "type": "object",
        "required": ["datasets"],
        "properties": {
            "datasets": {
                "type": "array",
                "minItems": 1,
                "items": _DATASET_NAME,
                "description": "Folder names under a dataset root, or paths in one.",
            },
            "rebuild": {"type": "boolean"},
            "moved": {
                "type": "boolean",
                "description": "A dataset whose index names another place is "
                "that dataset, moved here: keep its index (`imgindex build "
                "--moved`).",
            },
        },
    },
    "Build": {
        "description": "The JSON of `imgindex build --progress-file`, plus id and "
        "summaries.",
        "type": "object",
        "required": ["id", "state", "datasets"],
        "properties": {
            "id": {"type": "string"},
            "state": {
                "type": "string",
                "enum": [
                    "starting",
                    "running",
                    "finished",
                    "failed",
                    "cancelled",
                    "interrupted",
                ],
            },
            "datasets": {"type": "array", "items": {"type": "object"}},
            "summaries": {"type": "array", "items": {"type": "object"}},
            "error": {"type": "string"},
            "build_id": {
                "type": "string",
                "description": "The id again, as /api/build_index answered it.",
            },
        },
    },
    "BuildList": {
        "type": "object",
        "required": ["builds"],
        "properties": {
            "builds": {"type": "array", "items": {"$ref": "#/components/schemas/Build"}}
        },
    },
}


def openapi() -> dict[str, Any]:
    """The description, with this version of imgindex."""
    spec = _description()
    for operations in spec["paths"].values():
        for operation in operations.values():
            if operation.get("security") == []:
                continue
            responses = operation["responses"]
            responses.setdefault("401", _error("The token is missing or wrong."))
            responses.setdefault(
                "403",
                _error(
                    "A Host that is not this service's, or a page of another "
                    "origin changing something."
                ),
            )
    return spec


def _build_started() -> dict[str, Any]:
    """The answers to a request that starts a build (either route)."""
    return {
        "202": _json("Started.", "Build"),
        "400": _error("A bad request or a folder without images."),
        "403": _error("Outside the dataset roots, or builds are off."),
        "404": _error("No such dataset folder."),
        "409": _error("That index is being built now."),
        "415": _error("Not application/json."),
        "429": _error("Too many builds are running."),
    }


def _description() -> dict[str, Any]:
    no_index = _error("No such index.")
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "imgindex",
            "version": __version__,
            "description": "Search the FAISS indexes under one folder, and build "
            "them on a Dask cluster. Every route but /health needs the service's "
            "token (a bearer token, or the cookie the page gets from /?token=). "
            "Every 4xx answers a one-line JSON error. Bound to loopback, the "
            "service answers 403 to any Host but a loopback name.",
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "security": _TOKEN,
        "paths": {
            "/health": {
                "get": {
                    "summary": "The service is up (nothing more, to anyone).",
                    "security": [],
                    "responses": {"200": _json("Up.", "Health")},
                }
            },
            "/": {
                "get": {
                    "summary": "The page; with ?token=TOKEN, sets the cookie the "
                    "page uses and sends the browser on to /.",
                    "security": [],
                    "parameters": [
                        {"name": "token", "in": "query", "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": _html("The page."),
                        "303": {"description": "The token was taken: on to /."},
                        "401": _html("No token: a form asking for it."),
                        "403": _error("A Host that is not this service's."),
                    },
                }
            },
            "/api/status": {
                "get": {
                    "summary": "What the service holds and runs.",
                    "responses": {"200": _json("The status.", "Status")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics: queries, latency, builds.",
                    "responses": {
                        "200": {
                            "description": "The text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/api/indexes": {
                "get": {
                    "summary": "The indexes under the index root.",
                    "responses": {"200": _json("The list.", "IndexList")},
                }
            },
            "/api/indexes/{name}": {
                "get": {
                    "summary": "One index, as `imgindex info --json` shows it.",
                    "parameters": [_NAME],
                    "responses": {
                        "200": _json("The index.", "IndexInfo"),
                        "404": no_index,
                        "409": _error("The index cannot be read now."),
                    },
                }
            },
            "/api/indexes/{name}/search": {
                "post": {
                    "summary": "The top-k images like an uploaded one, or like an "
                    "indexed image given by id or path.",
                    "parameters": [_NAME, *_SEARCH_URL_ARGUMENTS],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {"$ref": "#/components/schemas/SearchUpload"}
                            },
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/SearchById"}
                            },
                        },
                    },
                    "responses": {
                        "200": _json("Hits, best first.", "SearchResult"),
                        "400": _error("Not an image, a bad k, or a bad id or path."),
                        "403": _error("The image lies outside its dataset."),
                        "404": _error("No such index, or no such image in it."),
                        "409": _error("The index cannot be read now."),
                        "413": _error("The upload is over the limit."),
                        "415": _error("Neither multipart/form-data nor JSON."),
                    },
                }
            },
            "/api/indexes/{name}/images/{image_id}": {
                "get": {
                    "summary": "An indexed image's file.",
                    "parameters": [_NAME, _ID],
                    "responses": {
                        "200": {
                            "description": "The file as it is on disk when a "
                            "browser shows its format, else a PNG of it; the type "
                            "is read from the bytes, never from the name.",
                            "content": {
                                kind: {"schema": {"type": "string"}}
                                for kind in (
                                    "image/jpeg",
                                    "image/png",
                                    "image/gif",
                                    "image/webp",
                                    "image/bmp",
                                )
                            },
                        },
                        "400": _error("Not an image id."),
                        "403": _error("The file lies outside the dataset."),
                        "404": _error("No such index or image, or its file is gone."),
                        "409": _error("The index cannot be read now."),
                        "415": _error("The file is not an image (any more)."),
                    },
                }
            },
            "/api/indexes/{name}/images/{image_id}/info": {
                "get": {
                    "summary": "An indexed image's path, size, format and date.",
                    "parameters": [_NAME, _ID],
                    "responses": {
                        "200": _json("About the file.", "ImageInfo"),
                        "400": _error("Not an image id."),
                        "403": _error("The file lies outside the dataset."),
                        "404": _error("No such index or image, or its file is gone."),
                        "409": _error("The index cannot be read now."),
                    },
                }
            },
            "/api/indexes/{name}/images/{image_id}/thumbnail": {
                "get": {
                    "summary": "A JPEG thumbnail of an indexed image.",
                    "parameters": [
                        _NAME,
                        _ID,
                        {
                            "name": "side",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 16,
                                "maximum": 512,
                            },
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "A JPEG at most side x side.",
                            "content": {"image/jpeg": {"schema": {"type": "string"}}},
                        },
                        "400": _error("Not an image id, or a bad side."),
                        "403": _error("The file lies outside the dataset."),
                        "404": _error("No such index or image, or it is unreadable."),
                        "409": _error("The index cannot be read now."),
                    },
                }
            },
            "/api/indexes/{name}/duplicates": {
                "get": {
                    "summary": "The report `imgindex duplicates --save` kept, one "
                    "page of groups at a time.",
                    "parameters": [
                        _NAME,
                        {
                            "name": "offset",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                    ],
                    "responses": {
                        "200": _json("The report.", "Duplicates"),
                        "400": _error("A bad offset or limit."),
                        "404": _error("No such index, or no report saved for it."),
                        "409": _error("The saved report is unreadable."),
                    },
                }
            },
            "/api/datasets": {
                "get": {
                    "summary": "The dataset folders a build may name.",
                    "responses": {"200": _json("The folders.", "Datasets")},
                }
            },
            "/api/builds": {
                "get": {
                    "summary": "The builds started through this service.",
                    "responses": {"200": _json("The builds.", "BuildList")},
                },
                "post": {
                    "summary": "Start building indexes of dataset folders; answers "
                    "at once with the build's id.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/BuildRequest"}
                            }
                        },
                    },
                    "responses": _build_started(),
                },
            },
            "/api/builds/{build_id}": {
                "get": {
                    "summary": "A build's progress (the --progress-file JSON).",
                    "parameters": [_BUILD_ID],
                    "responses": {
                        "200": _json("The build.", "Build"),
                        "404": _error("No such build."),
                    },
                },
                "delete": {
                    "summary": "Cancel a running build; its finished work is kept.",
                    "parameters": [_BUILD_ID],
                    "responses": {
                        "202": _json("Stopping (or already over).", "Build"),
                        "404": _error("No such build."),
                    },
                },
            },
            "/api/build_index": {
                "post": {
                    "summary": "The Flask service's build request, for its old "
                    "clients; follow the answer's build_id at /api/builds/ID.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "$ref": "#/components/schemas/LegacyBuildRequest"
                                }
                            }
                        },
                    },
                    "responses": _build_started(),
                },
            },
        },
    }
