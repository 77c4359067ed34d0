"""GPU check: real-size random models on one GPU, one command, one JSON object, under 8 minutes.

Sections, in order of importance (each one's errors are caught and recorded; one that would not fit the
time left in ``--budget-s`` is skipped, and one that overruns it is interrupted):

1. ``mplug_owl2_7b``: mPLUG-Owl2 at the released 7B size (LLaMA-2-7B modality-adaptive decoder, ViT-L/14
   at 448 px, visual abstractor), random weights allocated straight on the GPU in bf16 (meta, then
   ``to_empty``: no CPU copy), SDPA attention. First our extraction against the reference-style pattern
   of MA-AGIQA's getFeature.py at batch 8 (``semantic_throughput``'s two functions, same images and
   prompts: ratio and min cosine), then ``SemanticExtractor`` images/s for both MA-AGIQA prompt layouts
   at batch 8, 16, 32 and 64, with the peak GPU memory of each batch size.
2. ``vlm_2b``: the transformers backend (``VlmEncoder.encode``, processor included) on a random
   Qwen2-VL-2B-shaped model built on the GPU in bf16, SDPA, 448 px synthetic images, two batch sizes.
3. ``ma_agiqa_epoch``: the paper-size MA-AGIQA head (``train_epoch.build``) trained for one epoch by
   ``pipeline.train.train_split`` (Adam, batch 8) over 2,982 random rows (AGIQA-3k): ViT tokens
   784 x 3072 and two 4096-d prompt vectors, held in RAM as a resident store is: s/epoch.
4. ``torchrun_scaling``: section 1's extraction sharded as ``stages.extract`` shards rows
   (``pipeline.shards.Shard``: contiguous blocks of whole batches) over one torchrun rank per GPU, against
   one rank: images/s and the speed-up (needs >= 2 GPUs; the dry run uses 2 CPU processes).

``--dry-run`` runs the same code on CPU in float32 with tiny configs (the test suite does, so the script
keeps working); the only differences are the sizes chosen in ``DRY`` against ``GPU`` below. Progress goes
to stderr, the JSON to stdout (and ``--out``). Exit status 1 when a section errored.

    python benchmarks/gpu_check.py [--dry-run] [--out results.json] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

# Random weights only: nothing here reads the hub, and the GPU machine has no network to wait for.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, Qwen2VLConfig, Qwen2VLImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, also when imported

import semantic_throughput as st
import train_epoch as te

import pipeline.encoders.vlm as vlm_backend
from pipeline.encoders.semantic.mplug_owl2.config import MplugOwl2Config
from pipeline.encoders.semantic.mplug_owl2.extract import SemanticExtractor
from pipeline.encoders.semantic.mplug_owl2.tiny import TINY_CONFIG
from pipeline.encoders.vlm.tiny import FAMILIES
from pipeline.features import Features
from pipeline.train import Recipe, RunConfig, train_split

GiB = 2**30
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the dry run."""

    name: str
    device: str
    dtype: torch.dtype
    mplug: MplugOwl2Config
    mplug_batches: tuple[int, ...]
    ratio_batch: int  # the reference style's batch (MA-AGIQA's getFeature.py: 8)
    ratio_images: int
    timed_batches: int  # timed batches per batch size, after one warm-up batch
    vlm_text: dict[str, Any]  # overrides of the tiny qwen2_vl text config
    vlm_vision: dict[str, Any]
    vlm_top: dict[str, Any]
    vlm_side: int  # synthetic image side (px)
    vlm_batches: tuple[int, ...]
    head_rows: int
    head_channels: int  # ViT token width (4 blocks x 768 in the paper)
    head_embed_dim: int
    head_dim_mlp: int
    threads: int | None  # torch CPU threads (None: torch's default)
    scaling_images: int  # torchrun_scaling: images over all ranks, in batches of scaling_batch
    scaling_batch: int
    estimate_s: dict[str, float] = field(default_factory=dict)  # a section starts only if this fits


