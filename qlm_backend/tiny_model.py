"""Build the tiny random-weight Llama that the real CPU vLLM engine serves in tests and demos.

Nothing is downloaded: the architecture is transformers' LlamaConfig, the weights are random
(seeded), and the tokenizer is a byte-level BPE trained with `tokenizers` on a text file shipped in
this package. The engine that runs it is real vLLM (batching, KV cache, priority, abort); the text
it produces is meaningless by design.

Two named models (TINY_MODELS), both served by the CPU fleet's instance, which swaps between them:
`tiny-llama` (2 layers) and `tiny-llama-deep` (the same with 4 layers: twice the layer work and
KV per token, another engine model to load).

Run with the interpreter of .venv-vllm (it has torch, transformers and tokenizers):
    .venv-vllm/bin/python -m qlm_backend.tiny_model              # every named model, .qlm/models/<name>
    .venv-vllm/bin/python -m qlm_backend.tiny_model --name tiny-llama-deep
    .venv-vllm/bin/python -m qlm_backend.tiny_model --out DIR [--hidden-size N] ...
The build is cached: when DIR holds a build of the same spec (sizes, seed, corpus hash) it is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MODELS_DIR = Path(".qlm/models")
DEFAULT_OUT = MODELS_DIR / "tiny-llama"
DEFAULT_CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
# Written last, so a build interrupted half way is never taken for a complete one.
STAMP = "qlm_tiny_model.json"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines the built files; the cache key."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 2000
    # Room for requests that run several seconds on this engine (~1,000 tok/s a stream on 2 cores):
    # the router-over-vLLM eviction and cancel tests need that slack on a loaded machine.
    max_position_embeddings: int = 8192
    seed: int = 0
    corpus_sha256: str = ""

    def validate(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, int) and value <= 0 and name != "seed":
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        # 256 byte symbols plus the special tokens must fit, with room for merges.
        if self.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size must be > {256 + len(SPECIAL_TOKENS)}")


# The named models (hardware.py MODELS has their shapes for the planner): name -> spec overrides.
TINY_MODELS: dict[str, dict[str, int]] = {
    "tiny-llama": {},
    "tiny-llama-deep": {"num_hidden_layers": 4},
}
SPEC_FLAGS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "seed",
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_built(out: Path, spec: TinySpec) -> bool:
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return bool(stamp.get("spec") == asdict(spec))


def _train_tokenizer(corpus: Path, spec: TinySpec, out: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train(
        files=[str(corpus)],
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=spec.max_position_embeddings,
    )
    tok.save_pretrained(str(out))


def _build_model(spec: TinySpec, out: Path, bos_id: int, eos_id: int, pad_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)


def build(out: Path, spec: TinySpec, corpus: Path, force: bool = False) -> bool:
    """Build into `out`; returns False when a matching build was already there."""
    spec.validate()
    if not force and is_built(out, spec):
        return False
    # Build beside the target and move into place: readers never see a half-written model dir.
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _train_tokenizer(corpus, spec, tmp)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp))
    # Every id the model can emit must be a real token, or detokenisation would fail.
    if len(tok) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than vocab_size {spec.vocab_size}")
    _build_model(spec, tmp, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    (tmp / STAMP).write_text(
        json.dumps({"spec": asdict(spec), "tokenizer_tokens": len(tok)}, indent=2) + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return True


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    d = TinySpec()
    ap = argparse.ArgumentParser(
        prog="qlm-build-tiny-model",
        description="Build tiny random-weight Llamas with a locally trained byte-level BPE "
        "tokenizer (nothing downloaded). Cached: an existing build of the same spec is kept. "
        f"Without --name or --out: every named model ({', '.join(TINY_MODELS)}) into "
        f"{MODELS_DIR}/<name>.",
    )
    ap.add_argument("--name", choices=sorted(TINY_MODELS), help="build this named model only")
    ap.add_argument(
        "--out", type=Path, default=None, help=f"output dir (default {MODELS_DIR}/<name>)"
    )
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="tokenizer training text")
    for flag in SPEC_FLAGS:
        ap.add_argument(
            "--" + flag.replace("_", "-"),
            type=int,
            default=None,
            help=f"override the named model's value (tiny-llama: {getattr(d, flag)})",
        )
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = ap.parse_args(argv)

    if not args.corpus.is_file():
        print(f"error: corpus {args.corpus} not found", file=sys.stderr)
        return 2
    overrides = {f: getattr(args, f) for f in SPEC_FLAGS if getattr(args, f) is not None}
    if args.name is None and args.out is None:
        if overrides:
            print("error: size flags need --name or --out", file=sys.stderr)
            return 2
        targets = [(n, MODELS_DIR / n) for n in TINY_MODELS]
    else:
        name = args.name or "tiny-llama"
        targets = [(name, args.out or MODELS_DIR / name)]
    corpus_sha = _sha256(args.corpus)
    for name, out in targets:
        fields = {**TINY_MODELS[name], **overrides, "corpus_sha256": corpus_sha}
        spec = TinySpec(**fields)
        try:
            spec.validate()
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        built = build(out, spec, args.corpus, force=args.force)
        size_mb = _dir_bytes(out) / 1e6
        if built:
            print(f"built {out} in {time.monotonic() - t0:.1f} s ({size_mb:.1f} MB)")
        else:
            print(f"{out} is up to date ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
