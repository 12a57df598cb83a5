"""The HTTP + websocket server: ComfyUI's ``server.py`` routes, bodies and message routing.

Every route is registered once and again under ``/api`` (``/internal/*`` is not aliased). Messages from
the worker thread go through ``send_sync`` -> the loop's queue -> one publisher task, so their order is
the order they were produced. A websocket's client id maps to one socket; a reconnect with the same id
replaces the old socket, and (as in ComfyUI) when the *old* socket closes it removes the id from the map,
taking the new socket's registration with it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid
from typing import Any

from aiohttp import WSMsgType, web

import execution
import faults
import folder_paths
import nodes
import runtime
import system_info
import uploads
from prompt_queue import PromptQueue
from validation import validate_prompt


class PromptServer:
    """State shared by the routes, the websocket handler and the worker thread."""

    instance: "PromptServer | None" = None

    def __init__(self, loop: asyncio.AbstractEventLoop, args: Any) -> None:
        PromptServer.instance = self
        self.loop = loop
        self.args = args
        self.messages: asyncio.Queue = asyncio.Queue()
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.sockets_metadata: dict[str, dict] = {}
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.number = 0
        self.prompt_queue = PromptQueue(self)
        self.max_upload_size = round(args.max_upload_size * 1024 * 1024)
        self.routes = web.RouteTableDef()
        self._add_routes()
        self.app = web.Application(client_max_size=self.max_upload_size, middlewares=self._middlewares())

    # ----------------------------------------------------------------------------------- messaging
    def features(self) -> dict:
        # ComfyUI's feature flags carry the unrounded product (10485.76 for --max-upload-size 0.01)
        return {"supports_preview_metadata": True, "max_upload_size": self.args.max_upload_size * 1024 * 1024}

    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self.prompt_queue.get_tasks_remaining()}}

    def queue_updated(self) -> None:
        self.send_sync("status", {"status": self.queue_info()})

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        """Thread-safe: enqueue a message for the publisher task (keeps production order)."""
        self.loop.call_soon_threadsafe(self.messages.put_nowait, (event, data, sid))

    async def send(self, event: str, data: Any, sid: str | None = None) -> None:
        message = {"type": event, "data": data}
        if sid is None:
            for ws in list(self.sockets.values()):
                await _send_json_quietly(ws, message)
        elif sid in self.sockets:
            await _send_json_quietly(self.sockets[sid], message)

    async def publish_loop(self) -> None:
        while True:
            event, data, sid = await self.messages.get()
            if event is None:  # a flush marker: everything queued before it has been written
                data.set()
                continue
            await self.send(event, data, sid)

    def flush_sync(self, timeout: float = 2.0) -> None:
        """Thread-safe: wait until every message queued so far has been written to the sockets.

        An injected crash uses it so that the node's ``executing`` event is out before the process dies, as it
        would be on a real ComfyUI, whose nodes take at least milliseconds before they can fail.
        """
        done = threading.Event()
        self.loop.call_soon_threadsafe(self.messages.put_nowait, (None, done, None))
        done.wait(timeout)

    # ----------------------------------------------------------------------------------- middleware
    def _middlewares(self) -> list:
        middlewares = [request_log_middleware]
        if self.args.enable_cors_header:
            middlewares.append(create_cors_middleware(self.args.enable_cors_header))
        else:
            middlewares.append(origin_only_middleware)
        return middlewares

    # ----------------------------------------------------------------------------------- routes
    def _add_routes(self) -> None:
        r = self.routes
        r.get("/ws")(self.websocket_handler)
        r.get("/embeddings")(self.get_embeddings)
        r.get("/models")(self.list_model_types)
        r.get("/models/{folder}")(self.get_models)
        r.get("/extensions")(self.get_extensions)
        r.post("/upload/image")(self.upload_image)
        r.post("/upload/mask")(self.upload_mask)
        r.get("/view")(self.view_image)
        r.get("/view_metadata/{folder_name}")(self.view_metadata)
        r.get("/system_stats")(self.system_stats)
        r.get("/features")(self.get_features)
        r.get("/prompt")(self.get_prompt)
        r.get("/object_info")(self.get_object_info)
        r.get("/object_info/{node_class}")(self.get_object_info_node)
        r.get("/history")(self.get_history)
        r.get("/history/{prompt_id}")(self.get_history_item)
        r.get("/queue")(self.get_queue)
        r.post("/prompt")(self.post_prompt)
        r.post("/queue")(self.post_queue)
        r.post("/interrupt")(self.post_interrupt)
        r.post("/free")(self.post_free)
        r.post("/history")(self.post_history)
        r.get("/users")(self.get_users)
        r.get("/settings")(self.get_settings)
        r.post("/settings")(self.post_settings)
        r.get("/settings/{id}")(self.get_setting)
        r.post("/settings/{id}")(self.post_setting)
        r.get("/experiment/models")(self.experiment_models)

    def build_app(self) -> web.Application:
        """Routes, their /api aliases, the /internal sub-app and a ComfyUI-like 404 for everything else."""
        api_routes = web.RouteTableDef()
        for route in self.routes:
            if isinstance(route, web.RouteDef):
                api_routes.route(route.method, "/api" + route.path)(route.handler, **route.kwargs)
        self.app.add_routes(api_routes)
        self.app.add_routes(self.routes)
        internal = web.Application()
        internal.add_routes([web.get("/folder_paths", self.internal_folder_paths),
                             web.get("/files/{directory_type}", self.internal_files),
                             web.get("/logs", self.internal_logs)])
        self.app.add_subapp("/internal", internal)
        self.app.router.add_route("*", "/{tail:.*}", not_found)
        return self.app

    async def websocket_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self.sockets_metadata[sid] = {"feature_flags": {}}
        try:
            await self.send("status", {"status": self.queue_info(), "sid": sid}, sid)
            if self.client_id == sid and self.last_node_id is not None:
                await self.send("executing", {"node": self.last_node_id}, sid)
            first_message = True
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    logging.warning("ws connection closed with exception %s", ws.exception())
                elif msg.type == WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                        if first_message and isinstance(data, dict) and data.get("type") == "feature_flags":
                            self.sockets_metadata.get(sid, {})["feature_flags"] = data.get("data", {})
                            await self.send("feature_flags", self.features(), sid)
                        first_message = False
                    except json.JSONDecodeError:
                        logging.warning(f"Invalid JSON received from client {sid}: {msg.data}")
        finally:
            self.sockets.pop(sid, None)
            self.sockets_metadata.pop(sid, None)
        return ws

    async def get_embeddings(self, request: web.Request) -> web.Response:
        names = folder_paths.get_filename_list("embeddings")
        return web.json_response([os.path.splitext(a)[0] for a in names])

    async def list_model_types(self, request: web.Request) -> web.Response:
        return web.json_response(list(folder_paths.folder_names_and_paths.keys()))

    async def get_models(self, request: web.Request) -> web.Response:
        folder = request.match_info.get("folder", None)
        if folder not in folder_paths.folder_names_and_paths:
            return web.Response(status=404)
        return web.json_response(folder_paths.get_filename_list(folder))

    async def get_extensions(self, request: web.Request) -> web.Response:
        files = list(system_info.FRONTEND_CORE_EXTENSIONS)
        for name, web_dir in nodes.EXTENSION_WEB_DIRS.items():
            for root, _dirs, filenames in os.walk(web_dir):
                for f in filenames:
                    if f.endswith(".js"):
                        rel = os.path.relpath(os.path.join(root, f), web_dir).replace(os.sep, "/")
                        files.append(f"/extensions/{urllib.parse.quote(name)}/{rel}")
        return web.json_response(files)

    async def upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        return uploads.image_upload(post, hashing=self.args.default_hashing_function)

    async def upload_mask(self, request: web.Request) -> web.Response:
        post = await request.post()
        return uploads.image_upload(post, uploads.mask_save_function, hashing=self.args.default_hashing_function)

    async def view_image(self, request: web.Request) -> web.StreamResponse:
        return uploads.view(request.rel_url.query)

    async def view_metadata(self, request: web.Request) -> web.Response:
        return uploads.view_metadata(request.match_info["folder_name"], request.rel_url.query.get("filename"))

    async def system_stats(self, request: web.Request) -> web.Response:
        return web.json_response(system_info.system_stats())

    async def get_features(self, request: web.Request) -> web.Response:
        return web.json_response(self.features())

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue_info())

    async def get_object_info(self, request: web.Request) -> web.Response:
        out = {}
        for node_class in list(nodes.NODE_CLASS_MAPPINGS):
            try:
                out[node_class] = nodes.node_info(node_class)
            except Exception:  # noqa: BLE001 - ComfyUI logs and skips a node whose info fails
                logging.exception(f"[ERROR] An error occurred while retrieving information for the "
                                  f"'{node_class}' node.")
        return web.json_response(out)

    async def get_object_info_node(self, request: web.Request) -> web.Response:
        node_class = request.match_info.get("node_class", None)
        out = {}
        if node_class is not None and node_class in nodes.NODE_CLASS_MAPPINGS:
            out[node_class] = nodes.node_info(node_class)
        return web.json_response(out)

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = request.rel_url.query.get("max_items", None)
        if max_items is not None:
            max_items = int(max_items)
        offset = request.rel_url.query.get("offset", None)
        offset = int(offset) if offset is not None else -1
        return web.json_response(self.prompt_queue.get_history(max_items=max_items, offset=offset))

    async def get_history_item(self, request: web.Request) -> web.Response:
        return web.json_response(self.prompt_queue.get_history(prompt_id=request.match_info.get("prompt_id")))

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending = self.prompt_queue.get_current_queue()
        return web.json_response({"queue_running": [list(i[:5]) for i in running],
                                  "queue_pending": [list(i[:5]) for i in pending]})

    async def post_prompt(self, request: web.Request) -> web.Response:
        logging.info("got prompt")
        json_data = await request.json()
        if "number" in json_data:
            number = float(json_data["number"])
        else:
            number = self.number
            if "front" in json_data and json_data["front"]:
                number = -number
            self.number += 1
        if "prompt" not in json_data:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                     "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        partial = json_data.get("partial_execution_targets")
        valid = validate_prompt(prompt, partial)
        extra_data = json_data.get("extra_data", {})
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if valid[0]:
            self.prompt_queue.put((number, prompt_id, prompt, extra_data, valid[2]))
            return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": valid[3]})
        logging.warning("invalid prompt: {}".format(valid[1]))
        return web.json_response({"error": valid[1], "node_errors": valid[3]}, status=400)

    async def post_queue(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.prompt_queue.wipe_queue()
        if "delete" in json_data:
            for id_to_delete in json_data["delete"]:
                self.prompt_queue.delete_queue_item(lambda a, i=id_to_delete: a[1] == i)
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            json_data = await request.json()
        except json.JSONDecodeError:
            json_data = {}
        prompt_id = json_data.get("prompt_id")
        if prompt_id:
            running, _ = self.prompt_queue.get_current_queue()
            if any(item[1] == prompt_id for item in running):
                logging.info(f"Interrupting prompt {prompt_id}")
                runtime.interrupt_current_processing(True)
            else:
                logging.info(f"Prompt {prompt_id} is not currently running, skipping interrupt")
        else:
            logging.info("Global interrupt (no prompt_id specified)")
            runtime.interrupt_current_processing(True)
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        unload_models = json_data.get("unload_models", False)
        free_memory = json_data.get("free_memory", False)
        if unload_models:
            self.prompt_queue.set_flag("unload_models", unload_models)
        if free_memory:
            self.prompt_queue.set_flag("free_memory", free_memory)
        return web.Response(status=200)

    async def post_history(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.prompt_queue.wipe_history()
        if "delete" in json_data:
            for id_to_delete in json_data["delete"]:
                self.prompt_queue.delete_history_item(id_to_delete)
        return web.Response(status=200)

    async def get_users(self, request: web.Request) -> web.Response:
        user_dir = os.path.join(folder_paths.get_user_directory(), "default")
        return web.json_response({"storage": "server", "migrated": os.path.exists(user_dir)})

    def _settings_file(self) -> str:
        return os.path.join(folder_paths.get_user_directory(), "default", "comfy.settings.json")

    def _load_settings(self) -> dict:
        try:
            with open(self._settings_file(), encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save_settings(self, settings: dict) -> None:
        os.makedirs(os.path.dirname(self._settings_file()), exist_ok=True)
        with open(self._settings_file(), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=4)

    async def get_settings(self, request: web.Request) -> web.Response:
        return web.json_response(self._load_settings())

    async def post_settings(self, request: web.Request) -> web.Response:
        settings = self._load_settings()
        settings.update(await request.json())
        self._save_settings(settings)
        return web.Response(status=200)

    async def get_setting(self, request: web.Request) -> web.Response:
        return web.json_response(self._load_settings().get(request.match_info["id"], None))

    async def post_setting(self, request: web.Request) -> web.Response:
        settings = self._load_settings()
        settings[request.match_info["id"]] = await request.json()
        self._save_settings(settings)
        return web.Response(status=200)

    async def experiment_models(self, request: web.Request) -> web.Response:
        return web.json_response([{"name": k, "folders": v[0]} for k, v in folder_paths.folder_names_and_paths.items()
                                  if k not in ("configs", "custom_nodes")])

    async def internal_folder_paths(self, request: web.Request) -> web.Response:
        return web.json_response({k: v[0] for k, v in folder_paths.folder_names_and_paths.items()})

    async def internal_files(self, request: web.Request) -> web.Response:
        directory_type = request.match_info["directory_type"]
        if directory_type not in ("output", "input", "temp"):
            return web.json_response({"error": "Invalid directory type"}, status=400)
        directory = folder_paths.get_directory_by_type(directory_type)
        try:
            entries = [e for e in os.scandir(directory) if e.is_file()]  # dot files too, as ComfyUI lists them
        except FileNotFoundError:
            entries = []
        entries.sort(key=lambda e: -e.stat().st_mtime)
        return web.json_response([e.name for e in entries])

    async def internal_logs(self, request: web.Request) -> web.Response:
        return web.json_response("")


async def not_found(request: web.Request) -> web.Response:
    """What ComfyUI's static catch-all answers for an unknown path: 404, empty octet-stream body."""
    return web.Response(status=404, body=b"", content_type="application/octet-stream")


