"""Frozen, typed specs: one per method, the budget (target) types and the recipe.

A spec says *what* to do to one linear layer; the pipeline decides *which* layers (`Recipe`).
Every spec validates itself in ``__post_init__``; `recipes` reads and writes them as dicts and YAML.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import ClassVar, Union

from .errors import InputError


# --- targets: how much to remove -------------------------------------------------------------------
@dataclass(frozen=True)
class _Fraction:
    value: float
    EXAMPLE: ClassVar[float]

    def __post_init__(self):
        if not 0.0 < self.value < 1.0:
            knob = type(self).__name__.lower()
            raise InputError(f"{knob} {self.value} is outside (0, 1)",
                             f"pass --{knob} between 0 and 1, e.g. {self.EXAMPLE}")


@dataclass(frozen=True)
class Ratio(_Fraction):
    """Fraction of the layer's stored bytes removed (the `--ratio` knob, same meaning for every method)."""
    EXAMPLE: ClassVar[float] = 0.3


@dataclass(frozen=True)
class Sparsity(_Fraction):
    """Fraction of weights set to zero (pruning only)."""
    EXAMPLE: ClassVar[float] = 0.5


@dataclass(frozen=True)
class Pattern:
    """N:M semi-structured sparsity: at most ``n`` nonzeros in every ``m`` consecutive inputs."""
    n: int
    m: int

    def __post_init__(self):
        if not (0 < self.n < self.m <= 16):
            raise InputError(f"pattern {self.n}:{self.m} is invalid", "use N:M with 0 < N < M <= 16, e.g. 2:4")

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        try:
            n, m = (int(v) for v in text.split(":"))
        except ValueError:
            raise InputError(f"pattern {text!r} is not of the form N:M", "write e.g. --pattern 2:4") from None
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


Target = Union[Ratio, Sparsity, Pattern]


class CoefStorage(enum.Enum):
    """How a format's values are stored (the ``storage`` recipe key / ``--storage``; one rule for every format:
    pruned values, sparse-dictionary coefficients, low-rank factors). Default: the model's dtype."""
    DTYPE = "dtype"        # the model's dtype
    BF16 = "bf16"
    FP16 = "fp16"
    BF16_14BIT = "bf16-14bit"  # bf16 with the last 2 mantissa bits dropped (CoSpaDi's Eq. 11)
    INT8 = "int8"          # symmetric absmax int8, one fp16 scale per row or per group (``quant_group``)
    INT4 = "int4"          # asymmetric int4, one fp16 scale + one 4-bit zero point per row or per group

    @property
    def quantized(self) -> bool:
        """Integer codes + per-group scales (``quant_group`` applies)."""
        return self in (CoefStorage.INT8, CoefStorage.INT4)


@dataclass(frozen=True)
class Storage:
    """How one format stores its values: ``kind``, and for int8/int4 the group along the input dimension
    that shares a scale (``group`` inputs; 0 = one scale per row)."""
    kind: CoefStorage = CoefStorage.DTYPE
    group: int = 0

    def __post_init__(self):
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 0:
            raise InputError(f"quant_group={self.group!r} is not a whole number >= 0",
                             "use 0 (one scale per row) or a group size such as 64 or 128")
        if self.group and not self.kind.quantized:
            raise InputError(f"quant_group={self.group} given with storage {self.kind.value!r}, which has no scales",
                             "use storage int8 or int4 with a quant_group, or drop quant_group")

    def __str__(self) -> str:
        return self.kind.value + (f"/g{self.group}" if self.group else "")

    @classmethod
    def of(cls, value: "Storage | CoefStorage") -> "Storage":
        """A `Storage` from itself or a bare kind (one scale per row)."""
        return value if isinstance(value, Storage) else cls(CoefStorage(value))


class Init(enum.Enum):
    RANDOM_COLUMNS = "random-columns"
    SVD = "svd"


class SparseCoder(enum.Enum):
    """CoSpaDi's sparse coder (docs/methods.md, Speed)."""
    OMP = "omp"    # exact Batch-OMP (the reference)
    HTP = "htp"    # hard-thresholding pursuit from dense matrix products, warm-started
    AUTO = "auto"  # per layer, by a cost model (`cospadi.choose_coder`)


class DictUpdateRule(enum.Enum):
    """CoSpaDi's dictionary update (docs/methods.md, Speed)."""
    KSVD = "ksvd"  # block K-SVD, rank-1 steps by power iteration
    MOD = "mod"    # method of optimal directions: one least-squares solve, atoms renormalized


