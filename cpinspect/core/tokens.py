"""Vision-token conventions of the Qwen-VL families (no torch here: the CLI reads it early).

Qwen2-VL, Qwen2.5-VL and Qwen3-VL share the special token ids; they differ in patch size and
in how videos are laid out (Qwen3-VL gives every temporal patch its own vision_start/end span).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

IMAGE_PAD = 151655
VIDEO_PAD = 151656
VISION_START = 151652
VISION_END = 151653
VISION_PAD = 151654
ENDOFTEXT = 151643


@dataclass(frozen=True)
class TokenConfig:
    """Which token ids mark vision placeholders, and how grids map to token counts."""

    model: str
    image_token_id: int = IMAGE_PAD
    video_token_id: int = VIDEO_PAD
    vision_start_token_id: int = VISION_START
    vision_end_token_id: int = VISION_END
    pad_token_id: int = ENDOFTEXT
    spatial_merge_size: int = 2
    patch_size: int = 14

    @property
    def merge_area(self) -> int:
        """Patches merged into one LLM token (``spatial_merge_size ** 2``, 4 for every Qwen-VL)."""
        return self.spatial_merge_size**2


MODELS: dict[str, TokenConfig] = {
    "qwen2-vl": TokenConfig("qwen2-vl", patch_size=14),
    "qwen2.5-vl": TokenConfig("qwen2.5-vl", patch_size=14),
    "qwen3-vl": TokenConfig("qwen3-vl", patch_size=16),
}
DEFAULT_MODEL = "qwen3-vl"


def token_config(
    model: str = DEFAULT_MODEL,
    *,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
) -> TokenConfig:
    """The preset for ``model`` with the user's explicit ids laid over it."""
    from cpinspect.core.errors import InputError

    if model not in MODELS:
        raise InputError(
            f"unknown model preset {model!r}",
            where="--model",
            fix=f"use one of {', '.join(MODELS)}, or pass --image-token-id/--video-token-id",
        )
    config = MODELS[model]
    if image_token_id is not None:
        config = replace(config, image_token_id=image_token_id)
    if video_token_id is not None:
        config = replace(config, video_token_id=video_token_id)
    return config
