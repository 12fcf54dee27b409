"""Request and response models of the service: bounds live here, so a bad request is a 400 that names the field.

Limits that depend on the deployment (largest side, most steps, default deadline) come from the service's settings
(``bento.config.ServeConfig``, read from the environment once, at import) so an operator can raise them for a GPU
without editing code; the defaults suit CPU serving. Width and height are optional: the served model's native size
(its manifest) fills them in, and its own limits (min/max side, multiple) are checked when it is known, in
``bento.runtime``.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from bento.config import ServeConfig

_CONFIG = ServeConfig.from_env()
MAX_SIDE = _CONFIG.max_side
MAX_STEPS = _CONFIG.max_steps
MAX_IMAGES = _CONFIG.max_images
DEFAULT_DEADLINE_S = _CONFIG.deadline_s


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be a multiple of 8 (got {value}; try {max(8, value // 8 * 8)})")
    return value


def _no_nul(value: str) -> str:
    """PostgreSQL cannot store a NUL character: refuse it here (400) rather than after the image was made (500)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (\\u0000)")
    return value


# Numbers are strict: JSON true or "2" where a number belongs is a 400, never stored as 1 or 2.
Int = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]
Text = Annotated[str, AfterValidator(_no_nul)]
Side = Annotated[Int, Field(ge=8, le=MAX_SIDE), AfterValidator(_multiple_of_8)]


class Txt2ImgRequest(BaseModel):
    """One text-to-image request. Unknown fields are refused (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[Text, Field(min_length=1, max_length=4000, description="What to draw.")]
    negative_prompt: Annotated[Text, Field(max_length=4000, description="What not to draw.")] = ""
    steps: Annotated[Int, Field(ge=1, le=MAX_STEPS, description="Denoising steps.")] = 20
    guidance_scale: Annotated[Number, Field(ge=0.0, le=30.0, description="Classifier-free guidance.")] = 7.5
    width: Annotated[Optional[Side], Field(description="Image width in pixels; default: the model's native width "
                                                       "(GET /info), which its limits may restrict further.")] = None
    height: Annotated[Optional[Side], Field(description="Image height in pixels; default: the model's native "
                                                        "height.")] = None
    seed: Annotated[Optional[Int], Field(ge=0, lt=2**63, description="Seed; random when absent, always "
                                                                      "returned.")] = None
    num_images: Annotated[Int, Field(ge=1, le=MAX_IMAGES, description="Images to generate (seed, seed+1, ...).")] \
        = 1
    timeout_s: Annotated[Number, Field(gt=0, le=3600, description="Deadline of this request in seconds: past it the "
                                                                 "generation is interrupted and the answer is 504.")] \
        = DEFAULT_DEADLINE_S
    candidates: Annotated[Int, Field(ge=1, le=2, description="2: two candidates of one prompt (seed, seed+1) under "
                                                             "one pair_id; POST /choose says which one you kept.")] \
        = 1

    @model_validator(mode="after")
    def _candidates(self) -> "Txt2ImgRequest":
        """Two candidates are two images of this prompt: num_images becomes 2 (1 or 2 may be sent, nothing else),
        so the budget, the queue and the log see what is drawn."""
        if self.candidates == 2:
            if self.num_images not in (1, 2):
                raise ValueError(f"candidates: 2 draws two images of one prompt; leave num_images out (got "
                                 f"{self.num_images})")
            if MAX_IMAGES < 2:
                raise ValueError(f"candidates: 2 needs 2 images per request; this server allows {MAX_IMAGES} "
                                 "(SDLOOP_MAX_IMAGES)")
            self.num_images = 2
        return self


class GeneratedImage(BaseModel):
    generation_id: str = Field(description="Quote it when posting feedback.")
    seed: int
    image_png_base64: str
    pair_id: Optional[str] = Field(None, description="With candidates: 2, the pair both images belong to.")


class Txt2ImgResponse(BaseModel):
    status: str = Field("ok", description="ok (errors come back as 4xx/5xx with an error and a status).")
    model_version: str
    latency_s: float
    images: list[GeneratedImage]
    pair_id: Optional[str] = Field(None, description="With candidates: 2: quote it in POST /choose.")

    @model_validator(mode="after")
    def _pair(self) -> "Txt2ImgResponse":
        """The images' pair id at the top too (a job's answer is built from its images alone)."""
        if self.pair_id is None and self.images and self.images[0].pair_id:
            self.pair_id = self.images[0].pair_id
        return self


class FeedbackRequest(BaseModel):
    """Feedback on one generation: a rating and/or thumbs, optionally a comment and tags. A repeat from the same
    client replaces that client's earlier feedback."""

    model_config = ConfigDict(extra="forbid")

    generation_id: Annotated[Text, Field(min_length=1, max_length=64, description="From the txt2img answer.")]
    rating: Annotated[Optional[Int], Field(ge=1, le=5, description="1 (bad) to 5 (great).")] = None
    thumbs: Annotated[Optional[Text], Field(pattern="^(up|down)$", description="up or down.")] = None
    comment: Annotated[Optional[Text], Field(max_length=2000)] = None
    tags: Annotated[list[Annotated[Text, Field(min_length=1, max_length=64)]], Field(max_length=20)] = []
    client_id: Annotated[Optional[Text], Field(min_length=1, max_length=200, description="Who rates (default: the "
                                                                                        "X-Client-Id header, else "
                                                                                        "the client address).")] \
        = None

    @model_validator(mode="after")
    def _rated(self) -> "FeedbackRequest":
        if self.rating is None and self.thumbs is None:
            raise ValueError("give a rating (1-5) and/or thumbs (up or down)")
        return self


class FeedbackResponse(BaseModel):
    status: str
    feedback_id: int
    updated: bool = Field(description="True when this replaced the client's earlier feedback.")


class ChooseRequest(BaseModel):
    """Which of a two-candidate answer's images the caller kept. A repeat from the same client replaces its earlier
    choice on that pair."""

    model_config = ConfigDict(extra="forbid")

    pair_id: Annotated[Text, Field(min_length=1, max_length=64, description="From the candidates: 2 answer.")]
    chosen: Annotated[Text, Field(min_length=1, max_length=64, description="The generation_id of the image kept.")]
    client_id: Annotated[Optional[Text], Field(min_length=1, max_length=200, description="Who chooses (default: the "
                                                                                        "X-Client-Id header, else "
                                                                                        "the key's name).")] = None


class ChooseResponse(BaseModel):
    status: str
    choice_id: int
    pair_id: str
    chosen: str
    rejected: str = Field(description="The other image of the pair.")
    updated: bool = Field(description="True when this replaced the client's earlier choice on the pair.")
