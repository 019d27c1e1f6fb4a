"""The store scrub: `lyra verify` as a Prefect flow, for scheduled checks (deployment ``verify-store``).

Checks every chunk (present, crc32c) and table of every finished unit (``lyra_pipeline.store.verify``), publishes
the report as a Prefect markdown artifact, and with ``repair`` marks damaged units for recompute (the next
``generate-dataset`` run recomputes exactly those). Damage found and not repaired fails the flow run, so a
scheduled scrub alerts like any failed run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from lyra_pipeline.store.runstore import RunStore
from lyra_pipeline.store.verify import verify_store as verify

DEFAULT_STORE = "./lyra_store"


class StoreDamaged(RuntimeError):
    """The scrub found damage (and was not asked to repair it)."""


@flow(name="verify-store")
def verify_store(store: str = DEFAULT_STORE, scenes: list[str] | None = None, repair: bool = False) -> dict[str, Any]:
    """Verify ``store`` (every scene, or ``scenes``); ``repair``: mark what is damaged for recompute."""
    logger = get_run_logger()
    report = verify(RunStore(store, create=False), scenes, repair=repair, log=lambda line: logger.warning(line))
    lines = [f"**{store}**: {report.scenes} scenes, {report.units} finished units, {report.arrays} arrays, "
             f"{report.chunks} chunks, {report.tables} tables, {report.bytes / 1e6:.1f} MB in {report.seconds:.1f} s "
             f"({report.mb_per_s:.0f} MB/s)", ""]
    lines += [f"- damaged: `{d.line()}`" for d in report.damage] or ["no damage"]
    lines += [f"- repaired: {r}" for r in report.repaired]
    create_markdown_artifact(key="store-verify", markdown="\n".join(lines), description=f"verify {store}")
    if report.damage and (not repair or report.skipped_leased or report.unrepaired):
        raise StoreDamaged(f"{store}: {len(report.damage)} damaged ({len(report.damaged_units)} units); "
                           f"`lyra verify --store {store} --repair`")
    return report.as_dict()
