from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Tier = Literal["basic", "pro", "custom"]
FailedTaskPolicy = Literal["free", "cost"]


class AccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    tier: Tier = "basic"
    monthly_budget_usd: Decimal | None = Field(default=None, ge=0, max_digits=24, decimal_places=12)


class AccountOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    tier: Tier
    monthly_budget_usd: Decimal | None
    quote_margin: Decimal | None
    failed_task_policy: FailedTaskPolicy
    rate_limit_rpm: int | None
    rate_limit_tpm: int | None
    created_at: datetime


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    expires_at: datetime | None = None


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    account_id: uuid.UUID
    name: str | None
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    expires_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself. Shown once, never again.")
