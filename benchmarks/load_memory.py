"""Host memory of `load_model` on a >= 1 GiB random mPLUG-Owl2 checkpoint: peak RSS growth <= 1.25x its size.

Writes a random checkpoint of the real classes and layout (`save_checkpoint`: config.json, one shard per
decoder layer plus one for the rest, an index), a LLaMA-shaped decoder sized so that the files total
``--size-mb``, weights stored in ``--stored-dtype`` (bfloat16 by default, as a released 7B). Then, for each
format, a fresh Python process loads it on the CPU with ``load_model(..., lm_head=True)`` (every stored
tensor, so the model is as big as the files when the dtypes agree) and reports its RSS.

The measure: the peak RSS (VmHWM, reset to the current RSS just before loading through Linux clear_refs)
minus the RSS right before loading, from the call until every parameter has been read once. RSS counts the
pages of the memory-mapped shards that were touched, so a loader that leaves the model's tensors as views of
the mapped files does not look free: their pages are counted once read (and they would be read by the first
forward pass anyway). ``ratio = peak growth / size on disk``; the target is <= 1.25. The loaded model is
1.0x when the dtypes agree, the rest is what the loader holds beyond it. Files were just written, so they
come from the page cache; RSS does not depend on that. The peak for a 7B checkpoint is estimated by the
measured ratio, and by "model + largest shard" (what this loader should hold at most) in the same layout.

``--compare`` also loads through the previous read path (each shard read whole by `load_file` /
`torch.load`, then converted and assigned shard by shard) for the before/after figure. When the dtypes
agree, that path left the model as views of the mapped files (file pages, not the model's own memory: see
"anon/file after"); `load_model` now copies each tensor out, so the model no longer depends on its files.
Exits 1 when a ratio of `load_model` is over ``--target``.

    python benchmarks/load_memory.py                                   # 1 GiB, safetensors
    python benchmarks/load_memory.py --format both --compare [--out load_memory.json]
    python benchmarks/load_memory.py --stored-dtype float32 --dtype bfloat16   # fp32 files, bf16 model
    python benchmarks/load_memory.py --size-mb 20 --format both              # seconds; the test's size
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.encoders.semantic.mplug_owl2.checkpoint import (
    load_model,
    resolve_checkpoint,
    save_checkpoint,
    weight_shards,
)
from pipeline.encoders.semantic.mplug_owl2.config import AbstractorConfig, MplugOwl2Config, VisionConfig
from pipeline.encoders.semantic.mplug_owl2.model import MplugOwl2

MiB = 2**20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = {"safetensors": True, "bin": False}  # name -> save_checkpoint(safetensors=...)
LOADERS = ("load_model", "whole-shard")  # this module's loader, the previous read path


def config_for(size_mb: float, itemsize: int) -> MplugOwl2Config:
    """LLaMA proportions (intermediate 2.6875x, 128-wide heads) at the widest of 2048/1024/512/256 that
    still gives >= 8 decoder layers, then as many layers as reach `size_mb`; a small vision side."""
    for hidden in (2048, 1024, 512, 256):
        cfg = _config(hidden, layers=1)
        layer = _bytes(_config(hidden, layers=2), itemsize) - _bytes(cfg, itemsize)
        if 8 * layer <= size_mb * MiB or hidden == 256:
            break
    rest = _bytes(cfg, itemsize) - layer
    return _config(hidden, layers=max(2, math.ceil((size_mb * MiB - rest) / layer)))


def _config(hidden: int, layers: int) -> MplugOwl2Config:
    width = max(64, hidden // 8)  # vision and abstractor, 4 heads
    return MplugOwl2Config(
        vocab_size=4 * hidden,
        hidden_size=hidden,
        intermediate_size=hidden * 43 // 16,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 128),
        vision=VisionConfig(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2, num_attention_heads=4,
            image_size=224,
        ),
        abstractor=AbstractorConfig(
            hidden_size=width, encoder_hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=4 * width, grid_size=16,
        ),
    )  # fmt: skip


def _meta_model(cfg: MplugOwl2Config) -> MplugOwl2:
    with torch.device("meta"):
        return MplugOwl2(cfg, lm_head=True)


def _bytes(cfg: MplugOwl2Config, itemsize: int) -> int:
    return sum(p.numel() for p in _meta_model(cfg).parameters()) * itemsize


def layout_bytes(cfg: MplugOwl2Config, itemsize: int) -> tuple[int, int]:
    """(all weights, largest shard) of `cfg` in save_checkpoint's layout, computed on the meta device."""
    shards: dict[str, int] = {}
    for name, p in _meta_model(cfg).named_parameters():
        group = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        shards[group] = shards.get(group, 0) + p.numel() * itemsize
    return sum(shards.values()), max(shards.values())


