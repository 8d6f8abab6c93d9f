"""The `edgekit` command line. Each command is a (configure, run) pair in COMMANDS; heavy modules are
imported inside the run functions so that commands on a bundle never import torch.

A ToolkitError becomes one line on stderr and a non-zero exit; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ToolkitError


def _add_sampling(p: argparse.ArgumentParser):
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


# --- train -----------------------------------------------------------------------------------------
def configure_train(p):
    p.add_argument("recipe", help="recipe name in models/ (tiny, small, teacher, moe-tiny) or a .toml path")
    p.add_argument("--corpus", help="text file, folder of .txt files, or .jsonl with a 'text' field (default: embedded corpus)")
    p.add_argument("--steps", type=int, help="total optimizer steps of the run (a resumed run continues up to this)")
    p.add_argument("--out", default=None, help="run folder (default runs/RECIPE)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--init", metavar="CHECKPOINT", help="fine-tune: start from this checkpoint's weights and tokenizer")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a recipe key")
    p.add_argument("--no-progress", action="store_true")


def run_train(a):
    from .config import load_recipe
    from .train import train

    overrides = list(a.set)
    if a.steps is not None:
        overrides.append(f"training.steps={a.steps}")
    if a.seed is not None:
        overrides.append(f"training.seed={a.seed}")
    recipe = load_recipe(a.recipe, overrides)
    out = a.out or f"runs/{recipe.name}"
    ckpt = train(recipe, out, corpus=a.corpus, resume=a.resume, overwrite=a.overwrite, init_from=a.init,
                 progress=not a.no_progress)
    print(f"checkpoint: {ckpt}")


# --- generate --------------------------------------------------------------------------------------
def configure_generate(p):
    p.add_argument("source", help="a checkpoint (or run folder) or a bundle")
    p.add_argument("prompt")
    _add_sampling(p)
    p.add_argument("--target", default="cpu", help="bundle only: target profile (default cpu)")
    p.add_argument("--precision", default="fp32", help="bundle only: model variant (default fp32)")


def run_generate(a):
    from pathlib import Path

    if (Path(a.source) / "manifest.json").is_file():
        from . import runtime

        session = runtime.load(a.source, target=a.target, precision=a.precision)
        stream = session.stream(a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    else:
        from .sources import generate_text

        stream = generate_text(a.source, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                               top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    sys.stdout.write(a.prompt)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# --- explain ---------------------------------------------------------------------------------------
def configure_explain(p):
    p.add_argument("checkpoint")
    p.add_argument("prompt")


def run_explain(a):
    from .explain import render
    from .sources import load_reference, check_prompt

    model, tok = load_reference(a.checkpoint)
    check_prompt(model.cfg, tok, a.prompt)
    print(render(model, tok, a.prompt))


COMMANDS = {
    "train": (configure_train, run_train, "train a model from a recipe"),
    "generate": (configure_generate, run_generate, "generate text from a checkpoint or a bundle"),
    "explain": (configure_explain, run_explain, "walk one prompt through the model, layer by layer"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgekit", description="Train, export, quantize and verify compact transformers for edge targets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args._run(args)
    except ToolkitError as exc:
        print(f"edgekit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
