"""What ``simulate`` adds on top of one run (``--positions``, ``--vision-dp``): one declared protocol.

An extension computes from a finished :class:`~cpinspect.simulation.run.Result`, says whether what
it checked holds, and adds its part to the ``--json`` document. Drawing it is the job of its view
(``cpinspect.views.positions.render``, ``cpinspect.views.vision_dp.render``), never of the extension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cpinspect.core.findings import Finding
    from cpinspect.simulation.run import Result


class Extension(Protocol):
    """A computation run after :func:`~cpinspect.simulation.run.simulate` on the same batch."""

    @property
    def findings(self) -> list[Finding]:
        """What the extension found (problems make ``ok`` false)."""
        ...

    @property
    def ok(self) -> bool:
        """No finding of the extension is a problem."""
        ...

    def run(self, result: Result) -> None:
        """Compute from ``result``; fills the extension's own fields."""
        ...

    def add_json(self, document: dict[str, Any]) -> None:
        """Add the extension's part to the simulation's ``--json`` document (in place)."""
        ...
