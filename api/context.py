"""The application's typed keys and the per-request accessors handlers use."""

from __future__ import annotations

import asyncio

from aiohttp import web

from api.auth import Caller, KeyRing, RateLimiter
from api.settings import Settings
from ledger.store import EventStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", EventStore)
KEYRING = web.AppKey("keyring", KeyRing)
LIMITER = web.AppKey("limiter", RateLimiter)
STOPPING = web.AppKey("stopping", asyncio.Event)

CALLER = web.RequestKey("caller", Caller)


def caller(request: web.Request) -> Caller:
    found: Caller = request[CALLER]
    return found


def store(request: web.Request) -> EventStore:
    # the request's own application first: ``config_dict`` builds a chain of the nested
    # applications on every call, which only a dialect's sub-application needs
    found = request.app.get(STORE)
    return request.config_dict[STORE] if found is None else found


def settings(request: web.Request) -> Settings:
    found = request.app.get(SETTINGS)
    return request.config_dict[SETTINGS] if found is None else found
