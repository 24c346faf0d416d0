"""The rendered objects of each kustomization, for every check of deploy/kubernetes."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import KUSTOMIZATIONS, Obj, render


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def objects(request: pytest.FixtureRequest) -> tuple[Obj, ...]:
    return render(str(request.param))
