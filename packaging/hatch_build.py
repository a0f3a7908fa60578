"""Hatch build hook shared by ``packaging/engine`` and ``packaging/client``.

The packages live at the repository root, two levels up, so that the development
environment, the tests and the wheels all use the same source tree. A release wheel
copies the packages named in ``packages`` into itself; an editable (development)
install maps nothing and relies on ``dev-mode-dirs`` instead, so edits to the source
are seen without reinstalling.
"""

from __future__ import annotations

import os
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CopyRootPackages(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version != "standard":
            return
        top = os.path.normpath(os.path.join(self.root, "..", ".."))
        for name in self.config["packages"]:
            build_data["force_include"][os.path.join(top, name)] = name
