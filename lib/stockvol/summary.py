"""One summary line per stage: rows in, rows out, rows rejected, seconds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageSummary:
    """What a stage did, printed as one line and kept for the pipeline's total."""

    stage: str
    rows_in: int
    rows_out: int
    rows_rejected: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """``[stage] rows_in=… rows_out=… rejected=… seconds=… {details}`` on one line."""
        extra = f" {json.dumps(self.details, sort_keys=True, default=str)}" if self.details else ""
        return (
            f"[{self.stage}] rows_in={self.rows_in} rows_out={self.rows_out} "
            f"rejected={self.rows_rejected} seconds={self.seconds:.1f}{extra}"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
