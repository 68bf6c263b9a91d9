"""Gaussian attributes described as data, so engines and optimisers need no code per attribute.

An attribute is *key* when frustum culling needs it (position, shape, opacity): key attributes and
their optimiser state stay on the GPU. Every other attribute lives with its optimiser state in host
memory as columns of one row per Gaussian, and only the rows a camera sees cross PCIe.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ACTIVATIONS = ("identity", "exp", "sigmoid", "normalize")


@dataclass(frozen=True)
class AttributeSpec:
    """One per-Gaussian parameter tensor of shape ``[N, *shape]``.

    ``lr`` is the Adam learning rate at batch size 1; ``lr_final`` (optional) makes it decay
    exponentially to that value over training; ``scale_lr_by_extent`` multiplies both by the scene
    extent (positions). ``sh_rest`` marks the higher spherical-harmonic bands: with active degree
    ``d`` only the leading ``(d + 1) ** 2 - 1`` rows of ``shape`` are in use, so only those move.
    """

    name: str
    shape: tuple[int, ...]
    lr: float
    key: bool = False
    activation: str = "identity"
    lr_final: float | None = None
    scale_lr_by_extent: bool = False
    sh_rest: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"attribute {self.name}: unknown activation {self.activation!r}")
        if self.sh_rest and len(self.shape) != 2:
            raise ValueError(f"attribute {self.name}: sh_rest needs shape (bands, channels)")

    @property
    def width(self) -> int:
        """Floats per Gaussian."""
        return math.prod(self.shape)

    def active_width(self, sh_degree: int) -> int:
        """Floats per Gaussian in use at this SH degree (all of them unless ``sh_rest``)."""
        if not self.sh_rest:
            return self.width
        bands = min((sh_degree + 1) ** 2 - 1, self.shape[0])
        return bands * self.shape[1]


CULL_SHAPES = ("ellipsoid", "surfel")


@dataclass(frozen=True)
class CullRoles:
    """Which key attributes culling reads, and the shape its bound is proven for.

    ``ellipsoid``: a 3D Gaussian drawn by gsplat's EWA projection, bounded by its largest
    scale; ``surfel``: a flat 2D Gaussian drawn by gsplat's ray-splat intersection (2DGS).
    ``opacity_logit`` is also what density control prunes by and opacity resets clamp;
    ``log_scales`` what it measures a Gaussian's size by, and ``position`` what it moves.
    """

    position: str = "means"
    log_scales: str = "scales"
    opacity_logit: str = "opacities"
    shape: str = "ellipsoid"

    @property
    def names(self) -> tuple[str, str, str]:
        return self.position, self.log_scales, self.opacity_logit


@dataclass(frozen=True)
class GaussianSpec:
    """The ordered attributes of a splatting variant, and which of them culling reads."""

    attributes: tuple[AttributeSpec, ...]
    cull: CullRoles = CullRoles()

    def __post_init__(self) -> None:
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate attribute names in {names}")
        if sum(a.sh_rest for a in self.attributes) > 1:
            raise ValueError("at most one attribute may be sh_rest")
        if self.cull.shape not in CULL_SHAPES:
            raise ValueError(f"unknown culling shape {self.cull.shape!r}; one of {CULL_SHAPES}")
        by_name = {a.name: a for a in self.attributes}
        for role, name in zip(
            ("position", "log_scales", "opacity_logit"), self.cull.names, strict=True
        ):
            attr = by_name.get(name)
            if attr is None or not attr.key:
                raise ValueError(
                    f"culling reads {role} from {name!r}, which must be a key attribute"
                )
        if by_name[self.cull.position].shape != (3,):
            raise ValueError(f"the position {self.cull.position!r} must have shape (3,)")
        if by_name[self.cull.opacity_logit].shape != ():
            raise ValueError(f"the opacity {self.cull.opacity_logit!r} must have shape ()")

    def cull_inputs(self, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Positions, log-scales and opacity logits, as the culler takes them, from ``tensors``
        (the key attributes by name)."""
        position, log_scales, opacity = self.cull.names
        return tensors[position], tensors[log_scales], tensors[opacity].reshape(-1)

    def __iter__(self) -> Iterator[AttributeSpec]:
        return iter(self.attributes)

    def __getitem__(self, name: str) -> AttributeSpec:
        for attr in self.attributes:
            if attr.name == name:
                return attr
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    @property
    def key(self) -> tuple[AttributeSpec, ...]:
        return tuple(a for a in self.attributes if a.key)

    def with_key(self, names: Iterable[str]) -> GaussianSpec:
        """This spec with the attributes ``names`` made key as well: an engine then keeps them
        on the GPU with their Adam state (as ``--offload clm`` does with those its walk reads,
        where the budget holds them)."""
        wanted = set(names)
        if unknown := wanted - set(self.names):
            raise ValueError(f"no attributes {sorted(unknown)} in {self.names}")
        attrs = [dataclasses.replace(a, key=a.key or a.name in wanted) for a in self.attributes]
        return dataclasses.replace(self, attributes=tuple(attrs))

    @property
    def host(self) -> tuple[AttributeSpec, ...]:
        """Non-key attributes in host-row order: the ``sh_rest`` one last, so at any SH degree the
        columns in use are a prefix of the row."""
        rest = [a for a in self.attributes if not a.key]
        return tuple(sorted(rest, key=lambda a: a.sh_rest))


