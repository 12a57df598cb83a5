"""Stand-in ComfyUI: start it exactly like ComfyUI's ``main.py`` (same flags, same defaults, same logs).

    python main.py --listen 127.0.0.1 --port 8188 --cpu --output-directory D --input-directory D \
        --temp-directory D --user-directory D --database-url sqlite:///F --extra-model-paths-config F

See README.md for what is faithful, what is synthetic, and the STANDIN_* fault-injection variables.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the stand-in's tree may be read-only; never write into it unasked

import asyncio  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import cli_args  # noqa: E402
import faults  # noqa: E402
import folder_paths  # noqa: E402
import runtime  # noqa: E402

STANDIN_DIR = os.path.dirname(os.path.realpath(__file__))
# The one line that is not ComfyUI's: whoever reads the log must not take this for a GPU ComfyUI.
IDENTITY = ("[standin] this is the stand-in ComfyUI (tests/standin), not ComfyUI: no torch, no GPU; model nodes "
            "return synthetic results")


def setup_logging(args) -> None:
    """ComfyUI logs bare messages to stderr (stdout with --log-stdout), INFO unless --verbose."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if hasattr(sys.stderr, "reconfigure"):
        sys.stderr.reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stdout if args.log_stdout else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, str(args.verbose).upper(), logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def load_extra_path_config(yaml_path: str) -> None:
    """utils/extra_config.py: sections of folder keys, optional base_path and is_default."""
    import yaml  # noqa: PLC0415 - only needed when a config is given
    with open(yaml_path, encoding="utf-8") as stream:
        config = yaml.safe_load(stream)
    yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
    for section in (config or {}):
        conf = config[section]
        if conf is None:
            continue
        base_path = None
        if "base_path" in conf:
            base_path = os.path.expandvars(os.path.expanduser(conf.pop("base_path")))
            if not os.path.isabs(base_path):
                base_path = os.path.abspath(os.path.join(yaml_dir, base_path))
        is_default = bool(conf.pop("is_default", False))
        for key in conf:
            for y in str(conf[key]).split("\n"):
                if len(y) == 0:
                    continue
                full_path = y
                if base_path:
                    full_path = os.path.join(base_path, full_path)
                elif not os.path.isabs(full_path):
                    full_path = os.path.abspath(os.path.join(yaml_dir, y))
                normalized = os.path.normpath(full_path)
                logging.info("Adding extra search path {} {}".format(key, normalized))
                folder_paths.add_model_folder_path(key, normalized, is_default)


def apply_custom_paths(args) -> None:
    """main.py's order: base dir, extra_model_paths.yaml files, output dir (+ its model folders), input, user,
    temp."""
    if args.base_directory:
        folder_paths.set_base_path(args.base_directory)
    default_yaml = os.path.join(STANDIN_DIR, "extra_model_paths.yaml")
    if os.path.isfile(default_yaml):
        load_extra_path_config(default_yaml)
    if args.extra_model_paths_config:
        for config_path in itertools.chain(*args.extra_model_paths_config):
            load_extra_path_config(config_path)
    if args.output_directory:
        output_dir = os.path.abspath(args.output_directory)
        logging.info(f"Setting output directory to: {output_dir}")
        folder_paths.set_output_directory(output_dir)
    out = folder_paths.get_output_directory()
    for key, sub in (("checkpoints", "checkpoints"), ("clip", "clip"), ("vae", "vae"),
                     ("diffusion_models", "diffusion_models"), ("loras", "loras")):
        folder_paths.add_model_folder_path(key, os.path.join(out, sub))
    if args.input_directory:
        input_dir = os.path.abspath(args.input_directory)
        logging.info(f"Setting input directory to: {input_dir}")
        folder_paths.set_input_directory(input_dir)
    if args.user_directory:
        user_dir = os.path.abspath(args.user_directory)
        logging.info(f"Setting user directory to: {user_dir}")
        folder_paths.set_user_directory(user_dir)
    if args.temp_directory:
        temp_dir = os.path.join(os.path.abspath(args.temp_directory), "temp")
        logging.info(f"Setting temp directory to: {temp_dir}")
        folder_paths.set_temp_directory(temp_dir)


