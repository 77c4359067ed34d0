"""Read params.yaml, after checking all of it against its schema.

The file is read as YAML 1.2, as DVC reads and writes it: ``dvc exp run -S lr=1e-5`` writes ``1e-05``,
a float to DVC and to us (YAML 1.1 readers such as PyYAML's would see a string).

Every stage loads its declared keys through ``load``, which first validates the whole file: a typo,
a wrong type, ``fusion.experts: 0``, a negative learning rate, an unknown head, protocol, dataset or
encoder, a dataset listed twice or a profile spelled ``Paper`` stops the first stage that runs,
before any work, with one ``ParamsError`` listing every problem by its dotted key, the value found
and what is allowed. The schema is data (``SCHEMA``); names that registries own (encoders, heads)
are asked of the registries, which import no model code to answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import get_close_matches
from functools import cache
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.encoders import PROMPT_FEATURES


class ParamsError(ValueError):
    """params.yaml does not fit its schema; the message lists every problem."""


@dataclass(frozen=True)
class Num:
    """An int (with ``real``, an int or a float; never a bool) in [lo, hi]; ``open_lo``: lo excluded."""

    lo: float | None = None
    hi: float | None = None
    real: bool = False
    open_lo: bool = False

    def check(self, value: Any) -> str | None:
        kinds = (int, float) if self.real else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"{value!r} is not {'a number' if self.real else 'an integer'}"
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            return f"{value!r} is {'not above' if self.open_lo else 'below'} the minimum {self.lo}"
        if self.hi is not None and value > self.hi:
            return f"{value!r} is above the maximum {self.hi}"
        return None


@dataclass(frozen=True)
class One:
    """One of fixed values (compared with their types: True is not 'true')."""

    values: tuple

    def check(self, value: Any) -> str | None:
        ok = any(value == v and type(value) is type(v) for v in self.values)
        return None if ok else f"{value!r} is not one of {', '.join(map(str, self.values))}"


@dataclass(frozen=True)
class Text:
    pattern: str = r".*"
    meaning: str = "a string"

    def check(self, value: Any) -> str | None:
        if isinstance(value, str) and re.fullmatch(self.pattern, value, re.S):
            return None
        return f"{value!r} is not {self.meaning}"


@dataclass(frozen=True)
class Many:
    """A list of ``item``, at least ``min_len`` long, without repeats when ``unique``."""

    item: Any
    min_len: int = 1
    unique: bool = True


@dataclass(frozen=True)
class Section:
    """A mapping with these keys (those in ``optional`` may be absent); with ``named``, any other key is
    a named entry checked against it (which names may appear is a rule between keys, ``_relations``)."""

    keys: dict
    optional: frozenset = frozenset()
    named: Any = None


@dataclass(frozen=True)
class MapOf:
    """A mapping of free names to ``value``."""

    value: Any


@dataclass(frozen=True)
class Either:
    """The first spec that fits; the error of the last otherwise."""

    specs: tuple


INT0, INT1 = Num(0), Num(1)
SEED = Num(0)
PROB = Num(0, 1, real=True)
DROPOUT = Num(0, 0.99, real=True)
POSITIVE = Num(0, real=True, open_lo=True)
NAME = Text(r"[A-Za-z0-9_.-]+", "a name (letters, digits, _ . -)")
ANY_TEXT = Text(r".*", "a string")
OUTPUTS = Either((One(("auto",)), Many(One(("quality", "alignment")))))
RECIPE = Section(
    {
        "epochs": INT1,
        "batch_size": INT1,
        "lr": POSITIVE,
        "weight_decay": Num(0, real=True),
        "optimizer": One(("adam", "adamw")),
        "schedule": One(("constant", "cosine_epoch", "cosine_step")),
    },
    frozenset({"weight_decay", "optimizer", "schedule"}),
)
GENERATE = Section({"seed": SEED, "n_prompts": INT1, "images_per_prompt": INT1, "size": Num(8)})
DATASET = Section(
    {
        "kind": One(("demo", "agiqa3k", "agiqa1k", "aigcqa20k", "csv")),
        "labels": ANY_TEXT,
        "on_bad_image": One(("error", "skip")),
        "options": MapOf(None),
        "generate": GENERATE,
    },
    frozenset({"on_bad_image", "options", "generate"}),
)
# A transformers image-text-to-text entry: extract.<name> for each name in `vlms`.
VLM = Section(
    {
        "checkpoint": ANY_TEXT,
        "revision": ANY_TEXT,
        "prompts": Many(Text(r".*\S.*", "a non-blank prompt")),
        "pooling": One(("mean", "last", "mean_visual", "mean_text")),
        "hidden_layer": Num(),
        "max_side": INT1,
        "zeroshot": Many(One(("vqascore",)), min_len=0),
        "demo": MapOf(None),
    },
    frozenset({"zeroshot"}),
)
SCHEMA = Section(
    {
        "profile": One(("demo", "paper")),
        "datasets": Many(NAME),
        "encoders": Many("encoder"),
        "vlms": Many(NAME, min_len=0),
        "runtime": Section(
            {
                "device": Text(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"),
                "num_workers": INT0,
                "chunk_rows": INT1,
                "processes": INT1,
                "memory_budget_gb": POSITIVE,
            }
        ),
        "data": MapOf(DATASET),
        "split": Section(
            {
                "protocol": One(("grouped_kfold", "ipiqa_grouped", "ma_agiqa_random", "custom")),
                "grouped_kfold": Section({"k": Num(2), "val_fraction": Num(0, 0.9, real=True), "seed": SEED}),
                "ipiqa_grouped": Section(
                    {"repeats": INT1, "seed": SEED, "train_fraction": Num(0, 0.99, real=True, open_lo=True)}
                ),
                "ma_agiqa_random": Section({"seed": SEED}),
                "custom": Section({"path": ANY_TEXT}),
            }
        ),
        "extract": Section(
            {
                "dtype": One(("auto", "float32", "float16", "bfloat16")),
                "batch_size": INT1,
                "vit": Section(
                    {
                        "model": ANY_TEXT,
                        "pretrained": ANY_TEXT,
                        "blocks": Many(INT0),
                        "img_size": INT1,
                        "views": Many(One(("identity", "hflip", "vflip", "rot90", "rot180", "rot270"))),
                        "demo": MapOf(None),
                    }
                ),
                "clip": Section(
                    {"model": ANY_TEXT, "pretrained": ANY_TEXT, "img_size": INT1, "demo": MapOf(None)}
                ),
                "semantic": Section(
                    {
                        "checkpoint": ANY_TEXT,
                        "revision": ANY_TEXT,
                        "prompts": Many(Text(r".*\S.*", "a non-blank prompt")),
                        "prompt_template": ANY_TEXT,
                        "pooling": One(("mean", "last", "mean_visual", "mean_text")),
                        "hidden_layer": Num(),
                        "zeroshot": Many(One(("qalign", "vqascore")), min_len=0),
                        "qalign_prompt": One(("newline", "space")),
                        "demo": MapOf(None),
                    },
                    frozenset({"prompt_template", "zeroshot", "qalign_prompt"}),
                ),
            },
            named=VLM,
        ),
        "i2p": Section(
            {
                "enabled": One((True, False)),
                "pairs": ANY_TEXT,
                "images_root": ANY_TEXT,
                "min_similarity": Num(0, 0.99, real=True),
                "hflip": One((True, False)),
                "seed": SEED,
                "recipe": Section(
                    {
                        "epochs": INT1,
                        "batch_size": INT1,
                        "accum_steps": INT1,
                        "lr": POSITIVE,
                        "weight_decay": Num(0, real=True),
                    }
                ),
                "demo": GENERATE,
            }
        ),
        "train": Section(
            {
                "seed": SEED,
                "select": One(("val", "test_oracle")),
                "target_norm": One(("minmax", "zscore", "none")),
                "view_prob": PROB,
                "shuffle_labels": One((True, False)),
            }
        ),
        "probe": Section(
            {
                "encoders": Many(NAME),
                "outputs": OUTPUTS,
                "model": Section({"hidden": INT0, "dropout": DROPOUT}),
                "recipe": RECIPE,
            }
        ),
        "ma_agiqa": Section(
            {
                "variants": Many("head"),
                "ablations": Many(One(("maniqa", "semantic_only")), min_len=0),
                "semantic_encoder": NAME,
                "outputs": OUTPUTS,
                "maniqa": Section(
                    {
                        "embed_dim": INT1,
                        "dim_mlp": INT1,
                        "window_size": INT1,
                        "depths": Many(INT1, unique=False),
                        "num_heads": Many(INT1, unique=False),
                        "num_tab": INT1,
                        "scale": POSITIVE,
                        "drop_path": DROPOUT,
                        "score_act": One(("relu", "softplus")),
                    }
                ),
                "recipe": RECIPE,
            }
        ),
        "fusion": Section(
            {
                "experts": INT1,
                "streams": Many(NAME),
                "gate": One(("linear", "softmax", "mean")),
                "afm_width": INT1,
                "shared_hidden": INT1,
                "drop": DROPOUT,
            }
        ),
        "zeroshot": Section({"stores": Many(NAME, min_len=0)}),
        "ipiqa": Section(
            {
                "variants": Many("head"),
                "outputs": OUTPUTS,
                "qa_token": One(("unfrozen_wte", "appended", "none", True, False)),
                "fusion": One(("dual", "image")),
                "dropout": DROPOUT,
                "head_scale": POSITIVE,
                "recipe": RECIPE,
            }
        ),
        "evaluate": Section(
            {"bootstrap": INT0, "confidence": Num(0, 0.999, real=True, open_lo=True), "seed": SEED}
        ),
        "cross": Section(
            {"runs": Many(NAME, min_len=0), "pairs": MapOf(Section({"train": NAME, "test": NAME}))}
        ),
    }
)


@cache
def _registered(kind: str) -> tuple[str, ...]:
    """The names a registry accepts; asked once per validation (``validate`` clears the cache), since
    listing scans the installed packages' entry points."""
    if kind == "encoder":
        from pipeline.encoders import list_encoders

        return tuple(list_encoders())
    from pipeline.heads import list_heads

    return tuple(list_heads())


