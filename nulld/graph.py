"""Service dependency graph: a deterministic start order, and cycles reported as the cycle itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class CycleError(ValueError):
    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__(f"dependency cycle: {' -> '.join(cycle)}")


def find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """One cycle as a path that returns to its start (``a -> b -> a``), or None.  Iterative DFS, sorted order."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for root in sorted(graph):
        if state.get(root):
            continue
        path: list[str] = [root]
        stack: list[list[str]] = [sorted(graph.get(root, ()), reverse=True)]
        state[root] = 1
        while stack:
            if not stack[-1]:
                state[path.pop()] = 2
                stack.pop()
                continue
            nxt = stack[-1].pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(sorted(graph[nxt], reverse=True))
    return None


def start_order(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """Dependencies before dependents; among services that are free at the same time, alphabetical order."""
    cycle = find_cycle(graph)
    if cycle is not None:
        raise CycleError(cycle)
    remaining = {name: set(deps) & set(graph) for name, deps in graph.items()}
    order: list[str] = []
    while remaining:
        free = sorted(name for name, deps in remaining.items() if not deps)
        order += free
        for name in free:
            del remaining[name]
        for deps in remaining.values():
            deps.difference_update(free)
    return order


def dependents(graph: Mapping[str, Sequence[str]], name: str) -> set[str]:
    """Every service that depends on ``name``, directly or not."""
    found: set[str] = set()
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for other, deps in graph.items():
            if current in deps and other not in found:
                found.add(other)
                frontier.append(other)
    return found