class Refine(enum.Enum):
    """A mask refinement run after a pruning method (its spec's ``refine``)."""
    NONE = "none"
    DSNOT = "dsnot"            # DSnoT prune-and-grow swaps, each also lowering the exact row error (methods/dsnot.py)
    DSNOT_MEAN = "dsnot-mean"  # the paper's test alone: a swap only has to lower the expected (mean) error


class Structure(enum.Enum):
    """How structured pruning spreads its budget over blocks (FLAP's ``--structure``)."""
    ADAPTIVE = "adaptive"  # one global ranking of every head group and channel (FLAP's AL-AM; ZipLM: knapsack)
    UNIFORM = "uniform"    # every block keeps the same numbers (a standard HF config can describe the model)


# --- method specs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """Base: every method has a target. Subclasses set ``name`` and which targets they accept."""
    name: ClassVar[str] = ""
    accepts: ClassVar[tuple[type, ...]] = (Ratio,)
    target: Target = Ratio(0.3)
    storage: CoefStorage = CoefStorage.DTYPE  # how the format's values are stored (every format, same rule)
    quant_group: int = 0                      # int8/int4: inputs per scale (0: one scale per row)

    def __post_init__(self):
        if not isinstance(self.target, self.accepts):
            allowed = ", ".join("--" + t.__name__.lower() for t in self.accepts)
            raise InputError(f"method {self.name!r} does not take a {type(self.target).__name__.lower()} target",
                             f"use {allowed}")
        self.store  # validates storage + quant_group

    @property
    def store(self) -> Storage:
        return Storage(self.storage, self.quant_group)

    def with_target(self, target: Target) -> "MethodSpec":
        return dataclasses.replace(self, target=target)


@dataclass(frozen=True)
class PruneSpec(MethodSpec):
    accepts: ClassVar[tuple[type, ...]] = (Ratio, Sparsity, Pattern)
    target: Target = Sparsity(0.5)
    refine: Refine = Refine.NONE  # dsnot: DSnoT swaps on the method's mask (same nonzeros per row / N:M)


@dataclass(frozen=True)
class MagnitudeSpec(PruneSpec):
    name: ClassVar[str] = "magnitude"


@dataclass(frozen=True)
class WandaSpec(PruneSpec):
    name: ClassVar[str] = "wanda"


@dataclass(frozen=True)
class SparseGPTSpec(PruneSpec):
    name: ClassVar[str] = "sparsegpt"
    blocksize: int = 128
    percdamp: float = 0.01  # dampening: fraction of the mean Hessian diagonal added to it

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize < 1 or not 0.0 <= self.percdamp < 1.0:
            raise InputError(f"sparsegpt blocksize={self.blocksize} percdamp={self.percdamp}",
                             "use blocksize >= 1 and 0 <= percdamp < 1")


@dataclass(frozen=True)
class GQSASpec(MethodSpec):
    """GQSA-lite: 1×g group-structured sparsity + group-wise int4/int8 kept values, pruned and quantized
    jointly in one SparseGPT/GPTQ sweep (training-free; methods.md). ``quant_group`` is both the sparsity block
    and the quantization group (GQSA aligns them)."""
    name: ClassVar[str] = "gqsa"
    accepts: ClassVar[tuple[type, ...]] = (Ratio, Sparsity)
    target: Target = Sparsity(0.5)
    storage: CoefStorage = CoefStorage.INT4
    quant_group: int = 16
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if not self.storage.quantized or self.quant_group < 1:
            raise InputError(f"{self.name} storage={self.storage.value} quant_group={self.quant_group}",
                             "use storage int4 or int8 with quant_group >= 1 (e.g. 16 or 128)")
        if self.blocksize < 1 or not 0.0 <= self.percdamp < 1.0:
            raise InputError(f"{self.name} blocksize={self.blocksize} percdamp={self.percdamp}",
                             "use blocksize >= 1 and 0 <= percdamp < 1")


@dataclass(frozen=True)
class GPTQSpec(GQSASpec):
    """Quantization only (GPTQ-like sequential rounding with OBS updates, nothing pruned): the equal-bytes
    baseline of GQSA. Its size is set by ``storage`` and ``quant_group``; a ``--ratio`` is a floor it must meet."""
    name: ClassVar[str] = "gptq"
    accepts: ClassVar[tuple[type, ...]] = (Ratio,)
    target: Target = Ratio(0.5)
    quant_group: int = 128


