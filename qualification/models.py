"""What a qualification pilot writes to disk: its manifest, its items, and expert labels."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The annotator name of labels vkr sets itself (hard compliance failures): no person may use it.
from labelling.store import AUTO_ANNOTATOR as AUTO_ANNOTATOR
from labelling.store import Label as StoredLabel

LabelValue = Literal["ok", "hard", "soft"]
LABELS: tuple[str, ...] = ("ok", "hard", "soft")
CATEGORIES: tuple[str, ...] = (
    "hallucination",
    "unsupported step",
    "wrong answer",
    "format",
    "other",
)
# The paper's rule: a model is eligible for a step when its pilot error rate is at most 3 %.
MAX_ERROR_RATE = 0.03
PAPER_PILOT_SIZE = 100


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PilotManifest(Strict):
    """pilot.json: which step, model, prompt version and inputs a pilot covers."""

    pilot_id: str
    step: str
    model: str
    prompt_version: str
    n: int
    seed: int
    source_runs: list[str]
    pool: str
    # sha256 of each sampled input, in item order; inputs_sha256 hashes them sorted, so it
    # names the sample whatever order the items are shown in.
    input_hashes: list[str]
    inputs_sha256: str
    available: int = Field(description="distinct current inputs the sample was drawn from")
    strata: dict[str, int] = Field(description='"discipline / skill" -> items sampled')
    created: str
    structured_output: bool = Field(
        default=False,
        description="the calls carried the step's JSON schema (the pool entry's "
        "structured_output): its format failures are the model's under that schema",
    )


class PilotFrame(Strict):
    sha256: str
    path: str = Field(description="relative to the pilot directory")
    clock: str | None = Field(default=None, description="mm:ss the model was told")


class AutoLabel(Strict):
    label: LabelValue = "hard"
    category: str = "format"
    note: str


class PilotItem(Strict):
    """One line of items.jsonl: an input of the step and what the model made of it."""

    item_id: str
    index: int
    input_key: str
    input_sha256: str
    source_item_id: str = Field(
        default="",
        description="the run's item the input came from: a video's id, or a text step's "
        "item (a lecture, a knowledge point, a candidate video)",
    )
    video_id: str | None = Field(default=None, description="only for an input of a video")
    video_path: str | None = None
    discipline: str
    subject: str = ""
    skill: str | None = None
    round: int | None = None
    frames: list[PilotFrame]
    messages: list[dict[str, Any]] = Field(description="cache-key form: frames by sha256")
    prompt: str = Field(description="the rendered prompt as text, frames as placeholders")
    outcome: Literal["ok", "malformed", "refusal"]
    output: str | None
    parsed: dict[str, Any] | None = None
    error: str | None = None
    auto_label: AutoLabel | None = None

    @model_validator(mode="after")
    def _source_of_older_pilots(self) -> PilotItem:
        # Pilots written before text items named only the video.
        if not self.source_item_id and self.video_id:
            self.source_item_id = self.video_id
        return self


# The file `vkr qualify inputs` writes beside the step inputs it recorded.
PILOT_INPUTS_MANIFEST = "pilot-inputs.json"


class StepInputs(Strict):
    """How many distinct inputs of one step a pilot-inputs directory holds, and of what kind."""

    prompt_version: str
    inputs: int
    strata: dict[str, int] = Field(description='"discipline / skill" -> inputs')
    candidates: list[str] = Field(description="the pool models a pilot may qualify for it")


class PilotInputsManifest(Strict):
    """pilot-inputs.json: what `vkr qualify inputs` collected and what it has cost so far."""

    pool: str
    videos: str
    n: int = Field(description="distinct inputs asked for per step")
    config: dict[str, Any]
    steps: dict[str, StepInputs]
    videos_used: dict[str, str] = Field(description="video id -> file, for pilot items")
    calls_paid: int = Field(description="calls sent to providers, every invocation included")
    cost_usd: float
    updated: str


class Label(StoredLabel):
    """One expert (or automatic) judgement of one pilot item, as stored in labels.sqlite."""

    label: LabelValue
