"""A usage event as a CloudEvent (structured mode, the shape OpenMeter ingests)."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import BillableTime, Text

EVENT_TYPE = "meterline.usage"
# Token counts fit the ledger's bigint columns with room to sum a month of them.
Tokens = Annotated[int, Field(ge=0, le=2**48, strict=True)]  # "12" or 12.0: refused


class UsageData(BaseModel):
    """What was used: the same figures a proxied request's usage carries."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1, max_length=256, description="The model, priced as asked.")
    prompt_tokens: Tokens
    completion_tokens: Tokens = 0
    cached_tokens: Tokens = Field(default=0, description="Of the prompt tokens, cached ones.")
    reasoning_tokens: Tokens = 0
    endpoint: Literal["chat", "completions", "embeddings"] = "chat"
    key_id: uuid.UUID | None = Field(default=None, description="A key of the account.")
    task_id: Text | None = Field(default=None, max_length=128)
    task_type: Text | None = Field(default=None, max_length=128)


class UsageCloudEvent(BaseModel):
    """CloudEvents 1.0 attributes; other (extension) attributes are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    specversion: Literal["1.0"]
    id: Text = Field(min_length=1, max_length=256)
    source: Text = Field(min_length=1, max_length=256, description="Who reports the usage.")
    type: Literal["meterline.usage"]
    subject: uuid.UUID = Field(description="The account the usage is billed to.")
    time: BillableTime | None = Field(default=None, description="When it happened (now if unset).")
    datacontenttype: Literal["application/json"] | None = None
    data: UsageData


class Ingested(BaseModel):
    accepted: int = Field(description="Events new to the ledger, one row each.")
    duplicates: int = Field(description="Events already ingested (by source and id): no change.")