def cleanup_temp() -> None:
    temp_dir = folder_paths.get_temp_directory()
    if os.path.exists(temp_dir):
        shutil.rmtree(temp_dir, ignore_errors=True)


def init_database(args) -> None:
    """Stand-in for the alembic migrations: create the sqlite file ``--database-url`` names."""
    url = args.database_url or "sqlite:///" + os.path.join(STANDIN_DIR, "user", "comfyui.db")
    try:
        if not url.startswith("sqlite:///"):
            raise ValueError(f"unsupported database url {url}")
        path = url[len("sqlite:///"):]
        if path != ":memory:":
            import sqlite3  # noqa: PLC0415
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with sqlite3.connect(path) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL)")
        logging.info("Context impl SQLiteImpl.")
        logging.info("Will assume non-transactional DDL.")
    except Exception as e:  # noqa: BLE001 - ComfyUI only warns
        logging.error("Failed to initialize database. Please ensure you have installed the latest requirements. If "
                      f"the error persists, please report this as in future the database will be required: {e}")


def log_device_banner() -> None:
    import system_info  # noqa: PLC0415
    total, _free = system_info.memory()
    mb = total // (1024 * 1024)
    logging.info(f"Total VRAM {mb} MB, total RAM {mb} MB")
    logging.info(f"pytorch version: {system_info.PYTORCH_VERSION}")
    logging.info("Set vram state to: DISABLED")
    logging.info("Device: cpu")
    logging.info(f"Python version: {sys.version}")
    logging.info(f"ComfyUI version: {system_info.COMFYUI_VERSION}")
    logging.info(f"ComfyUI frontend version: {system_info.REQUIRED_FRONTEND_VERSION}")


def listen_addresses(args) -> list[str]:
    return [a.strip() for a in args.listen.split(",") if a.strip()]


async def serve(server, app, args) -> None:
    """Bind every --listen address, announce, then run the message publisher forever."""
    from aiohttp import web  # noqa: PLC0415
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ssl_ctx = None
    scheme = "http"
    if args.tls_keyfile and args.tls_certfile:
        import ssl  # noqa: PLC0415
        ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_ctx.load_cert_chain(certfile=args.tls_certfile, keyfile=args.tls_keyfile)
        scheme = "https"
    for address in listen_addresses(args):
        site = web.TCPSite(runner, address, args.port, ssl_context=ssl_ctx)
        await site.start()
        if not args.dont_print_server:
            shown = f"[{address}]" if ":" in address else address
            logging.info("Starting server\n")
            logging.info(f"To see the GUI go to: {scheme}://{shown}:{args.port}")
    print(f"[standin] serving since {time.time():.6f}", file=sys.stderr, flush=True)
    await server.publish_loop()


def main(argv: list[str]) -> int:
    args = cli_args.parse(argv[1:])
    runtime.ARGS = args
    setup_logging(args)
    print(IDENTITY, file=sys.stderr, flush=True)
    faults.apply_start_fault()
    faults.maybe_spawn_grandchild()
    apply_custom_paths(args)
    cleanup_temp()
    log_device_banner()
    import nodes  # noqa: PLC0415
    nodes.init_builtin_nodes()
    nodes.init_external_custom_nodes(args.disable_all_custom_nodes, args.whitelist_custom_nodes)
    init_database(args)
    if args.quick_test_for_ci:
        return 0
    delay = faults.start_delay()
    if delay > 0:
        time.sleep(delay)
    return run_server(args)


def run_server(args) -> int:
    import execution  # noqa: PLC0415
    import server as server_module  # noqa: PLC0415
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = server_module.PromptServer(loop, args)
    app = server.build_app()
    execution.HANG_CALLBACK = lambda: server_module.hang_event_loop(loop)
    threading.Thread(target=server_module.prompt_worker, args=(server,), daemon=True).start()
    try:
        loop.run_until_complete(serve(server, app, args))
    except KeyboardInterrupt:
        logging.info("\nStopped server")
    cleanup_temp()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
