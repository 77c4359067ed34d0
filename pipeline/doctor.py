"""Pre-flight checks before a run: GPU, datasets, disk for the feature stores, weights in the hub cache.

A paper run spends hours of GPU time in stage 1; these checks find what would stop it (no GPU, a
missing image, a full disk, weights not downloaded) in seconds, before anything starts. Each check
returns a ``Check`` with the command that fixes it. Nothing here loads a model or downloads a file:
store sizes come from params and named constants, weights are looked up in the Hugging Face cache
only. torch, timm, open_clip and huggingface_hub are imported inside the functions that use them,
so that ``agiqa doctor`` starts fast.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OK, WARN, MISSING = "ok", "WARN", "MISSING"
GIB = 2**30
FLOAT16_BYTES = 2  # every store is float16 (pipeline/store.py)
RAW = Path("data/raw")
FEATURES = Path("features")

# mPLUG-Owl2 LLaMA-2-7B as loaded for features: LLM 7.681e9 + vision 0.304e9 + abstractor 0.081e9
# parameters (references/mplug-owl2.md); lm_head (0.131e9) is not loaded (checkpoint.load_model).
SEMANTIC_PARAMS = 8.066e9
SEMANTIC_HIDDEN = 4096  # LLaMA-2-7B hidden size: one pooled vector per prompt
# Beyond the weights: the CUDA context (~0.5 GiB) and a batch's activations (ViT-L at 448 px gives
# 1025 tokens per image, attention 16 x 1025^2 per image and layer), about 2 GiB at extract.batch_size 16.
ACTIVATION_HEADROOM_GIB = 2.5
# ViT-B/8 (86M parameters) and CLIP RN50 (102M) fit in this headroom at any dtype; stages run one
# encoder per process, so the GPU needs the largest encoder, not the sum.
SMALL_ENCODER_GIB = 1.5
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
AUTO_DTYPE = {"demo": "float32", "paper": "bfloat16"}  # as pipeline.encoders.common.AUTO_DTYPE

VIT_WIDTHS = {"tiny": 192, "small": 384, "base": 768, "large": 1024, "huge": 1280}  # timm vit_<size>_
# open_clip ModifiedResNet: layer4 channels and total stride (RN50 at 512 px -> 2048 x 16 x 16).
CLIP_TRUNK = {"RN50": (2048, 32)}
# Per unique prompt the clip store also keeps (clip encoder ``extras``): 77 int32 token ids, 77 x 512
# float16 final token states, an int32 EOT index and the float32 projected feature (1024).
CLIP_TEXT_BYTES = {"RN50": 77 * 4 + 77 * 512 * 2 + 4 + 1024 * 4}

# Rows of the label files the loaders read, used only when a label file is absent.
PUBLISHED_SIZES = {"agiqa3k": 2982, "agiqa1k": 1080, "aigcqa20k": 14000}  # aigcqa20k: info_train.csv


@dataclass(frozen=True)
class Check:
    """One line of the report. ``status``: ok, WARN (the run starts but something is off) or MISSING
    (the run cannot start); ``fix`` is the command (or edit) that resolves a WARN or MISSING."""

    name: str
    status: str
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != MISSING


def resolved_dtype(params: dict[str, Any], profile: str) -> str:
    name = params["extract"]["dtype"]
    return AUTO_DTYPE[profile] if name == "auto" else name


def required_gpu_gib(encoders: list[str], dtype: str, vlm_params: list[float] = ()) -> float:
    """GPU memory (GiB) that stage 1 of the paper profile needs: the largest encoder's weights in the
    compute dtype plus activations. bfloat16: 8.07e9 x 2 B = 15.0 GiB + 2.5 = 17.5 GiB. ``vlm_params``:
    the parameter count of each ``vlms`` entry (``vlm_parameters``)."""
    large = [SEMANTIC_PARAMS] * ("semantic" in encoders) + list(vlm_params)
    if large:
        return max(large) * DTYPE_BYTES[dtype] / GIB + ACTIVATION_HEADROOM_GIB
    return SMALL_ENCODER_GIB


def _cached_json(cfg: dict[str, Any], filename: str) -> dict[str, Any] | None:
    """A json file of a ``vlms`` entry's checkpoint from the hub cache (or its local folder), else None."""
    import json

    local = Path(cfg["checkpoint"]).expanduser() / filename
    found = local if local.is_file() else cached_file(cfg["checkpoint"], cfg["revision"], (filename,))
    return json.loads(found.read_text()) if found is not None else None


