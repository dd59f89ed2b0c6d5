"""Placeholder: routes of this API family are being written."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
