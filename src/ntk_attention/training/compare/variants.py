"""Variants of a comparison: ``LABEL=METHOD:KEY=VALUE:...`` specs, their checks and learning-rate grids."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .. import methods
from ..options import parse_options

BASE = "base"  # the untuned model, scored but not trained
VARIANT_METHODS = methods.NAMES + (BASE,)


@dataclass
class Variant:
    label: str
    method: str
    config: list[str] = field(default_factory=list)
    init_from: str | None = None  # label of a prefix variant whose adapters start this NTK variant
    seeds: int | None = None  # run only the first N of --seeds (None: all)


VARIANT_KEYS = ("init_from", "seeds")  # keys of a variant spec that are compare's own, not config fields


def parse_variant(spec: str) -> Variant:
    """``METHOD`` or ``LABEL=METHOD:KEY=VALUE:KEY=VALUE`` (e.g. ``prefix-m64=prefix:num_virtual_tokens=64``).
    Two keys are not config fields: ``init_from=LABEL`` names the prefix variant an NTK variant starts
    from, ``seeds=N`` runs only the first N seeds."""
    label, sep, rest = spec.partition("=")
    if not sep:
        label, rest = spec, spec
    elif ":" in label:
        raise ValueError(f"--variants {spec!r}: a spec with keys needs a label first, LABEL=METHOD:KEY=VALUE "
                         f"(e.g. {label.split(':')[0]}={spec})")
    method, *items = rest.split(":")
    if method not in VARIANT_METHODS:
        raise ValueError(f"--variants {spec!r}: unknown method {method!r}; expected one of {VARIANT_METHODS}")
    if not label or "/" in label:
        raise ValueError(f"--variants {spec!r}: the label must be a plain name")
    own = dict(item.split("=", 1) for item in items if item.partition("=")[0] in VARIANT_KEYS)
    config = [item for item in items if item.partition("=")[0] not in VARIANT_KEYS]
    if method == BASE and (config or own):
        raise ValueError(f"--variants {spec!r}: the untuned base takes no config")
    if "init_from" in own and method != "ntk":
        raise ValueError(f"--variants {spec!r}: init_from starts an ntk variant from a prefix variant")
    seeds = own.get("seeds")
    if seeds is not None and not (seeds.isdigit() and int(seeds) >= 1):
        raise ValueError(f"--variants {spec!r}: seeds must be a count >= 1")
    return Variant(label, method, config, own.get("init_from"), int(seeds) if seeds else None)


def check_starts(variants: list[Variant]) -> None:
    """Each ``init_from`` names a prefix variant listed before it (so it is trained first)."""
    seen = {}
    for variant in variants:
        if variant.init_from is not None and seen.get(variant.init_from) != "prefix":
            raise ValueError(f"--variants: {variant.label!r} starts from {variant.init_from!r}, which must be a "
                             f"prefix variant listed before it")
        seen[variant.label] = variant.method


def check_configs(variants: list[Variant], task: str) -> None:
    """Every variant's config builds before the first run starts: a stale or misspelt field fails here,
    naming the variant, not hours later in the run that uses it."""
    # Without --task (or with auto) the task comes from the data's columns in each run; only the fields are checked here.
    task = "classification" if task in (None, "auto") else task
    for variant in variants:
        if variant.method == BASE:
            continue
        try:
            methods.method_config(variant.method, task, parse_options(variant.config))
        except (TypeError, ValueError) as err:
            raise ValueError(f"--variants {variant.label!r}: {err}") from None


def default_grid(method: str) -> list[float]:
    return [] if method == BASE else list(methods.get_method(method).learning_rate_grid)


def parse_grid(specs: list[str], variants: list[Variant]) -> dict[str, list[float]]:
    """Learning-rate grid per variant: method defaults, overridden by ``LABEL_OR_METHOD=lr,lr``."""
    rates_by_key = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep:
            raise ValueError(f"--lr-grid {spec!r}: expected VARIANT_OR_METHOD=lr,lr,... naming one of "
                             f"{sorted(v.label for v in variants)}")
        try:
            rates_by_key.append((key, [float(value) for value in values.split(",")]))
        except ValueError:
            raise ValueError(f"--lr-grid {spec!r}: learning rates must be numbers") from None
    return assign_grid(rates_by_key, variants, source="--lr-grid")


def assign_grid(rates_by_key, variants: list[Variant], source: str) -> dict[str, list[float]]:
    """Each variant's grid: its method's default, replaced by every ``(label or method, rates)`` that
    names it, in order (the later wins)."""
    grid = {v.label: default_grid(v.method) for v in variants}
    for key, rates in rates_by_key:
        targets = [v.label for v in variants if key in (v.label, v.method)]
        if not targets:
            raise ValueError(f"{source} {key!r}: names none of the variants {sorted(grid)} or their methods")
        for label in targets:
            grid[label] = list(rates)
    return grid


def variant_fields(variant: Variant, task: str | None) -> dict:
    """The tuner fields ``variant`` resolves to today, defaults included ({} for LoRA, full, head, base)."""
    if variant.method == BASE:
        return {}
    return methods.method_fields(methods.method_config(variant.method, task, parse_options(variant.config)))


def expected_seeds(variant: Variant, seeds: list[int]) -> list[int]:
    """The seeds a variant's row holds: every seed for a main row, the first for the others, none for base."""
    return [] if variant.method == BASE else seeds[:variant.seeds or len(seeds)]


def first_seed_only(variant: Variant, main_variants: list[str]) -> Variant:
    """``variant`` limited to the first seed unless it is a main row (or says how many seeds it runs):
    the main rows run every seed, the other points of the curves one."""
    if not main_variants or variant.label in main_variants or variant.seeds or variant.method == BASE:
        return variant
    return replace(variant, seeds=1)
