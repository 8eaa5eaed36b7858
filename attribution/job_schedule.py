"""Who runs when: the admission rule of :mod:`attribution.jobs`, as a pure function of job states.

- A job that needs an artifact some running job builds waits for that job (one build per artifact;
  afterwards it finds the artifact cached).
- A job that needs nothing (a re-score on cached artifacts) runs at once, whatever else builds.
- Otherwise it takes one of ``max_builds`` build slots; at most one slot goes to a background
  warm-up, and user requests go first (in the order they came).
"""

from __future__ import annotations

from typing import Optional


def why_wait(state: dict, needs: list[str], others: list[dict], max_builds: int) -> Optional[tuple[str, list[str]]]:
    """None when the job ``state`` (needing the artifacts ``needs``) may run now, else (the
    reason in words, ids of the jobs it waits for). ``others``: the run's other queued and
    running jobs; at most ``max_builds`` of them build at once."""
    running = [s for s in others if s["status"] == "running"]
    for s in running:
        shared = sorted(set(s.get("builds") or []) & set(needs))
        if shared:
            whose = s.get("label") or s["kind"]
            return f"waits for the build of the {shared[0]} ({whose}), which it needs too", [s["id"]]
    if not needs:
        return None
    building = [s for s in running if s.get("builds")]
    if len(building) >= max_builds:
        return (f"waits for a free build slot ({len(building)} builds are running; at most {max_builds} at once)",
                [s["id"] for s in building])

    def slot_waiter(s: dict) -> bool:  # a queued job that would take a slot if one were free
        blocked = any(set(r.get("builds") or []) & set(s.get("needs") or []) for r in running)
        return s["status"] == "queued" and bool(s.get("needs")) and not blocked

    if state.get("priority") == "background":
        if any(s.get("priority") == "background" for s in building):
            return "waits: one warm-up build at a time", [s["id"] for s in building]
        ahead = [s for s in others if slot_waiter(s) and s.get("priority") != "background"]
    else:
        ahead = [s for s in others if slot_waiter(s) and s.get("priority") != "background"
                 and s.get("queued_at", 0) < state.get("queued_at", 0)]
    if ahead and len(building) + len(ahead) >= max_builds:
        return "waits for a free build slot (earlier requests first)", [s["id"] for s in ahead]
    return None
