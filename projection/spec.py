"""Serialisable description of a Kronecker projection: enough to rebuild it bit for bit."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast, get_args

import numpy as np

from .errors import LayerNotFoundError, ProjectionSpecError

Init = Literal["gaussian", "rademacher", "orthonormal", "pca"]
INITS: tuple[Init, ...] = get_args(Init)
LayerKind = Literal[
    "linear",
    "embedding",
    "conv2d",
    "conv1d",
    "norm",
    "mha",
    "bias",
    "conv",
    "conv_transpose",
    "embedding_bag",
    "parameter",
]
LAYER_KINDS: tuple[LayerKind, ...] = get_args(LayerKind)


@dataclass(frozen=True)
class LayerSpec:
    """One projected layer: ``P_out (k_out x d_out)`` and ``P_in (k_in x in_dim)``.

    ``in_dim = d_in + bias``: the bias is the weight of a constant homogeneous input. The layer's
    projected gradient is the row-major ``k_out x k_in`` matrix stored at ``[offset, offset + dim)``.
    """

    name: str
    kind: LayerKind
    d_in: int
    d_out: int
    bias: bool
    k_in: int
    k_out: int
    offset: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ProjectionSpecError(f"layer {self.name!r}: unknown kind {self.kind!r}; expected one of {LAYER_KINDS}")
        if min(self.d_in, self.d_out, self.k_in, self.k_out) < 1:
            raise ProjectionSpecError(f"layer {self.name!r}: dimensions must be positive, got {self}")
        if self.k_in > self.in_dim or self.k_out > self.d_out:
            raise ProjectionSpecError(
                f"layer {self.name!r}: rank ({self.k_in}, {self.k_out}) exceeds its dimensions "
                f"({self.in_dim}, {self.d_out})"
            )

    @property
    def in_dim(self) -> int:
        """Columns of the canonical gradient matrix: inputs plus one for the bias."""
        return self.d_in + int(self.bias)

    @property
    def dim(self) -> int:
        """Length of this layer's projected gradient."""
        return self.k_in * self.k_out

    @property
    def full_dim(self) -> int:
        """Number of parameters (weight and bias) this layer's gradient covers."""
        return self.in_dim * self.d_out

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.dim)


@dataclass(frozen=True)
class ProjectionSpec:
    """Everything needed to rebuild the projection: seed, init, the layers, and PCA bases if any.

    ``matrix_sha256`` is a checksum of the generated matrices, recorded when a store is created so a
    rebuild on another machine can prove it produced the identical projection.
    """

    seed: int
    init: Init
    layers: tuple[LayerSpec, ...]
    pca_bases: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, compare=False)
    matrix_sha256: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ProjectionSpecError(f"unknown init {self.init!r}; expected one of {INITS}")
        if not self.layers:
            raise ProjectionSpecError("a projection needs at least one layer")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ProjectionSpecError(f"duplicate layer names in spec: {names}")
        offset = 0
        for layer in self.layers:
            if layer.offset != offset:
                raise ProjectionSpecError(f"layer {layer.name!r} has offset {layer.offset}, expected {offset}")
            offset += layer.dim
        if self.init == "pca":
            missing = [n for n in names if n not in self.pca_bases]
            if missing:
                raise ProjectionSpecError(f"init='pca' needs bases for every layer; missing {missing}")

    @classmethod
    def build(
        cls,
        layers: Sequence[tuple[str, str, int, int, bool]],
        rank: int | tuple[int, int],
        init: Init = "gaussian",
        seed: int = 0,
        pca_bases: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> ProjectionSpec:
        """Lay out ``(name, kind, d_in, d_out, bias)`` layers, clipping the rank to each layer's dims."""
        k_in_req, k_out_req = (rank, rank) if isinstance(rank, int) else tuple(rank)
        if k_in_req < 1 or k_out_req < 1:
            raise ProjectionSpecError(f"rank must be positive, got {rank!r}")
        specs, offset = [], 0
        for name, kind, d_in, d_out, bias in layers:
            k_in, k_out = min(k_in_req, d_in + int(bias)), min(k_out_req, d_out)
            if pca_bases and name in pca_bases:
                k_out, k_in = (b.shape[0] for b in (pca_bases[name][1], pca_bases[name][0]))
            # LayerSpec checks the kind
            specs.append(LayerSpec(name, cast(LayerKind, kind), d_in, d_out, bias, k_in, k_out, offset))
            offset += k_in * k_out
        return cls(seed=seed, init=init, layers=tuple(specs), pca_bases=dict(pca_bases or {}))

    @property
    def dim(self) -> int:
        """Total projected dimension D."""
        return sum(layer.dim for layer in self.layers)

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise LayerNotFoundError(f"no layer {name!r} in the projection spec; it has {[la.name for la in self.layers]}")

    def with_checksum(self, sha256: str) -> ProjectionSpec:
        return replace(self, matrix_sha256=sha256)

    def same_projection(self, other: ProjectionSpec) -> bool:
        """True when both specs describe the same matrices (checksums aside)."""
        return self.to_dict(include_checksum=False) == other.to_dict(include_checksum=False)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self, include_checksum: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seed": self.seed,
            "init": self.init,
            "layers": [asdict(layer) for layer in self.layers],
        }
        if self.pca_bases:
            out["pca_bases"] = {
                name: [_encode_array(p_in), _encode_array(p_out)] for name, (p_in, p_out) in self.pca_bases.items()
            }
        if include_checksum and self.matrix_sha256:
            out["matrix_sha256"] = self.matrix_sha256
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProjectionSpec:
        try:
            layers = tuple(LayerSpec(**layer) for layer in data["layers"])
            bases = {
                name: (_decode_array(p_in), _decode_array(p_out))
                for name, (p_in, p_out) in data.get("pca_bases", {}).items()
            }
            return cls(
                seed=int(data["seed"]),
                init=cast(Init, str(data["init"])),  # checked in __post_init__
                layers=layers,
                pca_bases=bases,
                matrix_sha256=data.get("matrix_sha256"),
            )
        except ProjectionSpecError:
            raise
        except (KeyError, TypeError, ValueError) as exc:  # missing fields, wrong types, undecodable PCA bases
            raise ProjectionSpecError(f"malformed projection spec: {exc!r}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ProjectionSpec:
        return cls.from_dict(json.loads(text))

    def fingerprint(self) -> str:
        """Stable hash of the spec (without the checksum)."""
        blob = json.dumps(self.to_dict(include_checksum=False), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _encode_array(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return {"shape": list(array.shape), "float32_b64": base64.b64encode(array.tobytes()).decode()}


def _decode_array(data: Mapping[str, Any]) -> np.ndarray:
    raw = base64.b64decode(data["float32_b64"])
    return np.frombuffer(raw, dtype=np.float32).reshape(data["shape"]).copy()
