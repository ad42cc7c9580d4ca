"""The scheduler's bookkeeping per output file, without Ray: which node owns the file and which of its tasks are
left (FileOwnership), and how far the file is final for its sha256 (HashFrontier)."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable

from ..planning.plan import Task

HASH_STEP = 256 << 20  # bytes: how often a file's hasher is told that more of it is final


class FileOwnership:
    """Each output file is written on one node where it can: a node keeps taking tasks of the files it claimed,
    claims an unclaimed file when it has none left (preferring one whose inputs it already read: Hub inputs are
    then in its cache), and at the tail helps the file with the most tasks left."""

    def __init__(self, files: Iterable[str], tasks: Iterable[Task], skip: Iterable[int] = ()):
        """files: the output files in plan order; tasks: all the plan's tasks; skip: ids already done (resume)."""
        tasks, skip = list(tasks), set(skip)
        self.todo: dict[str, deque[Task]] = defaultdict(deque)  # file -> its tasks not yet handed out
        for t in tasks:
            if t.id not in skip:
                self.todo[t.file].append(t)
        self.unclaimed = deque(f for f in files if self.todo.get(f))
        self.owner: dict[str, str] = {}  # file -> node that claimed it
        self.remaining = {f: len(q) for f, q in self.todo.items()}  # file -> tasks not yet done
        self.file_inputs: dict[str, set[str]] = defaultdict(set)  # output file -> input files its tasks read
        for t in tasks:
            self.file_inputs[t.file].update(t.input_files)
        self.node_inputs: dict[str, set[str]] = defaultdict(set)  # node -> input files its workers read

    def has_work(self, fname: str | None = None) -> bool:
        """Whether a task is left to hand out (of this file, or of any)."""
        return bool(self.todo.get(fname)) if fname is not None else any(self.todo.values())

    def next_task(self, node: str) -> Task | None:
        """The next task for a worker on this node, or None when no task is left to hand out."""
        mine = [f for f, n in self.owner.items() if n == node and self.todo[f]]
        if not mine and self.unclaimed:
            have = self.node_inputs.get(node, set())
            f = max(self.unclaimed, key=lambda f: len(self.file_inputs[f] & have)) if have else self.unclaimed[0]
            self.unclaimed.remove(f)
            self.owner[f] = node
            mine = [f]
        if mine:
            return self.todo[mine[0]].popleft()
        others = [f for f in self.todo if self.todo[f]]
        if others:  # the tail: help another node rather than sit idle
            return self.todo[max(others, key=lambda f: len(self.todo[f]))].popleft()
        return None

    def done(self, task: Task, node: str) -> bool:
        """A worker on this node finished the task; True when that was the last task of its file."""
        self.remaining[task.file] -= 1
        self.node_inputs[node].update(task.input_files)
        return self.remaining[task.file] == 0

    def give_back(self, task: Task) -> None:
        """The task's worker was lost: the task goes first in its file's queue, and the file is released to be
        claimed anew (first in line)."""
        self.todo[task.file].appendleft(task)
        self.owner.pop(task.file, None)
        if task.file not in self.unclaimed:
            self.unclaimed.appendleft(task.file)


class HashFrontier:
    """A file's sha256 follows its write frontier: the end of the longest prefix of the file's tasks (in byte
    order) that are all done. The hasher is told how far the file is final every `step` bytes, and at the end."""

    def __init__(self, files: Iterable[str], tasks: Iterable[Task], skip: Iterable[int] = (),
                 step: int = HASH_STEP):
        self.step = step
        self.tasks: dict[str, list[Task]] = defaultdict(list)  # file -> its tasks in byte order
        for t in sorted(tasks, key=lambda t: t.begin):
            self.tasks[t.file].append(t)
        self.done_ids: set[int] = set(skip)  # tasks already done count as done (resume)
        self.index: dict[str, int] = {f: 0 for f in files}  # file -> index of its first unfinished task
        self.told: dict[str, int] = {}  # file -> bytes the hasher was told are final

    @property
    def files(self) -> list[str]:
        return list(self.index)

    def done(self, task: Task) -> None:
        self.done_ids.add(task.id)

    def due(self, fname: str) -> int | None:
        """Move the file's frontier over its done tasks; the byte offset to tell the hasher is final, or None
        when that is not yet worth a call (less than `step` bytes more, and the file not complete)."""
        tasks, i = self.tasks.get(fname, []), self.index[fname]
        while i < len(tasks) and tasks[i].id in self.done_ids:
            i += 1
        self.index[fname] = i
        upto = tasks[i - 1].end if i else 0
        told = self.told.get(fname, 0)
        if upto <= told or (i < len(tasks) and upto - told < self.step):
            return None
        return upto

    def tell(self, fname: str, upto: int) -> None:
        """The hasher was told the file is final up to `upto`."""
        self.told[fname] = upto

    def forget(self, fname: str) -> None:
        """The file's hasher was lost: a new one starts from byte 0."""
        self.told.pop(fname, None)
