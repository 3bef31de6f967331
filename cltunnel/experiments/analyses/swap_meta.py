"""``swap_meta.txt``: the k a run's swap analysis used, how it was chosen, and the profile's notices; its one
writer and one reader, and what the seed tables say of a scenario's seeds from it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cltunnel.experiments.analyses.loading import LoadedRun
from cltunnel.measures.tunnel import describe_rule
from cltunnel.store import SWAP_META


@dataclass
class SwapMeta:
    k: int
    rule: str  # the rule and threshold in words (describe_rule), or "fixed: analyses.tunnel_start"
    notices: list[str]


def swap_meta_text(run: LoadedRun, meta: SwapMeta) -> str:
    """The file's text: its one writer is the swap analysis, which returns it."""
    return f"tunnel_start {meta.k} of {run.depth} layers ({meta.rule})\n" + "".join(f"notice: {n}\n" for n in meta.notices)


def write_swap_meta(run: LoadedRun, meta: SwapMeta) -> None:
    (run.run_dir / SWAP_META).write_text(swap_meta_text(run, meta))


def read_swap_meta(run_dir: Path) -> SwapMeta | None:
    """The one reader of swap_meta.txt (runs written before the rules were named: rule 'last', no notices)."""
    path = Path(run_dir) / SWAP_META
    if not path.exists():
        return None
    first, *rest = path.read_text().splitlines()
    rule = first[first.index("(") + 1 : -1] if "(" in first else describe_rule("last")
    return SwapMeta(int(first.split()[1]), rule, [line[len("notice: "):] for line in rest if line.startswith("notice: ")])


def swap_metas(runs: list[Path]) -> list[tuple[Path, SwapMeta]]:
    """The seeds that have a swap_meta.txt, with it."""
    return [(r, meta) for r in runs if (meta := read_swap_meta(r)) is not None]


def rule_texts(metas: list[tuple[Path, SwapMeta]]) -> list[str]:
    """How the runs' tunnel starts were chosen, each way once."""
    return list(dict.fromkeys(meta.rule for _, meta in metas))


def seed_notices(metas: list[tuple[Path, SwapMeta]]) -> list[str]:
    """The degenerate-profile notices of the seeds, each once with the seeds it concerns."""
    seen: dict[str, list[str]] = {}
    for run, meta in metas:
        for notice in meta.notices:
            kind = notice.split(" (")[0].split(":")[0]  # the notice's wording without its numbers
            seen.setdefault(kind, []).append(f"{run.name}: {notice}")
    return [f"NOTICE {'; '.join(items)}" for items in seen.values()]