@dataclass(frozen=True)
class SVDSpec(MethodSpec):
    name: ClassVar[str] = "svd"


@dataclass(frozen=True)
class ASVDSpec(MethodSpec):
    name: ClassVar[str] = "asvd"
    alpha: float = 0.5  # scaling exponent on the mean absolute activation per input channel


@dataclass(frozen=True)
class SVDLLMSpec(MethodSpec):
    name: ClassVar[str] = "svd-llm"


@dataclass(frozen=True)
class CoSpaDiSpec(MethodSpec):
    """CoSpaDi: K-SVD + OMP dictionary learning on whitened weights (methods.md §2)."""
    name: ClassVar[str] = "cospadi"
    rho: float = 2.0            # k / s
    iters: int = 60             # outer K-SVD iterations
    power_iters: int = 8        # power iterations per rank-1 atom update
    init: Init = Init.RANDOM_COLUMNS
    tol: float = 1e-4           # stop when the relative objective improvement falls below this
    group_size: int = 1         # >1: share one dictionary across this many consecutive blocks
    # fnmatch patterns on a linear's name inside its block: these share a dictionary across the group;
    # None: the projections that read the block's input (`model.SHARED_INPUT_PROJECTIONS`)
    shared: tuple[str, ...] | None = None
    seed: int = 42
    coder: SparseCoder = SparseCoder.AUTO         # per layer by cost; HTP's error measured <= OMP's (docs)
    dict_update: DictUpdateRule = DictUpdateRule.MOD  # measured equal to or below block K-SVD's error (docs)
    dict_storage: CoefStorage = CoefStorage.DTYPE  # how D is stored: the same choices as ``storage``
    dict_quant_group: int = 0                      # int8/int4 D: inputs of an atom per scale (0: one per atom)

    def __post_init__(self):
        super().__post_init__()
        try:
            self.dict_store
        except InputError:
            raise InputError(f"cospadi dict_storage={self.dict_storage.value} dict_quant_group={self.dict_quant_group!r}",
                             "dict_quant_group is a whole number >= 0 and needs dict_storage int8 or int4; "
                             "drop it for float storages") from None
        if self.rho < 1.0 or self.iters < 0 or self.power_iters < 1 or self.group_size < 1 or self.tol < 0:
            raise InputError(f"cospadi rho={self.rho} iters={self.iters} power_iters={self.power_iters} "
                             f"group_size={self.group_size} tol={self.tol}",
                             "use rho >= 1, iters >= 0, power_iters >= 1, group_size >= 1, tol >= 0")

    @property
    def dict_store(self) -> Storage:
        """How the dictionary ``D`` is stored (``Dᵀ`` rows quantized along the inputs; formats.dictionary_bytes)."""
        return Storage(self.dict_storage, self.dict_quant_group)


@dataclass(frozen=True)
class RocketSpec(MethodSpec):
    """ROCKET: single-step sparse factorization (methods.md §4.3)."""
    name: ClassVar[str] = "rocket"
    target: Target = Ratio(0.2)  # DEFAULT_RATIO: the default method's default budget
    ks: float = 2.0             # k / s
    lam: float = 0.5            # importance exponent on the de-whitened atom norm
    beta: float = 0.005         # over-sparsify by this fraction of k per column ...
    refill: float = 0.005       # ... then re-activate this fraction of all k*out entries

    def __post_init__(self):
        super().__post_init__()
        if self.ks < 1.0 or self.lam < 0 or not 0 <= self.beta < 1 or not 0 <= self.refill < 1:
            raise InputError(f"rocket ks={self.ks} lam={self.lam} beta={self.beta} refill={self.refill}",
                             "use ks >= 1, lam >= 0, 0 <= beta, refill < 1")


@dataclass(frozen=True)
class StructuredSpec(MethodSpec):
    """Structured pruning: whole attention head groups (a KV head and its query heads) and MLP channels go;
    the model keeps plain, narrower dense layers. The target is the fraction of the targeted layers' stored
    bytes removed, biases the method adds included (methods/structured.py)."""
    target: Target = Ratio(0.2)
    structure: Structure = Structure.ADAPTIVE

    def __post_init__(self):
        super().__post_init__()
        if self.store != Storage():
            raise InputError(f"{self.name}: storage {self.store} given, but structured pruning keeps plain dense "
                             "layers in the model dtype", "drop storage / quant_group for this method")


