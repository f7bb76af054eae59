"""Print the fault-injection results (``$FLEETLOG_FAULTS_REPORT``) as a Markdown table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("scenario", "acked", "stored", "lost", "duplicated", "recovery_s", "note")


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[column]) for column in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    report = Path(sys.argv[1])
    print(table(report) if report.exists() else "no fault-injection results were recorded")