def write_checkpoints(
    cfg: MplugOwl2Config, dtype: torch.dtype, root: Path, formats: list[str], seed: int
) -> dict[str, Path]:
    """One random model (N(0, 0.02), filled in place: no fp32 init), saved once per format."""
    model = _meta_model(cfg).to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    directories = {}
    for name in formats:
        directories[name] = root / name
        save_checkpoint(model, directories[name], safetensors=FORMATS[name])
    return directories


def whole_shard_load(directory: Path, dtype: torch.dtype) -> MplugOwl2:
    """The previous read path (no checks): each shard read whole, converted, assigned shard by shard."""
    from safetensors.torch import load_file

    model = _meta_model(MplugOwl2Config.from_json_file(directory / "config.json"))
    for file in weight_shards(directory)[1]:
        path = directory / file
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        batch = {key: t.to(device="cpu", dtype=dtype) for key, t in tensors.items()}
        model.load_state_dict(batch, strict=False, assign=True)
        del tensors, batch
    return model.requires_grad_(False).eval()


def _status(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024


def child(directory: Path, loader: str, dtype: torch.dtype) -> dict:
    """In a fresh process: RSS growth from just before loading until every parameter was read once."""
    with torch.device("meta"):  # the first meta init imports torch's decompositions (~150 MB): not loading
        torch.nn.Embedding(2, 2)
    resolve_checkpoint(directory)  # imports huggingface_hub, as a first load_model would: not loading
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS:")
    start = time.perf_counter()
    if loader == "load_model":
        model = load_model(directory, dtype=dtype, lm_head=True)
    else:
        model = whole_shard_load(directory, dtype)
    seconds = time.perf_counter() - start
    with torch.no_grad():  # one element per 4 KiB page: faults in whatever is still only mapped
        for p in model.parameters():
            p.reshape(-1)[:: max(1, 4096 // p.element_size())].sum()
    return {
        "loader": loader,
        "seconds": round(seconds, 2),
        "base_rss": base,
        "peak_rss": _status("VmHWM:"),
        "peak_growth": _status("VmHWM:") - base,
        "rss_anon_after": _status("RssAnon:"),
        "rss_file_after": _status("RssFile:"),
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def measure(directory: Path, loader: str, dtype: str) -> dict:
    argv = [sys.executable, __file__, "--child", str(directory), "--loader", loader, "--dtype", dtype]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{loader} on {directory} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=1024, help="target size on disk (MiB)")
    parser.add_argument("--format", choices=[*FORMATS, "both"], default="safetensors")
    parser.add_argument("--stored-dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="load_model's dtype (default: as stored)")
    parser.add_argument("--compare", action="store_true", help="also measure the previous read path")
    parser.add_argument("--target", type=float, default=1.25, help="largest allowed peak growth / disk size")
    parser.add_argument("--tmp", type=Path, default=None, help="where to write the checkpoint (default /tmp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--loader", choices=LOADERS, default="load_model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype_name = args.dtype or args.stored_dtype
    if args.child:
        print(json.dumps(child(args.child, args.loader, DTYPES[dtype_name])))
        return

    stored = DTYPES[args.stored_dtype]
    itemsize = stored.itemsize
    formats = list(FORMATS) if args.format == "both" else [args.format]
    loaders = LOADERS if args.compare else LOADERS[:1]
    cfg = config_for(args.size_mb, itemsize)
    total = layout_bytes(cfg, itemsize)[0]
    tmp_root = args.tmp or Path(tempfile.gettempdir())
    free = shutil.disk_usage(tmp_root).free
    if free < 1.1 * total * len(formats) + 512 * MiB:
        need = total * len(formats) / MiB
        raise SystemExit(f"{tmp_root}: {free / MiB:,.0f} MiB free, the checkpoints need {need:,.0f} MiB")

    rows = []
    with tempfile.TemporaryDirectory(prefix="load_memory_", dir=tmp_root) as tmp:
        start = time.perf_counter()
        directories = write_checkpoints(cfg, stored, Path(tmp), formats, args.seed)
        write_seconds = time.perf_counter() - start
        for name, directory in directories.items():
            shards = [f.stat().st_size for f in directory.iterdir() if f.suffix in (".bin", ".safetensors")]
            disk = sum(shards)
            for loader in loaders:
                r = measure(directory, loader, dtype_name)
                ratio = r["peak_growth"] / disk
                rows.append({"format": name, "disk_bytes": disk, "shards": len(shards),
                             "largest_shard_bytes": max(shards), "ratio": round(ratio, 4), **r})  # fmt: skip

    full, full_largest = layout_bytes(MplugOwl2Config(), itemsize)
    ours = [r for r in rows if r["loader"] == "load_model"]
    worst = max(r["ratio"] for r in ours)
    results = {
        "config": {
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size,
        },
        "stored_dtype": args.stored_dtype,
        "dtype": dtype_name,
        "target": args.target,
        "write_seconds": round(write_seconds, 1),
        "runs": rows,
        "worst_ratio": worst,
        "7b": {
            "disk_bytes": full,
            "largest_shard_bytes": full_largest,
            "peak_growth_by_ratio": round(full * worst),
            "model_plus_largest_shard": full * DTYPES[dtype_name].itemsize // itemsize + full_largest,
        },
    }

    print(
        f"checkpoint: {cfg.num_hidden_layers} decoder layers x {cfg.hidden_size} wide "
        f"(intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}), {args.stored_dtype} on disk, "
        f"loaded as {dtype_name} on the CPU; written in {write_seconds:.1f} s"
    )
    print(
        f"{'format':<12}{'loader':<13}{'shards':>7}{'disk MiB':>10}{'largest':>9}{'base MiB':>10}"
        f"{'peak MiB':>10}{'growth':>9}{'ratio':>7}{'load s':>8}{'anon/file after':>17}"
    )
    for r in rows:
        print(
            f"{r['format']:<12}{r['loader']:<13}{r['shards']:>7}{r['disk_bytes'] / MiB:>10,.0f}"
            f"{r['largest_shard_bytes'] / MiB:>9,.0f}{r['base_rss'] / MiB:>10,.0f}"
            f"{r['peak_rss'] / MiB:>10,.0f}"
            f"{r['peak_growth'] / MiB:>9,.0f}{r['ratio']:>7.3f}{r['seconds']:>8.1f}"
            f"{r['rss_anon_after'] / MiB:>9,.0f}/{r['rss_file_after'] / MiB:,.0f}"
        )
    seven = results["7b"]
    print(
        f"7B (MplugOwl2Config() with lm_head): {full / 2**30:.1f} GiB in {args.stored_dtype}, largest shard "
        f"{full_largest / 2**30:.2f} GiB in this layout -> peak host RAM to load on the CPU "
        f"~{seven['peak_growth_by_ratio'] / 2**30:.1f} GiB by the worst ratio {worst:.3f} "
        f"(model + largest shard: {seven['model_plus_largest_shard'] / 2**30:.1f} GiB)"
    )
    verdict = "OK" if worst <= args.target else "OVER"
    print(f"worst load_model ratio {worst:.3f}, target <= {args.target}: {verdict}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if worst > args.target:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
