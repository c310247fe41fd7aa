"""The production variants of the SageMaker endpoint that `ics serve` is (`variants`): each a
served model under a variant name, with a weight.

An invocation goes to the variant its `X-Amzn-SageMaker-Target-Variant` header names
(boto3's `TargetVariant`), or else to one chosen at random in proportion to the weights, as
SageMaker splits an endpoint's traffic; its answer names it in
`X-Amzn-Invoked-Production-Variant` (boto3's `InvokedProductionVariant`). A variant name
the endpoint lacks is a ValidationError (400). With no variants configured the endpoint has
one, named `capture_variant` (AllTraffic by default), serving the default model.

A `TargetModel` (multi-model endpoints) picks the model within the chosen variant, as a
SageMaker variant hosting a multi-model container does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import ProductionVariant, Settings
from ..errors import UsageError
from .sagemaker_wire import BadRequest

#: The header of an invocation's target variant (boto3's `TargetVariant`).
TARGET_VARIANT = "X-Amzn-SageMaker-Target-Variant"
#: The header of the variant that answered (boto3's `InvokedProductionVariant`).
INVOKED_VARIANT = "X-Amzn-Invoked-Production-Variant"


@dataclass(frozen=True)
class Variant:
    """A production variant: its name, the served model it routes to, and its weight."""

    name: str
    model: str
    weight: float


class Variants:
    """The endpoint's variants, in their configured order, and the weighted choice."""

    def __init__(self, variants: Sequence[Variant], rng: random.Random | None = None) -> None:
        if not variants:
            raise ValueError("an endpoint has at least one variant")
        self.all = tuple(variants)
        self._by_name = {v.name: v for v in self.all}
        self._weights = [v.weight for v in self.all]
        self._rng = rng or random.Random()

    @classmethod
    def of(cls, settings: Settings, default_model: str) -> Variants:
        """The configured variants, or the one of the default model (`capture_variant`)."""
        configured: list[ProductionVariant] = settings.variants
        if not configured:
            return cls([Variant(settings.capture_variant, default_model, 1.0)])
        return cls([Variant(v.name, v.model, v.weight) for v in configured])

    def check_served(self, served: Sequence[str]) -> None:
        """Refuse variants whose model is not among the served models."""
        for variant in self.all:
            if variant.model not in served:
                raise UsageError(
                    f"variant {variant.name!r} routes to model {variant.model!r}, which this "
                    f"server does not serve (it serves {', '.join(served)})"
                )

    def pick(self, target: str | None, endpoint: str) -> Variant:
        """The variant `target` names, or one chosen at random by weight; BadRequest
        (ValidationError) for a name the endpoint lacks."""
        if target is not None:
            found = self._by_name.get(target)
            if found is None:
                names = ", ".join(v.name for v in self.all)
                raise BadRequest(
                    f"The variant {target} does not exist for endpoint {endpoint}: its "
                    f"variants are {names}."
                )
            return found
        if len(self.all) == 1:
            return self.all[0]
        return self._rng.choices(self.all, weights=self._weights)[0]
