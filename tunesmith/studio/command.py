"""`tunesmith studio [--runs out/] [--port 7860] [--host 127.0.0.1] [--api-key KEY]`."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from tunesmith.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    made = argparse.ArgumentParser(prog="tunesmith studio", description="the whole job in a browser: runs, "
                                   "new run, compare, chat, ship")
    made.add_argument("--runs", default="out", help="folder of run directories (default: out)")
    made.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    made.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    made.add_argument("--api-key", default=os.environ.get("TUNESMITH_STUDIO_KEY"),
                      help="key a browser must give (?token=KEY); needed off loopback (env TUNESMITH_STUDIO_KEY)")
    return made


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not loopback(args.host) and not args.api_key:
        raise ConfigError(f"--host {args.host} lets other machines in: give --api-key KEY (or set "
                          "TUNESMITH_STUDIO_KEY), then open the page with ?token=KEY")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: a port is 1..65535")
    root = Path(args.runs)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--runs {root}: not a folder")
    try:
        import uvicorn

        from tunesmith.studio.app import create_app
    except ImportError as err:
        raise ConfigError(f"the studio needs its extra: pip install 'tunesmith[studio]' ({err})") from None
    app = create_app(root, args.api_key)
    token = f"/?token={args.api_key}" if args.api_key else "/"
    print(f"tunesmith studio: http://{args.host}:{args.port}{token}  (runs in {root.resolve()}; Ctrl-C stops the "
          "page, not the runs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
