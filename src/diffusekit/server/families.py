"""What a model family can do through the server, checked before a job is queued: SD3/SD3.5 models run
txt2img, img2img, inpaint and hires fix; what their pipeline does not do yet is a 422 naming the field,
not a failed job."""

from __future__ import annotations

from typing import Any

from .errors import FieldError

SD3_SCHEDULES = ("automatic",)


def check_family(catalog, model: str, kind: str, params: dict[str, Any], names: dict[str, str]) -> None:
    """Refuse what `model`'s family cannot run; `names` maps GenerationParams fields to the client's."""
    if catalog.family(catalog.get(model)) != "sd3":
        return

    def refuse(field: str, what: str) -> FieldError:
        return FieldError(names.get(field, field), f"{what} is not supported for SD3 models yet ({model})")

    if params.get("cfg_rescale"):
        raise refuse("cfg_rescale", "CFG rescale")
    schedule = params.get("schedule")
    if schedule and str(schedule).casefold() not in SD3_SCHEDULES:
        raise FieldError(
            names.get("schedule", "schedule"),
            f"SD3 uses its flow-matching schedule; {schedule!r} is not one; valid: Automatic",
        )
    if params.get("sampler"):
        from ..diffusion.flow import flow_sampler

        try:
            flow_sampler(params["sampler"])
        except ValueError as e:
            raise FieldError(names.get("sampler", "sampler"), str(e)) from None