def vlm_parameters(cfg: dict[str, Any]) -> float:
    """A ``vlms`` entry's parameter count from its cached safetensors index (bytes / 2: hub VLMs ship
    bf16 or fp16 shards); a 7B-class count when the index is not cached."""
    index = _cached_json(cfg, "model.safetensors.index.json")
    total = (index or {}).get("metadata", {}).get("total_size")
    return total / 2 if total else SEMANTIC_PARAMS


def check_torch() -> Check:
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return Check("torch", OK, f"torch {torch.__version__} ({build})")


def check_gpu(params: dict[str, Any], profile: str) -> Check:
    """Is there a CUDA GPU with enough memory for the largest configured encoder?"""
    if profile == "demo":
        return Check("gpu", OK, "not needed by the demo (tiny random encoders run on the CPU)")
    import torch

    dtype = resolved_dtype(params, profile)
    vlms = params.get("vlms", [])
    need = required_gpu_gib(params["encoders"], dtype, [vlm_parameters(params["extract"][n]) for n in vlms])
    why = f"{need:.1f} GiB ({', '.join([*params['encoders'], *vlms])} in {dtype})"
    device = params["runtime"]["device"]
    if device == "cpu":
        detail = f"runtime.device is cpu: stage 1 of the paper profile needs a GPU with >= {why}"
        return Check("gpu", MISSING, detail, "set runtime.device: auto in params.yaml")
    if not torch.cuda.is_available():
        fix = (
            "run on a machine with a CUDA GPU (nvidia-smi lists it; torch is a CPU-only build: "
            "install a CUDA build of torch)"
            if torch.version.cuda is None
            else "run on a machine with a CUDA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )
        return Check(
            "gpu", MISSING, f"no CUDA GPU: stage 1 of the paper profile needs one with >= {why}", fix
        )
    index = int(device.split(":")[1]) if ":" in device else 0
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    seen = f"cuda:{index} {props.name}, {total / GIB:.1f} GiB, {free / GIB:.1f} GiB free; needs {why}"
    if total / GIB < need:
        fix = "use a larger GPU" + (" or extract.dtype: bfloat16" if dtype == "float32" else "")
        return Check("gpu", MISSING, seen, fix)
    if free / GIB < need:
        return Check("gpu", WARN, seen, "stop the other processes on that GPU (nvidia-smi) or pick another")
    return Check("gpu", OK, seen)


def store_bytes(encoder: str, extract: dict[str, Any], kind: str | None = None) -> int:
    """Bytes per image of an encoder's paper-profile store, from the ``extract`` params section.

    vit: (img_size / patch)^2 tokens x len(blocks) x width per view in ``views`` (784 x 3072 x 2 B at
    224 px, 4 blocks); clip: channels x (img_size / stride)^2 (2048 x 16 x 16 at 512 px); semantic:
    len(prompts) x 4096; a ``vlms`` entry (``kind="vlm"``): len(prompts) x its hidden size. A model
    without a known size raises ValueError naming the key.
    """
    if encoder == "vit":
        cfg = extract["vit"]
        match = re.match(r"vit_([a-z]+)_patch(\d+)_", cfg["model"])
        if not match or match[1] not in VIT_WIDTHS:
            raise ValueError(f"extract.vit.model {cfg['model']!r}: no size known (vit_<size>_patch<N>_...)")
        tokens = (cfg["img_size"] // int(match[2])) ** 2
        return tokens * len(cfg["blocks"]) * VIT_WIDTHS[match[1]] * len(cfg["views"]) * FLOAT16_BYTES
    if encoder == "clip":
        cfg = extract["clip"]
        arch = cfg["model"].split("-")[0]
        if arch not in CLIP_TRUNK:
            raise ValueError(
                f"extract.clip.model {cfg['model']!r}: no size known (known: {list(CLIP_TRUNK)})"
            )
        channels, stride = CLIP_TRUNK[arch]
        return channels * (cfg["img_size"] // stride) ** 2 * FLOAT16_BYTES
    if encoder == "semantic":
        return len(extract["semantic"]["prompts"]) * SEMANTIC_HIDDEN * FLOAT16_BYTES
    if kind == "vlm":
        config = _cached_json(extract[encoder], "config.json")
        hidden = config and (config.get("text_config", {}).get("hidden_size") or config.get("hidden_size"))
        if not hidden:
            raise ValueError(
                f"extract.{encoder}: the hidden size of {extract[encoder]['checkpoint']} is read from its "
                "config.json, which is not cached"
            )
        return len(extract[encoder]["prompts"]) * hidden * FLOAT16_BYTES
    raise ValueError(f"encoder {encoder!r}: no store size known")


def prompt_bytes(encoder: str, extract: dict[str, Any]) -> int:
    """Bytes per unique prompt (clip's text states; 0 for the others)."""
    return CLIP_TEXT_BYTES[extract["clip"]["model"].split("-")[0]] if encoder == "clip" else 0


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


@dataclass(frozen=True)
class Counted:
    """What a dataset check learnt: images and unique prompts, and where the counts come from (without
    a label file, one prompt per image: an upper bound)."""

    images: int
    prompts: int
    source: str


def check_dataset(name: str, params: dict[str, Any], root: Path) -> tuple[Check, Counted | None]:
    """``data/raw/<name>``, its label file ``data.<name>.labels`` and every image the labels list."""
    from pipeline.data.labels import DATASET_GUIDES, load_labels

    row = f"dataset {name}"
    cfg = params["data"].get(name)
    if cfg is None:
        return Check(row, MISSING, f"params.yaml has no data.{name} section", f"add data.{name}"), None
    if cfg["kind"] == "demo":
        return Check(row, OK, "drawn by the generate_demo stage"), None
    folder, labels = RAW / name, cfg["labels"]
    published = PUBLISHED_SIZES.get(cfg["kind"])
    fallback = Counted(published, published, "published size") if published else None
    put = f"ln -s /path/to/{name} {folder}  # the folder holding {labels} and the images"
    guide = DATASET_GUIDES.get(cfg["kind"], "")
    if not (root / folder).is_dir():
        return Check(row, MISSING, f"no folder {folder}. {guide}", put), fallback
    if not (root / folder / labels).is_file():
        detail = f"no label file {folder / labels} (data.{name}.labels). {guide}"
        return Check(row, MISSING, detail, f"cp /path/to/{labels} {folder}/"), fallback
    try:
        manifest = load_labels(cfg["kind"], root / folder / labels, **cfg.get("options", {}))
    except (ValueError, FileNotFoundError) as err:  # ManifestError is a ValueError
        return Check(row, MISSING, str(err), f"fix {folder / labels} (data.{name})"), fallback
    paths = manifest["path"].drop_duplicates()
    missing = [p for p in paths if not (root / folder / p).is_file()]
    counted = Counted(len(manifest), manifest["prompt"].nunique(), f"{labels} rows")
    if missing:
        detail = (
            f"{len(missing)} of {len(paths)} images listed in {labels} are not in {folder}, e.g. "
            f"{', '.join(missing[:3])}. {guide}"
        )
        return Check(row, MISSING, detail, f"ls {folder}  # put the missing images there"), counted
    return Check(row, OK, f"{len(manifest)} images in {labels}, all present in {folder}"), counted


def check_stores(name: str, params: dict[str, Any], counted: Counted) -> tuple[Check, int]:
    """Size of the stores ``features/<name>/<encoder>.h5`` that stage 1 writes, per encoder."""
    parts, total, unknown = [], 0, []
    kinds = {**{e: e for e in params["encoders"]}, **{n: "vlm" for n in params.get("vlms", [])}}
    for encoder, kind in kinds.items():
        try:
            size = counted.images * store_bytes(encoder, params["extract"], kind)
            size += counted.prompts * prompt_bytes(encoder, params["extract"])
        except ValueError as err:
            parts.append(f"{encoder} ?")
            unknown.append(str(err))
            continue
        parts.append(f"{encoder} {_size(size)}")
        total += size
    detail = f"{' + '.join(parts)} = {_size(total)} for {counted.images} images ({counted.source})"
    if unknown:
        detail += f"; not counted: {'; '.join(unknown)}"
        return Check(
            f"stores {name}", WARN, detail, "check the disk by hand for the encoders not counted"
        ), total
    return Check(f"stores {name}", OK, detail), total


def cache_copies(root: Path) -> int:
    """How many times a store sits on disk: 1 with the project's link cache (``cache.type`` without
    ``copy``, in .dvc/config or config.local), 2 where DVC may copy outputs into .dvc/cache (its default
    ``reflink,copy`` copies on ext4)."""
    import configparser

    config = configparser.ConfigParser()
    config.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])
    types = config.get("cache", "type", fallback="reflink,copy")
    return 2 if "copy" in {t.strip() for t in types.split(",")} else 1


def check_disk(root: Path, needed: int) -> Check:
    """Free space where ``features/`` lives (or its nearest existing parent) against the stores, counted
    twice when DVC's cache copies them (``cache_copies``): stage 1 writes them, then ``dvc commit`` fails.
    """
    where = root / FEATURES
    while not where.exists():
        where = where.parent
    free, copies = shutil.disk_usage(where).free, cache_copies(root)
    held = "x2 with the DVC cache copy" if copies == 2 else "held once (link-type DVC cache)"
    detail = f"{_size(free)} free at {where}; stores {_size(needed)}, {held}"
    if free < needed:
        return Check(
            "disk",
            MISSING,
            detail,
            f"make {_size(needed * copies - free)} more room at {where} (or put features/ and .dvc/cache on "
            "a larger disk)",
        )
    if free < copies * needed:
        return Check(
            "disk",
            WARN,
            detail,
            f"make {_size(needed * copies - free)} more room at {where} for the DVC cache copy",
        )
    return Check("disk", OK, detail)


def hub_cache() -> Path:
    """The hub cache folder, from the environment at call time (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _download(repo: str, revision: str) -> str:
    prefix = "HF_HUB_OFFLINE=0 " if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
    return f"{prefix}hf download {repo} --revision {revision}"


def cached_file(repo: str, revision: str, filenames: tuple[str, ...]) -> Path | None:
    """The first of ``filenames`` cached for ``repo`` at ``revision`` (a branch or commit), or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache(), revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def check_semantic_weights(extract: dict[str, Any], root: Path, encoder: str = "semantic") -> Check:
    """mPLUG-Owl2 (``semantic``) or a ``vlms`` entry at ``extract.<encoder>.checkpoint`` /
    ``revision``: a local folder, or config.json, the tokenizer (mPLUG-Owl2's tokenizer.model) and every
    weight shard its index names in the hub cache."""
    import json

    row, cfg = f"weights {encoder}", extract[encoder]
    source, revision = cfg["checkpoint"], cfg["revision"]
    local = Path(source).expanduser()
    local = local if local.is_absolute() else root / local
    if local.is_dir():
        return Check(row, OK, f"local folder {local}")
    fix = _download(source, revision)
    where = f"{source} at revision {revision} in {hub_cache()}"
    weights = cached_file(
        source,
        revision,
        (
            "model.safetensors.index.json",
            "pytorch_model.bin.index.json",
            "model.safetensors",
            "pytorch_model.bin",
        ),
    )
    if weights is None or cached_file(source, revision, ("config.json",)) is None:
        return Check(row, MISSING, f"not cached: {where}", fix)
    tokenizer = ("tokenizer.model",) if encoder == "semantic" else ("tokenizer.json", "tokenizer.model")
    if cached_file(source, revision, tokenizer) is None:
        return Check(row, MISSING, f"{' or '.join(tokenizer)} not cached: {where}", fix)
    shards = (
        sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        if weights.suffix == ".json"
        else []
    )
    absent = [s for s in shards if cached_file(source, revision, (s,)) is None]
    if absent:
        return Check(row, MISSING, f"{len(absent)} of {len(shards)} shards not cached: {where}", fix)
    commit = _commit(weights)
    detail = f"cached: {source} commit {commit} ({len(shards) or 1} weight file(s))"
    if revision != commit:
        detail += f"; extract.{encoder}.revision {revision!r} is a branch, not a commit"
        return Check(row, WARN, detail, f"set extract.{encoder}.revision: {commit} in params.yaml")
    return Check(row, OK, detail)


# The safetensors twin timm and open_clip try before a pickled file (timm.models._hub._get_safe_alternatives).
SAFE_TWINS = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}


