"""Binding contrast: train the denoiser to predict worse under a caption its image contradicts.

Why: without it, the default model's U-Net did not read relation words at all. Under "a red circle to
the left of a blue star" and "... to the right of ..." it denoised a training image equally well (error
ratio 1.00 at the noisiest step, against 1.5 for "on the left" / "on the right"), and the text encoder
put the two captions 0.17 as far apart as two colors (`bench/relation_binding.py`). A bag-of-words model
loses little of the plain denoising loss on a quarter of the captions, so the loss itself is made of the
difference.

For a caption with one binding to break (`contrast_caption`: a relation reversed, an absolute position
mirrored, or the colors of its two groups exchanged) and a noisy latent x_t with SNR at most `max_snr`,
the denoising error under the contradicting caption must exceed the error under the true one by a
relative `margin`:

    loss = weight * sum_i relu((1 + margin) * e_true_i - e_false_i) / B

e_* are the per-sample (weighted) errors of the main loss. The contradicting captions add `samples` rows
to the batch's one U-Net and text-encoder pass. At low noise x_t already shows the layout, and asking
for a worse prediction there would teach the model to fight its input; hence the SNR cap. A
contradicting caption that names a held-out composition is never used, so held-out captions stay out
of training entirely. In the default model's stage 2b it took relations from chance to about 4 in 5
(docs: how-it-was-made).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..data.shapes import (
    COLORS,
    INVERSE_RELATION,
    POSITION_PHRASES,
    RELATION_PHRASES,
    CaptionSpec,
    format_caption,
    parse_caption,
    spec_is_heldout,
)

MIRRORED = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}  # absolute positions

# The bindings a contradicting caption may break. "binding" is `contrast_caption`'s one: a relation
# reversed, a position mirrored or two groups' colors exchanged. "shared": in a caption of several groups,
# one group takes another's shape or color ("a red circle and a blue star" -> "a red circle and a blue
# circle"), the way a model that draws one group twice fails. "count": a lone group's count one more or
# one fewer ("three cyan stars" -> "two cyan stars" or "four cyan stars"; "a red circle" -> "two red
# circles").
BREAKS: tuple[str, ...] = ("binding", "shared", "count")


@dataclass(frozen=True)
class Contrast:
    """Settings of the binding contrast (see the module docstring); weight 0 turns it off."""

    weight: float = 0.0
    margin: float = 0.1
    max_snr: float = 0.1
    samples: int = 12  # contrast pairs per batch at most (the extra pass has this fixed size)
    breaks: tuple[str, ...] = ("binding",)  # which of BREAKS make contradicting captions

    def __post_init__(self):
        unknown = [b for b in self.breaks if b not in BREAKS]
        if unknown or not self.breaks:
            raise ValueError(f"Contrast.breaks: unknown or none {unknown}; valid: {', '.join(BREAKS)}")
        for name in ("weight", "margin", "max_snr"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"Contrast.{name} must be >= 0, got {value}")
        if self.samples < 1:
            raise ValueError(f"Contrast.samples must be at least 1, got {self.samples}")


def contrast_caption(caption: str) -> str | None:
    """The caption with one binding broken, in the same phrasing: a relation reversed ("left of" ->
    "right of", "over" -> "under"), an absolute position mirrored ("on the left" -> "on the right";
    "in the center" has none), else the colors of a two-group caption exchanged ("a red circle and
    a blue square" -> "a blue circle and a red square"). None when there is no such binding (one group,
    a color missing or shared), when the text is outside the caption grammar, or when the result names
    a held-out composition; two groups of one shape and count have nothing to exchange."""
    if not caption:
        return None
    try:
        spec = parse_caption(caption)
    except ValueError:
        return None
    text = " ".join(caption.split())
    suffix = f" on a {spec.background} background" if spec.background else ""
    body = text[: len(text) - len(suffix)] if suffix else text
    if spec.relation is not None:
        phrases, inverse = RELATION_PHRASES[spec.relation], RELATION_PHRASES[INVERSE_RELATION[spec.relation]]
        # longest first: "to the left of" before "left of"
        for i in sorted(range(len(phrases)), key=lambda k: -len(phrases[k])):
            if f" {phrases[i]} " in body:
                out = body.replace(f" {phrases[i]} ", f" {inverse[i]} ", 1) + suffix
                break
        else:  # pragma: no cover - parse_caption found the phrase, so one of them is there
            return None
    elif spec.groups[0].position in MIRRORED:
        g = spec.groups[0]
        phrases, mirrored = POSITION_PHRASES[g.position], POSITION_PHRASES[MIRRORED[g.position]]
        i = next(k for k, p in enumerate(phrases) if body.endswith(f" {p}"))
        out = body[: len(body) - len(phrases[i])] + mirrored[i] + suffix
    elif len(spec.groups) == 2:
        a, b = spec.groups
        if None in (a.color, b.color) or a.color == b.color or (a.shape, a.count) == (b.shape, b.count):
            return None  # nothing to exchange, or the exchange describes the same objects
        words = body.split(" ")
        at = [i for i, w in enumerate(words) if w in COLORS]
        if len(at) != 2:
            return None
        words[at[0]], words[at[1]] = words[at[1]], words[at[0]]
        out = " ".join(words) + suffix
    else:
        return None
    return None if spec_is_heldout(parse_caption(out)) else out


def contrast_captions(caption: str, breaks: tuple[str, ...] = ("binding",)) -> tuple[str, ...]:
    """Every contradicting caption that `breaks` (see BREAKS) make of `caption`, none held out; empty
    when there are none. "shared" and "count" rewrite only captions in canonical phrasing (all lists and
    counts are), so the result differs from the caption in the changed words alone."""
    out = []
    if "binding" in breaks and (c := contrast_caption(caption)) is not None:
        out.append(c)
    if not ({"shared", "count"} & set(breaks)) or not caption:
        return tuple(out)
    try:
        spec = parse_caption(caption)
    except ValueError:
        return tuple(out)
    if format_caption(spec) != " ".join(caption.split()):
        return tuple(out)
    specs = (_shared(spec) if "shared" in breaks else []) + (_counted(spec) if "count" in breaks else [])
    out += [format_caption(s) for s in specs if not spec_is_heldout(s)]
    return tuple(dict.fromkeys(out))


def _shared(spec: CaptionSpec) -> list[CaptionSpec]:
    """A list caption with group j given group i's shape, or its color (when both name one)."""
    groups, out = spec.groups, []
    if spec.relation is not None or spec.groups[0].position is not None or len(groups) < 2:
        return out
    for i, a in enumerate(groups):
        for j, b in enumerate(groups):
            if i == j:
                continue
            changed = [replace(b, shape=a.shape)] if a.shape != b.shape else []
            if None not in (a.color, b.color) and a.color != b.color:
                changed.append(replace(b, color=a.color))
            for g in changed:
                new = groups[:j] + (g,) + groups[j + 1 :]
                same = [(h.shape, h.color, h.size) for h in new]
                if len(set(same)) == len(same):  # two equal groups would be one group written twice
                    out.append(replace(spec, groups=new))
    return out


def _counted(spec: CaptionSpec) -> list[CaptionSpec]:
    """A one-group caption without a position, with one object more or one fewer (1 to 4)."""
    if len(spec.groups) != 1 or spec.groups[0].position is not None:
        return []
    g = spec.groups[0]
    return [replace(spec, groups=(replace(g, count=n),)) for n in (g.count - 1, g.count + 1) if 1 <= n <= 4]


def contrast_loss(
    e_true: torch.Tensor,
    e_false: torch.Tensor,
    batch_size: int,
    settings: Contrast,
    use: torch.Tensor | None = None,
) -> torch.Tensor:
    """weight * sum relu((1 + margin) e_true - e_false) / batch_size over per-sample errors (K,); `use`
    (K,) weighs each pair (0 for the repeats that pad a pass to its fixed size)."""
    hinge = torch.relu((1 + settings.margin) * e_true - e_false)  # (K,)
    if use is not None:
        hinge = hinge * use
    return settings.weight * hinge.sum() / batch_size
