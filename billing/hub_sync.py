"""Keep the Hub's model mappings in step with the catalog: plan the changes, then (with --apply) make them."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from billing.hub import Mapping, PartnerApi
from models.catalog import ModelCatalog, ModelSpec

STATUSES = ("staging", "live")


@dataclass(frozen=True)
class SyncAction:
    """One line of the plan: what `hfi hub sync` would do (or did) for one model."""

    action: str  # register | update | status | ok | extra (on the Hub, not in the catalog: left alone)
    hf_model: str
    task: str
    provider_model: str
    status: str
    was: Mapping | None = None

    def describe(self) -> str:
        """A one-line, human-readable form."""
        if self.action == "register":
            return f"register {self.hf_model} ({self.task}) -> {self.provider_model} [{self.status}]"
        if self.action == "update":
            assert self.was is not None
            return (
                f"update   {self.hf_model}: {self.was.task} -> {self.was.provider_model} becomes "
                f"{self.task} -> {self.provider_model} [{self.status}]"
            )
        if self.action == "status":
            assert self.was is not None
            return f"status   {self.hf_model}: {self.was.status} -> {self.status}"
        if self.action == "extra":
            return f"extra    {self.hf_model} ({self.task}) is on the Hub but not in the catalog (left alone)"
        return f"ok       {self.hf_model} ({self.task}) -> {self.provider_model} [{self.status}]"


def hub_task(spec: ModelSpec) -> str:
    """The Hub task of a catalog model; chat-capable text generation is registered as "conversational"."""
    if spec.task == "text-generation" and (spec.tasks is None or "chat-completion" in spec.tasks):
        return "conversational"
    return spec.task


def plan_sync(
    catalog: ModelCatalog, existing: list[Mapping], *, exclude: list[str], status: str | None = None
) -> list[SyncAction]:
    """The changes that bring the Hub's mappings in line with the catalog.

    New mappings get `status` (staging when None); existing ones keep theirs unless `status` is given.
    """
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}")
    on_hub = {m.hf_model.lower(): m for m in existing}
    plan: list[SyncAction] = []
    wanted: set[str] = set()
    for spec in catalog.models:
        if any(fnmatch.fnmatchcase(spec.id, pat) for pat in exclude):
            continue
        wanted.add(spec.id.lower())
        task, provider_model = hub_task(spec), spec.id
        cur = on_hub.get(spec.id.lower())
        if cur is None:
            plan.append(SyncAction("register", spec.id, task, provider_model, status or "staging"))
        elif (cur.task, cur.provider_model) != (task, provider_model):
            plan.append(SyncAction("update", spec.id, task, provider_model, status or cur.status, was=cur))
        elif status is not None and cur.status != status:
            plan.append(SyncAction("status", spec.id, task, provider_model, status, was=cur))
        else:
            plan.append(SyncAction("ok", spec.id, task, provider_model, cur.status, was=cur))
    for m in existing:
        if m.hf_model.lower() not in wanted:
            plan.append(SyncAction("extra", m.hf_model, m.task, m.provider_model, m.status, was=m))
    return plan


def apply_sync(api: PartnerApi, plan: list[SyncAction]) -> int:
    """Carry out a plan through the partner API; returns how many changes were made."""
    changes = 0
    for a in plan:
        if a.action in ("register", "update"):
            api.register(Mapping(a.task, a.hf_model, a.provider_model, a.status))
            changes += 1
        elif a.action == "status":
            api.set_status(a.hf_model, a.status)
            changes += 1
    return changes
