"""Groups S, W and A: each member's model family, the ranking of the primary family by OOF
mIoU (the top ``n_strong`` are S, the rest W; other families are A) or the lists the params
give, and the best single member."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from pipeline.core.errors import PipelineError, unknown_name
from pipeline.ensembling.fusion import GROUPS
from pipeline.evaluation.metrics import mean_iou
from pipeline.inference.members import Member


def member_model(member: Member) -> str:
    """Model config name of a member: meta "model", else its name minus ``_s<seed>``."""
    meta = member.meta[member.folds[0]]
    return str(meta.get("model") or re.sub(r"_s\d+$", "", str(meta.get("member", member.name))))


def member_family(member: Member, families: Mapping[str, str], source: str) -> str:
    """Family from ``models.<model>.family`` of the params (the run's meta as a fallback)."""
    model = member_model(member)
    if model in families:
        return families[model]
    recorded = member.meta[member.folds[0]].get("family")
    if recorded:
        return str(recorded)
    raise PipelineError(f"{source}: member '{member.name}' needs models.{model}.family (model "
                        f"config '{model}' not found) for ensemble.groups: auto")


def member_families(members: Sequence[Member], families: Mapping[str, str], *,
                    explicit: Mapping[str, list[str]] | None, primary_family: str,
                    n_strong: int, source: str) -> dict[str, str | None]:
    """{member: family} (:func:`member_family`; None where unknown, which only automatic groups,
    ``explicit`` None, refuse); says when ``n_strong`` exceeds the primary family's members."""
    fam = {m.name: _family_or_none(m, families, source, required=explicit is None)
           for m in members}
    n_primary = sum(f == primary_family for f in fam.values())
    if explicit is None and n_strong > n_primary > 0:
        print(f"note: ensemble.n_strong {n_strong} is more than the {n_primary} members of "
              f"family '{primary_family}': clamped to {n_primary} (S takes them all, W is empty)")
    return fam


def _family_or_none(member: Member, families: Mapping[str, str], source: str, *,
                    required: bool) -> str | None:
    try:
        return member_family(member, families, source)
    except PipelineError:
        if required:
            raise
        return None


def resolve_groups(explicit: Mapping[str, list[str]] | None, *, names: Sequence[str],
                   scores: Mapping[str, float], families: Mapping[str, str], primary_family: str,
                   n_strong: int, n_aux: int, source: str = "params.yaml") -> dict[str, list[str]]:
    """Groups S, W, A (each sorted by name). Explicit lists are checked against the members;
    ``auto`` ranks the primary family by OOF mIoU (top ``n_strong`` = S, rest = W) and puts the
    other families in A (the top ``n_aux`` only, when > 0)."""
    if explicit is not None:
        seen: dict[str, str] = {}
        for group, listed in explicit.items():
            for name in listed:
                if name not in names:
                    raise PipelineError(f"{source}: ensemble.groups.{group}: "
                                        f"{unknown_name('member', name, names)}")
                if name in seen:
                    raise PipelineError(f"{source}: ensemble.groups: member '{name}' is in both "
                                        f"{seen[name]} and {group}")
                seen[name] = group
        groups = {g: list(explicit.get(g, [])) for g in GROUPS}
        if not groups["S"]:
            raise PipelineError(f"{source}: ensemble.groups.S is empty; list at least one member")
    else:
        if n_strong < 1:
            raise PipelineError(f"{source}: ensemble.n_strong must be >= 1, got {n_strong}")
        ranked = sorted(names, key=lambda n: (-scores[n], n))
        primary = [n for n in ranked if families[n] == primary_family]
        aux = [n for n in ranked if families[n] != primary_family]
        groups = {"S": primary[:n_strong], "W": primary[n_strong:],
                  "A": aux[:n_aux] if n_aux > 0 else aux}
        if not groups["S"]:
            raise PipelineError(f"{source}: no member of family '{primary_family}' for group S "
                                f"(families found: {', '.join(sorted(set(families.values())))}); "
                                f"set ensemble.primary_family or ensemble.groups")
    return {g: sorted(groups[g]) for g in GROUPS}


def best_member(member_cms: Mapping[str, np.ndarray]) -> str:
    """The member of the highest OOF mIoU (ties: the first name)."""
    return min(member_cms, key=lambda n: (-mean_iou(member_cms[n]), n))


@dataclass(frozen=True)
class Grouping:
    """The groups of a search once its members' OOF confusion matrices are known (explicit
    groups need none): :func:`resolve_groups` with the search's settings, called with
    {member: confusion matrix} or None."""

    explicit: Mapping[str, list[str]] | None
    names: Sequence[str]
    families: Mapping[str, str | None]
    primary_family: str
    n_strong: int
    n_aux: int
    source: str = "params.yaml"

    @property
    def auto(self) -> bool:
        """Groups ranked by OOF mIoU (``ensemble.groups: auto``)."""
        return self.explicit is None

    def __call__(self, member_cms: Mapping[str, np.ndarray] | None) -> dict[str, list[str]]:
        names = self.names
        scores = {n: mean_iou(member_cms[n]) for n in names} if member_cms is not None else {}
        return resolve_groups(self.explicit, names=names, scores=scores, families=self.families,
                              primary_family=self.primary_family, n_strong=self.n_strong,
                              n_aux=self.n_aux, source=self.source)