@dataclass(frozen=True)
class FlapSpec(StructuredSpec):
    """FLAP (An et al., AAAI 2024): fluctuation metric, standardized global ranking, bias compensation."""
    name: ClassVar[str] = "flap"


@dataclass(frozen=True)
class ZipLMSpec(StructuredSpec):
    """ZipLM-style one-shot structured OBS (Kurtic et al., NeurIPS 2023): greedy removal with inverse-Hessian
    updates of the remaining columns."""
    name: ClassVar[str] = "ziplm"
    # uniform by default: measured better than the knapsack over per-part OBS errors (docs/methods.md)
    structure: Structure = Structure.UNIFORM
    percdamp: float = 0.01  # dampening: fraction of the mean Hessian diagonal added to it

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.percdamp < 1.0:
            raise InputError(f"ziplm percdamp={self.percdamp}", "use 0 <= percdamp < 1")


SPECS: dict[str, type[MethodSpec]] = {c.name: c for c in (MagnitudeSpec, WandaSpec, SparseGPTSpec, GQSASpec,
                                                          GPTQSpec, SVDSpec, ASVDSpec, SVDLLMSpec, CoSpaDiSpec,
                                                          RocketSpec, FlapSpec, ZipLMSpec)}
DEFAULT_METHOD = "rocket"  # with knapsack allocation: near the best we measured (mixed), and fast (docs/benchmarks)
DEFAULT_RATIO = 0.2
assert SPECS[DEFAULT_METHOD]().target == Ratio(DEFAULT_RATIO)


class Allocate(enum.Enum):
    UNIFORM = "uniform"
    KNAPSACK = "knapsack"

    @classmethod
    def default_for(cls, method: str) -> "Allocate":
        """The default method runs with knapsack allocation (given by name or not); every other uniformly."""
        return cls.KNAPSACK if method == DEFAULT_METHOD else cls.UNIFORM


@dataclass(frozen=True)
class Calibration:
    """Calibration settings a recipe may pin (its optional ``calibration:`` section); None: the defaults."""
    source: str | None = None      # stdlib | FILE.txt | FILE.jsonl | wikitext2 | c4
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int | None = None
    batch_size: int | None = None

    def __post_init__(self):
        for name in ("nsamples", "seqlen", "seed", "batch_size"):
            v = getattr(self, name)
            least = 0 if name == "seed" else 1
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise InputError(f"recipe calibration.{name}={v!r} is not an integer >= {least}",
                                 f"set calibration.{name} to an integer >= {least}, or leave it out")
        if self.source is not None and not isinstance(self.source, str):
            raise InputError(f"recipe calibration.source={self.source!r} is not a string",
                             "use stdlib, a .txt/.jsonl path, wikitext2 or c4")


@dataclass(frozen=True)
class Recipe:
    """Which layers get which method, and how the budget is spread.

    ``methods`` has one spec for a single-method run; several specs make a *mixed* allocation (each layer
    gets the option, from any of them, that serves the total budget best; needs ``allocate=KNAPSACK``).
    """
    methods: tuple[MethodSpec, ...]
    allocate: Allocate = Allocate.UNIFORM
    targets: tuple[str, ...] = ("*",)              # fnmatch patterns on linear names inside blocks
    ignore: tuple[str, ...] = ("*lm_head*", "*embed*")
    calibration: Calibration | None = None         # optional: pins the calibration settings too

    def __post_init__(self):
        if not self.methods:
            raise InputError("recipe has no method", "name at least one method")
        if len(self.methods) > 1 and self.allocate is not Allocate.KNAPSACK:
            raise InputError("several methods need knapsack allocation to choose between them",
                             "set allocate: knapsack")
        structured = [s for s in self.methods if isinstance(s, StructuredSpec)]
        if len(self.methods) == 1 and structured and self.allocate is not Allocate.UNIFORM:
            raise InputError(f"structured pruning ({self.methods[0].name}) spreads its budget itself",
                             "use it with allocate: uniform (its `structure` field chooses adaptive or uniform "
                             "widths), or in a knapsack menu with per-layer methods")
        if structured and len(structured) == len(self.methods) > 1:
            raise InputError(f"a knapsack menu of structured pruning alone ({', '.join(s.name for s in structured)})",
                             "add at least one per-layer method (e.g. sparsegpt, svd-llm, rocket): structured "
                             "pruning enters a mixed menu as a whole-model candidate beside the per-layer plan")
