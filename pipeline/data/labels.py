"""Label-file loaders: each turns a publisher's file into the manifest, without touching any image.

Rows keep the file's order (IP-IQA's AGIQA-1k split walks the rows in that order) and the file's row
numbers as the index (see manifest.py). `image_dir` (every loader) is prefixed to each image name to
form `path`, for layouts that keep the images in a sub-folder of the dataset root.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from difflib import get_close_matches
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.manifest import MANIFEST_COLUMNS, ManifestError, validate_manifest

# Where each public dataset comes from and how its images must lie; quoted by every "not found" error.
DATASET_GUIDES: dict[str, str] = {
    "agiqa3k": (
        "AGIQA-3K (Li et al., TCSVT 2023, MIT licence): labels data.csv and the images (AGIQA-3K.zip, "
        "Google Drive or Baidu links) from https://github.com/lcysyzxdxc/AGIQA-3k-Database. Unzip so "
        "the 2,982 images lie directly in the dataset root, e.g. <root>/AttnGAN_normal_000.jpg."
    ),
    "agiqa1k": (
        "AGIQA-1K (Zhang et al., 2023, MIT licence): labels AIGC_MOS_Zscore.xlsx and the images "
        "(file.zip, Google Drive or Baidu links) from https://github.com/lcysyzxdxc/AGIQA-1k-Database. "
        "Unzip so the 1,080 images lie directly in the dataset root, e.g. <root>/deepai_0_0_0_0.jpg."
    ),
    "aigcqa20k": (
        "AIGIQA-20K (NTIRE 2024 AIGC quality track): info_train.csv and the training images from "
        "https://www.modelscope.cn/datasets/lcysyzxdxc/AIGCQA-30K-Image. Put the 14,000 images named in "
        "info_train.csv directly in the dataset root, e.g. <root>/DALLE2_0000.png."
    ),
    "demo": "The demo: drawn by the generate_demo stage (dvc repro generate_demo).",
    "csv": (
        "Your own data: a CSV with one row per image (image file name relative to the dataset root, "
        "MOS, optionally prompt, alignment MOS and generator) and the images under the dataset root."
    ),
}

# AGIQA-1K name codes, from the publisher's README: <model>_<mainObject>_<secondObject>_<place>_<style>.
AGIQA1K_OBJECTS = (
    "bird", "cat", "dog", "batman", "snoppy", "teddy bear", "kid", "man", "woman", "alien", "demon", "witch",
)  # fmt: skip
AGIQA1K_ACTIONS = (
    "driving aircraft", "driving bike", "driving car", "having hamburger", "having icecream",
    "having pizza", "playing baseball", "playing football", "playing yoga", "using CD", "using laptop",
    "using phone", "wearing coat", "wearing hat", "wearing shirt",
)  # fmt: skip
AGIQA1K_PLACES = ("city", "wild")
AGIQA1K_STYLES = ("anime style", "realistic style")
# Publisher defects, handled by name so that any other irregularity still stops the load.
AGIQA1K_XLSX_DUPLICATE = "dreamStudio_8_9_1_1.jpg"
AGIQA1K_CSV_RENAMES = {"dreamStudio_8_9_1_.jpg": "dreamStudio_8_9_1_1.jpg"}


def _with_hint(column: str, have: list[str]) -> str:
    close = get_close_matches(column, have, 1)
    return f"{column!r} (did you mean {close[0]!r}?)" if close else repr(column)


def _read_table(labels: Path, required: list[str], kind: str) -> pd.DataFrame:
    """Read a CSV (UTF-8, with or without BOM) or xlsx as text (MOS stays raw so validation can quote a
    bad cell), index = file row. An empty, header-only, non-UTF-8 or unparsable file, or missing
    columns, is a ``ManifestError`` naming the file, before any image is read."""
    labels = Path(labels)
    if not labels.is_file():
        raise FileNotFoundError(f"label file {labels} not found. {DATASET_GUIDES[kind]}")
    try:
        if labels.suffix.lower() in (".xlsx", ".xls"):
            df = pd.read_excel(labels, dtype=str)
        else:
            df = pd.read_csv(
                labels, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig"
            )
    except pd.errors.EmptyDataError:
        raise ManifestError(
            f"{labels}: the file is empty; expected a header with columns {required}"
        ) from None
    except UnicodeDecodeError as e:
        raise ManifestError(
            f"{labels}: not UTF-8 text (byte {e.object[e.start : e.start + 1]!r} at offset {e.start}); "
            "save it as UTF-8"
        ) from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        raise ManifestError(f"{labels}: not a readable label table ({type(e).__name__}: {e})") from None
    df = df.fillna("")
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        hints = [_with_hint(c, list(df.columns)) for c in missing]
        raise ManifestError(f"{labels}: missing columns {', '.join(hints)}; has {list(df.columns)}")
    if df.empty:
        raise ManifestError(f"{labels}: a header and no rows: no images to prepare")
    df.index = pd.RangeIndex(2, len(df) + 2)
    return df


def _image_path(names: pd.Series, image_dir: str) -> pd.Series:
    return names.map(lambda n: posixpath.join(image_dir, n) if image_dir else n)


def load_agiqa3k(labels: Path, image_dir: str = "") -> pd.DataFrame:
    """AGIQA-3K `data.csv`: names `<generator>_<variant>_<NNN>.jpg`, NNN = prompt index = group.

    The file has CRLF line endings, which pandas' C parser reads as plain line ends. The group is the
    prompt index as a plain integer string ("0".."299"), which lets `ipiqa_grouped` draw its
    permutation of 300 exactly as IP-IQA does. adj1, adj2, style and the two std columns are dropped.
    """
    df = _read_table(labels, ["name", "prompt", "mos_quality", "mos_align"], "agiqa3k")
    names = df["name"].str.strip()
    parts = names.str.rsplit(".", n=1).str[0].str.split("_")
    malformed = (parts.str.len() != 3) | ~parts.str[-1].str.isdigit()
    if malformed.any():
        row = df.index[malformed.to_numpy()][0]
        raise ManifestError(
            f"{labels}, row {row}: name {names[row]!r} is not <generator>_<variant>_<NNN>.<ext>"
        )
    manifest = pd.DataFrame(
        {
            "image_id": names,
            "path": _image_path(names, image_dir),
            "prompt": df["prompt"],
            "mos_quality": df["mos_quality"],
            "mos_align": df["mos_align"],
            "group": parts.str[2].astype(int).astype(str),
            "generator": parts.str[0],
            "variant": parts.str[1],
        },
        index=df.index,
    )
    return validate_manifest(manifest, str(labels))


def agiqa1k_codes(name: str) -> tuple[str, int, int, int, int]:
    """(model, object, action, place, style) codes of an AGIQA-1K name, on the README's shared tables.

    dreamStudio files number their objects without "kid" (6) and their actions from "having pizza" (5);
    IP-IQA maps them back with +1 for objects above 5 and +5 for actions, as done here.
    """
    parts = name.rsplit(".", 1)[0].split("_")
    if len(parts) != 5 or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"AGIQA-1K name {name!r} is not <model>_<object>_<action>_<place>_<style>.<ext>")
    obj, action, place, style = (int(p) for p in parts[1:])
    if name.startswith("dream"):
        obj, action = obj + (obj > 5), action + 5
    return parts[0], obj, action, place, style


def agiqa1k_prompt(name: str) -> str:
    """The prompt the publisher's xlsx gives for a name, rebuilt from the README's code tables."""
    _, obj, action, place, style = agiqa1k_codes(name)
    tables = (AGIQA1K_OBJECTS, AGIQA1K_ACTIONS, AGIQA1K_PLACES, AGIQA1K_STYLES)
    return ", ".join(table[code] for table, code in zip(tables, (obj, action, place, style), strict=True))


def load_agiqa1k(labels: Path, image_dir: str = "") -> pd.DataFrame:
    """AGIQA-1K from `AIGC_MOS_Zscore.xlsx` (default, z-scored MOS) or `AIGC_all.csv` (raw MOS).

    Group = IP-IQA's object-label key "<object>_<action>" (180 keys), so a main object doing one action
    stays on one side of a split; generator = the file-name model (deepai = Stable Diffusion v2.0,
    dreamStudio = Stable Inpainting v1.0).

    Publisher defects:
    - The xlsx names dreamStudio_8_9_1_1.jpg twice (file rows 1080 and 1081, MOS 0.441 and 2.084) and
      lacks dreamStudio_8_5_0_0.jpg. Both rows are kept, since IP-IQA trains on both and its split
      sizes count them; the second gets image_id "dreamStudio_8_9_1_1.jpg#2" (same path, same image).
      Which row was meant for the missing image cannot be told from the files, so none is renamed.
      Rows stay in file order so the IP-IQA group walk sees them as the file has them.
    - The csv has no prompts (rebuilt from the name with the README's code tables, which reproduce the
      xlsx prompts exactly) and writes dreamStudio_8_9_1_1.jpg as "dreamStudio_8_9_1_.jpg", read
      here under its proper name. Its row order differs from the xlsx, so IP-IQA's split on it is not
      the paper's.
    """
    labels = Path(labels)
    if labels.suffix.lower() == ".csv":
        df = _read_table(labels, ["Image", "Score"], "agiqa1k")
        names = df["Image"].str.strip().replace(AGIQA1K_CSV_RENAMES)
        mos = df["Score"]
    else:
        df = _read_table(labels, ["Image", "Prompt", "MOS"], "agiqa1k")
        names = df["Image"].str.strip()
        mos = df["MOS"]
    codes = []
    for row, name in names.items():
        try:
            codes.append(agiqa1k_codes(name))
        except ValueError as err:
            raise ManifestError(f"{labels}, row {row}: {err}") from None
    ids = names.copy()
    repeat = names.groupby(names).cumcount()
    known = (names == AGIQA1K_XLSX_DUPLICATE) & (repeat == 1)
    ids[known] = names[known] + "#2"
    prompts = df["Prompt"] if "Prompt" in df.columns else names.map(agiqa1k_prompt)
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "path": _image_path(names, image_dir),
            "prompt": prompts,
            "mos_quality": mos,
            "mos_align": np.nan,
            "group": [f"{obj}_{action}" for _, obj, action, _, _ in codes],
            "generator": [model for model, *_ in codes],
            "variant": "",
        },
        index=df.index,
    )
    return validate_manifest(manifest, str(labels))


def load_aigcqa20k(labels: Path, image_dir: str = "") -> pd.DataFrame:
    """AIGIQA-20K `info_train.csv` (the 14,000 labelled NTIRE 2024 training images).

    Generator = the name's prefix before the first "_" (12 of them); group = the prompt text (13,624
    distinct prompts); the single MOS mixes quality and alignment and is used as `mos_quality`.
    """
    df = _read_table(labels, ["name", "prompt", "mos"], "aigcqa20k")
    names = df["name"].str.strip()
    no_prefix = ~names.str.contains("_", regex=False)
    if no_prefix.any():
        row = df.index[no_prefix.to_numpy()][0]
        raise ManifestError(f"{labels}, row {row}: name {names[row]!r} is not <generator>_<id>.<ext>")
    manifest = pd.DataFrame(
        {
            "image_id": names,
            "path": _image_path(names, image_dir),
            "prompt": df["prompt"],
            "mos_quality": df["mos"],
            "mos_align": np.nan,
            "group": df["prompt"].str.strip(),
            "generator": names.str.split("_", n=1).str[0],
            "variant": "",
        },
        index=df.index,
    )
    return validate_manifest(manifest, str(labels))


def load_csv(
    labels: Path, columns: dict[str, str], group: str = "prompt", image_dir: str = ""
) -> pd.DataFrame:
    """A user's own CSV (or xlsx). `columns` maps manifest fields to the file's column names.

    columns: `image` (file name or path relative to the dataset root, required), `mos_quality`
        (required), `prompt`, `mos_align`, `generator` (optional; missing ones become "", NaN, "").
    group: "prompt" (the default: images of one prompt stay together), "image" (every image its own
        group, i.e. image-level splits), or the name of a column of the file (e.g. a prompt id).
    Example params: {columns: {image: file, prompt: text, mos_quality: mos}, group: prompt}.
    """
    known = {"image", "mos_quality", "prompt", "mos_align", "generator"}
    unknown = sorted(set(columns) - known)
    if unknown or not {"image", "mos_quality"} <= set(columns):
        raise ValueError(
            f"csv loader: columns needs image and mos_quality (known: {sorted(known)}); got {sorted(columns)}"
        )
    extra = [] if group in ("prompt", "image") else [group]
    if group == "prompt" and "prompt" not in columns:
        raise ValueError("csv loader: group 'prompt' needs a prompt column in columns")
    df = _read_table(labels, [*columns.values(), *extra], "csv")
    names = df[columns["image"]].str.strip()
    prompts = df[columns["prompt"]].str.strip() if "prompt" in columns else pd.Series("", index=df.index)
    groups = {"prompt": prompts, "image": names}[group] if group in ("prompt", "image") else df[group]
    manifest = pd.DataFrame(
        {
            "image_id": names,
            "path": _image_path(names, image_dir),
            "prompt": prompts,
            "mos_quality": df[columns["mos_quality"]],
            "mos_align": df[columns["mos_align"]] if "mos_align" in columns else np.nan,
            "group": groups,
            "generator": df[columns["generator"]] if "generator" in columns else "",
            "variant": "",
        },
        index=df.index,
    )
    return validate_manifest(manifest, str(labels))


def load_manifest_csv(labels: Path, image_dir: str = "") -> pd.DataFrame:
    """A label file already in the manifest's layout (the demo's labels.csv)."""
    df = _read_table(labels, list(MANIFEST_COLUMNS), "demo")
    return validate_manifest(df.assign(path=_image_path(df["path"], image_dir)), str(labels))


LOADERS: dict[str, Callable[..., pd.DataFrame]] = {
    "agiqa3k": load_agiqa3k,
    "agiqa1k": load_agiqa1k,
    "aigcqa20k": load_aigcqa20k,
    "csv": load_csv,
    "demo": load_manifest_csv,
}


def load_labels(kind: str, labels: Path, **options) -> pd.DataFrame:
    """Read a label file of the given kind into a validated manifest; no image is opened."""
    if kind not in LOADERS:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {sorted(LOADERS)}")
    return LOADERS[kind](Path(labels), **options)
