"""NTKConfig: what an NTK-Attention adapter is made of."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...ops import FeatureMap, get_feature_map
from ..config import AdapterConfig, check_number

K_PARAMETRIZATIONS = ("nonneg", "softplus", "signed")
Z_PARAMETRIZATIONS = ("tied", "free")
# Feature-map options as separate keywords (older files, ``--config num_features=64``) -> the map's option name.
FEATURE_OPTION_KEYWORDS = {"num_features": "num_features", "degree": "degree", "seed": "seed", "feature_seed": "seed",
                           "normalize": "normalize"}


def fold_feature_options(options: dict) -> dict:
    """``options`` with ``num_features`` / ``degree`` / ``feature_seed`` / ``seed`` / ``normalize`` folded into the
    ``feature_map`` spec (``{"feature_map": "random", "num_features": 64}`` -> ``"random:num_features=64:seed=0"``).
    None values (absent options in older files) are dropped."""
    options = dict(options)
    keywords = {FEATURE_OPTION_KEYWORDS[k]: options.pop(k) for k in list(options) if k in FEATURE_OPTION_KEYWORDS}
    keywords = {k: v for k, v in keywords.items() if v is not None}
    if keywords:
        name = options.get("feature_map", NTKConfig.feature_map)
        try:
            options["feature_map"] = get_feature_map(name, **keywords).spec()
        except (TypeError, ValueError) as err:
            raise ValueError(f"NTKConfig.feature_map={name!r} with {keywords}: {err}") from None
    return options


@dataclass
class NTKConfig(AdapterConfig):
    """NTK-Attention: per attention layer and query head a state ``Z [r, d_v]`` and ``k [r]`` with

        out_i = (sum_l e^{s_il} v_l + phi(q_i)^T Z) / (sum_l e^{s_il} + phi(q_i)^T k).

    Defaults are the paper's shape: every attention layer, ``r = d`` features, a full ``Z`` and
    ``k`` per head, i.e. ``layers x heads x (d^2 + d)`` trainable numbers. The features are positive
    random features, not the authors' ``elu``: on the benchmark suite they train better at the same
    count (docs/default.md has the figures; ``feature_map="elu"`` gives the paper's map).

    virtual_prefix_length (m): ``Z`` and ``k`` are stored as per-token averages and multiplied by
        m, which is what a real prefix of m tokens gives (``Z = sum_j phi(kP_j) vP_j^T``). With Adam
        this sets how fast the prefix can grow against the input's own ``sum e^s``: at m = 1 (the
        paper) the adapter barely moves at learning rates used for LoRA. Too large a product
        ``lr * m`` (about 1 and up with Adam; 0.2 with a free ``Z``) lets the prefix drown the input in
        the first steps and training collapses. The default 32 learns from lr 1e-3 to 1e-2
        (``benchmarks/results/sst2-minilm-scale.md``); scale m down as the learning rate goes up.
    feature_map: ``phi`` as a spec string, a registered name with options: "random:seed=0" (default:
        positive random features, r = d), "random:num_features=256:seed=0" (r = 256), "elu" (the
        authors' map, r = d, the default before 0.2.0), "taylor:degree=2" (or 1); a map a
        user registered with ``@register_feature_map(name)`` works the same way and is saved by name.
        The canonical spec is stored (``"random:64"`` becomes ``"random:num_features=64:seed=0"``;
        ``"random"`` alone, ``"random:seed=0"``, has r = d features).
    rank: None for a full ``Z``; an even s <= min(r, d_v) for ``Z = A B - A' B'`` (``W`` in the tied form; r x s/2
        times s/2 x d_v twice) whose two halves start equal, so it is 0 at the start while every
        factor gets a gradient.
    rank_init_std: standard deviation of the low-rank factors at the start.
    k_parametrization: "nonneg" (default): ``k = max(theta, 0)`` started at ``k_init``, with the
        gradient of a projection so ``k`` trains from the first step even at 0;
        "softplus": ``k = softplus(theta)`` (the authors' code; ``k_init > 0``, not an identity start);
        "signed": ``k = theta`` unconstrained, for closed-form conversions with Taylor features, whose
        ``k = sum phi(K)`` has negative entries although ``phi(q)^T k`` (a sum of ``1 + s + s^2/2``) is
        positive. The operator clamps ``phi(q)^T k`` at 0, so a fine-tune that drives it below 0 drops
        the prefix's mass in that row: train from scratch with "nonneg".
    k_init: the per-token average ``k / m`` at the start. The default 0 starts exactly at the
        pretrained model (``Z = 0``, ``k = 0``): wrapping changes no logit until training does, and
        every tensor still gets a gradient on the first step (``W`` through ``_Gated``, ``k``
        through the denominator). The authors' start mass (``m k = 0.018``, ``k_init = 0.018 / 32``)
        moves SmolLM2-135M's logits by up to 23 before any training
        (``benchmarks/results/ntk_start_gap.md``); both starts compared in docs/default.md.
    z_parametrization: "tied" (default): ``Z = diag(k) W``, as in a real prefix: every feature f of
        ``phi`` is one virtual token of mass ``phi_f(q) k_f`` and value ``W_f`` (``W`` stored / m like
        ``k``, so Adam moves both by about ``m * lr`` a step). With a non-negative feature map the
        NTK term is then a weighted average of the input's values and the ``W_f``, bounded however
        small the input's own mass ``sum_l e^{s_il}`` is. That matters in causal decoders: the first
        query sees only itself (``sum e^s ~ 1``, lower in some heads) and later layers use that
        token as the attention sink. "free": ``Z`` trained on its own (the paper's form); one Adam
        step at lr 1e-3 and m = 32 then adds ``phi(q)^T Z`` of norm ~10 where ``phi(q)^T k`` may be
        ~0, and SmolLM2-135M's loss goes from 1.6 to 8. Both start at ``Z = 0`` (``W = 0``);
        ``W`` trains from the first step on the gradient a free ``Z`` would get, as if its gate
        ``k_f`` were open (at ``k_f = 0`` the true gradient is 0). Files written before this field
        existed load as "free".
    per_kv_head: one ``(Z, k)`` per key/value head, shared by its group of query heads, as a real
        prefix is under grouped-query attention (and as a closed-form conversion needs); fewer
        parameters by the group size (3 on SmolLM2-135M, where it trained more steadily over seeds
        on GSM8K but not better on average: ``benchmarks/results/gsm8k-smollm2.md``). Default False:
        one per query head (the paper).
    feature_dropout: dropout on ``phi(q)`` during training (off in eval).
    """

    PEFT_TYPE = "NTK"
    # On the suite random features chose 3e-3 (SST-2, CoLA) and 1e-2 (CB, WikiText-2) from 1e-3..1e-2.
    default_learning_rate: ClassVar[float] = 3e-3
    learning_rate_grid: ClassVar[tuple[float, ...]] = (1e-3, 3e-3, 1e-2)
    changed_defaults: ClassVar[dict[str, str]] = {"feature_map": "'elu' before 0.2.0, 'random:seed=0' since"}

    feature_map: str = "random"
    rank: int | None = None
    rank_init_std: float = 0.1
    virtual_prefix_length: float = 32.0
    k_parametrization: str = "nonneg"
    k_init: float = 0.0
    z_parametrization: str = "tied"
    per_kv_head: bool = False
    feature_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.feature_map, str):
            raise TypeError("NTKConfig.feature_map must be a spec string ('elu', 'random:num_features=256:seed=0', "
                            f"'taylor:degree=2' or a registered name), got {type(self.feature_map).__name__}; "
                            "register a FeatureMap subclass with @register_feature_map(name) to use your own")
        self.feature_map = self.build_feature_map().spec()  # validates the name and options; canonical form
        if self.rank is not None:
            check_number("NTKConfig", "rank", self.rank, integer=True, minimum=2)
            if self.rank % 2:
                raise ValueError(f"NTKConfig.rank must be None (full Z) or an even int >= 2, got {self.rank!r}")
        check_number("NTKConfig", "rank_init_std", self.rank_init_std, minimum=0)
        check_number("NTKConfig", "virtual_prefix_length", self.virtual_prefix_length, above=0)
        check_number("NTKConfig", "k_init", self.k_init, minimum=0)
        check_number("NTKConfig", "feature_dropout", self.feature_dropout, minimum=0, below=1)
        if self.k_parametrization not in K_PARAMETRIZATIONS:
            raise ValueError(f"NTKConfig.k_parametrization must be one of {K_PARAMETRIZATIONS}, got {self.k_parametrization!r}")
        if self.z_parametrization not in Z_PARAMETRIZATIONS:
            raise ValueError(f"NTKConfig.z_parametrization must be one of {Z_PARAMETRIZATIONS}, got {self.z_parametrization!r}")
        if self.k_parametrization == "softplus" and not self.k_init > 0:
            raise ValueError(f"NTKConfig.k_init must be > 0 with k_parametrization='softplus', got {self.k_init!r}")
        if not isinstance(self.per_kv_head, bool):
            raise TypeError(f"NTKConfig.per_kv_head must be True or False, got {self.per_kv_head!r}")

    def build_feature_map(self) -> FeatureMap:
        try:
            return get_feature_map(self.feature_map)
        except (TypeError, ValueError) as err:
            raise ValueError(f"NTKConfig.feature_map={self.feature_map!r}: {err}") from None