def _check(spec: Any, value: Any, key: str, problems: list[str]) -> None:
    """Append ``key: why`` for every way ``value`` misses ``spec``."""
    if spec is None:
        return
    if isinstance(spec, str):  # a registry's names, asked when needed
        spec = One(_registered(spec))
    if isinstance(spec, Section):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a section (a mapping), got {value!r}")
            return
        for name in value:
            if name not in spec.keys and spec.named is not None:
                _check(spec.named, value[name], _join(key, name), problems)
            elif name not in spec.keys:
                close = get_close_matches(str(name), list(spec.keys), 1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"{_join(key, name)}: unknown key{hint} (known: {', '.join(spec.keys)})")
        for name, sub in spec.keys.items():
            if name in value:
                _check(sub, value[name], _join(key, name), problems)
            elif name not in spec.optional:
                problems.append(f"{_join(key, name)}: missing")
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return
        for name, sub in value.items():
            _check(spec.value, sub, _join(key, name), problems)
    elif isinstance(spec, Many):
        if not isinstance(value, list) or len(value) < spec.min_len:
            problems.append(f"{key}: expected a list of at least {spec.min_len}, got {value!r}")
            return
        if spec.unique and (twice := sorted({str(v) for v in value if value.count(v) > 1})):
            problems.append(f"{key}: {', '.join(twice)} listed more than once")
        for i, item in enumerate(value):
            _check(spec.item, item, f"{key}[{i}]", problems)
    elif isinstance(spec, Either):
        found: list[str] = []
        for option in spec.specs:
            found = []
            _check(option, value, key, found)
            if not found:
                return
        problems.extend(found)
    elif (why := spec.check(value)) is not None:
        problems.append(f"{key}: {why}")