def _candidates(filename: str) -> tuple[str, ...]:
    """The files the libraries try for a hub weight name, in their order."""
    if filename.endswith(".bin"):
        return (SAFE_TWINS.get(filename, filename[: -len(".bin")] + ".safetensors"), filename)
    return (filename,)


def hub_weights(encoder: str, extract: dict[str, Any]) -> tuple[str, str, tuple[str, ...]] | str:
    """(hub repo, revision, candidate weight files) that timm / open_clip load for ``extract.<encoder>``,
    or why none can be named (an unknown tag, weights from a URL). Both libraries load the repo's main
    unless their registry pins ``repo@revision``."""
    cfg = extract[encoder]
    if encoder == "vit":
        from timm.models import get_pretrained_cfg

        name = f"{cfg['model']}.{cfg['pretrained']}"
        found = get_pretrained_cfg(name)
        if found is None:
            return f"timm knows no {name} (extract.vit.model, pretrained)"
        if not found.hf_hub_id:
            return f"timm loads {name} from a URL, not the hub: {found.url}"
        repo, _, revision = found.hf_hub_id.partition("@")
        return repo, revision or "main", _candidates(found.hf_hub_filename or "pytorch_model.bin")
    import open_clip

    name = f"{cfg['model']} / {cfg['pretrained']}"
    found = open_clip.get_pretrained_cfg(cfg["model"], cfg["pretrained"])
    if not found:
        return f"open_clip knows no {name} (extract.clip.model, pretrained)"
    if not found.get("hf_hub"):
        return f"open_clip loads {name} from a URL, not the hub: {found.get('url')}"
    repo, filename = os.path.split(found["hf_hub"])  # "org/name/": open_clip's default file name
    return repo, "main", _candidates(filename or "open_clip_pytorch_model.bin")


