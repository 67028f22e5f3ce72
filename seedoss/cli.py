"""Model-library commands: demo checkpoints, in-process generation, capacity planning. They need no Ray; the
`seedoss` console script (deployments/cli.py) adds the Serve app and k8s rendering."""

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


def _plan(args) -> None:
    from .config import SeedOssConfig
    from .planner import plan

    layers = [int(n) for n in args.layers_per_stage.split(",")] if args.layers_per_stage else None
    print(plan(SeedOssConfig.from_pretrained(args.config), args.dtype, num_stages=args.num_stages,
               layers_per_stage=layers, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem,
               mem_util=args.mem_util, min_kv_tokens=args.min_kv_tokens, nodes=args.nodes).table())


def add_model_commands(sub) -> None:
    """The commands that need only the model library (no Ray): demo-checkpoint, generate, plan."""
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


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """Parse and run a command; bad input exits 2 with the reason and no traceback."""
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad input: say what, no traceback
        parser.exit(2, f"seedoss {args.command}: error: {e}\n")


def main(argv: list[str] | None = None) -> None:
    """The model-only commands (`python -m seedoss.cli`); the `seedoss` console script (deployments/cli.py) adds
    `serve` and `k8s`."""
    parser = argparse.ArgumentParser(prog="seedoss", description="SeedOss Serve (model library commands)")
    add_model_commands(parser.add_subparsers(dest="command", required=True))
    run(parser, argv)


if __name__ == "__main__":
    main()