async def _send_json_quietly(ws: web.WebSocketResponse, message: dict) -> None:
    try:
        await ws.send_str(json.dumps(message))
    except (ConnectionError, RuntimeError) as err:
        logging.warning("send error: %s", err)


@web.middleware
async def request_log_middleware(request: web.Request, handler):
    """STANDIN_REQUEST_LOG: one JSON line per request (and ws connect), written before handling."""
    path = faults.request_log_path()
    if path:
        line = json.dumps({"t": time.time(), "method": request.method, "path": request.path,
                           "query": request.query_string})
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass
    return await handler(request)


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    loopback = False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            for _fam, _, _, _, sockaddr in socket.getaddrinfo(host, None, family, socket.SOCK_STREAM):
                if not ipaddress.ip_address(sockaddr[0]).is_loopback:
                    return loopback
                loopback = True
        except socket.gaierror:
            pass
    return loopback


@web.middleware
async def origin_only_middleware(request: web.Request, handler):
    """Refuse (403, empty) browser requests whose Origin differs from a loopback Host (anti-CSRF)."""
    if "Host" in request.headers and "Origin" in request.headers:
        host_domain = request.headers["Host"].lower()
        parsed = urllib.parse.urlparse(request.headers["Origin"])
        origin_domain = parsed.netloc.lower()
        host_parsed = urllib.parse.urlsplit("//" + host_domain)
        loopback = is_loopback(host_parsed.hostname)
        if parsed.port is None:
            host_domain = host_parsed.hostname
        if host_parsed.port is None:
            origin_domain = parsed.hostname
        if loopback and host_domain and origin_domain and host_domain != origin_domain:
            logging.warning("WARNING: request with non matching host and origin {} != {}, returning 403".format(
                host_domain, origin_domain))
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def create_cors_middleware(allowed_origin: str):
    @web.middleware
    async def cors_middleware(request: web.Request, handler):
        response = web.Response() if request.method == "OPTIONS" else await handler(request)
        response.headers["Access-Control-Allow-Origin"] = allowed_origin
        response.headers["Access-Control-Allow-Methods"] = "POST, GET, DELETE, PUT, OPTIONS, PATCH"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        return response
    return cors_middleware


