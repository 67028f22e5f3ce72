"""The `seedoss` console script: the model-library commands (seedoss/cli.py) plus the Serve app (`serve`) and the
KubeRay manifests (`k8s render`), which live here because `seedoss/` imports nothing from `deployments/`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seedoss.cli import add_model_commands, ensure_demo_checkpoint, run

EXAMPLES = {
    "generate": {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0},
    "classify": {"inputs": ["what a lovely day", "this is terrible"]},
    "tag": {"inputs": "Ada Lovelace met Charles Babbage in London.", "aggregation_strategy": "simple"},
    "answer": {"question": "Where did they meet?", "context": "Ada Lovelace met Charles Babbage in London."},
}


def _serve(args) -> None:
    import signal
    import time

    import ray
    from ray import serve

    from . import serve_env
    from .app import build_app
    from .config import REQUEST_TIMEOUT_S

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_demo_checkpoint()
    signals: list[int] = []
    # The handler only records the signal: it may interrupt the main thread anywhere (a threading.Event set from it
    # can deadlock on the Event's own lock). Installed before the deploy: a KeyboardInterrupt raised inside Ray's
    # calls during `serve.run` can be deferred and lost there, leaving a server that ignored its Ctrl-C; recorded,
    # it stops the server as soon as `serve.run` returns. The loop below wakes up now and then because a signal the
    # kernel hands to one of Ray's threads only runs the handler once the main thread runs bytecode again.
    deployed = False

    def on_signal(signum, _frame):
        if signals and not deployed:  # a second one while `serve.run` still waits (a deploy that cannot finish)
            raise KeyboardInterrupt
        signals.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.ray_address is None:  # the Ray instance we start inherits Serve's switches (a joined one has its own)
        serve_env.apply()
    ray.init(address=args.ray_address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": REQUEST_TIMEOUT_S},
                proxy_location="HeadOnly",
                grpc_options={"port": args.grpc_port,
                              "grpc_servicer_functions": ["seedoss.proto.seedoss.v1.seedoss_pb2_grpc.add_SeedOssServicer_to_server"]})
    low, _, high = args.lanes.partition(":")
    lanes = {"min": int(low), "max": int(high or low)}
    print(f"deploying {args.num_stages} stages x {args.lanes} lane(s) + heads from {checkpoint} (first start takes a "
          "minute) …", file=sys.stderr)
    serve.run(build_app({"checkpoint": str(checkpoint), "num_stages": args.num_stages, "dtype": args.dtype,
                         "lanes": lanes, "generation": {"backend": args.backend}}), name="seedoss", route_prefix="/")
    deployed = True
    if not signals:
        _banner(args)
    while not signals:
        time.sleep(0.5)
    print("shutting down …", file=sys.stderr)
    serve.shutdown()
    ray.shutdown()


def _banner(args) -> None:
    import json

    base = f"http://{'localhost' if args.host in ('0.0.0.0', '127.0.0.1') else args.host}:{args.port}"
    print(f"\nSeedOss Serve is up at {base}  (health: {base}/health, API docs: {base}/docs)\n")
    print(f"gRPC: {base.split('//')[1].rsplit(':', 1)[0]}:{args.grpc_port}  (service seedoss.v1.SeedOss, "
          "proto/seedoss/v1/seedoss.proto; metadata application=seedoss)\n")
    for route, body in EXAMPLES.items():
        print(f"curl -s {base}/v1/{route} -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
    print("\nCtrl-C stops the server.")


def _lanes_arg(text: str) -> str:
    low, sep, high = text.partition(":")
    if not low.isdigit() or int(low) < 1 or (sep and (not high.isdigit() or int(high) < int(low))):
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return text


def _k8s_render(args) -> None:
    from .k8s import render

    render(args.overlay, args.out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="seedoss", description="SeedOss Serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_commands(sub)
    p = sub.add_parser("serve", help="run the Ray Serve app (2 stages + 4 heads) on a local or given Ray cluster")
    p.add_argument("--checkpoint", help="HF checkpoint directory (default: the demo one, created if absent)")
    p.add_argument("--num-stages", type=int, default=2)
    p.add_argument("--lanes", default="1", type=_lanes_arg,
                   help="generation lanes (engine + one replica per stage): N, or MIN:MAX to autoscale on load")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="seedoss", choices=["seedoss", "vllm"],
                   help="the generation engine: ours over the stage deployments, or vLLM's AsyncLLM with pipeline "
                        "parallel degree --num-stages (needs .venv-vllm: scripts/install.sh vllm)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000, help="Serve's gRPC proxy port")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.set_defaults(func=_serve)

    p = sub.add_parser("k8s", help="KubeRay manifests (k8s/): render the overlays' generated serveConfigV2")
    k8s = p.add_subparsers(dest="k8s_command", required=True)
    p = k8s.add_parser("render", help="print each overlay's serve-config.yaml (from its AppConfig, deployments/k8s.py)")
    p.add_argument("--overlay", help="cpu-demo, gpu-pipeline or gpu-vllm (default: all)")
    p.add_argument("--out", help="overlays directory to write <overlay>/serve-config.yaml into, e.g. k8s/overlays")
    p.set_defaults(func=_k8s_render)

    run(parser, argv)


if __name__ == "__main__":
    main()
