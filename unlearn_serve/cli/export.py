"""`unlearn-serve export`: merge a UOE expert patch into a full Hugging Face checkpoint."""

from __future__ import annotations

import argparse

from unlearn_serve.cli.uoe_common import add_model_options


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--uoe", required=True, help="UOE artifact directory (from train-uoe)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write (replaced atomically)")


def run(args: argparse.Namespace) -> int:
    from unlearn_serve.artifact import atomic_artifact_dir, load_manifest
    from unlearn_serve.cli.uoe_common import load_moe_model
    from unlearn_serve.expert_patch import merge_patch_into

    load_manifest(args.uoe)  # a bad artifact path fails before the model loads
    model, tokenizer, _ = load_moe_model(args)
    patch, _ = merge_patch_into(model, args.uoe, model_name=args.model)
    with atomic_artifact_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"wrote {args.out}: {args.model} with layer {patch.layer} expert {patch.expert} unlearned (merged)")
    return 0