GPU = Sizes(
    name="gpu",
    device="cuda",
    dtype=torch.bfloat16,
    mplug=st.SIZES["7b"],
    mplug_batches=(8, 16, 32, 64),
    ratio_batch=8,
    ratio_images=64,
    timed_batches=6,
    # Qwen/Qwen2-VL-2B-Instruct's shapes (its text rope_theta, mrope sections and tied embeddings)
    vlm_text={
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    },
    vlm_vision={"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16},
    vlm_top={"tie_word_embeddings": True},
    vlm_side=448,  # 32 x 32 patches -> 256 image tokens per row
    vlm_batches=(8, 32),
    head_rows=2982,
    head_channels=3072,
    head_embed_dim=768,
    head_dim_mlp=768,
    threads=None,
    scaling_images=256,
    scaling_batch=32,
    estimate_s={"mplug_owl2_7b": 120, "vlm_2b": 90, "ma_agiqa_epoch": 120, "torchrun_scaling": 90},
)

DRY = Sizes(
    name="dry-run",
    device="cpu",
    dtype=torch.float32,
    mplug=TINY_CONFIG,
    mplug_batches=(1, 2),
    ratio_batch=2,
    ratio_images=4,
    timed_batches=2,
    vlm_text={},
    vlm_vision={},
    vlm_top={},
    vlm_side=56,
    vlm_batches=(1, 2),
    head_rows=16,
    head_channels=32,
    head_embed_dim=32,
    head_dim_mlp=32,
    threads=1,  # the test suite shares few cores
    scaling_images=8,
    scaling_batch=2,
    estimate_s={"mplug_owl2_7b": 5, "vlm_2b": 5, "ma_agiqa_epoch": 5, "torchrun_scaling": 15},
)


def process_age(since: float) -> float:
    """Seconds since this process started (imports included), from /proc; else since `since`."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - since


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A section that does not apply here: recorded as {"skipped": reason}."""


class SectionTimeout(Exception):
    """A section ran past the time left in the budget."""


class Memory:
    """Peak GPU memory (torch.cuda.max_memory_allocated) since the last `reset`, and over the section
    (`high`, and `high_reserved` for the caching allocator's max_memory_reserved)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.high = self.high_reserved = 0.0
        self.reset()

    def reset(self) -> None:
        if self.cuda:
            self.read()  # fold the peak so far into the section's
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> float | None:
        if not self.cuda:
            return None
        peak = torch.cuda.max_memory_allocated() / GiB
        self.high = max(self.high, peak)
        self.high_reserved = max(self.high_reserved, torch.cuda.max_memory_reserved() / GiB)
        return round(peak, 2)

    def allocated(self) -> float | None:
        return round(torch.cuda.memory_allocated() / GiB, 2) if self.cuda else None


def rate(images: int, seconds: float) -> float:
    return round(images / seconds, 2)


def params(model: torch.nn.Module) -> float:
    """Parameters, in billions (4 significant digits)."""
    return float(f"{sum(p.numel() for p in model.parameters()) / 1e9:.4g}")


# --- 1. mPLUG-Owl2 ------------------------------------------------------------------------------------


def mplug_owl2(s: Sizes, out: dict, mem: Memory) -> None:
    cfg = s.mplug
    out["config"] = {
        "llm": f"{cfg.num_hidden_layers} x {cfg.hidden_size} (mlp {cfg.intermediate_size})",
        "vision": f"{cfg.vision.num_hidden_layers} x {cfg.vision.hidden_size} at {cfg.vision.image_size} px",
        "abstractor_layers": cfg.abstractor.num_hidden_layers,
        "visual_tokens": cfg.num_visual_tokens,
        "dtype": DTYPE_NAMES[s.dtype],
        "attention": "sdpa",
    }
    model, seconds = st.timed(lambda: st.build_model_from_config(cfg, s.device, s.dtype), s.device)
    out |= {"build_s": round(seconds, 2), "params_b": params(model), "weights_gib": mem.allocated()}
    log(f"mplug_owl2_7b: built {out['params_b']} B parameters in {seconds:.1f} s")
    prompts = st.random_prompts(cfg.vocab_size)
    g = torch.Generator(device=s.device).manual_seed(1)
    res = cfg.vision.image_size
    n = max(*s.mplug_batches, s.ratio_images)
    pixels = torch.randn(n, 3, res, res, generator=g, device=s.device, dtype=s.dtype)

    # Reference-style pattern vs ours, same images, both at the reference's batch size.
    b, m = s.ratio_batch, s.ratio_images
    mem.reset()
    st.reference_features(model, prompts, pixels[:b], b)  # warm-up
    st.our_features(model, prompts, pixels[:b], b)
    ref, t_ref = st.timed(lambda: st.reference_features(model, prompts, pixels[:m], b), s.device)
    ours, t_ours = st.timed(lambda: st.our_features(model, prompts, pixels[:m], b), s.device)
    cosine = torch.nn.functional.cosine_similarity(ours.float(), ref.float(), dim=-1).min().item()
    out["reference"] = {
        "batch": b,
        "images": m,
        "reference_images_per_s": rate(m, t_ref),
        "ours_images_per_s": rate(m, t_ours),
        "ratio": round(t_ref / t_ours, 3),
        "min_cosine": round(cosine, 6),
        "peak_gpu_mem_gib": mem.read(),
    }
    del ref, ours
    log(f"mplug_owl2_7b: ours vs reference style at batch {b}: {out['reference']['ratio']}x")

    extractor = SemanticExtractor(model, prompts)
    out["batches"] = {}
    for b in s.mplug_batches:
        mem.reset()
        x = pixels[:b]
        extractor(x)  # warm-up: this shape's kernels

        def run(x: torch.Tensor = x) -> list[torch.Tensor]:
            return [extractor(x) for _ in range(s.timed_batches)]

        _, seconds = st.timed(run, s.device)
        entry = {
            "images_per_s": rate(b * s.timed_batches, seconds),
            "s_per_batch": round(seconds / s.timed_batches, 4),
            "peak_gpu_mem_gib": mem.read(),
        }
        if extractor.max_images:  # OomBackoff halved the batch after an out-of-memory error
            entry["oom_backoff_to"] = extractor.max_images
        out["batches"][str(b)] = entry
        log(f"mplug_owl2_7b: batch {b}: {entry['images_per_s']} images/s")


# --- 2. transformers backend ----------------------------------------------------------------------------


def build_vlm(s: Sizes) -> tuple[torch.nn.Module, Any]:
    """The demo's tiny qwen2_vl config and processor with `s`'s overrides; random weights on `s.device`."""
    config, processor = FAMILIES["qwen2_vl"]()
    text = {k: v for k, v in config.text_config.to_dict().items() if k != "layer_types"} | s.vlm_text
    vision = config.vision_config.to_dict() | s.vlm_vision
    tokens = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, **{k: getattr(config, k) for k in tokens}, **s.vlm_top
    )
    # Room for the synthetic images at full size: (side / 14)^2 patches, a quarter as many tokens.
    processor.image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=s.vlm_side**2)
    processor.tokenizer.padding_side = "right"  # as load_vlm sets it
    with torch.device(s.device):
        model = AutoModelForImageTextToText.from_config(config, dtype=s.dtype, attn_implementation="sdpa")
    if (where := next(model.parameters()).device).type != torch.device(s.device).type:
        log(f"vlm_2b: from_config built the model on {where}; moving it to {s.device}")
    return model.to(s.device).eval().requires_grad_(False), processor


def vlm_2b(s: Sizes, out: dict, mem: Memory) -> None:
    (model, processor), seconds = st.timed(lambda: build_vlm(s), s.device)
    text = model.config.get_text_config()
    out["config"] = {
        "family": "qwen2_vl",
        "llm": f"{text.num_hidden_layers} x {text.hidden_size} (mlp {text.intermediate_size}, "
        f"{text.num_attention_heads} heads, {text.num_key_value_heads} kv)",
        "vision": f"{model.config.vision_config.depth} x {model.config.vision_config.embed_dim}",
        "image_side": s.vlm_side,
        "dtype": DTYPE_NAMES[s.dtype],
        "attention": model.config._attn_implementation,
    }
    out |= {"build_s": round(seconds, 2), "params_b": params(model), "weights_gib": mem.allocated()}
    log(f"vlm_2b: built {out['params_b']} B parameters in {seconds:.1f} s")
    cfg = {
        "checkpoint": "random-init",
        "prompts": ["semantic_content", "coherence"],
        "pooling": "mean",
        "hidden_layer": -1,
        "max_side": s.vlm_side,
    }

    def loaded(*_: Any) -> tuple:  # the encoder's loader, handed the model built above
        return model, processor, {"checkpoint": "random-init"}

    with mock.patch.object(vlm_backend, "load_vlm", loaded):
        encoder = vlm_backend.VlmEncoder(cfg, "gpu_check", s.device, DTYPE_NAMES[s.dtype])
    rng = np.random.default_rng(0)
    n = max(s.vlm_batches)
    images = [Image.fromarray(rng.integers(0, 256, (s.vlm_side, s.vlm_side, 3), np.uint8)) for _ in range(n)]
    canvases = torch.stack([encoder.preprocess(im) for im in images])
    row = processor(text=encoder.texts[:1], images=images[:1], return_tensors="pt")["input_ids"][0]
    out["tokens_per_row"] = len(row)
    out["image_tokens_per_row"] = int((row == encoder.image_token_id).sum())
    out["batches"] = {}
    for b in s.vlm_batches:
        mem.reset()
        x = canvases[:b]
        encoder.encode(x)  # warm-up

        def run(x: torch.Tensor = x) -> list[dict]:
            return [encoder.encode(x) for _ in range(s.timed_batches)]

        _, seconds = st.timed(run, s.device)
        entry = {
            "images_per_s": rate(b * s.timed_batches, seconds),
            "s_per_batch": round(seconds / s.timed_batches, 4),
            "peak_gpu_mem_gib": mem.read(),
        }
        if encoder.max_images:
            entry["oom_backoff_to"] = encoder.max_images
        out["batches"][str(b)] = entry
        log(f"vlm_2b: batch {b}: {entry['images_per_s']} images/s (processor included)")


# --- 3. MA-AGIQA head ------------------------------------------------------------------------------------


def random_rows(n: int, shape: tuple[int, ...], device: str, seed: int) -> np.ndarray:
    """(n, *shape) float16 N(0, 1) in host RAM, drawn on `device` in chunks of about 512 MiB."""
    rows = np.empty((n, *shape), np.float16)
    g = torch.Generator(device=device).manual_seed(seed)
    step = max(1, 2**28 // int(np.prod(shape)))
    for i in range(0, n, step):
        k = min(step, n - i)
        rows[i : i + k] = torch.randn((k, *shape), generator=g, device=device, dtype=torch.float16).cpu()
    return rows


def ma_agiqa_epoch(s: Sizes, out: dict, mem: Memory) -> None:
    args = argparse.Namespace(  # train_epoch's options
        channels=s.head_channels,
        embed_dim=s.head_embed_dim,
        dim_mlp=s.head_dim_mlp,
        batch_size=8,  # the paper's
        device=s.device,
        seed=0,
        threads=0,
    )
    shapes = te.shapes(args)
    start = time.perf_counter()
    arrays = {
        name: random_rows(s.head_rows, shape, s.device, seed)
        for seed, (name, shape) in enumerate(shapes.items())
    }
    out["data_s"] = round(time.perf_counter() - start, 2)
    out["data_gib"] = round(sum(a.nbytes for a in arrays.values()) / GiB, 2)
    out["shapes"] = {name: list(shape) for name, shape in shapes.items()}
    features = Features.in_memory(arrays)
    rows = np.arange(s.head_rows)
    parts = {"train": rows, "val": rows[:3], "test": rows[:0]}  # validation on 3 rows, as train_epoch
    targets = np.random.default_rng(0).uniform(1, 5, (s.head_rows, 1)).astype(np.float32)
    recipe = Recipe(epochs=1, batch_size=args.batch_size, lr=1e-5, weight_decay=1e-5, schedule="cosine_step")
    run = RunConfig(device=s.device)
    mem.reset()
    _, seconds = st.timed(
        lambda: train_split(lambda: te.build(args), features, targets, parts, recipe, run, split_seed=0),
        s.device,
    )
    out |= {
        "rows": s.head_rows,
        "batch_size": recipe.batch_size,
        "s_per_epoch": round(seconds, 2),
        "samples_per_s": rate(s.head_rows, seconds),
    }
    log(f"ma_agiqa_epoch: {seconds:.1f} s per epoch of {s.head_rows} rows")
    # Compute alone: train_epoch's two steps on one batch already on the device (no data movement).
    mem.reset()
    model = te.model_phase(args)
    out |= {
        "params_b": float(f"{model['params'] / 1e9:.4g}"),
        "step_s": round(model["step_seconds"], 4),
        "compute_only_samples_per_s": rate(args.batch_size, model["step_seconds"]),
    }


# --- 4. torchrun scaling --------------------------------------------------------------------------------


def rank_worker(s: Sizes, folder: Path) -> None:
    """One torchrun rank: section 1's extractor over this rank's shard of ``scaling_images`` synthetic
    images (timed after a warm-up batch), written to ``folder/<rank>.json``."""
    from pipeline.shards import Shard

    shard = Shard.from_env() or Shard(0, 1)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if s.device == "cuda" else "cpu"
    if s.device == "cuda":
        torch.cuda.set_device(device)
    model = st.build_model_from_config(s.mplug, device, s.dtype)
    extractor = SemanticExtractor(model, st.random_prompts(s.mplug.vocab_size))
    b, res = s.scaling_batch, s.mplug.vision.image_size
    start, stop = shard.rows(s.scaling_images, b)
    g = torch.Generator(device=device).manual_seed(2 + shard.index)
    batches = [
        torch.randn(min(b, stop - i), 3, res, res, generator=g, device=device, dtype=s.dtype)
        for i in range(start, stop, b)
    ]
    extractor(batches[0])  # warm-up
    _, seconds = st.timed(lambda: [extractor(x) for x in batches], device)
    (folder / f"{shard.index}.json").write_text(json.dumps({"images": stop - start, "seconds": seconds}))


def torchrun_scaling(s: Sizes, out: dict, mem: Memory) -> None:
    """Each rank count runs as ``torchrun --standalone --nproc-per-node N`` of this script's rank worker;
    images/s = all images / the slowest rank's time (builds and warm-ups excluded)."""
    ranks = torch.cuda.device_count() if s.device == "cuda" else 2
    if ranks < 2:
        raise Skip("needs >= 2 GPUs")
    out |= {"ranks": ranks, "batch": s.scaling_batch, "images": s.scaling_images, "images_per_s": {}}
    for n in (1, ranks):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            command += [__file__, "--rank-worker", tmp, *(["--dry-run"] if s is DRY else [])]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{n} ranks failed: {proc.stderr[-1500:]}")
            done = [json.loads(f.read_text()) for f in Path(tmp).glob("*.json")]
        out["images_per_s"][str(n)] = rate(sum(d["images"] for d in done), max(d["seconds"] for d in done))
    out["speedup"] = round(out["images_per_s"][str(ranks)] / out["images_per_s"]["1"], 3)
    log(f"torchrun_scaling: {ranks} ranks {out['speedup']}x one rank")


SECTIONS: tuple[tuple[str, Callable[[Sizes, dict, Memory], None]], ...] = (
    ("mplug_owl2_7b", mplug_owl2),
    ("vlm_2b", vlm_2b),
    ("ma_agiqa_epoch", ma_agiqa_epoch),
    ("torchrun_scaling", torchrun_scaling),
)


# --- driver ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after `seconds` (checked between Python bytecodes)."""

    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"ran past the {seconds:.0f} s left in the budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(name: str, fn: Callable, s: Sizes, left: float) -> dict:
    estimate = s.estimate_s.get(name, 0)
    if estimate > left:
        log(f"{name}: skipped (needs about {estimate} s, {left:.0f} s left)")
        return {"skipped": "time budget", "estimate_s": estimate, "left_s": round(left, 1)}
    log(f"{name}: start ({left:.0f} s left in the budget)")
    out: dict[str, Any] = {}
    mem = Memory(s.device)
    start = time.perf_counter()
    try:
        with time_limit(left):
            fn(s, out, mem)
    except Skip as reason:
        return {"skipped": str(reason)}
    except Exception as e:  # recorded: the other sections still run
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["traceback"] = traceback.format_exc(limit=-6).splitlines()[-14:]
        log(f"{name}: {out['error']}")
    out["seconds"] = round(time.perf_counter() - start, 2)
    mem.read()
    out["peak_gpu_mem_gib"] = round(mem.high, 2) if mem.cuda else None
    gc.collect()
    if mem.cuda:
        out["peak_gpu_reserved_gib"] = round(mem.high_reserved, 2)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def machine(s: Sizes) -> dict:
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {"name": p.name, "memory_gib": round(p.total_memory / GiB, 1), "cc": f"{p.major}.{p.minor}"}
            )
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "device": s.device,
        "dtype": DTYPE_NAMES[s.dtype],
        "sdpa_backends": {
            name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
            for name in ("flash", "mem_efficient", "cudnn", "math")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny configs, CPU, float32 (the test suite's)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would not fit")
    parser.add_argument("--rank-worker", type=Path, help=argparse.SUPPRESS)  # torchrun_scaling's ranks
    args = parser.parse_args(argv)
    start = time.perf_counter()
    s = DRY if args.dry_run else GPU
    if s.threads:
        torch.set_num_threads(s.threads)
    if args.rank_worker is not None:
        return rank_worker(s, args.rank_worker) or 0
    if s.device == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no GPU; --dry-run runs the same code on CPU")
    if s.device == "cuda":
        torch.cuda.init()  # the context's start-up counts before the first section, not in it
    result: dict[str, Any] = {
        "mode": s.name,
        "budget_s": args.budget_s,
        "machine": machine(s),
        "startup_s": round(process_age(start), 2),  # interpreter, imports, CUDA context
        "sections": {},
    }
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
        for name, fn in SECTIONS:
            left = args.budget_s - process_age(start)
            result["sections"][name] = run_section(name, fn, s, left)
    errored = [name for name, r in result["sections"].items() if "error" in r]
    result["errors"] = errored
    result["total_wall_s"] = round(process_age(start), 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if errored else 0


if __name__ == "__main__":
    raise SystemExit(main())