def _commit(path: Path) -> str:
    """The commit of a cached file: the folder under ``snapshots/``."""
    return path.parts[path.parts.index("snapshots") + 1]


def check_library_weights(encoder: str, extract: dict[str, Any]) -> Check:
    row = f"weights {encoder}"
    found = hub_weights(encoder, extract)
    if isinstance(found, str):
        return Check(row, WARN, f"{found}; not checked", "run the extract stage once online")
    repo, revision, files = found
    cached = cached_file(repo, revision, files)
    if cached is None:
        detail = f"not cached: {repo} ({' or '.join(files)}) at revision {revision} in {hub_cache()}"
        return Check(row, MISSING, detail, _download(repo, revision))
    return Check(row, OK, f"cached: {repo} commit {_commit(cached)}")


def check_weights(params: dict[str, Any], profile: str, root: Path) -> list[Check]:
    if profile == "demo":
        return [Check("weights", OK, "not needed by the demo (random encoders built from seeds)")]
    checks = {
        "semantic": lambda: check_semantic_weights(params["extract"], root),
        "vit": lambda: check_library_weights("vit", params["extract"]),
        "clip": lambda: check_library_weights("clip", params["extract"]),
    }
    vlms = [check_semantic_weights(params["extract"], root, name) for name in params.get("vlms", [])]
    return [checks[e]() for e in params["encoders"] if e in checks] + vlms


def run_checks(params: dict[str, Any], profile: str, datasets: list[str], root: Path) -> list[Check]:
    """Every check for a run of ``profile`` on ``datasets``, paths relative to the project ``root``.

    ``params`` needs the sections encoders, runtime, data and extract of params.yaml.
    """
    checks = [check_torch(), check_gpu(params, profile)]
    stores: list[Check] = []
    needed = 0
    for name in datasets:
        check, counted = check_dataset(name, params, root)
        checks.append(check)
        if counted is not None and profile == "paper":
            store, size = check_stores(name, params, counted)
            stores.append(store)
            needed += size
    if profile == "paper":
        checks += [*stores, check_disk(root, needed)]
    else:
        checks.append(Check("disk", OK, "demo stores are a few MB"))
    return checks + check_weights(params, profile, root)
