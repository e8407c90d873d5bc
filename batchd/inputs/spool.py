"""The layout of a job's spool folder (`spool/JOB/`), in one place.

Intake moves a claimed input here; prepare writes its JSONL requests and part files
beside it; collect fetches each part's result files and writes follow-up parts; publish
copies what it keeps into the outbox and removes the folder. Every name in it is spelled
here, once:

| member | what it is |
| --- | --- |
| `input.jsonl` / `input.csv` | the claimed input, under its kind (`input_name`) |
| `input.jsonl` | the requests as JSONL (`requests`): the input itself, or a CSV's conversion |
| `claim.json` | what the database knows of the claim (re-creates a job the database lost) |
| `meta.meta.json` | the input's sidecar, moved in with it (`sidecar`) |
| `late.meta.json` | a sidecar that came after the claim, never applied (`late_sidecar`) |
| `NAME.part-NNN.jsonl` | the parts of an input too large for one batch (`inputs.validate`) |
| `part-NNN.output.jsonl`, `part-NNN.error.jsonl` | a part's fetched result files (`result`) |
| `followup-R-NNN.jsonl` | the failures resubmitted in round R (`followup`) |

The spool is this machine's: the folder is a local path (inbox and spool share a mount,
so that a claim is a rename).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REQUESTS = "input.jsonl"
CLAIM_RECORD = "claim.json"
SIDECAR_STEM = "meta"
LATE_SIDECAR = "late.meta.json"
INPUT_KINDS = ("jsonl", "csv")
RESULT_KINDS = ("output", "error")


def input_name(kind: str) -> str:
    """PURE: the name of a claimed input of `kind` ("jsonl" or "csv") in its folder."""
    return f"input.{kind}"


@dataclass(frozen=True, slots=True)
class SpoolFolder:
    """One job's folder in the spool: where each of its files is."""

    path: Path

    @classmethod
    def of_input(cls, spool_path: str | Path) -> SpoolFolder:
        """The folder of a job whose claimed input is at `spool_path` (`Job.spool_path`)."""
        return cls(Path(spool_path).parent)

    @property
    def job_id(self) -> str:
        return self.path.name

    def input(self, kind: str) -> Path:
        """The claimed input of `kind`."""
        return self.path / input_name(kind)

    @property
    def requests(self) -> Path:
        """The job's requests as JSONL: the input itself (a JSONL job), or the conversion
        prepare writes (a CSV job)."""
        return self.path / REQUESTS

    @property
    def claim_record(self) -> Path:
        return self.path / CLAIM_RECORD

    def sidecar(self, suffix: str) -> Path:
        """The input's sidecar moved in at its claim (`suffix`: ".meta.json")."""
        return self.path / f"{SIDECAR_STEM}{suffix}"

    @property
    def late_sidecar(self) -> Path:
        return self.path / LATE_SIDECAR

    def result(self, seq: int, kind: str) -> Path:
        """Where collect puts part `seq`'s `kind` ("output" or "error") result file."""
        return self.path / f"part-{seq:03d}.{kind}.jsonl"

    def results(self, kind: str) -> list[Path]:
        """Every fetched result file of `kind` in the folder."""
        return sorted(self.path.glob(f"part-*.{kind}.jsonl"))

    def followup(self, round_: int, seq: int) -> Path:
        """Part `seq` of the failures resubmitted in round `round_`."""
        return self.path / f"followup-{round_}-{seq:03d}.jsonl"
