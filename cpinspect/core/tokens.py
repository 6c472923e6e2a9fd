"""Vision-token conventions of the Qwen-VL families (no torch here: the CLI reads it early).

Qwen2-VL, Qwen2.5-VL and Qwen3-VL share the special token ids; they differ in patch size and
in how videos are laid out (Qwen3-VL gives every temporal patch its own vision_start/end span).
Qwen2.5-Omni and Qwen3-Omni add audio placeholders (``audio_token_id`` 151646 in both thinker
configs of transformers 5.24), one per audio-encoder output frame; :func:`audio_tokens` is the
per-item length rule each model's ``_get_feat_extract_output_lengths`` implements.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

IMAGE_PAD = 151655
VIDEO_PAD = 151656
VISION_START = 151652
VISION_END = 151653
VISION_PAD = 151654
ENDOFTEXT = 151643
AUDIO_PAD = 151646
AUDIO_START = 151647


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
    audio_token_id: int | None = None  # set for the Omni presets: audio placeholders are selected too
    audio_start_token_id: int | None = None
    rope: str = "mrope"  # "mrope": 3-D (t, h, w) position_ids, as every preset's model; "1d": plain 1-D RoPE

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        """Every placeholder id whose positions take encoder rows: image, video, then audio if the model has it."""
        ids = (self.image_token_id, self.video_token_id)
        return ids + (self.audio_token_id,) if self.audio_token_id is not None else ids

    @property
    def merge_area(self) -> int:
        """Patches merged into one LLM token (``spatial_merge_size ** 2``, 4 for every Qwen-VL)."""
        return self.spatial_merge_size**2


MODELS: dict[str, TokenConfig] = {
    "qwen2-vl": TokenConfig("qwen2-vl", patch_size=14),
    "qwen2.5-vl": TokenConfig("qwen2.5-vl", patch_size=14),
    "qwen3-vl": TokenConfig("qwen3-vl", patch_size=16),
    "qwen2.5-omni": TokenConfig("qwen2.5-omni", patch_size=14, audio_token_id=AUDIO_PAD,
                                audio_start_token_id=AUDIO_START),
    "qwen3-omni": TokenConfig("qwen3-omni", patch_size=16, audio_token_id=AUDIO_PAD, audio_start_token_id=AUDIO_START),
}
QWEN3_OMNI_WINDOW = 50  # the audio encoder's n_window (Qwen3OmniMoeAudioEncoderConfig default)


def audio_tokens(model: str, feature_length: int) -> int:
    """Audio placeholder tokens for one audio item of ``feature_length`` mel frames.

    Qwen2.5-Omni: two stride-2 steps, ``((L - 1) // 2 + 1 - 2) // 2 + 1``. Qwen3-Omni: the audio is cut
    into chunks of ``2 * n_window`` = 100 frames; each whole chunk gives 13 tokens and the remainder
    ``r`` goes through three stride-2 convolutions, ``(((r - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1``.
    """
    if model == "qwen2.5-omni":
        return ((feature_length - 1) // 2 + 1 - 2) // 2 + 1
    if model == "qwen3-omni":
        chunk = 2 * QWEN3_OMNI_WINDOW
        rest = feature_length % chunk
        after = (((rest - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1
        return after + feature_length // chunk * 13
    raise ValueError(f"{model} has no audio rule")
DEFAULT_MODEL = "qwen3-vl"
ROPES = ("mrope", "1d")  # --rope: how the model's position_ids are checked


def token_config(
    model: str = DEFAULT_MODEL,
    *,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    rope: str | None = None,
) -> TokenConfig:
    """The preset for ``model`` with the user's explicit ids (and ``rope``, one of :data:`ROPES`) laid over it."""
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
    if rope is not None:
        if rope not in ROPES:
            raise InputError(f"unknown rope kind {rope!r}", where="--rope",
                             fix="use --rope mrope (3-D mRoPE position_ids, the default) or --rope 1d (1-D RoPE)")
        config = replace(config, rope=rope)
    return config