def _join(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def _relations(cfg: dict) -> list[str]:
    """Rules between keys, once every key has the right type."""
    problems = [f"datasets: {d!r} has no data.{d} section" for d in cfg["datasets"] if d not in cfg["data"]]
    stores = [*cfg["encoders"], *cfg["vlms"]]
    problems += [
        f"encoders: {n!r} is a kind of named entries: list them in vlms"
        for n in cfg["encoders"]
        if n == "vlm"
    ]
    problems += [f"vlms: {n!r} is also in encoders" for n in cfg["vlms"] if n in cfg["encoders"]]
    problems += [f"vlms: {n!r} has no extract.{n} section" for n in cfg["vlms"] if n not in cfg["extract"]]
    problems += [
        f"extract.{n}: unknown key (neither an encoder's section nor listed in vlms {cfg['vlms']})"
        for n in cfg["extract"]
        if n not in SCHEMA.keys["extract"].keys and n not in cfg["vlms"]
    ]
    problems += [
        f"probe.encoders: {e!r} is not in encoders or vlms {stores}"
        for e in cfg["probe"]["encoders"]
        if e not in stores
    ]
    prompt_stores = [n for n in stores if n in PROMPT_FEATURES or n in cfg["vlms"]]
    if (reads := cfg["ma_agiqa"]["semantic_encoder"]) not in prompt_stores:
        problems.append(
            f"ma_agiqa.semantic_encoder: {reads!r} is not one of the prompt-feature stores {prompt_stores}"
        )
    for name in cfg["zeroshot"]["stores"]:
        if name not in prompt_stores:
            problems.append(
                f"zeroshot.stores: {name!r} is not one of the prompt-feature stores {prompt_stores}"
            )
        elif not cfg["extract"][name].get("zeroshot"):
            problems.append(
                f"zeroshot.stores: {name!r} stores no zero-shot scores: list them in extract.{name}.zeroshot "
                f"(semantic: qalign, vqascore; a vlms entry: vqascore) or drop {name!r} from zeroshot.stores"
            )
    fusion = cfg["fusion"]
    if fusion["experts"] < len(fusion["streams"]):
        problems.append(
            f"fusion.experts: {fusion['experts']} is below the number of fusion.streams "
            f"({len(fusion['streams'])}: every stream is an expert; drop streams instead)"
        )
    for name, pair in cfg["cross"]["pairs"].items():
        problems += [
            f"cross.pairs.{name}.{side}: {pair[side]!r} is not in datasets {cfg['datasets']}"
            for side in ("train", "test")
            if pair[side] not in cfg["datasets"]
        ]
    problems += [
        f"data.{name}.generate: only for kind demo, not {data['kind']!r}"
        for name, data in cfg["data"].items()
        if "generate" in data and data["kind"] != "demo"
    ]
    return problems


def validate(cfg: Any, path: Path | str = "params.yaml") -> None:
    """Raise ``ParamsError`` listing every key of ``cfg`` that misses the schema or a rule between keys."""
    problems: list[str] = []
    _registered.cache_clear()
    _check(SCHEMA, cfg, "", problems)
    if not problems:
        problems = _relations(cfg)
    if problems:
        raise ParamsError(f"{path}: {len(problems)} problem(s), nothing was run:\n  " + "\n  ".join(problems))


def load(*keys: str, path: Path | str = "params.yaml") -> dict[str, Any]:
    """Validate the whole file, then return ``{key: value}`` for top-level or dotted keys."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run stages from the repository root")
    cfg = YAML(typ="safe", pure=True).load(path.read_text()) or {}
    validate(cfg, path)
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = cfg
        for i, part in enumerate(key.split(".")):
            if not isinstance(node, dict) or part not in node:
                have = sorted(node) if isinstance(node, dict) else []
                prefix = ".".join(key.split(".")[:i]) or "<top level>"
                raise KeyError(f"{path}: key {key!r} missing ({part!r} not under {prefix}; found {have})")
            node = node[part]
        out[key] = node
    return out