@dataclass(frozen=True)
class ColumnSegment:
    """Where one attribute sits in a packed row of several attributes."""

    attr: AttributeSpec
    start: int

    @property
    def end(self) -> int:
        return self.start + self.attr.width


def row_layout(attrs: Iterable[AttributeSpec]) -> tuple[list[ColumnSegment], int]:
    """Pack attributes side by side in one row; returns the segments and the row width."""
    segments, start = [], 0
    for attr in attrs:
        segments.append(ColumnSegment(attr, start))
        start += attr.width
    return segments, start


def active_row_width(attrs: Iterable[AttributeSpec], sh_degree: int) -> int:
    """Leading columns of a packed row in use at this SH degree (see :attr:`GaussianSpec.host`)."""
    return sum(a.active_width(sh_degree) for a in attrs)


def gaussian_splatting_spec(sh_degree: int = 3) -> GaussianSpec:
    """The attributes of standard 3DGS with the INRIA learning rates."""
    rest_bands = (sh_degree + 1) ** 2 - 1
    return GaussianSpec(
        (
            AttributeSpec(
                "means", (3,), 1.6e-4, key=True, lr_final=1.6e-6, scale_lr_by_extent=True
            ),
            AttributeSpec("scales", (3,), 5e-3, key=True, activation="exp"),
            # Culling bounds a Gaussian by its largest scale, so rotations need not be key:
            # they travel with the colours (16 bytes a row) instead of costing 48 bytes of
            # GPU memory per Gaussian, with their Adam moments, for every Gaussian. The
            # engine factory makes them key when the GPU budget holds them (the walk of
            # each view's pixels reads them, see clm.train.engine_factory).
            AttributeSpec("quats", (4,), 1e-3, activation="normalize"),
            AttributeSpec("opacities", (), 5e-2, key=True, activation="sigmoid"),
            AttributeSpec("sh0", (1, 3), 2.5e-3),
            AttributeSpec("shN", (rest_bands, 3), 2.5e-3 / 20, sh_rest=True),
        )
    )


def pack_rows(params: dict[str, Tensor], segments: Sequence[ColumnSegment]) -> Tensor:
    """Attributes side by side as one ``[N, width]`` float32 tensor."""
    values = [params[seg.attr.name] for seg in segments]
    parts = [t.reshape(t.shape[0], math.prod(t.shape[1:])) for t in values]
    return torch.cat(parts, dim=1).float().contiguous()


def unpack_rows(
    rows: Tensor, segments: Sequence[ColumnSegment], sh_degree: int | None = None
) -> dict[str, Tensor]:
    """Views of packed rows as ``[n, *shape]`` attributes; with ``sh_degree``, the ``sh_rest``
    attribute only has its active bands (and ``rows`` may be just the active columns)."""
    out = {}
    n = rows.shape[0]
    for seg in segments:
        start, width, shape = active_span(seg, sh_degree)
        out[seg.attr.name] = rows[:, start : start + width].reshape(n, *shape)
    return out


def active_span(
    seg: ColumnSegment, sh_degree: int | None = None
) -> tuple[int, int, tuple[int, ...]]:
    """An attribute's first column, width and per-row shape in a packed row; with
    ``sh_degree``, ``sh_rest`` keeps its active bands only."""
    attr = seg.attr
    if attr.sh_rest and sh_degree is not None:
        width = attr.active_width(sh_degree)
        return seg.start, width, (width // attr.shape[1], attr.shape[1])
    return seg.start, attr.width, tuple(attr.shape)


def joined_span(
    segments: Sequence[ColumnSegment], names: Sequence[str], sh_degree: int | None = None
) -> tuple[int, int, tuple[int, ...]] | None:
    """Attributes ``names``, side by side in a packed row, as one span of per-row shape
    ``(k, c)`` (their leading sizes summed, active bands only with ``sh_degree``); None when
    their columns are not consecutive there or they do not share their last size ``c``.
    Viewing them joined spares a renderer that wants them side by side a copy of every row."""
    at = {seg.attr.name: seg for seg in segments}
    if not names or any(n not in at for n in names):
        return None
    spans = [active_span(at[n], sh_degree) for n in names]
    if any(len(shape) != 2 or shape[1] != spans[0][2][1] for _, _, shape in spans):
        return None
    if any(a + w != b for (a, w, _), (b, _, _) in itertools.pairwise(spans)):
        return None  # an attribute with inactive bands before another leaves a gap
    start, width = spans[0][0], sum(w for _, w, _ in spans)
    channels = spans[0][2][1]
    return start, width, (width // channels, channels)
