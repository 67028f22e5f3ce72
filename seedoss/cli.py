"""`seedoss` command line: demo checkpoints, in-process generation, the Serve app, capacity planning, k8s rendering."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CHECKPOINT = Path.home() / ".cache" / "seedoss" / "demo-tiny"


def _demo_checkpoint(args) -> None:
    from .demo import write_demo_checkpoint

    path = write_demo_checkpoint(args.dir, args.preset, seed=args.seed, heads=not args.no_heads, overwrite=args.overwrite)
    print(f"wrote {args.preset} demo checkpoint to {path}")


def ensure_demo_checkpoint(path: Path = DEFAULT_CHECKPOINT) -> Path:
    """The embedded default: create the tiny demo checkpoint on first use."""
    from .demo import write_demo_checkpoint

    if not (path / "config.json").exists():
        print(f"creating the demo checkpoint in {path} …", file=sys.stderr)
        write_demo_checkpoint(path)
    return path


def _generate(args) -> None:
    import asyncio

    from .engine import LLMEngine
    from .sampling import SamplingParams

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_demo_checkpoint()
    engine = LLMEngine.from_checkpoint(checkpoint, num_stages=args.num_stages, dtype=args.dtype)
    tokenizer = engine.tokenizer
    ids = (tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True) if args.chat
           else tokenizer.encode(args.prompt))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=args.stop or [])

    async def stream() -> None:
        try:
            async for out in engine.generate(ids, params):
                for choice in out.outputs:
                    print(choice.text, end="", flush=True)
        finally:
            await engine.shutdown()
        print()

    asyncio.run(stream())


EXAMPLES = {
    "generate": {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0},
    "classify": {"inputs": ["what a lovely day", "this is terrible"]},
    "tag": {"inputs": "Ada Lovelace met Charles Babbage in London.", "aggregation_strategy": "simple"},
    "answer": {"question": "Where did they meet?", "context": "Ada Lovelace met Charles Babbage in London."},
}


def _serve(args) -> None:
    import json
    import signal
    import time

    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import REQUEST_TIMEOUT_S

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_demo_checkpoint()
    ray.init(address=args.ray_address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": REQUEST_TIMEOUT_S},
                proxy_location="HeadOnly",
                grpc_options={"port": args.grpc_port,
                              "grpc_servicer_functions": ["proto.seedoss.v1.seedoss_pb2_grpc.add_SeedOssServicer_to_server"]})
    low, _, high = args.lanes.partition(":")
    lanes = {"min": int(low), "max": int(high or low)}
    print(f"deploying {args.num_stages} stages x {args.lanes} lane(s) + heads from {checkpoint} (first start takes a "
          "minute) …", file=sys.stderr)
    serve.run(build_app({"checkpoint": str(checkpoint), "num_stages": args.num_stages, "dtype": args.dtype,
                         "lanes": lanes, "generation": {"backend": args.backend}}), name="seedoss", route_prefix="/")
    base = f"http://{'localhost' if args.host in ('0.0.0.0', '127.0.0.1') else args.host}:{args.port}"
    print(f"\nSeedOss Serve is up at {base}  (health: {base}/health, API docs: {base}/docs)\n")
    print(f"gRPC: {base.split('//')[1].rsplit(':', 1)[0]}:{args.grpc_port}  (service seedoss.v1.SeedOss, "
          "proto/seedoss/v1/seedoss.proto; metadata application=seedoss)\n")
    for route, body in EXAMPLES.items():
        print(f"curl -s {base}/v1/{route} -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
    print("\nCtrl-C stops the server.")
    signals: list[int] = []
    # The handler only records the signal: it may interrupt the main thread anywhere (a threading.Event set from it
    # can deadlock on the Event's own lock). The loop wakes up now and then because a signal the kernel hands to one
    # of Ray's threads only runs the handler once the main thread runs bytecode again.
    signal.signal(signal.SIGINT, lambda signum, _: signals.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _: signals.append(signum))
    while not signals:
        time.sleep(0.5)
    print("shutting down …", file=sys.stderr)
    serve.shutdown()
    ray.shutdown()


def _lanes_arg(text: str) -> str:
    low, sep, high = text.partition(":")
    if not low.isdigit() or int(low) < 1 or (sep and (not high.isdigit() or int(high) < int(low))):
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return text


def _plan(args) -> None:
    from .config import SeedOssConfig
    from .planner import plan

    layers = [int(n) for n in args.layers_per_stage.split(",")] if args.layers_per_stage else None
    print(plan(SeedOssConfig.from_pretrained(args.config), args.dtype, num_stages=args.num_stages,
               layers_per_stage=layers, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem,
               mem_util=args.mem_util, min_kv_tokens=args.min_kv_tokens, nodes=args.nodes).table())


def _k8s_render(args) -> None:
    from deployments.k8s import render

    render(args.overlay, args.out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="seedoss", description="SeedOss Serve")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-checkpoint", help="write a deterministic tiny/small SeedOss checkpoint (HF layout)")
    p.add_argument("dir")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-heads", action="store_true", help="skip the classify/tag/qa head checkpoints")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_demo_checkpoint)

    p = sub.add_parser("generate", help="generate text in-process (no Ray)")
    p.add_argument("prompt")
    p.add_argument("--checkpoint", help=f"HF checkpoint directory (default: the demo one, {DEFAULT_CHECKPOINT})")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--num-stages", type=int, default=1, help="pipeline stages (threads in this process)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.set_defaults(func=_generate)

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

    p = sub.add_parser("plan", help="capacity plan: weights, KV cache and max tokens per pipeline stage (one GPU each)")
    p.add_argument("--config", required=True, help="the model's config.json (or its checkpoint directory)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-stages", type=int, help="balanced stages (default: the suggested, smallest split that fits)")
    p.add_argument("--layers-per-stage", help="explicit split, e.g. 15,17,17,15")
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-mem", type=float, required=True, help="GiB of memory per GPU")
    p.add_argument("--mem-util", type=float, default=0.9, help="fraction of GPU memory for weights + KV cache")
    p.add_argument("--min-kv-tokens", type=int, default=0,
                   help="a stage fits only with room for this many tokens of KV cache besides its weights")
    p.add_argument("--nodes", type=int, help="GPU nodes available: report how many generation lanes they hold")
    p.set_defaults(func=_plan)

    p = sub.add_parser("k8s", help="KubeRay manifests (k8s/): render the overlays' generated serveConfigV2")
    k8s = p.add_subparsers(dest="k8s_command", required=True)
    p = k8s.add_parser("render", help="print each overlay's serve-config.yaml (from its AppConfig, deployments/k8s.py)")
    p.add_argument("--overlay", help="cpu-demo, gpu-pipeline or gpu-vllm (default: all)")
    p.add_argument("--out", help="overlays directory to write <overlay>/serve-config.yaml into, e.g. k8s/overlays")
    p.set_defaults(func=_k8s_render)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad input: say what, no traceback
        parser.exit(2, f"seedoss {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