def prompt_worker(server: PromptServer) -> None:
    """The single execution thread: one prompt at a time, then the /free flags (ComfyUI's main.py)."""
    q = server.prompt_queue
    executor = execution.PromptExecutor(server)
    while True:
        queue_item = q.get(timeout=1000.0)
        if queue_item is not None:
            item, item_id = queue_item
            started = time.perf_counter()
            prompt_id = item[1]
            server.last_prompt_id = prompt_id
            try:
                executor.execute(item[2], prompt_id, dict(item[3]), item[4])
            except Exception:  # noqa: BLE001 - a stand-in bug must not wedge the queue silently
                logging.exception("[standin] internal error while executing prompt %s", prompt_id)
                executor.success = False
                executor.history_result = {"outputs": {}, "meta": {}}
            status = {"status_str": "success" if executor.success else "error",
                      "completed": executor.success, "messages": executor.status_messages}
            q.task_done(item_id, executor.history_result, status=status, process_item=_remove_sensitive)
            if server.client_id is not None:
                server.send_sync("executing", {"node": None, "prompt_id": prompt_id}, server.client_id)
            logging.info("Prompt executed in {:.2f} seconds".format(time.perf_counter() - started))
        flags = q.get_flags()
        free_memory = flags.get("free_memory", False)
        if flags.get("unload_models", free_memory):
            logging.info("unloading all models")
        if free_memory:
            executor.reset()


def _remove_sensitive(item: tuple) -> tuple:
    """History keeps the queue item without the API keys API nodes may carry in extra_data."""
    extra = {k: v for k, v in item[3].items() if k not in execution.SENSITIVE_EXTRA_DATA_KEYS}
    return (item[0], item[1], item[2], extra, item[4])


def hang_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """For STANDIN_NODE_FAULT=...:hang: park the event loop thread so nothing is answered any more."""
    loop.call_soon_threadsafe(faults.hang_forever)

